"""sentencepiece and Pillow are extras: the steps that need them name the missing package and the
extra when they are built, and the rest of the image steps work on tensors without Pillow."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import mlflow_fullmodel as fm
from mlflow_fullmodel.transforms import (
    CenterCrop,
    DecodeImage,
    Resize,
    SentencePieceDecode,
    SentencePieceEncode,
    ToTensor,
)


@pytest.fixture
def without(monkeypatch):
    def hide(*modules: str) -> None:
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in modules else find_spec(name, *a))
    return hide


@pytest.mark.parametrize("step", [SentencePieceEncode, SentencePieceDecode])
def test_a_sentencepiece_step_without_sentencepiece_names_itself_and_the_extra(without, step):
    without("sentencepiece")
    with pytest.raises(fm.ConfigError, match=rf"^{step.__name__} needs the sentencepiece package.*"
                                             r"mlflow-fullmodel\[sentencepiece\]"):
        step(fm.Artifact(__file__))


@pytest.mark.parametrize("build", [DecodeImage, lambda: Resize(8), ToTensor])
def test_a_pillow_step_without_pillow_names_the_extra(without, build):
    without("PIL")
    with pytest.raises(fm.ConfigError, match=r"needs the pillow package.*mlflow-fullmodel\[images\]"):
        build()


def test_the_tensor_image_steps_need_no_pillow(without):
    without("PIL")
    assert CenterCrop(2)(torch.zeros(3, 4, 4)).shape == (3, 2, 2)
    with pytest.raises(fm.InputError, match="takes a PIL image, got str"):
        CenterCrop(2)("not an image")


def test_the_steps_declare_what_a_saved_model_must_install():
    assert SentencePieceEncode.requirements == SentencePieceDecode.requirements == ("sentencepiece",)
    assert DecodeImage.requirements == Resize.requirements == ToTensor.requirements == ("pillow",)
