"""What the tokenizer steps share (``text`` for sentencepiece, ``hf_tokenizers`` for Hugging Face
``tokenizers``): their argument checks, the "no tokens" error of the encoders, and the decoders'
check of their input candidates against the tokenizer's vocabulary and the answer they make."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mlflow_fullmodel.exceptions import ConfigError
from mlflow_fullmodel.transform import Artifact

#: An encoder's error for a text with nothing for the model to read: an answer would be noise.
NO_TOKENS = "the text has no tokens (it is empty or only whitespace)"

#: A decoder's output columns besides the one named by its ``column`` argument.
_OTHER_COLUMNS = ("candidates", "scores")


def check_artifact(step: str, argument: str, value: Any, example: str) -> None:
    """Refuse a tokenizer file given as a path rather than an ``Artifact`` (it would not be saved
    with the model); ``example`` is the file name the fix shows."""
    if not isinstance(value, Artifact):
        raise ConfigError(
            f"{step}: {argument} must be an Artifact, got {type(value).__name__}; wrap the path: "
            f"Artifact({example!r})."
        )


def check_column(step: str, column: Any) -> None:
    """Refuse a decoder's ``column`` that is not a name of its own."""
    if not isinstance(column, str) or not column or column in _OTHER_COLUMNS:
        raise ConfigError(
            f"{step}: column must be a non-empty name other than 'candidates' and 'scores' (the other "
            f"output columns), got {column!r}."
        )


def checked_candidates(
    step: str, candidates: Any, vocabulary: Callable[[], int], tokenizer_file: Artifact
) -> list[tuple[list[int], float]]:
    """One example's ``(token_ids, score)`` candidates, as GreedySearch and BeamSearch return them,
    with plain int ids and float scores, after checking every id against the size of the
    tokenizer's vocabulary (``vocabulary()``, asked once the input has the right shape).

    Raises:
        ConfigError: The input is not a list of candidates, or an id is outside the vocabulary:
            the forward strategy or the module does not go with this step.
    """
    if not (
        isinstance(candidates, (list, tuple))
        and all(
            isinstance(c, (list, tuple)) and len(c) == 2
            and (isinstance(c[0], (list, tuple)) or (isinstance(c[0], torch.Tensor) and c[0].dim() == 1))
            for c in candidates
        )
    ):
        raise ConfigError(
            f"{step} expects a list of (token_ids, score) candidates per example, as GreedySearch and "
            f"BeamSearch return, got {type(candidates).__name__}; use one of them as the FullModel's "
            "forward strategy."
        )
    size = vocabulary()
    checked = []
    for index, (ids, score) in enumerate(candidates):
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        outside = [i for i in ids if not 0 <= i < size]
        if outside:
            # A module whose output vocabulary is another tokenizer's: the text would be wrong, and
            # tokenizers even drops unknown ids without a word.
            raise ConfigError(
                f"{step}: candidate {index} has token id(s) {outside[:5]} outside the vocabulary of "
                f"{tokenizer_file.path!r} ({size} tokens); the module's output vocabulary must be the "
                "target tokenizer's."
            )
        checked.append((ids, float(score)))
    return checked


def decoded(column: str, texts: list[str], scores: list[float]) -> dict[str, Any]:
    """A decoder's answer for one example: the best text under ``column``, then all of them."""
    return {column: texts[0] if texts else "", "candidates": texts, "scores": scores}
