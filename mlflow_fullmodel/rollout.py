"""The model a server answers with, and how it changes without a failed request.

A ``ServedVersion`` is a verified model, loaded, checked against its golden example with the
installed runtime, warmed up, and wrapped in its ASGI app. A ``ModelSlot`` holds the one answering
now; each request takes whatever the slot holds when it arrives and finishes with it, so a swap
never cuts a request short. An ``AliasFollower`` watches a registered model's alias and, when it
moves, verifies, loads and warms the new version beside the old one before it swaps; a version that
fails any of that is logged and counted, and the old one goes on answering.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from mlflow_fullmodel.exceptions import ParityError
from mlflow_fullmodel.hardened import Guard
from mlflow_fullmodel.metrics import ModelInfo, ServerMetrics

__all__ = ["AliasFollower", "GuardSettings", "ModelSlot", "ServedVersion", "load_version", "warm_up", "warm_up_app"]

_logger = logging.getLogger(__name__)

#: How many times each warm-up shape runs: TorchScript's profiling executor optimises a graph on
#: its second run, and the first request after ready must not be that run.
_WARM_RUNS = 3


@dataclass(frozen=True)
class GuardSettings:
    """The request limits of ``hardened.Guard`` a served version is wrapped with."""

    max_body_bytes: int
    max_json_depth: int


@dataclass(frozen=True)
class ServedVersion:
    """A model ready to answer: its app (``hardened.Guard`` around MLflow's scoring app), what it
    is (registered name, version, digest, module format), the download to remove after it, and the
    loaded pyfunc model itself (its metadata: signature, params; ``predict_stream``)."""

    app: Any
    info: ModelInfo
    download_dir: str | None = None
    model: Any = None

    @property
    def version(self) -> str:
        return self.info[1]


def load_version(model_path: str, info: ModelInfo, guard: GuardSettings, download_dir: str | None = None,
                 ) -> ServedVersion:
    """Load the verified MLflow model at ``model_path`` as MLflow's scoring server does, check it
    reproduces its golden example with the installed runtime, warm it up and wrap it.

    Raises:
        ParityError: The installed mlflow-fullmodel answers the golden example differently.
    """
    from mlflow_fullmodel._mlflow import load_served_model, scoring_app
    from mlflow_fullmodel.flavor import flavor_configuration
    from mlflow_fullmodel.parity import golden_problems

    model = load_served_model(model_path)
    # verify_model checked parity with the runtime embedded in the model; this process serves with
    # the installed one: it must answer the golden example alike before it answers anyone.
    folder = os.path.join(model_path, flavor_configuration(model_path)["data"])
    problems = golden_problems(model.get_raw_model(), folder)
    if problems:
        raise ParityError(f"The installed mlflow-fullmodel does not reproduce the model's golden example: "
                          f"{'; '.join(problems[:5])}. Serve it with the mlflow-fullmodel version that saved it.",
                          stage="outputs")
    warm_up(model, folder)
    schema = model.metadata.get_params_schema()
    params = [spec.name for spec in schema.params] if schema is not None else []
    inputs = model.metadata.get_input_schema()
    columns = [str(name) for name in inputs.input_names()] if inputs is not None and inputs.has_input_names() else []
    app = Guard(scoring_app(model), params, guard.max_body_bytes, guard.max_json_depth, names=columns)
    warm_up_app(app, model_path)
    return ServedVersion(app, info, download_dir, model)


def warm_up(model: Any, folder: str) -> list[int]:
    """Run the golden example through the served model's whole path (schema, limits, steps,
    forward) at each batch size a request will meet first: one row, and a full batch. Returns the
    sizes run."""
    from mlflow_fullmodel.storage import read_golden

    golden = read_golden(folder)
    fullmodel = model.get_raw_model()
    if golden is None or not golden.inputs:
        return []
    columns = fullmodel.input_columns
    records = [{columns[0]: row} for row in golden.inputs] if len(columns) == 1 else list(golden.inputs)
    sizes = sorted({1, fullmodel.batch_size})
    for size in sizes:
        frame = pd.DataFrame([records[i % len(records)] for i in range(size)])
        for _ in range(_WARM_RUNS):
            model.predict(frame, params=golden.params or None)
    return sizes


def warm_up_app(app: Any, model_path: str) -> int:
    """Send the model's serving example (``serving_input_example.json``, saved by MLflow) through
    the served app as ``POST /invocations`` requests: what a request meets before the model, first
    time in a process (MLflow's parsing, the guard's checks and their threads), is paid here.
    Returns the requests answered 200; one that is not is logged, and serving goes on (the golden
    example already passed)."""
    from mlflow.models.utils import SERVING_INPUT_FILENAME

    path = os.path.join(model_path, SERVING_INPUT_FILENAME)
    if not os.path.isfile(path):
        return 0
    with open(path, "rb") as f:
        body = f.read()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/invocations", "raw_path": b"/invocations", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}

    async def request() -> int:
        status = 500
        done = asyncio.Event()

        async def receive() -> dict[str, Any]:
            if done.is_set():
                await asyncio.Event().wait()  # no disconnect: the answer is read whole
            done.set()
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])

        await app(dict(scope), receive, send)
        return status

    async def requests() -> list[int]:
        return [await request() for _ in range(_WARM_RUNS)]

    statuses = asyncio.run(requests())
    if any(status != 200 for status in statuses):
        _logger.warning("The model's serving example was answered %s in the warm-up", statuses)
    return statuses.count(200)


class ModelSlot:
    """The version answering now, or none yet (loading) or none ever (``failure`` says why)."""

    def __init__(self) -> None:
        self.current: ServedVersion | None = None
        self.failure: str | None = None

    @property
    def waiting_for(self) -> str:
        """Why there is no version to answer with: its failure, or the loading still going on."""
        return self.failure or "the model is being verified, loaded and warmed up"

    def swap(self, new: ServedVersion) -> ServedVersion | None:
        """Answer with ``new`` from the next request on; the old version (returned) finishes what
        it has."""
        old, self.current = self.current, new
        return old


class AliasFollower:
    """Follow ``models:/name@alias``: every ``poll_s`` seconds, if the alias holds another version,
    verify it (as ``mlflow-fullmodel verify`` does, with ``public_key`` if given), load and warm it
    with ``load``, and swap it into ``slot``.

    A version that fails is not retried until the alias moves again; the old one keeps serving,
    ``mlflow_fullmodel_rollout_failed`` is 1 and the reason is logged.
    """

    def __init__(self, name: str, alias: str, slot: ModelSlot, metrics: ServerMetrics,
                 load: Callable[[str, ModelInfo, str | None], ServedVersion], poll_s: float = 30.0,
                 public_key: str | None = None) -> None:
        self.name = name
        self.alias = alias
        self.slot = slot
        self.metrics = metrics
        self.load = load
        self.poll_s = poll_s
        self.public_key = public_key
        self._failed: str | None = None
        self._retired: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"follow {name}@{alias}", daemon=True)

    def __repr__(self) -> str:
        return f"AliasFollower(name={self.name!r}, alias={self.alias!r}, poll_s={self.poll_s})"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for folder in self._retired:
            shutil.rmtree(folder, ignore_errors=True)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception:  # the registry unreachable, say: try again at the next poll
                _logger.warning("Could not read alias %s@%s; trying again in %s s", self.name, self.alias,
                                self.poll_s, exc_info=True)

    def poll(self) -> bool:
        """Look at the alias once; roll out the version it holds if it is new. Returns whether the
        served version changed."""
        from mlflow.tracking import MlflowClient

        version = str(MlflowClient().get_model_version_by_alias(self.name, self.alias).version)
        current = self.slot.current
        if version == self._failed or (current is not None and current.version == version):
            return False
        uri = f"models:/{self.name}/{version}"
        _logger.info("Alias %s@%s moved to version %s: verifying and warming it beside the one serving",
                     self.name, self.alias, version)
        try:
            new = self._prepare(uri, version)
        except Exception as error:
            self._failed = version
            self.metrics.rollouts.labels("refused").inc()
            self.metrics.rollout_failed.set(1)
            _logger.error("Version %s of %s was not rolled out; version %s keeps serving: %s: %s", version,
                          self.name, current.version if current else "(none)", type(error).__name__, error)
            return False
        old = self.slot.swap(new)
        self._failed = None
        self.metrics.serving(new.info, old.info if old else None)
        self.metrics.rollouts.labels("swapped").inc()
        self.metrics.rollout_failed.set(0)
        if old is not None and old.download_dir is not None:
            # Removed when the server stops: a request of the old version may still be running.
            self._retired.append(old.download_dir)
        _logger.info("Now serving version %s of %s (was %s)", version, self.name, old.version if old else "none")
        return True

    def _prepare(self, uri: str, version: str) -> ServedVersion:
        from mlflow_fullmodel.verification import verify_model

        report = verify_model(uri, public_key=self.public_key, keep_download=True)
        try:
            return self.load(report.local_path, (self.name, version, report.digest, module_format(report.local_path)),
                             report.download_dir)
        except BaseException:
            if report.download_dir is not None:
                shutil.rmtree(report.download_dir, ignore_errors=True)
            raise


def module_format(model_path: str) -> str:
    """The format of the model's modules (``torchscript``, ``export``; several joined by ``+``)."""
    from mlflow_fullmodel.flavor import flavor_configuration
    from mlflow_fullmodel.storage import read_spec

    spec = read_spec(os.path.join(model_path, flavor_configuration(model_path)["data"]))
    return "+".join(sorted({entry["format"] for entry in spec["modules"].values()}))
