"""The shared type checks (``mlflow_fullmodel._checks``) and the steps that use them: an int is
never a bool, a number is an int or a float and never a bool, and a numpy integer is neither."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch

import mlflow_fullmodel as fm
from mlflow_fullmodel import _checks
from mlflow_fullmodel._checks import is_int, is_number
from mlflow_fullmodel.transform import param_default, param_value
from mlflow_fullmodel.transforms import RandomCrops, SentencePieceEncode, TokenizerEncode, TopK

INTS = [0, 1, -7, 2**70]
FLOATS = [0.0, -1.5, math.inf, math.nan, np.float64(2.5)]
NEITHER = [True, False, "1", None, [1], np.int64(3), np.float32(1.0), torch.tensor(1), 1 + 0j]


@pytest.mark.parametrize("value", INTS)
def test_an_int_is_an_int_and_a_number(value):
    assert is_int(value) and is_number(value)


@pytest.mark.parametrize("value", FLOATS)
def test_a_float_is_a_number_but_not_an_int(value):
    assert is_number(value) and not is_int(value)


@pytest.mark.parametrize("value", NEITHER)
def test_bools_strings_numpy_integers_and_tensors_are_neither(value):
    assert not is_int(value) and not is_number(value)


def test_the_module_examples_run():
    results = doctest.testmod(_checks, optionflags=doctest.ELLIPSIS)
    assert results.attempted and not results.failed


def test_the_value_of_a_param_or_its_default():
    assert param_default(fm.Param(3)) == 3 and param_default(5) == 5
    assert param_value(fm.Param(3), {}, "k") == 3
    assert param_value(fm.Param(3), {"k": 4, "n": 9}, "k") == 4
    assert param_value(5, {"n": 9}, "k") == 5


@pytest.mark.parametrize("build, message", [
    (lambda: TopK(labels=["a", "b"], k=True), r"TopK: k must be an int from 1 to 2, got True"),
    (lambda: TopK(labels=["a", "b"], k=fm.Param(True)), r"TopK: k must be an int from 1 to 2, got True"),
    (lambda: RandomCrops(4, tta=True), r"RandomCrops: tta must be an int >= 1"),
    (lambda: fm.GreedySearch(bos_id=True), r"GreedySearch: bos_id must be a token id"),
    (lambda: fm.BeamSearch(length_penalty=True), r"BeamSearch: length_penalty must be a number, got True"),
])
def test_a_bool_where_a_step_takes_an_int_or_a_number_is_refused(build, message):
    with pytest.raises(fm.ConfigError, match=message):
        build()


def test_pad_collate_refuses_a_bool_length_or_pad_value():
    with pytest.raises(fm.ConfigError, match=r"PadCollate: length must be None or an int >= 1, got True"):
        fm.PadCollate(length=True)
    with pytest.raises(fm.ConfigError, match=r"PadCollate: pad_values must be a dict"):
        fm.PadCollate(pad_values={"mask": False})


def test_the_tokenizer_steps_refuse_a_bool_max_length(spm_path, hf_tokenizer_path):
    with pytest.raises(fm.ConfigError, match=r"SentencePieceEncode: max_length must be an int >= 1 .*, got True"):
        SentencePieceEncode(fm.Artifact(spm_path), max_length=True)
    with pytest.raises(fm.ConfigError, match=r"TokenizerEncode: max_length must be an int >= 1, got True"):
        TokenizerEncode(fm.Artifact(hf_tokenizer_path), max_length=True)


def test_numpy_numbers_are_what_python_says_they_are():
    assert fm.PadCollate(pad_values={"mask": np.float64(0.0)}).pad_values == {"mask": 0.0}
    with pytest.raises(fm.ConfigError, match=r"PadCollate: length must be None or an int >= 1"):
        fm.PadCollate(length=np.int64(4))


def test_pad_collate_refuses_a_pad_side_with_a_config_error_like_its_sibling_steps():
    with pytest.raises(fm.ConfigError, match=r"^PadCollate: pad_side must be 'right' or 'left', got 'up'\.$"):
        fm.PadCollate(pad_side="up")
