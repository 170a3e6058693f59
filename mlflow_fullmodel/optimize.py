"""What ``save_model`` does to the forward pass on request: int8 quantization of the plain modules
before they are exported (``quantize="int8"``), and AOTInductor compilation of the exported programs
after (``compile="aoti"``).

Quantization uses torchao (the ``[int8]`` extra), PyTorch's library for it: dynamic int8
activations with int8 weights (per output channel) in every ``nn.Linear``. A quantized program
needs torchao where it is loaded, so the model's requirements name it. Its drift from the float model
on the golden example is measured here and recorded with the model.
"""

from __future__ import annotations

import copy
import importlib
import logging
import math
from typing import Any

import pandas as pd
import torch

from mlflow_fullmodel.compiled import AOTI, CompiledProgram, Target, check_compiler, compile_program, quiet_torch
from mlflow_fullmodel.exceptions import ConfigError
from mlflow_fullmodel.modules import EAGER, TORCHSCRIPT
from mlflow_fullmodel.pipeline import FullModel

__all__ = ["COMPILERS", "QUANTIZATIONS", "QUANTIZED_RTOL", "check_options", "compile_modules", "drift",
           "quantize_modules", "quiet_import"]

COMPILERS = (AOTI,)
QUANTIZATIONS = ("int8",)
#: How far (relative) an int8 model's answer to a row may move with the rows batched beside it, or
#: when compiled: float rounding that moves an activation across an int8 step moves the outputs by
#: about 1e-3 (measured on a 4-layer Transformer encoder: 5e-4 absolute, 2e-3 relative).
QUANTIZED_RTOL = 1e-2

_logger = logging.getLogger(__name__)


def check_options(model: FullModel, compile: str | None, quantize: str | None, compile_rtol: float,
                  max_drift: float | None) -> None:
    """Refuse, before anything is exported or written, what ``compile``/``quantize`` cannot do with
    ``model``'s modules, naming the module and the way out."""
    if compile is not None and compile not in COMPILERS:
        raise ConfigError(f"compile={compile!r} is not a compiler this release has; use compile='aoti' "
                          "(AOTInductor), or None.")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ConfigError(f"quantize={quantize!r} is not a quantization this release has; use quantize='int8', "
                          "or None.")
    if isinstance(compile_rtol, bool) or not isinstance(compile_rtol, (int, float)) or not 0 < compile_rtol < 1:
        raise ConfigError(f"compile_rtol must be a number between 0 and 1, got {compile_rtol!r}.")
    if max_drift is not None and (quantize is None or isinstance(max_drift, bool)
                                  or not isinstance(max_drift, (int, float)) or not max_drift >= 0):
        raise ConfigError(f"max_drift={max_drift!r}: it bounds a quantized model's drift from the float one, so it "
                          "needs quantize='int8' and a number >= 0.")
    for name, kind in model.module.formats.items():
        if kind == TORCHSCRIPT and (compile or quantize):
            option = f"compile={compile!r}" if compile else f"quantize={quantize!r}"
            raise ConfigError(
                f"{option} works on a torch.export program, and module '{name}' is TorchScript. Pass the plain "
                "nn.Module instead of fm.script(net): it is exported (and compiled, or quantized) when saved."
            )
        if quantize and kind != EAGER:
            raise ConfigError(
                f"quantize={quantize!r} quantizes a plain nn.Module before it is exported, and module '{name}' is "
                "already a torch.export program. Pass the plain nn.Module instead."
            )
        if quantize and not any(isinstance(m, torch.nn.Linear) for m in model.module[name].modules()):
            raise ConfigError(f"quantize={quantize!r} quantizes nn.Linear layers, and module '{name}' "
                              f"({type(model.module[name]).__name__}) has none; save it without quantize.")
    if quantize:
        quiet_import("torchao", "quantize='int8'")
    if compile:
        check_compiler()


def quantize_modules(model: FullModel) -> tuple[FullModel, dict[str, Any]]:
    """``model`` with an int8 copy of each of its plain modules (the user's modules are untouched),
    and what was done: the scheme, the library and the number of layers quantized per module.

    Raises:
        ConfigError: torchao is missing.
    """
    torchao = quiet_import("torchao", "quantize='int8'")
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantized, layers = {}, {}
    for name, module in model.module.items():
        copied = copy.deepcopy(module).eval()
        with quiet_torch("torchao"):
            quantize_(copied, Int8DynamicActivationInt8WeightConfig())
        quantized[name] = copied
        layers[name] = sum(isinstance(m, torch.nn.Linear) for m in module.modules())
    info = {"scheme": "int8", "method": "dynamic int8 activations per token, int8 weights per output channel "
            "(nn.Linear)", "library": f"torchao {torchao.__version__}", "requirement": "torchao", "layers": layers,
            "rtol": QUANTIZED_RTOL}
    return model._replace(module=quantized), info


def drift(reference: pd.DataFrame, quantized: pd.DataFrame) -> dict[str, Any]:
    """How far ``quantized`` outputs are from the ``reference`` (float) ones, row by row:
    ``agreement``, the share of rows whose non-numeric outputs (labels) are all equal, and
    ``largest_difference``, the largest absolute difference of a number (a probability, a score)."""
    agree, largest = 0, 0.0
    for row in range(len(reference)):
        same = True
        for column in reference.columns:
            numbers, equal = _difference(reference[column].iloc[row], quantized[column].iloc[row])
            largest = max(largest, numbers)
            same = same and equal
        agree += same
    rows = len(reference)
    return {"rows": rows, "agreement": agree / rows if rows else 1.0, "largest_difference": largest}


def _difference(want: Any, got: Any) -> tuple[float, bool]:
    """(largest absolute difference of the numbers in ``want`` and ``got``, whether the rest is equal)."""
    want = want.tolist() if hasattr(want, "tolist") else want
    got = got.tolist() if hasattr(got, "tolist") else got
    if isinstance(want, (list, tuple)) and isinstance(got, (list, tuple)) and len(want) == len(got):
        pairs = [_difference(w, g) for w, g in zip(want, got)]
        return max((p[0] for p in pairs), default=0.0), all(p[1] for p in pairs)
    if isinstance(want, dict) and isinstance(got, dict) and want.keys() == got.keys():
        pairs = [_difference(want[k], got[k]) for k in want]
        return max((p[0] for p in pairs), default=0.0), all(p[1] for p in pairs)
    numbers = (int, float)
    if isinstance(want, numbers) and isinstance(got, numbers) and not isinstance(want, bool):
        gap = abs(float(want) - float(got))
        return (gap if math.isfinite(gap) else math.inf), True
    return 0.0, want == got


def compile_modules(model: FullModel, rtol: float) -> FullModel:
    """``model`` with each torch.export program beside its AOTInductor package (compiled for this
    machine's CPU)."""
    target = Target.compiled_for("cpu")
    compiled = {name: CompiledProgram(program, compile_program(name, program), target, rtol)
                for name, program in model.module.items()}
    return model._replace(module=compiled)


def quiet_import(package: str, feature: str) -> Any:
    """Import ``package`` without the notes it logs about its optional kernels; a missing one is a
    ``ConfigError`` naming the ``feature`` that needs it and the extra that installs it."""
    try:
        with quiet_torch("torchao"):
            return importlib.import_module(package)
    except ImportError:
        raise ConfigError(f"{feature} needs {package}, which is not installed: pip install "
                          f"'mlflow-fullmodel[int8]' (or pip install {package}).") from None
