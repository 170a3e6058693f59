"""``mlflow-fullmodel serve``: MLflow's own scoring app for a verified model, behind a guard.

What ``mlflow models serve`` does badly with hostile requests and a model flavor cannot fix: a
request without a Content-Type is a 500; nothing bounds the body or the nesting of its JSON;
error bodies carry a ``stack_trace`` with the server's paths and start with an echo of the whole
request; unknown params are dropped with a log line. ``Guard`` is a plain ASGI middleware around
the unchanged app (same payload formats, same answers) that answers those with a 4xx JSON body
``{"error_code": ..., "message": ...}`` and rewrites any error body to that shape.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import anyio.to_thread
import numpy as np

from mlflow_fullmodel import telemetry
from mlflow_fullmodel._mlflow import PREDICT_ECHO, SCHEMA_ECHO
from mlflow_fullmodel.settings import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_JSON_DEPTH

__all__ = ["Guard", "JsonProblem", "answer", "json_depth", "parse_json", "request_values", "sanitized", "scrubbed"]

_logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_MAX_MESSAGE_CHARS = 2000

_PATH = re.compile(r"(?<![\w:])(?:/[\w.@+-]+){2,}/?")
#: Request values shorter than this are not searched for in error messages: they would match
#: ordinary words of the message itself.
_MIN_SCRUBBED_CHARS = 6
#: pandas shows a long cell cut short; a value's opening characters are searched for too.
_SCRUBBED_PREFIX_CHARS = 12
#: A message longer than this is an echo of the request, whatever else it says.
_MAX_SCRUBBED_CHARS = 20_000
_REDACTED = "<request data>"
#: A JSON body up to this size is checked on the event loop (0.1-0.2 ms, less than the hop to a thread),
#: a larger one in a worker thread.
_INLINE_CHECK_BYTES = 16 * 1024


#: The bytes that matter to nesting: quote, backslash and brackets.
_STRUCTURAL = np.zeros(256, dtype=bool)
_STRUCTURAL[list(b'"\\[]{}')] = True


def json_depth(body: bytes, chunk_bytes: int = 1 << 20) -> int:
    """The deepest nesting of arrays and objects in a JSON text, counted without parsing it (the
    parser itself recurses, and a body nested 10,000 deep would exhaust its stack).

    Vectorised over chunks of ``chunk_bytes``, on the quotes, backslashes and brackets only: a
    64 MiB body takes a fraction of a second, in steps short enough that other threads (the
    server's event loop) get the interpreter between them. A quote counts unless an odd run of
    backslashes precedes it; brackets count outside strings. (Exact for valid JSON, where
    backslashes only occur inside strings; any other text fails to parse anyway.)
    """
    deepest = level = 0
    in_string = False
    carried = 0  # the run of backslashes that ended the previous chunk
    for start in range(0, len(body), chunk_bytes):
        chunk = np.frombuffer(body, dtype=np.uint8, count=min(chunk_bytes, len(body) - start), offset=start)
        where = np.flatnonzero(_STRUCTURAL[chunk])
        if not len(where):
            carried = 0
            continue
        symbols = chunk[where]
        backslash = symbols == 0x5C
        # A backslash continues a run when the byte just before it is a backslash too.
        adjacent = np.concatenate(([where[0] == 0], np.diff(where) == 1))
        previous_backslash = np.concatenate(([carried > 0], backslash[:-1]))
        continues = backslash & adjacent & previous_backslash
        order = np.arange(len(symbols))
        # Where each entry's run of backslashes began: -1 while it goes on from the previous chunk.
        run_start = np.maximum.accumulate(np.where(backslash & ~continues, order, -1))
        run = np.where(backslash, np.where(run_start < 0, order + 1 + carried, order - run_start + 1), 0)
        run_before = np.where(adjacent, np.concatenate(([carried], run[:-1])), 0)
        quotes = (symbols == 0x22) & (run_before % 2 == 0)
        outside = (np.cumsum(quotes) - quotes + in_string) % 2 == 0
        opens = (symbols == 0x5B) | (symbols == 0x7B)
        closes = (symbols == 0x5D) | (symbols == 0x7D)
        running = np.cumsum((outside & opens).astype(np.int64) - (outside & closes)) + level
        deepest = max(deepest, int(running.max()))
        level = int(running[-1])
        in_string = bool((int(quotes.sum()) + in_string) % 2)
        carried = int(run[-1]) if backslash[-1] and where[-1] == len(chunk) - 1 else 0
    return deepest


def sanitized(message: str) -> str:
    """An error message without MLflow's echo of the request, without file paths, of bounded size."""
    message = PREDICT_ECHO.sub("", message)  # MLflow's echo of the request (_mlflow)
    message = SCHEMA_ECHO.sub(lambda m: f"The request does not match the model's input schema {m['schema']}: ", message)
    message = _PATH.sub("<path>", message)
    return message if len(message) <= _MAX_MESSAGE_CHARS else message[:_MAX_MESSAGE_CHARS] + "... (cut)"


def scrubbed(message: str, values: Iterable[str], keep: Iterable[str] = ()) -> str:
    """``message`` with every value of the request in it (whole, or its opening characters as pandas
    shows a long cell) replaced, except the model's own names in ``keep``: an error answer never
    carries the request's data back, wherever in MLflow or the model the message was made."""
    if len(message) > _MAX_SCRUBBED_CHARS:
        return "The request was refused; the error message held the request's data and is withheld."
    kept = set(keep)
    for value in sorted({v for v in values if len(v) >= _MIN_SCRUBBED_CHARS and v not in kept}, key=len, reverse=True):
        for fragment in (value, value[:_SCRUBBED_PREFIX_CHARS]):
            if fragment in message and fragment not in kept:
                message = message.replace(fragment, _REDACTED)
    return message


def request_values(body: bytes, content_type: str) -> set[str]:
    """The strings a request body holds (JSON strings and keys, CSV cells, Parquet string cells),
    as far as it can be read; for a body that is none of these, its lines."""
    text = body.decode("utf-8", errors="replace")
    kind = content_type.split(";")[0].strip().lower()
    try:
        if kind == "application/json":
            return set(_json_strings(json.loads(text)))
        if kind == "text/csv":
            return {cell for row in csv.reader(io.StringIO(text)) for cell in row}
        if kind == "application/vnd.apache.parquet":
            import pandas as pd

            frame = pd.read_parquet(io.BytesIO(body))
            cells = {v for column in frame for v in frame[column] if isinstance(v, str)}
            return {str(c) for c in frame.columns} | cells
    except Exception:  # unreadable as its type: fall back to its lines and words between quotes
        pass
    return {line.strip() for line in text.splitlines()} | set(re.findall(r'"([^"\\]{6,})"', text))


def _json_strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _json_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _json_strings(item)


class Guard:
    """ASGI middleware for ``/invocations``: refuse what the app would mishandle, clean what it answers.

    Args:
        app: MLflow's scoring app.
        params: The model's runtime parameter names; any other name in ``"params"`` is refused.
        max_body_bytes: The largest request body read.
        max_json_depth: The deepest nesting of a JSON body.
        names: The model's own names (input columns, parameters): kept in error messages even where
            a request holds the same text.
    """

    def __init__(self, app: Any, params: Iterable[str], max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 max_json_depth: int = DEFAULT_MAX_JSON_DEPTH, names: Iterable[str] = ()) -> None:
        self.app = app
        self.params = sorted(params)
        self.max_body_bytes = max_body_bytes
        self.max_json_depth = max_json_depth
        self.names = sorted(set(names) | set(self.params))

    def around(self, app: Any) -> Guard:
        """The same checks and limits around another app (the event stream of ``streaming.py``)."""
        return Guard(app, self.params, self.max_body_bytes, self.max_json_depth, self.names)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != "/invocations" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        content_type = headers.get(b"content-type", b"").decode("latin-1").strip()
        body = await self.read_body(scope, receive, send)
        if body is None:
            return
        if not content_type:
            await answer(send, 415, "BAD_REQUEST", "The request has no Content-Type header; send application/json "
                          "(or text/csv, or application/vnd.apache.parquet).")
            return
        if content_type.split(";")[0].strip().lower() == "application/json":
            # A large body off the event loop: scanning and parsing it takes long enough to hold up
            # every other request the server is answering. A small one costs less than the hop.
            if len(body) <= _INLINE_CHECK_BYTES:
                problem = self._json_problem(body)
            else:
                problem = await anyio.to_thread.run_sync(self._json_problem, body)
            if problem is not None:
                reason, message = problem
                telemetry.refused(reason)
                await answer(send, 400, "INVALID_PARAMETER_VALUE", message)
                return

        async def replay() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        start: Message = {}
        chunks: list[bytes] = []
        streaming = False

        async def capture(message: Message) -> None:
            nonlocal streaming
            if message["type"] == "http.response.start":
                start.update(message)
                # An event stream (streaming.py) goes out as it is made: its errors before the
                # first event are answered as any other error below, those after it are its own.
                streaming = int(message["status"]) < 400 and _is_event_stream(message)
                if streaming:
                    await send(message)
            elif streaming:
                await send(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, replay, capture)
        if streaming:
            return
        status = int(start.get("status", 500))
        payload = b"".join(chunks)
        if status < 400:
            await send(start)
            await send({"type": "http.response.body", "body": payload})
            return
        error_code, message = _error_of(payload, status)
        message = await anyio.to_thread.run_sync(
            lambda: scrubbed(message, request_values(body, content_type), self.names))
        await answer(send, status, error_code, message)

    async def read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The request's whole body; or None, once it has answered a 400 (a Content-Length that is
        no number) or a 413 (a body over ``max_body_bytes``)."""
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        declared = headers.get(b"content-length", b"").decode("latin-1").strip()
        if declared and not declared.isdigit():
            await answer(send, 400, "BAD_REQUEST", "The Content-Length header is not a number of bytes.")
            return None
        # Refused before a byte of the body is read: the client has said how large it is.
        if declared and int(declared) > self.max_body_bytes:
            await self._too_large(send)
            return None
        body = await self._read_body(receive)
        if body is None:
            await self._too_large(send)
        return body

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None as soon as it passes ``max_body_bytes`` (a chunked body has no
        Content-Length to refuse it by)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, send: Send) -> None:
        telemetry.refused("limit")
        await answer(send, 413, "BAD_REQUEST", f"The request body is over {self.max_body_bytes} bytes, the limit of "
                      "this server (mlflow-fullmodel serve --max-body-bytes).")

    def _json_problem(self, body: bytes) -> tuple[str, str] | None:
        """What is wrong with a JSON body, if anything: (``telemetry.REFUSALS`` reason, message)."""
        try:
            payload = parse_json(body, self.max_json_depth)
        except JsonProblem as problem:
            return problem.reason, problem.message
        # With on_error="return" a null row is answered with its error, except where MLflow would
        # have turned it into the text "None" first.
        returns_errors = isinstance(payload, dict) and isinstance(payload.get("params"), dict) and \
            payload["params"].get("on_error") == "return"
        null = _first_null(payload, ("inputs", "instances") if returns_errors else _ROW_KEYS, self.names)
        if null is not None:
            return "bad_input", null
        given = payload.get("params") if isinstance(payload, dict) else None
        if given is not None:
            if not isinstance(given, dict):
                return "bad_input", ('"params" must be an object of parameter names and values, got '
                                     f"{type(given).__name__}.")
            unknown = sorted(set(given) - set(self.params))
            if unknown:
                return "bad_input", _unknown_params(unknown, self.params)
        return None


class JsonProblem(ValueError):
    """A JSON body refused before it is parsed or while it is: why (``reason``, one of
    ``telemetry.REFUSALS``) and what to tell the client (``message``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def parse_json(body: bytes, max_json_depth: int) -> Any:
    """A JSON body parsed, after its nesting is checked against ``max_json_depth`` without parsing
    it; a key repeated in one object is refused (JSON parsers disagree on which value wins).

    Raises:
        JsonProblem: The body is nested too deep, is not JSON, or repeats a key.
    """
    # Each level opens with a bracket: a body with no more of them than the limit needs no scan.
    if body.count(b"[") + body.count(b"{") > max_json_depth and (depth := json_depth(body)) > max_json_depth:
        raise JsonProblem("limit", f"The JSON body is nested {depth} levels deep, over the limit of {max_json_depth} "
                          "(mlflow-fullmodel serve --max-json-depth).")
    try:
        return json.loads(body, object_pairs_hook=_unique_keys)
    except _DuplicateKey as error:
        raise JsonProblem("bad_input", str(error)) from None
    except (ValueError, RecursionError) as error:  # invalid UTF-8 or JSON, an integer of 5,000 digits
        raise JsonProblem("bad_input", f"The body is not valid JSON: {sanitized(str(error))[:300]}") from None


def _unknown_params(unknown: list[str], valid: list[str]) -> str:
    """Which parameters a request got wrong, without repeating its names back (they are its data)."""
    hints = [f"'{name}'" for name in valid if any(u.lower() == name.lower() for u in unknown)]
    hint = f" Names are case-sensitive: did you mean {', '.join(hints)}?" if hints else ""
    return f"{len(unknown)} unknown parameter(s) in \"params\". Valid parameters are: {valid}.{hint}"


#: The JSON keys that hold a request's rows.
_ROW_KEYS = ("dataframe_records", "dataframe_split", "inputs", "instances")


def _first_null(payload: Any, keys: tuple[str, ...] = _ROW_KEYS, names: Iterable[str] = ()) -> str | None:
    """A message naming the first null value among the request's rows: MLflow's server turns a null
    into the text "None" (``inputs``, ``instances``) or fails to convert its column without
    naming the row, before the model sees it."""
    if not isinstance(payload, dict):
        return None
    for key, rows in payload.items():
        if key == "dataframe_split" and isinstance(rows, dict):
            columns, data = rows.get("columns"), rows.get("data")
            if isinstance(columns, list) and isinstance(data, list):
                rows = [dict(zip(columns, row)) if isinstance(row, list) else row for row in data]
        if isinstance(rows, dict) and key in ("inputs", "instances"):  # columns: {"text": [...]}
            length = max((len(v) for v in rows.values() if isinstance(v, list)), default=0)
            rows = [{c: v[i] if i < len(v) else None for c, v in rows.items() if isinstance(v, list)}
                    for i in range(length)]
        if key not in keys or not isinstance(rows, list):
            continue
        for index, row in enumerate(rows):
            if row is None:
                return f"Row {index} of \"{key}\" is null: value is missing (null)."
            if isinstance(row, dict):
                for column, value in row.items():
                    if value is None:
                        shown = f"column '{column}'" if column in names else "a column the model does not take"
                        return f"Row {index}, {shown}: value is missing (null)."
    return None


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refused if a key repeats: JSON parsers disagree on which value wins."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey("The JSON body has a key twice in one object; send each key once.")
        result[key] = value
    return result


def _is_event_stream(start: Message) -> bool:
    """Whether a response (its ``http.response.start``) is server-sent events."""
    return any(key.lower() == b"content-type" and value.split(b";")[0].strip().lower() == b"text/event-stream"
               for key, value in start.get("headers", []))


def _error_of(payload: bytes, status: int) -> tuple[str, str]:
    try:
        error = json.loads(payload)
    except ValueError:
        error = None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error.get("error_code") or "BAD_REQUEST"), sanitized(error["message"])
    text = payload.decode("utf-8", errors="replace").strip()
    return ("INTERNAL_ERROR" if status >= 500 else "BAD_REQUEST"), sanitized(text or f"HTTP {status}")


async def answer(send: Send, status: int, error_code: str, message: str,
                 headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """Answer an error: ``{"error_code": ..., "message": ...}`` with ``status``."""
    body = json.dumps({"error_code": error_code, "message": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})
