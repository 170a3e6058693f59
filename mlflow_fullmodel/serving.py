"""Serving a loaded FullModel through pyfunc: the settings, the scoring server's process, and the
wrapper MLflow calls.

Settings come from the pyfunc ``model_config`` or, for ``mlflow models serve``, from
``MLFLOW_FULLMODEL_*`` environment variables (``settings.ServingSettings``). Inside a scoring server the
process itself is tuned (``tune_scoring_server``) and torch's intra-op threads are set for the
number of server workers sharing the machine (``default_thread_count``).
"""

from __future__ import annotations

import gc
import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from mlflow.protos.databricks_pb2 import (
    DEADLINE_EXCEEDED,
    INTERNAL_ERROR,
    INVALID_PARAMETER_VALUE,
    TEMPORARILY_UNAVAILABLE,
)

from mlflow_fullmodel import telemetry
from mlflow_fullmodel._mlflow import (
    SERVER_MODEL_PATH_VARIABLE,
    SERVING_ENVIRONMENT_VARIABLE,
    UnrewrittenMessage,
    scoring_server_threads,
)
from mlflow_fullmodel.batching import MicroBatcher
from mlflow_fullmodel.exceptions import (
    DeadlineError,
    FullModelError,
    InputError,
    LimitError,
    ModelError,
    ParamError,
    StreamingError,
)
from mlflow_fullmodel.pipeline import ERROR_COLUMN, FullModel, _records, brief, records_frame
from mlflow_fullmodel.schema import check_column_types
from mlflow_fullmodel.settings import ServingSettings, variable_of
from mlflow_fullmodel.spark import in_spark_task, without_row_numbers

__all__ = ["Admission", "RequestLimits", "ServedModel", "ServerBusy", "ServingError", "default_thread_count", "serve",
           "set_thread_count", "tune_scoring_server"]

_logger = logging.getLogger(__name__)


class ServingError(UnrewrittenMessage):
    """The error a request gets: HTTP 400 for the request's fault, 500 for the model's, with a JSON
    body holding this message and nothing else.

    MLflow's scoring server rewrites an MlflowException's message to start with the whole request
    (``Failed to predict data '...'``), which echoes any body back, however large; this message
    cannot be rewritten (``_mlflow.UnrewrittenMessage``).
    """


@dataclass(frozen=True)
class RequestLimits:
    """What one request may hold, so that a server with default settings stays safe: rows, characters
    per text, bytes per binary value (an encoded image; base64 text counts as the bytes it decodes
    to). Image steps add their own limits on pixels, before and after resizing (``max_pixels``)."""

    max_rows: int
    max_text_chars: int
    max_bytes: int
    max_samples: int
    binary_columns: frozenset[str] = frozenset()

    def check(self, data: Any, samples_per_row: int = 1) -> int:
        """The samples the request makes (rows x samples per row; 0 if its rows cannot be counted);
        raise ``LimitError`` (an ``InputError``) naming the limit, the value and how to raise it."""
        rows = len(data) if isinstance(data, (pd.DataFrame, list, tuple)) else None
        if rows is not None and rows > self.max_rows:
            raise LimitError(_over("max_rows", self.max_rows, f"the request has {rows} rows",
                                   "send fewer rows per request"))
        if rows is not None and rows * samples_per_row > self.max_samples:
            raise LimitError(_over("max_samples", self.max_samples,
                                   f"the request makes {rows} rows x {samples_per_row} samples = "
                                   f"{rows * samples_per_row} "
                                   "samples", "send fewer rows, or fewer samples per row (a smaller tta)"))
        samples = (rows or 0) * samples_per_row
        if not isinstance(data, pd.DataFrame):
            return samples
        for column, series in data.items():
            if series.dtype.kind not in "OSU" and str(series.dtype) not in ("str", "string"):
                continue
            binary = column in self.binary_columns
            for row, value in enumerate(series.tolist()):
                if isinstance(value, (bytes, bytearray)):
                    size = len(value)
                elif isinstance(value, str) and binary:
                    size = len(value) * 3 // 4  # base64 text: the bytes it decodes to
                elif isinstance(value, str):
                    if len(value) > self.max_text_chars:
                        raise LimitError(_over("max_text_chars", self.max_text_chars,
                                               f"row {row}, column '{column}' has {len(value)} characters",
                                               "send shorter texts"))
                    if not value.isascii():
                        _check_unicode(value, row, str(column))
                    continue
                else:
                    continue
                if size > self.max_bytes:
                    raise LimitError(_over("max_bytes", self.max_bytes,
                                           f"row {row}, column '{column}' holds {size} bytes",
                                           "send smaller files"))
        return samples


class ServerBusy(FullModelError):
    """As many heavy requests as the server admits at once are running already."""


