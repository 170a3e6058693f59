"""Plain ``torch.nn.Module``s exported with ``torch.export`` when a model is saved.

A FullModel may hold a plain module in memory (it predicts with it as it is); saving needs a form
that travels without the module's Python class. The module is exported from the call the forward
strategy makes on the collated golden batch, with every dimension left for torch.export to decide
(``Dim.AUTO``), so the batch and sequence dimensions stay dynamic and one program serves every
shape, a batch of one included.
"""

from __future__ import annotations

import inspect
import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from mlflow_fullmodel.exceptions import ConfigError
from mlflow_fullmodel.modules import EAGER
from mlflow_fullmodel.pipeline import FullModel

__all__ = ["export_eager_modules"]

_logger = logging.getLogger(__name__)


def export_eager_modules(model: FullModel, inputs: Sequence[Any], params: Mapping[str, Any] | None = None) -> FullModel:
    """``model`` with each plain ``nn.Module`` replaced by its ``torch.export`` program; ``model``
    itself if it has none.

    Args:
        model: The model to save.
        inputs: Raw input rows (the golden example): the export traces the forward strategy's call
            on their collated batch.
        params: Runtime parameter values for that call; the saved defaults otherwise.

    Raises:
        ConfigError: A module cannot be exported (the message names it and the construct torch.export
            refused), or the forward strategy never called it.
    """
    eager = [name for name, kind in model.modules.formats.items() if kind == EAGER]
    if not eager:
        return model
    values = model.resolve_params(params)
    examples = model.preprocess(list(inputs), values)
    if len(examples) < 2:
        # A dimension of size 1 is specialised by torch.export: trace with a batch of two.
        examples = examples * 2
    calls: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    hooks = [_record_first_call(name, model.modules[name].eval(), calls) for name in eager]
    strategy = model.forward_strategy
    try:
        with torch.no_grad():  # not inference_mode: torch.export traces from the recorded inputs
            strategy(model.modules, model.collate(examples[: model.batch_size]), torch.device("cpu"),
                     **{name: values[name] for name in strategy.params()})
    finally:
        for hook in hooks:
            hook.remove()
    exported = dict(model.modules.items())
    for name in eager:
        if name not in calls:
            raise ConfigError(
                f"Module '{name}' was not called by {type(model.forward_strategy).__name__} on the input example, "
                "so it cannot be exported from it; export it yourself (torch.export.export) or script it (fm.script)."
            )
        exported[name] = export_module(name, model.modules[name], *calls[name])
    programs = FullModel(
        model.preprocess_steps, exported, model.postprocess_steps, forward=strategy,
        collate=model.collate_fn, input_columns=model.input_columns, batch_size=model.batch_size, device=model.device,
    )
    _check_one_row(programs, examples[0], values, eager)
    return programs


def _check_one_row(model: FullModel, example: Any, values: Mapping[str, Any], eager: list[str]) -> None:
    """Run the programs on one example alone: a size torch.export fixed to the traced batch's
    (a recurrent network's sequence length, a reshape to a constant) fails here, not in serving."""
    try:
        model.forward(model.collate([example]), values)
    except Exception as error:
        raise ConfigError(
            f"The torch.export program of module(s) {eager} fails on one row of the input example alone: "
            f"{_first_lines(error)}. torch.export fixed a size of the traced batch: the module's code depends on "
            "it (a recurrent layer fixes the sequence length: pad every batch to one length with "
            "PadCollate(length=...)), or pass TorchScript instead: FullModel(module=fm.script(net))."
        ) from error


def _record_first_call(
    name: str, module: torch.nn.Module, calls: dict[str, tuple[tuple[Any, ...], dict[str, Any]]]
) -> Any:
    def record(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.setdefault(name, (args, dict(kwargs)))

    return module.register_forward_pre_hook(record, with_kwargs=True)


def export_module(name: str, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``module`` for a call like ``module(*args, **kwargs)``, with every
    tensor dimension dynamic unless the program fixes it. The inputs become positional, in the
    order of the module's ``forward`` arguments (how the forward strategies call a program)."""
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except TypeError as error:
        raise ConfigError(f"Module '{name}' ({type(module).__name__}) was called with arguments its forward does not take: {error}") from None
    positional = tuple(bound.arguments.values())
    dynamic = tuple(pytree.tree_map(_auto_dims, value) for value in positional)
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # torch.export's notes on guards and specialisations are for its developers, not for
            # someone saving a model; a failure raises below with its message.
            warnings.simplefilter("ignore")
            program = torch.export.export(module, positional, dynamic_shapes=dynamic)
    except Exception as error:
        raise ConfigError(
            f"torch.export could not export module '{name}' ({type(module).__name__}): {_first_lines(error)}\n"
            f"Rewrite the construct it names (data-dependent control flow, Python state read in forward, ...), "
            f"or pass TorchScript instead: FullModel(module=fm.script(net))."
        ) from error
    _logger.info("Exported module '%s' (%s) with torch.export in %.1f s.", name, type(module).__name__,
                 time.perf_counter() - started)
    return program


def _auto_dims(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {dim: torch.export.Dim.AUTO for dim in range(value.dim())}
    return None


def _first_lines(error: BaseException, count: int = 4, limit: int = 800) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = " ".join(lines[:count]) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
