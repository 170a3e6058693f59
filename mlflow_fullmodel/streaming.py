"""Server-sent events for generation models: ``POST /invocations`` with ``Accept: text/event-stream``.

The request is the one ``/invocations`` takes (same body, same formats, same params), for one row,
and goes through the same ``hardened.Guard`` checks (body size, JSON depth, unknown params, nulls)
and the same ``serving.ServedModel`` rules (limits, admission, deadline). The answer is a stream of
events, one per decoding step, each a complete answer in ``/invocations``' shape::

    data: {"predictions": [{"translation": "one thousand", "candidates": [...], "scores": [...]}]}

and the last one is exactly the answer ``/invocations`` gives. An error before the first event is
answered as ``/invocations`` answers it (a 4xx/5xx JSON body); one after it ends the stream with an
``event: error`` whose data is the JSON error body (``error_code``, ``message``, ``request_id``).

The decoding runs in a worker thread (the scoring server's pool, as ``/invocations``' predict
does), at most ``_AHEAD`` events ahead of what has been sent. When the client goes away (ASGI
``http.disconnect``, or a send that fails) the thread stops before the next decoding step and
closes the model's stream, which ends the decoding.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import anyio.to_thread
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from mlflow_fullmodel import telemetry
from mlflow_fullmodel._mlflow import InvocationRefused, parse_invocation
from mlflow_fullmodel.hardened import Message, Receive, Scope, Send, request_values, sanitized, scrubbed
from mlflow_fullmodel.pipeline import brief
from mlflow_fullmodel.serving import ServingError

__all__ = ["EVENT_STREAM", "respond", "wants_events"]

_logger = logging.getLogger(__name__)

EVENT_STREAM = "text/event-stream"
#: How many events the decoding may make before the client has been sent the earlier ones: enough
#: that a step never waits for the network, few enough that a client gone away costs little work.
_AHEAD = 2


def wants_events(scope: Scope) -> bool:
    """Whether a request's ``Accept`` header asks for server-sent events (``text/event-stream``,
    with no ``q=0``)."""
    for key, value in scope.get("headers", []):
        if key.lower() != b"accept":
            continue
        for media_range in value.decode("latin-1").split(","):
            media, *parameters = (part.strip().lower() for part in media_range.split(";"))
            if media == EVENT_STREAM and not any(p.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000")
                                                 for p in parameters):
                return True
    return False


async def respond(scope: Scope, receive: Receive, send: Send, served: Any) -> None:
    """Answer ``POST /invocations`` as an event stream, with ``served`` (a ``rollout.ServedVersion``):
    its Guard's checks around the stream of its loaded pyfunc model's ``predict_stream``."""
    guard = served.app
    await guard.around(_EventStream(served.model, guard.names, receive))(scope, receive, send)


class _EventStream:
    """The ASGI app behind the Guard: the checked body parsed as the scoring server parses it, the
    model's ``predict_stream`` run in a worker thread, its events sent as they come.

    Args:
        model: The loaded pyfunc model.
        names: The model's own names, kept in error messages (``hardened.scrubbed``).
        client: The client's own ``receive``, which says when it disconnects (the Guard hands this
            app a replay of the body instead).
    """

    def __init__(self, model: Any, names: list[str], client: Receive) -> None:
        self.model = model
        self.names = names
        self.client = client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = (await receive()).get("body", b"")
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        content_type = headers.get(b"content-type", b"").decode("latin-1").strip()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        stop = threading.Event()
        credits = threading.Semaphore(_AHEAD)

        def put(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        def produce() -> None:
            stream: Iterator[dict[str, Any]] | None = None
            try:
                data, params = parse_invocation(body, content_type, self.model)
                rows = _rows(data)
                if rows != 1:
                    raise ServingError(f"A streamed request answers one row, got {rows}; send each row as a request "
                                       "of its own, or ask for the whole answer without 'Accept: text/event-stream'.",
                                       INVALID_PARAMETER_VALUE)
                stream = iter(self.model.predict_stream(data, params))
                while True:
                    credits.acquire()
                    if stop.is_set():
                        put("gone", None)
                        return
                    try:
                        answer = next(stream)
                    except StopIteration:
                        put("end", None)
                        return
                    put("event", answer)
            except Exception as error:
                put("error", error)
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()  # the decoding stops before its next step

        def gone() -> None:
            stop.set()
            credits.release()  # a producer waiting for a credit sees the stop

        worker = asyncio.ensure_future(asyncio.to_thread(produce))  # copies the request's telemetry context
        watcher = asyncio.ensure_future(self._watch(gone))
        started = False
        try:
            while True:
                kind, value = await events.get()
                if kind == "event":
                    if not started:
                        await send({"type": "http.response.start", "status": 200, "headers": [
                            (b"content-type", EVENT_STREAM.encode()), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]})
                        started = True
                    await send({"type": "http.response.body", "body": _event(value), "more_body": True})
                    credits.release()
                elif kind == "end":
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    return
                elif kind == "gone":  # the client went away: nobody to answer
                    return
                elif started:
                    await send({"type": "http.response.body", "more_body": False,
                                "body": await self._error_event(value, body, content_type)})
                    return
                else:  # as /invocations answers it: the Guard makes the JSON error body
                    status, payload, media = _error_answer(value)
                    await send({"type": "http.response.start", "status": status,
                                "headers": [(b"content-type", media)]})
                    await send({"type": "http.response.body", "body": payload})
                    return
        except OSError:  # the client went away under a send
            return
        finally:
            gone()
            watcher.cancel()
            await asyncio.wait([worker])  # the decoding has stopped when the request ends

    async def _watch(self, gone: Any) -> None:
        while True:
            message: Message = await self.client()
            if message["type"] == "http.disconnect":
                gone()
                return

    async def _error_event(self, error: Exception, body: bytes, content_type: str) -> bytes:
        """``event: error`` with the JSON error body a failed ``/invocations`` gets: scrubbed of the
        request's data, without a trace."""
        _, payload, _ = _error_answer(error)
        detail = json.loads(payload)
        message = sanitized(str(detail.get("message", "")))
        message = await anyio.to_thread.run_sync(
            lambda: scrubbed(message, request_values(body, content_type), self.names))
        record = telemetry.current()
        data = {"error_code": detail.get("error_code", "INTERNAL_ERROR"), "message": message,
                **({"request_id": record.request_id} if record is not None else {})}
        return b"event: error\ndata: " + json.dumps(data).encode() + b"\n\n"


