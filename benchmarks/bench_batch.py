"""Benchmark 1: batch predict on mixed-length text (3 to 120 words).

Compares, per model size, pyfunc predict of the fullmodel flavor against (a) the forward-only limit
(the same TorchScript module on pre-tokenised, length-sorted batches of 32) and (b) the
hand-written PythonModel (tokenise all rows, pad to the longest, one forward).
"""

from __future__ import annotations

import mlflow
import pandas as pd
import sentencepiece
import torch

from benchmarks.common import best_time, saved_models, subject_of, table
from benchmarks.models import texts

ROWS = 512


def forward_only(spm: str, net: torch.jit.ScriptModule, rows: list[str]) -> None:
    """Pre-tokenised outside the timing; only sorted, padded batches through the module."""
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=spm)
    ids = sorted((torch.tensor(x[:256]) for x in tokenizer.encode(rows)), key=len)
    batches = []
    for start in range(0, len(ids), 32):
        chunk = ids[start : start + 32]
        batches.append((torch.nn.utils.rnn.pad_sequence(chunk, batch_first=True), torch.tensor([len(x) for x in chunk])))

    def run() -> None:
        with torch.inference_mode():
            for padded, lengths in batches:
                net(padded, lengths)

    return run


def main() -> list[list[object]]:
    rows = texts(ROWS, seed=3)
    frame = pd.DataFrame({"text": rows})
    results = []
    for size in ("tiny", "medium"):
        s = subject_of(size)
        paths = saved_models(size)
        fullmodel = mlflow.pyfunc.load_model(paths["fullmodel"])
        handwritten = mlflow.pyfunc.load_model(paths["handwritten"])
        fullmodel.predict(frame.head(8)), handwritten.predict(frame.head(8))  # warm up
        limit = ROWS / best_time(forward_only(s.spm, s.net, rows))
        hand = ROWS / best_time(lambda: handwritten.predict(frame))
        ours = ROWS / best_time(lambda: fullmodel.predict(frame))
        results.append([size, f"{limit:.0f}", f"{hand:.0f}", f"{ours:.0f}", f"{ours / limit:.2f}", f"{ours / hand:.2f}"])
    print(f"\nBatch predict, {ROWS} mixed-length rows (rows/s; best of 3)")
    print(table(results, ["model", "forward-only", "hand-written", "fullmodel", "fullmodel/limit", "fullmodel/hand"]))
    return results


if __name__ == "__main__":
    main()
