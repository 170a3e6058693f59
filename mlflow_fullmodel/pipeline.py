"""``FullModel``: pre-processing, the forward pass and post-processing as one object.

The same object answers ``predict`` in the training process and after loading, so there is no
second copy of the processing code to keep in sync.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, cast

import numpy as np
import pandas as pd
import torch

from mlflow_fullmodel import telemetry
from mlflow_fullmodel.collate import Batch, Collate, PadCollate, example_length, length_buckets, to_device, uncollate
from mlflow_fullmodel.exceptions import (
    ConfigError,
    DeadlineError,
    FullModelError,
    InputError,
    ModelError,
    ParamError,
    StreamingError,
)
from mlflow_fullmodel.forward import CallModule, ForwardStrategy
from mlflow_fullmodel.modules import ModuleSet, resolve_device
from mlflow_fullmodel.transform import Configurable, Param, Transform

__all__ = ["ERROR_COLUMN", "ON_ERROR", "FullModel", "answer_records", "apply_step", "brief", "records_frame",
           "step_label"]

_CPU = torch.device("cpu")

#: Output column used when post-processing returns a single value instead of a dict.
PREDICTION_COLUMN = "prediction"

#: The runtime parameter every model has: ``"raise"`` (a bad row fails the call, naming it) or
#: ``"return"`` (a bad row gets its message in the ``error`` column, nulls elsewhere).
ON_ERROR = "on_error"
ERROR_COLUMN = "error"
_ON_ERROR_PARAM = Param("raise", choices=["raise", "return"])

#: ``forward_examples(examples, params) -> outputs``: the forward round of ``predict_records``.
ForwardExamples = Callable[[list[Any], Mapping[str, Any]], list[Any]]


class FullModel:
    """A deployable model: pre-processing, module(s), forward strategy and post-processing.

    ``predict`` runs the data path: each raw row is pre-processed on its own, rows of similar
    length are collated into batches, each batch runs through the forward strategy under
    ``torch.inference_mode``, the outputs are split back into rows in input order, and each row is
    post-processed into named output columns.

    Args:
        preprocess: Transforms applied in order to each raw input (one column's value, or a dict of
            the columns when ``input_columns`` names several).
        module: A TorchScript module (``fm.script(net)``), a ``torch.export`` program, or a plain
            ``torch.nn.Module`` (run as it is, put in eval mode, and exported with torch.export
            from the input example when saved); or a dict of them by name.
        postprocess: Transforms applied in order to each row's outputs; the last returns a dict of
            output columns (or one value, put in the column ``"prediction"``).
        forward: How a batch meets the module(s); default ``CallModule()``.
        collate: How examples become a batch; default ``PadCollate()``.
        input_columns: The names of the raw input columns, as in the model signature.
        batch_size: The most examples in one forward batch.
        device: Where the forward pass runs: ``"cpu"`` or ``"cuda[:index]"``.

    Example::

        >>> import torch
        >>> from mlflow_fullmodel import FullModel, Param, script, transform
        >>> from mlflow_fullmodel.transforms import TopK
        >>> @transform
        ... def marks(text: str) -> torch.Tensor:      # a stand-in for a tokenizer
        ...     return torch.tensor([text.count("!"), text.count("?")], dtype=torch.float)
        >>> net = torch.nn.Linear(2, 2, bias=False)     # a stand-in for a trained network
        >>> _ = net.weight.data.copy_(torch.tensor([[-1.0, 1.0], [1.0, -1.0]]))
        >>> model = FullModel(
        ...     preprocess=[marks],
        ...     module=script(net),
        ...     postprocess=[TopK(labels=["neg", "pos"], k=Param(1))],
        ... )
        >>> answers = model.predict(["What a film!", "Dull?"], params={"k": 2})
        >>> answers[["label", "top_labels"]]
          label  top_labels
        0   pos  [pos, neg]
        1   neg  [neg, pos]

    With text, ``SentencePieceEncode(Artifact("spm.model"))`` is the usual first step.
    """

    def __init__(
        self,
        preprocess: Sequence[Transform | type[Transform]],
        module: Any,
        postprocess: Sequence[Transform | type[Transform]] = (),
        *,
        forward: ForwardStrategy | None = None,
        collate: Collate | None = None,
        input_columns: Sequence[str] = ("text",),
        batch_size: int = 32,
        device: str | torch.device = "cpu",
    ) -> None:
        self.preprocess = [_instantiate(step, "preprocess", i) for i, step in enumerate(preprocess)]
        self.postprocess = [_instantiate(step, "postprocess", i) for i, step in enumerate(postprocess)]
        self.module = ModuleSet.of(module)
        self.forward = forward if forward is not None else CallModule()
        self.collate = collate if collate is not None else PadCollate()
        self.forward.check_collate(self.collate)
        if isinstance(input_columns, str) or not input_columns:
            raise ConfigError(f"input_columns must be a non-empty list of names, got {input_columns!r}.")
        self.input_columns = list(input_columns)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}.")
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self._param_owner = self._collect_params()

    # -- configuration ---------------------------------------------------------------------------

    def steps(self) -> list[tuple[str, Configurable]]:
        """Every configured step with a label naming its place, e.g. ``"preprocess[1]"``."""
        return (
            [(step_label("preprocess", i), s) for i, s in enumerate(self.preprocess)]
            + [("collate", self.collate), ("forward", self.forward)]
            + [(step_label("postprocess", i), s) for i, s in enumerate(self.postprocess)]
        )

    def _collect_params(self) -> dict[str, tuple[str, Param]]:
        owners: dict[str, tuple[str, Param]] = {ON_ERROR: ("model", _ON_ERROR_PARAM)}
        for label, step in self.steps():
            for name, param in step.params().items():
                if name == ON_ERROR:
                    raise ConfigError(
                        f"{label} ({type(step).__name__}) declares the runtime parameter '{ON_ERROR}', which "
                        "every model has already (a bad row raises or returns its error); rename the argument."
                    )
                if name in owners:
                    raise ConfigError(
                        f"Runtime parameter '{name}' is declared by both {owners[name][0]} and "
                        f"{label} ({type(step).__name__}); parameter names must be unique. Rename "
                        "the argument in one of the steps."
                    )
                owners[name] = (label, param)
        return owners

    @property
    def params(self) -> dict[str, Param]:
        """The runtime parameters, by name, with their saved defaults."""
        return {name: param for name, (_, param) in self._param_owner.items()}

    def _resolve_params(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        """Validate call-time ``params`` and merge them over the saved defaults into a new dict."""
        params = dict(params or {})
        unknown = sorted(set(params) - set(self._param_owner))
        if unknown:
            raise ParamError(
                f"Unknown parameter(s) {unknown}. Valid parameters are: {sorted(self._param_owner)}."
            )
        return {
            name: param.validate(name, params[name]) if name in params else param.default
            for name, (_, param) in self._param_owner.items()
        }

    def _samples_per_row(self, params: Mapping[str, Any] | None = None) -> int:
        """How many samples the forward pass gets per row with these params (``Transform.samples``)."""
        sampling = [step for step in self.preprocess if type(step).samples is not Transform.samples]
        if not sampling:  # most models: no params to resolve on a served request's path
            return 1
        values = self._resolve_params(params)
        count = 1
        for step in sampling:
            count *= step.samples(**_own(step, values))
        return count

    def to(self, device: str | torch.device) -> FullModel:
        """A copy of this model that runs its forward pass on ``device``."""
        return self._replace(device=device)

    def _replace(self, **changes: Any) -> FullModel:
        """A new FullModel with the same configuration except ``changes`` (constructor arguments)."""
        config = dict(preprocess=self.preprocess, module=self.module, postprocess=self.postprocess,
                      forward=self.forward,
                      collate=self.collate, input_columns=self.input_columns, batch_size=self.batch_size,
                      device=self.device)
        return FullModel(**{**config, **changes})

    def __repr__(self) -> str:
        def listing(steps: Sequence[Configurable]) -> str:
            return "[" + ", ".join(repr(s) for s in steps) + "]"

        modules = ", ".join(f"{n}: {f}" for n, f in self.module.formats.items())
        return (
            f"FullModel(preprocess={listing(self.preprocess)}, module={{{modules}}}, "
            f"forward={self.forward!r}, collate={self.collate!r}, "
            f"postprocess={listing(self.postprocess)}, input_columns={self.input_columns}, "
            f"batch_size={self.batch_size}, device='{self.device}')"
        )

    # -- the data path ---------------------------------------------------------------------------

    def predict(self, data: Any, params: Mapping[str, Any] | None = None) -> pd.DataFrame:
        """Turn raw rows into answer rows.

        Args:
            data: A DataFrame with the input columns, a list of raw values (one input column), a
                list of dicts, or a dict of columns.
            params: Runtime parameter values for this call; unset ones keep their saved defaults.

        Returns:
            A DataFrame with one row per input row, in input order, and the post-processing
            outputs as columns.

        Raises:
            InputError: A column is missing or a row was rejected; the message names the row.
            ParamError: A parameter is unknown or its value invalid; the message names it.
        """
        return records_frame(self.predict_records(data, params))

    def predict_records(self, data: Any, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """``predict``, with the answers as one dict of plain Python values per row: what a JSON
        response holds, without building a DataFrame."""
        return self._predict_records(data, params)

    def _predict_records(
        self,
        data: Any,
        params: Mapping[str, Any] | None = None,
        *,
        forward_examples: ForwardExamples | None = None,
        preprocessing: Callable[[], AbstractContextManager[Any]] = nullcontext,
        deadline: float | None = None,
    ) -> list[dict[str, Any]]:
        """The data path, top to bottom. Inside the package, ``forward_examples`` replaces the
        forward round (``_forward_examples``) and ``preprocessing`` is entered around
        pre-processing: where the micro-batcher and the batch-invariance check join it.
        ``deadline`` (a ``time.monotonic()`` value) stops the work between steps and batches with a
        ``DeadlineError`` once it has passed."""
        values = self._resolve_params(params)
        errors: dict[int, str] | None = {} if values[ON_ERROR] == "return" else None
        rows = self._rows(data, errors)
        ids = [i for i in range(len(rows)) if errors is None or i not in errors]
        examples = [rows[i] for i in ids]
        with telemetry.stage("preprocess"), preprocessing():
            ids, examples = _run_steps("preprocess", self.preprocess, ids, examples, values, errors, deadline)
        forward = forward_examples or (lambda examples, params: self._forward_examples(examples, params, deadline))
        with telemetry.stage("forward"):
            ids, outputs = self._forward_rows(ids, examples, values, forward, errors)
        with telemetry.stage("postprocess"):
            ids, answers = _run_steps("postprocess", self.postprocess, ids, outputs, values, errors, deadline)
        records = answer_records(answers)
        return records if errors is None else _with_errors(records, ids, errors, len(rows))

    def predict_stream(self, data: Any, params: Mapping[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Answer one row as it is made: with a generating forward strategy (``GreedySearch``,
        ``BeamSearch``), one partial answer per decoding step, each post-processed into the same
        columns as ``predict_records``' answer (for a translator: the text so far), then the answer
        itself, equal to ``predict_records(data, params)[0]``.

        Args:
            data: One row: a raw value (one input column), a dict of the input columns, or a
                one-row list or DataFrame.
            params: Runtime parameter values for this call, as for ``predict``; ``on_error`` must
                stay ``"raise"`` (a stream answers one row, and a failure ends it).

        Raises:
            StreamingError: The forward strategy computes its answer in one call, or ``data`` is
                not one row.
            InputError, ParamError: As for ``predict``.

        Example::

            for answer in model.predict_stream({"source": "1,234"}, params={"beam_size": 4}):
                print(answer["translation"])     # the best hypothesis so far, then the answer
        """
        return self._predict_stream(data, params)

    def _predict_stream(self, data: Any, params: Mapping[str, Any] | None = None, *,
                        deadline: float | None = None) -> Iterator[dict[str, Any]]:
        """``predict_stream``'s data path: ``_predict_records``' for one row, the forward strategy's
        ``stream`` in place of its call, each step's output post-processed. Closing the iterator
        stops the decoding before its next step; ``deadline`` stops it between steps."""
        values = self._resolve_params(params)
        if values[ON_ERROR] != "raise":
            raise StreamingError(f"A stream answers one row and ends with its error if it fails: leave "
                                 f"'{ON_ERROR}' at 'raise' (got {values[ON_ERROR]!r}).")
        rows = self._rows(data)
        if len(rows) != 1:
            raise StreamingError(f"A stream answers one row, got {len(rows)}; send each row as a request of its "
                                 "own, or ask for the whole answer of many rows without streaming.")
        with telemetry.stage("preprocess"):
            _, examples = _run_steps("preprocess", self.preprocess, [0], rows, values, None, deadline)
        _check_deadline(deadline, "forward")
        batch = self.collate(examples).to(self.device)
        telemetry.forward_batch(1)
        name = f"forward {type(self.forward).__name__}"
        steps = self.forward.stream(self.module, batch, self.device, **_own(self.forward, values))
        try:
            while True:
                _check_deadline(deadline, f"the next step of {name}")
                # Entered around each step, not around the generator: between steps the caller's
                # code runs, outside inference mode.
                with telemetry.stage("forward"), torch.inference_mode(), self.module.evaluating():
                    try:
                        outputs = next(steps)
                    except StopIteration:
                        return
                    except FullModelError:
                        raise
                    except Exception as error:
                        raise ModelError(f"Row 0: {name} failed: {brief(error)}", step=name) from error
                output = uncollate(to_device(outputs, _CPU), 1)[0]
                with telemetry.stage("postprocess"):
                    _, answers = _run_steps("postprocess", self.postprocess, [0], [output], values, None, deadline)
                yield answer_records(answers)[0]
        finally:
            steps.close()

    def _forward_examples(
        self, examples: list[Any], params: Mapping[str, Any], deadline: float | None = None,
        batches: list[list[int]] | None = None,
    ) -> list[Any]:
        """Pre-processed examples to per-example outputs, in order: length-grouped batches (or the
        given ``batches`` of example indices), each collated, run through the forward strategy and
        split back into rows."""
        outputs: list[Any] = [None] * len(examples)
        for indices in batches if batches is not None else self._plan_batches(examples):
            _check_deadline(deadline, "forward")
            batch = self.collate([examples[i] for i in indices])
            telemetry.forward_batch(len(indices))
            for i, output in zip(indices, uncollate(self._forward(batch, params), len(indices))):
                outputs[i] = output
        return outputs

    def _forward_rows(
        self, ids: list[int], examples: list[Any], params: Mapping[str, Any], forward_examples: ForwardExamples,
        errors: dict[int, str] | None,
    ) -> tuple[list[int], list[Any]]:
        try:
            return ids, forward_examples(examples, params)
        except DeadlineError:
            raise
        except FullModelError:
            if errors is None:
                raise
        except Exception as error:
            if errors is None:
                raise self._forward_failure(ids, examples, params, forward_examples, error) from error
        # Find the rows at fault one by one, then answer the others together as if the bad rows had
        # never been sent: a failing row must not change its neighbours' answers.
        kept = []
        for row, example in zip(ids, examples):
            try:
                forward_examples([example], params)
                kept.append((row, example))
            except DeadlineError:
                raise  # the request's deadline, not this row's fault
            except Exception as error:
                errors[row] = f"Row {row}: forward {type(self.forward).__name__} failed: {brief(error)}"
        return [row for row, _ in kept], forward_examples([e for _, e in kept], params) if kept else []

    def _forward_failure(self, ids: list[int], examples: list[Any], params: Mapping[str, Any],
                         forward_examples: ForwardExamples, error: Exception) -> ModelError:
        """The error of a failed forward round, naming the first row that fails on its own (found
        only now that the round has failed, one row at a time)."""
        name = f"forward {type(self.forward).__name__}"
        if len(examples) > 1:
            for row, example in zip(ids, examples):
                try:
                    forward_examples([example], params)
                except DeadlineError:
                    raise
                except Exception as row_error:
                    return ModelError(f"Row {row}: {name} failed: {brief(row_error)}", step=name)
            return ModelError(f"{name} failed on a batch of rows that each pass alone: {brief(error)}", step=name)
        return ModelError(f"Row {ids[0] if ids else 0}: {name} failed: {brief(error)}", step=name)

    def _rows(self, data: Any, errors: dict[int, str] | None = None) -> list[Any]:
        """The raw inputs of ``data``, one per row: a value, or a dict when there are several
        input columns. A missing value raises ``InputError``, or, given ``errors``, is recorded
        there by row index."""
        if isinstance(data, pd.DataFrame):
            return self._frame_rows(data, errors)
        records = _records(data, self.input_columns)
        for index, record in enumerate(records):
            for column in self.input_columns:
                if column not in record:
                    raise InputError(
                        f"Row {index} has no column '{column}'; the model expects columns "
                        f"{self.input_columns}, got {sorted(record)}."
                    )
                if _is_missing(record[column]):
                    _missing(index, column, errors)
        if len(self.input_columns) == 1:
            return [record[self.input_columns[0]] for record in records]
        return [{c: record[c] for c in self.input_columns} for record in records]

    def _frame_rows(self, frame: pd.DataFrame, errors: dict[int, str] | None) -> list[Any]:
        # Column-wise: the scoring server hands every request over as a DataFrame.
        columns = self.input_columns
        names = frame.columns.tolist()
        if len(columns) == 1 and len(names) == 1 and isinstance(frame.columns, pd.RangeIndex):
            # A column without a name (a list of values made into a frame) is the input column; a
            # column with another name is a mistake to report, not to rename.
            frame, names = frame.set_axis(columns, axis=1), columns
        missing = [c for c in columns if c not in names]
        if missing:
            raise InputError(
                f"Missing column(s) {missing}; the model expects columns {columns}, got "
                f"{[str(c) for c in names]}."
            )
        # DataFrame.items, not frame[column]: a request's frame is new each time, and a column
        # lookup builds the frame's index engine, which costs more than the rest of this method.
        series = dict(frame.items())
        values = {column: series[column].tolist() for column in columns}
        for column, column_values in values.items():
            for index, value in enumerate(column_values):
                if _is_missing(value):
                    _missing(index, column, errors)
        if len(columns) == 1:
            return values[columns[0]]
        return [dict(zip(columns, row)) for row in zip(*values.values())]

    def _preprocess(self, rows: Sequence[Any], params: Mapping[str, Any]) -> list[Any]:
        """Apply each pre-processing step to all rows, in order (see ``Transform.batch``)."""
        return _run_steps("preprocess", self.preprocess, list(range(len(rows))), list(rows), params)[1]

    def _plan_batches(self, examples: Sequence[Any]) -> list[list[int]]:
        """Row indices grouped into batches of similar length, so little of a batch is padding."""
        return length_buckets([example_length(e) for e in examples], self.batch_size)

    def _forward(self, batch: Batch, params: Mapping[str, Any]) -> Any:
        """Run the forward strategy on ``batch`` on the model's device; outputs come back on CPU."""
        with torch.inference_mode(), self.module.evaluating():
            outputs = self.forward(
                self.module, batch.to(self.device), self.device, **_own(self.forward, params)
            )
        return to_device(outputs, _CPU)

