"""Score a Parquet table of texts with a registered fullmodel model on Apache Spark, and write the
answers next to it.

    python score.py --model-uri models:/text-classifier@champion --input reviews.parquet \
        --output reviews.scored.parquet --params '{"k": 2}'

Every input row comes out, in a table with the input's columns, the model's answer columns and an
``error`` column: a row the model cannot answer (an empty text, a null) gets its message there and
nulls in the answer columns, and the job goes on. Spark runs in local mode on this machine's cores
unless ``--master`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import mlflow

from mlflow_fullmodel.spark import nulls_for_failed_rows, result_type

_logger = logging.getLogger("batch_scoring_spark")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", required=True, help="e.g. models:/text-classifier@champion")
    parser.add_argument("--input", required=True, help="a Parquet file or folder with the model's input column(s)")
    parser.add_argument("--output", required=True, help="where to write the scored table (Parquet)")
    parser.add_argument("--params", default="{}", help='runtime parameters as JSON, e.g. \'{"k": 2}\'')
    parser.add_argument("--tracking-uri", default=None, help="the tracking server (default: MLFLOW_TRACKING_URI)")
    parser.add_argument("--master", default="local[*]", help="the Spark master (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.tracking_uri:
        mlflow.set_tracking_uri(args.tracking_uri)
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri  # for the Spark workers too
    params = {**json.loads(args.params), "on_error": "return"}
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # workers need this Python's MLflow and torch

    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master(args.master).appName("fullmodel batch scoring")
             .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false").getOrCreate())
    try:
        score = mlflow.pyfunc.spark_udf(spark, args.model_uri, result_type=result_type(args.model_uri, errors=True),
                                        params=params, env_manager="local")
        table = spark.read.parquet(args.input)
        inputs = [name for name in mlflow.models.Model.load(args.model_uri).signature.inputs.input_names()]
        scored = nulls_for_failed_rows(table.withColumn("answer", score(*inputs)), "answer")
        scored.write.mode("overwrite").parquet(args.output)
        written = spark.read.parquet(args.output)
        errors = written.filter("error IS NOT NULL").count()
        summary = {"rows": written.count(), "errors": errors, "output": args.output}
    finally:
        spark.stop()
    print(f"scored {summary['rows']} rows ({summary['errors']} with an error) into {summary['output']}")
    return summary


if __name__ == "__main__":
    main()
