"""Text steps for Hugging Face ``tokenizers`` tokenizers: a ``tokenizer.json`` file (BPE, WordPiece,
Unigram, with its normalizer, pre-tokenizer, post-processor and decoder).

The file is readable JSON, saved in the model as an ``Artifact`` and loaded from its verified bytes
(``Tokenizer.from_str``): no pickle. ``tokenizers`` is an optional dependency
(``pip install mlflow-fullmodel[hf]``); a model that uses these steps lists it, pinned, in its
``requirements.txt``.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch

from mlflow_fullmodel._checks import is_int
from mlflow_fullmodel.exceptions import ConfigError, InputError
from mlflow_fullmodel.transform import Artifact, Transform
from mlflow_fullmodel.transforms._optional import require
from mlflow_fullmodel.transforms._tokens import NO_TOKENS, check_artifact, check_column, checked_candidates, decoded

__all__ = ["TokenizerDecode", "TokenizerEncode"]

_TRUNCATION_SIDES = ("right", "left")


class TokenizerEncode(Transform):
    """Encode a string into token ids with a trained Hugging Face ``tokenizers`` tokenizer.

    Truncation and special tokens come from this step's arguments, not from the file: the file's
    own truncation is replaced by ``max_length`` and ``truncation_side``, and its padding is
    turned off, since padding a batch is the collate step's job (``PadCollate``). Each example
    is the 1-D ``input_ids`` tensor; when the module's forward also takes ``attention_mask`` or
    ``token_type_ids``, ask for them and each example becomes a dict of 1-D tensors, which
    ``CallModule`` passes to the module as keyword arguments. The mask of one example is all ones;
    padding makes the zeros, so give ``PadCollate`` the pad id for the ids and 0 for the others:
    ``PadCollate(pad_value=pad_id, pad_values={"attention_mask": 0, "token_type_ids": 0})``
    (``PadCollate()`` pads everything with 0, which is right when the pad id is 0).

    ``batch`` encodes all rows in one ``encode_batch`` call (the library's thread pool) and gives
    each row what it gets alone.

    Args:
        tokenizer_file: The tokenizer's ``tokenizer.json`` file (``Tokenizer.save(path)``).
        max_length: The most tokens kept, special tokens included; longer texts are truncated.
        add_special_tokens: Add the special tokens of the tokenizer's post-processor (e.g.
            ``[CLS] ... [SEP]``); a tokenizer without a post-processor adds none.
        truncation_side: "right" keeps the start of a long text, "left" keeps its end.
        return_attention_mask: Make each example a dict with an ``attention_mask`` beside the
            ``input_ids``.
        return_token_type_ids: Make each example a dict with the ``token_type_ids`` (segment ids)
            beside the ``input_ids``.

    Raises:
        ConfigError: At construction, ``tokenizers`` is not installed; at first use, the file is
            not a ``tokenizer.json`` or ``max_length`` leaves no room for the text.
        InputError: A row that is not a string, or a text with no tokens (empty or only spaces).

    Example::

        >>> from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
        >>> tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))   # a tiny one, for the example
        >>> tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        >>> tokenizer.train_from_iterator(["what a film", "a dull film", "what a plot"] * 20,
        ...     trainers.WordPieceTrainer(vocab_size=40, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
        ...                             show_progress=False))
        >>> tokenizer.post_processor = processors.TemplateProcessing(
        ...     single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        >>> tokenizer.save("tokenizer.json")
        >>> encode = TokenizerEncode(Artifact("tokenizer.json"), max_length=128, return_attention_mask=True)
        >>> example = encode("what a film")
        >>> example["input_ids"].tolist() == [2, *tokenizer.encode("what a film", add_special_tokens=False).ids, 3]
        True
        >>> example["attention_mask"]
        tensor([1, 1, 1, 1, 1])
        >>> TokenizerEncode(Artifact("tokenizer.json"), max_length=3)("what a dull film").tolist()
        [2, ..., 3]
    """

    requirements = ("tokenizers",)

    tokenizer_file: Artifact
    max_length: int
    add_special_tokens: bool
    truncation_side: str
    return_attention_mask: bool
    return_token_type_ids: bool

    def __init__(
        self,
        tokenizer_file: Artifact,
        max_length: int = 512,
        add_special_tokens: bool = True,
        truncation_side: str = "right",
        return_attention_mask: bool = False,
        return_token_type_ids: bool = False,
    ) -> None:
        check_artifact("TokenizerEncode", "tokenizer_file", tokenizer_file, "tokenizer.json")
        if not is_int(max_length) or max_length < 1:
            raise ConfigError(f"TokenizerEncode: max_length must be an int >= 1, got {max_length!r}.")
        for name in ("add_special_tokens", "return_attention_mask", "return_token_type_ids"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"TokenizerEncode: {name} must be True or False, got {getattr(self, name)!r}.")
        if truncation_side not in _TRUNCATION_SIDES:
            raise ConfigError(
                f"TokenizerEncode: truncation_side must be 'right' or 'left', got {truncation_side!r}."
            )
        require("TokenizerEncode", "tokenizers", "tokenizers", "hf")

    @cached_property
    def _tokenizer(self) -> Any:
        tokenizer = _load("TokenizerEncode", self.tokenizer_file)
        if self.add_special_tokens:
            added = tokenizer.num_special_tokens_to_add(False)
            if self.max_length <= added:
                # tokenizers would skip truncation and return more than max_length tokens.
                raise ConfigError(
                    f"TokenizerEncode: max_length={self.max_length} leaves no room for the text: the "
                    f"tokenizer {self.tokenizer_file.path!r} adds {added} special tokens; use a "
                    f"max_length above {added}, or add_special_tokens=False."
                )
        tokenizer.no_padding()
        tokenizer.enable_truncation(self.max_length, direction=self.truncation_side)
        return tokenizer

    def __call__(self, text: str) -> torch.Tensor | dict[str, torch.Tensor]:
        if not isinstance(text, str):
            raise InputError(f"expected a string, got {type(text).__name__}")
        return self._finish(self._tokenizer.encode(text, add_special_tokens=self.add_special_tokens))

    def batch(self, texts: list[str], /, **params: Any) -> list[torch.Tensor | dict[str, torch.Tensor]]:
        if not all(isinstance(text, str) for text in texts):
            raise InputError("expected strings")  # FullModel retries row by row to name the row
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=self.add_special_tokens)
        return [self._finish(encoding) for encoding in encodings]

    def _finish(self, encoding: Any) -> torch.Tensor | dict[str, torch.Tensor]:
        if 0 not in encoding.special_tokens_mask:
            raise InputError(NO_TOKENS)  # special tokens at most
        ids = torch.tensor(encoding.ids, dtype=torch.long)
        if not (self.return_attention_mask or self.return_token_type_ids):
            return ids
        example = {"input_ids": ids}
        if self.return_attention_mask:
            example["attention_mask"] = torch.tensor(encoding.attention_mask, dtype=torch.long)
        if self.return_token_type_ids:
            example["token_type_ids"] = torch.tensor(encoding.type_ids, dtype=torch.long)
        return example


class TokenizerDecode(Transform):
    """Turn one example's decoded candidates into text with a trained Hugging Face ``tokenizers``
    tokenizer (its decoder joins WordPiece ``##`` pieces, byte-level BPE bytes, ...).

    Its input is what ``GreedySearch`` and ``BeamSearch`` return for an example: a list of
    ``(token_ids, score)`` candidates, best first. Output columns, the same whatever the runtime
    parameters are: ``column`` (default ``"generated_text"``, the best candidate's text),
    ``candidates`` (the texts of all candidates) and ``scores`` (their scores). ``batch`` decodes
    the candidates of all rows in one ``decode_batch`` call.

    Args:
        tokenizer_file: The target side's ``tokenizer.json`` file.
        column: The name of the output column holding the best candidate's text.
        skip_special_tokens: Leave special tokens (``[SEP]``, ``</s>``, ...) out of the text.

    Raises:
        ConfigError: ``tokenizers`` is not installed, the file is not a ``tokenizer.json``, the
            input is not a list of candidates, or a token id is outside the tokenizer's vocabulary
            (the module's output vocabulary is another tokenizer's).

    Example::

        >>> from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        >>> tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))   # a tiny one, for the example
        >>> tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        >>> tokenizer.decoder = decoders.WordPiece()
        >>> tokenizer.train_from_iterator(["what a film", "a dull film", "what a plot"] * 20,
        ...     trainers.WordPieceTrainer(vocab_size=40, special_tokens=["[PAD]", "[UNK]"], show_progress=False))
        >>> tokenizer.save("tokenizer.json")
        >>> encode = TokenizerEncode(Artifact("tokenizer.json"))
        >>> candidates = [(encode("what a film"), -0.3), (encode("a dull plot"), -1.2)]
        >>> TokenizerDecode(Artifact("tokenizer.json"))(candidates)
        {'generated_text': 'what a film', 'candidates': ['what a film', 'a dull plot'], 'scores': [-0.3, -1.2]}
    """

    requirements = ("tokenizers",)

    tokenizer_file: Artifact
    column: str
    skip_special_tokens: bool

    def __init__(
        self, tokenizer_file: Artifact, column: str = "generated_text", skip_special_tokens: bool = True
    ) -> None:
        check_artifact("TokenizerDecode", "tokenizer_file", tokenizer_file, "tokenizer.json")
        check_column("TokenizerDecode", column)
        if not isinstance(skip_special_tokens, bool):
            raise ConfigError(
                f"TokenizerDecode: skip_special_tokens must be True or False, got {skip_special_tokens!r}."
            )
        require("TokenizerDecode", "tokenizers", "tokenizers", "hf")

    @cached_property
    def _tokenizer(self) -> Any:
        return _load("TokenizerDecode", self.tokenizer_file)

    def __call__(self, candidates: Any) -> dict[str, Any]:
        return self.batch([candidates])[0]

    def batch(self, examples: list[Any], /, **params: Any) -> list[dict[str, Any]]:
        rows = [
            checked_candidates("TokenizerDecode", candidates, self._vocabulary_size, self.tokenizer_file)
            for candidates in examples
        ]
        texts = iter(
            self._tokenizer.decode_batch(
                [ids for candidates in rows for ids, _ in candidates], skip_special_tokens=self.skip_special_tokens
            )
        )
        return [decoded(self.column, [next(texts) for _ in candidates], [score for _, score in candidates])
                for candidates in rows]

    def _vocabulary_size(self) -> int:
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))


def _load(step: str, artifact: Artifact) -> Any:
    """The tokenizer built from the artifact's verified bytes, so what was hashed is what runs."""
    import tokenizers

    try:
        text = artifact.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(
            f"{step}: cannot read {artifact.path!r} as a tokenizer.json file: {error}"
        ) from None
    try:
        return tokenizers.Tokenizer.from_str(text)
    except Exception as error:  # noqa: BLE001 -- tokenizers raises a bare Exception for a file it cannot parse
        raise ConfigError(
            f"{step}: {artifact.path!r} is not a Hugging Face tokenizers file (tokenizer.json, "
            f"as Tokenizer.save writes it): {error}"
        ) from None
