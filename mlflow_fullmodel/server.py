"""The process of ``mlflow-fullmodel serve``: uvicorn running ``operations.Operations`` in one
worker process or several, each loading the verified model in the background, and stopping
gracefully.

On SIGTERM (or Ctrl-C) the server stops taking connections, answers every request it has taken
(for up to ``grace_period_s``), and exits with status 0. Each worker gets its settings from
``MLFLOW_FULLMODEL_SERVER_SETTINGS`` (written by ``serve``) and builds its app with ``app()``.
"""

from __future__ import annotations

import copy
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
from dataclasses import asdict, dataclass
from typing import Any

import uvicorn

from mlflow_fullmodel.exceptions import FullModelError
from mlflow_fullmodel.metrics import MULTIPROCESS_VARIABLE, ModelInfo, ServerMetrics, process_ended
from mlflow_fullmodel.operations import ACCESS_LOGGER, Operations
from mlflow_fullmodel.rollout import AliasFollower, GuardSettings, ModelSlot, load_version
from mlflow_fullmodel.settings import DEFAULT_GRACE_PERIOD_S, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_JSON_DEPTH

__all__ = ["ServeError", "ServerSettings", "app", "serve"]

_logger = logging.getLogger(__name__)

#: How ``serve`` hands its settings to each worker process.
_SETTINGS_VARIABLE = "MLFLOW_FULLMODEL_SERVER_SETTINGS"
#: The exit status of a worker whose model failed to load: uvicorn's supervisor then stops the
#: server instead of restarting the worker (``uvicorn.config.STARTUP_FAILURE``).
_STARTUP_FAILURE = 3


class ServeError(FullModelError):
    """The server stopped because its model could not be loaded."""


@dataclass(frozen=True)
class ServerSettings:
    """What a server serves and how: the verified model's local path and what it is (registered
    name, version, digest, module format), the request limits, and the alias to follow, if any."""

    model_path: str
    info: ModelInfo
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH
    #: Follow this alias of the registered model ``info[0]`` (``rollout.AliasFollower``).
    follow_alias: str | None = None
    poll_s: float = 30.0
    public_key: str | None = None
    #: Keep Prometheus metrics (``/metrics``).
    metrics: bool = True
    #: The model's name in the Open Inference Protocol's paths (``/v2/models/{name}``).
    name: str = "model"


#: Why this process's model failed to load, once it has.
_failures: list[str] = []


def serve(settings: ServerSettings, host: str, port: int, workers: int = 1,
          grace_period_s: int = DEFAULT_GRACE_PERIOD_S) -> None:
    """Serve ``settings.model_path`` until SIGTERM or Ctrl-C, then drain and return.

    Raises:
        ServeError: The model failed to load (or to reproduce its golden example) in the server.
    """
    from mlflow_fullmodel._mlflow import SERVER_MODEL_PATH_VARIABLE
    from mlflow_fullmodel.serving import default_thread_count
    from mlflow_fullmodel.settings import variable_of

    # As under `mlflow models serve`: the model sees that it is in a scoring server (threads, tuning).
    os.environ[SERVER_MODEL_PATH_VARIABLE] = settings.model_path
    # The workers share the cores: each takes its part unless the user set the threads.
    os.environ.setdefault(variable_of("num_threads"), str(default_thread_count(workers)))
    os.environ[_SETTINGS_VARIABLE] = json.dumps(asdict(settings))
    metrics_dir = None
    if workers > 1 and not os.environ.get(MULTIPROCESS_VARIABLE):
        metrics_dir = tempfile.mkdtemp(prefix="fullmodel-metrics-")
        os.environ[MULTIPROCESS_VARIABLE] = metrics_dir
    options: dict[str, Any] = dict(factory=True, host=host, port=port, workers=workers, lifespan="on",
                                   access_log=False, log_config=_log_config(), timeout_graceful_shutdown=grace_period_s)
    try:
        if workers > 1:
            # uvicorn's supervisor stops the workers with SIGTERM (each drains) and exits 0.
            uvicorn.run("mlflow_fullmodel.server:app", **options)
        else:
            _Server(uvicorn.Config("mlflow_fullmodel.server:app", **options)).run()
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    if _failures:
        raise ServeError(_failures[0])


class _Server(uvicorn.Server):
    """uvicorn's server, ending with exit status 0 after a signal once it has drained.

    uvicorn raises the signal again once it has shut down, so that the process ends as the signal's
    default would (status -15): an orchestrator would read a clean drain as a crash. Handlers that
    ignore the signal are in place while it runs, and uvicorn's re-raise lands on them.
    """

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        previous = {sig: signal.signal(sig, _drained) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            super().run(sockets=sockets)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _drained(signum: int, frame: Any) -> None:
    """The signal that stopped the server, raised again after the drain: nothing left to do."""


def _log_config() -> dict[str, Any]:
    """uvicorn's logging, with the package's own lines (loading, rollouts) on stderr and the access
    log on stdout, one JSON object a line."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["formatters"]["message"] = {"format": "%(message)s"}
    config["handlers"]["access_log"] = {"class": "logging.StreamHandler", "formatter": "message",
                                        "stream": "ext://sys.stdout"}
    config["loggers"]["mlflow_fullmodel"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    config["loggers"][ACCESS_LOGGER] = {"handlers": ["access_log"], "level": "INFO", "propagate": False}
    return config


def app() -> Operations:
    """The ASGI app of one worker of ``serve``: it answers at once, and loads the model in the
    background (``/ready`` says when it is done)."""
    given = json.loads(os.environ[_SETTINGS_VARIABLE])
    settings = ServerSettings(**{**given, "info": tuple(given["info"])})
    guard = GuardSettings(settings.max_body_bytes, settings.max_json_depth)
    slot, metrics = ModelSlot(), ServerMetrics()
    follower = None
    if settings.follow_alias is not None:
        follower = AliasFollower(settings.info[0], settings.follow_alias, slot, metrics,
                                 lambda path, info, folder: load_version(path, info, guard, folder),
                                 poll_s=settings.poll_s, public_key=settings.public_key)

    def load() -> None:
        try:
            served = load_version(settings.model_path, settings.info, guard)
        except Exception as error:
            slot.failure = f"the model failed to load: {type(error).__name__}: {error}"
            _failures.append(slot.failure)
            _logger.error("Stopping: %s", slot.failure, exc_info=error)
            if multiprocessing.parent_process() is not None:
                # A worker of several: this status makes uvicorn's supervisor stop the server
                # rather than start the worker again, to fail the same way.
                os._exit(_STARTUP_FAILURE)
            os.kill(os.getpid(), signal.SIGTERM)  # drained and stopped; serve() raises the failure
            return
        slot.swap(served)
        metrics.serving(served.info)
        metrics.ready.set(1)
        _logger.info("Ready: version %s of %s (%s), verified, loaded and warmed up", served.info[1] or "-",
                     served.info[0] or settings.model_path, served.info[2])
        if follower is not None:
            follower.start()

    def startup() -> None:
        metrics.ready.set(0)
        threading.Thread(target=load, name="load model", daemon=True).start()

    def shutdown() -> None:
        if follower is not None:
            follower.stop()
        process_ended(os.getpid())

    return Operations(slot, metrics if settings.metrics else None, on_startup=startup, on_shutdown=shutdown,
                      name=settings.name)
