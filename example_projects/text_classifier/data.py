"""The example's data: a synthetic corpus of labelled movie reviews, or the user's own CSV file.

``synthetic_reviews(n, seed)`` writes short reviews from positive, negative and neutral (lukewarm
or mixed) vocabulary, with the untidy casing, punctuation and spacing of real user input, so that
``Normalize`` has work to do. The same seed always gives the same corpus.
"""

from __future__ import annotations

import csv
import os
import random
import re
from collections.abc import Sequence

__all__ = ["LABELS", "DataError", "read_csv", "split", "synthetic_reviews"]

LABELS = ["negative", "neutral", "positive"]


class DataError(ValueError):
    """The user's data cannot be used: a missing column, an empty value, a single label."""

_SUBJECTS = [
    "The film", "This movie", "The sequel", "The remake", "The documentary", "Her new picture",
    "His latest feature", "The series finale", "This thriller", "The comedy", "The animated film",
]
_ASPECTS = [
    "acting", "plot", "soundtrack", "script", "pacing", "cinematography", "ending", "dialogue",
    "cast", "direction", "score", "editing", "lead performance", "humour", "visual effects",
]
_NOUNS = ["film", "movie", "story", "ride", "picture", "watch", "experience", "debut"]
_POSITIVE = [
    "brilliant", "wonderful", "superb", "moving", "delightful", "gripping", "charming", "stunning",
    "masterful", "hilarious", "heartfelt", "excellent", "beautiful", "captivating", "fantastic",
    "thrilling", "inventive", "touching", "remarkable", "gorgeous",
]
_NEGATIVE = [
    "dull", "boring", "awful", "tedious", "clumsy", "lifeless", "dreadful", "forgettable", "messy",
    "bland", "painful", "terrible", "predictable", "shallow", "disappointing", "incoherent",
    "sloppy", "lazy", "pointless", "annoying",
]
_NEUTRAL = [
    "okay", "average", "fine", "decent", "uneven", "passable", "ordinary", "mixed", "watchable",
    "standard", "fair", "middling", "so-so", "unremarkable", "conventional", "serviceable",
]
_FILLERS = [
    "I watched it on a Sunday afternoon.", "My friend recommended it.", "It runs about two hours.",
    "We saw it at the local cinema.", "I had read the book first.", "The trailer gave a lot away.",
    "It is streaming now.", "I went in knowing nothing about it.",
]

_TEMPLATES = {
    "positive": [
        "{subject} was {pos}.",
        "What a {pos} {noun}!",
        "I loved it, {pos} from start to finish.",
        "The {aspect} is {pos} and the {aspect2} is {pos2}.",
        "{pos}! Easily the best {noun} this year.",
        "Not {neg} at all, actually quite {pos}.",
        "A {pos}, {pos2} {noun}. Go and see it.",
        "I would happily watch it again, the {aspect} was {pos}.",
        "The {aspect} was {pos}.",
        "{pos} {aspect}, {pos2} {aspect2}.",
    ],
    "negative": [
        "{subject} was {neg}.",
        "I wanted to like it, but it was {neg}.",
        "The {aspect} felt {neg} and the {aspect2} was {neg2}.",
        "A {neg} {noun}; I left early.",
        "Skip it. {neg} and {neg2}.",
        "Two hours of my life I will not get back, {neg} {aspect}.",
        "Far from {pos}, just {neg}.",
        "What a {neg} {noun}.",
        "The {aspect} was {neg}.",
        "{neg} {aspect}, {neg2} {aspect2}.",
    ],
    "neutral": [
        "{subject} was {neu}, nothing special.",
        "The {aspect} was {pos} but the {aspect2} was {neg}.",
        "It was {neu}. Some parts worked, some did not.",
        "A {neu} {noun}; worth a look on a slow evening.",
        "{neu} {aspect}, {neu2} {aspect2}.",
        "Neither {pos} nor {neg}, just {neu}.",
        "The {aspect} was {neg} yet the {aspect2} was {pos}, so it evens out.",
        "{subject} is {neu}. You will forget it by next week.",
        "The {aspect} was {neu}.",
        "{pos} {aspect}, {neg} {aspect2}.",
    ],
}


