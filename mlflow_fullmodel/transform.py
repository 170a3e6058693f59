"""Configured steps of the data path: ``Transform``, ``Artifact``, ``Param`` and ``@transform``.

The configuration of a step is exactly its constructor arguments (the scikit-learn estimator
contract). They are recorded when the object is created, read back by signature introspection,
shown by ``repr`` and stored as JSON when the model is saved. Anything else a step holds is private
(``_name``) and rebuilt from those arguments.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
from collections.abc import Callable, Hashable, Mapping
from typing import Any, ClassVar

from mlflow_fullmodel._checks import is_int, is_number
from mlflow_fullmodel._hashing import read_verified
from mlflow_fullmodel.exceptions import ConfigError, ParamError

__all__ = ["Artifact", "Configurable", "Param", "Transform", "transform"]


class Artifact(os.PathLike):
    """A file or directory a step needs at inference time (a tokenizer model, a vocabulary, ...).

    It is copied into the saved model under a stable name, hashed, and re-pointed at the copy when
    the model is loaded. Use it wherever a path is expected (``open(artifact)``, ``os.fspath``), or
    read a file with ``read_bytes()``, which checks a loaded model's file against its recorded hash.

    Args:
        path: The file or directory on the local file system.
        sha256: The hash the file must have; set by the loader for the files of a saved model.

    Example::

        >>> with open("labels.txt", "w") as f:
        ...     _ = f.write("neg pos")
        >>> labels = Artifact("labels.txt")
        >>> labels
        Artifact('labels.txt')
        >>> labels.read_bytes()
        b'neg pos'

    A step takes it where it takes a path: ``SentencePieceEncode(Artifact("spm.model"))``.
    """

    def __init__(self, path: str | os.PathLike[str], *, sha256: str | None = None) -> None:
        self.path = os.fspath(path)
        self.sha256 = sha256

    def __fspath__(self) -> str:
        return self.path

    def read_bytes(self) -> bytes:
        """The file's content, checked against ``sha256`` when there is one: read and checked in
        one go, so a file swapped after the model was loaded is refused, not used.

        Raises:
            IntegrityError: The file does not have the recorded hash.
        """
        return read_verified(self.path, self.sha256)

    def __repr__(self) -> str:
        return f"Artifact({self.path!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Artifact) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)


_PARAM_TYPES = (bool, int, float, str)


class Param:
    """A runtime parameter: a default saved with the model, overridable per ``predict`` call.

    Each ``Param`` becomes an entry of the MLflow signature's ``ParamSchema``, so a scoring request
    can send ``"params": {"k": 3}``. Its name is the constructor argument it is passed to.

    Args:
        default: The value used when a call does not set the parameter: a bool, int, float or str.
        minimum: The smallest accepted value (numbers only), or None.
        maximum: The largest accepted value (numbers only), or None.
        choices: The accepted values, or None for any value of the default's type.

    Example::

        >>> from mlflow_fullmodel.transforms import TopK
        >>> top = TopK(labels=["neg", "pos"], k=Param(1, minimum=1))
        >>> top.params()
        {'k': Param(1, minimum=1)}
        >>> top.params()["k"].validate("k", 2.0)    # a request's value, converted to int
        2
    """

    def __init__(
        self,
        default: bool | int | float | str,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
        choices: list[Any] | None = None,
    ) -> None:
        if not isinstance(default, _PARAM_TYPES):
            raise ConfigError(
                f"Param default must be a bool, int, float or str, got {type(default).__name__} "
                f"({default!r})."
            )
        for key, bound in (("minimum", minimum), ("maximum", maximum)):
            if bound is not None and not is_number(bound):
                raise ConfigError(
                    f"Param({default!r}, {key}={bound!r}): {key} must be a number (an int or a float), "
                    f"got a {type(bound).__name__}."
                )
            if bound is not None and isinstance(default, str):
                raise ConfigError(
                    f"Param({default!r}, {key}={bound!r}): {key} bounds numbers only, and the default "
                    "is a str; limit a str with choices=[...]."
                )
        self.default = default
        self.minimum = minimum
        self.maximum = maximum
        self.choices = list(choices) if choices is not None else None
        self.validate("default", default)

    @property
    def type(self) -> type:
        return type(self.default)

    def validate(self, name: str, value: Any) -> bool | int | float | str:
        """Return ``value`` converted to this parameter's type, or raise ``ParamError``."""
        value = _coerce(name, value, self.type)
        if self.minimum is not None and value < self.minimum:
            raise ParamError(f"Parameter '{name}' must be >= {self.minimum}, got {_shown(value)}.")
        if self.maximum is not None and value > self.maximum:
            raise ParamError(f"Parameter '{name}' must be <= {self.maximum}, got {_shown(value)}.")
        if self.choices is not None and value not in self.choices:
            raise ParamError(f"Parameter '{name}' must be one of {self.choices}, got {_shown(value)}.")
        return value

    def to_dict(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"default": self.default}
        for key in ("minimum", "maximum", "choices"):
            if getattr(self, key) is not None:
                spec[key] = getattr(self, key)
        return spec

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> Param:
        return cls(**spec)

    def __repr__(self) -> str:
        return param_text(self.to_dict())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Param) and other.to_dict() == self.to_dict()

    __hash__ = None  # type: ignore[assignment]  # None marks the class unhashable


