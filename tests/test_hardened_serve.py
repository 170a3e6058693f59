"""`mlflow-fullmodel serve`: the model verified, then MLflow's scoring app behind a guard. Every kind
of bad request gets a 4xx JSON body naming the problem, without trace, path or echo; good ones get
the answers `mlflow models serve` gives."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st
from servers import leftover_processes, serve_fullmodel, server_log, stop
from support import EXAMPLE_TEXTS

from mlflow_fullmodel.hardened import Guard, JsonProblem, json_depth, parse_json, sanitized

MAX_BODY = 1_000_000


@pytest.fixture(scope="module")
def hardened_server(tracking, registered_reviews):
    process, url = serve_fullmodel("models:/reviews@champion", tracking, "--max-body-bytes", str(MAX_BODY))
    yield url, process
    stop(process)


def post(url: str, body: bytes | str, content_type: str | None = "application/json") -> requests.Response:
    headers = {"Content-Type": content_type} if content_type else {}
    data = body.encode() if isinstance(body, str) else body
    return requests.post(f"{url}/invocations", data=data, headers=headers, timeout=60)


def post_when_ready(url: str, body: str, seconds: float = 300) -> requests.Response:
    """``post``, again while a worker answers 503 "not ready": with several workers, /ready answered
    by one says nothing of the others, each loading the model on its own."""
    deadline = time.monotonic() + seconds
    while True:
        response = post(url, body)
        if response.status_code != 503 or time.monotonic() > deadline:
            return response
        time.sleep(0.5)


def records(*texts) -> str:
    return json.dumps({"dataframe_records": [{"text": t} for t in texts]})


BAD = {
    "no content type": (records("good"), None, 415, "no Content-Type header"),
    "unknown content type": (records("good"), "text/plain", 415, None),
    "JSON nested 10,000 deep": ("[" * 10_000 + "]" * 10_000, "application/json", 400, "nested 10000 levels deep"),
    "a 5,000-digit integer": ('{"inputs": [' + "9" * 5_000 + "]}", "application/json", 400, "not valid JSON"),
    "body over the cap": (json.dumps({"inputs": ["good " * 300_000]}), "application/json", 413, "over 1000000 bytes"),
    "unknown param": (json.dumps({"inputs": ["good"], "params": {"temperature": 0.5}}), "application/json", 400,
                      '1 unknown parameter(s) in "params". Valid parameters are: [\'k\', \'on_error\'].'),
    "misspelled param": (json.dumps({"inputs": ["good"], "params": {"K": 3}}), "application/json", 400,
                         "Names are case-sensitive: did you mean 'k'?"),
    "params not an object": (json.dumps({"inputs": ["good"], "params": [1]}), "application/json", 400,
                             '"params" must be an object'),
    "invalid JSON": ("{not json", "application/json", 400, "not valid JSON"),
    "invalid UTF-8": (b'{"inputs": ["\xff\xfe"]}', "application/json", 400, None),
    "garbage parquet": (b"PAR1 garbage garbage", "application/vnd.apache.parquet", 400, None),
    "CSV with bad quoting": ('text\n"unterminated', "text/csv", 400, None),
    "empty text": (records(""), "application/json", 400, "Row 0: preprocess[1] SentencePieceEncode: the text has no tokens"),
    "null text": (records(None), "application/json", 400, "Row 0, column 'text': value is missing (null)."),
    "NaN text": ('{"dataframe_records": [{"text": NaN}]}', "application/json", 400, None),
    "k out of bounds": (json.dumps({"inputs": ["good"], "params": {"k": 7}}), "application/json", 400,
                        "Parameter 'k' must be <= 2, got 7."),
    "text over max_text_chars": (records("great " * 20_000), "application/json", 400,
                                 "over the limit max_text_chars=100000"),
    "missing column": (json.dumps({"dataframe_records": [{"review": "good"}]}), "application/json", 400, None),
    "a number for a text": (json.dumps({"dataframe_records": [{"text": 42}]}), "application/json", 400,
                            "Row 0, column 'text': expected a string, got an integer."),
    "true for a text": (json.dumps({"dataframe_records": [{"text": "good"}, {"text": True}]}), "application/json", 400,
                        "Row 1, column 'text': expected a string, got true/false."),
}


@pytest.mark.slow
@pytest.mark.parametrize("body, content_type, status, message", BAD.values(), ids=BAD.keys())
def test_every_kind_of_bad_request_gets_a_clean_4xx_and_the_server_keeps_serving(hardened_server, body, content_type,
                                                                                 status, message):
    url, process = hardened_server
    response = post(url, body, content_type)
    assert response.status_code == status, response.text[:500]
    error = response.json()
    # The id names the request's line in the access log (test_operations).
    assert set(error) == {"error_code", "message", "request_id"}
    assert error["request_id"] == response.headers["X-Request-ID"]
    assert "Traceback" not in error["message"] and "site-packages" not in error["message"]
    assert "Failed to predict data" not in error["message"] and len(response.content) < 3_000
    if message is not None:
        assert message in error["message"]
    assert process.poll() is None, server_log(process)
    assert post(url, records(*EXAMPLE_TEXTS)).status_code == 200


def answer_without_the_whole_body(url: str, head: bytes, parts: list[bytes], timeout: float = 60) -> bytes:
    """Send a request's head and the first ``parts`` of its body, never the rest, and read the
    answer's status line: a server that waited for the whole body would never answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as connection:
        try:
            connection.sendall(head)
            for part in parts:
                connection.sendall(part)
        except OSError:  # the server answered and closed while the body was still coming
            pass
        answer = b""
        while b"\r\n" not in answer:
            chunk = connection.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer


