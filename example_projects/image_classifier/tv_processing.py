"""Pre-processing steps written with ``torchvision.transforms.v2.functional``: this project's own
``fm.Transform`` subclasses, saved with the model as source code, not pickled.

Each step keeps its configuration as constructor arguments (saved as JSON in the model) and calls
torchvision's functional API on one image tensor ``(C, H, W)``; the saved model imports this file
from its captured code and lists ``torchvision`` among its pip requirements. ``train.py
--preprocessing torchvision`` builds the model's data path from them::

    DecodeImage(mode="L")      mlflow_fullmodel: bytes -> PIL image, size checked in the header
    ToImage()                  PIL image -> uint8 tensor (C, H, W)
    Resize(32)                 shorter side 32, refusing results over max_pixels before making them
    CenterCrop(28)             the centre 28 x 28   (the tta variant: RandomCrops, mlflow_fullmodel's)
    ToFloat()                  uint8 -> float32 in [0, 1]
    Normalize(mean, std)       (x - mean) / std per channel

Decoding stays mlflow_fullmodel's ``DecodeImage``: it refuses a decompression bomb from the file
header, before any pixel is decoded, which torchvision's decoders do not. The seeded test-time
augmentation crops stay ``RandomCrops``: torchvision's ``RandomCrop`` draws from the global RNG.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

import mlflow_fullmodel as fm
from mlflow_fullmodel.exceptions import ConfigError, InputError

__all__ = ["CenterCrop", "Normalize", "Resize", "ToFloat", "ToImage"]

#: As mlflow_fullmodel's Resize: 16.7 megapixels (4096 x 4096).
DEFAULT_MAX_PIXELS = 4096 * 4096

_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


def _check_tensor(owner: str, image: Any, floating: bool | None = None) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.dim() < 3:
        got = f"a tensor of shape {tuple(image.shape)}" if isinstance(image, torch.Tensor) else type(image).__name__
        raise InputError(f"{owner} takes an image tensor (..., C, H, W), got {got}; put ToImage() before it.")
    if floating is not None and image.is_floating_point() != floating:
        want = "a float" if floating else "a uint8"
        raise InputError(f"{owner} takes {want} image tensor, got {image.dtype}; check the order of the steps.")
    return image


def _check_size(owner: str, size: Any) -> None:
    def positive(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    if positive(size) or (isinstance(size, (list, tuple)) and len(size) == 2 and all(positive(s) for s in size)):
        return
    raise ConfigError(f"{owner}: size must be a positive int or [height, width] of them, got {size!r}.")


class ToImage(fm.Transform):
    """A PIL image -> a uint8 tensor ``(C, H, W)``, as torchvision's ``v2.PILToTensor``."""

    requirements = ("pillow",)

    def __call__(self, image: Any) -> torch.Tensor:
        from PIL import Image

        if not isinstance(image, Image.Image):
            raise InputError(f"ToImage takes a PIL image, got {type(image).__name__}; put DecodeImage() before it.")
        return F.pil_to_tensor(image)


class Resize(fm.Transform):
    """Resize an image tensor with ``F.resize`` (antialiased), as ``v2.Resize(size)``.

    The result's size is computed and checked against ``max_pixels`` *before* torchvision makes
    it: with an int ``size`` a 262144 x 1 image would become 8388608 x 32 pixels, and torchvision
    would allocate them. The rule is torchvision's: the shorter side becomes ``size``, the longer
    ``int(size * long / short)``.

    Args:
        size: An int for the shorter side, or ``[height, width]``.
        interpolation: ``"nearest"``, ``"bilinear"`` or ``"bicubic"``.
        max_pixels: The largest result (height x width) made; a larger one is an ``InputError``.
    """

    def __init__(
        self, size: int | list[int], interpolation: str = "bilinear", max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> None:
        _check_size("Resize", size)
        if interpolation not in _INTERPOLATIONS:
            raise ConfigError(f"Resize: interpolation must be one of {list(_INTERPOLATIONS)}, got {interpolation!r}.")
        if not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels < 1:
            raise ConfigError(f"Resize: max_pixels must be a positive int, got {max_pixels!r}.")

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = _check_tensor("Resize", image)
        height, width = F.get_size(image)
        if isinstance(self.size, int):
            short, long = sorted((height, width))
            new_short, new_long = self.size, int(self.size * long / short)
            new_height, new_width = (new_short, new_long) if height <= width else (new_long, new_short)
        else:
            new_height, new_width = self.size
        if new_height * new_width > self.max_pixels:
            raise InputError(
                f"resizing the {width}x{height} image to size={self.size!r} would make it {new_width}x{new_height} "
                f"({new_width * new_height} pixels), over the limit of max_pixels={self.max_pixels}; send an "
                "image of a less extreme aspect ratio."
            )
        mode = InterpolationMode(self.interpolation)
        # The computed size, not self.size: torchvision then makes exactly what was checked.
        return F.resize(image, [new_height, new_width], interpolation=mode, antialias=True)


class CenterCrop(fm.Transform):
    """The centre ``size`` of an image tensor, with ``F.center_crop``.

    Raises:
        InputError: At call time, for an image smaller than ``size`` (torchvision would pad it).
    """

    def __init__(self, size: int | list[int]) -> None:
        _check_size("CenterCrop", size)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = _check_tensor("CenterCrop", image)
        crop = [self.size, self.size] if isinstance(self.size, int) else list(self.size)
        height, width = F.get_size(image)
        if crop[0] > height or crop[1] > width:
            raise InputError(f"the image is {height}x{width} (height x width), smaller than the crop "
                             f"{crop[0]}x{crop[1]}; put a Resize before the crop.")
        return F.center_crop(image, crop)


class ToFloat(fm.Transform):
    """A uint8 image tensor -> float32 in [0, 1], as ``v2.ToDtype(torch.float32, scale=True)``."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return F.to_dtype(_check_tensor("ToFloat", image, floating=False), torch.float32, scale=True)


class Normalize(fm.Transform):
    """``(x - mean) / std`` per channel of a float tensor ``(..., C, H, W)``, with ``F.normalize``.

    Args:
        mean: One number per channel, computed on the training split.
        std: One positive number per channel.
    """

    def __init__(self, mean: list[float], std: list[float]) -> None:
        if not mean or len(mean) != len(std):
            raise ConfigError(f"Normalize: mean and std need one value per channel each, got {mean!r} and {std!r}.")
        if any(s <= 0 for s in std):
            raise ConfigError(f"Normalize: std must be positive, got {std!r}.")

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = _check_tensor("Normalize", image, floating=True)
        if image.shape[-3] != len(self.mean):
            raise ConfigError(f"Normalize has statistics for {len(self.mean)} channel(s) but the image has "
                              f"{image.shape[-3]}; check DecodeImage(mode=...).")
        return F.normalize(image, mean=list(self.mean), std=list(self.std))
