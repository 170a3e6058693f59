"""Plain ``torch.nn.Module``s exported with ``torch.export`` when a model is saved.

A FullModel may hold a plain module in memory (it predicts with it as it is); saving needs a form
that travels without the module's Python class. The module is exported from the call the forward
strategy makes on the collated golden batch, with every dimension left for torch.export to decide
(``Dim.AUTO``), so the batch and sequence dimensions stay dynamic and one program serves every
shape, a batch of one included.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import re
import sysconfig
import time
import traceback
import warnings
from collections.abc import Iterator, Mapping, Sequence
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
    eager = [name for name, kind in model.module.formats.items() if kind == EAGER]
    if not eager:
        return model
    values = model._resolve_params(params)
    examples = model._preprocess(list(inputs), values)
    if len(examples) < 2:
        # A dimension of size 1 is specialised by torch.export: trace with a batch of two.
        examples = examples * 2
    calls: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    hooks = [_record_first_call(name, model.module[name], calls) for name in eager]
    strategy = model.forward
    # Exported in eval mode; the user's network is put back in the mode it was in.
    with model.module.evaluating():
        try:
            with torch.no_grad():  # not inference_mode: torch.export traces from the recorded inputs
                strategy(model.module, model.collate(examples[: model.batch_size]), torch.device("cpu"),
                         **{name: values[name] for name in strategy.params()})
        finally:
            for hook in hooks:
                hook.remove()
        exported = dict(model.module.items())
        for name in eager:
            if name not in calls:
                raise ConfigError(
                    f"Module '{name}' was not called by {type(model.forward).__name__} on the input example, so "
                    "it cannot be exported from it; export it yourself (torch.export.export) or script it (fm.script)."
                )
            exported[name] = export_module(name, model.module[name], *calls[name])
    programs = model._replace(module=exported)
    _check_one_row(programs, examples[0], values, eager)
    return programs


def _check_one_row(model: FullModel, example: Any, values: Mapping[str, Any], eager: list[str]) -> None:
    """Run the programs on one example alone: a size torch.export fixed to the traced batch's
    (a recurrent network's sequence length, a reshape to a constant) fails here, not in serving."""
    try:
        model._forward(model.collate([example]), values)
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


def export_module(
    name: str, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``module`` for a call like ``module(*args, **kwargs)``, with every
    tensor dimension dynamic unless the program fixes it. The inputs become positional, in the
    order of the module's ``forward`` arguments (how the forward strategies call a program)."""
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except TypeError as error:
        raise ConfigError(f"Module '{name}' ({type(module).__name__}) was called with arguments its forward does "
                          f"not take: {error}") from None
    positional = tuple(bound.arguments.values())
    dynamic = tuple(pytree.tree_map(_auto_dims, value) for value in positional)
    started = time.perf_counter()
    try:
        with _quiet_torch():
            program = torch.export.export(module, positional, dynamic_shapes=dynamic)
    except Exception as error:
        raise ConfigError(_refusal(name, module, error)) from error
    _logger.info("Exported module '%s' (%s) with torch.export in %.1f s.", name, type(module).__name__,
                 time.perf_counter() - started)
    return program


def _refusal(name: str, module: torch.nn.Module, error: BaseException) -> str:
    """One line: the module, the line of the user's code torch.export stopped at, what it refused
    there and the way out. torch's own text names a symbol (``Eq(u0, 1)``), not the user's code."""
    frame = _user_frame(error, module)
    where = f" at {frame.filename}:{frame.lineno}" if frame is not None else ""
    if frame is not None and frame.line:
        where += f" `{frame.line.strip()}`"
    detail = _first_lines(error, count=1, limit=300)
    if _data_dependent(error):
        return (
            f"torch.export could not export module '{name}' ({type(module).__name__}){where}: the code there branches "
            f"on, or takes a size or number from, a tensor's values (if/while on a tensor, .item(), int(), .tolist()), "
            f"and one traced program, which serves every input, cannot depend on them (torch: {detail}). Compute it "
            f"with tensor operations (torch.where, masks) or torch.cond, or pass TorchScript instead: "
            f"FullModel(module=fm.script(net))."
        )
    return (
        f"torch.export could not export module '{name}' ({type(module).__name__}){where}: {type(error).__name__}: "
        f"{detail.rstrip('.')}. Rewrite the construct there (data-dependent control flow, NumPy or Python state read "
        f"in forward, ...), or pass TorchScript instead: FullModel(module=fm.script(net))."
    )


def _data_dependent(error: BaseException) -> bool:
    guard = getattr(torch.fx.experimental.symbolic_shapes, "GuardOnDataDependentSymNode", ())
    return any(isinstance(cause, guard) or "data-dependent" in str(cause).lower() for cause in _chain(error))


_TORCH_DIR = os.path.dirname(os.path.realpath(torch.__file__)) + os.sep
_PACKAGE_DIR = os.path.dirname(os.path.realpath(__file__)) + os.sep
_PATHS = sysconfig.get_paths()
_STDLIB_DIRS = tuple(os.path.realpath(_PATHS[key]) + os.sep for key in ("stdlib", "platstdlib") if key in _PATHS)
_SITE_DIRS = tuple(os.path.realpath(_PATHS[key]) + os.sep for key in ("purelib", "platlib") if key in _PATHS)
_FILE_LINE = re.compile(r'File "([^"\n]+)", line (\d+)')


def _user_frame(error: BaseException, module: torch.nn.Module) -> traceback.FrameSummary | None:
    """Where in the user's code ``torch.export`` stopped with ``error``: the deepest frame in the
    source file of ``module``'s class, else the deepest outside torch, this package and the
    standard library; None if there is none.

    For each exception of the chain it reads, in turn, torch's own record of the user's stack
    (``real_stack``, filled by strict export), a ``File "...", line N`` in the message (torch adds
    the call that raised a data-dependent error) and the traceback (non-strict export runs the
    forward as Python, so its frames are there)."""
    frames = [frame for cause in _chain(error)
              for stack in (_real_stack(cause), _message_frames(cause), traceback.extract_tb(cause.__traceback__))
              for frame in reversed(stack)]  # deepest first
    home = _source_file(type(module))
    if home is not None:
        for frame in frames:
            if _real(frame.filename) == home:
                return frame
    return next((frame for frame in frames if _outside_libraries(frame.filename)), None)


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        yield cause
        cause = cause.__cause__ or cause.__context__


def _real_stack(error: BaseException) -> list[traceback.FrameSummary]:
    stack = getattr(error, "real_stack", None)
    return [frame for frame in stack if isinstance(frame, traceback.FrameSummary)] if isinstance(stack, list) else []


def _message_frames(error: BaseException) -> list[traceback.FrameSummary]:
    # FrameSummary reads the line's text from the file itself (linecache).
    return [traceback.FrameSummary(file, int(line), "") for file, line in _FILE_LINE.findall(str(error))]


def _source_file(cls: type) -> str | None:
    try:
        source = inspect.getsourcefile(cls)
    except (TypeError, OSError):
        return None
    return _real(source) if source else None


def _real(path: str) -> str:
    return os.path.normcase(os.path.realpath(path))


def _outside_libraries(filename: str) -> bool:
    if filename.startswith("<"):  # generated code ("<string>", "<eval_with_key>.3"), frozen modules
        return False
    path = _real(filename)
    if path.startswith((_TORCH_DIR, _PACKAGE_DIR)):
        return False
    # site-packages may sit inside the standard library's folder (a Python without a venv).
    return path.startswith(_SITE_DIRS) or not path.startswith(_STDLIB_DIRS)


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """Keep torch.export's notes for its developers out of the terminal of someone saving a model:
    Python warnings on guards and specialisations, log warnings ("Unable to find user code ..."),
    and the partial graph it prints to stderr before raising; a failure raises with its own message.

    The stderr redirection and the filter on torch's log handlers are process-wide while they last:
    acceptable for a save, which does not run beside serving in the same process."""
    handlers = {handler for name, logger in list(logging.Logger.manager.loggerDict.items())
                if (name == "torch" or name.startswith("torch.")) and isinstance(logger, logging.Logger)
                for handler in logger.handlers}
    for handler in handlers:
        handler.addFilter(_not_a_warning)
    printed = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(printed):
            warnings.simplefilter("ignore")
            yield
    finally:
        for handler in handlers:
            handler.removeFilter(_not_a_warning)
        if printed.getvalue().strip():
            _logger.debug("torch.export printed:\n%s", printed.getvalue())


def _not_a_warning(record: logging.LogRecord) -> bool:
    return record.levelno != logging.WARNING


def _auto_dims(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {dim: torch.export.Dim.AUTO for dim in range(value.dim())}
    return None


def _first_lines(error: BaseException, count: int = 4, limit: int = 800) -> str:
    lines = [" ".join(line.split()) for line in str(error).splitlines() if line.strip()]
    text = " ".join(lines[:count]) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
