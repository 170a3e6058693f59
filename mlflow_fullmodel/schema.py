"""A request's values against the model's signature: each value of an input column must be of the
column's type before any step sees it, so that a number sent as a text is the request's fault
(HTTP 400 naming the row, column and type), not an error inside the model's first step.

MLflow's own schema check converts what it can and passes other values on as they came (an int in
a string column reaches the model as an int).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Integral, Real
from typing import Any

import pandas as pd

from mlflow_fullmodel.exceptions import InputError

__all__ = ["check_column_types"]

#: Signature type name -> (what a value of it is, as a user reads it; the Python types accepted).
_ACCEPTED: dict[str, tuple[str, tuple[type, ...]]] = {
    "string": ("a string", (str,)),
    # base64 text in the "inputs"/"instances" formats, which MLflow does not decode
    "binary": ("bytes (base64 in JSON)", (bytes, bytearray, str)),
    "long": ("an integer", (Integral,)),
    "integer": ("an integer", (Integral,)),
    "double": ("a number", (Real,)),
    "float": ("a number", (Real,)),
    "boolean": ("true or false", (bool,)),
}


def check_column_types(data: Any, types: Mapping[str, str]) -> None:
    """Raise ``InputError`` at the first value of ``data`` (a DataFrame) whose type is not its
    column's signature type in ``types`` (column -> MLflow type name, e.g. ``"string"``). Missing
    values (None, NaN) are left to the model, which names them or answers them per row; columns
    of other types (datetime, arrays, objects) are not checked."""
    if not isinstance(data, pd.DataFrame):
        return
    for column, series in data.items():
        expected = _ACCEPTED.get(types.get(str(column), ""))
        if expected is None or _all_of_type(series, str(types[str(column)])):
            continue
        described, accepted = expected
        for row, value in enumerate(series.tolist()):
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            # bool is an int to Python, never to a signature
            is_bool = isinstance(value, bool)
            if not isinstance(value, accepted) or (is_bool and bool not in accepted):
                raise InputError(f"Row {row}, column '{column}': expected {described}, got {_kind(value)}. "
                                 "Send values of the types in the model's signature.")


def _all_of_type(series: pd.Series, expected: str) -> bool:
    """Whether the column's dtype alone settles it (the common case, with no per-value loop)."""
    kind = series.dtype.kind
    if expected == "string":
        return str(series.dtype) in ("str", "string")
    if expected in ("long", "integer"):
        return kind in "iu"
    if expected in ("double", "float"):
        return kind in "iuf"
    if expected == "boolean":
        return kind == "b"
    return False


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, Integral):
        return "an integer"
    if isinstance(value, Real):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"
