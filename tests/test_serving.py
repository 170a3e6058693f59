"""`mlflow models serve` on a registered fullmodel model, hit over HTTP on loopback."""

from __future__ import annotations

import pandas as pd
import pytest
import requests
from support import EXAMPLE_TEXTS

from mlflow_fullmodel.parity import ABS_TOL, REL_TOL

pytestmark = pytest.mark.slow


def invoke(url: str, payload: dict | str) -> requests.Response:
    data = payload if isinstance(payload, str) else None
    return requests.post(f"{url}/invocations", json=None if data else payload, data=data,
                         headers={"Content-Type": "application/json"}, timeout=60)


def answers(response: requests.Response) -> pd.DataFrame:
    assert response.status_code == 200, response.text
    return pd.DataFrame(response.json()["predictions"])


PAYLOADS = {
    "dataframe_records": {"dataframe_records": [{"text": t} for t in EXAMPLE_TEXTS]},
    "dataframe_split": {"dataframe_split": {"columns": ["text"], "data": [[t] for t in EXAMPLE_TEXTS]}},
    "inputs as columns": {"inputs": {"text": EXAMPLE_TEXTS}},
    "inputs as records": {"inputs": [{"text": t} for t in EXAMPLE_TEXTS]},
    "instances": {"instances": [{"text": t} for t in EXAMPLE_TEXTS]},
    "inputs as a list of texts": {"inputs": EXAMPLE_TEXTS},
    "instances as a list of texts": {"instances": EXAMPLE_TEXTS},
}


@pytest.mark.parametrize("params", [None, {"k": 2}], ids=["saved defaults", "k=2"])
@pytest.mark.parametrize("payload", PAYLOADS.values(), ids=PAYLOADS.keys())
def test_every_payload_format_gives_the_in_memory_answers(champion_server, text_model, payload, params):
    body = dict(payload, **({"params": params} if params else {}))
    served = answers(invoke(champion_server, body))
    expected = text_model.predict(EXAMPLE_TEXTS, params=params)
    assert served["label"].tolist() == expected["label"].tolist()
    assert served["top_labels"].tolist() == expected["top_labels"].tolist()
    # To float32 precision: the server runs one intra-op thread, which may sum in another order.
    assert served["probability"].tolist() == pytest.approx(expected["probability"].tolist(), rel=REL_TOL, abs=ABS_TOL)


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"dataframe_records": [{"text": "x"}], "params": {"k": 3}}, "Parameter 'k' must be <= 2, got 3"),
        ({"dataframe_records": [{"text": "x"}], "params": {"k": "two"}}, "k"),
        ({"dataframe_records": [{"review": "x"}]}, "text"),
        ({"dataframe_records": [{"text": "fine"}, {"text": None}]}, "Row 1, column 'text': value is missing (null)."),
        # A value of another type than the signature's is the request's fault, named before any step runs.
        ({"dataframe_records": [{"text": 42}]}, "Row 0, column 'text': expected a string, got an integer."),
        ({"dataframe_records": [{"text": "fine"}, {"text": 4.5}]}, "Row 1, column 'text': expected a string, got a number."),
        ({"dataframe_split": {"columns": ["text"], "data": [["fine"], [["a", "list"]]]}},
         "Row 1, column 'text': expected a string, got a list."),
        ('{"dataframe_records": [', "Invalid input"),
        ({"no_such_format": []}, "dataframe_records"),
    ],
    ids=["k out of range", "k not a number", "missing column", "null text", "a number for a text", "a number among texts",
         "a list for a text", "broken JSON", "unknown format"],
)
def test_a_bad_request_is_a_400_with_a_json_message_and_no_stack_trace(champion_server, payload, message):
    response = invoke(champion_server, payload)
    assert response.status_code == 400, response.text
    body = response.json()
    assert message in body["message"]
    assert "Traceback" not in response.text
    # ... and the server keeps serving.
    assert answers(invoke(champion_server, PAYLOADS["dataframe_records"]))["label"].notna().all()


def test_concurrent_requests_through_the_micro_batcher_get_their_own_answers(tracking, registered_reviews, text_model):
    import threading

    from servers import serve, stop

    process, url = serve("models:/reviews@champion", tracking,
                         {"MLFLOW_FULLMODEL_BATCHING": "true", "MLFLOW_FULLMODEL_MAX_WAIT_MS": "5"})
    texts = [f"{'great ' * (i % 7)}film {'dull ' * (i % 5)}plot {i}" for i in range(48)]
    answers: dict[int, dict] = {}

    def client(start: int) -> None:
        for i in range(start, len(texts), 12):
            params = {"k": 1 + i % 2}
            response = invoke(url, {"dataframe_records": [{"text": texts[i]}], "params": params})
            answers[i] = response.json()["predictions"][0] if response.status_code == 200 else response.text

    try:
        threads = [threading.Thread(target=client, args=(n,)) for n in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
    finally:
        stop(process)
    for i, text in enumerate(texts):
        expected = text_model.predict([text], params={"k": 1 + i % 2})
        assert answers[i]["top_labels"] == expected["top_labels"][0], answers[i]
        assert answers[i]["probability"] == pytest.approx(expected["probability"][0], rel=REL_TOL, abs=ABS_TOL)


def test_on_error_return_answers_every_row_over_http_with_the_bad_ones_errors(champion_server, text_model):
    rows = [EXAMPLE_TEXTS[0], "", EXAMPLE_TEXTS[1], None]
    response = invoke(champion_server, {"dataframe_records": [{"text": t} for t in rows],
                                        "params": {"on_error": "return", "k": 2}})
    result = answers(response)
    assert list(result.columns) == ["label", "probability", "top_labels", "top_probabilities", "error"]
    predictions = response.json()["predictions"]
    assert predictions[0]["error"] is None and predictions[2]["error"] is None  # JSON null
    assert predictions[1]["label"] is None and predictions[3]["top_labels"] is None
    assert result["error"][1].startswith("Row 1: preprocess[1] SentencePieceEncode: the text has no tokens")
    assert result["error"][3] == "Row 3, column 'text': value is missing (null)."
    assert result.loc[[1, 3], "label"].isna().all()
    expected = text_model.predict([EXAMPLE_TEXTS[0], EXAMPLE_TEXTS[1]], params={"k": 2})
    assert result.loc[[0, 2], "label"].tolist() == expected["label"].tolist()
    assert result.loc[[0, 2], "probability"].tolist() == pytest.approx(expected["probability"].tolist(), rel=REL_TOL,
                                                                       abs=ABS_TOL)


def test_a_request_whose_rows_all_fail_still_has_every_output_column(champion_server):
    result = answers(invoke(champion_server, {"inputs": ["", "  "], "params": {"on_error": "return"}}))
    assert list(result.columns) == ["label", "probability", "top_labels", "top_probabilities", "error"]
    assert result["label"].isna().all() and result["error"].notna().all()
