"""Rectangle arithmetic and the frame types a `vsp.video.screen.Screen` hands out.

Rectangles are ``(x1, y1, x2, y2)``, ends exclusive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "OPAQUE",
    "Capture",
    "Cursor",
    "Frame",
    "Rect",
    "bounding_box",
    "clip",
    "copy_opaque",
    "covers",
    "intersect",
    "subtract",
]

Rect = tuple[int, int, int, int]
Frame = npt.NDArray[np.uint8]

OPAQUE = np.uint32(0xFF000000)  # the unused byte of a little-endian XRGB pixel, set


def copy_opaque(target: npt.NDArray[np.uint8], pixels: npt.NDArray[np.uint8]) -> None:
    """`target` = `pixels` with the unused byte 0xFF, in one pass when the
    source's pixels are contiguous (VRAM rows are)."""
    try:
        source = pixels.view(np.uint32)
    except ValueError:  # a view whose channel bytes are apart
        np.copyto(target, pixels)
        source = target.view(np.uint32)
    np.bitwise_or(source, OPAQUE, out=target.view(np.uint32))


def clip(rect: Rect, width: int, height: int) -> Rect | None:
    """`rect` clipped to a width x height frame, or None when nothing is left."""
    x1, y1, x2, y2 = max(rect[0], 0), max(rect[1], 0), min(rect[2], width), min(rect[3], height)
    return (x1, y1, x2, y2) if x1 < x2 and y1 < y2 else None


def intersect(a: Rect, b: Rect) -> Rect | None:
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    return (x1, y1, x2, y2) if x1 < x2 and y1 < y2 else None


def covers(a: Rect, b: Rect) -> bool:
    """`a` holds all of `b`."""
    return a[0] <= b[0] and a[1] <= b[1] and a[2] >= b[2] and a[3] >= b[3]


def subtract(a: Rect, b: Rect) -> list[Rect]:
    """`a` minus `b`, as up to four rectangles."""
    i = intersect(a, b)
    if i is None:
        return [a]
    (x1, y1, x2, y2), (ix1, iy1, ix2, iy2) = a, i
    parts = [(x1, y1, x2, iy1), (x1, iy2, x2, y2), (x1, iy1, ix1, iy2), (ix2, iy1, x2, iy2)]
    return [p for p in parts if p[0] < p[2] and p[1] < p[3]]


def bounding_box(rects: Sequence[Rect]) -> Rect:
    return (
        min(r[0] for r in rects),
        min(r[1] for r in rects),
        max(r[2] for r in rects),
        max(r[3] for r in rects),
    )


@dataclass(frozen=True)
class Capture:
    """Copies of `rects` of the frame of `generation` (width x height)."""

    generation: int
    width: int
    height: int
    rects: list[Rect]
    pixels: list[Frame]
    frame: Frame | None = None  # with `into`: the frame-sized array the rects were copied into
    consistent: bool = True  # False: the writer changed the frame meanwhile (a torn read)


@dataclass(frozen=True)
class Cursor:
    """The guest's pointer shape: BGRA (h, w, 4), hot spot; `serial` counts shapes."""

    serial: int
    hot_x: int
    hot_y: int
    pixels: Frame
