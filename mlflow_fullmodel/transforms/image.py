"""Image pre-processing: decode, resize, crop, test-time-augmentation crops, tensor, normalise.

The steps of a typical vision model, each with one job::

    DecodeImage(mode="RGB")                 bytes (or base64 text) -> PIL image, size-checked
    Resize(256)                             PIL image -> PIL image, shorter side 256
    CenterCrop(224)                         PIL image or tensor -> the centre 224 x 224
    ToTensor()                              PIL image -> float tensor (C, H, W) in [0, 1]
    RandomCrops(224, tta=Param(8), seed=Param(0))
                                            tensor (C, H, W) -> tensor (tta, C, 224, 224)
    NormalizeImage(mean=[...], std=[...])   tensor (..., C, H, W) -> (x - mean) / std per channel

Pillow is imported inside the methods that need it, so ``import mlflow_fullmodel`` does not need
it; the transforms that use it declare ``requirements = ("pillow",)`` and a saved model lists it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mlflow_fullmodel._checks import is_int, is_number
from mlflow_fullmodel._hashing import hash_tensor
from mlflow_fullmodel.exceptions import ConfigError, InputError, ParamError
from mlflow_fullmodel.transform import Param, Transform, param_default
from mlflow_fullmodel.transforms._optional import require

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = ["CenterCrop", "DecodeImage", "NormalizeImage", "RandomCrops", "Resize", "ToTensor"]

#: Image modes the steps produce and accept: 8 bits per channel, as ``ToTensor`` expects.
IMAGE_MODES = ("L", "LA", "RGB", "RGBA")

#: Default ``DecodeImage.max_pixels``: 16.7 megapixels (4096 x 4096), 50 MB decoded as RGB.
DEFAULT_MAX_PIXELS = 4096 * 4096

_INTERPOLATIONS = ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")
_DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)
#: Magic numbers of common image files, to tell a truncated image from data that is no image.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


class DecodeImage(Transform):
    """Decode an image file's bytes (PNG, JPEG, ...) into a PIL image in ``mode``.

    The image size is read from the file header and checked against ``max_pixels`` before any
    pixel is decoded, so a small file that claims a huge image (a decompression bomb) is refused
    cheaply. A ``str`` is taken as base64 of the file (a ``data:image/...;base64,`` prefix and
    line breaks are allowed). MLflow decodes base64 for ``binary`` columns of ``dataframe_records``
    and ``dataframe_split`` requests, but hands ``inputs`` and ``instances`` requests over as the
    base64 text itself; so bytes that are not an image file but base64 of one are decoded too.

    Args:
        mode: The PIL mode of the result: ``"L"`` (grayscale), ``"LA"``, ``"RGB"`` or ``"RGBA"``.
            Every image is converted, so a grayscale model also accepts colour files.
        max_pixels: The largest width x height accepted; larger images are an ``InputError``.

    Raises:
        InputError: At call time, for data that is not an image Pillow reads, a truncated or
            corrupt file, invalid base64, or an image over ``max_pixels``.

    Example::

        >>> import io
        >>> from PIL import Image
        >>> file = io.BytesIO()
        >>> Image.new("RGB", (64, 48), "white").save(file, format="PNG")
        >>> png_bytes = file.getvalue()
        >>> DecodeImage(mode="L")(png_bytes)
        <PIL.Image.Image image mode=L size=64x48...>
    """

    requirements = ("pillow",)

    mode: str
    max_pixels: int

    def __init__(self, mode: str = "RGB", max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        if mode not in IMAGE_MODES:
            raise ConfigError(f"DecodeImage: mode must be one of {list(IMAGE_MODES)}, got {mode!r}.")
        if not is_int(max_pixels) or max_pixels < 1:
            raise ConfigError(f"DecodeImage: max_pixels must be a positive int, got {max_pixels!r}.")
        require("DecodeImage", "PIL", "pillow", "images")

    def __call__(self, data: bytes | str) -> PILImage.Image:
        from PIL import Image, UnidentifiedImageError

        raw = _image_bytes(data)
        image: PILImage.Image  # a file's image, replaced by its 8-bit copy for 16-bit files
        try:
            image = Image.open(io.BytesIO(raw))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            # Pillow's own limit (Image.MAX_IMAGE_PIXELS) fired first, at the header.
            raise InputError(f"the image is too large: {error} The limit here is max_pixels={self.max_pixels}.") \
                from None
        except UnidentifiedImageError:
            # Pillow's message, "cannot identify image file <_io.BytesIO object at 0x...>", adds nothing.
            raise InputError(_not_an_image(raw, "")) from None
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise InputError(_not_an_image(raw, f" ({type(error).__name__}: {error})")) from None
        with image:
            width, height = image.size
            if width * height > self.max_pixels:
                raise InputError(
                    f"the image is {width}x{height} pixels ({width * height} pixels), over the limit "
                    f"of max_pixels={self.max_pixels}; send a smaller image."
                )
            try:
                image.load()
                if image.mode.startswith("I;16"):
                    # 16-bit grayscale (PNG, TIFF): Pillow's convert() would clip every value above
                    # 255 to white; keep the high byte instead, as 8-bit viewers show it.
                    image = Image.fromarray((np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8))  # mode L
                return image.convert(self.mode)
            except (OSError, SyntaxError, ValueError, EOFError) as error:
                # Pillow reports a file cut short as OSError "image file is truncated" or
                # SyntaxError "broken PNG file"; both mean the bytes end or break mid-image.
                raise InputError(
                    f"the {image.format} image ({width}x{height}) is truncated or corrupt: the pixel "
                    f"data could not be decoded ({type(error).__name__}: {error})."
                ) from None


def _image_bytes(data: Any) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
        if _signature(raw) is None:
            # MLflow decodes base64 for binary columns only in the dataframe_* request formats; with
            # "inputs" or "instances" the model receives the base64 text itself, as bytes.
            decoded = _strict_base64(raw)
            if decoded is not None and _signature(decoded) is not None:
                return decoded
        return raw
    if isinstance(data, str):
        text = _DATA_URL.sub("", data.strip(), count=1)
        decoded = _strict_base64(text.encode("ascii", errors="replace"))
        if decoded is None:
            raise InputError(
                f"the string ({len(data)} characters) is not valid base64; send the image file's bytes, "
                "or their base64 encoding."
            )
        return decoded
    raise InputError(f"expected the bytes of an image file, got {type(data).__name__}.")


def _strict_base64(text: bytes) -> bytes | None:
    """``text`` decoded as base64 (line breaks allowed), or None where it is not base64."""
    try:
        return base64.b64decode(b"".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        return None


def _not_an_image(raw: bytes, detail: str) -> str:
    if not raw:
        return "the data is empty, not an image."
    kind = _signature(raw)
    if kind is not None:
        return (
            f"the data ({len(raw)} bytes) starts like a {kind} file but Pillow cannot read its "
            f"header: the file is truncated or corrupt{detail}."
        )
    return (
        f"the data ({len(raw)} bytes{_looks_like(raw)}) is not an image file Pillow can read "
        "(PNG, JPEG, GIF, BMP, TIFF, WebP, ...)."
    )


def _looks_like(raw: bytes) -> str:
    """What non-image data seems to be, said without quoting it (it is the request's data)."""
    head = raw[:64]
    if head.lstrip().startswith((b"<svg", b"<?xml", b"<!DOCTYPE", b"<html")):
        return ", markup such as SVG or HTML"
    try:
        if head.decode("utf-8").isprintable():
            return ", text"
    except UnicodeDecodeError:  # cut inside a character, or binary
        pass
    return ""


def _signature(raw: bytes) -> str | None:
    """The image format whose magic number ``raw`` starts with, if any."""
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "WebP"
    return next((kind for magic, kind in _SIGNATURES if raw.startswith(magic)), None)


class Resize(Transform):
    """Resize a PIL image.

    Args:
        size: An int resizes the shorter side to ``size`` and keeps the aspect ratio (the longer
            side is ``int(size * long / short)``, as in torchvision); ``[height, width]`` resizes
            to exactly that.
        interpolation: ``"nearest"``, ``"box"``, ``"bilinear"``, ``"hamming"``, ``"bicubic"`` or
            ``"lanczos"``. Pillow filters over the whole source area when shrinking (antialiasing).
        max_pixels: The largest result (width x height) made; a larger one is an ``InputError``,
            raised before it exists. With an int ``size`` an extreme aspect ratio (a 262144 x 1
            image) would otherwise become gigabytes.

    Example::

        >>> from PIL import Image
        >>> image = Image.new("RGB", (64, 48))      # width x height
        >>> Resize(32)(image).size
        (42, 32)
        >>> Resize([28, 28])(image).size
        (28, 28)
    """

    requirements = ("pillow",)

    size: int | list[int]
    interpolation: str
    max_pixels: int

    def __init__(
        self, size: int | list[int], interpolation: str = "bilinear", max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> None:
        _check_size("Resize", size)
        if not is_int(max_pixels) or max_pixels < 1:
            raise ConfigError(f"Resize: max_pixels must be a positive int, got {max_pixels!r}.")
        if interpolation not in _INTERPOLATIONS:
            raise ConfigError(
                f"Resize: interpolation must be one of {list(_INTERPOLATIONS)}, got {interpolation!r}."
            )
        require("Resize", "PIL", "pillow", "images")

    def __call__(self, image: PILImage.Image) -> PILImage.Image:
        from PIL import Image

        _check_pil("Resize", image)
        width, height = image.size
        if isinstance(self.size, int):
            short, long = sorted((width, height))
            new_short, new_long = self.size, int(self.size * long / short)
            new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
        else:
            new_height, new_width = self.size
        if (new_width, new_height) == (width, height):
            return image
        if new_width * new_height > self.max_pixels:
            raise InputError(
                f"resizing the {width}x{height} image to size={self.size!r} would make it {new_width}x{new_height} "
                f"({new_width * new_height} pixels), over the limit of max_pixels={self.max_pixels}; send an "
                "image of a less extreme aspect ratio."
            )
        resample = getattr(Image.Resampling, self.interpolation.upper())
        return image.resize((new_width, new_height), resample=resample)


class CenterCrop(Transform):
    """Cut the centre ``size`` out of a PIL image or an image tensor ``(..., H, W)``.

    Both give the same pixels: the offsets are ``round((H - h) / 2)`` and ``round((W - w) / 2)``.

    Args:
        size: An int for a square crop, or ``[height, width]``.

    Raises:
        InputError: At call time, for an image smaller than ``size``: resize it first.

    Example::

        >>> from PIL import Image
        >>> CenterCrop(28)(Image.new("RGB", (32, 32))).size
        (28, 28)
        >>> CenterCrop([2, 3])(torch.arange(16).reshape(1, 4, 4))
        tensor([[[ 4,  5,  6],
                 [ 8,  9, 10]]])
    """

    size: int | list[int]

    def __init__(self, size: int | list[int]) -> None:
        _check_size("CenterCrop", size)

    def __call__(self, image: PILImage.Image | torch.Tensor) -> PILImage.Image | torch.Tensor:
        crop_height, crop_width = _pair(self.size)
        height, width = _image_size("CenterCrop", image)
        _check_fits(height, width, crop_height, crop_width)
        top = int(round((height - crop_height) / 2.0))
        left = int(round((width - crop_width) / 2.0))
        if isinstance(image, torch.Tensor):
            return image[..., top : top + crop_height, left : left + crop_width]
        return image.crop((left, top, left + crop_width, top + crop_height))


class RandomCrops(Transform):
    """Test-time augmentation: ``tta`` random crops of one image tensor, stacked.

    The crops are a pure function of the seed and of the image's content: crop ``i`` is placed by
    the SHA-256 of ``(seed, digest of the tensor, i)``. So the same image with the same seed gets
    the same crops whatever else is in the request or the batch, in any process, with any torch or
    numpy version; a different seed gets other crops; and the first ``n`` crops are the same for
    every ``tta >= n``. Pair it with ``AverageOverSamples`` to average the predictions of the crops.

    Args:
        size: An int for square crops, or ``[height, width]``.
        tta: How many crops per image; usually a ``Param`` so a request can trade time for accuracy.
        seed: Chooses the crops; usually a ``Param``.

    Raises:
        InputError: At call time, for a tensor that is not ``(C, H, W)`` or is smaller than ``size``.
        ParamError: At call time, for ``tta < 1``.

    Example::

        >>> crops = RandomCrops(28, tta=Param(8, minimum=1, maximum=64), seed=Param(0))
        >>> image = torch.rand(1, 32, 32)
        >>> crops(image, tta=4, seed=7).shape
        torch.Size([4, 1, 28, 28])
        >>> torch.equal(crops(image, tta=4, seed=7), crops(image, tta=4, seed=7))
        True
    """

    size: int | list[int]
    tta: int | Param
    seed: int | Param

    def __init__(self, size: int | list[int], tta: int | Param = 8, seed: int | Param = 0) -> None:
        _check_size("RandomCrops", size)
        tta_default = param_default(tta)
        if not is_int(tta_default) or tta_default < 1:
            raise ConfigError(f"RandomCrops: tta must be an int >= 1 (or a Param of one), got {tta!r}.")
        seed_default = param_default(seed)
        if not is_int(seed_default):
            raise ConfigError(f"RandomCrops: seed must be an int (or a Param of one), got {seed!r}.")

    def samples(self, **params: Any) -> int:
        return int(self.resolved_config(params)["tta"])

    def __call__(self, image: torch.Tensor, **params: Any) -> torch.Tensor:
        config = self.resolved_config(params)
        tta, seed = config["tta"], config["seed"]
        if tta < 1:
            raise ParamError(f"Parameter 'tta' must be at least 1, got {tta}.")
        if not isinstance(image, torch.Tensor) or image.dim() != 3:
            got = f"a tensor of shape {tuple(image.shape)}" if isinstance(image, torch.Tensor) else type(image).__name__
            raise InputError(f"expected an image tensor (C, H, W), got {got}; put ToTensor() before RandomCrops.")
        crop_height, crop_width = _pair(self.size)
        height, width = image.shape[-2:]
        _check_fits(height, width, crop_height, crop_width)
        crops = []
        for top, left in _crop_offsets(image, seed, tta, height - crop_height + 1, width - crop_width + 1):
            crops.append(image[:, top : top + crop_height, left : left + crop_width])
        return torch.stack(crops)


def _crop_offsets(image: torch.Tensor, seed: int, count: int, rows: int, columns: int) -> list[tuple[int, int]]:
    """``count`` (top, left) offsets, each below (``rows``, ``columns``), drawn from the SHA-256 of
    the seed, the tensor's dtype, shape and bytes, and the crop's index."""
    content = hashlib.sha256()
    hash_tensor(content, image)
    key = f"{seed}:".encode() + content.digest()
    offsets = []
    for index in range(count):
        draw = hashlib.sha256(key + index.to_bytes(4, "big")).digest()
        # 64-bit draws: the modulo bias over a few hundred positions is below 1e-16.
        offsets.append((int.from_bytes(draw[:8], "big") % rows, int.from_bytes(draw[8:16], "big") % columns))
    return offsets


class ToTensor(Transform):
    """Turn a PIL image into a float32 tensor ``(C, H, W)`` with values in [0, 1] (pixel / 255).

    Raises:
        InputError: At call time, for anything but a PIL image in mode L, LA, RGB or RGBA; decode
            with ``DecodeImage(mode=...)`` first, which converts every file to one mode.

    Example::

        >>> import io
        >>> from PIL import Image
        >>> file = io.BytesIO()
        >>> Image.new("RGB", (64, 48), "white").save(file, format="PNG")
        >>> png_bytes = file.getvalue()
        >>> pixels = ToTensor()(DecodeImage(mode="RGB")(png_bytes))
        >>> pixels.shape, pixels.max().item()
        (torch.Size([3, 48, 64]), 1.0)
    """

    requirements = ("pillow",)

    def __init__(self) -> None:
        require("ToTensor", "PIL", "pillow", "images")

    def __call__(self, image: PILImage.Image) -> torch.Tensor:
        _check_pil("ToTensor", image)
        if image.mode not in IMAGE_MODES:
            raise InputError(
                f"ToTensor takes 8-bit images in mode {list(IMAGE_MODES)}, got mode {image.mode!r}; "
                "convert it with DecodeImage(mode=...)."
            )
        pixels = np.asarray(image, dtype=np.uint8)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        return torch.from_numpy(pixels.transpose(2, 0, 1).copy()).float().div_(255.0)


class NormalizeImage(Transform):
    """Standardise each channel of a float image tensor ``(..., C, H, W)``: ``(x - mean) / std``.

    The statistics belong to the model: compute them on its training split and pass them here, so
    they are saved with it.

    Args:
        mean: One number per channel.
        std: One positive number per channel.

    Raises:
        ConfigError: At call time, for a tensor whose channel count is not ``len(mean)``.

    Example::

        >>> normalize = NormalizeImage(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
        >>> normalize(torch.full((3, 2, 2), 0.75))[0]
        tensor([[1., 1.],
                [1., 1.]])
    """

    mean: list[float]
    std: list[float]

    def __init__(self, mean: list[float], std: list[float]) -> None:
        for name, values in (("mean", mean), ("std", std)):
            if (
                not isinstance(values, (list, tuple))
                or not values
                or not all(is_number(v) and math.isfinite(v) for v in values)
            ):
                raise ConfigError(
                    f"NormalizeImage: {name} must be a non-empty list of finite numbers (one per "
                    f"channel), got {values!r}."
                )
        if len(mean) != len(std):
            raise ConfigError(
                f"NormalizeImage: mean and std must have one value per channel each, got "
                f"{len(mean)} and {len(std)}."
            )
        if any(s <= 0 for s in std):
            raise ConfigError(f"NormalizeImage: std must be positive, got {std!r}.")

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if not isinstance(image, torch.Tensor) or image.dim() < 3 or not image.is_floating_point():
            got = (f"a {image.dtype} tensor of shape {tuple(image.shape)}" if isinstance(image, torch.Tensor)
                   else type(image).__name__)
            raise InputError(f"expected a float image tensor (..., C, H, W), got {got}; put ToTensor() before it.")
        channels = image.shape[-3]
        if channels != len(self.mean):
            # The model's steps disagree (e.g. DecodeImage mode vs. these statistics): not the
            # caller's fault, so not an InputError.
            raise ConfigError(
                f"NormalizeImage has statistics for {len(self.mean)} channel(s) but the image has "
                f"{channels}; check DecodeImage(mode=...)."
            )
        mean = torch.tensor(self.mean, dtype=image.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=image.dtype).view(-1, 1, 1)
        return (image - mean) / std


# -- helpers -------------------------------------------------------------------------------------


def _check_size(owner: str, size: Any) -> None:
    if is_int(size) and size >= 1:
        return
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(is_int(s) and s >= 1 for s in size):
        return
    raise ConfigError(f"{owner}: size must be a positive int or [height, width] of them, got {size!r}.")


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (size[0], size[1])


def _check_pil(owner: str, image: Any) -> None:
    # A PIL image exists only once PIL.Image is imported: without it (or without Pillow) no value is one.
    image_module = sys.modules.get("PIL.Image")
    if image_module is None or not isinstance(image, image_module.Image):
        raise InputError(f"{owner} takes a PIL image, got {type(image).__name__}; decode it with DecodeImage() first.")


def _image_size(owner: str, image: Any) -> tuple[int, int]:
    """(height, width) of a PIL image or of a tensor (..., H, W)."""
    if isinstance(image, torch.Tensor):
        if image.dim() < 2:
            raise InputError(f"{owner} takes an image tensor (..., H, W), got shape {tuple(image.shape)}.")
        return int(image.shape[-2]), int(image.shape[-1])
    _check_pil(owner, image)
    width, height = image.size
    return height, width


def _check_fits(height: int, width: int, crop_height: int, crop_width: int) -> None:
    if crop_height > height or crop_width > width:
        raise InputError(
            f"the image is {height}x{width} (height x width), smaller than the crop "
            f"{crop_height}x{crop_width}; put a Resize before the crop."
        )