def _tidy(text: str) -> str:
    """Sentence case and "a"/"an" agreement for a filled-in template."""
    text = re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)
    return re.sub(r"(^|[.!?] )([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)


def _messy(text: str, rng: random.Random) -> str:
    """Add the casing, punctuation and spacing noise of real reviews."""
    roll = rng.random()
    if roll < 0.1:
        text = text.upper()
    elif roll < 0.2:
        text = text.lower()
    if rng.random() < 0.15:
        text = text.rstrip(".!") + rng.choice(["!!", "!!!", "...", " :)", " :(", "?!"])
    if rng.random() < 0.15:
        text = text.replace(" ", "  ", 1)
    if rng.random() < 0.1:
        text = "  " + text + " "
    return text


def synthetic_reviews(n: int, seed: int = 0, label_noise: float = 0.02) -> tuple[list[str], list[str]]:
    """``n`` labelled reviews, balanced over ``LABELS``, the same for the same ``seed``.

    Args:
        n: The number of reviews.
        seed: The random seed.
        label_noise: The fraction of reviews whose label is replaced by a random one, as in
            real annotated data.

    Returns:
        ``(texts, labels)``.
    """
    rng = random.Random(seed)
    texts, labels = [], []
    for index in range(n):
        label = LABELS[index % len(LABELS)]
        pos, pos2 = rng.sample(_POSITIVE, 2)
        neg, neg2 = rng.sample(_NEGATIVE, 2)
        neu, neu2 = rng.sample(_NEUTRAL, 2)
        aspect, aspect2 = rng.sample(_ASPECTS, 2)
        text = rng.choice(_TEMPLATES[label]).format(
            subject=rng.choice(_SUBJECTS), noun=rng.choice(_NOUNS), aspect=aspect, aspect2=aspect2,
            pos=pos, pos2=pos2, neg=neg, neg2=neg2, neu=neu, neu2=neu2,
        )
        text = _tidy(text)
        if rng.random() < 0.3:
            filler = rng.choice(_FILLERS)
            text = f"{filler} {text}" if rng.random() < 0.5 else f"{text} {filler}"
        texts.append(_messy(text, rng))
        labels.append(rng.choice(LABELS) if rng.random() < label_noise else label)
    order = list(range(n))
    rng.shuffle(order)
    return [texts[i] for i in order], [labels[i] for i in order]


def read_csv(path: str | os.PathLike[str]) -> tuple[list[str], list[str]]:
    """Read ``(texts, labels)`` from a CSV file with a header and the columns ``text`` and ``label``.

    Raises:
        DataError: The file lacks a column, a row has an empty text or label, or there are fewer
            than two labels.
    """
    texts, labels = [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"text", "label"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(
                f"{path}: the CSV needs the columns 'text' and 'label'; missing {sorted(missing)} "
                f"(found {reader.fieldnames})."
            )
        for row in reader:
            text, label = (row.get("text") or "").strip(), (row.get("label") or "").strip()
            if not text or not label:
                raise DataError(f"{path}, line {reader.line_num}: empty text or label.")
            texts.append(text)
            labels.append(label)
    if len(set(labels)) < 2:
        raise DataError(f"{path}: a classifier needs at least two labels, found {sorted(set(labels))}.")
    return texts, labels


def split(
    texts: Sequence[str], labels: Sequence[str], validation_fraction: float, seed: int
) -> tuple[tuple[list[str], list[str]], tuple[list[str], list[str]]]:
    """Shuffle and split into ``((train_texts, train_labels), (val_texts, val_labels))``; both
    parts keep at least one example."""
    if len(texts) < 2:
        raise DataError(f"Need at least two examples to split into training and validation, "
                         f"got {len(texts)}.")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(len(order) * validation_fraction)), len(order) - 1)
    val, train = order[:n_val], order[n_val:]
    train_part = ([texts[i] for i in train], [labels[i] for i in train])
    val_part = ([texts[i] for i in val], [labels[i] for i in val])
    return train_part, val_part
