"""Benchmark 8: time to the first streamed event against time to the whole answer, for 12-token
outputs of the translator example, at its tiny size and at a production size with three encoders.

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

The same is measured on production-sized translators that share one decoder (the example's: 4
stacked GRU cells of 512 after target embeddings of 256, dot-product attention over the encoder
outputs) and one 4,000-piece sentencepiece tokenizer trained here on generated text, with random
weights and the EOS logit pushed down so that every answer runs to ``max_length``, and differ in
their encoder (``ENCODERS``):

- ``sized GRU`` (``SizedTranslator``): the example's recurrent encoder, 2 GRU layers of 512 over
  source embeddings of 256, one source token after the other;
- ``sized Transformer 512x6`` (``TransformerTranslator``): a Transformer encoder as in production
  translators (Marian, NLLB, T5), all source tokens at once: learned positions, a key padding mask
  from the lengths, Marian-base's size (d_model 512, 6 layers, 8 heads, feed-forward 2,048);
- ``sized Transformer 256x4``: the same at d_model 256, 4 layers, 4 heads, feed-forward 1,024, an
  encoder scaled like this decoder: in multiply-adds, this decoder's step is about a sixth of
  Marian-base's (9 M against 52 M with a 58,000-piece vocabulary), and so is this encoder's cost
  per source token (3.1 M against 19 M).

Each is saved with ``mlflow_fullmodel.save_model`` and served by `mlflow-fullmodel serve` the same
way; the benchmark also times each network's ``encode`` and one ``decode_step`` alone. The table's
"step ms" is (whole - first) / 11, the cost of one decoding step in the package.

Beam search with the saved beam (4) and with a beam of 1 (greedy). Each measurement alternates
streamed and whole requests, ``--repeats`` times; the table has medians and the ratio first event /
whole answer of the same run (goal: at most 0.25). The whole answer is a fixed cost F per request
(the encoder included) plus 12 decoding steps s, the first event F plus one step, so the ratio
(F + s) / (F + 12 s) is at most 0.25 only where F is at most about 2.7 s.

Measured (benchmarks/RESULTS.md: two runs on an idle 2-core machine), first event / whole answer:

    model                      FullModel             pyfunc                serve (HTTP)
                               beam 4     greedy     beam 4     greedy     beam 4     greedy
    tiny                       0.34-0.35  0.38-0.39  0.54-0.55  0.55       0.65       0.68-0.69
    sized GRU                  0.26-0.29  0.35-0.36  0.27-0.29  0.36-0.38  0.29-0.32  0.38-0.42
    sized Transformer 512x6    0.32-0.40  0.43-0.49  0.34-0.41  0.43-0.48  0.36-0.41  0.46-0.51
    sized Transformer 256x4    0.15-0.19  0.20-0.22  0.17-0.21  0.23-0.25  0.20-0.24  0.27-0.30

The goal is met by the Transformer encoder scaled like the decoder (256x4: its encoder costs 2.6-3
ms, under 2 greedy steps) with its saved beam search everywhere, and greedy from the FullModel
(through pyfunc at the margin: met in one run, 0.253 in the other); not greedy over HTTP, where
MLflow's parse and schema check and the request itself (2.4-2.9 ms over the FullModel's) leave
the first event 1-2 ms too late. On one CPU thread a Marian-base-sized Transformer encoder (512x6,
13-17 ms) costs more than the 2-layer GRU (8 ms): it does 19 M multiply-adds per source token
against 2.8 M, and its parallelism pays on several cores or a GPU.

    python -m benchmarks.bench_streaming [--repeats 40]
"""

from __future__ import annotations

import argparse
import json
import math
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
#: The production-sized translators' decoder and tokenizer: embedding, hidden size, decoder layers, pieces.
SIZED = {"embedding_dim": 256, "hidden_dim": 512, "decoder_layers": 4, "vocabulary": 4000}
#: Their encoders, by the label of their rows: the example's recurrent one (a 2-layer GRU of 512), and
#: Transformer encoders (d_model, layers, heads, feed-forward size): Marian-base's (512, 6 layers), and
#: one scaled like the decoder (in multiply-adds, this decoder's step is about a sixth of Marian-base's,
#: and so is this encoder's cost per source token).
ENCODERS: dict[str, dict[str, int] | None] = {
    "sized GRU": None,
    "sized Transformer 512x6": {"d_model": 512, "layers": 6, "heads": 8, "feedforward": 2048},
    "sized Transformer 256x4": {"d_model": 256, "layers": 4, "heads": 4, "feedforward": 1024},
}
#: The most source ids SentencePieceEncode keeps, and the Transformer encoders' learned positions.
SOURCE_LENGTH = 64