def step_label(stage: str, index: int) -> str:
    """How a pre- or post-processing step is named everywhere (messages, the spec): ``"preprocess[1]"``."""
    return f"{stage}[{index}]"


def _instantiate(step: Any, stage: str, index: int) -> Transform:
    if isinstance(step, type) and issubclass(step, Transform):
        step = step()
    if not isinstance(step, Transform):
        raise ConfigError(
            f"{step_label(stage, index)} must be a Transform (a subclass instance or an @transform function), "
            f"got {type(step).__name__}."
        )
    return step


def _own(step: Configurable, params: Mapping[str, Any]) -> dict[str, Any]:
    return {name: params[name] for name in step.params()}


def apply_step(
    step: Transform,
    where: str,
    ids: list[int],
    values: list[Any],
    params: Mapping[str, Any],
    errors: dict[int, str] | None = None,
) -> tuple[list[int], list[Any]]:
    """``step`` over all rows at once; if that fails, row by row, so that the error names the row
    at fault and the step. Returns the rows that passed (their ids and values): without
    ``errors`` a failing row raises, with it its message is recorded there and the row dropped.

    Raises:
        InputError: A row failed (or its own ``FullModelError`` subclass), naming the row.
        ConfigError: ``step.batch`` failed although every row passes on its own: a wrong override.
    """
    own = _own(step, params)
    try:
        return ids, step.batch(values, **own)
    except Exception as error:
        batch_error = error  # find the row at fault below
    kept_ids, results = [], []
    for row, value in zip(ids, values):
        try:
            results.append(step(value, **own))
            kept_ids.append(row)
        except Exception as error:
            failure = _row_failure(row, where, step, error)
            if errors is None:
                raise failure from error
            errors[row] = str(failure)
    if len(kept_ids) == len(ids):
        raise ConfigError(
            f"{where} {type(step).__name__}.batch failed ({type(batch_error).__name__}: {batch_error}) although "
            f"every row passes on its own; batch() must give what [self(x) for x in xs] gives."
        ) from batch_error
    return kept_ids, results


