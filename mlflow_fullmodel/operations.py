"""The operator's side of ``mlflow-fullmodel serve``: one ASGI app in front of the model's own.

For every request: an id (``X-Request-ID``, taken from the request or made), returned on the
answer and in any error body; a ``telemetry.RequestRecord`` gathered while it runs; one JSON line
in the access log and one ``metrics.ServerMetrics.observe`` when it ends. Its own routes:
``/metrics`` (Prometheus), ``/ready`` (200 once a verified model is loaded and warmed, else 503),
``/ping`` and ``/health`` (alive, as in MLflow's server), the Open Inference Protocol under ``/v2``
(``oip``). Everything else goes to the version the ``rollout.ModelSlot`` holds when the request
arrives, and is a 503 while there is none yet.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from mlflow_fullmodel import oip, streaming, telemetry
from mlflow_fullmodel.hardened import Message, Receive, Scope, Send, answer
from mlflow_fullmodel.metrics import CONTENT_TYPE, ServerMetrics
from mlflow_fullmodel.rollout import ModelSlot

__all__ = ["ACCESS_LOGGER", "Operations", "REQUEST_ID_HEADER", "VERSION_HEADER"]

#: The logger of the access log: one JSON object a line, one line a request.
ACCESS_LOGGER = "mlflow_fullmodel.access"
REQUEST_ID_HEADER = "x-request-id"
#: The registered version that answered, on every answer of the model.
VERSION_HEADER = "x-model-version"

_access = logging.getLogger(ACCESS_LOGGER)

#: A request id the server takes as given: what tracing systems make (uuids, hex trace ids),
#: nothing that could break a log line or a header.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:+=/-]{1,128}")
#: Routes as metrics and logs name them: an unknown path is "other", never the path it came with.
_ROUTES = frozenset({"/invocations", "/ping", "/health", "/version", "/ready", "/metrics"})
#: What each refused status counts as, where the code that refused it did not say.
_REFUSAL_OF_STATUS = {413: "limit", 503: "admission", 504: "deadline"}


class Operations:
    """The served app: request ids, access log, metrics, readiness, around the model's app.

    Args:
        slot: Where the version answering now is.
        metrics: The server's metrics; None to keep none (``/metrics`` is then a 404).
        on_startup: Called (with no arguments) at the ASGI lifespan's startup: it starts loading
            the model, in the background, so that the server answers ``/ping`` and ``/ready``
            while it loads.
        on_shutdown: Called at the lifespan's shutdown, after the last request was answered.
        name: The model's name in the Open Inference Protocol's paths (``/v2/models/{name}``, ``oip``).
    """

    def __init__(self, slot: ModelSlot, metrics: ServerMetrics | None, on_startup: Callable[[], None] = lambda: None,
                 on_shutdown: Callable[[], None] = lambda: None, name: str = "model") -> None:
        self.slot = slot
        self.name = name
        self.metrics = metrics
        self.on_startup = on_startup
        self.on_shutdown = on_shutdown

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # no websockets: the connection closes
        path = scope.get("path", "")
        headers = dict(scope.get("headers", []))
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        record = telemetry.RequestRecord(request_id, path if path in _ROUTES else oip.route_name(path, self.name))
        served = self.slot.current
        version = served.version if served is not None and served.version else None
        status = 500
        extra = [(REQUEST_ID_HEADER.encode(), request_id.encode())]
        if version is not None:
            extra.append((VERSION_HEADER.encode(), version.encode()))

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        if self.metrics is not None:
            self.metrics.in_flight.inc()
        try:
            with telemetry.recording(record):
                await self._route(path, scope, receive, _with_request_id(send_with_id, request_id), served)
        finally:
            seconds = time.perf_counter() - record.started
            record.refusal = _refusal(status, record.refusal)
            if self.metrics is not None:
                self.metrics.in_flight.dec()
                self.metrics.observe(record, status, seconds)
            _access.info(json.dumps({
                "request_id": request_id, "method": scope.get("method"), "route": record.route, "status": status,
                "rows": record.rows, "latency_s": round(seconds, 6),
                "model_version": version, "refusal": record.refusal,
            }))

    async def _route(self, path: str, scope: Scope, receive: Receive, send: Send, served: Any) -> None:
        if path in ("/ping", "/health"):
            await _reply(send, 200, b"\n", "application/json")  # alive: MLflow's meaning
        elif path == "/metrics" and self.metrics is not None:
            await _reply(send, 200, self.metrics.scrape(), CONTENT_TYPE)
        elif path == "/metrics":
            await answer(send, 404, "NOT_FOUND", "This server keeps no metrics (mlflow-fullmodel serve --no-metrics).")
        elif path == "/ready":
            await self._ready(send, served)
        elif path == "/v2" or path.startswith("/v2/"):
            await oip.respond(path, scope, receive, send, served, self.name, self.slot.waiting_for)
        elif served is None:
            telemetry.refused("not_ready")
            await answer(send, 503, "TEMPORARILY_UNAVAILABLE",
                         f"Not ready: {self.slot.waiting_for}; retry in a moment.", headers=[(b"retry-after", b"1")])
        elif path == "/invocations" and scope.get("method") == "POST" and streaming.wants_events(scope):
            await streaming.respond(scope, receive, send, served)
        else:
            await served.app(scope, receive, send)

    async def _ready(self, send: Send, served: Any) -> None:
        if served is None:
            await answer(send, 503, "TEMPORARILY_UNAVAILABLE", f"Not ready: {self.slot.waiting_for}.")
            return
        name, version, digest, module_format = served.info
        body = {"ready": True, "name": name, "version": version, "digest": digest, "format": module_format}
        await _reply(send, 200, json.dumps(body).encode(), "application/json")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.on_startup()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.on_shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _refusal(status: int, given: str | None) -> str | None:
    """Why a request with this answer was refused, where the code that refused it did not say."""
    if given is not None or status < 400:
        return given
    return _REFUSAL_OF_STATUS.get(status, "bad_input" if status < 500 else None)


def _with_request_id(send: Send, request_id: str) -> Send:
    """``send``, with ``request_id`` added to an error's JSON body, so that a user's report of it
    finds its line in the access log."""
    held: Message | None = None
    chunks: list[bytes] = []

    async def sending(message: Message) -> None:
        nonlocal held
        if message["type"] == "http.response.start" and int(message["status"]) >= 400:
            held = message  # until the body is whole
            return
        if held is None:
            await send(message)
            return
        chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = _body_with_id(b"".join(chunks), request_id)
        headers = [(k, v) for k, v in held.get("headers", []) if k.lower() != b"content-length"]
        await send({"type": "http.response.start", "status": held["status"],
                    "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return sending


def _body_with_id(body: bytes, request_id: str) -> bytes:
    try:
        error = json.loads(body)
    except ValueError:
        return body
    if not isinstance(error, dict):
        return body
    return json.dumps({**error, "request_id": request_id}).encode()


async def _reply(send: Send, status: int, body: bytes, content_type: str) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
