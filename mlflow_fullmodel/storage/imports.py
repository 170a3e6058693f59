"""Importing a saved model's captured code without letting it leak into, or collide with, the rest
of the process.

Two models may both ship a ``processing.py``. Each model's code is imported with its folder first on
``sys.path``; afterwards the modules it brought are taken out of ``sys.modules`` (the classes keep
their own module globals alive) and whatever those names meant before is put back. So a champion and
a challenger load side by side, and the training process's own modules are untouched. An import that
the captured code runs later, inside a function, goes through the model's own ``__import__`` (set in
each captured module's builtins before it runs), which imports from the model's folder and modules
in the same way.

The spec is closed: a step's target must name a module of the model's captured code or of
mlflow_fullmodel (checked before anything is imported), and resolve to a step class defined there
(checked before it is called). A spec naming ``subprocess:getoutput`` or ``builtins:open`` is
refused without running anything.
"""

from __future__ import annotations

import builtins
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from types import ModuleType
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
    importer = _ModelImporter(code_dir, names) if code_dir and names else None
    with importer.active() if importer is not None else nullcontext():
        return {label: _step_class(label, target, _resolve(target), allowed) for label, target in targets.items()}


class _ModelImporter:
    """Imports one model's captured modules, for that model alone: with its folder on ``sys.path``
    and its modules in ``sys.modules`` only while it imports."""

    def __init__(self, code_dir: str, names: set[str]) -> None:
        self.code_dir = code_dir
        self.names = names
        self.modules: dict[str, ModuleType] = {}  # the model's own, kept out of sys.modules
        self.builtins = {**vars(builtins), "__import__": self.import_}
        self._finder = _CapturedFinder(self)
        self._depth = 0

    def owns(self, name: str) -> bool:
        return name.split(".")[0] in self.names

    def import_(self, name: str, globals: Mapping[str, Any] | None = None, locals: Any = None,
                fromlist: Sequence[str] = (), level: int = 0) -> ModuleType:
        absolute = importlib.util.resolve_name("." * level + name, (globals or {}).get("__package__") or "") \
            if level else name
        if not self.owns(absolute):
            return builtins.__import__(name, globals, locals, fromlist, level)
        # A step's import at call time, once its module is loaded: no lock, no sys.modules swap.
        # ``import a.b`` passes fromlist=None.
        loaded = self.modules.get(absolute)
        if loaded is not None and all(hasattr(loaded, attribute) for attribute in fromlist or ()):
            return loaded if fromlist else self.modules[absolute.partition(".")[0]]
        with self.active():
            return builtins.__import__(name, globals, locals, fromlist, level)

    @contextmanager
    def active(self) -> Iterator[None]:
        with _IMPORT_LOCK:
            if self._depth:  # an import inside an import of this model
                yield
                return
            saved = {k: sys.modules.pop(k) for k in list(sys.modules) if self.owns(k)}
            sys.modules.update(self.modules)
            dont_write_bytecode = sys.dont_write_bytecode
            sys.path.insert(0, self.code_dir)
            sys.meta_path.insert(0, self._finder)
            sys.dont_write_bytecode = True  # keep the model folder exactly as hashed
            importlib.invalidate_caches()
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                sys.meta_path.remove(self._finder)
                sys.path.remove(self.code_dir)
                sys.dont_write_bytecode = dont_write_bytecode
                for key in [k for k in sys.modules if self.owns(k)]:
                    self.modules[key] = sys.modules.pop(key)
                sys.modules.update(saved)


class _CapturedFinder(importlib.abc.MetaPathFinder):
    """Finds the model's modules in its folder, with a loader that gives them the model's builtins."""

    def __init__(self, importer: _ModelImporter) -> None:
        self.importer = importer

    def find_spec(self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None) -> Any:
        if not self.importer.owns(name):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path if path is not None else [self.importer.code_dir])
        if spec is not None and isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            spec.loader = _WithBuiltins(spec.loader, self.importer.builtins)
        return spec


class _WithBuiltins(importlib.abc.Loader):
    def __init__(self, loader: importlib.machinery.SourceFileLoader, module_builtins: dict[str, Any]) -> None:
        self.loader = loader
        self.module_builtins = module_builtins

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # Before the module runs: its functions take their builtins from its globals when defined.
        module.__dict__["__builtins__"] = self.module_builtins
        self.loader.exec_module(module)


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
