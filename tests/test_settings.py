"""The serving settings: parsed once, from model_config, the environment or the defaults; every bad
value an error naming the setting, its variable and what it accepts."""

from __future__ import annotations

import mlflow
import pytest
from support import EXAMPLE_TEXTS

import mlflow_fullmodel as fm
from mlflow_fullmodel.settings import ServingSettings, variable_of

BAD = {
    "a misspelled boolean": ("batching", "ture", "true or false (or 1/0, yes/no, on/off)"),
    "a number for a boolean": ("tune_server", "2", "true or false (or 1/0, yes/no, on/off)"),
    "zero rows": ("max_rows", "0", "an integer >= 1"),
    "negative rows": ("max_rows", "-5", "an integer >= 1"),
    "a fraction of a row": ("max_rows", "2.5", "an integer >= 1"),
    "zero heavy requests": ("max_heavy_requests", "0", "an integer >= 1"),
    "zero batch size": ("max_batch_size", "0", "an integer >= 1"),
    "negative threads": ("num_threads", "-1", "an integer >= 1"),
    "a word for a number": ("max_bytes", "lots", "an integer >= 1"),
    "a zero deadline": ("deadline_s", "0", "a number >= 0.001"),
    "a negative wait": ("max_wait_ms", "-1", "a number >= 0"),
    "not a number": ("max_wait_ms", "nan", "a number >= 0"),
    "infinity": ("deadline_s", "inf", "a number >= 0.001"),
    "an unknown device": ("device", "gpu", "cpu, cuda or cuda:N"),
}


@pytest.mark.parametrize("setting, value, accepts", BAD.values(), ids=BAD.keys())
def test_a_bad_value_from_the_environment_is_an_error_naming_it(setting, value, accepts):
    variable = variable_of(setting)
    with pytest.raises(fm.ConfigError) as caught:
        ServingSettings.resolve(environ={variable: value})
    assert str(caught.value) == f"{setting} ({variable}) must be {accepts}, got {value!r}."


@pytest.mark.parametrize("setting, value, accepts", BAD.values(), ids=BAD.keys())
def test_a_bad_value_in_model_config_is_an_error_naming_it(setting, value, accepts):
    with pytest.raises(fm.ConfigError, match=rf"^{setting} \("):
        ServingSettings.resolve({setting: value}, environ={})


@pytest.mark.parametrize("value, expected", [("true", True), (" ON ", True), ("1", True), ("Yes", True),
                                             ("false", False), ("off", False), ("0", False), ("NO", False)])
def test_a_boolean_takes_the_usual_spellings(value, expected):
    assert ServingSettings.resolve(environ={"MLFLOW_FULLMODEL_BATCHING": value}).batching is expected


def test_numbers_parse_as_their_type_and_an_empty_variable_is_unset():
    settings = ServingSettings.resolve(environ={"MLFLOW_FULLMODEL_MAX_ROWS": " 12 ", "MLFLOW_FULLMODEL_DEADLINE_S": "1.5",
                                                "MLFLOW_FULLMODEL_MAX_WAIT_MS": "0", "MLFLOW_FULLMODEL_MAX_BYTES": ""})
    assert (settings.max_rows, settings.deadline_s, settings.max_wait_ms) == (12, 1.5, 0.0)
    assert isinstance(settings.max_rows, int) and settings.max_bytes == ServingSettings().max_bytes


def test_an_unknown_key_is_an_error_listing_the_valid_ones():
    with pytest.raises(fm.ConfigError, match=r"Unknown model_config key\(s\) \['max_row'\].*'max_rows'"):
        ServingSettings.resolve({"max_row": 3})


def test_settings_made_directly_are_checked_too():
    with pytest.raises(fm.ConfigError, match=r"max_samples \(MLFLOW_FULLMODEL_MAX_SAMPLES\) must be an integer >= 1"):
        ServingSettings(max_samples=0)


def test_a_model_loaded_with_a_bad_setting_fails_to_load_naming_it(tmp_path, text_model, monkeypatch):
    fm.save_model(text_model, str(tmp_path / "model"), input_example=EXAMPLE_TEXTS)
    monkeypatch.setenv("MLFLOW_FULLMODEL_BATCHING", "ture")
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"batching \(MLFLOW_FULLMODEL_BATCHING\) must be true"):
        mlflow.pyfunc.load_model(str(tmp_path / "model"))
    monkeypatch.setenv("MLFLOW_FULLMODEL_BATCHING", "on")
    assert mlflow.pyfunc.load_model(str(tmp_path / "model"))._model_impl.batcher is not None
