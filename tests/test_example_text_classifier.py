"""The text classifier example project, trained at tiny scale: log -> register -> load -> predict,
then served over HTTP with raw text."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests
from servers import serve, stop
from support import train_example

import mlflow_fullmodel as fm

pytestmark = pytest.mark.slow

TEXTS = ["What a wonderful, brilliant film!", "Dull, boring and far too long.", "It was a film."]


@pytest.fixture(scope="module")
def trained(text_example: dict) -> dict:
    return text_example


def test_training_logs_metrics_and_registers_the_champion(trained):
    assert trained["run"].data.metrics["val_accuracy"] > 0.5  # three classes: chance is 1/3
    version = mlflow.MlflowClient().get_model_version_by_alias("example-text", "champion")
    assert version.run_id == trained["run"].info.run_id


def test_the_champion_carries_its_tokenizer_and_the_projects_own_code(trained, tmp_path):
    model_dir = mlflow.artifacts.download_artifacts("models:/example-text@champion", dst_path=str(tmp_path))
    code = {p.name for p in (Path(model_dir) / "fullmodel" / "code").rglob("*.py")}
    assert {"processing.py", "text_utils.py"} <= code
    assert list((Path(model_dir) / "fullmodel" / "artifacts").rglob("*.model"))
    assert "sentencepiece" in (Path(model_dir) / "requirements.txt").read_text()


def test_the_champion_predicts_labels_from_raw_text_with_params(trained):
    loaded = mlflow.pyfunc.load_model("models:/example-text@champion")
    result = loaded.predict(pd.DataFrame({"text": TEXTS}), params={"k": 3})
    assert len(result) == 3 and all(len(labels) == 3 for labels in result["top_labels"])
    assert all(abs(sum(p) - 1) < 1e-6 for p in result["top_probabilities"])
    native = fm.load_model("models:/example-text@champion").predict(TEXTS, params={"k": 3})
    pd.testing.assert_frame_equal(result, native)


def test_the_served_champion_answers_raw_text_over_http(trained, tracking):
    process, url = serve("models:/example-text@champion", tracking)
    try:
        response = requests.post(f"{url}/invocations", timeout=60, json={
            "dataframe_records": [{"text": t} for t in TEXTS], "params": {"k": 2}})
        assert response.status_code == 200, response.text
        served = pd.DataFrame(response.json()["predictions"])
        expected = fm.load_model("models:/example-text@champion").predict(TEXTS, params={"k": 2})
        assert served["label"].tolist() == expected["label"].tolist()
        bad = requests.post(f"{url}/invocations", timeout=60, json={"dataframe_records": [{"text": "x"}], "params": {"k": 0}})
        assert bad.status_code == 400 and "'k'" in json.loads(bad.text)["message"]
    finally:
        stop(process)


def test_the_same_training_saved_as_a_torch_export_program_gives_the_same_answers(trained, tracking, tmp_path):
    train_example("text_classifier", tracking, tmp_path, "--module-format", "export", "--registered-model-name", "example-text-export")
    exported = fm.load_model("models:/example-text-export@champion")
    assert list(exported.module.formats.values()) == ["torch.export"]
    scripted = fm.load_model("models:/example-text@champion")
    texts = TEXTS + ["a much longer review " * 30, "ok"]  # lengths the export never saw
    pd.testing.assert_frame_equal(exported.predict(texts, params={"k": 3}), scripted.predict(texts, params={"k": 3}),
                                  rtol=1e-5)
