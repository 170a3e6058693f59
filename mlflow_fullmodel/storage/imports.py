"""Importing a saved model's captured code without letting it leak into, or collide with, the rest
of the process.

Two models may both ship a ``processing.py``. Each model's code is imported with its folder first on
``sys.path``; afterwards the modules it brought are taken out of ``sys.modules`` (the classes keep
their own module globals alive) and whatever those names meant before is put back. So a champion and
a challenger load side by side, and the training process's own modules are untouched.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from collections.abc import Iterable
from typing import Any

from mlflow_fullmodel.exceptions import ModelFormatError

__all__ = ["import_targets"]

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


def import_targets(targets: Iterable[str], code_dir: str | None) -> dict[str, Any]:
    """Resolve each ``"module:qualname"`` target, importing captured modules from ``code_dir``."""
    targets = list(dict.fromkeys(targets))
    names = _top_level_names(code_dir) if code_dir and os.path.isdir(code_dir) else set()
    with _IMPORT_LOCK:
        saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] in names}
        dont_write_bytecode = sys.dont_write_bytecode
        if names:
            sys.path.insert(0, code_dir)
            sys.dont_write_bytecode = True  # keep the model folder exactly as hashed
            importlib.invalidate_caches()
        try:
            return {target: _resolve(target) for target in targets}
        finally:
            if names:
                sys.path.remove(code_dir)
                sys.dont_write_bytecode = dont_write_bytecode
                for key in [k for k in sys.modules if k.split(".")[0] in names]:
                    del sys.modules[key]
            sys.modules.update(saved)


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
