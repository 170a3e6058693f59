"""The image classifier example project, trained at tiny scale: two pre-processings registered as
two versions of one model, loaded side by side, then the champion (seeded test-time augmentation)
served over HTTP with base64 PNG files."""

from __future__ import annotations

import importlib.util
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests
from images import b64, claimed_size_png, png
from servers import serve, stop
from support import train_example

import mlflow_fullmodel as fm
from mlflow_fullmodel.parity import ABS_TOL, REL_TOL

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[1] / "example_projects" / "image_classifier"
NAME = "example-images"


def _load_digits_module():
    # Under its own name: the text example has modules of its own, and the test must not depend on
    # what else is importable as "digits".
    spec = importlib.util.spec_from_file_location("image_example_digits", EXAMPLE / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


digits = _load_digits_module()
PNGS, LABELS = digits.load_pngs(40, seed=123)  # rendered like the training data; mostly held out


@pytest.fixture(scope="module")
def trained(image_example: dict) -> dict:
    return image_example


@pytest.fixture(scope="module")
def models(trained) -> dict[str, fm.FullModel]:
    return {variant: fm.load_model(f"models:/{NAME}/{v.version}") for variant, v in trained["versions"].items()}


@pytest.fixture(scope="module")
def server(trained, tracking: str):
    """One `mlflow models serve` process for all HTTP tests of this module: the champion."""
    process, url = serve(f"models:/{NAME}@champion", tracking)
    yield url
    stop(process)


def post(url: str, payload: dict) -> requests.Response:
    return requests.post(f"{url}/invocations", json=payload, timeout=60)


def records(images: list[bytes], **params) -> dict:
    payload: dict = {"dataframe_records": [{"image": b64(image)} for image in images]}
    if params:
        payload["params"] = params
    return payload


def accuracy(frame: pd.DataFrame, labels: list[str]) -> float:
    return sum(a == b for a, b in zip(frame["label"], labels)) / len(labels)


# -- the registry: two versions, two pre-processings -------------------------------------------------


def test_both_variants_are_versions_of_one_registered_model_with_their_aliases(trained):
    versions = trained["versions"]
    assert sorted(versions) == ["center", "tta"]
    assert (str(versions["center"].version), str(versions["tta"].version)) == ("1", "2")
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "1"
    for run in trained["runs"].values():
        assert run.data.metrics["val_accuracy"] > 0.5  # ten classes: chance is 0.1


def test_each_version_holds_its_own_steps_and_the_training_splits_statistics(trained, tmp_path):
    specs = {}
    for variant, version in trained["versions"].items():
        folder = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/{version.version}", dst_path=str(tmp_path / variant)))
        specs[variant] = json.loads((folder / "fullmodel" / "fullmodel.json").read_text())
        assert "pillow==" in (folder / "requirements.txt").read_text()
    steps = {v: [s["target"].rsplit(":", 1)[1] for s in spec["preprocess"]] for v, spec in specs.items()}
    assert steps == {
        "center": ["DecodeImage", "Resize", "CenterCrop", "ToTensor", "NormalizeImage"],
        "tta": ["DecodeImage", "Resize", "ToTensor", "RandomCrops", "NormalizeImage"],
    }
    assert specs["center"]["forward"]["target"].endswith(":CallModule")
    assert specs["tta"]["forward"]["target"].endswith(":AverageOverSamples")
    assert sorted(specs["center"]["params"]) == ["k", "on_error"]
    assert sorted(specs["tta"]["params"]) == ["k", "on_error", "seed", "tta"]
    # Both normalise with the statistics computed on the training split, as logged with the run.
    for variant, spec in specs.items():
        normalize = spec["preprocess"][-1]["config"]
        params = trained["runs"][variant].data.params
        assert normalize == {"mean": json.loads(params["normalize_mean"]), "std": json.loads(params["normalize_std"])}
    assert 0.7 < specs["tta"]["preprocess"][-1]["config"]["mean"][0] < 0.9  # mostly white paper


# -- load and predict --------------------------------------------------------------------------------


def test_the_two_versions_answer_the_same_pngs_each_with_its_own_preprocessing(models):
    center = models["center"].predict(PNGS, params={"k": 3})
    tta = models["tta"].predict(PNGS, params={"k": 3})
    assert accuracy(center, LABELS) > 0.6 and accuracy(tta, LABELS) > 0.6
    assert center["top_probabilities"].tolist() != tta["top_probabilities"].tolist()
    # Only the tta version has the parameters of its random crops.
    with pytest.raises(fm.ParamError, match=r"Unknown parameter\(s\) \['seed'\]. Valid parameters are: \['k', 'on_error'\]"):
        models["center"].predict(PNGS[:1], params={"seed": 1})


def test_the_tta_answer_is_the_same_for_the_same_seed_and_changes_with_the_seed(models):
    model = models["tta"]
    first = model.predict(PNGS, params={"seed": 7, "k": 3})
    pd.testing.assert_frame_equal(model.predict(PNGS, params={"seed": 7, "k": 3}), first, check_exact=True)
    assert model.predict(PNGS, params={"seed": 8, "k": 3})["top_probabilities"].tolist() != first["top_probabilities"].tolist()
    assert model.predict(PNGS, params={"seed": 7, "tta": 2, "k": 3})["top_probabilities"].tolist() != first["top_probabilities"].tolist()


def test_the_registered_model_loads_as_pyfunc_and_predicts_like_the_logged_run_model(trained, models):
    for variant, version in trained["versions"].items():
        frame = pd.DataFrame({"image": PNGS})
        params = {"k": 2, "seed": 3} if variant == "tta" else {"k": 2}
        registered = mlflow.pyfunc.load_model(f"models:/{NAME}/{version.version}").predict(frame, params=params)
        logged = mlflow.pyfunc.load_model(f"runs:/{version.run_id}/model").predict(frame, params=params)
        pd.testing.assert_frame_equal(registered, logged, check_exact=True)
        pd.testing.assert_frame_equal(registered, models[variant].predict(PNGS, params=params), check_exact=True)


# -- served over HTTP --------------------------------------------------------------------------------


def test_the_served_champion_answers_base64_pngs_like_the_model_in_memory(server, models):
    response = post(server, records(PNGS, seed=5, k=2))
    assert response.status_code == 200, response.text
    served = pd.DataFrame(response.json()["predictions"])
    expected = models["tta"].predict(PNGS, params={"seed": 5, "k": 2})
    assert served["top_labels"].tolist() == expected["top_labels"].tolist()
    # float32 convolutions may sum in another order with another thread count (the server runs one
    # intra-op thread) or batch size: equal to float32 precision, the tolerance of the parity check.
    assert served["top_probabilities"].tolist() == [
        pytest.approx(p, rel=REL_TOL, abs=ABS_TOL) for p in expected["top_probabilities"]
    ]
    # The "inputs" format hands the base64 text to the model undecoded; DecodeImage decodes it.
    inputs = post(server, {"inputs": {"image": [b64(p) for p in PNGS]}, "params": {"seed": 5, "k": 2}})
    assert inputs.status_code == 200, inputs.text
    assert inputs.json()["predictions"] == response.json()["predictions"]


def test_the_same_request_with_the_same_seed_is_answered_identically(server):
    payload = records(PNGS[:8], seed=11, tta=6, k=3)
    first, second = post(server, payload), post(server, payload)
    assert first.status_code == second.status_code == 200, first.text
    assert first.content == second.content  # byte for byte
    other_seed = post(server, records(PNGS[:8], seed=12, tta=6, k=3))
    assert other_seed.json() != first.json()


def test_concurrent_requests_do_not_change_the_answers(server):
    # Every request light (at most heavy_samples=256 samples: 30 images x tta 8), so that none may be
    # refused for admission however the six clients' requests happen to overlap.
    payloads = [records(PNGS[:5], seed=1), records(PNGS[3:20], seed=1, tta=12), records(PNGS[:-11:-1] * 3, seed=2, k=2)]
    baseline = [post(server, p).json()["predictions"] for p in payloads]
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(lambda i: (i % 3, post(server, payloads[i % 3])), range(18)))
    for index, response in answers:
        assert response.status_code == 200, response.text
        got, want = response.json()["predictions"], baseline[index]
        assert [a["top_labels"] for a in got] == [a["top_labels"] for a in want]
        # Equal up to float32 summation order, should concurrent rows ever share a forward batch.
        for a, b in zip(got, want):
            assert a["top_probabilities"] == pytest.approx(b["top_probabilities"], rel=REL_TOL, abs=ABS_TOL)
    # The same image gets the same answer whatever else is in its request.
    together = post(server, records(PNGS[:5], seed=1)).json()["predictions"]
    alone = post(server, records(PNGS[2:3], seed=1)).json()["predictions"]
    assert alone[0]["top_labels"] == together[2]["top_labels"]
    assert alone[0]["probability"] == pytest.approx(together[2]["probability"], rel=REL_TOL, abs=ABS_TOL)


