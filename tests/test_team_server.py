"""How a team runs it: a shared `mlflow server` on PostgreSQL with proxied artifacts. Train an
example project against it, verify and promote through it, load by alias from another process,
serve it, and catch a version rewritten in the server's artifact store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
import requests
from click.testing import CliRunner
from servers import serve, stop
from support import tracking_uri
from test_integrity import edit_spec

from mlflow_fullmodel.cli import main

pytestmark = pytest.mark.slow

TRAIN = Path(__file__).resolve().parents[1] / "example_projects" / "text_classifier" / "train.py"
NAME = "team-reviews"
TEXTS = ["What a wonderful, brilliant film!", "Dull, boring and far too long."]


def logged_model_id(version) -> str:
    # Over REST a model version carries its logged model only in its source, models:/<model_id>.
    return version.model_id or version.source.removeprefix("models:/")


@pytest.fixture(scope="module")
def team(tracking_server, tmp_path_factory):
    """The example trained by a data scientist against the team's server, aliased challenger."""
    workdir = tmp_path_factory.mktemp("team")
    result = subprocess.run(
        [sys.executable, str(TRAIN), "--tiny", "--registered-model-name", NAME, "--alias", "challenger",
         "--tracking-uri", tracking_server.url],
        cwd=workdir, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH="", MLFLOW_REGISTRY_URI=tracking_server.url),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    with tracking_uri(tracking_server.url, experiment="text-classifier"):
        yield tracking_server


def test_artifacts_go_through_the_server_as_mlflow_artifacts_uris(team):
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(NAME, "challenger")
    assert client.get_run(version.run_id).info.artifact_uri.startswith("mlflow-artifacts:")
    assert client.get_logged_model(logged_model_id(version)).artifact_location.startswith("mlflow-artifacts:")
    assert client.get_model_version(NAME, version.version).tags["fullmodel.digest"].startswith("sha256:")


def test_verify_and_promote_through_the_server_then_load_by_alias_in_another_process(team, tmp_path):
    version = str(mlflow.MlflowClient().get_model_version_by_alias(NAME, "challenger").version)
    verified = CliRunner().invoke(main, ["verify", f"models:/{NAME}@challenger"])
    assert verified.exit_code == 0, verified.output
    assert f"matching the digest recorded in model version {NAME}/{version}" in verified.output
    promoted = CliRunner().invoke(main, ["promote", NAME, "--from-alias", "challenger", "--alias", "champion"])
    assert promoted.exit_code == 0, promoted.output
    assert str(mlflow.MlflowClient().get_model_version_by_alias(NAME, "champion").version) == version

    script = textwrap.dedent(f"""
        import json, mlflow, pandas as pd
        model = mlflow.pyfunc.load_model("models:/{NAME}@champion")
        print(json.dumps(model.predict(pd.DataFrame({{"text": {TEXTS!r}}}), params={{"k": 2}})["top_labels"].tolist()))
    """)
    env = dict(os.environ, MLFLOW_TRACKING_URI=team.url, MLFLOW_REGISTRY_URI=team.url)
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    assert [len(labels) for labels in answers] == [2, 2]

    process, url = serve(f"models:/{NAME}@champion", team.url, {"MLFLOW_REGISTRY_URI": team.url})
    try:
        response = requests.post(f"{url}/invocations", json={"inputs": TEXTS, "params": {"k": 2}}, timeout=60)
        assert response.status_code == 200, response.text
        assert [row["top_labels"] for row in response.json()["predictions"]] == answers
    finally:
        stop(process)


def test_a_version_rewritten_in_the_servers_artifact_store_is_caught_by_verify(team):
    version = mlflow.MlflowClient().get_model_version_by_alias(NAME, "challenger")
    logged = mlflow.MlflowClient().get_logged_model(logged_model_id(version))
    relative = logged.artifact_location.split("mlflow-artifacts:/", 1)[1].lstrip("/")
    folder = team.artifacts / relative
    assert (folder / "MANIFEST.json").is_file()
    edit_spec(folder, lambda spec: spec["postprocess"][0]["config"].__setitem__("labels", ["x", "y", "z"]))
    result = CliRunner().invoke(main, ["verify", f"models:/{NAME}/{version.version}"])
    assert result.exit_code == 1
    assert "do not match the digest recorded in model version" in result.output
    assert "changed since saving: ['fullmodel/fullmodel.json']" in result.output
