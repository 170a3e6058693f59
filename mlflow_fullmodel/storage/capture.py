"""Code capture: the source of the user's steps, copied into the model so it loads without the
training project.

A step defined in a module of the user's project is copied with its package layout and every local
module it imports, transitively. A step defined in ``__main__`` (a script or a notebook) is written
out as a module of its own, ``fullmodel_main``, holding its source, the sources of the ``__main__``
functions and classes it uses, and import lines or literal values for the other globals it uses.
Modules of installed distributions are not copied; they become pip requirements.
"""

from __future__ import annotations

import ast
import builtins
import dis
import importlib.metadata
import importlib.util
import inspect
import linecache
import logging
import os
import sys
import sysconfig
import textwrap
import types
from dataclasses import dataclass, field
from typing import Any

from mlflow_fullmodel.exceptions import CodeCaptureError

__all__ = ["CodeCapture", "MAIN_MODULE", "RUNTIME_PACKAGE", "pinned"]

#: The module name under which ``__main__`` definitions are saved.
MAIN_MODULE = "fullmodel_main"
RUNTIME_PACKAGE = "mlflow_fullmodel"

_logger = logging.getLogger(__name__)

_LITERAL_TYPES = (bool, int, float, complex, str, bytes, type(None), tuple, list, dict, set, frozenset)


