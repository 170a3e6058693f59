"""The project's own pre-processing, saved with the model as source code.

``Normalize`` runs before the sentencepiece tokenizer, both when the tokenizer is trained (on the
training split) and inside the logged model. Because it is a module-level ``fm.Transform`` in a
module of this project, ``fm.log_model`` copies this file, and ``text_utils.py`` which it imports,
into the model: the serving process needs neither this folder nor the training code.

Everything that configures the transform is a constructor argument (saved as JSON in the model);
the transform keeps no other public state.
"""

from __future__ import annotations

from text_utils import collapse_whitespace, fold_unicode, strip_punctuation

import mlflow_fullmodel as fm

__all__ = ["Normalize"]


class Normalize(fm.Transform):
    """Normalise one review: Unicode folding, lower-casing, punctuation and whitespace clean-up.

    Args:
        lowercase: Lower-case the text.
        remove_punctuation: Replace punctuation by spaces (apostrophes inside words are kept).

    Example::

        Normalize()("  What   a FILM!! ")
        # 'what a film'
    """

    def __init__(self, lowercase: bool = True, remove_punctuation: bool = True) -> None:
        for name, value in (("lowercase", lowercase), ("remove_punctuation", remove_punctuation)):
            if not isinstance(value, bool):
                raise TypeError(f"Normalize: {name} must be a bool, got {value!r}.")

    def __call__(self, text: str) -> str:
        if not isinstance(text, str):
            raise fm.InputError(f"expected a string, got {type(text).__name__}")
        text = fold_unicode(text)
        if self.lowercase:
            text = text.lower()
        if self.remove_punctuation:
            text = strip_punctuation(text)
        return collapse_whitespace(text)
