"""The example's data: a generated parallel corpus of numbers, written in digits (the source
language) and in English words (the target language).

``parallel_corpus(n, max_number, seed)`` draws ``n`` distinct numbers, so that no number is in both
the training and the validation split, and writes each one the way users type them: sometimes with
thousands separators (``"12,345"``, ``"12 345"``) and stray spaces. The same seed always gives the
same corpus.
"""

from __future__ import annotations

import random

__all__ = ["parallel_corpus", "split", "to_words"]

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
         "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def to_words(number: int) -> str:
    """``number`` (0 to 999,999) in English words, e.g. ``1234`` -> ``"one thousand two hundred
    thirty-four"``."""
    if not 0 <= number <= 999_999:
        raise ValueError(f"to_words: number must be from 0 to 999999, got {number}.")
    if number < 20:
        return _ONES[number]
    if number < 100:
        tens, ones = divmod(number, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    if number < 1000:
        hundreds, rest = divmod(number, 100)
        return f"{_ONES[hundreds]} hundred" + (f" {to_words(rest)}" if rest else "")
    thousands, rest = divmod(number, 1000)
    return f"{to_words(thousands)} thousand" + (f" {to_words(rest)}" if rest else "")


def _in_digits(number: int, rng: random.Random) -> str:
    text = str(number)
    if number >= 1000 and rng.random() < 0.3:
        text = f"{number:,}".replace(",", rng.choice([",", " "]))
    if rng.random() < 0.1:
        text = " " + text + "  "
    return text


def parallel_corpus(n: int, max_number: int = 9999, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` pairs ``(digits, words)`` of distinct numbers from 0 to ``max_number``.

    The number of digits is drawn uniformly first, so that short numbers are not swamped by the
    many long ones.

    Args:
        n: The number of pairs; at most ``max_number + 1``.
        max_number: The largest number, at most 999,999.
        seed: The random seed.
    """
    if not 1 <= n <= max_number + 1:
        raise ValueError(f"parallel_corpus: n must be from 1 to max_number + 1 = {max_number + 1}, got {n}.")
    rng = random.Random(seed)
    digits = len(str(max_number))
    chosen: set[int] = set()
    # Rejection sampling needs many draws once the short numbers are used up; a uniform draw then fills in.
    for _ in range(20 * n):
        if len(chosen) == n:
            break
        width = rng.randint(1, digits)
        low, high = (0 if width == 1 else 10 ** (width - 1)), min(10**width - 1, max_number)
        chosen.add(rng.randint(low, high))
    remaining = [x for x in range(max_number + 1) if x not in chosen]
    chosen.update(rng.sample(remaining, n - len(chosen)))
    numbers = sorted(chosen)
    rng.shuffle(numbers)
    return [(_in_digits(x, rng), to_words(x)) for x in numbers]


def split(
    pairs: list[tuple[str, str]], validation_fraction: float
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(train, validation)``: the last ``validation_fraction`` of the (already shuffled) pairs
    is held out; both parts keep at least one pair."""
    n_val = min(max(1, round(len(pairs) * validation_fraction)), len(pairs) - 1)
    return pairs[: len(pairs) - n_val], pairs[len(pairs) - n_val :]
