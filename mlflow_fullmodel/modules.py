"""The forward pass: TorchScript modules and ``torch.export`` programs behind one interface.

TorchScript (``torch.jit.script`` / ``torch.jit.trace``, deprecated in current PyTorch) and an
``ExportedProgram`` from ``torch.export`` (its successor) are supported as equals. A plain
``nn.Module`` runs as it is in memory and is exported when the model is saved (``export.py``). An
exported program may come with its AOTInductor package (``compiled.py``), which runs in its place on
the machine it was compiled for. A ``ModuleSet`` holds
one or several named modules; a forward strategy reaches them by name (``modules["encode"]``) or,
for TorchScript, by method (``modules.main.encode``).
"""

from __future__ import annotations

import copy
import inspect
import itertools
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import IO, Any

import torch

from mlflow_fullmodel.compiled import AOTI, CompiledProgram, native_files
from mlflow_fullmodel.exceptions import ConfigError, DeviceError

__all__ = [
    "EAGER", "MAIN", "ModuleSet", "load_module", "method_names", "named_tensors", "quiet_torch_jit", "resolve_device",
    "save_module", "script",
]

#: The name of the module when a FullModel is given a single one.
MAIN = "main"

TORCHSCRIPT = "torchscript"
TORCH_EXPORT = "torch.export"
#: A plain ``nn.Module``: in memory only, exported with torch.export when the model is saved.
EAGER = "nn.Module"
_SUFFIXES = {TORCHSCRIPT: ".pt", TORCH_EXPORT: ".pt2"}


@contextmanager
def quiet_torch_jit() -> Iterator[None]:
    """Silence torch's DeprecationWarnings for ``torch.jit`` inside our own save and load calls.

    TorchScript is still the saved format; the warning is aimed at code that creates TorchScript,
    not at a model loading an archive, and it would repeat in every scoring-server log.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        yield


def script(module: torch.nn.Module) -> torch.jit.ScriptModule:
    """``torch.jit.script(module.eval())`` without torch's deprecation warning for ``torch.jit``.

    Example::

        >>> scripted = script(torch.nn.Linear(2, 2))
        >>> scripted.original_name, scripted.training
        ('Linear', False)

    ``FullModel(preprocess=[...], module=fm.script(net), postprocess=[...])`` takes it.
    """
    with quiet_torch_jit():
        return torch.jit.script(module.eval())


def module_format(module: Any) -> str:
    if isinstance(module, torch.jit.ScriptModule):
        return TORCHSCRIPT
    if isinstance(module, (torch.export.ExportedProgram, CompiledProgram)):
        return TORCH_EXPORT
    if isinstance(module, torch.nn.Module):
        return EAGER
    raise ConfigError(
        f"A module must be a torch.nn.Module (exported with torch.export when the model is saved), "
        f"TorchScript (fm.script) or a torch.export ExportedProgram, got {type(module).__name__}."
    )


def argument_names(module: Any) -> list[str]:
    """The names of the forward arguments, used to pass ``lengths`` only to modules that take it."""
    module = _portable(module)
    if isinstance(module, torch.export.ExportedProgram):
        return [spec.arg.name for spec in module.graph_signature.input_specs if spec.kind.name == "USER_INPUT"]
    if module_format(module) == EAGER:
        return list(inspect.signature(module.forward).parameters)
    try:
        return [a.name for a in module.forward.schema.arguments][1:]  # drop self
    except (AttributeError, RuntimeError):
        return []


def method_names(module: Any) -> list[str]:
    """The methods a forward strategy can call: a TorchScript module's compiled methods, an exported
    program's ``forward``."""
    if isinstance(module, torch.jit.ScriptModule):
        return sorted(module._c._method_names())
    return ["forward"]


def named_tensors(module: Any) -> dict[str, tuple[str, torch.Tensor]]:
    """The parameters and buffers of a TorchScript module or an exported program by name, each as
    ``(kind, tensor)`` with kind ``"parameter"``, ``"buffer"`` or ``"constant"`` (a tensor an
    exported program lifted out of its graph)."""
    module = _portable(module)
    if isinstance(module, torch.export.ExportedProgram):
        signature = module.graph_signature
        kinds = {**{n: "constant" for n in signature.lifted_tensor_constants},
                 **{n: "buffer" for n in signature.buffers}, **{n: "parameter" for n in signature.parameters}}
        # Non-persistent buffers and lifted constants are kept outside the state_dict.
        stored = {**module.constants, **module.state_dict}
        return {name: (kind, stored[name]) for name, kind in kinds.items()
                if isinstance(stored.get(name), torch.Tensor)}
    return {**{name: ("buffer", t) for name, t in module.named_buffers()},
            **{name: ("parameter", t) for name, t in module.named_parameters()}}


def _portable(module: Any) -> Any:
    return module.program if isinstance(module, CompiledProgram) else module