class Admission:
    """How many heavy requests (over ``heavy_samples`` samples) run at once: at most
    ``max_heavy_requests``, so that a light request always finds a free thread.

    MLflow's scoring server runs each request in asyncio's default thread pool (cores + 4
    threads, at most 32); heavy requests that filled it would keep every light one waiting for
    as long as their own work takes. A heavy request over the bound is refused at once (HTTP 503,
    to retry), not queued: a queued request would hold a pool thread while it waits.
    """

    def __init__(self, heavy_samples: int, max_heavy_requests: int) -> None:
        self.heavy_samples = heavy_samples
        self.max_heavy_requests = max_heavy_requests
        self._slots = threading.BoundedSemaphore(max_heavy_requests)

    @contextmanager
    def admit(self, samples: int) -> Iterator[None]:
        if samples <= self.heavy_samples:
            yield
            return
        if not self._slots.acquire(blocking=False):
            raise ServerBusy(_over(
                "max_heavy_requests", self.max_heavy_requests,
                f"the server is running {self.max_heavy_requests} heavy request(s) already (over heavy_samples="
                f"{self.heavy_samples} samples each; this one makes {samples})",
                f"retry in a moment, send requests of at most {self.heavy_samples} samples (always admitted)"))
        try:
            yield
        finally:
            self._slots.release()


def default_heavy_requests(cores: int | None = None) -> int:
    """All of the scoring server's request threads (cores + 4, at most 32) but two, at least one."""
    return max(1, scoring_server_threads(cores or os.cpu_count() or 1) - 2)


def _check_unicode(text: str, row: int, column: str) -> None:
    """A lone surrogate (``"\\ud800"`` in JSON) is no character: refuse it instead of letting each
    tokenizer make its own guess."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InputError(f"Row {row}, column '{column}' is not valid Unicode text: a lone surrogate "
                         f"(U+{ord(text[error.start]):04X}) at character {error.start}.") from None


def _over(setting: str, limit: int, what: str, fix: str) -> str:
    variable = variable_of(setting)
    return (f"{what}, over the limit {setting}={limit}; {fix}, or raise the limit (pyfunc model_config "
            f"'{setting}' or the environment variable {variable} of the server).")


class ServedModel:
    """The pyfunc face of a FullModel: a request over a limit or with bad input is HTTP 400, a
    model error 500, each with a JSON message and no trace."""

    def __init__(self, fullmodel: FullModel, batcher: MicroBatcher | None, output_columns: list[str],
                 limits: RequestLimits, deadline_s: float, admission: Admission,
                 input_types: Mapping[str, str] | None = None) -> None:
        self.fullmodel = fullmodel
        self.batcher = batcher
        self.output_columns = output_columns  # from the signature: a request whose rows all failed has them too
        self.limits = limits
        self.deadline_s = deadline_s
        self.admission = admission
        self.input_types = dict(input_types or {})  # from the signature: column -> MLflow type name

    def get_raw_model(self) -> FullModel:
        return self.fullmodel

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> pd.DataFrame | list[dict[str, Any]]:
        try:
            with self._admitted(data, params) as deadline:
                if self.batcher is not None:
                    records = self.batcher.predict_records(data, params=params, deadline=deadline)
                else:
                    records = self.fullmodel._predict_records(data, params=params, deadline=deadline)
        except Exception as error:
            raise self._serving_error(error) from None
        if records and list(records[0]) == [ERROR_COLUMN] and self.output_columns:
            records = [{**dict.fromkeys(self.output_columns), **record} for record in records]
        if in_spark_task():  # a row number within Spark's Arrow batch names no row of the table
            records = without_row_numbers(records)
        # The scoring server turns a DataFrame into exactly these records again; hand them over
        # as they are (the same JSON), and build a DataFrame only for Python callers.
        if os.environ.get(SERVING_ENVIRONMENT_VARIABLE) == "true":
            return records
        return records_frame(records)

    @contextmanager
    def _admitted(self, data: Any, params: Mapping[str, Any] | None) -> Iterator[float]:
        """Check a request against the signature's column types and the limits, hold its admission
        slot while it runs, and give its deadline (a ``time.monotonic()`` value)."""
        if isinstance(data, (pd.DataFrame, list, tuple)):
            telemetry.rows(len(data))
        check_column_types(data, self.input_types)
        samples = self.limits.check(data, self.fullmodel._samples_per_row(params))
        with self.admission.admit(samples):
            telemetry.admitted()
            yield time.monotonic() + self.deadline_s

    def predict_stream(self, data: Any, params: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """``FullModel.predict_stream`` for one row, under the rules of ``predict``: its limits,
        admission and deadline (for the whole stream), and its errors as ``ServingError``. MLflow's
        ``PyFuncModel.predict_stream`` hands over the row (a dict of its columns) after checking it
        against the signature. Micro-batching does not apply: a stream runs its own decoding."""
        try:
            frame = pd.DataFrame(_records(data, self.fullmodel.input_columns))
            with self._admitted(frame, params) as deadline:
                yield from self.fullmodel._predict_stream(frame, params, deadline=deadline)
        except Exception as error:
            raise self._serving_error(error) from None

    def _serving_error(self, error: Exception) -> ServingError:
        """The answer to a request that failed with ``error``: its reason recorded (``telemetry``),
        a model's fault logged with its traceback, the message without one."""
        if isinstance(error, (InputError, ParamError, StreamingError)):
            telemetry.refused("limit" if isinstance(error, LimitError) else "bad_input")
            return ServingError(str(error), INVALID_PARAMETER_VALUE)
        if isinstance(error, ServerBusy):
            telemetry.refused("admission")
            return ServingError(str(error), TEMPORARILY_UNAVAILABLE)
        if isinstance(error, DeadlineError):
            telemetry.refused("deadline")
            return ServingError(f"{error}: deadline_s={self.deadline_s}. Send fewer rows or lighter params per "
                                "request, or raise it (pyfunc model_config 'deadline_s' or "
                                "MLFLOW_FULLMODEL_DEADLINE_S).", DEADLINE_EXCEEDED)
        if isinstance(error, ModelError):
            _logger.error("Model error in %s", error.step, exc_info=error)
            return ServingError(f"Model error (not caused by the request) in {error.step}: {error}", INTERNAL_ERROR)
        # A bug of the model's own: its traceback goes to the log only.
        _logger.error("Model error", exc_info=error)
        return ServingError(f"Model error (not caused by the request): {brief(error)}", INTERNAL_ERROR)


