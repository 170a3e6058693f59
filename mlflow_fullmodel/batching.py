"""Adaptive micro-batching: concurrent ``predict`` calls share forward batches.

A scoring server calls ``predict`` from a thread per request. Each call pre-processes and
post-processes its own rows in its own thread; only the forward pass is shared. A call queues its
examples; if no forward pass is running, the call itself runs one over everything queued (grouped
by length, at most ``max_batch_size`` per batch) and hands the results out; otherwise it waits for
the running pass to finish, by which time its examples have either been served by a later pass or
it runs that pass itself. So a request that arrives alone runs at once, without a thread switch,
and under load the forward pass runs full batches on all cores instead of many small ones fighting
over them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Hashable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from mlflow_fullmodel.collate import example_length, length_buckets
from mlflow_fullmodel.exceptions import ConfigError, DeadlineError, FullModelError
from mlflow_fullmodel.pipeline import FullModel, records_frame

__all__ = ["MicroBatcher"]

_logger = logging.getLogger(__name__)


@dataclass
class _Job:
    """The examples of one predict call, waiting for their forward outputs."""

    examples: list[Any]
    params: Mapping[str, Any]
    key: Hashable
    deadline: float | None = None  # a time.monotonic() value: past it, the call's rows are not run
    outputs: list[Any] = field(init=False)
    error: Exception | None = None
    done: bool = False

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
        max_wait_ms: How long a forward pass may be held back, when it is not full, for requests
            that are still being pre-processed (never when none is: a lone request does not wait).
        timeout_s: How long a call waits for its forward outputs before failing.

    Example::

        >>> import torch
        >>> from mlflow_fullmodel import FullModel, Param, script, transform
        >>> from mlflow_fullmodel.transforms import TopK
        >>> @transform
        ... def marks(text: str) -> torch.Tensor:      # a stand-in for a tokenizer
        ...     return torch.tensor([text.count("!"), text.count("?")], dtype=torch.float)
        >>> net = torch.nn.Linear(2, 2, bias=False)     # a stand-in for a trained network
        >>> _ = net.weight.data.copy_(torch.tensor([[-1.0, 1.0], [1.0, -1.0]]))
        >>> model = FullModel(preprocess=[marks], module=script(net), postprocess=[TopK(labels=["neg", "pos"])])
        >>> batcher = MicroBatcher(model, max_batch_size=64)
        >>> batcher.predict(["What a film!"])["label"].tolist()    # from any number of threads at once
        ['pos']
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
        self._preprocessing_calls = 0  # calls that will queue soon: worth a short wait for
        self._running = False  # a forward round is under way

    def __repr__(self) -> str:
        return (f"MicroBatcher(max_batch_size={self.max_batch_size}, max_wait_ms={self.max_wait_ms}, "
                f"timeout_s={self.timeout_s})")

    def predict(self, data: Any, params: Mapping[str, Any] | None = None) -> pd.DataFrame:
        """Like ``FullModel.predict``, with the forward pass shared with concurrent calls."""
        return records_frame(self.predict_records(data, params))

    def predict_records(self, data: Any, params: Mapping[str, Any] | None = None,
                        deadline: float | None = None) -> list[dict[str, Any]]:
        """Like ``FullModel.predict_records``, with the forward pass shared with concurrent calls.
        Past ``deadline`` (a ``time.monotonic()`` value) the call stops with a ``DeadlineError``:
        between its own steps, while it waits for a shared round, and before a batch of its rows."""
        return self.model._predict_records(
            data, params, forward_examples=lambda examples, values: self._forward(examples, values, deadline),
            preprocessing=self._preprocessing, deadline=deadline)

    @contextmanager
    def _preprocessing(self) -> Iterator[None]:
        """Count calls that are pre-processing: their examples will queue soon, worth a short wait."""
        with self._condition:
            self._preprocessing_calls += 1
        try:
            yield
        finally:
            with self._condition:
                self._preprocessing_calls -= 1
                self._condition.notify_all()

    def _forward(self, examples: list[Any], values: Mapping[str, Any], deadline: float | None = None) -> list[Any]:
        if not examples:
            return []
        job = self._job(examples, values, deadline)
        timeout = time.monotonic() + self.timeout_s
        give_up = timeout if deadline is None else min(timeout, deadline)
        with self._condition:
            self._pending.append(job)
        while True:
            with self._condition:
                while not job.done and self._running:
                    if not self._condition.wait(max(give_up - time.monotonic(), 0)) and not job.done:
                        if job in self._pending:
                            self._pending.remove(job)
                        if give_up < timeout:
                            raise DeadlineError("the request's work went past its deadline and was stopped while "
                                                "waiting for a shared forward round")
                        raise TimeoutError(f"The forward pass did not answer within {self.timeout_s} s.")
                if job.done:
                    break
                self._running = True
            # Lead a round: it serves this call's examples unless another round already took them.
            self._lead()
        if job.error is not None:
            raise job.error
        return job.outputs

    def _job(self, examples: list[Any], values: Mapping[str, Any], deadline: float | None) -> _Job:
        """The forward work of one call, keyed by what decides which calls may share a batch."""
        # Only the parameters of the collate and forward steps change a batch's results, so
        # requests that agree on those may share batches whatever their other parameters; and
        # only examples of one structure can be collated together (a tta param changes shapes).
        shared = {**self.model.collate.params(), **self.model.forward.params()}
        key = (tuple(sorted((name, values[name]) for name in shared)), _structure(examples[0]))
        return _Job(examples, values, key=key, deadline=deadline)

    def _run_jobs(self, jobs: list[_Job]) -> None:
        """One forward round over ``jobs``: those of one key share batches. Each job gets its
        outputs or its error; a job whose rows fail does not fail the others."""
        groups: dict[Hashable, list[_Job]] = {}
        for job in jobs:
            groups.setdefault(job.key, []).append(job)
        for group in groups.values():
            self._run_group(group)

    def _lead(self) -> None:
        """Run one forward round over every queued request (this call's included), then hand over."""
        jobs: list[_Job] = []
        try:
            with self._condition:
                self._wait_for_company()
                jobs, self._pending = self._pending, []
            self._run_jobs(jobs)
        finally:
            with self._condition:
                for job in jobs:
                    job.done = True
                self._running = False
                self._condition.notify_all()  # the next queued call leads the next round

    def _wait_for_company(self) -> None:
        """Hold a batch that is not full for up to ``max_wait_ms`` while other calls are still
        pre-processing (their examples would otherwise wait a whole round)."""
        deadline = time.monotonic() + self.max_wait_ms / 1000
        while (
            self._preprocessing_calls
            and sum(len(j.examples) for j in self._pending) < self.max_batch_size
            and (remaining := deadline - time.monotonic()) > 0
        ):
            self._condition.wait(remaining)

    def _run_group(self, jobs: list[_Job]) -> None:
        items = [(job, index) for job in jobs for index in range(len(job.examples))]
        lengths = [example_length(job.examples[index]) for job, index in items]
        # The model's batch_size bounds batches too: a model saved with batch_size=1 is never batched.
        for bucket in length_buckets(lengths, min(self.max_batch_size, self.model.batch_size)):
            self._run_batch([items[i] for i in bucket])

    def _run_batch(self, items: list[tuple[_Job, int]]) -> None:
        now = time.monotonic()
        for job in {id(job): job for job, _ in items if job.deadline is not None and now > job.deadline}.values():
            job.error = DeadlineError("the request's work went past its deadline and was stopped before forward")
        items = [(job, index) for job, index in items if job.error is None]
        if not items:
            return
        jobs = list({id(job): job for job, _ in items}.values())
        try:
            # The model's own forward round, over this one batch of examples from several calls.
            examples = [job.examples[index] for job, index in items]
            outputs = self.model._forward_examples(examples, jobs[0].params, batches=[list(range(len(examples)))])
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

