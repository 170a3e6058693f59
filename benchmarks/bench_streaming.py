"""Benchmark 8: time to the first streamed event against time to the whole answer, for 12-token
outputs of the translator example, at its tiny size and at a production size.

The translator example is trained at its tiny size, on numbers up to 999,999 with a target
tokenizer of 30 pieces (so that translations run to 12 target tokens and more), into a temporary
SQLite store (a script in its own process, as a user runs it). Sources whose translation runs to
12 tokens or more are answered with ``max_length=12``, so every answer is exactly 12 generated
tokens. Two places:

1. In-process, one torch thread (what the server gives each of its workers on 2 cores): the
   FullModel's ``predict_records`` of one row against its ``predict_stream`` (its first event, and
   its last); then the same through pyfunc (``predict`` against ``predict_stream``, MLflow's schema
   checks and the serving limits included).
2. Over HTTP, `mlflow-fullmodel serve`: ``POST /invocations`` against the same request with
   ``Accept: text/event-stream`` (the first ``data:`` line, and the end of the stream), one client,
   a keep-alive connection.

The same is measured on a production-sized translator (``SizedTranslator``: the example's
architecture with embeddings of 256, a 2-layer GRU encoder and 4 decoder GRU cells of 512, a
4,000-piece sentencepiece tokenizer trained here on generated text, random weights, the EOS logit
pushed down so that every answer runs to ``max_length``), saved with ``mlflow_fullmodel.save_model``
and served by `mlflow-fullmodel serve` the same way. The table's "step ms" is
(whole - first) / 11, the cost of one decoding step.

Beam search with the saved beam (4) and with a beam of 1 (greedy). Each measurement alternates
streamed and whole requests, ``--repeats`` times; the table has medians and the ratio first event /
whole answer of the same run (goal: at most 0.25).

    python -m benchmarks.bench_streaming [--repeats 40]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import requests
import sentencepiece
import torch
from torch import Tensor, nn

import mlflow_fullmodel as fm
from benchmarks.bench_operations import started, stop
from benchmarks.common import table
from mlflow_fullmodel.decoding import BeamSearch
from mlflow_fullmodel.transforms import SentencePieceDecode, SentencePieceEncode

ROOT = Path(__file__).resolve().parents[1]
TOKENS = 12
NAME = "bench-streaming-translator"
BEAMS = {"beam 4 (saved)": {}, "beam 1 (greedy)": {"beam_size": 1}}
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
#: The production-sized translator: embedding, hidden size, decoder layers, tokenizer pieces.
SIZED = {"embedding_dim": 256, "hidden_dim": 512, "decoder_layers": 4, "vocabulary": 4000}


class SizedTranslator(nn.Module):
    """The example's translator (GRU encoder, GRU decoder with dot-product attention over the encoder
    outputs, the same ``encode`` / ``decode_step`` entry points) at a production size: a 2-layer
    encoder, a stack of ``decoder_layers`` GRU cells as the decoder (state ``(N, layers, hidden)``,
    batch first), and the EOS logit pushed down by 1e4 so that every answer runs to ``max_length``.
    Random weights: the time of a step does not depend on them."""

    def __init__(self, vocabulary: int, embedding_dim: int, hidden_dim: int, decoder_layers: int) -> None:
        super().__init__()
        self.source_embedding = nn.Embedding(vocabulary, embedding_dim, padding_idx=PAD_ID)
        self.encoder = nn.GRU(embedding_dim, hidden_dim, num_layers=2, batch_first=True)
        self.target_embedding = nn.Embedding(vocabulary, embedding_dim, padding_idx=PAD_ID)
        self.cells = nn.ModuleList([nn.GRUCell(embedding_dim if i == 0 else hidden_dim, hidden_dim)
                                    for i in range(decoder_layers)])
        self.layers = decoder_layers
        self.query = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.combine = nn.Linear(2 * hidden_dim, hidden_dim)
        self.output = nn.Linear(hidden_dim, vocabulary)
        no_eos = torch.zeros(vocabulary)
        no_eos[EOS_ID] = -1e4
        self.register_buffer("no_eos", no_eos)

    @torch.jit.export
    def encode(self, src: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        memory, _ = self.encoder(self.source_embedding(src))
        last = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, memory.size(2))
        first = memory.gather(1, last)  # (B, 1, hidden)
        return memory, first.expand(-1, self.layers, -1).contiguous()

    @torch.jit.export
    def decode_step(self, tokens: Tensor, state: Tensor, memory: Tensor, src_mask: Tensor) -> tuple[Tensor, Tensor]:
        x = self.target_embedding(tokens)
        states = []
        for i, cell in enumerate(self.cells):
            x = cell(x, state[:, i])
            states.append(x)
        scores = torch.bmm(memory, self.query(x).unsqueeze(2)).squeeze(2)
        weights = torch.softmax(scores.masked_fill(~src_mask, float("-inf")), dim=1)
        context = torch.bmm(weights.unsqueeze(1), memory).squeeze(1)
        hidden = torch.tanh(self.combine(torch.cat([x, context], dim=1)))
        return self.output(hidden) + self.no_eos, torch.stack(states, dim=1)

    def forward(self, src: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        return self.encode(src, lengths)


def generated_text(n: int, seed: int = 0) -> list[str]:
    """Sentences of 6 to 20 pseudo-words (2 to 4 syllables, Zipf-like frequencies): enough distinct
    words for a tokenizer of a few thousand pieces."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bdfghklmnprstvz" for v in "aeiou"]
    lexicon = ["".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(20_000)]
    weights = [1 / (rank + 10) for rank in range(len(lexicon))]
    return [" ".join(rng.choices(lexicon, weights, k=rng.randint(6, 20))) for _ in range(n)]


