"""Benchmark 4: batch scoring on Spark. ``mlflow.pyfunc.spark_udf`` in local mode on this machine's
cores against the same model's in-process pyfunc ``predict``, on the same rows, in one run.

Spark splits the rows into one partition per core and runs a Python worker per partition, each
with the model loaded once; each worker gets Arrow batches of 10,000 rows. Best of 3 after a
warm-up run that loads the model in the workers.
"""

from __future__ import annotations

import os
import sys

import mlflow
import pandas as pd

from benchmarks.common import best_time, saved_models, table
from benchmarks.models import texts

ROWS = 40_000
HEADER = ["model", "predict rows/s", "spark_udf rows/s", "spark/predict"]


def main() -> list[list[object]]:
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    from mlflow_fullmodel.spark import result_type

    cores = os.cpu_count() or 1
    spark = (SparkSession.builder.master(f"local[{cores}]").appName("fullmodel-bench")
             .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
             .config("spark.driver.host", "127.0.0.1").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    rows = []
    try:
        for size in ("tiny", "medium"):
            path = saved_models(size)["fullmodel"]
            data = pd.DataFrame({"text": texts(ROWS, seed=21)})
            # One call scores the whole table here: lift the per-request row limit of a served model.
            loaded = mlflow.pyfunc.load_model(path, model_config={"max_rows": ROWS, "max_samples": ROWS})
            in_process = best_time(lambda: loaded.predict(data))
            score = mlflow.pyfunc.spark_udf(spark, path, result_type=result_type(path), env_manager="local")
            frame = spark.createDataFrame(data).repartition(cores).cache()
            frame.count()
            scored = frame.withColumn("answer", score("text"))
            run = lambda: scored.write.format("noop").mode("overwrite").save()  # noqa: E731
            run()  # warm-up: the workers load the model
            on_spark = best_time(run)
            rows.append([size, f"{ROWS / in_process:.0f}", f"{ROWS / on_spark:.0f}", f"{in_process / on_spark:.2f}"])
            frame.unpersist()
    finally:
        spark.stop()
    print(f"\nSpark: {ROWS} mixed-length texts, spark_udf in local[{cores}] against in-process predict (best of 3)")
    print(table(rows, HEADER))
    return rows


if __name__ == "__main__":
    main()