def _public_roots() -> list[str]:
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    roots |= {p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")}
    return [os.path.realpath(r) for r in roots if r]


def pinned(distribution: str) -> str:
    """A pip requirement for ``distribution`` pinned to the installed version
    (``"torch==2.13.0"``), or its bare name when it is not installed. A local version label such
    as torch's ``+cpu`` is dropped: PyPI does not serve it."""
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return distribution
    return f"{distribution}=={version.split('+')[0]}"


@dataclass
class CodeCapture:
    """Collects the files and requirements needed to import a set of step classes elsewhere.

    ``add(obj)`` returns the import target (``"module:qualname"``) under which ``obj`` will be found
    in the saved model; ``files`` maps paths inside the model's code folder to their source text.
    """

    files: dict[str, str] = field(default_factory=dict)
    requirements: set[str] = field(default_factory=set)
    _main_definitions: dict[str, str] = field(default_factory=dict)
    _main_imports: dict[str, str] = field(default_factory=dict)
    _main_constants: dict[str, str] = field(default_factory=dict)
    _seen_modules: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._public = _public_roots()

    # -- entry point -----------------------------------------------------------------------------

    def add(self, obj: type, label: str) -> str:
        module_name = obj.__module__
        qualname = obj.__qualname__
        if "<locals>" in qualname:
            raise CodeCaptureError(
                f"{label}: {qualname} is defined inside a function, so it cannot be imported when "
                "the model is loaded. Define it at module level."
            )
        if module_name == "__main__":
            self._add_main_object(obj, label)
            return f"{MAIN_MODULE}:{qualname}"
        module = sys.modules.get(module_name)
        if module is None or _resolve(module, qualname) is not obj:
            raise CodeCaptureError(
                f"{label}: {module_name}.{qualname} is not the object that importing "
                f"{module_name} gives. Define it at module level under its own name. A step of a "
                "model loaded from MLflow cannot be captured again: save from the training code."
            )
        self._check_own_code(module_name, qualname, label)
        self.add_module(module_name, label)
        return f"{module_name}:{qualname}"

    def main_source(self) -> str | None:
        if not self._main_definitions:
            return None
        parts = [
            '"""Definitions captured from the training script or notebook (__main__)."""',
            "\n".join(sorted(self._main_imports.values())),
            "\n".join(f"{n} = {v}" for n, v in self._main_constants.items()),
            *self._main_definitions.values(),
        ]
        return "\n\n\n".join(p for p in parts if p) + "\n"

    def finish(self) -> None:
        """Add the captured ``__main__`` module, and what it imports, to ``files``."""
        source = self.main_source()
        if source is not None:
            self.files[f"{MAIN_MODULE}.py"] = source
            self._scan_imports(source, MAIN_MODULE, package="", label=f"module {MAIN_MODULE}")

    def _check_own_code(self, module_name: str, qualname: str, label: str) -> None:
        # A loaded model accepts only steps of its captured code or of the runtime, so that an edited
        # spec cannot name any importable callable; a step from an installed package is refused here
        # rather than when the model is loaded.
        top = module_name.split(".")[0]
        if top == RUNTIME_PACKAGE:
            return
        origin = _origin(module_name, quiet=True)
        if origin is None or not self._is_local(origin):
            raise CodeCaptureError(
                f"{label}: {qualname} is defined in the installed package '{top}', not in your project, "
                "and a saved model's steps must be its own captured code or mlflow_fullmodel's. Define "
                f"a subclass in a module of your project (class My{qualname.split('.')[-1]}"
                f"({module_name}.{qualname}): ...); '{top}' then becomes a requirement of the model."
            )

    # -- modules of the user's project -----------------------------------------------------------

    def add_module(self, module_name: str, label: str) -> None:
        """Capture ``module_name`` if it is local, or record its distribution as a requirement."""
        top = module_name.split(".")[0]
        if top == RUNTIME_PACKAGE or top in sys.stdlib_module_names or module_name in self._seen_modules:
            return
        self._seen_modules.add(module_name)
        origin = _origin(module_name)
        if origin is None:
            return  # built-in or namespace package: nothing to copy
        if not self._is_local(origin):
            self._add_requirement(top)
            return
        if not origin.endswith(".py"):
            raise CodeCaptureError(
                f"{label}: local module {module_name} is compiled ({os.path.basename(origin)}); only "
                "Python source can be captured. Install it as a package and list it in "
                "extra_pip_requirements."
            )
        parts = module_name.split(".")
        is_package = os.path.basename(origin) == "__init__.py"
        root = origin
        for _ in range(len(parts) + is_package):
            root = os.path.dirname(root)
        relative = os.path.relpath(origin, root)
        with open(origin, encoding="utf-8") as f:
            source = f.read()
        self.files[relative.replace(os.sep, "/")] = source
        for depth in range(1, len(parts)):
            self.add_module(".".join(parts[:depth]), label)  # parent packages' __init__.py
        package = module_name if is_package else module_name.rpartition(".")[0]
        self._scan_imports(source, module_name, package, label)

    def _scan_imports(self, source: str, module_name: str, package: str, label: str) -> None:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    self._add_imported(alias.name, label)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = package.split(".") if package else []
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)] if node.level > 1 else base_parts
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                if not base:
                    continue
                self._add_imported(base, label)
                for alias in node.names:
                    if alias.name != "*" and _origin(f"{base}.{alias.name}", quiet=True):
                        self._add_imported(f"{base}.{alias.name}", label)

    def _add_imported(self, module_name: str, label: str) -> None:
        try:
            self.add_module(module_name, label)
        except (ImportError, ValueError) as error:
            # Often an optional import the code guards itself; if it is needed, loading will fail.
            _logger.warning("%s: the module '%s' that the captured code imports cannot be found here (%s), so it "
                            "is neither captured nor a requirement.", label, module_name, error)

    def _is_local(self, origin: str) -> bool:
        real = os.path.realpath(origin)
        return not any(real.startswith(root + os.sep) for root in self._public)

    def _add_requirement(self, top: str) -> None:
        for name in importlib.metadata.packages_distributions().get(top, []):
            self.requirements.add(pinned(name))

    # -- definitions in __main__ -----------------------------------------------------------------

    def _add_main_object(self, obj: Any, label: str) -> None:
        main = sys.modules["__main__"]
        name = obj.__name__
        if name in self._main_definitions:
            return
        if vars(main).get(name) is not obj:
            raise CodeCaptureError(
                f"{label}: {name} is not a module-level name of __main__, so its source cannot be "
                "captured. Define it at the top level of the script or notebook."
            )
        source = _source_of(obj, label)
        self._add_main_definition(name, source, _global_names(obj, source), obj, label)

    def _add_main_definition(self, name: str, source: str, uses: set[str], user: Any, label: str) -> None:
        main = sys.modules["__main__"]
        self._main_definitions[name] = ""  # reserve: breaks cycles between functions
        for global_name in sorted(uses):
            if global_name != name and hasattr(main, global_name):
                self._add_main_global(global_name, getattr(main, global_name), user, label)
        # Re-insert so that dependencies precede their users in the written module.
        del self._main_definitions[name]
        self._main_definitions[name] = source

    def _add_main_global(self, name: str, value: Any, user: Any, label: str) -> None:
        if name in self._main_definitions or name in self._main_imports or name in self._main_constants:
            return
        if isinstance(value, types.ModuleType):
            statement = f"import {value.__name__}" if value.__name__ == name else f"import {value.__name__} as {name}"
            self._main_imports[name] = statement
            self.add_module(value.__name__, label)
        elif isinstance(value, (type, types.FunctionType)) and value.__module__ == "__main__":
            self._add_main_object(value, label)
        elif isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType)) and "." not in value.__qualname__:
            module = value.__module__
            statement = f"from {module} import {value.__qualname__}"
            self._main_imports[name] = statement + ("" if value.__qualname__ == name else f" as {name}")
            self.add_module(module, label)
        elif _is_literal(value):
            self._main_constants[name] = repr(value)
        elif (assignment := _main_assignment(name, user)) is not None:
            # e.g. PATTERN = re.compile(...): re-run the statement that made the value.
            source, uses = assignment
            self._add_main_definition(name, source, uses, user, label)
        else:
            raise CodeCaptureError(
                f"{label}: {user.__name__} (defined in __main__) uses the global '{name}' of type "
                f"{type(value).__name__}, which cannot be saved as source. Pass it to the constructor "
                "instead (an Artifact if it is a file), or move the code into a module of your project."
            )


