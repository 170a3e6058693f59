"""Classification post-processing."""

from __future__ import annotations

import math
from typing import Any

import torch

from mlflow_fullmodel._checks import is_int
from mlflow_fullmodel.exceptions import ConfigError, ParamError
from mlflow_fullmodel.transform import Param, Transform, param_default, param_value

__all__ = ["TopK"]

#: Up to this many rows (a served request), the answer is worked out in Python: each torch call
#: releases the GIL, which a scoring server's other threads are waiting for.
_PYTHON_ROWS = 8


class TopK(Transform):
    """Turn one row of class scores into the best label, its probability and the top ``k``.

    Output columns: ``label``, ``probability``, ``top_labels`` and ``top_probabilities`` (lists of
    length ``k``). The columns are the same whatever ``k`` is. Of labels with equal probability,
    the one listed first in ``labels`` comes first.

    Args:
        labels: The class names, in the order of the model's output scores.
        k: How many labels to list; usually a ``Param`` so a request can ask for more.
        softmax: Apply a softmax to the scores (set False when the module returns probabilities).

    Example::

        >>> top = TopK(labels=["neg", "pos"], k=Param(1))
        >>> answer = top(torch.tensor([0.2, 1.3]), k=2)
        >>> answer["label"], round(answer["probability"], 3), answer["top_labels"]
        ('pos', 0.75, ['pos', 'neg'])
    """

    labels: list[str]
    k: int | Param
    softmax: bool

    def __init__(self, labels: list[str], k: int | Param = 1, softmax: bool = True) -> None:
        if not isinstance(labels, (list, tuple)) or not labels or not all(isinstance(x, str) for x in labels):
            raise ConfigError(f"TopK: labels must be a non-empty list of strings, got {labels!r}.")
        default_k = param_default(k)
        if not is_int(default_k) or not 1 <= default_k <= len(labels):
            raise ConfigError(f"TopK: k must be an int from 1 to {len(labels)}, got {default_k!r}.")

    def __call__(self, scores: torch.Tensor, **params: Any) -> dict[str, Any]:
        return self.batch([scores], **params)[0]

    def batch(self, rows: list[torch.Tensor], /, **params: Any) -> list[dict[str, Any]]:
        k = param_value(self.k, params, "k")
        if not 1 <= k <= len(self.labels):
            raise ParamError(f"Parameter 'k' must be from 1 to {len(self.labels)}, got {k}.")
        for scores in rows:
            if scores.shape != (len(self.labels),):
                raise ConfigError(
                    f"TopK: the module returned {tuple(scores.shape)} scores per row for "
                    f"{len(self.labels)} labels."
                )
        if len(rows) <= _PYTHON_ROWS:
            tops = [_top_k(scores.tolist(), k, self.softmax) for scores in rows]
        else:
            # All rows in one softmax and one sort; a stable sort, not topk, whose order of ties
            # is unspecified, so that ties go to the lower index as in the Python path.
            scores = torch.stack(rows).double()
            probabilities = torch.softmax(scores, dim=1) if self.softmax else scores
            values, indices = torch.sort(probabilities, dim=1, descending=True, stable=True)
            tops = list(zip(values[:, :k].tolist(), indices[:, :k].tolist()))
        answers = []
        for top_values, top_indices in tops:
            top_labels = [self.labels[i] for i in top_indices]
            answers.append({
                "label": top_labels[0],
                "probability": top_values[0],
                "top_labels": top_labels,
                "top_probabilities": top_values,
            })
        return answers


def _top_k(scores: list[float], k: int, softmax: bool) -> tuple[list[float], list[int]]:
    """One row's ``k`` best probabilities and their indices: the softmax computed as torch does,
    in float64 (exp(x - max) / sum), and ties to the lower index."""
    if softmax:
        top = max(scores)
        exps = [math.exp(x - top) for x in scores]
        total = sum(exps)
        scores = [x / total for x in exps]
    indices = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)[:k]
    return [scores[i] for i in indices], indices
