"""Over a hundred kinds of bad request against the served example models, text and image, under
`mlflow-fullmodel serve` (all of them) and `mlflow models serve` (those its own server does not
decide): each is a 4xx JSON answer naming the problem, with no stack trace, path or echo of the
request, and the next good request is answered as the model in memory answers it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pandas as pd
import pytest
import requests
from images import b64, claimed_size_png, encoded, png
from PIL import Image
from servers import serve, serve_fullmodel, stop
from support import IMAGE_EXAMPLE, TEXT_EXAMPLE

import mlflow_fullmodel as fm

pytestmark = pytest.mark.slow

#: (body, content type, expected status or None for any 4xx, a fragment of the message or None)
Kind = tuple[bytes | str, str | None, int | None, str | None]
JSON = "application/json"


def records(column: str, *values: Any, **params: Any) -> str:
    payload: dict[str, Any] = {"dataframe_records": [{column: v} for v in values]}
    if params:
        payload["params"] = params
    return json.dumps(payload)


def generic_kinds(column: str, good: str) -> dict[str, Kind]:
    """Kinds of bad request every model meets: the body, its format, its columns, its params."""
    one = records(column, good)
    return {
        "no content type": (one, None, 415, "no Content-Type header"),
        "text/plain content type": (one, "text/plain", 415, None),
        "XML content type": ("<rows/>", "application/xml", 415, None),
        "JSON nested 10,000 deep": ("[" * 10_000 + "]" * 10_000, JSON, 400, "nested 10000 levels deep"),
        "a 5,000-digit integer": ('{"inputs": [' + "9" * 5_000 + "]}", JSON, 400, "not valid JSON"),
        "invalid JSON": ("{not json", JSON, 400, "not valid JSON"),
        "truncated JSON": (one[:-5], JSON, 400, "not valid JSON"),
        "empty body": ("", JSON, 400, None),
        "JSON null": ("null", JSON, 400, None),
        "JSON number": ("42", JSON, 400, None),
        "JSON string": ('"hello"', JSON, 400, None),
        "JSON list": ("[1, 2, 3]", JSON, 400, None),
        "no input key": ('{"rows": []}', JSON, 400, None),
        "two input keys": (json.dumps({"inputs": [good], "dataframe_records": [{column: good}]}), JSON, 400, None),
        "duplicate keys": ('{"dataframe_records": [{"%s": %s, "%s": %s}]}' % (column, json.dumps(good), column,
                                                                               json.dumps(good)), JSON, 400, "twice"),
        "invalid UTF-8": (b'{"dataframe_records": [{"' + column.encode() + b'": "\xff\xfe"}]}', JSON, 400, None),
        "unknown param": (records(column, good, temperature=0.5), JSON, 400, '1 unknown parameter(s) in "params"'),
        "misspelled param": (records(column, good, K=2), JSON, 400, "did you mean 'k'?"),
        "params a list": (json.dumps({"dataframe_records": [{column: good}], "params": [1]}), JSON, 400, "params"),
        "param k a string": (records(column, good, k="two"), JSON, 400, "'k'"),
        "param k zero": (records(column, good, k=0), JSON, 400, "'k'"),
        "param k negative": (records(column, good, k=-1), JSON, 400, "'k'"),
        "param k too large": (records(column, good, k=1000), JSON, 400, "'k'"),
        "param k a float": (records(column, good, k=1.5), JSON, 400, "'k'"),
        "param k a list": (records(column, good, k=[1]), JSON, 400, "'k'"),
        "param k null": (records(column, good, k=None), JSON, 400, None),
        "param on_error unknown": (records(column, good, on_error="ignore"), JSON, 400, "on_error"),
        "missing column": (json.dumps({"dataframe_records": [{"other": good}]}), JSON, 400, None),
        "misspelled column": (json.dumps({"dataframe_records": [{column[:-1]: good}]}), JSON, 400, None),
        "column in capitals": (json.dumps({"dataframe_records": [{column.upper(): good}]}), JSON, 400, None),
        "null value": (records(column, None), JSON, 400, "value is missing (null)"),
        "NaN value": ('{"dataframe_records": [{"%s": NaN}]}' % column, JSON, 400, None),
        "Infinity value": ('{"dataframe_records": [{"%s": Infinity}]}' % column, JSON, 400, None),
        "a number": (records(column, 12345), JSON, 400, None),
        "a boolean": (records(column, True), JSON, 400, None),
        "a list": (records(column, [good]), JSON, 400, None),
        "an object": (records(column, {"value": good}), JSON, 400, None),
        "a null among good rows": (records(column, good, good, None), JSON, 400, "Row 2"),
        "split with a wrong shape": (json.dumps({"dataframe_split": {"columns": [column], "data": [[good, good]]}}),
                                     JSON, 400, None),
        "split data not a list": (json.dumps({"dataframe_split": {"columns": [column], "data": 5}}), JSON, 400, None),
        "records not a list": (json.dumps({"dataframe_records": {column: good}}), JSON, 400, None),
        "instances of nulls": (json.dumps({"instances": [None, None]}), JSON, 400, None),
        "CSV with bad quoting": (f'{column}\n"unterminated', "text/csv", 400, None),
        "CSV without the column": ("other\nvalue", "text/csv", 400, None),
        "garbage Parquet": (b"PAR1 garbage garbage", "application/vnd.apache.parquet", 400, None),
        "10,001 rows": (records(column, *[good] * 10_001), JSON, 400, "max_rows=10000"),
    }


def text_kinds() -> dict[str, Kind]:
    good = "A wonderful film."
    return {
        **generic_kinds("text", good),
        "empty text": (records("text", ""), JSON, 400, "the text has no tokens"),
        "whitespace only": (records("text", " \t\n "), JSON, 400, "the text has no tokens"),
        "text over max_text_chars": (records("text", "great " * 20_000), JSON, 400, "max_text_chars=100000"),
        "a lone surrogate": ('{"dataframe_records": [{"text": "bad \\ud800 text"}]}', JSON, 400,
                             "Row 0, column 'text' is not valid Unicode text: a lone surrogate (U+D800) at character 4"),
        "bytes as base64": (records("text", b64(b"\x00\x01binary")), JSON, 200, None),
    }


def image_kinds() -> dict[str, Kind]:
    good = b64(png())
    frames = [Image.new("L", (40, 40), shade) for shade in (0, 128, 255)]
    return {
        **generic_kinds("image", good),
        "zero-byte image": (records("image", ""), JSON, 400, None),
        "not base64": (records("image", "%%% not base64 %%%"), JSON, 400, None),
        "a file path": (records("image", "/etc/passwd"), JSON, 400, None),
        "a data URL": (records("image", "data:image/png;base64," + good), JSON, 400, None),
        "text as base64": (records("image", b64(b"hello, this is not an image")), JSON, 400, "not an image"),
        "SVG as base64": (records("image", b64(b'<svg xmlns="http://www.w3.org/2000/svg"/>')), JSON, 400, None),
        "truncated PNG": (records("image", b64(png()[:60])), JSON, 400, None),
        "decompression bomb": (records("image", b64(claimed_size_png(100_000, 100_000))), JSON, 400, "max_pixels"),
        "aspect-ratio bomb": (records("image", b64(png(262_144, 1))), JSON, 400, "max_pixels"),
        "four aspect-ratio bombs": (records("image", *[b64(png(262_144, 1))] * 4), JSON, 400, "max_pixels"),
        "too many samples": (records("image", *[good] * 3_000), JSON, 400, "max_samples=20000"),
        "tta over its maximum": (records("image", good, tta=65), JSON, 400, "'tta'"),
        "tta zero": (records("image", good, tta=0), JSON, 400, "'tta'"),
        "seed a string": (records("image", good, seed="abc"), JSON, 400, "'seed'"),
        "an image over max_bytes": (records("image", b64(b"\x89PNG" + bytes(17 * 2**20))), JSON, 400, "max_bytes"),
        # Odd but valid images: answered, or refused with a message; never a server error.
        "animated GIF": (records("image", b64(encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]))),
                         JSON, None, None),
        "16-bit PNG": (records("image", b64(encoded(Image.new("I;16", (40, 40), 30_000), "PNG"))), JSON, None, None),
        "CMYK JPEG": (records("image", b64(encoded(Image.new("CMYK", (40, 40), (0, 0, 0, 128)), "JPEG"))), JSON,
                      None, None),
    }


#: What MLflow's server decides before the model sees the request: `mlflow models serve` answers
#: these its own way (README), `mlflow-fullmodel serve` as the others.
SCHEMA_CHECKED = {  # against the signature, in a message that echoes the request
    "param k a string", "param k a float", "param k a list", "seed a string", "missing column",
    "misspelled column", "column in capitals",
}
SERVER_DECIDES = SCHEMA_CHECKED | {
    "no content type", "text/plain content type", "XML content type", "JSON nested 10,000 deep",
    "a 5,000-digit integer", "duplicate keys", "unknown param", "misspelled param", "params a list",
    "CSV with bad quoting", "CSV without the column", "garbage Parquet", "invalid UTF-8", "empty body",
    "JSON null", "JSON number", "JSON string", "JSON list", "no input key", "two input keys", "truncated JSON",
    "invalid JSON", "split with a wrong shape", "split data not a list", "records not a list",
    "instances of nulls", "NaN value", "Infinity value", "param k null",
}

MODELS = {
    "text": (f"models:/{TEXT_EXAMPLE}@champion", "text", ["A wonderful film.", "Dull, boring and far too long."]),
    "image": (f"models:/{IMAGE_EXAMPLE}@champion", "image", [b64(png()), b64(png(32, 48, color=30))]),
}
KINDS = {"text": text_kinds(), "image": image_kinds()}


def test_there_are_over_a_hundred_kinds_of_bad_request_in_all():
    assert sum(len(kinds) for kinds in KINDS.values()) >= 100


@pytest.fixture(scope="module")
def expected(text_example, image_example) -> dict[str, list[Any]]:
    """What each model in memory answers the good request."""
    answers = {}
    for name, (uri, column, good) in MODELS.items():
        answers[name] = fm.load_model(uri).predict(pd.DataFrame({column: good})).to_dict(orient="records")
        for record in answers[name]:
            record["top_probabilities"] = list(record["top_probabilities"])
    return answers


def both_models(start_one: Any, tracking: str) -> Iterator[dict[str, str]]:
    started = {name: start_one(uri, tracking) for name, (uri, _, _) in MODELS.items()}
    yield {name: url for name, (_, url) in started.items()}
    for process, _ in started.values():
        stop(process)


@pytest.fixture(scope="module")
def hardened_servers(tracking, text_example, image_example) -> Iterator[dict[str, str]]:
    """Both example models behind `mlflow-fullmodel serve`."""
    yield from both_models(serve_fullmodel, tracking)


@pytest.fixture(scope="module")
def mlflow_servers(tracking, text_example, image_example) -> Iterator[dict[str, str]]:
    """Both example models behind `mlflow models serve`."""
    yield from both_models(serve, tracking)


def post(url: str, body: bytes | str, content_type: str | None) -> requests.Response:
    headers = {"Content-Type": content_type} if content_type else {}
    return requests.post(f"{url}/invocations", data=body.encode() if isinstance(body, str) else body,
                         headers=headers, timeout=120)


def mlflow_decides(model: str, kind: str) -> bool:
    # A binary column's null fails MLflow's conversion of the column, without the row named.
    return kind in SERVER_DECIDES or (model == "image" and kind in ("null value", "a null among good rows"))


ALL = [(model, kind) for model, kinds in KINDS.items() for kind in kinds]
LEFT_TO_THE_MODEL = [(model, kind) for model, kind in ALL if not mlflow_decides(model, kind)]


@pytest.mark.parametrize("model, kind", ALL, ids=[f"{m}: {k}" for m, k in ALL])
def test_under_mlflow_fullmodel_serve_every_bad_request_is_a_clean_4xx(hardened_servers, expected, model, kind):
    check(hardened_servers[model], model, kind, expected[model])


@pytest.mark.parametrize("model, kind", LEFT_TO_THE_MODEL, ids=[f"{m}: {k}" for m, k in LEFT_TO_THE_MODEL])
def test_under_mlflow_models_serve_every_bad_request_it_leaves_to_the_model_is_a_clean_4xx(mlflow_servers, expected,
                                                                                            model, kind):
    check(mlflow_servers[model], model, kind, expected[model])


#: Put in every field of every kind of bad request: no answer of `mlflow-fullmodel serve` may hold it.
SECRET = "SECRET-TOKEN-123"
#: The names a request must use as they are: the protocol's keys and the models' own columns and params.
OWN_NAMES = {"dataframe_records", "dataframe_split", "columns", "data", "index", "inputs", "instances", "params",
             "text", "image", "k", "on_error", "tta", "seed"}


def with_secret(value: Any, model: str) -> Any:
    """``value`` (a parsed JSON body) with the secret in every string and every name of its own: an
    image's bytes carry it inside the file they encode, so that base64 stays base64."""
    if isinstance(value, str):
        decoded = _base64(value) if model == "image" else None
        return b64(SECRET.encode() + decoded) if decoded is not None else f"{SECRET} {value}"
    if isinstance(value, list):
        return [with_secret(item, model) for item in value]
    if isinstance(value, dict):
        return {(key if key in OWN_NAMES else f"{SECRET}-{key}"): with_secret(item, model) for key, item in value.items()}
    return value