def save_sized(folder: str) -> tuple[str, list[str]]:
    """The production-sized translator: tokenizer trained on generated text, network scripted with
    random weights, beam search (beam 4 saved), saved with ``mlflow_fullmodel.save_model``; its
    folder and the benchmark's sources."""
    text = generated_text(30_000)
    prefix = os.path.join(folder, "spm")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_prefix=prefix, vocab_size=SIZED["vocabulary"], model_type="unigram",
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, hard_vocab_limit=False, minloglevel=2,
        num_threads=1)
    spm = prefix + ".model"
    vocabulary = sentencepiece.SentencePieceProcessor(model_file=spm).get_piece_size()
    torch.manual_seed(0)
    net = SizedTranslator(vocabulary, SIZED["embedding_dim"], SIZED["hidden_dim"], SIZED["decoder_layers"]).eval()
    model = fm.FullModel(
        preprocess=[SentencePieceEncode(fm.Artifact(spm), max_length=64)],
        module=fm.script(net),
        forward=BeamSearch(bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
                           beam_size=fm.Param(4, minimum=1, maximum=32), n_best=fm.Param(1, minimum=1, maximum=32),
                           max_length=fm.Param(64, minimum=1, maximum=256),
                           length_penalty=fm.Param(1.0, minimum=0.0)),
        postprocess=[SentencePieceDecode(fm.Artifact(spm))],
        collate=fm.PadCollate(pad_value=PAD_ID),
        input_columns=["source"],
    )
    sources = [" ".join(line.split()[:12]) for line in generated_text(8, seed=1)]
    path = os.path.join(folder, "sized-translator")
    fm.save_model(model, path, input_example=(sources[:2], {"max_length": TOKENS}))
    return path, sources


def train(folder: str) -> str:
    """The tiny translator, trained and registered in a store under ``folder``; its tracking URI."""
    uri = f"sqlite:///{folder}/mlflow.db"
    subprocess.run([sys.executable, str(ROOT / "example_projects" / "translator" / "train.py"), "--tiny",
                    "--max-number", "999999", "--target-vocab-size", "30",
                    "--tracking-uri", uri, "--registered-model-name", NAME], cwd=folder, check=True,
                   capture_output=True, timeout=900, env=dict(os.environ, PYTHONPATH=""))
    return uri


def long_sources(model: Any, count: int = 8) -> list[str]:
    """Sources whose translation is at least ``TOKENS`` target tokens long (with max_length 64)."""
    raw = model.get_raw_model()
    pieces = raw.postprocess[0]._processor
    found = []
    for number in range(777_777, 100_000, -9_973):
        text = f"{number:,}"
        answer = model.predict(pd.DataFrame({"source": [text]}), params={"max_length": 64})
        if len(pieces.EncodeAsIds(answer["translation"][0])) >= TOKENS:
            found.append(text)
        if len(found) == count:
            return found
    raise RuntimeError(f"found only {len(found)} sources with {TOKENS}-token translations")


