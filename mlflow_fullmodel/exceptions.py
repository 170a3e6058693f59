"""Exceptions raised by mlflow_fullmodel.

Every message names the object at fault (stage, argument, row, column, parameter or file),
what was received and, where there is one, the fix.
"""

from __future__ import annotations


class FullModelError(Exception):
    """Base class of every error this package raises on purpose."""

    #: For an error of ``verify_model``: the checks that had passed before it (a record of a failed
    #: verification lists only what ran).
    checks_passed: tuple[str, ...] = ()


class ConfigError(FullModelError, ValueError):
    """A transform, strategy or FullModel was configured in a way that cannot work or be saved."""


class ParamError(FullModelError, ValueError):
    """A runtime parameter passed to ``predict`` is unknown or has an invalid value."""


class InputError(FullModelError, ValueError):
    """The data passed to ``predict`` is malformed: a missing column or a row a stage rejected."""


class LimitError(InputError):
    """A request is over one of the serving limits (rows, characters, bytes, samples): too much,
    rather than wrong."""


class ModelError(FullModelError):
    """A step or module of the model failed in a way the input does not explain (a bug in a
    transform, a module that raises): the model's fault, not the caller's. ``step`` names it."""

    def __init__(self, message: str, step: str = "") -> None:
        super().__init__(message)
        self.step = step


class StreamingError(FullModelError, ValueError):
    """A stream was asked of a model whose forward strategy computes its answer in one call, or for
    other than one row: the request's fault, as it can be answered without streaming."""


class DeadlineError(FullModelError):
    """A call's work went on past its deadline and was stopped between steps or batches."""


class CodeCaptureError(FullModelError):
    """The source code of a stage could not be captured into the saved model."""


class ModelFormatError(FullModelError):
    """A saved model folder is unreadable, incomplete or was written by an incompatible version."""


class IntegrityError(ModelFormatError):
    """A file of a saved model is missing, was changed, or was added after saving."""


class SignatureError(IntegrityError):
    """A model is not signed, or not by the expected key, or changed since it was signed."""


class ParityError(FullModelError):
    """A reloaded model did not reproduce the outputs recorded when it was saved.

    ``stage`` says what failed: ``"install"`` (its environment could not be built), ``"import"``
    (it did not load), ``"outputs"`` (it answered differently), ``"batch"`` (a row's answer changes
    when it is batched with other rows), ``"compiled"`` (the AOTInductor package answered further
    from the golden outputs than its tolerance) or ``"timeout"`` (the clean process took too long).
    """

    def __init__(self, message: str, stage: str = "outputs") -> None:
        super().__init__(message)
        self.stage = stage


class DriftError(FullModelError):
    """A quantized model's outputs moved further from the float model's than ``max_drift`` allows."""


class AuditError(FullModelError):
    """The registry's audit trail cannot answer: an alias with no audited previous version to roll
    back to, an alias that is not set, or an audit record that is not one ``promote`` wrote."""


class DeviceError(FullModelError):
    """The requested torch device is not available on this machine."""