def _base64(text: str) -> bytes | None:
    import base64
    import binascii

    try:
        return base64.b64decode(text, validate=True) if text else None
    except (binascii.Error, ValueError):
        return None


def secret_body(body: bytes | str, content_type: str | None, model: str) -> bytes:
    raw = body.encode() if isinstance(body, str) else body
    if content_type == JSON:
        try:
            return json.dumps(with_secret(json.loads(raw), model)).encode()
        except (ValueError, RecursionError):
            pass
    # Not JSON (or not valid JSON): the secret at the start of every line, the body otherwise as bad as it was.
    return b"\n".join(SECRET.encode() + b" " + line for line in raw.split(b"\n"))


@pytest.mark.parametrize("model, kind", ALL, ids=[f"{m}: {k}" for m, k in ALL])
def test_under_mlflow_fullmodel_serve_no_answer_holds_a_value_from_the_request(hardened_servers, model, kind):
    body, content_type, _, _ = KINDS[model][kind]
    response = post(hardened_servers[model], secret_body(body, content_type, model), content_type)
    assert response.status_code < 500, response.text[:500]
    # Whole, or cut short as pandas shows a long value.
    assert SECRET[:8] not in response.text, response.text[:1000]


def check(url: str, model: str, kind: str, expected: list[dict[str, Any]]) -> None:
    """The bad request gets a clean answer, and the next good request the model's own answer."""
    body, content_type, status, fragment = KINDS[model][kind]
    response = post(url, body, content_type)
    if status == 200 or (status is None and response.status_code == 200):
        assert len(response.json()["predictions"]) >= 1
    else:
        assert (response.status_code == status) if status else (400 <= response.status_code < 500), \
            (response.status_code, response.text[:500])
        error = response.json()
        message = error["message"]
        if fragment:
            assert fragment in message, message[:500]
        assert "stack_trace" not in error and "Traceback" not in message
        assert "site-packages" not in message and "/tmp/" not in message and "root:" not in message
        assert "Failed to predict data" not in message and len(response.content) < 5_000
    _, column, good = MODELS[model]
    answer = post(url, json.dumps({"dataframe_records": [{column: v} for v in good]}), JSON)
    assert answer.status_code == 200, answer.text[:500]
    for got, want in zip(answer.json()["predictions"], expected, strict=True):
        assert got["top_labels"] == want["top_labels"]
        assert got["top_probabilities"] == pytest.approx(want["top_probabilities"], rel=1e-5)