def _main_assignment(name: str, user: Any) -> tuple[str, set[str]] | None:
    """The last top-level ``name = ...`` statement of the script or notebook cell defining ``user``,
    with the global names its right-hand side reads."""
    filenames = [getattr(sys.modules["__main__"], "__file__", None)]
    filenames += [code.co_filename for code in _code_objects(user)]
    for filename in dict.fromkeys(f for f in filenames if f):
        lines = linecache.getlines(filename)
        if not lines:
            continue
        source = "".join(lines)
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        found: tuple[ast.stmt, ast.expr] | None = None  # the last assignment, and its value
        for node in tree.body:
            targets: list[ast.expr]
            if isinstance(node, ast.Assign):
                targets, value = node.targets, node.value
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                targets, value = [node.target], node.value
            else:
                continue
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                found = node, value
        if found is not None:
            statement, value = found
            uses = {n.id for n in ast.walk(value) if isinstance(n, ast.Name)} - set(dir(builtins))
            return ast.get_source_segment(source, statement) or "", uses
    return None


def _resolve(module: types.ModuleType, qualname: str) -> Any:
    value: Any = module
    for part in qualname.split("."):
        value = getattr(value, part, None)
    return value


def _origin(module_name: str, quiet: bool = False) -> str | None:
    module = sys.modules.get(module_name)
    if module is not None:
        origin = getattr(module, "__file__", None)
        return origin
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError, AttributeError):
        if quiet:
            return None
        raise
    if spec is None:
        if quiet:
            return None
        raise ImportError(module_name)
    return spec.origin if spec.has_location else None


def _is_literal(value: Any) -> bool:
    if not isinstance(value, _LITERAL_TYPES):
        return False
    try:
        return bool(ast.literal_eval(repr(value)) == value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False


def _source_of(obj: Any, label: str) -> str:
    target = getattr(obj, "function", obj) if _is_function_transform(obj) else obj
    source: str | None
    try:
        source = inspect.getsource(target)
    except (OSError, TypeError):
        source = _class_source_from_methods(target) if isinstance(target, type) else None
        if source is None:
            raise CodeCaptureError(
                f"{label}: the source of {obj.__name__} (defined in __main__) is not available, as "
                "for code typed into `python -c` or an interactive shell. Define it in a script, a "
                "notebook cell or a module file."
            ) from None
    return textwrap.dedent(source).rstrip()


def _is_function_transform(obj: Any) -> bool:
    from mlflow_fullmodel.transform import FunctionTransform

    return isinstance(obj, type) and issubclass(obj, FunctionTransform) and obj is not FunctionTransform


def _class_source_from_methods(cls: type) -> str | None:
    # Notebooks keep cell sources in linecache; classes there have no __file__ for inspect to use.
    for value in vars(cls).values():
        function = getattr(value, "__func__", value)
        code = getattr(function, "__code__", None)
        if code is None:
            continue
        lines = linecache.getlines(code.co_filename)
        if not lines:
            continue
        for node in ast.walk(ast.parse("".join(lines))):
            if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if start <= code.co_firstlineno <= (node.end_lineno or 0):
                    return "".join(lines[start - 1 : node.end_lineno])
    return None


def _global_names(obj: Any, source: str) -> set[str]:
    """Names ``obj`` reads from its module's globals: at definition time (bases, decorators,
    annotations, class attributes) and when its functions run."""
    names: set[str] = set()
    tree = ast.parse(source)
    for node in _definition_time_nodes(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
    for code in _code_objects(obj):
        names |= _code_global_names(code)
    return names - set(dir(builtins))


def _definition_time_nodes(tree: ast.AST) -> list[ast.AST]:
    found: list[ast.AST] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for part in getattr(node, "decorator_list", []):
                found.extend(ast.walk(part))
            found.extend(ast.walk(node.args))
            returns = getattr(node, "returns", None)  # a Lambda has none
            if returns is not None:
                found.extend(ast.walk(returns))
            return  # the body runs later; its globals come from the code objects
        found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _code_objects(obj: Any) -> list[types.CodeType]:
    if isinstance(obj, types.FunctionType):
        return [obj.__code__]
    if _is_function_transform(obj):
        return [obj.function.__code__]
    codes = []
    for value in vars(obj).values():
        # Methods, static and class methods (__func__), properties (fget, fset, fdel),
        # functools.cached_property and partialmethod (func), and decorated functions (__wrapped__).
        parts = [value, *(getattr(value, name, None) for name in ("__func__", "fget", "fset", "fdel", "func"))]
        for part in parts:
            while part is not None:
                if isinstance(part, types.FunctionType):
                    codes.append(part.__code__)
                part = getattr(part, "__wrapped__", None)
    return codes


def _code_global_names(code: types.CodeType) -> set[str]:
    names = {
        ins.argval
        for ins in dis.get_instructions(code)
        if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME", "STORE_GLOBAL", "DELETE_GLOBAL")
    }
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_global_names(const)
    return names
