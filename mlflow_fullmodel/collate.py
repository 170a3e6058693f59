"""Turning pre-processed examples into batches, and batch outputs back into examples.

An example is a tensor, or a tuple or dict of tensors (nested as deep as needed). Collation keeps
that structure: 1-D tensors of different lengths are padded into ``(batch, longest)`` and every
other tensor is stacked, so fixed-size images and variable-length token ids both batch the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mlflow_fullmodel._checks import is_int, is_number
from mlflow_fullmodel.exceptions import ConfigError, InputError
from mlflow_fullmodel.transform import Configurable

__all__ = ["Batch", "Collate", "PadCollate", "example_length", "length_buckets", "to_device", "uncollate"]

#: Tensor types that numpy holds as they are, so that padding can be done in numpy.
_NUMPY_DTYPES = frozenset({
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.float32, torch.float64,
})

#: The most padding a batch may carry, as a fraction of its real elements, before it is split.
PADDING_TOLERANCE = 0.25


@dataclass
class Batch:
    """Collated examples: ``inputs`` has the examples' structure with a leading batch dimension;
    ``lengths`` holds each example's unpadded length when some tensor was padded, else None."""

    inputs: Any
    lengths: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        return Batch(to_device(self.inputs, device), to_device(self.lengths, device))


class Collate(Configurable):
    """Base class: ``__call__(examples)`` turns pre-processed examples into one ``Batch``."""

    def __call__(self, examples: Sequence[Any]) -> Batch:
        raise NotImplementedError