def _event(answer: dict[str, Any]) -> bytes:
    """One event: the answer as ``/invocations`` gives it, ``{"predictions": [row]}``."""
    return b"data: " + json.dumps({"predictions": [answer]}).encode() + b"\n\n"


def _rows(data: Any) -> int:
    """How many rows the scoring server's parse of a request holds (a DataFrame, a list of rows,
    or a dict of columns)."""
    if isinstance(data, dict):
        lengths = {len(v) if isinstance(v, (list, tuple)) else 1 for v in data.values()}
        return max(lengths, default=0)
    try:
        return len(data)
    except TypeError:
        return 1


def _error_answer(error: Exception) -> tuple[int, bytes, bytes]:
    """The status, body and content type the scoring server gives ``error``."""
    if isinstance(error, InvocationRefused):
        return error.status, error.text.encode(), b"text/plain"
    if isinstance(error, MlflowException):
        return error.get_http_status_code(), error.serialize_as_json().encode(), b"application/json"
    # Not raised by the model's predict_stream (ServedModel makes every error of the model a
    # ServingError): a bug on the way to it; its traceback goes to the log only.
    _logger.error("Streaming failed", exc_info=error)
    body = {"error_code": "INTERNAL_ERROR", "message": f"Model error (not caused by the request): {brief(error)}"}
    return 500, json.dumps(body).encode(), b"application/json"
