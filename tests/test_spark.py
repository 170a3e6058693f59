"""Batch scoring on Apache Spark in local mode: mlflow.pyfunc.spark_udf over a registered fullmodel
model, 100,000 rows with bad ones among them, params reaching the UDF, rows out == rows in."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from sample_steps import corpus
from support import EXAMPLE_TEXTS

from mlflow_fullmodel.parity import ABS_TOL, REL_TOL

pytestmark = pytest.mark.slow

ROWS = 100_000
BAD = {"": "the text has no tokens", None: "value is missing (null)", "   ": "the text has no tokens"}
EXAMPLE = Path(__file__).resolve().parents[1] / "example_projects" / "batch_scoring_spark"


@pytest.fixture(scope="module")
def spark():
    pytest.importorskip("pyspark")
    if shutil.which("java") is None:
        pytest.skip("needs Java 17 for Spark in local mode (apt-get install openjdk-17-jre-headless; .ci/run does)")
    from pyspark.sql import SparkSession

    os.environ["PYSPARK_PYTHON"] = sys.executable  # the workers need this Python's MLflow and torch
    session = (SparkSession.builder.master("local[2]").appName("fullmodel-tests")
               .config("spark.ui.enabled", "false").config("spark.driver.host", "127.0.0.1")
               .config("spark.driver.bindAddress", "127.0.0.1").getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()
    stop_spark_jvm()


def stop_spark_jvm() -> None:
    """End the JVM that pyspark started for this process: it outlives SparkSession.stop() and would
    run until the interpreter exits (it exits when its standard input closes)."""
    from pyspark import SparkContext

    gateway = SparkContext._gateway
    if gateway is None:
        return
    gateway.shutdown()
    process = getattr(gateway, "proc", None)
    if process is not None:
        process.stdin.close()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    SparkContext._gateway = SparkContext._jvm = None


@pytest.fixture(scope="module")
def texts() -> list:
    rng = random.Random(7)
    good = [text for text, _ in corpus(2_000, seed=3)]
    rows = [rng.choice(good) for _ in range(ROWS)]
    for index in range(0, ROWS, 9_973):  # bad rows scattered over every Arrow batch
        rows[index] = list(BAD)[index % len(BAD)]
    rows[54_242] = ""  # row 4242 of the first Arrow batch of the second partition
    return rows


def test_spark_udf_scores_every_row_with_params_and_returns_bad_rows_errors(spark, registered_reviews, texts):
    from pyspark.sql import functions as F

    from mlflow_fullmodel.spark import nulls_for_failed_rows, result_type

    uri = "models:/reviews@champion"
    score = mlflow.pyfunc.spark_udf(spark, uri, result_type=result_type(uri, errors=True), params={"k": 2, "on_error": "return"},
                                    env_manager="local")
    frame = spark.createDataFrame(pd.DataFrame({"id": range(ROWS), "text": texts}))
    with_answers = frame.withColumn("answer", score("text")).withColumn("udf_error", F.col("answer.error"))
    scored = nulls_for_failed_rows(with_answers, "answer").orderBy("id").toPandas()

    assert len(scored) == ROWS and scored["id"].tolist() == list(range(ROWS))
    failed = scored[scored["error"].notna()]
    assert failed["id"].tolist() == [i for i, t in enumerate(texts) if t in BAD], failed["error"].head(3).tolist()
    for _, row in failed.iterrows():
        assert BAD[texts[row["id"]]] in row["error"]
        assert row[["label", "probability", "top_labels", "top_probabilities"]].isna().all()
        # A row number counted within the Arrow batch (4242 for table row 54242) names another row
        # of the table: the message carries none, as the UDF returns it and as spread out.
        assert not re.search(r"\bRow \d+", row["udf_error"] + row["error"]), (row["id"], row["udf_error"])
    assert failed.set_index("id").loc[54_242, "error"].startswith("preprocess[1] SentencePieceEncode: the text has no tokens")

    answered = scored[scored["error"].isna()]
    assert answered["top_labels"].map(len).eq(2).all()  # the k param reached the UDF
    sample = answered.sample(200, random_state=0)
    expected = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"text": sample["text"].tolist()}), params={"k": 2})
    assert sample["label"].tolist() == expected["label"].tolist()
    assert sample["probability"].tolist() == pytest.approx(expected["probability"].tolist(), rel=REL_TOL, abs=ABS_TOL)


def test_nulls_for_failed_rows_takes_the_batch_row_number_out_of_a_scoring_servers_errors(spark):
    from mlflow_fullmodel.spark import nulls_for_failed_rows

    # What a scoring server started by spark_udf (env_manager="virtualenv", "uv", ...) answers: it
    # runs outside the Spark task and numbers the rows of the batch it was sent.
    answers = spark.createDataFrame(
        [(7, ("pos", "nan")), (4242, (None, "Row 146, column 'text': value is missing (null).")),
         (4243, (None, "Row 147: preprocess[1] SentencePieceEncode: the text has no tokens"))],
        "id int, answer struct<label: string, error: string>",
    )
    spread = nulls_for_failed_rows(answers, "answer").orderBy("id").toPandas()
    assert spread["error"].isna().tolist() == [True, False, False] and spread["label"].isna().tolist() == [False, True, True]
    assert spread["error"].tolist()[1:] == ["column 'text': value is missing (null).",
                                            "preprocess[1] SentencePieceEncode: the text has no tokens"]


def test_the_batch_scoring_example_scores_a_parquet_table_next_to_it(spark, tracking, registered_reviews, tmp_path):
    table = tmp_path / "reviews.parquet"
    pd.DataFrame({"review_id": range(6), "text": [*EXAMPLE_TEXTS, "", "Superb", None]}).to_parquet(table)
    result = subprocess.run(
        [sys.executable, str(EXAMPLE / "score.py"), "--model-uri", "models:/reviews@champion", "--input", str(table),
         "--output", str(tmp_path / "scored.parquet"), "--tracking-uri", tracking, "--params", '{"k": 2}'],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=""),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    scored = pd.read_parquet(tmp_path / "scored.parquet").sort_values("review_id")
    assert scored["review_id"].tolist() == list(range(6))
    assert scored["error"].notna().tolist() == [False, False, False, True, False, True]
    assert "scored 6 rows (2 with an error)" in result.stdout