class PadCollate(Collate):
    """Pad variable-length 1-D tensors to the longest in the batch, stack the rest.

    Args:
        pad_value: The value written into padded positions (the tokenizer's pad id for token ids).
        pad_side: "right" to append padding after the tokens, "left" to put it before them.
        pad_values: Pad values by key, for examples that are dicts whose members need different
            padding (token ids padded with the pad id, an ``attention_mask`` with 0); a key not
            listed takes ``pad_value``.
        length: Pad every batch to this length instead of its longest example: for a module that
            takes one sequence length only (a recurrent network exported with torch.export). Set
            it to the tokenizer's ``max_length``; a longer example is an ``InputError``.

    Example::

        >>> batch = PadCollate(pad_value=0)([torch.tensor([5, 6, 7]), torch.tensor([8])])
        >>> batch.inputs
        tensor([[5, 6, 7],
                [8, 0, 0]])
        >>> batch.lengths
        tensor([3, 1])
        >>> mixed = PadCollate(pad_value=3, pad_values={"attention_mask": 0})(
        ...     [{"input_ids": torch.tensor([5, 6]), "attention_mask": torch.tensor([1, 1])},
        ...      {"input_ids": torch.tensor([8]), "attention_mask": torch.tensor([1])}])
        >>> mixed.inputs["input_ids"], mixed.inputs["attention_mask"]
        (tensor([[5, 6],
                [8, 3]]), tensor([[1, 1],
                [1, 0]]))
    """

    pad_value: int | float
    pad_side: str
    pad_values: dict[str, int | float] | None
    length: int | None

    def __init__(
        self,
        pad_value: int | float = 0,
        pad_side: str = "right",
        pad_values: dict[str, int | float] | None = None,
        length: int | None = None,
    ) -> None:
        if pad_side not in ("right", "left"):
            raise ConfigError(f"PadCollate: pad_side must be 'right' or 'left', got {pad_side!r}.")
        if pad_values is not None and not (
            isinstance(pad_values, dict)
            and all(isinstance(k, str) and is_number(v) for k, v in pad_values.items())
        ):
            raise ConfigError(
                "PadCollate: pad_values must be a dict of key names to numbers, e.g. "
                f"{{'attention_mask': 0}}, got {pad_values!r}."
            )
        if length is not None and (not is_int(length) or length < 1):
            raise ConfigError(f"PadCollate: length must be None or an int >= 1, got {length!r}.")

    def __call__(self, examples: Sequence[Any]) -> Batch:
        if all(type(e) is torch.Tensor and e.dim() == 1 for e in examples):
            return self._pad_rows(examples)  # the common case (token ids), without the walk below
        lengths: list[torch.Tensor] = []
        inputs = self._collate(list(examples), "example", lengths, self.pad_value)
        return Batch(inputs, lengths[0] if lengths else None)

    def _pad_rows(self, rows: Sequence[torch.Tensor]) -> Batch:
        sizes = np.fromiter((row.shape[0] for row in rows), dtype=np.int64, count=len(rows))
        width = self._width(int(sizes.max(initial=0)))
        flat = torch.cat(list(rows))
        if flat.dtype in _NUMPY_DTYPES and flat.device.type == "cpu":
            # One masked assignment in numpy instead of a copy per row: about half the time for
            # a batch of 32 short texts.
            positions = np.arange(width)
            if self.pad_side == "right":
                real = positions < sizes[:, None]
            else:
                real = positions >= len(positions) - sizes[:, None]
            values = flat.numpy()
            padded = np.full(real.shape, self.pad_value, dtype=values.dtype)
            padded[real] = values
            return Batch(torch.from_numpy(padded), torch.from_numpy(sizes))
        return Batch(self._pad(list(rows), width, self.pad_value), torch.from_numpy(sizes))

    def _width(self, longest: int) -> int:
        """The padded length of a batch whose longest example has ``longest`` positions."""
        if self.length is None:
            return longest
        if longest > self.length:
            raise InputError(
                f"An example has {longest} positions but PadCollate pads to length={self.length}; "
                "truncate in pre-processing (the tokenizer's max_length) to at most that."
            )
        return self.length

    def _pad(self, tensors: list[torch.Tensor], width: int, pad: int | float) -> torch.Tensor:
        out = torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=pad, padding_side=self.pad_side)
        missing = width - out.shape[1]
        if missing > 0:
            extra = out.new_full((out.shape[0], missing, *out.shape[2:]), pad)
            out = torch.cat([out, extra] if self.pad_side == "right" else [extra, out], dim=1)
        return out

    def _collate(self, items: list[Any], where: str, lengths: list[torch.Tensor], pad: int | float) -> Any:
        first = items[0]
        if isinstance(first, dict):
            keys = list(first)
            for index, item in enumerate(items):
                if not isinstance(item, dict) or list(item) != keys:
                    raise InputError(
                        f"Cannot batch {where}: row {index} has keys {_describe_keys(item)}, "
                        f"row 0 has {keys}."
                    )
            by_key = self.pad_values or {}
            return {
                k: self._collate([item[k] for item in items], f"{where}[{k!r}]", lengths, by_key.get(k, pad))
                for k in keys
            }
        if isinstance(first, (tuple, list)) and not _is_number_list(first):
            for index, item in enumerate(items):
                if not isinstance(item, (tuple, list)) or len(item) != len(first):
                    raise InputError(
                        f"Cannot batch {where}: row {index} is not a sequence of {len(first)} items."
                    )
            return tuple(
                self._collate([item[i] for item in items], f"{where}[{i}]", lengths, pad)
                for i in range(len(first))
            )
        tensors = [_as_tensor(item, where, index) for index, item in enumerate(items)]
        return self._pad_or_stack(tensors, where, lengths, pad)

    def _pad_or_stack(
        self, tensors: list[torch.Tensor], where: str, lengths: list[torch.Tensor], pad: int | float
    ) -> torch.Tensor:
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) == 1 and (self.length is None or tensors[0].dim() != 1):
            if tensors[0].dim() == 1 and not lengths:
                lengths.append(torch.full((len(tensors),), tensors[0].shape[0], dtype=torch.long))
            return torch.stack(tensors)
        if any(t.dim() != 1 for t in tensors):
            raise InputError(
                f"Cannot batch {where}: tensors of shapes {sorted(shapes)} differ and only 1-D "
                "tensors are padded. Resize or crop them to one shape in pre-processing."
            )
        sizes = torch.tensor([t.shape[0] for t in tensors], dtype=torch.long)
        out = self._pad(tensors, self._width(int(sizes.max())), pad)
        if not lengths:
            lengths.append(sizes)
        return out