class AttentionDecoder(nn.Module):
    """The example's decoder at a production size: a stack of ``decoder_layers`` GRU cells (state
    ``(N, layers, hidden)``, batch first), dot-product attention over the encoder outputs (``memory``,
    ``(N, T, memory_dim)``), and the EOS logit pushed down by 1e4 so that every answer runs to
    ``max_length``. The translators below add the encoder (``encode``). Random weights: the time of a
    step does not depend on them."""

    def __init__(self, vocabulary: int, embedding_dim: int, hidden_dim: int, decoder_layers: int,
                 memory_dim: int) -> None:
        super().__init__()
        self.target_embedding = nn.Embedding(vocabulary, embedding_dim, padding_idx=PAD_ID)
        self.cells = nn.ModuleList([nn.GRUCell(embedding_dim if i == 0 else hidden_dim, hidden_dim)
                                    for i in range(decoder_layers)])
        self.layers = decoder_layers
        self.query = nn.Linear(hidden_dim, memory_dim, bias=False)
        self.combine = nn.Linear(hidden_dim + memory_dim, hidden_dim)
        self.output = nn.Linear(hidden_dim, vocabulary)
        no_eos = torch.zeros(vocabulary)
        no_eos[EOS_ID] = -1e4
        self.register_buffer("no_eos", no_eos)

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


