"""Forward strategies: how a collated batch meets the module(s).

A strategy implements only the inner step: ``FullModel`` has already moved the batch to the device
and entered ``torch.inference_mode``, and moves what the strategy returns back to the CPU.
"""

from __future__ import annotations

from typing import Any

import torch

from mlflow_fullmodel.collate import Batch
from mlflow_fullmodel.modules import MAIN, ModuleSet
from mlflow_fullmodel.transform import Configurable

__all__ = ["CallModule", "ForwardStrategy"]


class ForwardStrategy(Configurable):
    """Base class: ``__call__(modules, batch, device, **params)`` returns batch-first outputs."""

    def __call__(self, modules: ModuleSet, batch: Batch, device: torch.device, **params: Any) -> Any:
        raise NotImplementedError


class CallModule(ForwardStrategy):
    """Call one module on the batch: ``module(x)``, ``module(*x)`` or ``module(**x)`` by the
    examples' structure (tensor, tuple or dict), adding ``lengths=`` when the module's forward has
    an argument of that name.

    Args:
        module: The name of the module to call (``"main"`` when the FullModel has one module).

    Example::

        FullModel(preprocess=[...], module=scripted, forward=CallModule(), postprocess=[...])
    """

    def __init__(self, module: str = MAIN) -> None:
        pass

    def __call__(self, modules: ModuleSet, batch: Batch, device: torch.device, **params: Any) -> Any:
        run = modules.runnable(self.module, device)
        args: tuple[Any, ...]
        kwargs: dict[str, Any] = {}
        if isinstance(batch.inputs, dict):
            args, kwargs = (), dict(batch.inputs)
        elif isinstance(batch.inputs, tuple):
            args = batch.inputs
        else:
            args = (batch.inputs,)
        if batch.lengths is not None and "lengths" in modules.arguments(self.module):
            kwargs["lengths"] = batch.lengths
        if kwargs and modules.formats[self.module] != "torchscript":
            # Exported programs take their inputs positionally, in the traced order.
            names = modules.arguments(self.module)
            args = args + tuple(kwargs[n] for n in names[len(args) :] if n in kwargs)
            kwargs = {}
        return run(*args, **kwargs)
