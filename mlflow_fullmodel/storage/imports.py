"""Importing a saved model's captured code without letting it leak into, or collide with, the rest
of the process.

Two models may both ship a ``processing.py``. Each model's code is imported with its folder first on
``sys.path``; afterwards the modules it brought are taken out of ``sys.modules`` (the classes keep
their own module globals alive) and whatever those names meant before is put back. So a champion and
a challenger load side by side, and the training process's own modules are untouched.

The spec is closed: a step's target must name a module of the model's captured code or of
mlflow_fullmodel (checked before anything is imported), and resolve to a step class defined there
(checked before it is called). A spec naming ``subprocess:getoutput`` or ``builtins:open`` is
refused without running anything.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from collections.abc import Mapping
from typing import Any

from mlflow_fullmodel.exceptions import IntegrityError, ModelFormatError
from mlflow_fullmodel.storage.capture import RUNTIME_PACKAGE
from mlflow_fullmodel.transform import Configurable

__all__ = ["import_steps"]

# sys.path and sys.modules are process-wide: one model's import at a time.
_IMPORT_LOCK = threading.RLock()


def _top_level_names(code_dir: str) -> set[str]:
    names = set()
    for entry in os.listdir(code_dir):
        path = os.path.join(code_dir, entry)
        if entry.endswith(".py"):
            names.add(entry[:-3])
        elif os.path.isdir(path) and entry.isidentifier():
            names.add(entry)
    return names


def import_steps(targets: Mapping[str, str], code_dir: str | None) -> dict[str, type[Configurable]]:
    """Resolve each step's ``"module:qualname"`` target (by step label) to its step class, importing
    captured modules from ``code_dir``.

    Raises:
        IntegrityError: A target is not a step class of the captured code or of mlflow_fullmodel.
        ModelFormatError: A captured module cannot be imported.
    """
    names = _top_level_names(code_dir) if code_dir and os.path.isdir(code_dir) else set()
    allowed = names | {RUNTIME_PACKAGE}
    for label, target in targets.items():
        _check_module(label, target, allowed)
    with _IMPORT_LOCK:
        saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] in names}
        dont_write_bytecode = sys.dont_write_bytecode
        if names and code_dir:  # names are the modules found in code_dir
            sys.path.insert(0, code_dir)
            sys.dont_write_bytecode = True  # keep the model folder exactly as hashed
            importlib.invalidate_caches()
        try:
            return {label: _step_class(label, target, _resolve(target), allowed) for label, target in targets.items()}
        finally:
            if names and code_dir:
                sys.path.remove(code_dir)
                sys.dont_write_bytecode = dont_write_bytecode
                for key in [k for k in sys.modules if k.split(".")[0] in names]:
                    del sys.modules[key]
            sys.modules.update(saved)


def _refused(label: str, target: Any, why: str) -> IntegrityError:
    return IntegrityError(
        f"Step {label}: the target {target!r} {why}. A saved model's steps are step classes of its own "
        f"captured code or of {RUNTIME_PACKAGE}; the spec was changed after saving. Restore the model "
        "from its source (download it again)."
    )


def _check_module(label: str, target: Any, allowed: set[str]) -> None:
    module_name, _, qualname = target.partition(":") if isinstance(target, str) else ("", "", "")
    if not module_name or not qualname:
        raise _refused(label, target, "is not of the form 'module:qualname'")
    if module_name.split(".")[0] not in allowed:
        raise _refused(label, target, f"names the module '{module_name}', which is not part of the model")


def _step_class(label: str, target: str, value: Any, allowed: set[str]) -> type[Configurable]:
    if not (isinstance(value, type) and issubclass(value, Configurable)):
        raise _refused(label, target, f"is a {type(value).__name__}, not a step class")
    if value.__module__.split(".")[0] not in allowed:
        raise _refused(label, target, f"is defined in '{value.__module__}', which is not part of the model")
    return value


def _resolve(target: str) -> Any:
    module_name, _, qualname = target.partition(":")
    try:
        value: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelFormatError(
            f"Cannot import module '{module_name}' for step {target}: {error}. If it comes from a "
            "package, install it (see the model's requirements.txt)."
        ) from error
    for part in qualname.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise ModelFormatError(f"Module '{module_name}' has no attribute '{qualname}' (step {target}).") from None
    return value
