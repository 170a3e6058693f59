"""The example's data: scikit-learn's handwritten digits, rendered as PNG files.

``load_digits`` (bundled with scikit-learn, no download) holds 1,797 grey-level images of 8x8
pixels, values 0 to 16. ``render_png`` turns one into what a client would upload: a PNG file of
dark ink on white paper, upscaled smoothly to ``size`` pixels with a one-pixel margin, so the
model's ``DecodeImage`` and ``Resize`` have real work to do.

Run it to write one digit as a PNG for a request::

    python digits.py --index 0 --out digit.png
"""

from __future__ import annotations

import argparse
import io
import random
from collections.abc import Sequence

import numpy as np
from PIL import Image

__all__ = ["LABELS", "load_pngs", "render_png", "split"]

LABELS = [str(d) for d in range(10)]


def render_png(pixels: np.ndarray, size: int = 40) -> bytes:
    """An 8x8 digit (values 0 to 16) as a grayscale PNG of ``size`` x ``size``, dark on white.

    Example::

        from sklearn.datasets import load_digits
        open("digit.png", "wb").write(render_png(load_digits().images[0]))
    """
    ink = np.clip(np.asarray(pixels, dtype=np.float64) / 16.0, 0.0, 1.0)
    paper = np.pad(255.0 * (1.0 - ink), 1, constant_values=255.0)  # a margin: crops cut paper, not ink
    image = Image.fromarray(np.round(paper).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def load_pngs(num_examples: int | None = None, size: int = 40, seed: int = 0) -> tuple[list[bytes], list[str]]:
    """The digits as PNG bytes and their labels ("0" to "9"); ``num_examples`` of them chosen at
    random with ``seed`` (all 1,797 when None)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = list(range(len(digits.images)))
    random.Random(seed).shuffle(order)
    if num_examples is not None:
        order = order[:num_examples]
    return [render_png(digits.images[i], size) for i in order], [LABELS[int(digits.target[i])] for i in order]


def split(
    images: Sequence[bytes], labels: Sequence[str], validation_fraction: float, seed: int
) -> tuple[tuple[list[bytes], list[str]], tuple[list[bytes], list[str]]]:
    """A seeded random split into (training, validation), each ``(images, labels)``."""
    order = list(range(len(images)))
    random.Random(seed + 1).shuffle(order)
    cut = len(order) - max(1, int(round(len(order) * validation_fraction)))
    train, val = order[:cut], order[cut:]
    def pick(indices: list[int]) -> tuple[list[bytes], list[str]]:
        return [images[i] for i in indices], [labels[i] for i in indices]

    return pick(train), pick(val)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write one scikit-learn digit as a PNG file.")
    parser.add_argument("--index", type=int, default=0, help="which of the 1,797 digits (default: %(default)s)")
    parser.add_argument("--size", type=int, default=40, help="width and height in pixels (default: %(default)s)")
    parser.add_argument("--out", default="digit.png", help="(default: %(default)s)")
    args = parser.parse_args()
    from sklearn.datasets import load_digits

    digits = load_digits()
    with open(args.out, "wb") as f:
        f.write(render_png(digits.images[args.index], args.size))
    print(f"wrote {args.out}: the digit {digits.target[args.index]}")
