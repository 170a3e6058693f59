"""Run every benchmark and record the results: `python -m benchmarks [--write]`.

With --write, the tables and the machine they ran on are written to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path

import mlflow
import torch

from benchmarks import bench_batch, bench_coldstart, bench_operations, bench_serving, bench_spark
from benchmarks.common import table


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"mlflow {mlflow.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="write benchmarks/RESULTS.md")
    parser.add_argument("--quick", action="store_true", help="the operations benchmark at its small size")
    args = parser.parse_args()
    print(f"Machine: {machine()}")
    batch = bench_batch.main()
    serving = bench_serving.main(*bench_batch.forward_rates(batch))
    workers = bench_serving.workers_main()
    cold = bench_coldstart.main()
    spark = bench_spark.main()
    operations = bench_operations.main(quick=args.quick)
    if args.write:
        text = [
            "# Benchmark results", "",
            f"Run on {datetime.date.today()}: {machine()}. Ratios are measured in the same run; "
            "absolute numbers move with the machine's other load.", "",
            "## Batch predict (rows/s, 512 mixed-length rows, best of 3)", "",
            table(batch, bench_batch.HEADER), "",
            "## Serving (`mlflow models serve`, one worker, single-row requests, best of 2 alternating runs)", "",
            table(serving, bench_serving.HEADER), "",
            "## Serving with several workers (`mlflow models serve -w N`, 32 clients, best of 3)", "",
            table(workers, bench_serving.WORKERS_HEADER), "",
            "## Cold start (s, load + first prediction, median of 3)", "",
            table(cold, bench_coldstart.HEADER), "",
            f"## Spark (`spark_udf` in local mode against in-process predict, {bench_spark.ROWS} rows, best of 3)", "",
            table(spark, bench_spark.HEADER), "",
            "## Operating a served model (`mlflow-fullmodel serve`)", "",
            "The metrics' pieces in-process (us per request, best of 5):", "",
            table(operations["pieces"], bench_operations.PIECES_HEADER), "",
            "One request at a time through each layer of the app, in-process (median of blocks of 200):", "",
            table(operations["layers"], bench_operations.LAYERS_HEADER), "",
            "With and without metrics (`--no-metrics`), and `mlflow models serve`, single-row requests, the "
            "servers taking turns; ratios per round, median [range]:", "",
            table(operations["cost"], bench_operations.COST_HEADER), "",
            "The first request after ready (a fresh server each run):", "",
            table(operations["first"], bench_operations.FIRST_HEADER), "",
            "An alias rollout under load (8 clients, `--follow-alias --poll-s 1`; 1 -> 2, then 2 -> 3, tampered):", "",
            table(operations["swap"], bench_operations.SWAP_HEADER), "",
        ]
        path = Path(__file__).resolve().parent / "RESULTS.md"
        previous = path.read_text() if path.exists() else ""
        notes = previous.split("<!-- notes -->", 1)[1] if "<!-- notes -->" in previous else "\n"
        path.write_text("\n".join(text) + "<!-- notes -->" + notes)
        print(f"\nWrote {path}")


if __name__ == "__main__":
    main()