def _run_steps(
    stage: str, steps: list[Transform], ids: list[int], values: list[Any], params: Mapping[str, Any],
    errors: dict[int, str] | None = None, deadline: float | None = None,
) -> tuple[list[int], list[Any]]:
    for index, step in enumerate(steps):
        _check_deadline(deadline, step_label(stage, index))
        ids, values = apply_step(step, step_label(stage, index), ids, values, params, errors)
    return ids, values


def _check_deadline(deadline: float | None, before: str) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineError(f"the request's work went past its deadline and was stopped before {before}")


#: Exceptions a step raises about the value it was given: the input's fault. Anything else from a
#: step (an AttributeError, a RuntimeError, ...) is a ``ModelError``.
INPUT_FAULTS = (ValueError, TypeError, KeyError, IndexError, UnicodeError, OverflowError)


def _row_failure(row: int, where: str, step: Transform, error: Exception) -> FullModelError:
    name = f"{where} {type(step).__name__}"
    if isinstance(error, ModelError):
        return ModelError(f"Row {row}: {name}: {error}", step=name)
    if isinstance(error, FullModelError):
        return type(error)(f"Row {row}: {name}: {error}")
    if isinstance(error, INPUT_FAULTS):
        return InputError(f"Row {row}: {name} failed: {brief(error)}")
    return ModelError(f"Row {row}: {name} failed: {brief(error)}", step=name)


