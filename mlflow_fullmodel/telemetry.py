"""What one served request did, gathered while it runs: its stages' durations, its rows, the sizes
of its forward batches, and why it was refused, if it was.

A server (``operations.Operations``) opens a ``RequestRecord`` for each request and makes it the
current one; the code on the data path (``serving.ServedModel``, ``pipeline.FullModel``) adds to
whichever record is current, through the functions here. Outside a server there is none, and each
of them does nothing: a model predicting in a notebook or on Spark pays one context lookup.

The current record travels with the request into the thread that runs it: the scoring server runs
``predict`` through ``asyncio.to_thread``, which copies the context.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

__all__ = [
    "REFUSALS", "STAGES", "RequestRecord", "admitted", "current", "forward_batch", "recording", "refused", "rows",
    "stage",
]

#: The stages of a request, in order: waiting for a thread and an admission slot, then the data path.
STAGES = ("admission", "preprocess", "forward", "postprocess")
#: Why a request is refused: a limit of the server or of one request, a full server (503), a passed
#: deadline (504), input the model cannot take (any other 4xx), or no model loaded yet (503).
REFUSALS = ("limit", "admission", "deadline", "bad_input", "not_ready")


@dataclass
class RequestRecord:
    """One request, as far as operators see it: never a value the request holds."""

    request_id: str
    route: str
    #: ``time.perf_counter()`` when the server took the request.
    started: float = field(default_factory=time.perf_counter)
    rows: int | None = None
    refusal: str | None = None
    stages: dict[str, float] = field(default_factory=dict)
    forward_batches: list[int] = field(default_factory=list)


_current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("mlflow_fullmodel_request",
                                                                                 default=None)


def current() -> RequestRecord | None:
    """The record of the request this code runs for, if any."""
    return _current.get()


@contextmanager
def recording(record: RequestRecord) -> Iterator[RequestRecord]:
    """Make ``record`` the current one while the request runs."""
    token = _current.set(record)
    try:
        yield record
    finally:
        _current.reset(token)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Time a stage of the current request (its durations add up if it is entered again)."""
    record = _current.get()
    if record is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        record.stages[name] = record.stages.get(name, 0.0) + time.perf_counter() - start


def admitted() -> None:
    """The model starts on the current request: the time since the server took it (waiting for a
    thread, reading the payload, an admission slot) is its admission stage."""
    record = _current.get()
    if record is not None:
        record.stages["admission"] = time.perf_counter() - record.started


def rows(count: int) -> None:
    """The current request holds ``count`` rows."""
    record = _current.get()
    if record is not None:
        record.rows = count


def forward_batch(size: int) -> None:
    """The current request ran a forward batch of ``size`` examples."""
    record = _current.get()
    if record is not None:
        record.forward_batches.append(size)


def refused(reason: str) -> None:
    """The current request is refused, for one of ``REFUSALS``."""
    record = _current.get()
    if record is not None and record.refusal is None:
        record.refusal = reason
