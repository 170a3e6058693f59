"""Compiled forward passes: a ``torch.export`` program compiled ahead of time with AOTInductor.

``save_model(..., compile="aoti")`` stores, beside each module's portable program, an AOTInductor
package: the program compiled to native code (C++ built by the local compiler) for the machine that
saved it. The package only runs where it was built for, so it records its ``Target`` (torch's
version, the CPU architecture and vector ISA, the device); a loading machine that differs runs the
portable program instead, after one log line saying why. The kernels are compiled once, at save
time: a server start only unpacks and links them.

Every private name of torch used for this lives in this module.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import logging
import os
import platform
import tempfile
import threading
import time
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from mlflow_fullmodel.exceptions import ConfigError

__all__ = ["AOTI", "CompiledProgram", "DEFAULT_RTOL", "Target", "check_compiler", "compile_program", "quiet_torch"]

_logger = logging.getLogger(__name__)

#: The one compiler this release supports.
AOTI = "aoti"
#: How far (relative) a compiled program's outputs may be from the portable program's in the
#: parity check: the compiler reorders floating-point sums and fuses operations.
DEFAULT_RTOL = 1e-4


@dataclass(frozen=True)
class Target:
    """What compiled code needs of the machine that runs it (``compiled_for``), or what a machine
    offers (``here``)."""

    torch_version: str
    machine: str  # the CPU architecture, as platform.machine() names it
    isa: str  # vector instruction sets, as Inductor names them, separated by spaces
    device: str

    @classmethod
    def compiled_for(cls, device: str = "cpu") -> Target:
        """What AOTInductor compiles for on this machine: the instruction sets it picks."""
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        return cls(_torch_version(), platform.machine(), str(pick_vec_isa()), device)

    @classmethod
    def here(cls, device: str = "cpu") -> Target:
        """What this machine offers ``device``'s compiled code: every vector instruction set its CPU
        has (read from the CPU, without compiling anything, unlike Inductor's own pick)."""
        return cls(_torch_version(), platform.machine(), " ".join(sorted(_cpu_instruction_sets())), device)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Target:
        return cls(**{name: str(data.get(name)) for name in ("torch_version", "machine", "isa", "device")})

    def to_json(self) -> dict[str, str]:
        return asdict(self)

    def mismatch(self, runtime: Target) -> str | None:
        """Why code compiled for this target cannot run on ``runtime``; None when it can: the same
        torch, architecture and device, and a CPU with every instruction set the code uses."""
        differences = [f"{label} {getattr(self, name)!r} (here: {getattr(runtime, name)!r})"
                       for name, label in (("torch_version", "torch"), ("machine", "CPU architecture"),
                                           ("device", "device"))
                       if getattr(self, name) != getattr(runtime, name)]
        missing = sorted(set(self.isa.split()) - set(runtime.isa.split()))
        if missing:
            differences.append(f"CPU instruction sets {self.isa!r} (here: {runtime.isa!r}, without "
                               f"{' '.join(missing)})")
        return "compiled for " + ", ".join(differences) if differences else None

    def __str__(self) -> str:
        return f"torch {self.torch_version}, {self.machine} ({self.isa or 'no vector instructions'}), {self.device}"


def _torch_version() -> str:
    return torch.__version__.split("+")[0]


def _cpu_instruction_sets() -> set[str]:
    from torch._inductor import cpu_vec_isa

    if platform.machine() in ("x86_64", "AMD64"):
        return set(cpu_vec_isa.x86_isa_checker())
    # Elsewhere Inductor reads its candidates from the CPU's capabilities without building anything.
    return {flag for isa in cpu_vec_isa.valid_vec_isa_list() for flag in str(isa).split()}


def check_compiler() -> str:
    """The C++ compiler AOTInductor will build with.

    Raises:
        ConfigError: None is installed (the message names what was looked for).
    """
    from torch._inductor import config
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        return str(get_cpp_compiler())
    except InvalidCxxCompiler:
        wanted = [name for name in config.cpp.cxx if name] if isinstance(config.cpp.cxx, (list, tuple)) \
            else [config.cpp.cxx]
        raise ConfigError(
            f"compile='aoti' builds native code with a C++ compiler, and none was found (looked for "
            f"{', '.join(repr(name) for name in wanted)}). Install one (Debian/Ubuntu: apt-get install g++), or "
            "name yours in the CXX environment variable before torch is imported; or save without compile."
        ) from None


def compile_program(name: str, program: torch.export.ExportedProgram) -> bytes:
    """The AOTInductor package of ``program`` (its bytes), for the dynamic shapes the program has."""
    from torch._inductor import aoti_compile_and_package

    check_compiler()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fullmodel-aoti-") as folder, quiet_torch():
        path = os.path.join(folder, f"{name}.pt2")
        try:
            aoti_compile_and_package(program, package_path=path)
        except Exception as error:
            raise ConfigError(
                f"AOTInductor could not compile module '{name}': {type(error).__name__}: "
                f"{' '.join(str(error).split())[:600]}. Save it without compile (the portable program runs)."
            ) from error
        with open(path, "rb") as f:
            package = f.read()
    _logger.info("Compiled module '%s' with AOTInductor in %.1f s (%.1f MB).", name,
                 time.perf_counter() - started, len(package) / 1e6)
    return package


def load_runner(package: bytes) -> Any:
    """The callable of an AOTInductor package given as bytes (already checked against the manifest).

    Built with torch's package loader directly: ``aoti_load_package`` first compares the package's
    instruction sets with the CPU's by building and loading ten test programs with the C++ compiler
    (1.5 s of a server's start, and a compiler on every serving machine) only to log a warning;
    ``Target`` has made that check already, from the CPU itself."""
    from torch.export.pt2_archive._package import AOTICompiledModel

    # The loader unpacks the package into a folder of its own: the file is not needed afterwards.
    with tempfile.NamedTemporaryFile(prefix="fullmodel-aoti-", suffix=".pt2") as file, quiet_torch():
        file.write(package)
        file.flush()
        loader = torch._C._aoti.AOTIModelPackageLoader(file.name, "model", False, 1, -1)
    return AOTICompiledModel(loader)


def native_files(package: bytes) -> dict[str, str]:
    """The sha256 of each native library inside a package, by its path there."""
    with zipfile.ZipFile(io.BytesIO(package)) as archive:
        return {info.filename: hashlib.sha256(archive.read(info)).hexdigest()
                for info in archive.infolist() if info.filename.endswith(".so")}


class CompiledProgram:
    """A module saved as both a portable ``torch.export`` program and its AOTInductor package;
    it runs the package on the device it was compiled for, the program anywhere else.

    Args:
        program: The portable program (inputs, names and weights are read from it).
        package: The AOTInductor package's bytes.
        target: What the package was compiled for.
        rtol: The relative tolerance of the parity check between the package and the program.
    """

    def __init__(self, program: torch.export.ExportedProgram, package: bytes, target: Target,
                 rtol: float = DEFAULT_RTOL) -> None:
        self.program = program
        self.package = package
        self.target = target
        self.rtol = rtol
        self._runner: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"CompiledProgram(target={str(self.target)!r}, rtol={self.rtol})"

    def __getstate__(self) -> dict[str, Any]:
        return {"program": self.program, "package": self.package, "target": self.target, "rtol": self.rtol}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def __deepcopy__(self, memo: dict[int, Any]) -> CompiledProgram:
        # The package's bytes and the loaded native code are immutable: shared, not copied.
        return CompiledProgram(copy.deepcopy(self.program, memo), self.package, self.target, self.rtol)

    def runner(self) -> Any:
        """The package's callable, loaded on first use."""
        if self._runner is None:
            with self._lock:
                if self._runner is None:
                    self._runner = load_runner(self.package)
        return self._runner

    def runs_on(self, device: torch.device) -> bool:
        return torch.device(self.target.device) == device


@contextlib.contextmanager
def quiet_torch(*libraries: str) -> Iterator[None]:
    """torch's notes to its own developers while compiling and loading (deprecations of its
    internals, "Loading outdated pt2 file"), and those of the ``libraries`` named (torchao's about
    its optional kernels), are not for someone saving or serving a model: warnings and log records
    below ERROR are dropped while this lasts."""
    loggers = [logging.getLogger(name) for name in ("torch", *libraries)]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
