"""Requests as an attacker sends them: limits on one request, errors that blame the right side, and
bodies that carry our message only (no stack trace, no path, no echo of the request)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import mlflow
import pandas as pd
import pytest
import requests
from mlflow.exceptions import MlflowException
from sample_steps import LABELS, Normalize
from support import EXAMPLE_TEXTS

import mlflow_fullmodel as fm
from mlflow_fullmodel.serving import serve
from mlflow_fullmodel.settings import ServingSettings
from mlflow_fullmodel.transforms import SentencePieceEncode, TopK


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, text_model):
    path = tmp_path_factory.mktemp("hostile") / "model"
    fm.save_model(text_model, str(path), input_example=EXAMPLE_TEXTS)
    return str(path)


@pytest.mark.parametrize("config, data, message", [
    ({"max_rows": 3}, ["good"] * 4, "the request has 4 rows, over the limit max_rows=3; send fewer rows per request, "
                                    "or raise the limit (pyfunc model_config 'max_rows' or the environment variable "
                                    "MLFLOW_FULLMODEL_MAX_ROWS of the server)."),
    ({"max_text_chars": 10}, ["short", "x" * 11], "row 1, column 'text' has 11 characters, over the limit "
                                                   "max_text_chars=10; send shorter texts"),
])
def test_a_request_over_a_limit_is_refused_naming_the_limit_the_value_and_how_to_raise_it(saved_model, config, data,
                                                                                            message):
    model = mlflow.pyfunc.load_model(saved_model, model_config=config)
    with pytest.raises(MlflowException) as caught:
        model.predict(pd.DataFrame({"text": data}))
    assert caught.value.get_http_status_code() == 400
    assert message in caught.value.message
    assert len(model.predict(pd.DataFrame({"text": data[:1]}))) == 1  # under the limit it answers


def test_a_limit_set_through_the_environment_applies_and_a_bad_value_is_named(saved_model, monkeypatch):
    monkeypatch.setenv("MLFLOW_FULLMODEL_MAX_ROWS", "2")
    with pytest.raises(MlflowException, match="over the limit max_rows=2"):
        mlflow.pyfunc.load_model(saved_model).predict(pd.DataFrame({"text": ["a", "b", "c"]}))
    monkeypatch.setenv("MLFLOW_FULLMODEL_MAX_ROWS", "many")
    with pytest.raises(MlflowException, match=r"max_rows \(MLFLOW_FULLMODEL_MAX_ROWS\) must be an integer >= 1, got 'many'"):
        mlflow.pyfunc.load_model(saved_model)


@pytest.mark.parametrize("texts, row, got", [([42], 0, "an integer"), (["good", 4.5], 1, "a number"),
                                             (["good", "fine", True], 2, "true/false"), (["good", ["a"]], 1, "a list"),
                                             ([{"a": 1}], 0, "an object"), ([b"bytes"], 0, "a bytes")])
def test_a_value_of_another_type_than_the_signature_says_is_a_400_naming_row_column_and_type(saved_model, texts, row,
                                                                                            got):
    # The model's first step is its own Normalize, which would fail on anything but a string (a 500).
    model = mlflow.pyfunc.load_model(saved_model)
    with pytest.raises(MlflowException) as caught:
        model.predict(pd.DataFrame({"text": pd.Series(texts, dtype=object)}))
    assert caught.value.get_http_status_code() == 400
    assert caught.value.message == (f"Row {row}, column 'text': expected a string, got {got}. Send values of the "
                                    "types in the model's signature.")
    # Missing values are the model's to name (or to answer per row with on_error="return").
    answered = model.predict(pd.DataFrame({"text": ["good", None]}), params={"on_error": "return"})
    assert answered["error"].tolist()[1] == "Row 1, column 'text': value is missing (null)."


class Breaks(fm.Transform):
    """A step with a bug: it fails on every text, whatever the text."""

    def __call__(self, text: str) -> str:
        return text.no_such_method()


def test_a_bug_inside_a_step_is_a_500_model_error_naming_the_step_with_its_traceback_only_in_the_log(
    tmp_path, spm_path, scripted_net, caplog
):
    model = fm.FullModel(preprocess=[Normalize(), Breaks(), SentencePieceEncode(fm.Artifact(spm_path))],
                         module=scripted_net, postprocess=[TopK(labels=LABELS)])
    fm.save_model(model, str(tmp_path / "m"), check_parity=False)
    served = mlflow.pyfunc.load_model(str(tmp_path / "m"))
    with pytest.raises(MlflowException) as caught:
        served.predict(pd.DataFrame({"text": ["a film"]}))
    assert caught.value.get_http_status_code() == 500
    assert caught.value.message == ("Model error (not caused by the request) in preprocess[1] Breaks: Row 0: "
                                    "preprocess[1] Breaks failed: AttributeError: 'str' object has no attribute "
                                    "'no_such_method'")
    assert "Traceback" in caplog.text and "no_such_method" in caplog.text


def test_the_message_cannot_be_rewritten_to_echo_the_request(saved_model):
    model = mlflow.pyfunc.load_model(saved_model)
    with pytest.raises(MlflowException) as caught:
        model.predict(pd.DataFrame({"text": ["   "]}))
    caught.value.message = "Failed to predict data '<the whole request>'. Error: " + caught.value.message
    assert caught.value.message.startswith("Row 0: preprocess[1] SentencePieceEncode: the text has no tokens")


# -- over HTTP --------------------------------------------------------------------------------

HUGE = "great " * 30_000  # 180,000 characters, over the default max_text_chars
BAD_REQUESTS = {
    "empty text": ({"inputs": [""]}, "Row 0: preprocess[1] SentencePieceEncode: the text has no tokens"),
    "whitespace only": ({"inputs": ["   \t\n"]}, "the text has no tokens"),
    "null text": ({"dataframe_records": [{"text": None}]}, "Row 0, column 'text': value is missing (null)."),
    "text over the limit": ({"inputs": [HUGE]}, "over the limit max_text_chars=100000"),
    "rows over the limit": ({"inputs": ["good"] * 10_001}, "the request has 10001 rows, over the limit max_rows=10000"),
    # Not here: an unknown param, which `mlflow models serve` drops (with a log line) before the
    # model sees the request.
    "param out of bounds": ({"inputs": ["good"], "params": {"k": 9}}, "Parameter 'k' must be <= 2, got 9."),
    "param of the wrong type": ({"inputs": ["good"], "params": {"k": "two"}}, None),
    "bad on_error": ({"inputs": ["good"], "params": {"on_error": "ignore"}},
                     "Parameter 'on_error' must be one of ['raise', 'return'], got a str of length 6."),
    "missing column": ({"dataframe_records": [{"review": "good"}]}, None),
    "not JSON": ("{not json", None),
    "unknown format key": ({"rows": ["good"]}, None),
}


@pytest.mark.slow
@pytest.mark.parametrize("body, message", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_a_bad_request_gets_a_4xx_json_message_without_trace_or_echo_and_the_server_keeps_serving(
    champion_server, body, message
):
    data = body if isinstance(body, str) else json.dumps(body)
    response = requests.post(f"{champion_server}/invocations", data=data,
                             headers={"Content-Type": "application/json"}, timeout=60)
    assert 400 <= response.status_code < 500, response.text[:500]
    error = response.json()
    assert "stack_trace" not in error and "Traceback" not in response.text and "/site-packages/" not in response.text
    if message is not None:
        assert error["message"].startswith(message) or message in error["message"][:300]
        assert "Failed to predict data" not in error["message"]
    assert len(response.content) < 5_000  # never the request echoed back
    good = requests.post(f"{champion_server}/invocations", json={"inputs": EXAMPLE_TEXTS}, timeout=60)
    assert good.status_code == 200 and len(good.json()["predictions"]) == len(EXAMPLE_TEXTS)


#: Lets a test hold a request inside the model until it says so.
RELEASE = threading.Event()


class HoldWaitingTexts(fm.Transform):
    """Holds the text "wait" until RELEASE is set; passes the rest."""

    def __call__(self, text: str) -> str:
        if text == "wait" and not RELEASE.wait(timeout=60):
            raise RuntimeError("never released")
        return text


def test_heavy_requests_over_the_bound_are_refused_at_once_and_light_ones_are_still_answered(spm_path, scripted_net):
    model = fm.FullModel(preprocess=[HoldWaitingTexts(), Normalize(), SentencePieceEncode(fm.Artifact(spm_path))],
                         module=scripted_net, postprocess=[TopK(labels=LABELS)])
    served = serve(model, ServingSettings(heavy_samples=2, max_heavy_requests=1, tune_server=False),
                   ["label", "probability"])
    heavy = pd.DataFrame({"text": ["wait", "a good film", "a dull film"]})
    RELEASE.clear()
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(served.predict, heavy)
        while not running.running():
            time.sleep(0.01)
        time.sleep(0.2)  # inside the model, holding the one heavy slot
        with pytest.raises(MlflowException) as caught:
            served.predict(heavy)
        assert caught.value.get_http_status_code() == 503
        assert ("the server is running 1 heavy request(s) already (over heavy_samples=2 samples each; this one makes 3)"
                in caught.value.message and "MLFLOW_FULLMODEL_MAX_HEAVY_REQUESTS" in caught.value.message)
        assert len(served.predict(pd.DataFrame({"text": ["a good film", "superb"]}))) == 2  # light: answered now
        RELEASE.set()
        assert len(running.result(timeout=60)) == 3
    assert len(served.predict(heavy)) == 3  # the slot is free again
