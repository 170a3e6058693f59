"""Classification post-processing."""

from __future__ import annotations

from typing import Any

import torch

from mlflow_fullmodel.exceptions import ConfigError, ParamError
from mlflow_fullmodel.transform import Param, Transform

__all__ = ["TopK"]


class TopK(Transform):
    """Turn one row of class scores into the best label, its probability and the top ``k``.

    Output columns: ``label``, ``probability``, ``top_labels`` and ``top_probabilities`` (lists of
    length ``k``). The columns are the same whatever ``k`` is.

    Args:
        labels: The class names, in the order of the model's output scores.
        k: How many labels to list; usually a ``Param`` so a request can ask for more.
        softmax: Apply a softmax to the scores (set False when the module returns probabilities).

    Example::

        TopK(labels=["neg", "pos"], k=Param(1))(torch.tensor([0.2, 1.3]), k=2)
        # {'label': 'pos', 'probability': 0.75, 'top_labels': ['pos', 'neg'], ...}
    """

    def __init__(self, labels: list[str], k: int | Param = 1, softmax: bool = True) -> None:
        if not isinstance(labels, (list, tuple)) or not labels or not all(isinstance(x, str) for x in labels):
            raise ConfigError(f"TopK: labels must be a non-empty list of strings, got {labels!r}.")
        default_k = k.default if isinstance(k, Param) else k
        if not isinstance(default_k, int) or not 1 <= default_k <= len(labels):
            raise ConfigError(f"TopK: k must be an int from 1 to {len(labels)}, got {default_k!r}.")

    def __call__(self, scores: torch.Tensor, **params: Any) -> dict[str, Any]:
        return self.batch([scores], **params)[0]

    def batch(self, rows: list[torch.Tensor], **params: Any) -> list[dict[str, Any]]:
        k = params.get("k", self.k.default if isinstance(self.k, Param) else self.k)
        if not 1 <= k <= len(self.labels):
            raise ParamError(f"Parameter 'k' must be from 1 to {len(self.labels)}, got {k}.")
        for scores in rows:
            if scores.shape != (len(self.labels),):
                raise ConfigError(
                    f"TopK: the module returned {tuple(scores.shape)} scores per row for "
                    f"{len(self.labels)} labels."
                )
        # All rows in one softmax and one topk.
        scores = torch.stack(rows).double()
        probabilities = torch.softmax(scores, dim=1) if self.softmax else scores
        values, indices = torch.topk(probabilities, k, dim=1)
        answers = []
        for top_values, top_indices in zip(values.tolist(), indices.tolist()):
            top_labels = [self.labels[i] for i in top_indices]
            answers.append({
                "label": top_labels[0],
                "probability": top_values[0],
                "top_labels": top_labels,
                "top_probabilities": top_values,
            })
        return answers
