"""A minimal PNG encoder (8-bit RGB, no filtering) with zlib and struct only.

Console snapshots need nothing more, so no imaging library is pulled in.
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

__all__ = ["PNG_SIGNATURE", "encode_png", "write_png"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# IHDR: 8 bits per sample, colour type 2 (RGB), deflate, filter method 0, no interlace.
_IHDR = struct.Struct(">IIBBBBB")


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(kind))
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def encode_png(rgb: npt.NDArray[np.uint8], level: int = 6) -> bytes:
    """A PNG of `rgb`, a (height, width, 3) uint8 array (any strides)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be (h, w, 3) uint8, not {rgb.shape} {rgb.dtype}")
    height, width = rgb.shape[:2]
    if width < 1 or height < 1:
        raise ValueError("a PNG has at least one pixel")
    # Each scanline is its filter type byte (0: None) then the samples.
    rows = np.zeros((height, 1 + 3 * width), np.uint8)
    rows[:, 1:] = rgb.reshape(height, 3 * width)
    return b"".join(
        (
            PNG_SIGNATURE,
            _chunk(b"IHDR", _IHDR.pack(width, height, 8, 2, 0, 0, 0)),
            _chunk(b"IDAT", zlib.compress(rows.tobytes(), level)),
            _chunk(b"IEND", b""),
        )
    )


def write_png(
    target: str | os.PathLike[str] | BinaryIO, rgb: npt.NDArray[np.uint8], level: int = 6
) -> None:
    """Write `rgb` as a PNG to a path or a binary file object."""
    data = encode_png(rgb, level)
    if isinstance(target, (str, os.PathLike)):
        with open(target, "wb") as f:
            f.write(data)
    else:
        target.write(data)
