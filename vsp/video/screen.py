"""The parent's console for the synthetic video device: the `Screen` it draws on.

The video VSP owns one `Screen` per device and feeds it; the console backends
read it. Nothing here knows the VMBus.

Interface:

- ``Screen(width, height)``: the current frame, a numpy uint8 array of shape
  (height, width, 4) in the guest's framebuffer format, XRGB8888 little-endian
  (byte 0 blue, 1 green, 2 red, 3 unused). New and resized frames are black.
- ``Screen.resize(width, height)``: a mode change. Listeners are told the whole
  new frame is dirty; VNC clients get a DesktopSize update if they support it,
  otherwise what of the new frame fits the framebuffer they have.
- ``Screen.update(pixels, rects=None)``: ``pixels`` is the guest's VRAM as a
  (h, w, 4) uint8 view (strided views, e.g. a pitch wider than the mode, are
  fine); ``rects`` are the dirty rectangles ``(x1, y1, x2, y2)``, ends
  exclusive, ``None`` for all of it. The Screen *copies* those regions into its
  own frame under its lock, so a guest rewriting VRAM meanwhile cannot tear a
  frame being encoded, then notifies its listeners. Rectangles are clipped to
  the frame and to the view; a flood of them is merged into their bounding box.
- ``Screen.snapshot_png(path_or_file)``: the frame as an 8-bit RGB PNG.
- ``Screen.add_listener(fn)`` / ``remove_listener(fn)``: ``fn(rects)`` is called
  (outside the lock, from the updating thread) after each change.
- ``Screen.capture(rects, generation)``: consistent copies of regions, for
  encoders; a stale ``generation`` (a resize happened) yields the whole frame.

Backends: ``vsp.video.vnc.VncServer(screen, host="127.0.0.1", port=5900,
password=None, on_key=..., on_pointer=...)`` serves the Screen over RFB 3.8
(behind VNC authentication: a password made for the run if none is given) and
calls ``on_key(keysym: int, down: bool)`` and ``on_pointer(x: int, y: int,
buttons: int)`` (from its own thread) for the VSP to forward to the guest's
keyboard and mouse. ``vsp.video.png.encode_png`` / ``write_png`` encode RGB frames.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

from vsp.video.png import write_png

__all__ = [
    "MAX_DIMENSION",
    "MAX_UPDATE_RECTS",
    "Capture",
    "Rect",
    "Screen",
    "bounding_box",
    "clip",
    "intersect",
    "subtract",
]

Rect = tuple[int, int, int, int]
Frame = npt.NDArray[np.uint8]
Listener = Callable[[list[Rect]], None]

# 8192x8192x4 is a 256 MiB frame: bigger than any synthvid mode (7680x4320).
MAX_DIMENSION = 8192
# More dirty rectangles than this in one update are merged into their bounding box:
# a guest cannot make the parent do unbounded per-rectangle work.
MAX_UPDATE_RECTS = 64


def clip(rect: Rect, width: int, height: int) -> Rect | None:
    """`rect` clipped to a width x height frame, or None when nothing is left."""
    x1, y1, x2, y2 = max(rect[0], 0), max(rect[1], 0), min(rect[2], width), min(rect[3], height)
    return (x1, y1, x2, y2) if x1 < x2 and y1 < y2 else None


def intersect(a: Rect, b: Rect) -> Rect | None:
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    return (x1, y1, x2, y2) if x1 < x2 and y1 < y2 else None


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


def _check_size(width: int, height: int) -> None:
    if not (1 <= width <= MAX_DIMENSION and 1 <= height <= MAX_DIMENSION):
        raise ValueError(f"screen size {width}x{height} outside 1..{MAX_DIMENSION}")


@dataclass(frozen=True)
class Capture:
    """Copies of `rects` of the frame of `generation` (width x height)."""

    generation: int
    width: int
    height: int
    rects: list[Rect]
    pixels: list[Frame]


class Screen:
    """The frame a console shows; thread-safe (the VSP writes, backends read)."""

    def __init__(self, width: int, height: int) -> None:
        _check_size(width, height)
        self._lock = threading.Lock()
        self._frame: Frame = np.zeros((height, width, 4), np.uint8)
        self._generation = 0  # bumped by each resize
        self._listeners: list[Listener] = []

    @property
    def width(self) -> int:
        return int(self._frame.shape[1])

    @property
    def height(self) -> int:
        return int(self._frame.shape[0])

    def geometry(self) -> tuple[int, int, int]:
        """(generation, width, height), read together."""
        with self._lock:
            return self._generation, self._frame.shape[1], self._frame.shape[0]

    def add_listener(self, fn: Listener) -> None:
        with self._lock:
            self._listeners.append(fn)

    def remove_listener(self, fn: Listener) -> None:
        with self._lock:
            if fn in self._listeners:
                self._listeners.remove(fn)

    def _notify(self, rects: list[Rect]) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for fn in listeners:
            fn(rects)

    def resize(self, width: int, height: int) -> None:
        """A mode change: a new black frame of the new size."""
        _check_size(width, height)
        with self._lock:
            self._frame = np.zeros((height, width, 4), np.uint8)
            self._generation += 1
        self._notify([(0, 0, width, height)])

    def update(self, pixels: npt.NDArray[np.uint8], rects: Iterable[Rect] | None = None) -> None:
        """Copy the dirty `rects` of `pixels` (the VRAM view) into the frame."""
        if pixels.ndim != 3 or pixels.shape[2] != 4 or pixels.dtype != np.uint8:
            raise ValueError(f"pixels must be (h, w, 4) uint8, not {pixels.shape} {pixels.dtype}")
        with self._lock:
            frame = self._frame
            w = min(frame.shape[1], pixels.shape[1])
            h = min(frame.shape[0], pixels.shape[0])
            wanted = [(0, 0, w, h)] if rects is None else list(rects)
            dirty = [c for r in wanted if (c := clip(r, w, h)) is not None]
            if len(dirty) > MAX_UPDATE_RECTS:
                dirty = [bounding_box(dirty)]
            for x1, y1, x2, y2 in dirty:
                frame[y1:y2, x1:x2] = pixels[y1:y2, x1:x2]
        if dirty:
            self._notify(dirty)

    def capture(self, rects: Sequence[Rect], generation: int) -> Capture:
        """Copies of `rects` (clipped); the whole frame if `generation` is stale."""
        with self._lock:
            frame = self._frame
            h, w = frame.shape[:2]
            if generation != self._generation:
                rects = [(0, 0, w, h)]
            kept = [c for r in rects if (c := clip(r, w, h)) is not None]
            pixels = [frame[y1:y2, x1:x2].copy() for x1, y1, x2, y2 in kept]
            return Capture(self._generation, w, h, kept, pixels)

    def frame_copy(self) -> Frame:
        with self._lock:
            return self._frame.copy()

    def snapshot_png(self, target: str | os.PathLike[str] | BinaryIO) -> None:
        """Write the frame to `target` (a path or a binary file) as an RGB PNG."""
        frame = self.frame_copy()
        write_png(target, frame[:, :, 2::-1])  # BGRX -> RGB
