"""Benchmark 1: batch predict on mixed-length text (3 to 120 words).

Compares, per model size, pyfunc predict of the fullmodel flavor against (a) the forward-only limit
(the same TorchScript module on pre-tokenised, length-sorted batches of 32) and (b) the
hand-written PythonModel (tokenise all rows, pad to the longest, one forward). Also measures (c) a
lean pipeline, the same steps written for this one model with nothing else: what those steps cost
by themselves; and (d) the module on one example per call on one thread: what a served request
costs a core, from which the serving benchmark works out how many requests per second these cores
could serve at best.
"""

from __future__ import annotations

from collections.abc import Callable

import mlflow
import numpy as np
import pandas as pd
import sentencepiece
import torch

from benchmarks.common import best_time, saved_models, subject_of, table
from benchmarks.models import LABELS, texts

ROWS = 512
HEADER = ["model", "forward-only", "forward-only, 1 row per call, 1 thread", "hand-written", "lean pipeline",
          "fullmodel", "fullmodel/limit", "fullmodel/hand", "lean/hand"]


def forward_only(spm: str, net: torch.jit.ScriptModule, rows: list[str], batch_size: int = 32) -> Callable[[], None]:
    """Pre-tokenised outside the timing; only sorted, padded batches through the module."""
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=spm)
    ids = sorted((torch.tensor(x[:256]) for x in tokenizer.encode(rows)), key=len)
    batches = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        padded = torch.nn.utils.rnn.pad_sequence(chunk, batch_first=True)
        batches.append((padded, torch.tensor([len(x) for x in chunk])))

    def run() -> None:
        with torch.inference_mode():
            for padded, lengths in batches:
                net(padded, lengths)

    return run


def lean_pipeline(
    spm: str, net: torch.jit.ScriptModule, rows: list[str], batch_size: int = 32
) -> Callable[[], pd.DataFrame]:
    """Raw text to labels, written for this one model with nothing but the necessary work: one
    tokenizer call on every core, length-sorted batches padded in numpy, the forward pass, softmax
    and the best label. No checks, no per-row objects, no pyfunc: what the steps themselves cost."""
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=spm)
    labels = np.array(LABELS)

    def run() -> pd.DataFrame:
        ids = [x[:256] for x in tokenizer.encode(rows, num_threads=-1)]
        sizes = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        order = np.argsort(sizes, kind="stable")
        scores = np.empty((len(ids), len(labels)))
        with torch.inference_mode():
            for start in range(0, len(ids), batch_size):
                chunk = order[start : start + batch_size]
                padded = np.zeros((len(chunk), sizes[chunk].max()), dtype=np.int64)
                for row, index in enumerate(chunk):
                    padded[row, : sizes[index]] = ids[index]
                scores[chunk] = net(torch.from_numpy(padded), torch.from_numpy(sizes[chunk])).numpy()
        exps = np.exp(scores - scores.max(axis=1, keepdims=True))
        probabilities = exps / exps.sum(axis=1, keepdims=True)
        return pd.DataFrame({"label": labels[probabilities.argmax(axis=1)], "probability": probabilities.max(axis=1)})

    return run


def one_thread(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` on one intra-op thread: what one served request costs a core."""
    def run() -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            fn()
        finally:
            torch.set_num_threads(threads)

    return run


def forward_rates(results: list[list[object]]) -> tuple[dict[str, float], dict[str, float]]:
    """From ``main``'s rows, per model: the forward-only limit and the one-row, one-thread rate."""
    return ({str(row[0]): float(row[1]) for row in results}, {str(row[0]): float(row[2]) for row in results})


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
        single = ROWS / best_time(one_thread(forward_only(s.spm, s.net, rows, batch_size=1)))
        hand = ROWS / best_time(lambda: handwritten.predict(frame))
        lean_run = lean_pipeline(s.spm, s.net, rows)
        if lean_run()["label"].tolist() != fullmodel.predict(frame)["label"].tolist():
            raise AssertionError(f"{size}: the lean pipeline's labels differ from fullmodel's")
        lean = ROWS / best_time(lean_run)
        ours = ROWS / best_time(lambda: fullmodel.predict(frame))
        results.append([size, f"{limit:.0f}", f"{single:.0f}", f"{hand:.0f}", f"{lean:.0f}", f"{ours:.0f}",
                        f"{ours / limit:.2f}", f"{ours / hand:.2f}", f"{lean / hand:.2f}"])
    print(f"\nBatch predict, {ROWS} mixed-length rows (rows/s; best of 3)")
    print(table(results, HEADER))
    return results


if __name__ == "__main__":
    main()
