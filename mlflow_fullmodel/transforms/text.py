"""Text pre-processing."""

from __future__ import annotations

import itertools
from functools import cached_property
from typing import Any

import numpy as np
import torch

from mlflow_fullmodel._checks import is_int
from mlflow_fullmodel.exceptions import ConfigError, InputError
from mlflow_fullmodel.transform import Artifact, Transform
from mlflow_fullmodel.transforms._optional import require
from mlflow_fullmodel.transforms._tokens import NO_TOKENS, check_artifact, check_column, checked_candidates, decoded

#: From this many rows on, one batch call into the encoder pays for its set-up (a thread pool).
_BATCH_ENCODE_ROWS = 8
#: From this many rows on, one encode call uses every core.
_PARALLEL_ENCODE_ROWS = 64

__all__ = ["SentencePieceDecode", "SentencePieceEncode"]


class _SentencePieceStep(Transform):
    """A step with a trained sentencepiece model, loaded on first use from the file's verified
    bytes, so what was hashed is what runs."""

    requirements = ("sentencepiece",)

    model_file: Artifact

    @cached_property
    def _processor(self) -> Any:
        import sentencepiece

        processor = sentencepiece.SentencePieceProcessor()
        processor.LoadFromSerializedProto(self.model_file.read_bytes())
        return processor


class SentencePieceEncode(_SentencePieceStep):
    """Encode a string into a 1-D tensor of token ids with a trained sentencepiece model.

    The tokenizer is the one trained on this model's training data; as an ``Artifact`` it is saved
    inside the model, so serving tokenizes exactly as training did.

    Args:
        model_file: The sentencepiece ``.model`` file.
        max_length: The most ids kept, BOS/EOS included; longer texts are truncated.
        add_bos: Prepend the model's BOS id (the sentencepiece model must define one).
        add_eos: Append the model's EOS id (the sentencepiece model must define one).

    Example::

        >>> import sentencepiece
        >>> sentencepiece.SentencePieceTrainer.train(     # a tiny tokenizer, written to spm.model
        ...     sentence_iterator=iter(["what a film", "a dull film", "what a plot"] * 20),
        ...     model_prefix="spm", vocab_size=20, hard_vocab_limit=False, minloglevel=2)
        >>> encode = SentencePieceEncode(Artifact("spm.model"), max_length=128)
        >>> ids = encode("what a film")
        >>> ids.dtype, ids.dim()
        (torch.int64, 1)
        >>> len(SentencePieceEncode(Artifact("spm.model"), max_length=2)("what a dull film"))
        2
    """

    max_length: int
    add_bos: bool
    add_eos: bool

    def __init__(
        self, model_file: Artifact, max_length: int = 512, add_bos: bool = False, add_eos: bool = False
    ) -> None:
        check_artifact("SentencePieceEncode", "model_file", model_file, "spm.model")
        if not is_int(max_length) or max_length < 1 + add_bos + add_eos:
            raise ConfigError(f"SentencePieceEncode: max_length must be an int >= {1 + add_bos + add_eos} (one token "
                              f"besides the BOS/EOS ids it adds), got {max_length!r}.")
        require("SentencePieceEncode", "sentencepiece", "sentencepiece", "sentencepiece")

    def __call__(self, text: str) -> torch.Tensor:
        if not isinstance(text, str):
            raise InputError(f"expected a string, got {type(text).__name__}")
        return self._finish(self._processor.EncodeAsIds(text))

    def batch(self, texts: list[str], /, **params: Any) -> list[torch.Tensor]:
        if not all(isinstance(text, str) for text in texts):
            raise InputError("expected strings")  # FullModel retries row by row to name the row
        # One tensor for all ids, split into per-row views instead of a tensor built per row.
        # A few rows (a served request) are encoded one by one, on the calling thread, since
        # requests run in parallel; many rows go in one call into the C++ encoder, which uses
        # every core for a large batch.
        processor = self._processor
        if len(texts) < _BATCH_ENCODE_ROWS:
            encoded = [processor.EncodeAsIds(text) for text in texts]
        else:
            threads = 1 if len(texts) < _PARALLEL_ENCODE_ROWS else -1
            encoded = processor.Encode(texts, num_threads=threads)
        rows = [self._bounded(ids) for ids in encoded]
        sizes = [len(ids) for ids in rows]
        flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=sum(sizes))
        ids = torch.from_numpy(flat)
        return [ids] if len(rows) == 1 else list(ids.split(sizes))

    def _finish(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor(self._bounded(ids), dtype=torch.long)

    def _bounded(self, ids: list[int]) -> list[int]:
        """Truncate to ``max_length`` with room for BOS/EOS, and add them."""
        if not ids:
            raise InputError(NO_TOKENS)
        processor = self._processor
        room = self.max_length - self.add_bos - self.add_eos
        if len(ids) > room:  # most texts fit: no copy of their ids
            ids = ids[:room]
        if self.add_bos:
            ids = [processor.bos_id(), *ids]
        if self.add_eos:
            ids = [*ids, processor.eos_id()]
        return ids


class SentencePieceDecode(_SentencePieceStep):
    """Turn one example's decoded candidates into text with a trained sentencepiece model.

    Its input is what ``GreedySearch`` and ``BeamSearch`` return for an example: a list of
    ``(token_ids, score)`` candidates, best first. The tokenizer is the one trained on the target
    side of this model's training data; as an ``Artifact`` it is saved inside the model, so serving
    detokenizes exactly as training did.

    Output columns, the same whatever the runtime parameters are: ``column`` (default
    ``"translation"``, the best candidate's text), ``candidates`` (the texts of all candidates, a
    list of ``n_best`` strings) and ``scores`` (their scores, a list of floats).

    Args:
        model_file: The target side's sentencepiece ``.model`` file.
        column: The name of the output column holding the best candidate's text.

    Example::

        >>> import sentencepiece
        >>> sentencepiece.SentencePieceTrainer.train(     # a tiny tokenizer, written to spm.model
        ...     sentence_iterator=iter(["what a film", "a dull film", "what a plot"] * 20),
        ...     model_prefix="spm", vocab_size=20, hard_vocab_limit=False, minloglevel=2)
        >>> encode = SentencePieceEncode(Artifact("spm.model"))
        >>> candidates = [(encode("what a film"), -0.3), (encode("a dull film"), -1.2)]
        >>> SentencePieceDecode(Artifact("spm.model"))(candidates)
        {'translation': 'what a film', 'candidates': ['what a film', 'a dull film'], 'scores': [-0.3, -1.2]}
    """

    column: str

    def __init__(self, model_file: Artifact, column: str = "translation") -> None:
        check_artifact("SentencePieceDecode", "model_file", model_file, "target.model")
        check_column("SentencePieceDecode", column)
        require("SentencePieceDecode", "sentencepiece", "sentencepiece", "sentencepiece")

    def __call__(self, candidates: Any) -> dict[str, Any]:
        processor = self._processor
        checked = checked_candidates("SentencePieceDecode", candidates, processor.get_piece_size, self.model_file)
        return decoded(self.column, [processor.DecodeIds(ids) for ids, _ in checked], [score for _, score in checked])
