"""After log_model: inspect, diff, the verified promotion gate (also in a fresh environment), and
one-line errors, against a real SQLite registry."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from sample_steps import LABELS
from support import EXAMPLE_TEXTS
from test_integrity import artifact_folder, edit_spec

import mlflow_fullmodel as fm
from mlflow_fullmodel.cli import main
from mlflow_fullmodel.fresh_env import ENV_CACHE_VARIABLE
from mlflow_fullmodel.lifecycle import VERIFICATION_TAG, promote
from mlflow_fullmodel.verification import verify_model

NAME = "lifecycle"


@pytest.fixture(scope="module")
def versions(tracking, text_model) -> dict[str, str]:
    """Three versions of one registered model: "good" (aliased champion and challenger), "tampered"
    (rewritten consistently in the artifact store after logging) and "uninstallable" (a requirement
    that no index has)."""
    made = {}
    for label, extra in (("good", None), ("tampered", None), ("uninstallable", ["fullmodel-no-such-package==0.0.1"])):
        with mlflow.start_run():
            info = fm.log_model(text_model, name="model", input_example=EXAMPLE_TEXTS, registered_model_name=NAME,
                                extra_pip_requirements=extra)
        made[label] = str(info.registered_model_version)
    edit_spec(artifact_folder(f"models:/{NAME}/{made['tampered']}"),
              lambda spec: spec["postprocess"][0]["config"].__setitem__("labels", LABELS[::-1]))
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(NAME, "champion", made["good"])
    client.set_registered_model_alias(NAME, "challenger", made["good"])
    return made


def alias_version(alias: str) -> str:
    return str(mlflow.MlflowClient().get_model_version_by_alias(NAME, alias).version)


def version_tags(version: str) -> dict[str, str]:
    tags = mlflow.MlflowClient().get_model_version(NAME, version).tags
    return {k[len(VERIFICATION_TAG) + 1:]: v for k, v in tags.items() if k.startswith(VERIFICATION_TAG)}


def test_promote_verifies_records_the_result_and_sets_the_alias(versions):
    result = CliRunner().invoke(main, ["promote", NAME, versions["good"], "--alias", "production"])
    assert result.exit_code == 0, result.output
    assert f"Promoted {NAME} version {versions['good']} to @production" in result.output
    assert alias_version("production") == versions["good"]
    tags = version_tags(versions["good"])
    assert tags["result"] == "passed"
    assert tags["checks"] == "digest recorded in model version lifecycle/1,manifest,spec,parity"
    assert tags["digest"].startswith("sha256:") and tags["mlflow_fullmodel_version"] == fm.__version__
    assert "error" not in tags and tags["time"].endswith("+00:00")


def test_promote_refuses_a_tampered_version_and_leaves_every_alias_as_it_was(versions):
    before = {alias: alias_version(alias) for alias in ("champion", "challenger")}
    result = CliRunner().invoke(main, ["promote", NAME, versions["tampered"], "--alias", "champion"])
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"Error: The files of models:/{NAME}/{versions['tampered']} do not match the digest"), result.output
    assert "changed since saving: ['fullmodel/fullmodel.json']" in result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert {alias: alias_version(alias) for alias in before} == before
    tags = version_tags(versions["tampered"])
    assert tags["result"] == "failed" and tags["error"].startswith("IntegrityError: The files of")
    assert tags["checks"] == ""  # the first check failed: none is recorded as run


def test_promote_from_an_alias_moves_the_version_it_holds(versions):
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(NAME, "candidate", versions["good"])
    done = promote(NAME, from_alias="candidate", alias="staging")
    assert (done.version, done.previous) == (versions["good"], None)
    assert alias_version("staging") == versions["good"]


def test_promote_needs_a_version_or_a_from_alias_but_not_both(versions):
    neither = CliRunner().invoke(main, ["promote", NAME, "--alias", "x"])
    both = CliRunner().invoke(main, ["promote", NAME, "1", "--from-alias", "champion", "--alias", "x"])
    assert neither.exit_code == both.exit_code == 2
    assert "give either VERSION or --from-alias" in neither.output


@pytest.mark.slow
def test_promote_in_a_fresh_environment_refuses_a_version_whose_requirements_do_not_install(
    versions, tmp_path_factory, monkeypatch
):
    monkeypatch.setenv(ENV_CACHE_VARIABLE, str(tmp_path_factory.mktemp("envs")))
    with pytest.raises(fm.ParityError) as caught:
        promote(NAME, versions["uninstallable"], alias="champion", fresh_env=True)
    assert caught.value.stage == "install"
    assert "fullmodel-no-such-package" in str(caught.value)
    assert alias_version("champion") == versions["good"]
    tags = version_tags(versions["uninstallable"])
    assert tags["result"] == "failed"
    assert tags["checks"] == f"digest recorded in model version {NAME}/{versions['uninstallable']},manifest,spec,parity"


@pytest.mark.slow
def test_verify_in_a_fresh_environment_without_mlflow_fullmodel_passes_and_the_environment_is_reused(
    versions, tmp_path_factory, monkeypatch
):
    cache = tmp_path_factory.mktemp("envs")
    monkeypatch.setenv(ENV_CACHE_VARIABLE, str(cache))
    result = CliRunner().invoke(main, ["verify", f"models:/{NAME}/{versions['good']}", "--fresh-env"])
    assert result.exit_code == 0, result.output
    assert "fresh-env" in result.output
    (env,) = [p for p in cache.iterdir() if p.is_dir()]
    python = env / "bin" / "python"
    probe = subprocess.run([str(python), "-I", "-c", "import importlib.util as u; print(u.find_spec('mlflow_fullmodel'))"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "None"  # the model ran on its embedded runtime only
    # Compiled when built, as pip would (the check itself writes no bytecode).
    assert list(env.glob("lib/python*/site-packages/torch/__pycache__/__init__.*.pyc"))
    stamp = (env / "bin" / "python").stat().st_mtime_ns
    assert CliRunner().invoke(main, ["verify", f"models:/{NAME}/{versions['good']}", "--fresh-env"]).exit_code == 0
    assert (env / "bin" / "python").stat().st_mtime_ns == stamp and len(list(cache.iterdir())) == 1


def test_inspect_json_lists_every_step_param_and_artifact_and_the_recorded_digest(versions):
    promote(NAME, versions["good"], alias="inspected")
    result = CliRunner().invoke(main, ["inspect", f"models:/{NAME}/{versions['good']}", "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert [s["step"] for s in facts["steps"]] == ["preprocess[0]", "preprocess[1]", "collate", "forward",
                                                    "postprocess[0]"]
    assert facts["steps"][1]["target"] == "mlflow_fullmodel.transforms.text:SentencePieceEncode"
    assert facts["params"] == [
        {"name": "on_error", "default": "raise", "choices": ["raise", "return"], "type": "str", "step": "model"},
        {"name": "k", "default": 1, "minimum": 1, "maximum": 2, "type": "int", "step": "postprocess[0]"},
    ]
    (artifact,) = facts["artifacts"]
    assert artifact["argument"] == "model_file" and artifact["size"] > 1000 and len(artifact["sha256"]) == 64
    assert facts["modules"][0]["methods"] == ["forward"] and facts["modules"][0]["format"] == "torchscript"
    assert facts["recorded_digest"]["digest"] == facts["digest"]
    assert [v["params"] for v in facts["golden"]["variants"]] == [{"on_error": "return"}, {"k": 2}]
    assert facts["verification"]["result"] == "passed"
    assert any(r.startswith("sentencepiece==") for r in facts["requirements"])


def test_inspect_shows_the_steps_params_and_modules(versions):
    result = CliRunner().invoke(main, ["inspect", f"models:/{NAME}@champion"])
    assert result.exit_code == 0, result.output
    assert "preprocess[0]: sample_steps:Normalize()" in result.output
    assert "param: k=1 (int, postprocess[0], minimum 1, maximum 2)" in result.output
    assert "module: main (torchscript, modules/main.pt" in result.output
    assert "recorded: sha256:" in result.output


def test_diff_of_a_model_with_itself_says_there_are_no_differences(versions):
    result = CliRunner().invoke(main, ["diff", f"models:/{NAME}/{versions['good']}", f"models:/{NAME}@champion"])
    assert (result.exit_code, result.output) == (0, "no differences\n")


def test_diff_names_a_changed_configuration_value(versions):
    result = CliRunner().invoke(main, ["diff", f"models:/{NAME}/{versions['good']}",
                                       f"models:/{NAME}/{versions['uninstallable']}", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"requirements": ["+ fullmodel-no-such-package==0.0.1"]}


def test_diff_shows_changed_processing_code_as_a_unified_diff(tmp_path, text_model, saved_model):
    other = tmp_path / "other"
    shutil.copytree(saved_model, other)
    code = other / "fullmodel" / "code" / "sample_steps.py"
    code.write_text(code.read_text().replace('return " ".join(text.lower().split())',
                                             'return " ".join(text.upper().split())'))
    edit_spec(other, lambda spec: spec["preprocess"][1]["config"].__setitem__("max_length", 64))
    result = CliRunner().invoke(main, ["diff", str(saved_model), str(other)])
    assert result.exit_code == 0, result.output
    assert ("preprocess[1] mlflow_fullmodel.transforms.text:SentencePieceEncode: max_length 32 -> 64"
            in result.output)
    assert "--- a/code/sample_steps.py\n+++ b/code/sample_steps.py" in result.output
    assert '-        return " ".join(text.lower().split())' in result.output
    assert '+        return " ".join(text.upper().split())' in result.output


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, text_model) -> Path:
    path = tmp_path_factory.mktemp("lifecycle") / "model"
    fm.save_model(text_model, str(path), input_example=EXAMPLE_TEXTS)
    return path


@pytest.mark.parametrize("command", [["verify"], ["inspect"], ["diff", "."]], ids=["verify", "inspect", "diff"])
def test_errors_are_one_line_without_a_traceback(tmp_path, command, versions):
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "notes.txt").write_text("hello")
    for uri in (str(tmp_path / "not-a-model"), f"models:/{NAME}/99", "models:/no-such-model@champion"):
        result = CliRunner().invoke(main, [command[0], uri, *command[1:]])
        assert result.exit_code in (1, 2), result.output
        assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
        assert "Traceback" not in result.output


def test_an_unreachable_tracking_server_is_named_in_one_line(tmp_path):
    env = dict(os.environ, MLFLOW_TRACKING_URI="http://127.0.0.1:9", MLFLOW_REGISTRY_URI="http://127.0.0.1:9",
               MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
               MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    result = subprocess.run([sys.executable, "-m", "mlflow_fullmodel.cli", "inspect", "models:/reviews/1"],
                            env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "http://127.0.0.1:9" in result.stderr


def test_version_is_printed(tmp_path):
    result = CliRunner().invoke(main, ["--version"])
    assert result.output == f"mlflow-fullmodel, version {fm.__version__}\n"


def test_promote_refuses_a_version_with_no_digest_recorded_and_moves_no_alias(versions, text_model, tmp_path):
    # Logged as plain files, as a log_model stopped before it recorded the digest leaves a version.
    fm.save_model(text_model, str(tmp_path / "model"), input_example=EXAMPLE_TEXTS)
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(tmp_path / "model"), "model")
    version = mlflow.register_model(f"runs:/{run.info.run_id}/model", NAME).version
    before = alias_version("champion")
    assert verify_model(f"models:/{NAME}/{version}").record is None  # verify alone checks the folder itself
    with pytest.raises(fm.IntegrityError, match=rf"No digest of models:/{NAME}/{version} is recorded in the registry"):
        promote(NAME, str(version), alias="champion")
    assert alias_version("champion") == before
    assert version_tags(str(version))["result"] == "failed"


def test_verify_removes_its_download_unless_asked_to_keep_it(versions):
    uri = f"models:/{NAME}/{versions['good']}"
    removed = verify_model(uri, parity=False, keep_download=False)
    assert not Path(removed.local_path).exists() and removed.download_dir is None
    kept = verify_model(uri, parity=False)
    assert Path(kept.local_path).is_dir() and Path(kept.local_path).is_relative_to(kept.download_dir)
    shutil.rmtree(kept.download_dir)