@pytest.mark.slow
def test_a_body_declared_over_the_limit_is_refused_before_it_is_read(hardened_server):
    url, process = hardened_server
    head = (b"POST /invocations HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (70 * 2**20))
    assert answer_without_the_whole_body(url, head, [b'{"inputs": ["' + b"x" * 1000]).startswith(b"HTTP/1.1 413")
    assert process.poll() is None and post(url, records(*EXAMPLE_TEXTS)).status_code == 200


@pytest.mark.slow
def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit(hardened_server):
    url, process = hardened_server
    head = (b"POST /invocations HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"x" * 100_000
    # Eleven chunks pass 1,000,000 bytes; the last chunk (size 0) that ends the body is never sent.
    parts = [b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(11)]
    assert answer_without_the_whole_body(url, head, parts).startswith(b"HTTP/1.1 413")
    assert process.poll() is None and post(url, records(*EXAMPLE_TEXTS)).status_code == 200


@pytest.mark.slow
def test_serve_with_two_workers_answers_from_each_as_from_one(tracking, registered_reviews, hardened_server):
    url_one, _ = hardened_server
    process, url = serve_fullmodel("models:/reviews@champion", tracking, "--workers", "2")
    try:
        workers = [pid for pid, command in leftover_processes(process.pid) if "multiprocessing" in command
                   and "resource_tracker" not in command]
        assert len(workers) == 2, leftover_processes(process.pid)
        bodies = [records(*EXAMPLE_TEXTS), json.dumps({"inputs": EXAMPLE_TEXTS, "params": {"k": 2}})] * 4
        for body in bodies:
            assert post_when_ready(url, body).json() == post(url_one, body).json()
        refused = post_when_ready(url, json.dumps({"dataframe_records": [{"text": 42}]}))
        assert refused.status_code == 400 and "expected a string" in refused.json()["message"]
    finally:
        stop(process)


@pytest.mark.slow
def test_good_requests_get_the_answers_of_mlflow_models_serve(hardened_server, champion_server):
    url, _ = hardened_server
    for body in (records(*EXAMPLE_TEXTS), json.dumps({"inputs": EXAMPLE_TEXTS, "params": {"k": 2}}),
                 json.dumps({"instances": EXAMPLE_TEXTS, "params": {"on_error": "return"}})):
        ours, theirs = post(url, body), post(champion_server, body)
        assert ours.status_code == theirs.status_code == 200
        assert ours.json() == theirs.json()
    csv = "text\n" + "\n".join(f'"{t}"' for t in EXAMPLE_TEXTS)
    assert post(url, csv, "text/csv").json() == post(champion_server, csv, "text/csv").json()


@pytest.mark.slow
def test_with_on_error_return_a_null_row_is_answered_with_its_error_as_mlflow_models_serve_answers_it(
    hardened_server, champion_server
):
    url, _ = hardened_server
    body = json.dumps({"dataframe_records": [{"text": "good"}, {"text": None}], "params": {"on_error": "return"}})
    ours, theirs = post(url, body), post(champion_server, body)
    assert ours.status_code == theirs.status_code == 200
    assert ours.json() == theirs.json()
    assert ours.json()["predictions"][1]["error"] == "Row 1, column 'text': value is missing (null)."
    # In "instances" MLflow would have made the null the text "None": refused, whatever on_error says.
    refused = post(url, json.dumps({"instances": ["good", None], "params": {"on_error": "return"}}))
    assert refused.status_code == 400 and "Row 1 of \"instances\" is null" in refused.json()["message"]


@pytest.mark.slow
def test_serve_refuses_a_model_that_fails_verification(tracking, tmp_path):
    import subprocess

    (tmp_path / "not-a-model").mkdir()
    result = subprocess.run([sys.executable, "-m", "mlflow_fullmodel.cli", "serve", str(tmp_path / "not-a-model")],
                            capture_output=True, text=True, timeout=120, env=dict(os.environ, MLFLOW_TRACKING_URI=tracking))
    assert result.returncode == 1 and result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1


@pytest.mark.parametrize("body, depth", [(b"[]", 1), (b'{"a": [[1], {"b": "[[[["}]}', 3), (b'"[\\"[["', 0),
                                         (b"[" * 50 + b"]" * 50, 50)])
def test_json_depth_counts_brackets_outside_strings(body, depth):
    assert json_depth(body) == depth


def _nesting(value) -> int:
    if isinstance(value, list):
        return 1 + max((_nesting(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_nesting(v) for v in value.values()), default=0)
    return 0


_TRICKY = st.text(alphabet='[]{}"\\ax,:', max_size=8)  # strings full of what a scan could miscount
_JSON = st.recursive(st.none() | st.integers() | _TRICKY,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TRICKY, inner, max_size=3),
                     max_leaves=20)


@given(value=_JSON, chunk_bytes=st.sampled_from([1, 2, 3, 5, 64, 1 << 20]))
def test_json_depth_is_the_nesting_of_any_json_text_whatever_its_chunks(value, chunk_bytes):
    assert json_depth(json.dumps(value).encode(), chunk_bytes) == _nesting(value)


@given(value=_JSON, limit=st.integers(0, 5))
def test_parse_json_refuses_exactly_the_bodies_nested_over_the_limit(value, limit):
    body = json.dumps(value).encode()
    if _nesting(value) > limit:
        with pytest.raises(JsonProblem, match=f"nested {_nesting(value)} levels deep") as refused:
            parse_json(body, limit)
        assert refused.value.reason == "limit"
    else:
        assert parse_json(body, limit) == value


def test_a_large_body_is_checked_off_the_event_loop_while_small_requests_are_answered():
    async def app(scope, receive, send):  # answers at once: the guard's own work is what is measured
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    guard = Guard(app, params=[], max_body_bytes=128 * 2**20)
    big = json.dumps({"inputs": ["a wonderful film, " * 8] * 500_000}).encode()
    assert len(big) > 64 * 2**20

    async def call(body: bytes) -> int:
        sent: list[dict] = []
        scope = {"type": "http", "path": "/invocations", "method": "POST",
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            sent.append(message)

        await guard(scope, receive, send)
        return sent[0]["status"]

    async def main() -> tuple[list[int], bool, int]:
        large = asyncio.create_task(call(big))
        await asyncio.sleep(0)  # the large request starts: its checks go to a worker thread
        small = [await call(b'{"inputs": ["a good film"]}') for _ in range(20)]
        return small, large.done(), await large

    small, large_done_first, large_status = asyncio.run(main())
    assert small == [200] * 20 and large_status == 200
    assert not large_done_first  # the small requests did not wait for the large one's checks


def test_sanitized_messages_lose_the_echo_and_the_paths():
    message = ("Failed to predict data '      text\n0  huge'. \nError: Row 0: bad in "
               "/usr/lib/python3/site-packages/x.py and /tmp/a/b")
    assert sanitized(message) == "Row 0: bad in <path> and <path>"
    assert sanitized("x" * 5000).endswith("... (cut)") and len(sanitized("x" * 5000)) < 2100