class SizedTranslator(AttentionDecoder):
    """The example's translator (GRU encoder, GRU decoder with dot-product attention over the encoder
    outputs, the same ``encode`` / ``decode_step`` entry points) at a production size: a 2-layer
    GRU encoder of ``hidden_dim``, whose output at each source's last token starts every decoder
    cell."""

    def __init__(self, vocabulary: int, embedding_dim: int, hidden_dim: int, decoder_layers: int) -> None:
        super().__init__(vocabulary, embedding_dim, hidden_dim, decoder_layers, memory_dim=hidden_dim)
        self.source_embedding = nn.Embedding(vocabulary, embedding_dim, padding_idx=PAD_ID)
        self.encoder = nn.GRU(embedding_dim, hidden_dim, num_layers=2, batch_first=True)

    @torch.jit.export
    def encode(self, src: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        memory, _ = self.encoder(self.source_embedding(src))
        last = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, memory.size(2))
        first = memory.gather(1, last)  # (B, 1, hidden)
        return memory, first.expand(-1, self.layers, -1).contiguous()

    def forward(self, src: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        return self.encode(src, lengths)


class TransformerTranslator(AttentionDecoder):
    """The same decoder after a Transformer encoder, as in production translators (Marian, NLLB,
    T5): scaled source embeddings plus learned positions, ``layers`` post-norm
    ``nn.TransformerEncoderLayer`` (batch first, no dropout) with a key padding mask from
    ``lengths``, all source tokens at once. The decoder starts from the mean of the encoder outputs
    over the real tokens, through a linear layer and tanh, in every cell."""

    def __init__(self, vocabulary: int, embedding_dim: int, hidden_dim: int, decoder_layers: int, d_model: int,
                 layers: int, heads: int, feedforward: int) -> None:
        super().__init__(vocabulary, embedding_dim, hidden_dim, decoder_layers, memory_dim=d_model)
        self.source_embedding = nn.Embedding(vocabulary, d_model, padding_idx=PAD_ID)
        self.positions = nn.Embedding(SOURCE_LENGTH, d_model)
        self.scale = math.sqrt(d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, feedforward, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.bridge = nn.Linear(d_model, hidden_dim)

    @torch.jit.export
    def encode(self, src: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        positions = torch.arange(src.size(1), device=src.device)
        padding = positions.unsqueeze(0) >= lengths.unsqueeze(1)  # (B, T), True at the pad positions
        x = self.source_embedding(src) * self.scale + self.positions(positions).unsqueeze(0)
        memory = self.encoder(x, src_key_padding_mask=padding)
        real = (~padding).unsqueeze(2).to(memory.dtype)
        mean = (memory * real).sum(dim=1) / real.sum(dim=1).clamp(min=1.0)
        first = torch.tanh(self.bridge(mean)).unsqueeze(1)  # (B, 1, hidden)
        return memory, first.expand(-1, self.layers, -1).contiguous()

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


def save_sized(folder: str) -> tuple[dict[str, str], list[str], list[str]]:
    """The production-sized translators: one tokenizer trained on generated text, each network (one
    per entry of ``ENCODERS``) scripted with random weights, beam search (beam 4 saved), saved with
    ``mlflow_fullmodel.save_model``; their folders by label, the benchmark's sources, and a line per
    translator with its encoder and one decoding step timed alone."""
    text = generated_text(30_000)
    prefix = os.path.join(folder, "spm")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_prefix=prefix, vocab_size=SIZED["vocabulary"], model_type="unigram",
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, hard_vocab_limit=False, minloglevel=2,
        num_threads=1)
    spm = prefix + ".model"
    processor = sentencepiece.SentencePieceProcessor(model_file=spm)
    vocabulary = processor.get_piece_size()
    sources = [" ".join(line.split()[:12]) for line in generated_text(8, seed=1)]
    ids = [processor.EncodeAsIds(source)[:SOURCE_LENGTH] for source in sources]
    decoder = {k: v for k, v in SIZED.items() if k != "vocabulary"}
    paths, alone = {}, []
    for label, encoder in ENCODERS.items():
        torch.manual_seed(0)
        net = (SizedTranslator(vocabulary, **decoder) if encoder is None else
               TransformerTranslator(vocabulary, **decoder, **encoder)).eval()
        scripted = fm.script(net)
        alone.append(f"{label}: {timed_alone(scripted, ids)}")
        model = fm.FullModel(
            preprocess=[SentencePieceEncode(fm.Artifact(spm), max_length=SOURCE_LENGTH)],
            module=scripted,
            forward=BeamSearch(bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
                               beam_size=fm.Param(4, minimum=1, maximum=32),
                               n_best=fm.Param(1, minimum=1, maximum=32),
                               max_length=fm.Param(64, minimum=1, maximum=256),
                               length_penalty=fm.Param(1.0, minimum=0.0)),
            postprocess=[SentencePieceDecode(fm.Artifact(spm))],
            collate=fm.PadCollate(pad_value=PAD_ID),
            input_columns=["source"],
        )
        paths[label] = os.path.join(folder, label.replace(" ", "-"))
        fm.save_model(model, paths[label], input_example=(sources[:2], {"max_length": TOKENS}))
    return paths, sources, alone


def timed_alone(net: Any, ids: list[list[int]], repeats: int = 40) -> str:
    """The scripted network's ``encode`` of one source, and one ``decode_step`` for 1 and for 4
    hypotheses, alone on one torch thread (medians over the sources): what the first event and each
    further event cost before the package adds anything."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    encode, step = [], {1: [], 4: []}
    try:
        with torch.inference_mode():
            for i in range(repeats + 5):
                src = torch.tensor([ids[i % len(ids)]])
                lengths = torch.tensor([src.shape[1]])
                started_at = time.perf_counter()
                memory, state = net.encode(src, lengths)
                if i >= 5:
                    encode.append(time.perf_counter() - started_at)
                for k, times in step.items():
                    rows = torch.zeros(k, dtype=torch.long)
                    args = (torch.full((k,), BOS_ID), state[rows], memory[rows],
                            torch.ones(k, src.shape[1], dtype=torch.bool))
                    started_at = time.perf_counter()
                    net.decode_step(*args)
                    if i >= 5:
                        times.append(time.perf_counter() - started_at)
    finally:
        torch.set_num_threads(threads)
    ms = {k: statistics.median(v) * 1000 for k, v in step.items()}
    pieces = statistics.median(len(x) for x in ids)
    return (f"encoder {statistics.median(encode) * 1000:.2f} ms ({pieces:g}-piece sources), one decoding step "
            f"{ms[1]:.2f} ms for 1 hypothesis, {ms[4]:.2f} ms for 4")


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
        sized_paths, sized_sources, alone = save_sized(folder)
        rows = measure("tiny", f"models:/{NAME}@champion", tiny_sources, args.repeats,
                       env={"MLFLOW_TRACKING_URI": uri})
        for label, path in sized_paths.items():
            rows += measure(label, path, sized_sources, args.repeats)
    sized = ", ".join(f"{k} {v}" for k, v in SIZED.items())
    print(f"{TOKENS}-token answers, medians of {args.repeats} alternating requests. tiny: the translator "
          f"example (sources {tiny_sources[:3]}...); sized: {sized} (sources like {sized_sources[0]!r}), "
          f"encoders {ENCODERS}")
    print("Timed alone, one torch thread:")
    for line in alone:
        print(f"  {line}")
    print(table(rows, ["model", "where", "search", "whole answer ms", "first event ms", "last event ms",
                       "step ms", "first / whole", "<= 0.25"]))


if __name__ == "__main__":
    main()
