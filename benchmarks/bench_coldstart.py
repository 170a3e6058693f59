"""Benchmark 3: cold start. A fresh Python process loads the model with `mlflow.pyfunc.load_model`
and makes its first prediction; the time from before the load to the first answer, median of 3."""

from __future__ import annotations

import statistics
import subprocess
import sys

from benchmarks.common import saved_models, table

HEADER = ["model", "hand-written", "fullmodel", "fullmodel/hand"]
CHILD = """
import sys, time
import mlflow, pandas as pd
started = time.perf_counter()
model = mlflow.pyfunc.load_model(sys.argv[1])
model.predict(pd.DataFrame({"text": ["a first request"]}))
print(time.perf_counter() - started)
"""


def cold_start(path: str, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        result = subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True, text=True, check=True)
        times.append(float(result.stdout.strip().splitlines()[-1]))
    return statistics.median(times)


def main() -> list[list[object]]:
    rows = []
    for size in ("tiny", "medium"):
        paths = saved_models(size)
        hand, ours = cold_start(paths["handwritten"]), cold_start(paths["fullmodel"])
        rows.append([size, f"{hand:.2f}", f"{ours:.2f}", f"{ours / hand:.2f}"])
    print("\nCold start: load + first prediction in a fresh process (s, median of 3)")
    print(table(rows, HEADER))
    return rows


if __name__ == "__main__":
    main()
