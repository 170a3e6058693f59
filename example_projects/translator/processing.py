"""The project's own pre-processing, saved with the model as source code.

``NormalizeNumber`` runs before the source tokenizer, both when the tokenizer is trained (on the
training split) and inside the logged model, so ``"12,345"``, ``" 12 345 "`` and ``"12345"`` reach
the network as the same token ids. Being a module-level ``fm.Transform`` of this project, it is
copied into the model by ``fm.log_model``: serving needs nothing from this folder.
"""

from __future__ import annotations

import mlflow_fullmodel as fm

__all__ = ["NormalizeNumber"]


class NormalizeNumber(fm.Transform):
    """Remove thousands separators and spaces from a number written in digits.

    Args:
        separators: The characters removed (besides whitespace).

    Raises:
        InputError: At predict time, when the text is not a number written in digits; the message
            says what was received.

    Example::

        NormalizeNumber()(" 12,345 ")
        # '12345'
    """

    def __init__(self, separators: str = ",_'") -> None:
        if not isinstance(separators, str) or any(c.isdigit() for c in separators):
            raise ValueError(f"NormalizeNumber: separators must be a string without digits, got {separators!r}.")

    def __call__(self, text: str) -> str:
        if not isinstance(text, str):
            raise fm.InputError(f"expected a string, got {type(text).__name__}")
        digits = "".join(c for c in text if not c.isspace() and c not in self.separators)
        if not digits.isdigit() or not digits.isascii():
            # The network has only seen digits: anything else would be translated into nonsense.
            raise fm.InputError(f"expected a number written in digits, e.g. '1234' or '12,345', got {text!r}")
        return digits