def _is_number_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, (int, float)) for v in value)


def _describe_keys(item: Any) -> Any:
    return list(item) if isinstance(item, dict) else type(item).__name__


def _as_tensor(item: Any, where: str, index: int) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, np.ndarray) or _is_number_list(item) or isinstance(item, (int, float)):
        return torch.as_tensor(item)
    raise InputError(
        f"Cannot batch {where} of row {index}: pre-processing must end in tensors, got "
        f"{type(item).__name__}."
    )


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it (nested in dicts, tuples and lists) on ``device``."""
    if isinstance(value, torch.Tensor):
        # Skipping a move that changes nothing is not only cheaper: every torch call releases the
        # GIL, and under a server's concurrent requests every release costs a thread switch.
        return value if value.device == device else value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value


def example_length(example: Any) -> int:
    """The size used to group examples of similar length: the element count of the first tensor."""
    if type(example) is torch.Tensor:  # the common case first: this runs once per row
        return example.shape[0] if example.ndim else 1
    if isinstance(example, dict):
        example = next(iter(example.values()), None)
    elif isinstance(example, (tuple, list)) and example and not _is_number_list(example):
        example = example[0]
    if isinstance(example, (dict, tuple)):
        return example_length(example)
    if isinstance(example, (torch.Tensor, np.ndarray)):
        return int(example.shape[0]) if example.ndim else 1
    if isinstance(example, list):
        return len(example)
    return 1


def length_buckets(lengths: Sequence[int], max_size: int, tolerance: float = PADDING_TOLERANCE) -> list[list[int]]:
    """Indices grouped into batches of at most ``max_size`` similar lengths: sorted by length, and
    a batch is closed early when padding to its longest would add more than ``tolerance`` of its
    real elements (a 5-token text and a 200-token one are not worth padding together).

    Example::

        >>> length_buckets([3, 100, 4, 90, 5], max_size=4)
        [[0, 2, 4], [3, 1]]
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    buckets: list[list[int]] = []
    current: list[int] = []
    real = 0
    for index in order:
        length = lengths[index]  # the longest so far: the order is ascending
        if current and (len(current) >= max_size or (len(current) + 1) * length > (real + length) * (1 + tolerance)):
            buckets.append(current)
            current, real = [], 0
        current.append(index)
        real += length
    if current:
        buckets.append(current)
    return buckets


def uncollate(outputs: Any, size: int) -> list[Any]:
    """Split batch outputs into ``size`` examples: a tensor along its first dimension, a tuple or
    dict of tensors member-wise; a list is taken as already one entry per example."""
    if isinstance(outputs, torch.Tensor):
        if outputs.dim() == 0 or outputs.shape[0] != size:
            raise ValueError(
                f"The module returned a tensor of shape {tuple(outputs.shape)}; its first dimension "
                f"must be the batch size {size}."
            )
        return list(outputs.unbind(0))
    if isinstance(outputs, dict):
        columns = {k: uncollate(v, size) for k, v in outputs.items()}
        return [{k: columns[k][i] for k in columns} for i in range(size)]
    if isinstance(outputs, list):
        # A strategy that already returns one entry per example (e.g. decoded token lists).
        if len(outputs) != size:
            raise ValueError(f"The forward strategy returned {len(outputs)} outputs for {size} examples.")
        return outputs
    if isinstance(outputs, tuple):
        columns_seq = [uncollate(v, size) for v in outputs]
        return [tuple(column[i] for column in columns_seq) for i in range(size)]
    raise TypeError(f"Cannot split a module output of type {type(outputs).__name__} into examples.")
