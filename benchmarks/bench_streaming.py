"""Benchmark 8: time to the first streamed event against time to the whole answer, for 12-token
outputs of the translator example.

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

Beam search with the saved beam (4) and with a beam of 1 (greedy). Each measurement alternates
streamed and whole requests, ``--repeats`` times; the table has medians and the ratio first event /
whole answer of the same run (goal: at most 0.25).

    python -m benchmarks.bench_streaming [--repeats 40]
"""

from __future__ import annotations

import argparse
import json
import os
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
import torch

from benchmarks.bench_operations import started, stop
from benchmarks.common import table

ROOT = Path(__file__).resolve().parents[1]
TOKENS = 12
NAME = "bench-streaming-translator"
BEAMS = {"beam 4 (saved)": {}, "beam 1 (greedy)": {"beam_size": 1}}


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


def row(where: str, beam: str, timing: dict[str, float]) -> list[object]:
    ms = {k: round(v * 1000, 2) for k, v in timing.items()}
    return [where, beam, ms["whole"], ms["first"], ms["last"], round(timing["first"] / timing["whole"], 3),
            "yes" if timing["first"] <= 0.25 * timing["whole"] else "no"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-streaming-") as folder:
        uri = train(folder)
        mlflow.set_tracking_uri(uri)
        model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
        sources = long_sources(model)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        for raw, where in ((True, "FullModel, in-process"), (False, "pyfunc, in-process")):
            for beam, params in BEAMS.items():
                params = {**params, "max_length": TOKENS}
                in_process(model, sources, params, 5, raw)  # warm
                rows.append(row(where, beam, in_process(model, sources, params, args.repeats, raw)))
        torch.set_num_threads(threads)
        server = started("fullmodel", f"models:/{NAME}@champion", env={"MLFLOW_TRACKING_URI": uri})
        try:
            for beam, params in BEAMS.items():
                params = {**params, "max_length": TOKENS}
                over_http(server.url, sources, params, 5)
                rows.append(row("mlflow-fullmodel serve", beam, over_http(server.url, sources, params, args.repeats)))
        finally:
            stop(server)
    print(f"{TOKENS}-token answers of the tiny translator, medians of {args.repeats} alternating requests "
          f"(sources {sources[:3]}...)")
    print(table(rows, ["where", "search", "whole answer ms", "first event ms", "last event ms",
                       "first / whole", "<= 0.25"]))


if __name__ == "__main__":
    main()
