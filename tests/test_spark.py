"""Batch scoring on Apache Spark in local mode: mlflow.pyfunc.spark_udf over a registered fullmodel
model, 100,000 rows with bad ones among them, params reaching the UDF, rows out == rows in."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from support import EXAMPLE_TEXTS
from sample_steps import corpus

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


@pytest.fixture(scope="module")
def texts() -> list:
    rng = random.Random(7)
    good = [text for text, _ in corpus(2_000, seed=3)]
    rows = [rng.choice(good) for _ in range(ROWS)]
    for index in range(0, ROWS, 9_973):  # bad rows scattered over every Arrow batch
        rows[index] = list(BAD)[index % len(BAD)]
    return rows


def test_spark_udf_scores_every_row_with_params_and_returns_bad_rows_errors(spark, registered_reviews, texts):
    from mlflow_fullmodel.spark import nulls_for_failed_rows, result_type

    uri = "models:/reviews@champion"
    score = mlflow.pyfunc.spark_udf(spark, uri, result_type=result_type(uri, errors=True), params={"k": 2, "on_error": "return"},
                                    env_manager="local")
    frame = spark.createDataFrame(pd.DataFrame({"id": range(ROWS), "text": texts}))
    scored = nulls_for_failed_rows(frame.withColumn("answer", score("text")), "answer").orderBy("id").toPandas()

    assert len(scored) == ROWS and scored["id"].tolist() == list(range(ROWS))
    failed = scored[scored["error"].notna()]
    assert failed["id"].tolist() == [i for i, t in enumerate(texts) if t in BAD], failed["error"].head(3).tolist()
    for _, row in failed.iterrows():
        assert BAD[texts[row["id"]]] in row["error"]
        assert row[["label", "probability", "top_labels", "top_probabilities"]].isna().all()

    answered = scored[scored["error"].isna()]
    assert answered["top_labels"].map(len).eq(2).all()  # the k param reached the UDF
    sample = answered.sample(200, random_state=0)
    expected = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"text": sample["text"].tolist()}), params={"k": 2})
    assert sample["label"].tolist() == expected["label"].tolist()
    assert sample["probability"].tolist() == pytest.approx(expected["probability"].tolist(), rel=REL_TOL, abs=ABS_TOL)


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