def param_default(value: Any) -> Any:
    """A configured argument's saved value: its default when it is a ``Param``, else itself."""
    return value.default if isinstance(value, Param) else value


def param_value(value: Any, params: Mapping[str, Any], name: str) -> Any:
    """The value of the configured argument ``name`` (holding ``value``) for one call: the one in
    ``params`` when the call sets it, else the saved one (``param_default``)."""
    return params.get(name, param_default(value))


def param_text(spec: Mapping[str, Any]) -> str:
    """A Param as code shows it, from its saved form (``Param.to_dict``): ``Param(1, maximum=3)``."""
    extras = "".join(f", {k}={v!r}" for k, v in spec.items() if k != "default")
    return f"Param({spec.get('default')!r}{extras})"


def _coerce(name: str, value: Any, kind: type) -> Any:
    # JSON and MLflow's param schema deliver numpy scalars and ints for floats; accept what is
    # unambiguous, refuse the rest with a message naming the parameter.
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if is_int(value):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if is_number(value) and math.isfinite(value):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    raise ParamError(f"Parameter '{name}' must be of type {kind.__name__}, got {_shown(value)}.")


def _shown(value: Any) -> str:
    """A parameter value as an error message may show it: a number as it is, anything else by its
    type and size only, since a request's text goes back to whoever sent it (and into logs)."""
    if isinstance(value, (bool, int, float)) and len(repr(value)) <= 32:
        return repr(value)
    if isinstance(value, (str, bytes, list, tuple, dict)):
        return f"a {type(value).__name__} of length {len(value)}"
    return f"a {type(value).__name__}"


