"""mlflow_fullmodel: pre-processing, forward pass and post-processing saved as one MLflow model.

The data path (``FullModel``, transforms, collation, forward strategies) needs only torch; the
MLflow flavor functions are imported on first use, so ``import mlflow_fullmodel`` stays light.

Example::

    >>> import torch
    >>> import mlflow_fullmodel as fm
    >>> from mlflow_fullmodel.transforms import TopK
    >>> @fm.transform
    ... def marks(text: str) -> torch.Tensor:      # a stand-in for SentencePieceEncode
    ...     return torch.tensor([text.count("!"), text.count("?")], dtype=torch.float)
    >>> model = fm.FullModel(
    ...     preprocess=[marks],
    ...     module=fm.script(torch.nn.Linear(2, 2)),
    ...     postprocess=[TopK(labels=["neg", "pos"], k=fm.Param(1))],
    ... )
    >>> sorted(model.params)
    ['k', 'on_error']

Then ``fm.log_model(model, name="model", input_example=["What a film!"])`` in an MLflow run
saves it as one MLflow model.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from mlflow_fullmodel.collate import Batch, PadCollate
from mlflow_fullmodel.decoding import BeamSearch, GreedySearch
from mlflow_fullmodel.exceptions import (
    AuditError,
    CodeCaptureError,
    ConfigError,
    DeadlineError,
    DeviceError,
    DriftError,
    FullModelError,
    InputError,
    IntegrityError,
    ModelError,
    ModelFormatError,
    ParamError,
    ParityError,
    SignatureError,
    StreamingError,
)
from mlflow_fullmodel.forward import AverageOverSamples, CallModule, ForwardStrategy
from mlflow_fullmodel.modules import script
from mlflow_fullmodel.pipeline import FullModel
from mlflow_fullmodel.transform import Artifact, Param, Transform, transform

_FLAVOR_FUNCTIONS = {"save_model", "log_model", "load_model", "get_default_pip_requirements", "FLAVOR_NAME"}
_SERVING_FUNCTIONS = {"tune_scoring_server"}

__all__ = [
    "Artifact",
    "AuditError",
    "AverageOverSamples",
    "Batch",
    "BeamSearch",
    "CallModule",
    "CodeCaptureError",
    "ConfigError",
    "DeadlineError",
    "DeviceError",
    "DriftError",
    "ForwardStrategy",
    "FullModel",
    "FullModelError",
    "GreedySearch",
    "InputError",
    "IntegrityError",
    "ModelError",
    "ModelFormatError",
    "PadCollate",
    "Param",
    "ParamError",
    "ParityError",
    "SignatureError",
    "StreamingError",
    "Transform",
    "script",
    "transform",
    *sorted(_FLAVOR_FUNCTIONS | _SERVING_FUNCTIONS),
]


def __getattr__(name: str) -> Any:
    if name in _FLAVOR_FUNCTIONS:
        from mlflow_fullmodel import flavor

        return getattr(flavor, name)
    if name in _SERVING_FUNCTIONS:
        from mlflow_fullmodel import serving

        return getattr(serving, name)
    raise AttributeError(f"module 'mlflow_fullmodel' has no attribute '{name}'")