class ModuleSet(Mapping[str, Any]):
    """Named modules, each as given (TorchScript or ExportedProgram), callable on a device."""

    def __init__(self, modules: Mapping[str, Any]) -> None:
        if not modules:
            raise ConfigError("A FullModel needs at least one module.")
        self._modules = dict(modules)
        self.formats = {name: module_format(m) for name, m in self._modules.items()}
        self._runnable: dict[tuple[str, str], Any] = {}
        self._arguments: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # A copy (copy.deepcopy of a FullModel) gets its own lock and builds its own device copies.
        return {"modules": self._modules}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["modules"])  # type: ignore[misc]

    @classmethod
    def of(cls, module: Any) -> ModuleSet:
        if isinstance(module, ModuleSet):
            return module
        if isinstance(module, Mapping):
            return cls(module)
        return cls({MAIN: module})

    def __getitem__(self, name: str) -> Any:
        try:
            return self._modules[name]
        except KeyError:
            raise ConfigError(f"No module named '{name}'; the modules are {list(self._modules)}.") from None

    def __contains__(self, name: object) -> bool:
        return name in self._modules

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """The modules in eval mode for a while: those given in training mode (a network still being
        trained, predicted with in between) are put back in training mode afterwards."""
        training = [m for m in self._modules.values() if isinstance(m, torch.nn.Module) and m.training]
        for module in training:
            module.eval()
        try:
            yield
        finally:
            for module in training:
                module.train()

    def arguments(self, name: str) -> list[str]:
        if name not in self._arguments:  # parsed once: a strategy asks on every batch
            self._arguments[name] = argument_names(self[name])
        return self._arguments[name]

    @property
    def compiled(self) -> dict[str, CompiledProgram]:
        """The modules that have an AOTInductor package, by name."""
        return {name: m for name, m in self._modules.items() if isinstance(m, CompiledProgram)}

    def runnable(self, name: str, device: torch.device) -> Callable[..., Any]:
        """The module as a callable with its weights on ``device``, built once per device: a compiled
        module's package on the device it was compiled for, its portable program elsewhere. A module
        whose weights are elsewhere is copied there: the module as given never moves, so models
        sharing it (``FullModel.to``) each keep their device."""
        key = (name, str(device))
        if key not in self._runnable:
            with self._lock:
                if key not in self._runnable:
                    module = self[name]
                    if isinstance(module, CompiledProgram):
                        if module.runs_on(device):
                            self._runnable[key] = module.runner()
                            return self._runnable[key]
                        module = module.program
                    # Exported programs are already in inference form. A module as given keeps its mode
                    # (``evaluating`` switches it around each call); a device copy is ours to keep in eval.
                    run = module.module() if isinstance(module, torch.export.ExportedProgram) else module
                    if not _all_on(run, device):
                        try:
                            run = copy.deepcopy(run).to(device).eval()
                        except Exception as error:  # torch says why in its own words, often an assert
                            raise DeviceError(f"Module '{name}' ({self.formats[name]}) cannot be moved to {device}: "
                                              f"{type(error).__name__}: {error}") from error
                    self._runnable[key] = run
        return self._runnable[key]


def _all_on(module: torch.nn.Module, device: torch.device) -> bool:
    return all(tensor.device == device for tensor in itertools.chain(module.parameters(), module.buffers()))


def resolve_device(device: str | torch.device) -> torch.device:
    """Parse ``device`` and check it exists here, with a message saying what is available."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise DeviceError(f"Invalid device {device!r}: {error}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"Device {device!r} was requested but CUDA is not available on this machine "
                f"(torch {torch.__version__}). Use device='cpu', or install a CUDA build of torch."
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise DeviceError(
                f"Device {device!r} was requested but only {torch.cuda.device_count()} CUDA "
                "device(s) exist."
            )
    elif resolved.type != "cpu":
        raise DeviceError(f"Device {device!r} is not supported; use 'cpu' or 'cuda[:index]'.")
    return resolved


def save_module(module: Any, folder: str, name: str) -> dict[str, Any]:
    """Write ``module`` into ``folder``; return its spec entry (file names relative to ``folder``):
    ``file``, ``format``, ``methods`` and, for a compiled module, ``compiled`` (the package's file,
    what it was compiled for, the parity tolerance and the sha256 of its native libraries)."""
    kind = module_format(module)
    if kind == EAGER:
        raise ConfigError(
            f"Module '{name}' is a plain nn.Module ({type(module).__name__}); fm.save_model and fm.log_model export "
            "it from their input_example. Give one, or script (fm.script) or export (torch.export.export) it first."
        )
    filename = name + _SUFFIXES[kind]
    path = os.path.join(folder, filename)
    entry: dict[str, Any] = {"file": filename, "format": kind, "methods": method_names(module)}
    if kind == TORCHSCRIPT:
        with quiet_torch_jit():
            torch.jit.save(module, path)
    else:
        torch.export.save(_portable(module), path)
    if isinstance(module, CompiledProgram):
        package = f"{name}.{AOTI}{_SUFFIXES[TORCH_EXPORT]}"
        with open(os.path.join(folder, package), "wb") as f:
            f.write(module.package)
        entry["compiled"] = {"file": package, "compiler": AOTI, "target": module.target.to_json(),
                             "rtol": module.rtol, "native": native_files(module.package)}
    return entry


def load_module(source: str | IO[bytes], kind: str) -> Any:
    """Load a module archive from a path or from bytes already read (and checked)."""
    if kind == TORCHSCRIPT:
        with quiet_torch_jit():
            return torch.jit.load(source, map_location="cpu")
    if kind == TORCH_EXPORT:
        return torch.export.load(source)
    raise ConfigError(f"Unknown module format {kind!r}; this runtime reads {TORCHSCRIPT!r} and {TORCH_EXPORT!r}.")
