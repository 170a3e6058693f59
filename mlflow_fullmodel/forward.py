"""Forward strategies: how a collated batch meets the module(s).

A strategy implements only the inner step: ``FullModel`` has already moved the batch to the device
and entered ``torch.inference_mode``, and moves what the strategy returns back to the CPU.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import torch

from mlflow_fullmodel.collate import Batch
from mlflow_fullmodel.exceptions import ConfigError, StreamingError
from mlflow_fullmodel.modules import MAIN, ModuleSet
from mlflow_fullmodel.transform import Configurable

__all__ = ["AverageOverSamples", "CallModule", "ForwardStrategy"]


class ForwardStrategy(Configurable):
    """Base class: ``__call__(modules, batch, device, **params)`` returns batch-first outputs."""

    def __call__(self, modules: ModuleSet, batch: Batch, device: torch.device, **params: Any) -> Any:
        raise NotImplementedError

    def check_collate(self, collate: Configurable) -> None:
        """Raise ``ConfigError`` if batches made by ``collate`` cannot work with this strategy;
        called when a FullModel is built."""

    def stream(
        self, modules: ModuleSet, batch: Batch, device: torch.device, **params: Any
    ) -> Generator[Any, None, None]:
        """Yield outputs of ``__call__``'s shape as they are made (a generating strategy: one per
        step), the last equal to what ``__call__`` returns. A strategy that computes its answer in
        one call cannot, and raises ``StreamingError``."""
        raise StreamingError(
            f"The forward strategy {type(self).__name__} computes its answer in one call, so there is nothing "
            "to stream; only strategies that generate step by step (GreedySearch, BeamSearch) stream. Ask for "
            "the whole answer instead (predict, or /invocations without 'Accept: text/event-stream')."
        )


class CallModule(ForwardStrategy):
    """Call one module on the batch: ``module(x)``, ``module(*x)`` or ``module(**x)`` by the
    examples' structure (tensor, tuple or dict), adding ``lengths=`` when the module's forward has
    an argument of that name.

    Args:
        module: The name of the module to call (``"main"`` when the FullModel has one module).

    Example::

        >>> from mlflow_fullmodel import FullModel, script
        >>> from mlflow_fullmodel.collate import Batch
        >>> from mlflow_fullmodel.modules import ModuleSet
        >>> double = script(torch.nn.Linear(1, 1, bias=False).requires_grad_(False).apply(
        ...     lambda m: m.weight.fill_(2.0) if isinstance(m, torch.nn.Linear) else None))
        >>> CallModule()(ModuleSet.of(double), Batch(torch.tensor([[1.0], [3.0]])), torch.device("cpu"))
        tensor([[2.],
                [6.]])

    ``FullModel(preprocess=[...], module=scripted, forward=CallModule(), postprocess=[...])`` is the
    default.
    """

    module: str

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
            # Exported programs take their inputs positionally, in the traced order (and plain
            # modules are exported so when saved).
            names = modules.arguments(self.module)
            args = args + tuple(kwargs[n] for n in names[len(args) :] if n in kwargs)
            kwargs = {}
        return run(*args, **kwargs)


class AverageOverSamples(ForwardStrategy):
    """Test-time augmentation: run the module on every sample of every example and average the
    class probabilities over the samples.

    The batch is ``(B, S, ...)``: ``S`` samples (e.g. the crops of ``RandomCrops``) per example.
    It is flattened to ``(B * S, ...)`` for one module call, the scores ``(B * S, classes)`` are
    reshaped to ``(B, S, classes)``, turned into probabilities and averaged to ``(B, classes)``.
    ``S`` is whatever pre-processing produced, so the number of samples is a parameter of that
    step, not of this one. Post-process with ``TopK(..., softmax=False)``: the output is already
    probabilities (float64).

    Args:
        module: The name of the module to call (``"main"`` when the FullModel has one module).
        softmax: Apply a softmax to the module's scores before averaging; False when the module
            already returns probabilities.

    Example::

        FullModel(
            preprocess=[DecodeImage(), Resize(32), ToTensor(), RandomCrops(28, tta=Param(8), seed=Param(0))],
            module=scripted,
            forward=AverageOverSamples(),
            postprocess=[TopK(labels=labels, softmax=False)],
        )
    """

    module: str
    softmax: bool

    def __init__(self, module: str = MAIN, softmax: bool = True) -> None:
        if not isinstance(module, str) or not module:
            raise ConfigError(f"AverageOverSamples: module must be a module name, got {module!r}.")
        if not isinstance(softmax, bool):
            raise ConfigError(f"AverageOverSamples: softmax must be True or False, got {softmax!r}.")

    def __call__(self, modules: ModuleSet, batch: Batch, device: torch.device, **params: Any) -> Any:
        inputs = batch.inputs
        if not isinstance(inputs, torch.Tensor) or inputs.dim() < 3:
            got = f"shape {tuple(inputs.shape)}" if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise ConfigError(
                f"AverageOverSamples needs a batch tensor (examples, samples, ...), got {got}; "
                "pre-processing must end in one tensor of samples per example (e.g. RandomCrops)."
            )
        examples, samples = inputs.shape[0], inputs.shape[1]
        scores = modules.runnable(self.module, device)(inputs.reshape(examples * samples, *inputs.shape[2:]))
        if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or scores.shape[0] != examples * samples:
            got = f"shape {tuple(scores.shape)}" if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ConfigError(
                f"AverageOverSamples: module '{self.module}' must return scores (inputs, classes) for "
                f"{examples * samples} inputs, got {got}."
            )
        scores = scores.double().reshape(examples, samples, -1)
        probabilities = torch.softmax(scores, dim=-1) if self.softmax else scores
        return probabilities.mean(dim=1)
