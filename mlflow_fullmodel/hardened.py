"""``mlflow-fullmodel serve``: MLflow's own scoring app for a verified model, behind a guard.

What ``mlflow models serve`` does badly with hostile requests and a model flavor cannot fix: a
request without a Content-Type is a 500; nothing bounds the body or the nesting of its JSON;
error bodies carry a ``stack_trace`` with the server's paths and start with an echo of the whole
request; unknown params are dropped with a log line. ``Guard`` is a plain ASGI middleware around
the unchanged app (same payload formats, same answers) that answers those with a 4xx JSON body
``{"error_code": ..., "message": ...}`` and rewrites any error body to that shape.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

__all__ = ["Guard", "json_depth", "serve_verified"]

_logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_JSON_DEPTH = 32
_MAX_MESSAGE_CHARS = 2000

# MLflow's scoring server prefixes messages with "Failed to predict data '<the request>'. \nError: ".
_ECHO = re.compile(r"^Failed to predict data .*?\nError: ", re.DOTALL)
_PATH = re.compile(r"(?<![\w:])(?:/[\w.@+-]+){2,}/?")


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text, counted without parsing it (the
    parser itself recurses, and a body nested 10,000 deep would exhaust its stack)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def sanitized(message: str) -> str:
    """An error message without MLflow's echo of the request, without file paths, of bounded size."""
    message = _PATH.sub("<path>", _ECHO.sub("", message))
    return message if len(message) <= _MAX_MESSAGE_CHARS else message[:_MAX_MESSAGE_CHARS] + "... (cut)"


class Guard:
    """ASGI middleware for ``/invocations``: refuse what the app would mishandle, clean what it answers.

    Args:
        app: MLflow's scoring app.
        params: The model's runtime parameter names; any other name in ``"params"`` is refused.
        max_body_bytes: The largest request body read.
        max_json_depth: The deepest nesting of a JSON body.
    """

    def __init__(self, app: Any, params: Iterable[str], max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 max_json_depth: int = DEFAULT_MAX_JSON_DEPTH) -> None:
        self.app = app
        self.params = sorted(params)
        self.max_body_bytes = max_body_bytes
        self.max_json_depth = max_json_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != "/invocations" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        content_type = headers.get(b"content-type", b"").decode("latin-1").strip()
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                await _answer(send, 413, "BAD_REQUEST", f"The request body is over {self.max_body_bytes} bytes, the "
                              "limit of this server (mlflow-fullmodel serve --max-body-bytes).")
                return
            if not message.get("more_body", False):
                break
        if not content_type:
            await _answer(send, 415, "BAD_REQUEST", "The request has no Content-Type header; send application/json "
                          "(or text/csv, or application/vnd.apache.parquet).")
            return
        if content_type.split(";")[0].strip().lower() == "application/json":
            problem = self._json_problem(body)
            if problem is not None:
                await _answer(send, 400, "INVALID_PARAMETER_VALUE", problem)
                return

        async def replay() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        start: Message = {}
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, replay, capture)
        status = int(start.get("status", 500))
        payload = b"".join(chunks)
        if status < 400:
            await send(start)
            await send({"type": "http.response.body", "body": payload})
            return
        await _answer(send, status, *_error_of(payload, status))

    def _json_problem(self, body: bytes) -> str | None:
        depth = json_depth(body)
        if depth > self.max_json_depth:
            return (f"The JSON body is nested {depth} levels deep, over the limit of {self.max_json_depth} "
                    "(mlflow-fullmodel serve --max-json-depth).")
        try:
            payload = json.loads(body, object_pairs_hook=_unique_keys)
        except _DuplicateKey as error:
            return str(error)
        except (ValueError, RecursionError) as error:  # invalid UTF-8 or JSON, an integer of 5,000 digits
            return f"The body is not valid JSON: {sanitized(str(error))[:300]}"
        # With on_error="return" a null row is answered with its error, except where MLflow would
        # have turned it into the text "None" first.
        returns_errors = isinstance(payload, dict) and isinstance(payload.get("params"), dict) and \
            payload["params"].get("on_error") == "return"
        null = _first_null(payload, ("inputs", "instances") if returns_errors else _ROW_KEYS)
        if null is not None:
            return null
        given = payload.get("params") if isinstance(payload, dict) else None
        if given is not None:
            if not isinstance(given, dict):
                return f'"params" must be an object of parameter names and values, got {type(given).__name__}.'
            unknown = sorted(set(given) - set(self.params))
            if unknown:
                return f"Unknown parameter(s) {unknown}. Valid parameters are: {self.params}."
        return None


#: The JSON keys that hold a request's rows.
_ROW_KEYS = ("dataframe_records", "dataframe_split", "inputs", "instances")


def _first_null(payload: Any, keys: tuple[str, ...] = _ROW_KEYS) -> str | None:
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
            rows = [{c: v[i] if i < len(v) else None for c, v in rows.items() if isinstance(v, list)} for i in range(length)]
        if key not in keys or not isinstance(rows, list):
            continue
        for index, row in enumerate(rows):
            if row is None:
                return f"Row {index} of \"{key}\" is null: value is missing (null)."
            if isinstance(row, dict):
                for column, value in row.items():
                    if value is None:
                        return f"Row {index}, column {sanitized(str(column))[:100]!r}: value is missing (null)."
    return None


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refused if a key repeats: JSON parsers disagree on which value wins."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(f"The JSON body has the key {sanitized(key)[:100]!r} twice in one object; send it once.")
        result[key] = value
    return result


def _error_of(payload: bytes, status: int) -> tuple[str, str]:
    try:
        error = json.loads(payload)
    except ValueError:
        error = None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error.get("error_code") or "BAD_REQUEST"), sanitized(error["message"])
    text = payload.decode("utf-8", errors="replace").strip()
    return ("INTERNAL_ERROR" if status >= 500 else "BAD_REQUEST"), sanitized(text or f"HTTP {status}")


async def _answer(send: Send, status: int, error_code: str, message: str) -> None:
    body = json.dumps({"error_code": error_code, "message": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def serve_verified(model_path: str, host: str, port: int, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                   max_json_depth: int = DEFAULT_MAX_JSON_DEPTH) -> None:
    """Serve the local, already verified MLflow model at ``model_path`` until interrupted: MLflow's
    scoring app, as ``mlflow models serve`` runs it (one worker), behind ``Guard``."""
    import uvicorn
    from mlflow.pyfunc import scoring_server

    # As under `mlflow models serve`: the model sees that it is in a scoring server (threads, tuning).
    os.environ[scoring_server._SERVER_MODEL_PATH] = model_path
    model = scoring_server.load_model_with_mlflow_config(model_path)
    schema = model.metadata.get_params_schema()
    params = [spec.name for spec in schema.params] if schema is not None else []
    app = Guard(scoring_server.init(model), params, max_body_bytes, max_json_depth)
    uvicorn.run(app, host=host, port=port, log_level="info")