def brief(error: BaseException) -> str:
    """``Type: message`` in one line. TorchScript errors carry the scripted source and its file
    path before the message itself, on their last line (``builtins.RuntimeError: ...``)."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and ": " in lines[-1]:
        return lines[-1].removeprefix("builtins.")
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _missing(row: int, column: str, errors: dict[int, str] | None) -> None:
    message = f"Row {row}, column '{column}': value is missing (null)."
    if errors is None:
        raise InputError(message)
    errors.setdefault(row, message)


def _with_errors(
    records: list[dict[str, Any]], ids: list[int], errors: dict[int, str], rows: int
) -> list[dict[str, Any]]:
    """Every row in input order: answers with ``error`` None, failed rows with nulls and their error."""
    answered = dict(zip(ids, records))
    columns = list(records[0]) if records else []
    return [
        {**answered[row], ERROR_COLUMN: None} if row in answered
        else {**dict.fromkeys(columns), ERROR_COLUMN: errors[row]}
        for row in range(rows)
    ]


def _records(data: Any, columns: list[str]) -> list[dict[str, Any]]:
    if isinstance(data, pd.Series):
        return [{columns[0]: v} for v in data.tolist()] if len(columns) == 1 else data.tolist()
    if isinstance(data, np.ndarray):
        data = data.tolist()
    if isinstance(data, (str, bytes)):
        data = [data]
    if isinstance(data, Mapping):
        if all(isinstance(v, (list, tuple, np.ndarray, pd.Series)) for v in data.values()):
            frame = pd.DataFrame({k: list(v) for k, v in data.items()})
            # The records' keys are the columns: the keys of ``data``.
            return cast("list[dict[str, Any]]", frame.to_dict(orient="records"))
        data = [data]
    if not isinstance(data, (list, tuple)):
        raise InputError(
            f"predict takes a DataFrame, a list of rows or a dict of columns, got {type(data).__name__}."
        )
    records = []
    for index, item in enumerate(data):
        if isinstance(item, Mapping):
            records.append(dict(item))
        elif len(columns) == 1:
            records.append({columns[0]: item})
        else:
            raise InputError(
                f"Row {index} is a {type(item).__name__}; with several input columns {columns} each "
                "row must be a dict of them."
            )
    return records


def _is_missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


_PLAIN_TYPES = (str, int, float, bool, type(None), bytes)


def _plain(value: Any) -> Any:
    """Tensors and numpy values as Python values, so answers serialise to JSON as they are."""
    if isinstance(value, _PLAIN_TYPES):
        return value
    if isinstance(value, (list, tuple)) and all(type(v) in _PLAIN_TYPES for v in value):
        return list(value)
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def answer_records(answers: list[Any]) -> list[dict[str, Any]]:
    """One dict of plain values per answer (a bare value goes in the column ``prediction``);
    every answer must have the same columns."""
    rows = [a if isinstance(a, dict) else {PREDICTION_COLUMN: a} for a in answers]
    if not rows:
        return rows
    columns = list(rows[0])
    for index, row in enumerate(rows):
        if list(row) != columns:
            raise ConfigError(
                f"Post-processing returned columns {list(row)} for row {index} but {columns} for "
                "row 0; every row must have the same output columns."
            )
    for column in columns:
        values = [row[column] for row in rows]
        plain = _plain_column(values)
        if plain is not values:
            for row, value in zip(rows, plain):
                row[column] = value
    return rows


def records_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """The answer records as a DataFrame, one column per key."""
    return pd.DataFrame({c: [r[c] for r in records] for c in (list(records[0]) if records else [])})


def _plain_column(values: list[Any]) -> list[Any]:
    # Steps usually return Python values already; then the column is checked, not rebuilt.
    if all(type(v) in _PLAIN_TYPES for v in values):
        return values
    if all(type(v) is list for v in values) and all(type(x) in _PLAIN_TYPES for v in values for x in v):
        return values
    return [_plain(v) for v in values]