BAD_IMAGES = {
    "not an image": (b64(b"this is not an image"), r"Row 1: preprocess\[0\] DecodeImage: the data \(20 bytes, text\) is not an image file"),
    "truncated PNG": (b64(PNGS[0][: len(PNGS[0]) // 2]), r"Row 1: preprocess\[0\] DecodeImage: the PNG image \(40x40\) is truncated or corrupt"),
    "truncated header": (b64(PNGS[0][:20]), r"Row 1: preprocess\[0\] DecodeImage: the data \(20 bytes\) starts like a PNG file but Pillow cannot read its header: the file is truncated"),
    "base64 with stray characters": ("????AAAA", r"Row 1: preprocess\[0\] DecodeImage: the data \(3 bytes\) is not an image"),
    "over max_pixels": (b64(claimed_size_png(3000, 2000)), r"Row 1: preprocess\[0\] DecodeImage: the image is 3000x2000 pixels \(6000000 pixels\), over the limit of max_pixels=4194304"),
    "decompression bomb": (b64(claimed_size_png(100_000, 100_000)), r"Row 1: preprocess\[0\] DecodeImage: the image is too large: .*max_pixels=4194304"),
    "zero bytes": ("", r"Row 1: preprocess\[0\] DecodeImage: the data is empty, not an image"),
    # 262,144 pixels pass DecodeImage's max_pixels; resized to the shorter side the model reads, millions wide.
    "aspect-ratio bomb": (b64(png(262_144, 1, color=255)), r"Row 1: preprocess\[1\] Resize: resizing the 262144x1 image .* "
                                                      r"over the limit of max_pixels"),
    # MLflow decodes base64 for binary columns before the model is called, so this message is
    # MLflow's: it names the column, not the row.
    "invalid base64": ("not base64!", r"Failed to convert column image .*Invalid base64-encoded string"),
}


@pytest.mark.parametrize("image, message", BAD_IMAGES.values(), ids=BAD_IMAGES.keys())
def test_a_bad_image_is_a_400_with_a_json_message_and_the_server_keeps_serving(server, image, message):
    response = post(server, {"dataframe_records": [{"image": b64(PNGS[0])}, {"image": image}]})
    assert response.status_code == 400, response.text
    body = response.json()
    assert re.search(message, body["message"]), body["message"]
    assert "Traceback" not in response.text and "stack_trace" not in body
    good = post(server, records(PNGS[:2]))
    assert good.status_code == 200 and len(good.json()["predictions"]) == 2


def test_too_many_samples_in_one_request_is_a_400_naming_the_limit(server):
    response = post(server, records(PNGS[:1] * 700, tta=32))
    assert response.status_code == 400, response.text[:300]
    assert response.json()["message"].startswith("the request makes 700 rows x 32 samples = 22400 samples, over the "
                                                 "limit max_samples=20000")
    assert post(server, records(PNGS[:2], tta=32)).status_code == 200


def test_a_bad_sample_count_is_a_400_naming_the_parameter(server):
    response = post(server, records(PNGS[:1], tta=0))
    assert response.status_code == 400
    assert "Parameter 'tta' must be >= 1, got 0" in response.json()["message"]


def test_diff_of_the_two_versions_names_the_steps_and_configuration_that_differ(trained):
    from click.testing import CliRunner

    from mlflow_fullmodel.cli import main

    result = CliRunner().invoke(main, ["diff", f"models:/{NAME}/1", f"models:/{NAME}/2", "--json"])
    assert result.exit_code == 0, result.output
    differences = json.loads(result.stdout)
    steps = "\n".join(differences["steps"])
    assert "removed preprocess[2] mlflow_fullmodel.transforms.image:CenterCrop" in steps
    assert "added preprocess[3] mlflow_fullmodel.transforms.image:RandomCrops(" in steps
    assert "removed forward mlflow_fullmodel.forward:CallModule" in steps
    assert "added forward mlflow_fullmodel.forward:AverageOverSamples(" in steps
    assert {"added seed", "added tta"} <= set(differences["params"])
    same = CliRunner().invoke(main, ["diff", f"models:/{NAME}@champion", f"models:/{NAME}/2"])
    assert same.exit_code == 0 and same.output == "no differences\n"


def test_the_same_training_exported_with_torch_export_answers_like_the_torchscript_model(trained, tracking, models, tmp_path):
    name = f"{NAME}-export"
    train_example("image_classifier", tracking, tmp_path, "--module-format", "export", "--registered-model-name", name)
    for version in mlflow.MlflowClient().search_model_versions(f"name='{name}'"):
        exported = fm.load_model(f"models:/{name}/{version.version}")
        assert exported.module.formats == {"main": "torch.export"}
        scripted = models[version.tags["variant"]]
        for batch in (PNGS[:1], PNGS[:12]):
            pd.testing.assert_frame_equal(exported.predict(batch), scripted.predict(batch), rtol=1e-4, atol=1e-6)
