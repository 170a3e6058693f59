"""The image classifier example with ``--preprocessing torchvision``: the project's own steps over
``torchvision.transforms.v2.functional`` (``tv_processing.py``), saved as code with torchvision as a
requirement, answering like the model in memory and like mlflow_fullmodel's own image steps."""

from __future__ import annotations

import importlib.metadata
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException

import mlflow_fullmodel as fm
from mlflow_fullmodel.parity import ABS_TOL, REL_TOL
from mlflow_fullmodel.transforms import CenterCrop, DecodeImage, NormalizeImage, Resize, ToTensor

EXAMPLE = Path(__file__).resolve().parents[1] / "example_projects" / "image_classifier"
#: The example's modules, imported by name from its folder while the tests run, as train.py does.
EXAMPLE_MODULES = ("train", "digits", "network", "tv_processing")


def _torchvision_unavailable() -> str | None:
    try:
        import torchvision.transforms.v2.functional  # noqa: F401
    except Exception as error:  # noqa: BLE001 - a torchvision wheel built for another torch raises RuntimeError
        return f"torchvision cannot be imported here ({type(error).__name__}: {error})"
    return None


_UNAVAILABLE = _torchvision_unavailable()
if _UNAVAILABLE and os.environ.get("MLFLOW_FULLMODEL_REQUIRE_TORCHVISION"):
    # `make test-torchvision` builds an environment for these tests: there, a skip would hide a failure.
    raise RuntimeError(_UNAVAILABLE)
pytestmark = pytest.mark.skipif(_UNAVAILABLE is not None, reason=_UNAVAILABLE or "")


@pytest.fixture(scope="module")
def example() -> Iterator[dict[str, ModuleType]]:
    """The example's modules, imported from its folder; put back as they were afterwards, since
    other examples have modules of the same names (``train``)."""
    saved = {name: sys.modules.pop(name) for name in EXAMPLE_MODULES if name in sys.modules}
    sys.path.insert(0, str(EXAMPLE))
    try:
        import digits
        import train
        import tv_processing

        yield {"train": train, "digits": digits, "tv": tv_processing}
    finally:
        sys.path.remove(str(EXAMPLE))
        for name in EXAMPLE_MODULES:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


@pytest.fixture(scope="module")
def pngs(example) -> list[bytes]:
    images, _ = example["digits"].load_pngs(24, seed=123)  # rendered like the training data
    return images


@pytest.fixture(scope="module")
def trained(example, tracking: str) -> dict:
    """One tiny in-process training run with --preprocessing torchvision: the result holds each
    variant's model in memory beside the URI of the model logged from it."""
    return example["train"].main([
        "--tiny", "--preprocessing", "torchvision", "--registered-model-name", "",
        "--experiment", "tests", "--tracking-uri", tracking,
    ])


def apply(steps: list[fm.Transform], value):
    for step in steps:
        value = step(value)
    return value


