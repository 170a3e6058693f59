"""Shared pieces of the benchmarks: building and saving both models, timing, reporting."""

from __future__ import annotations

import functools
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import pandas as pd

import mlflow_fullmodel as fm
from benchmarks.models import Subject, build, texts

HERE = Path(__file__).resolve().parent
WORKDIR = Path(os.environ.get("BENCH_DIR", "/tmp/mlflow-fullmodel-bench"))


@functools.cache
def subject_of(name: str) -> Subject:
    return build(name, str(WORKDIR / name))


@functools.cache
def saved_models(size: str) -> dict[str, str]:
    """Both models, and the serving ceiling, saved as MLflow models afresh in each run (a
    fullmodel model carries the runtime it was saved with, so an old copy would measure old code)."""
    subject = subject_of(size)
    paths = {name: WORKDIR / subject.name / name for name in ("fullmodel", "handwritten", "ceiling")}
    for path in paths.values():
        shutil.rmtree(path, ignore_errors=True)
    example = texts(4, seed=9)
    fm.save_model(subject.fullmodel, str(paths["fullmodel"]), input_example=example)
    mlflow.pyfunc.save_model(
        str(paths["handwritten"]), python_model=str(HERE / "handwritten.py"),
        artifacts={"spm": subject.spm, "net": str(WORKDIR / subject.name / f"{subject.name}.pt")},
        input_example=pd.DataFrame({"text": example}),
    )
    # The same input signature as the hand-written model, so the server parses requests alike.
    mlflow.pyfunc.save_model(str(paths["ceiling"]), python_model=str(HERE / "ceiling.py"),
                             input_example=pd.DataFrame({"text": example}))
    return {k: str(v) for k, v in paths.items()}


def best_time(fn: Callable[[], object], repeats: int = 3) -> float:
    """The fastest of ``repeats`` runs, in seconds: the least disturbed by other load."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def table(rows: list[list[object]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    lines = [" | ".join(str(x).ljust(w) for x, w in zip(header, widths))]
    lines.append("-|-".join("-" * w for w in widths))
    lines += [" | ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def group_pids(pgid: int) -> list[str]:
    """The processes of the process group ``pgid`` (a server and its workers), from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # field 5 of stat, after pid and comm
            pids.append(entry)
    return pids
