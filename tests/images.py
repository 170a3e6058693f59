"""Images made in the tests: PNGs of any size, one that lies about its size in its header, and
base64 as JSON carries them."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from typing import Any

from PIL import Image


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encoded(image: Image.Image, format: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def png(width: int = 40, height: int = 40, mode: str = "L", color: Any = 200) -> bytes:
    return encoded(Image.new(mode, (width, height), color), "PNG")


def claimed_size_png(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header (with a valid CRC) claims ``width`` x ``height`` pixels."""
    data = bytearray(png(1, 1)[:33])  # signature + IHDR chunk
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    idat = zlib.compress(b"\x00\x00")
    chunk = struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    return bytes(data) + chunk + b"\x00\x00\x00\x00IEND\xaeB`\x82"