def in_process(model: Any, sources: list[str], params: dict[str, Any], repeats: int, raw: bool = False,
               ) -> dict[str, float]:
    whole, first, last = [], [], []
    fullmodel = model.get_raw_model()
    for i in range(repeats):
        source = sources[i % len(sources)]
        started_at = time.perf_counter()
        if raw:
            fullmodel.predict_records([source], params)
        else:
            model.predict(pd.DataFrame({"source": [source]}), params=params)
        whole.append(time.perf_counter() - started_at)
        started_at = time.perf_counter()
        stream = fullmodel.predict_stream(source, params) if raw else \
            model.predict_stream({"source": source}, params=params)
        events = 1
        next(stream)
        first.append(time.perf_counter() - started_at)
        for _ in stream:
            events += 1
        last.append(time.perf_counter() - started_at)
        assert events == TOKENS, events
    return {"whole": statistics.median(whole), "first": statistics.median(first), "last": statistics.median(last)}


def over_http(url: str, sources: list[str], params: dict[str, Any], repeats: int) -> dict[str, float]:
    whole, first, last = [], [], []
    with requests.Session() as session:
        for i in range(repeats):
            body = json.dumps({"dataframe_records": [{"source": sources[i % len(sources)]}], "params": params})
            headers = {"Content-Type": "application/json"}
            started_at = time.perf_counter()
            answer = session.post(f"{url}/invocations", data=body, headers=headers, timeout=60)
            whole.append(time.perf_counter() - started_at)
            assert answer.status_code == 200, answer.text
            started_at = time.perf_counter()
            events = []
            with session.post(f"{url}/invocations", data=body, headers={**headers, "Accept": "text/event-stream"},
                              stream=True, timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith(b"data: "):
                        if not events:
                            first.append(time.perf_counter() - started_at)
                        events.append(json.loads(line[6:]))
            last.append(time.perf_counter() - started_at)
            assert len(events) == TOKENS and events[-1] == answer.json(), (len(events), events[-1], answer.text)
    return {"whole": statistics.median(whole), "first": statistics.median(first), "last": statistics.median(last)}


def row(model: str, where: str, beam: str, timing: dict[str, float]) -> list[object]:
    ms = {k: round(v * 1000, 2) for k, v in timing.items()}
    step = (timing["whole"] - timing["first"]) / (TOKENS - 1)  # the whole answer is the first event + 11 steps
    return [model, where, beam, ms["whole"], ms["first"], ms["last"], round(step * 1000, 2),
            round(timing["first"] / timing["whole"], 3), "yes" if timing["first"] <= 0.25 * timing["whole"] else "no"]


def measure(label: str, model_uri: str, sources: list[str], repeats: int, env: dict[str, str] | None = None,
            ) -> list[list[object]]:
    """The six rows of one model: FullModel and pyfunc in-process on one torch thread, then over HTTP."""
    rows = []
    model = mlflow.pyfunc.load_model(model_uri)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for raw, where in ((True, "FullModel, in-process"), (False, "pyfunc, in-process")):
            for beam, params in BEAMS.items():
                params = {**params, "max_length": TOKENS}
                in_process(model, sources, params, 5, raw)  # warm
                rows.append(row(label, where, beam, in_process(model, sources, params, repeats, raw)))
    finally:
        torch.set_num_threads(threads)
    server = started("fullmodel", model_uri, env=env)
    try:
        for beam, params in BEAMS.items():
            params = {**params, "max_length": TOKENS}
            over_http(server.url, sources, params, 5)
            rows.append(row(label, "mlflow-fullmodel serve", beam, over_http(server.url, sources, params, repeats)))
    finally:
        stop(server)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-streaming-") as folder:
        uri = train(folder)
        mlflow.set_tracking_uri(uri)
        tiny_sources = long_sources(mlflow.pyfunc.load_model(f"models:/{NAME}@champion"))
        sized_path, sized_sources = save_sized(folder)
        rows = measure("tiny", f"models:/{NAME}@champion", tiny_sources, args.repeats,
                       env={"MLFLOW_TRACKING_URI": uri})
        rows += measure("sized", sized_path, sized_sources, args.repeats)
    sized = ", ".join(f"{k} {v}" for k, v in SIZED.items())
    print(f"{TOKENS}-token answers, medians of {args.repeats} alternating requests. tiny: the translator "
          f"example (sources {tiny_sources[:3]}...); sized: {sized} (sources like {sized_sources[0]!r})")
    print(table(rows, ["model", "where", "search", "whole answer ms", "first event ms", "last event ms",
                       "step ms", "first / whole", "<= 0.25"]))


if __name__ == "__main__":
    main()
