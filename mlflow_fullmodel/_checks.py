"""Type checks that configuration and runtime values share: Python's ``bool`` is an ``int``, so
"an int" and "a number" are written once here, each leaving ``True`` and ``False`` out.

numpy scalars are what Python's own types say they are: ``numpy.float64`` subclasses ``float``
and is a number; ``numpy.int64`` subclasses neither ``int`` nor ``float`` and is not.

Example::

    >>> is_int(3), is_int(True), is_int(3.0)
    (True, False, False)
    >>> is_number(0.5), is_number(2), is_number(False), is_number("1")
    (True, True, False, False)
"""

from __future__ import annotations

from typing import Any, TypeGuard

__all__ = ["is_int", "is_number"]


def is_int(value: Any) -> TypeGuard[int]:
    """Whether ``value`` is an ``int`` and not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> TypeGuard[int | float]:
    """Whether ``value`` is an ``int`` or a ``float`` and not a ``bool`` (NaN and infinities are
    numbers: check ``math.isfinite`` where they are not wanted)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