def png_of(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# -- the steps against mlflow_fullmodel's own ---------------------------------------------------------


def test_the_torchvision_steps_make_the_builtin_steps_pixels_to_one_gray_level(example, pngs):
    tv = example["tv"]
    mean, std = [0.8], [0.3]
    builtin = [DecodeImage(mode="L"), Resize(32), CenterCrop(28), ToTensor(), NormalizeImage(mean=mean, std=std)]
    torchvision = [DecodeImage(mode="L"), tv.ToImage(), tv.Resize(32), tv.CenterCrop(28), tv.ToFloat(),
                   tv.Normalize(mean=mean, std=std)]
    ours = torch.stack([apply(builtin, png) for png in pngs])
    theirs = torch.stack([apply(torchvision, png) for png in pngs])
    assert ours.shape == theirs.shape == (len(pngs), 1, 28, 28)
    # Both resize with antialiased bilinear filters; torchvision's uint8 kernel rounds like Pillow's
    # to within one gray level. After normalising, one level is (1 / 255) / std.
    level = (1 / 255) / std[0]
    difference = (ours - theirs).abs()
    assert float(difference.max()) <= level * (1 + 1e-4)
    assert float(difference.mean()) < 0.25 * level
    assert float(ours.std()) > 0.5  # digits on paper, not a blank image that any two steps agree on


@pytest.mark.parametrize("width, height", [(50, 37), (37, 50), (31, 90), (64, 64)])
def test_the_torchvision_resize_keeps_the_aspect_ratio_like_the_builtin_resize(example, width, height):
    tv = example["tv"]
    pixels = np.random.default_rng(width * 1000 + height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    png = png_of(pixels)
    ours = apply([DecodeImage(mode="RGB"), Resize(24), ToTensor()], png)
    theirs = apply([DecodeImage(mode="RGB"), tv.ToImage(), tv.Resize(24), tv.ToFloat()], png)
    assert ours.shape == theirs.shape
    assert float((ours - theirs).abs().max()) <= (1 / 255) * (1 + 1e-4)


def test_the_torchvision_resize_refuses_an_aspect_ratio_bomb_before_making_it(example):
    tv = example["tv"]
    strip = torch.zeros(1, 1, 262_144, dtype=torch.uint8)  # 262144 x 1: resized to 32 high, 8388608 wide
    with pytest.raises(fm.InputError, match=r"resizing the 262144x1 image to size=32 would make it 8388608x32 "
                                            r"\(268435456 pixels\), over the limit of max_pixels=4194304"):
        tv.Resize(32, max_pixels=4_194_304)(strip)
    assert tv.Resize(32)(torch.zeros(1, 40, 60, dtype=torch.uint8)).shape == (1, 32, 48)


# -- the example trained with them ----------------------------------------------------------------------


@pytest.mark.slow
def test_the_saved_model_holds_the_projects_code_and_lists_torchvision_without_a_pickle(trained, tmp_path):
    for variant, result in trained["variants"].items():
        folder = Path(mlflow.artifacts.download_artifacts(result["model_uri"], dst_path=str(tmp_path / variant)))
        requirements = (folder / "requirements.txt").read_text().split()
        assert f"torchvision=={importlib.metadata.version('torchvision').split('+')[0]}" in requirements
        assert (folder / "fullmodel" / "code" / "tv_processing.py").read_text() == (EXAMPLE / "tv_processing.py").read_text()
        assert not [p.name for p in folder.rglob("*") if p.suffix in (".pkl", ".pickle", ".cloudpickle")]
    models = {variant: result["model"] for variant, result in trained["variants"].items()}
    names = {v: [type(step).__module__ + ":" + type(step).__name__ for step in m.preprocess] for v, m in models.items()}
    assert names == {
        "center": ["mlflow_fullmodel.transforms.image:DecodeImage", "tv_processing:ToImage", "tv_processing:Resize",
                   "tv_processing:CenterCrop", "tv_processing:ToFloat", "tv_processing:Normalize"],
        "tta": ["mlflow_fullmodel.transforms.image:DecodeImage", "tv_processing:ToImage", "tv_processing:Resize",
                "tv_processing:ToFloat", "mlflow_fullmodel.transforms.image:RandomCrops", "tv_processing:Normalize"],
    }


@pytest.mark.slow
@pytest.mark.parametrize("variant, params", [("center", {"k": 3}), ("tta", {"k": 3, "seed": 4, "tta": 5})])
def test_the_saved_model_answers_like_the_model_in_memory(trained, pngs, variant, params):
    result = trained["variants"][variant]
    assert result["val_accuracy"] > 0.5  # ten classes: chance is 0.1
    expected = result["model"].predict(pngs, params=params)
    loaded = mlflow.pyfunc.load_model(result["model_uri"]).predict(pd.DataFrame({"image": pngs}), params=params)
    assert loaded["top_labels"].tolist() == expected["top_labels"].tolist()
    for got, want in zip(loaded["top_probabilities"], expected["top_probabilities"]):
        assert list(got) == pytest.approx(list(want), rel=REL_TOL, abs=ABS_TOL)


@pytest.mark.slow
def test_the_saved_model_refuses_an_aspect_ratio_bomb_naming_the_limit(trained, example, pngs):
    bomb = png_of(np.full((1, 262_144), 255, dtype=np.uint8))  # passes DecodeImage's max_pixels
    message = (r"Row 1: preprocess\[2\] Resize: resizing the 262144x1 image to size=32 would make it "
               r"8388608x32 \(268435456 pixels\), over the limit of max_pixels=")
    result = trained["variants"]["tta"]
    with pytest.raises(fm.InputError, match=message):
        result["model"].predict([pngs[0], bomb])
    with pytest.raises(MlflowException, match=message) as served_error:
        mlflow.pyfunc.load_model(result["model_uri"]).predict(pd.DataFrame({"image": [pngs[0], bomb]}))
    assert served_error.value.error_code == "INVALID_PARAMETER_VALUE"  # a 400 when served
