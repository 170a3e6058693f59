"""The serving settings of a loaded model: one typed object, resolved and checked once, when the
model loads.

Each setting comes from the pyfunc ``model_config`` (``mlflow.pyfunc.load_model(uri,
model_config={...})``), else from its ``MLFLOW_FULLMODEL_*`` environment variable (how
``mlflow models serve`` is configured), else its default. A value that does not parse, or is out
of its range, is a ``ConfigError`` naming the setting, its variable and what it accepts: a
misspelled ``MLFLOW_FULLMODEL_BATCHING=ture`` stops the server instead of turning batching off.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mlflow_fullmodel.exceptions import ConfigError

__all__ = [
    "DEFAULT_GRACE_PERIOD_S", "DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_JSON_DEPTH", "ServingSettings", "variable_of",
]

#: What ``mlflow-fullmodel serve`` reads of a request at most, before MLflow sees it (hardened.Guard).
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_JSON_DEPTH = 32
#: How long ``mlflow-fullmodel serve`` goes on answering the requests it has taken after a SIGTERM.
DEFAULT_GRACE_PERIOD_S = 30

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _setting(default: Any, variable: str, minimum: float | None = None, doc: str = "") -> Any:
    return field(default=default, metadata={"variable": variable, "minimum": minimum, "doc": doc})


@dataclass(frozen=True)
class ServingSettings:
    """How a loaded model serves. ``None`` means "decide from the machine", as each field says."""

    device: str = _setting("cpu", "MLFLOW_FULLMODEL_DEVICE", doc="cpu, cuda or cuda:N")
    #: None: on for CUDA, where a batch costs about what one example does; off on the CPU, where
    #: intra-op threads already spread one example over the cores.
    batching: bool | None = _setting(None, "MLFLOW_FULLMODEL_BATCHING")
    #: None: the model's batch_size.
    max_batch_size: int | None = _setting(None, "MLFLOW_FULLMODEL_MAX_BATCH_SIZE", 1)
    max_wait_ms: float = _setting(2.0, "MLFLOW_FULLMODEL_MAX_WAIT_MS", 0)
    #: None: in a scoring server, half the cores shared by its workers; torch's default elsewhere.
    num_threads: int | None = _setting(None, "MLFLOW_FULLMODEL_NUM_THREADS", 1)
    #: Process-wide settings for a scoring server's own process (serving.tune_scoring_server).
    tune_server: bool = _setting(True, "MLFLOW_FULLMODEL_TUNE_SERVER")
    # Limits on one request, checked before any work (serving.RequestLimits).
    max_rows: int = _setting(10_000, "MLFLOW_FULLMODEL_MAX_ROWS", 1)
    max_text_chars: int = _setting(100_000, "MLFLOW_FULLMODEL_MAX_TEXT_CHARS", 1)
    max_bytes: int = _setting(16 * 1024 * 1024, "MLFLOW_FULLMODEL_MAX_BYTES", 1)
    max_samples: int = _setting(20_000, "MLFLOW_FULLMODEL_MAX_SAMPLES", 1)
    #: A little under the scoring server's own timeout (60 s), which answers 504 but lets the work run on.
    deadline_s: float = _setting(55.0, "MLFLOW_FULLMODEL_DEADLINE_S", 0.001)
    # Heavy requests at once (serving.Admission).
    heavy_samples: int = _setting(256, "MLFLOW_FULLMODEL_HEAVY_SAMPLES", 1)
    #: None: the scoring server's request threads but two.
    max_heavy_requests: int | None = _setting(None, "MLFLOW_FULLMODEL_MAX_HEAVY_REQUESTS", 1)

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            object.__setattr__(self, spec.name, _parse(spec, getattr(self, spec.name)))

    @classmethod
    def resolve(cls, model_config: Mapping[str, Any] | None = None,
                environ: Mapping[str, str] | None = None) -> ServingSettings:
        """The settings from ``model_config``, else the environment (``os.environ``), else the
        defaults; a key of ``model_config`` that is no setting is an error naming the valid ones.

        Example::

            >>> ServingSettings.resolve({"max_rows": 100}, environ={"MLFLOW_FULLMODEL_BATCHING": "on"})
            ... # doctest: +ELLIPSIS
            ServingSettings(device='cpu', batching=True, max_batch_size=None, max_wait_ms=2.0, ..., max_rows=100, ...)
        """
        environ = os.environ if environ is None else environ
        given = {k: v for k, v in (model_config or {}).items() if v is not None}
        names = cls.names()
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ConfigError(f"Unknown model_config key(s) {unknown} for a fullmodel model; "
                              f"valid keys: {list(names)}.")
        values = {}
        for spec in dataclasses.fields(cls):
            if spec.name in given:
                values[spec.name] = given[spec.name]
            elif environ.get(spec.metadata["variable"], "").strip():
                values[spec.name] = environ[spec.metadata["variable"]]
        return cls(**values)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(spec.name for spec in dataclasses.fields(cls))


def variable_of(setting: str) -> str:
    """The environment variable of a setting."""
    return next(spec.metadata["variable"] for spec in dataclasses.fields(ServingSettings) if spec.name == setting)


def _parse(spec: dataclasses.Field, value: Any) -> Any:
    """``value`` as the field's type, or a ConfigError saying what the field accepts."""
    kind = str(spec.type).replace(" | None", "")
    optional = "None" in str(spec.type)
    if value is None:
        if optional:
            return None
        raise _invalid(spec, value, _accepts(kind, spec.metadata["minimum"]))
    text = value.strip().lower() if isinstance(value, str) else None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise _invalid(spec, value, "true or false (or 1/0, yes/no, on/off)")
    if kind == "str":
        if isinstance(value, str) and value.strip():
            return _device(spec, value.strip())
        raise _invalid(spec, value, spec.metadata["doc"])
    number = _number(value, text, integer=kind == "int")
    minimum = spec.metadata["minimum"]
    if number is None or (minimum is not None and number < minimum):
        raise _invalid(spec, value, _accepts(kind, minimum))
    return number


def _number(value: Any, text: str | None, integer: bool) -> int | float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(text) if text is not None else value
    except ValueError:
        return None
    if not isinstance(number, (int, float)) or not math.isfinite(number):
        return None
    if integer:
        return int(number) if float(number).is_integer() else None
    return float(number)


def _device(spec: dataclasses.Field, value: str) -> str:
    import torch

    try:
        torch.device(value)
    except RuntimeError:
        raise _invalid(spec, value, spec.metadata["doc"]) from None
    return value


def _accepts(kind: str, minimum: float | None) -> str:
    what = "an integer" if kind == "int" else "a number"
    if minimum is None:
        return what
    return f"{what} >= {int(minimum) if kind == 'int' else minimum}" if minimum else f"{what} >= 0"


def _invalid(spec: dataclasses.Field, value: Any, accepts: str) -> ConfigError:
    return ConfigError(f"{spec.name} ({spec.metadata['variable']}) must be {accepts}, got {value!r}.")
