"""Adaptive micro-batching: concurrent ``predict`` calls share forward batches.

A scoring server calls ``predict`` from a thread per request. Each call pre-processes and
post-processes its own rows in its own thread; only the forward pass is handed to one worker
thread, which merges whatever examples are waiting into batches grouped by length. While a batch
runs, new requests queue up, so the batch size follows the load: a request that arrives alone runs
at once, and under load the forward pass runs full batches on all cores instead of many small ones
fighting over them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from mlflow_fullmodel.collate import example_length, uncollate
from mlflow_fullmodel.exceptions import ConfigError, FullModelError
from mlflow_fullmodel.pipeline import FullModel, answers_frame

__all__ = ["MicroBatcher"]

_logger = logging.getLogger(__name__)


@dataclass
class _Job:
    """The examples of one predict call, waiting for their forward outputs."""

    examples: list[Any]
    params: Mapping[str, Any]
    key: Hashable
    outputs: list[Any] = field(init=False)
    error: Exception | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.outputs = [None] * len(self.examples)


def _structure(example: Any) -> Hashable:
    """What must agree for examples to collate together: nesting, dtypes, and the shape of every
    tensor that is not padded (padding handles 1-D tensors of any length)."""
    if isinstance(example, dict):
        return tuple((key, _structure(value)) for key, value in example.items())
    if isinstance(example, (tuple, list)) and not all(isinstance(v, (int, float)) for v in example):
        return tuple(_structure(value) for value in example)
    if isinstance(example, torch.Tensor):
        return (str(example.dtype), tuple(example.shape) if example.dim() != 1 else -1)
    return type(example).__name__


class MicroBatcher:
    """Runs ``FullModel.predict`` for many threads, merging their forward passes.

    Args:
        model: The model to serve.
        max_batch_size: The most examples in one forward batch.
        max_wait_ms: How long the worker may hold a batch that is not full while other requests
            are still being pre-processed (never when none is: a lone request does not wait).
        timeout_s: How long a call waits for its forward outputs before failing.

    Example::

        batcher = MicroBatcher(model, max_batch_size=64)
        batcher.predict(["What a film!"])      # from any number of threads at once
    """

    def __init__(self, model: FullModel, max_batch_size: int = 64, max_wait_ms: float = 2.0,
                 timeout_s: float = 300.0) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be a positive int, got {max_batch_size!r}.")
        if max_wait_ms < 0 or timeout_s <= 0:
            raise ConfigError(f"max_wait_ms must be >= 0 and timeout_s > 0, got {max_wait_ms!r}, {timeout_s!r}.")
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_wait_ms = max_wait_ms
        self.timeout_s = timeout_s
        self._condition = threading.Condition()
        self._pending: list[_Job] = []
        self._preprocessing = 0  # calls that will submit soon: worth a short wait for
        self._worker: threading.Thread | None = None

    def __repr__(self) -> str:
        return (f"MicroBatcher(max_batch_size={self.max_batch_size}, max_wait_ms={self.max_wait_ms}, "
                f"timeout_s={self.timeout_s})")

    def predict(self, data: Any, params: Mapping[str, Any] | None = None) -> pd.DataFrame:
        """Like ``FullModel.predict``, with the forward pass shared with concurrent calls."""
        model = self.model
        rows = model.rows(data)
        values = model.resolve_params(params)
        with self._condition:
            self._preprocessing += 1
        try:
            examples = model.preprocess(rows, values)
        finally:
            with self._condition:
                self._preprocessing -= 1
                self._condition.notify_all()
        outputs = self._forward(examples, values)
        return answers_frame(model.postprocess(outputs, values))

    def _forward(self, examples: list[Any], values: Mapping[str, Any]) -> list[Any]:
        if not examples:
            return []
        # Only the parameters of the collate and forward steps change a batch's results, so
        # requests that agree on those may share batches whatever their other parameters; and
        # only examples of one structure can be collated together (a tta param changes shapes).
        shared = {**self.model.collate_fn.params(), **self.model.forward_strategy.params()}
        key = (tuple(sorted((name, values[name]) for name in shared)), _structure(examples[0]))
        job = _Job(examples, values, key=key)
        with self._condition:
            self._start_worker()
            self._pending.append(job)
            self._condition.notify_all()
        if not job.done.wait(self.timeout_s):
            raise TimeoutError(f"The forward pass did not answer within {self.timeout_s} s.")
        if job.error is not None:
            raise job.error
        return job.outputs

    def _start_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="fullmodel-batcher", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while True:
            with self._condition:
                while not self._pending:
                    self._condition.wait()
                deadline = time.monotonic() + self.max_wait_ms / 1000
                while (
                    self._preprocessing
                    and sum(len(j.examples) for j in self._pending) < self.max_batch_size
                    and (remaining := deadline - time.monotonic()) > 0
                ):
                    self._condition.wait(remaining)
                jobs, self._pending = self._pending, []
            groups: dict[Hashable, list[_Job]] = {}
            for job in jobs:
                groups.setdefault(job.key, []).append(job)
            for group in groups.values():
                self._run_group(group)

    def _run_group(self, jobs: list[_Job]) -> None:
        items = [(job, index) for job in jobs for index in range(len(job.examples))]
        items.sort(key=lambda item: example_length(item[0].examples[item[1]]))
        for start in range(0, len(items), self.max_batch_size):
            self._run_batch(items[start : start + self.max_batch_size])
        for job in jobs:
            job.done.set()

    def _run_batch(self, items: list[tuple[_Job, int]]) -> None:
        jobs = list({id(job): job for job, _ in items}.values())
        try:
            outputs = self._infer([job.examples[index] for job, index in items], jobs[0].params)
        except Exception as error:
            if len(jobs) > 1:
                # Run each request's rows on their own, so only the request at fault fails.
                for job in jobs:
                    self._run_batch([item for item in items if item[0] is job])
                return
            if not isinstance(error, FullModelError):
                _logger.exception("Forward pass failed")
            jobs[0].error = error
            return
        for (job, index), output in zip(items, outputs):
            job.outputs[index] = output

    def _infer(self, examples: list[Any], params: Mapping[str, Any]) -> list[Any]:
        batch = self.model.collate(examples)
        return uncollate(self.model.forward(batch, params), len(examples))
