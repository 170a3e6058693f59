"""Integrity of what runs: the manifest of the whole MLflow model, the closed spec, confined paths,
format versions, the digest recorded in the registry, and signatures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
from sample_steps import LABELS
from support import EXAMPLE_TEXTS, signing_keys

import mlflow_fullmodel as fm
from mlflow_fullmodel.cli import main
from mlflow_fullmodel.registry import DIGEST_TAG, MANIFEST_TAG
from mlflow_fullmodel.storage import save_fullmodel
from mlflow_fullmodel.storage.integrity import MANIFEST_FILE, verify_manifest, write_manifest
from mlflow_fullmodel.transforms import SentencePieceEncode, TopK
from mlflow_fullmodel.verification import sign_model, verify_model


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, text_model) -> Path:
    path = tmp_path_factory.mktemp("integrity") / "model"
    fm.save_model(text_model, str(path), input_example=EXAMPLE_TEXTS)
    return path


@pytest.fixture
def copy(tmp_path, saved_model) -> Path:
    """A copy of the saved model to damage."""
    target = tmp_path / "copy"
    shutil.copytree(saved_model, target)
    return target


def manifest_files(folder: Path) -> list[str]:
    return sorted(json.loads((folder / MANIFEST_FILE).read_text())["files"])


def edit_spec(folder: Path, change) -> None:
    """Change the spec the way an attacker with write access would: and the manifest to match."""
    spec_path = folder / "fullmodel" / "fullmodel.json"
    spec = json.loads(spec_path.read_text())
    change(spec)
    spec_path.write_text(json.dumps(spec))
    write_manifest(str(folder))


def test_the_manifest_covers_mlflow_files_the_runtime_the_spec_and_everything_else(saved_model):
    files = manifest_files(saved_model)
    on_disk = sorted(p.relative_to(saved_model).as_posix() for p in saved_model.rglob("*") if p.is_file())
    assert files == [f for f in on_disk if f != MANIFEST_FILE]
    for expected in ("MLmodel", "requirements.txt", "conda.yaml", "python_env.yaml", "input_example.json",
                     "serving_input_example.json", "code/mlflow_fullmodel/flavor.py",
                     "code/mlflow_fullmodel/storage/integrity.py", "fullmodel/fullmodel.json",
                     "fullmodel/modules/main.pt", "fullmodel/golden.json"):
        assert expected in files


def test_one_changed_byte_in_any_file_of_the_model_is_an_integrity_error_naming_that_file(tmp_path, saved_model):
    files = manifest_files(saved_model)
    assert len(files) > 30
    for relative in files:
        copy = tmp_path / relative.replace("/", "_")
        shutil.copytree(saved_model, copy)
        data = bytearray((copy / relative).read_bytes())
        data[len(data) // 2] ^= 0x01
        (copy / relative).write_bytes(bytes(data))
        with pytest.raises(fm.IntegrityError) as caught:
            fm.load_model(str(copy))
        assert f"changed since saving: ['{relative}']" in str(caught.value), relative
        assert "Restore the model from its source" in str(caught.value)
        shutil.rmtree(copy)


def test_an_added_and_a_removed_file_are_integrity_errors_naming_them(copy):
    (copy / "code" / "sitecustomize.py").write_text("print('hello')\n")
    (copy / "fullmodel" / "golden.json").unlink()
    with pytest.raises(fm.IntegrityError, match=r"missing: \['fullmodel/golden.json'\]; not part of the saved "
                                                r"model: \['code/sitecustomize.py'\]"):
        fm.load_model(str(copy))


def test_the_files_mlflow_adds_after_saving_are_allowed_and_nothing_else(copy):
    (copy / "registered_model_meta").write_text("model_name: reviews\nmodel_version: '1'\n")
    fm.load_model(str(copy))
    (copy / "registered_model_meta.bak").write_text("x")
    with pytest.raises(fm.IntegrityError, match=r"not part of the saved model: \['registered_model_meta.bak'\]"):
        fm.load_model(str(copy))


def test_bytecode_is_tolerated_when_loading_but_refused_by_verification(copy):
    cache = copy / "code" / "mlflow_fullmodel" / "__pycache__"
    cache.mkdir()
    (cache / "flavor.cpython-311.pyc").write_bytes(b"\x00" * 16)
    fm.load_model(str(copy))
    with pytest.raises(fm.IntegrityError, match=r"not part of the saved model: \['code/mlflow_fullmodel/__pycache__"):
        verify_manifest(str(copy), strict=True)


def test_a_symlink_in_the_model_folder_is_refused_naming_it(copy, tmp_path):
    outside = tmp_path / "outside.model"
    artifact = next((copy / "fullmodel" / "artifacts").rglob("spm.model"))
    outside.write_bytes(artifact.read_bytes())
    artifact.unlink()
    artifact.symlink_to(outside)
    with pytest.raises(fm.IntegrityError, match=rf"{artifact.name} in the model folder .* is a symlink"):
        fm.load_model(str(copy))


@pytest.mark.parametrize("target, config", [
    ("subprocess:getoutput", {"cmd": "touch {marker}"}),
    ("builtins:open", {"file": "{marker}", "mode": "w"}),
    ("os:system", {"command": "touch {marker}"}),
])
def test_a_spec_target_outside_the_model_is_refused_without_running_it(copy, tmp_path, target, config):
    marker = tmp_path / "marker"
    config = {k: v.format(marker=marker) for k, v in config.items()}

    def point_at_callable(spec):
        spec["preprocess"][0] = {"target": target, "config": config}

    edit_spec(copy, point_at_callable)
    with pytest.raises(fm.IntegrityError, match=rf"Step preprocess\[0\]: the target '{target}' names the module"):
        fm.load_model(str(copy))
    assert not marker.exists()


def test_a_spec_target_that_is_not_a_step_class_is_refused_before_it_is_called(copy):
    edit_spec(copy, lambda spec: spec["postprocess"].__setitem__(0, {"target": "sample_steps:corpus", "config": {"n": 3}}))
    with pytest.raises(fm.IntegrityError, match=r"Step postprocess\[0\]: the target 'sample_steps:corpus' is a function"):
        fm.load_model(str(copy))


def test_a_step_class_imported_into_captured_code_from_elsewhere_is_refused(copy):
    captured = copy / "fullmodel" / "code" / "sample_steps.py"
    captured.write_text(captured.read_text() + "\nfrom collections import OrderedDict as Sneaky\n")
    edit_spec(copy, lambda spec: spec["preprocess"].__setitem__(0, {"target": "sample_steps:Sneaky", "config": {}}))
    with pytest.raises(fm.IntegrityError, match=r"'sample_steps:Sneaky' is a type, not a step class"):
        fm.load_model(str(copy))


@pytest.mark.parametrize("path", ["../../../etc/passwd", "/etc/passwd", "artifacts/../../MLmodel", "artifacts/./x"])
def test_an_artifact_path_outside_the_model_is_refused_naming_it(copy, path):
    def repoint(spec):
        spec["preprocess"][1]["config"]["model_file"] = {"$artifact": path}

    edit_spec(copy, repoint)
    with pytest.raises(fm.IntegrityError, match=rf"preprocess\[1\], argument 'model_file': the path '{path}' is not a "
                                                r"relative path inside the model folder"):
        fm.load_model(str(copy))


def test_a_module_path_outside_the_model_is_refused_naming_it(copy):
    edit_spec(copy, lambda spec: spec["modules"]["main"].__setitem__("file", "../../main.pt"))
    with pytest.raises(fm.IntegrityError, match=r"module 'main': the path '../../main.pt' is not a relative path"):
        fm.load_model(str(copy))


def test_a_future_spec_format_version_is_refused_naming_both_versions(copy):
    edit_spec(copy, lambda spec: spec.__setitem__("format_version", 99))
    with pytest.raises(fm.ModelFormatError, match=r"format version 99; this runtime reads version 2\. Upgrade"):
        fm.load_model(str(copy))


def test_a_future_flavor_format_version_is_refused_naming_both_versions(copy):
    mlmodel = copy / "MLmodel"
    mlmodel.write_text(mlmodel.read_text().replace("format_version: 2", "format_version: 99"))
    write_manifest(str(copy))
    with pytest.raises(fm.ModelFormatError, match=r"flavor of .* has format version 99; this mlflow_fullmodel reads "
                                                  r"version 2"):
        fm.load_model(str(copy))
    with pytest.raises(mlflow.exceptions.MlflowException, match="format version 99"):
        mlflow.pyfunc.load_model(str(copy))


def test_an_artifact_swapped_after_loading_is_refused_when_it_is_read(copy):
    model = fm.load_model(str(copy))
    artifact = next((copy / "fullmodel" / "artifacts").rglob("spm.model"))
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x01
    artifact.write_bytes(bytes(data))
    with pytest.raises(fm.IntegrityError, match=r"spm.model changed after the model's files were checked"):
        model.predict(EXAMPLE_TEXTS)


def test_loading_a_clean_model_writes_nothing_outside_or_inside_the_folder(saved_model, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in saved_model.rglob("*")}
    home, temp, cwd = (tmp_path / name for name in ("home", "tmp", "cwd"))
    for folder in (home, temp, cwd):
        folder.mkdir()
    script = textwrap.dedent(f"""
        import mlflow.pyfunc, pandas
        model = mlflow.pyfunc.load_model({str(saved_model)!r})
        print(model.predict(pandas.DataFrame({{"text": ["What a film!"]}})))
    """)
    env = dict(os.environ, HOME=str(home), TMPDIR=str(temp), PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [list(folder.rglob("*")) for folder in (home, temp, cwd)] == [[], [], []]
    assert {p: p.stat().st_mtime_ns for p in saved_model.rglob("*")} == before


def test_a_step_from_an_installed_package_is_refused_at_save_time(tmp_path, spm_path, scripted_net):
    site = tmp_path / "site-packages"
    (site / "thirdparty").mkdir(parents=True)
    (site / "thirdparty" / "__init__.py").write_text(
        "import mlflow_fullmodel as fm\n\nclass Shout(fm.Transform):\n    def __call__(self, text):\n"
        "        return text.upper()\n"
    )
    sys.path.insert(0, str(site))
    try:
        from thirdparty import Shout

        model = fm.FullModel(preprocess=[Shout(), SentencePieceEncode(fm.Artifact(spm_path))], module=scripted_net,
                             postprocess=[TopK(labels=LABELS)])
        with pytest.raises(fm.CodeCaptureError, match=r"preprocess\[0\]: Shout is defined in the installed package "
                                                      r"'thirdparty'.*Define a subclass"):
            save_fullmodel(model, str(tmp_path / "never"))
        assert not (tmp_path / "never").exists()
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("thirdparty", None)


# -- the digest in the registry ---------------------------------------------------------------


@pytest.fixture(scope="module")
def registered(tracking, text_model):
    """A model logged and registered as "integrity" version 1."""
    with mlflow.start_run():
        info = fm.log_model(text_model, name="model", input_example=EXAMPLE_TEXTS,
                            registered_model_name="integrity")
    return info


def artifact_folder(model_uri: str) -> Path:
    location = ModelsArtifactRepository.get_underlying_uri(model_uri)
    while location.startswith("models:/"):
        location = ModelsArtifactRepository.get_underlying_uri(location)
    return Path(location.removeprefix("file://"))


def test_log_model_records_the_digest_on_the_logged_model_the_run_and_the_version(registered, tmp_path):
    local = mlflow.artifacts.download_artifacts(registered.model_uri, dst_path=str(tmp_path))
    digest = verify_manifest(local, strict=True).digest
    client = mlflow.MlflowClient()
    assert client.get_logged_model(registered.model_id).tags[DIGEST_TAG] == digest
    assert client.get_run(registered.run_id).data.tags[f"{DIGEST_TAG}.model"] == digest
    version = client.get_model_version("integrity", str(registered.registered_model_version))
    assert version.tags[DIGEST_TAG] == digest
    assert json.loads(version.tags[MANIFEST_TAG])["files"] == json.loads(Path(local, MANIFEST_FILE).read_text())["files"]
    report = verify_model("models:/integrity/1")
    assert report.digest == digest and report.checks[0] == "digest recorded in model version integrity/1"


def test_verify_catches_a_registered_version_rewritten_consistently_in_the_artifact_store(
    tracking, text_model, tmp_path
):
    with mlflow.start_run():
        fm.log_model(text_model, name="model", input_example=EXAMPLE_TEXTS, registered_model_name="rewritten")
    folder = artifact_folder("models:/rewritten/1")
    edit_spec(folder, lambda spec: spec["postprocess"][0]["config"].__setitem__("labels", LABELS[::-1]))
    verify_manifest(str(folder))  # consistent: the folder's own manifest agrees with its files

    with pytest.raises(fm.IntegrityError, match=r"do not match the digest recorded in model version rewritten/1 .*"
                                                r"changed since saving: \['fullmodel/fullmodel.json'\]"):
        verify_model("models:/rewritten/1")
    result = CliRunner().invoke(main, ["verify", "models:/rewritten/1"])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith("Error: The files of models:/rewritten/1")


# -- signatures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, str]:
    return signing_keys(tmp_path_factory.mktemp("keys"))


def test_a_signed_model_verifies_with_its_key_and_fails_with_another_or_unsigned(copy, keys):
    with pytest.raises(fm.SignatureError, match="is not signed"):
        verify_model(str(copy), public_key=keys["signer.pub"], parity=False)
    result = CliRunner().invoke(main, ["sign", str(copy), "--key", keys["signer"]])
    assert result.exit_code == 0, result.output
    report = verify_model(str(copy), public_key=keys["signer.pub"], parity=False)
    assert report.checks == ["manifest", "signature", "spec"]
    with pytest.raises(fm.SignatureError, match="does not verify"):
        verify_model(str(copy), public_key=keys["other.pub"], parity=False)


def test_a_byte_changed_after_signing_fails_even_with_the_manifest_rewritten(copy, keys):
    sign_model(str(copy), keys["signer"])
    edit_spec(copy, lambda spec: spec["postprocess"][0]["config"].__setitem__("labels", LABELS[::-1]))
    with pytest.raises(fm.SignatureError, match="does not verify"):
        verify_model(str(copy), public_key=keys["signer.pub"], parity=False)
    result = CliRunner().invoke(main, ["verify", str(copy), "--public-key", keys["signer.pub"]])
    assert result.exit_code == 1 and result.output.startswith("Error: The signature of the model")


def test_a_tampered_model_signed_by_another_key_runs_none_of_its_code(copy, keys, tmp_path):
    sign_model(str(copy), keys["signer"])
    # An attacker with write access: code that runs on import, a manifest to match, their own signature.
    marker = tmp_path / "marker"
    captured = copy / "fullmodel" / "code" / "sample_steps.py"
    captured.write_text(captured.read_text() + f"\nopen({str(marker)!r}, 'w').close()\n")
    write_manifest(str(copy))
    sign_model(str(copy), keys["other"])
    with pytest.raises(fm.SignatureError, match="does not verify"):
        verify_model(str(copy), public_key=keys["signer.pub"])
    assert not marker.exists()
    # The same code, run by a load that checks no signature, shows the marker is real.
    fm.load_model(str(copy))
    assert marker.exists()


def test_a_registered_model_is_signed_in_its_artifact_store(registered, keys):
    sign_model("models:/integrity/1", keys["signer"])
    assert (artifact_folder("models:/integrity/1") / "model.sig").is_file()
    report = verify_model("models:/integrity/1", public_key=keys["signer.pub"])
    assert report.checks == ["digest recorded in model version integrity/1", "manifest", "signature", "spec", "parity"]


def test_a_runtime_that_does_not_reproduce_the_golden_example_is_named_before_serving(copy):
    from mlflow_fullmodel.parity import golden_problems

    model = fm.load_model(str(copy))
    assert golden_problems(model, str(copy / "fullmodel")) == []
    # As if this runtime answered otherwise than the one that saved the model: the golden differs.
    golden_path = copy / "fullmodel" / "golden.json"
    golden = json.loads(golden_path.read_text())
    for row in golden["outputs"]["data"]:  # split orient: the label is the first column
        row[0] = LABELS[1 - LABELS.index(row[0])]
    golden_path.write_text(json.dumps(golden))
    problems = golden_problems(model, str(copy / "fullmodel"))
    assert problems and problems[0].startswith("row 0, column 'label': expected")


def test_a_model_that_fails_its_checks_leaves_torchs_threads_as_they_were(copy):
    import torch

    (copy / "fullmodel" / "golden.json").write_text("{}")  # a byte changed: the manifest check fails
    threads = torch.get_num_threads()
    wanted = 1 if threads != 1 else 2
    with pytest.raises(mlflow.exceptions.MlflowException, match="changed since saving"):
        mlflow.pyfunc.load_model(str(copy), model_config={"num_threads": wanted})
    assert torch.get_num_threads() == threads


def test_verify_hashes_the_model_once_in_its_own_process(copy, monkeypatch):
    from mlflow_fullmodel.storage import integrity

    hashed: list[str] = []
    of_folder = integrity.Manifest.of_folder.__func__

    def counted(cls, root, **kwargs):
        hashed.append(root)
        return of_folder(cls, root, **kwargs)

    monkeypatch.setattr(integrity.Manifest, "of_folder", classmethod(counted))
    assert verify_model(str(copy), parity=False).checks == ["manifest", "spec"]
    assert hashed == [str(copy)]  # the manifest check and the spec check share one hashing of the files
