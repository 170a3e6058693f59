"""Requests to an ASGI app in this process, as uvicorn makes them, a Prometheus scrape read back,
and a saved model loaded as a server loads it: what the in-process server tests
(``test_operations``, ``test_oip``, ``test_streaming``) share."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from mlflow_fullmodel.metrics import ModelInfo
from mlflow_fullmodel.rollout import GuardSettings, ServedVersion, load_version

__all__ = ["Answer", "call", "loaded", "samples", "value"]


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)


def call(app: Any, path: str, body: bytes | str = b"", method: str = "POST", headers: dict[str, str] | None = None,
         ) -> Answer:
    """One HTTP request to an ASGI app, as uvicorn would make it."""
    data = body.encode() if isinstance(body, str) else body
    given = {"content-type": "application/json", "content-length": str(len(data)), **(headers or {})}
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in given.items()],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 5000)}
    messages: list[dict[str, Any]] = []

    async def run() -> None:
        received = False

        async def receive() -> dict[str, Any]:
            nonlocal received
            if not received:
                received = True
                return {"type": "http.request", "body": data, "more_body": False}
            await asyncio.Event().wait()  # the client stays connected
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            messages.append(message)

        await app(scope, receive, send)

    asyncio.run(run())
    start = next(m for m in messages if m["type"] == "http.response.start")
    body_bytes = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return Answer(start["status"], {k.decode().lower(): v.decode() for k, v in start.get("headers", [])}, body_bytes)


def samples(scrape: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a Prometheus scrape, parsed by prometheus_client's own parser."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(scrape) for s in family.samples}


def value(scraped: dict[tuple[str, frozenset], float], metric: str, **labels: str) -> float:
    return scraped.get((metric, frozenset(labels.items())), 0.0)


def loaded(path: str, info: ModelInfo, max_body_bytes: int, env: dict[str, str] | None = None) -> ServedVersion:
    """A saved model loaded as a server loads it, with serving settings from ``env``; this
    process's environment as it was afterwards: MLflow's scoring app marks the process as a server,
    and pyfunc's ``predict`` would answer every later test with records instead of a DataFrame."""
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        return load_version(path, info, GuardSettings(max_body_bytes, 32))
    finally:
        os.environ.clear()
        os.environ.update(saved)
