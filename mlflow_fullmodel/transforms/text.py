"""Text pre-processing."""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch

from mlflow_fullmodel.exceptions import InputError
from mlflow_fullmodel.transform import Artifact, Transform

__all__ = ["SentencePieceEncode"]


class SentencePieceEncode(Transform):
    """Encode a string into a 1-D tensor of token ids with a trained sentencepiece model.

    The tokenizer is the one trained on this model's training data; as an ``Artifact`` it is saved
    inside the model, so serving tokenizes exactly as training did.

    Args:
        model_file: The sentencepiece ``.model`` file.
        max_length: The most ids kept, BOS/EOS included; longer texts are truncated.
        add_bos: Prepend the model's BOS id (the sentencepiece model must define one).
        add_eos: Append the model's EOS id (the sentencepiece model must define one).

    Example::

        SentencePieceEncode(Artifact("spm.model"), max_length=128)("What a film!")
        # tensor([ 45, 312,   9,  77])
    """

    requirements = ("sentencepiece",)

    def __init__(
        self, model_file: Artifact, max_length: int = 512, add_bos: bool = False, add_eos: bool = False
    ) -> None:
        if not isinstance(model_file, Artifact):
            raise TypeError(
                f"SentencePieceEncode: model_file must be an Artifact, got {type(model_file).__name__}; "
                "wrap the path: Artifact('spm.model')."
            )
        if not isinstance(max_length, int) or max_length < 1 + add_bos + add_eos:
            raise ValueError(f"SentencePieceEncode: max_length must be an int >= 1, got {max_length!r}.")

    @cached_property
    def _processor(self) -> Any:
        import sentencepiece

        processor = sentencepiece.SentencePieceProcessor()
        processor.Load(self.model_file.path)
        return processor

    def __call__(self, text: str) -> torch.Tensor:
        if not isinstance(text, str):
            raise InputError(f"expected a string, got {type(text).__name__}")
        processor = self._processor
        ids = processor.EncodeAsIds(text)
        budget = self.max_length - self.add_bos - self.add_eos
        ids = ids[:budget]
        if self.add_bos:
            ids = [processor.bos_id(), *ids]
        if self.add_eos:
            ids = [*ids, processor.eos_id()]
        if not ids:
            # Nothing for the model to read: an answer would be noise, so say so.
            raise InputError("the text has no tokens (it is empty or only whitespace)")
        return torch.tensor(ids, dtype=torch.long)