class Configurable:
    """Base of every saved step: its configuration is its constructor arguments.

    Subclasses declare their configuration as named ``__init__`` arguments (no ``*args`` or
    ``**kwargs``). The arguments are stored as same-named attributes before ``__init__`` runs, so
    ``__init__`` only validates. Public attributes that are not constructor arguments are refused at
    save time, because they would be lost. A subclass annotates those attributes in its class body
    (``max_length: int``, no value) so that a type checker knows them.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for parameter in _init_parameters(cls):
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                raise TypeError(
                    f"{cls.__qualname__}.__init__ takes *{parameter.name}; the configuration of a "
                    "step must be named arguments so that it can be saved and shown."
                )

    def __new__(cls, *args: Any, **kwargs: Any) -> Configurable:
        obj = super().__new__(cls)
        signature = inspect.Signature(_init_parameters(cls))
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as error:
            raise TypeError(f"{cls.__qualname__}: {error}") from None
        bound.apply_defaults()
        for name, value in bound.arguments.items():
            object.__setattr__(obj, name, value)
        return obj

    def __init__(self) -> None:
        """Subclasses with configuration override this; arguments are already stored."""

    def __getnewargs_ex__(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        # copy, deepcopy and pickle (DataLoader workers under spawn) rebuild an object with
        # ``cls.__new__(cls, *args, **kwargs)``: hand it the configuration, which ``__new__``
        # needs, then the object's state (private attributes included) is restored as usual.
        return (), self.get_config()

    @classmethod
    def config_names(cls) -> list[str]:
        return [p.name for p in _init_parameters(cls)]

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, as currently held by the object."""
        config = {}
        for name in self.config_names():
            if name not in vars(self):
                raise ConfigError(
                    f"{type(self).__qualname__} has no attribute '{name}' for its constructor "
                    f"argument '{name}'; keep each argument under its own name."
                )
            config[name] = vars(self)[name]
        return config

    def check_attributes(self) -> None:
        """Refuse public attributes that are not constructor arguments: they would not be saved."""
        extra = sorted(
            name for name in vars(self) if not name.startswith("_") and name not in self.config_names()
        )
        if extra:
            raise ConfigError(
                f"{type(self).__qualname__} has public attribute(s) {extra} that are not constructor "
                "arguments, so they would not be saved with the model. Make them constructor "
                "arguments, or prefix them with '_' if they are derived from the arguments."
            )

    def params(self) -> dict[str, Param]:
        """The runtime parameters this step declares, by argument name."""
        return {name: value for name, value in self.get_config().items() if isinstance(value, Param)}

    def resolved_config(self, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The configuration with each ``Param`` replaced by its value for one call."""
        params = params or {}
        return {
            name: param_value(value, params, name) if isinstance(value, Param) else value
            for name, value in self.get_config().items()
        }

    def __repr__(self) -> str:
        defaults = {p.name: p.default for p in _init_parameters(type(self))}
        shown = []
        for name, value in self.get_config().items():
            default = defaults.get(name, inspect.Parameter.empty)
            if default is inspect.Parameter.empty or not _same(value, default):
                shown.append(f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.get_config() == self.get_config()

    # Equal steps (same class, same configuration) must not hash apart, and a configuration holds
    # lists and dicts: a step is not hashable, like a Param. (object.__hash__ is typed to exist.)
    __hash__ = None  # type: ignore[assignment]


def _same(value: Any, default: Any) -> bool:
    try:
        return bool(value == default)
    except Exception:  # arrays and tensors compare element-wise
        return value is default


def _init_parameters(cls: type) -> tuple[inspect.Parameter, ...]:
    return _cached_init_parameters(cls)


# Cached: predict asks every step for its params on every call. A class is hashable (by identity)
# although its instances are not (``__hash__ = None``); a type checker cannot tell the two apart,
# so the cache takes a Hashable.
@functools.cache
def _cached_init_parameters(cls: Hashable) -> tuple[inspect.Parameter, ...]:
    assert isinstance(cls, type) and issubclass(cls, Configurable)
    init = cls.__init__
    if init is object.__init__:
        return ()
    parameters = tuple(inspect.signature(init).parameters.values())
    return parameters[1:]  # drop self


class Transform(Configurable):
    """A step applied to one example: a raw input in pre-processing, a model output in
    post-processing.

    Subclasses implement ``__call__(self, x, **params)``, where ``params`` holds the current values
    of the ``Param`` arguments the transform was constructed with, by argument name.

    Example::

        >>> class Normalize(Transform):
        ...     def __call__(self, text: str) -> str:
        ...         return " ".join(text.lower().split())
        >>> Normalize()("  What a   FILM!")
        'what a film!'
    """

    #: Pip requirements of the transform beyond torch, numpy and pandas, e.g. ``["sentencepiece"]``.
    requirements: ClassVar[tuple[str, ...]] = ()

    # Typed as taking anything: a step is called with only the Params it declares, so each
    # subclass has its own signature (``(self, text)``, ``(self, image, **params)``).
    def __call__(self, *args: Any, **params: Any) -> Any:
        raise NotImplementedError(f"{type(self).__qualname__} must implement __call__(self, x).")

    def samples(self, **params: Any) -> int:
        """How many samples this step makes of each example with these params (test-time
        augmentation makes several); a served request's work is bounded by rows x samples."""
        return 1

    def batch(self, xs: list[Any], /, **params: Any) -> list[Any]:
        """The transform applied to many examples; override where one vectorised call beats a
        loop. It must give what ``[self(x) for x in xs]`` gives. If it raises, FullModel falls
        back to calling the transform row by row, so errors can still name the row."""
        return [self(x, **params) for x in xs]


class FunctionTransform(Transform):
    """A transform made from a plain function by the ``@transform`` decorator."""

    function: ClassVar[Callable[..., Any]]

    def __call__(self, x: Any, /, **params: Any) -> Any:
        return type(self).function(x, **self.resolved_config(params))


def transform(function: Callable[..., Any]) -> type[Transform]:
    """Turn a function of one example into a ``Transform`` class.

    The function's first argument is the example; its other arguments (each with a default) become
    the transform's constructor arguments. A default wrapped in ``Param`` is a runtime parameter.
    A ``FullModel`` accepts the class itself when the defaults will do.

    Example::

        >>> @transform
        ... def truncate(text: str, max_chars: int = 1000) -> str:
        ...     return text[:max_chars]
        >>> truncate(max_chars=4)
        truncate(max_chars=4)
        >>> truncate(max_chars=4)("What a film!")
        'What'

    ``FullModel(preprocess=[truncate(max_chars=200)], ...)`` uses it as a step.
    """
    parameters = list(inspect.signature(function).parameters.values())
    if not parameters or parameters[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        raise TypeError(f"@transform: {function.__qualname__} must take the example as first argument.")
    config = parameters[1:]
    for parameter in config:
        if parameter.default is inspect.Parameter.empty:
            raise TypeError(
                f"@transform: argument '{parameter.name}' of {function.__qualname__} needs a default."
            )

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:  # replaced signature below
        pass

    # inspect.signature reads __signature__; functions do not declare it.
    __init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in config]
    )
    namespace = {
        "__init__": __init__,
        "__module__": function.__module__,
        "__qualname__": function.__qualname__,
        "__doc__": function.__doc__,
        "function": staticmethod(function),
    }
    return type(function.__name__, (FunctionTransform,), namespace)
