"""Plain string helpers used by ``processing.Normalize``.

This module is imported by ``processing.py``; when the model is logged, mlflow-fullmodel copies
it into the model together with ``processing.py`` (local imports are captured transitively), so
the served model normalises text with exactly this code.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["collapse_whitespace", "fold_unicode", "strip_punctuation"]

# Typographic apostrophes and quotes folded to their ASCII forms, so "don’t" and "don't" agree.
_FOLD = str.maketrans({"\u2018": "'", "\u2019": "'", "\u02bc": "'", "\u201c": '"', "\u201d": '"'})

# Anything that is neither a word character, whitespace nor an apostrophe.
_PUNCTUATION = re.compile(r"[^\w\s']+")
# An apostrophe that is not inside a word ("'quoted'" -> "quoted", "don't" stays).
_LOOSE_APOSTROPHE = re.compile(r"(?<!\w)'|'(?!\w)")


def fold_unicode(text: str) -> str:
    """NFKC-normalise ``text`` (full-width letters, ligatures) and fold typographic quotes."""
    return unicodedata.normalize("NFKC", text).translate(_FOLD)


def strip_punctuation(text: str) -> str:
    """Replace punctuation by spaces, keeping apostrophes inside words."""
    return _LOOSE_APOSTROPHE.sub(" ", _PUNCTUATION.sub(" ", text))


def collapse_whitespace(text: str) -> str:
    """Trim ``text`` and turn every run of whitespace (tabs, newlines) into one space."""
    return " ".join(text.split())