def tune_scoring_server() -> bool:
    """Tune the process of ``mlflow models serve`` for serving; elsewhere do nothing.

    Only a scoring server process is changed (MLflow marks it before loading the model), because
    both settings are process-wide and that process exists to serve the model. fullmodel models
    call this when they are loaded, unless the serving setting ``tune_server`` is false; a
    PythonModel can call it from its ``load_context``. Returns whether the process was tuned.

    The server turns every request into a DataFrame. pandas 3 stores its strings in Arrow arrays,
    and each Arrow call releases the GIL; with the server's event loop and predict threads waiting
    for it, every release costs a thread switch, which makes pandas the server's largest cost per
    request. Python-object string storage holds the same ``str`` values without those calls.

    The objects that exist once the model is loaded (MLflow, torch, pandas, the model: several
    hundred thousand) live as long as the server. Frozen, they are left out of the garbage
    collector's full collections, each of which would otherwise stop every request for about
    55 ms, about twice a second under load.

    Example::

        >>> import mlflow, torch
        >>> import mlflow_fullmodel
        >>> class MyModel(mlflow.pyfunc.PythonModel):
        ...     def load_context(self, context):
        ...         self.net = torch.jit.load(context.artifacts["net"])
        ...         mlflow_fullmodel.tune_scoring_server()
        >>> mlflow_fullmodel.tune_scoring_server()      # outside a scoring server: nothing to tune
        False
    """
    if SERVER_MODEL_PATH_VARIABLE not in os.environ:
        return False
    try:
        pd.set_option("mode.string_storage", "python")
    except (KeyError, ValueError) as error:  # a pandas without the option or the value
        _logger.info("Request strings stay in pandas' default storage: %s", error)
    gc.collect()  # loading's own garbage first: frozen, it would never be freed
    gc.freeze()
    return True


def server_workers() -> int:
    """How many worker processes the scoring server runs: ``mlflow models serve -w N`` starts
    ``uvicorn --workers N``, which a worker finds on its own command line (one worker) or on its
    supervisor's (several). 1 where it cannot be read."""
    for pid in ("self", str(os.getppid())):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                arguments = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(re.search(r"uvicorn", a) for a in arguments) and "--workers" in arguments:
            value = arguments[arguments.index("--workers") + 1]
            if value.isdigit():
                return max(1, int(value))
    return 1


def default_thread_count(workers: int, cores: int | None = None) -> int:
    """torch intra-op threads per worker of a scoring server: half the cores shared by the
    workers, at least one (the other half parses and answers requests while a forward pass runs)."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // (2 * workers))


def set_thread_count(settings: ServingSettings) -> None:
    """Apply the ``num_threads`` setting; in a scoring server without one, the default for its
    number of workers."""
    threads = settings.num_threads
    if threads is None and SERVER_MODEL_PATH_VARIABLE in os.environ:
        threads = default_thread_count(server_workers())
    if threads:
        torch.set_num_threads(threads)


def serve(fullmodel: FullModel, settings: ServingSettings, output_columns: list[str],
          input_types: Mapping[str, str] | None = None) -> ServedModel:
    """The pyfunc wrapper of a loaded model, with micro-batching as configured, the scoring
    server's process tuned last (it freezes what loading created)."""
    batching = settings.batching
    if batching is None:
        batching = fullmodel.device.type == "cuda"
    batcher = None
    if batching:
        batcher = MicroBatcher(fullmodel, max_batch_size=settings.max_batch_size or fullmodel.batch_size,
                               max_wait_ms=settings.max_wait_ms)
    if settings.tune_server:
        tune_scoring_server()
    binary_columns = frozenset(c for c, kind in (input_types or {}).items() if kind == "binary")
    limits = RequestLimits(settings.max_rows, settings.max_text_chars, settings.max_bytes, settings.max_samples,
                           binary_columns)
    admission = Admission(settings.heavy_samples, settings.max_heavy_requests or default_heavy_requests())
    return ServedModel(fullmodel, batcher, output_columns, limits, settings.deadline_s, admission, input_types)
