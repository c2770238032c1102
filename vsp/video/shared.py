"""The Screen's shared memory: one memfd both processes map, and its header.

A VM's worker process writes the frame (the VSP copies the guest's dirty
rectangles in); the parent reads it (the VNC server, PNG snapshots). The
memfd holds, page aligned:

- the header (one page of little-endian u64 words): a seqlock count (odd
  while the writer changes the header), the mode (generation, width,
  height), which of the frames is the newest (`front`), a ring of the last
  RING dirty rectangles with the count of rectangles ever published, the
  frame the parent reads (`pinned`), a seqlock count per frame (odd while
  the writer fills it), a `wanted` word the parent sets when a viewer
  waits for newer pixels (the writer copies at once instead of at its own
  pace), and the pointer shape's serial and geometry;
- the pointer shape (CURSOR_MAX x CURSOR_MAX BGRA);
- FRAMES frames of `capacity` bytes each, rows of width * 4 bytes (BGRX).

Three frames, as in triple buffering: the writer fills one that is neither
the newest nor the one the parent reads, then makes it the newest in one
short header change. So a reader sending a frame never holds the writer
off, and the writer, copying the guest's next frame meanwhile, never holds
a reader up: each frame is read or written, never both.

The parent trusts nothing it reads here: `Header.read` bounds every field
against the capacity and MAX_DIMENSION and clips every rectangle; a writer
that holds the seqlock odd too long gets a torn copy, never a hang. The
parent seals the memfd at its size before a worker gets it, so no worker
can shrink it under the parent's mapping (whose reads would then fault).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vmbus.memory import PAGE_SIZE, sealed_memfd

__all__ = [
    "CURSOR_MAX",
    "FRAMES",
    "MAGIC",
    "MAX_DIMENSION",
    "RING",
    "HeaderState",
    "SharedFrame",
    "check_size",
    "close_all",
    "read_records",
]

# 8192x8192x4 is a 256 MiB frame: bigger than any synthvid mode (7680x4320).
MAX_DIMENSION = 8192
CURSOR_MAX = 96  # synthvid's largest pointer shape
MAGIC = 0x32_4E_45_45_52_43_53_56  # "VSCREEN2", and the layout's version
RING = 64  # dirty rectangles the header remembers
SEQLOCK_PATIENCE = 0.05  # seconds a reader waits for a writer mid-change

FRAMES = 3  # the newest, the one the parent reads, and one to fill

# Header words.
_MAGIC, _SEQ, _GENERATION, _WIDTH, _HEIGHT, _SERIAL, _FRONT, _PINNED = range(8)
_CURSOR_SERIAL, _CURSOR_GEOMETRY, _CURSOR_POSITION = 8, 9, 10
_WANTED = 11  # the parent waits for newer pixels: the writer copies at its next chance
_DOORBELL = 12  # a consumer (the VNC server) also wants the doorbell eventfd rung
_FRAME_SEQ = 13  # FRAMES words: odd while the writer fills that frame
_RING_BASE = 16  # two words per rectangle: x1 | y1 << 32, x2 | y2 << 32
_HEADER_WORDS = _RING_BASE + 2 * RING

_CURSOR_OFFSET = PAGE_SIZE
_CURSOR_BYTES = CURSOR_MAX * CURSOR_MAX * 4
_FRAME_OFFSET = _CURSOR_OFFSET + -(-_CURSOR_BYTES // PAGE_SIZE) * PAGE_SIZE
assert _FRAME_SEQ + FRAMES <= _RING_BASE

Rect = tuple[int, int, int, int]


@dataclass(frozen=True)
class HeaderState:
    """One consistent, validated reading of the header."""

    generation: int
    width: int
    height: int
    serial: int  # rectangles published so far
    ring: tuple[Rect, ...]  # the last min(serial, RING), oldest first, clipped
    cursor_serial: int
    cursor: tuple[int, int, int, int]  # width, height, hot x, hot y (checked)
    consistent: bool  # False: the writer kept the seqlock busy; fields still bounded


class SharedFrame:
    """The mapping of one Screen's memfd (either side)."""

    def __init__(self, fd: int, capacity: int, *, create: bool) -> None:
        if not PAGE_SIZE <= capacity <= MAX_DIMENSION * MAX_DIMENSION * 4:
            raise ValueError(f"frame capacity {capacity}")
        self.fd = fd
        self.capacity = capacity
        self.stride = _stride(capacity)
        size = _file_size(capacity)
        if os.fstat(fd).st_size < size:  # a worker handed a short file must not fault
            raise ValueError("the screen's memfd is smaller than its capacity")
        self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.words: npt.NDArray[np.uint64] = np.frombuffer(self.map, np.uint64, PAGE_SIZE // 8, 0)
        self.cursor_bytes: npt.NDArray[np.uint8] = np.frombuffer(
            self.map, np.uint8, _CURSOR_BYTES, _CURSOR_OFFSET
        )
        self.frames: list[npt.NDArray[np.uint8]] = [
            np.frombuffer(self.map, np.uint8, capacity, _FRAME_OFFSET + k * self.stride)
            for k in range(FRAMES)
        ]
        if create:
            self.words[_MAGIC] = MAGIC

    @classmethod
    def create(cls, capacity: int) -> SharedFrame:
        if not PAGE_SIZE <= capacity <= MAX_DIMENSION * MAX_DIMENSION * 4:
            raise ValueError(f"frame capacity {capacity}")
        # The worker holds the fd too: sealed, it cannot shrink the file
        # under the parent's mapping.
        fd = sealed_memfd("vmbus-screen", _file_size(capacity))
        try:
            return cls(fd, capacity, create=True)
        except BaseException:
            os.close(fd)
            raise

    def frame(self, index: int, width: int, height: int) -> npt.NDArray[np.uint8]:
        """Frame `index` as a width x height mode, (h, w, 4); the caller
        checked the size."""
        return self.frames[index][: width * height * 4].reshape(height, width, 4)

    def cursor(self, width: int, height: int) -> npt.NDArray[np.uint8]:
        return self.cursor_bytes[: width * height * 4].reshape(height, width, 4)

    # The writer (the worker's Screen); it is the only one that moves the seqlock.

    def begin_write(self) -> None:
        self.words[_SEQ] += np.uint64(1)  # odd: changing

    def end_write(self) -> None:
        self.words[_SEQ] += np.uint64(1)

    def begin_fill(self, index: int) -> None:
        self.words[_FRAME_SEQ + index] += np.uint64(1)  # odd: being filled

    def end_fill(self, index: int) -> None:
        self.words[_FRAME_SEQ + index] += np.uint64(1)

    def set_front(self, index: int) -> None:
        """Frame `index` is the newest (inside begin/end_write)."""
        self.words[_FRONT] = index

    @property
    def pinned(self) -> int | None:
        """The frame the parent reads (any value it left there bounded)."""
        index = int(self.words[_PINNED]) - 1
        return index if 0 <= index < FRAMES else None

    @property
    def wanted(self) -> bool:
        return bool(self.words[_WANTED])

    def want(self, value: bool) -> None:
        self.words[_WANTED] = int(value)

    @property
    def doorbell(self) -> bool:
        return bool(self.words[_DOORBELL])

    def set_doorbell(self, value: bool) -> None:
        self.words[_DOORBELL] = int(value)

    def set_mode(self, generation: int, width: int, height: int) -> None:
        words = self.words
        words[_GENERATION], words[_WIDTH], words[_HEIGHT] = generation, width, height

    def publish(self, rects: list[Rect]) -> None:
        """Append `rects` to the dirty ring (inside begin/end_write)."""
        words = self.words
        serial = int(words[_SERIAL]) + max(0, len(rects) - RING)  # skipped: the reader sees a gap
        for x1, y1, x2, y2 in rects[-RING:]:
            at = _RING_BASE + 2 * (serial % RING)
            words[at] = x1 | y1 << 32
            words[at + 1] = x2 | y2 << 32
            serial += 1
        words[_SERIAL] = serial

    @property
    def cursor_serial(self) -> int:
        return int(self.words[_CURSOR_SERIAL])

    def set_cursor(self, width: int, height: int, hot_x: int, hot_y: int) -> None:
        words = self.words
        words[_CURSOR_GEOMETRY] = width | height << 16 | hot_x << 32 | hot_y << 48
        words[_CURSOR_SERIAL] += np.uint64(1)

    # The reader (the parent's Screen).

    @property
    def front(self) -> int:
        """The newest frame (a bad value the writer left reads as frame 0)."""
        index = int(self.words[_FRONT])
        return index if 0 <= index < FRAMES else 0

    def pin(self, index: int | None) -> None:
        """Tell the writer which frame the parent reads (None: none)."""
        self.words[_PINNED] = 0 if index is None else index + 1

    def frame_seq(self, index: int) -> int:
        return int(self.words[_FRAME_SEQ + index])

    def pin_front(self) -> tuple[int, int, int, int, bool]:
        """Pin the newest frame for a read: (its index, the mode's generation,
        width and height, consistent), the mode read with the index, so
        that of the frame (bounded: a bad size reads as 1x1; not consistent:
        the writer kept the header busy)."""
        words = self.words
        for _ in range(8):
            before = self.stable_seq()
            generation, width, height = (int(w) for w in words[_GENERATION : _HEIGHT + 1])
            index = self.front
            self.pin(index)
            if before is None or self.seq() == before:
                break
        consistent = before is not None and self.seq() == before
        if not (1 <= width <= MAX_DIMENSION and 1 <= height <= MAX_DIMENSION) or (
            width * height * 4 > self.capacity
        ):
            width = height = 1
        return index, generation, width, height, consistent

    def stable_seq(self) -> int | None:
        """The seqlock count once even (no change in progress); None if the
        writer stayed mid-change for SEQLOCK_PATIENCE."""
        words = self.words
        deadline = 0.0
        while True:
            seq = int(words[_SEQ])
            if not seq & 1:
                return seq
            now = time.monotonic()
            if not deadline:
                deadline = now + SEQLOCK_PATIENCE
            elif now > deadline:
                return None
            os.sched_yield()

    def seq(self) -> int:
        return int(self.words[_SEQ])

    def read_mode(self, wait: bool = True) -> tuple[int, int, int, bool]:
        """(generation, width, height, consistent), validated. Without `wait`,
        the words are read until two readings agree (a resize changes them;
        a frame copy, which keeps the seqlock odd far longer, does not)."""
        if not wait:
            words = self.words[_GENERATION : _HEIGHT + 1]
            for _ in range(8):
                first = words.tolist()
                if words.tolist() == first:
                    break
            generation, width, height = first
            if not (1 <= width <= MAX_DIMENSION and 1 <= height <= MAX_DIMENSION) or (
                width * height * 4 > self.capacity
            ):
                return generation, 1, 1, False
            return generation, width, height, True
        for _ in range(8):
            before = self.stable_seq()
            words = self.words[_GENERATION : _HEIGHT + 1].copy()
            if before is None or self.seq() == before:  # stuck mid-change: no more waiting
                break
        else:
            before = None
        generation, width, height = (int(w) for w in words)
        if not (1 <= width <= MAX_DIMENSION and 1 <= height <= MAX_DIMENSION) or (
            width * height * 4 > self.capacity
        ):
            return generation, 1, 1, False
        return generation, width, height, before is not None

    def read_damage(self, seen: int) -> tuple[int, int, int, int, int, list[Rect] | None, bool]:
        """(generation, width, height, serial, cursor serial, the rectangles
        published after serial `seen` (None: more than the ring holds), consistent):
        the watcher's per-wake-up reading, a few words rather than the header."""
        words = self.words
        rects: list[Rect] = []
        for _ in range(8):
            before = self.stable_seq()
            generation, width, height, serial = (int(w) for w in words[_GENERATION : _SERIAL + 1])
            cursor = int(words[_CURSOR_SERIAL])
            fresh = serial - seen
            if 0 < fresh <= RING:
                at = [_RING_BASE + 2 * (k % RING) for k in range(seen, serial)]
                pairs = words[np.array([(i, i + 1) for i in at]).reshape(-1)].tolist()
            if before is None or self.seq() == before:
                break
        consistent = before is not None and self.seq() == before
        if not (1 <= width <= MAX_DIMENSION and 1 <= height <= MAX_DIMENSION) or (
            width * height * 4 > self.capacity
        ):
            return generation, 1, 1, serial, cursor, None, False
        if fresh > RING or fresh < 0:
            return generation, width, height, serial, cursor, None, consistent
        if fresh > 0:
            for k in range(0, len(pairs), 2):
                a, b = pairs[k], pairs[k + 1]
                x1, y1 = min(a & 0xFFFFFFFF, width), min(a >> 32, height)
                x2, y2 = min(b & 0xFFFFFFFF, width), min(b >> 32, height)
                if x1 < x2 and y1 < y2:
                    rects.append((x1, y1, x2, y2))
        return generation, width, height, serial, cursor, rects, consistent

    def read_header(self) -> HeaderState:
        for _ in range(8):
            before = self.stable_seq()
            words = self.words[:_HEADER_WORDS].copy()
            if before is None:
                break
            if self.seq() == before:
                return self._validate(words, True)
        return self._validate(words, False)

    def _validate(self, words: npt.NDArray[np.uint64], consistent: bool) -> HeaderState:
        width, height = int(words[_WIDTH]), int(words[_HEIGHT])
        if not (1 <= width <= MAX_DIMENSION and 1 <= height <= MAX_DIMENSION) or (
            width * height * 4 > self.capacity
        ):
            width, height, consistent = 1, 1, False
        serial = int(words[_SERIAL])
        ring = []
        for k in range(max(0, serial - RING), serial):
            at = _RING_BASE + 2 * (k % RING)
            a, b = int(words[at]), int(words[at + 1])
            x1, y1 = min(a & 0xFFFFFFFF, width), min(a >> 32, height)
            x2, y2 = min(b & 0xFFFFFFFF, width), min(b >> 32, height)
            if x1 < x2 and y1 < y2:
                ring.append((x1, y1, x2, y2))
        g = int(words[_CURSOR_GEOMETRY])
        cw, ch, hx, hy = g & 0xFFFF, (g >> 16) & 0xFFFF, (g >> 32) & 0xFFFF, g >> 48
        if cw > CURSOR_MAX or ch > CURSOR_MAX or hx >= max(cw, 1) or hy >= max(ch, 1):
            cw = ch = hx = hy = 0
        return HeaderState(
            int(words[_GENERATION]),
            width,
            height,
            serial,
            tuple(ring),
            int(words[_CURSOR_SERIAL]),
            (cw, ch, hx, hy),
            consistent,
        )


def _stride(capacity: int) -> int:
    return -(-capacity // PAGE_SIZE) * PAGE_SIZE  # frames start on a page


def _file_size(capacity: int) -> int:
    return _FRAME_OFFSET + FRAMES * _stride(capacity)


def check_size(width: int, height: int, capacity: int) -> None:
    """A mode the frame can hold, or ValueError."""
    if not (1 <= width <= MAX_DIMENSION and 1 <= height <= MAX_DIMENSION):
        raise ValueError(f"screen size {width}x{height} outside 1..{MAX_DIMENSION}")
    if width * height * 4 > capacity:
        raise ValueError(f"screen size {width}x{height} over the capacity of {capacity} bytes")


def close_all(fds: list[int], sockets: Sequence[socket.socket] = ()) -> None:
    """Close a Screen's descriptors (its finalizer; errors ignored)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    for sock in sockets:
        sock.close()


def read_records(sock: socket.socket, size: int, limit: int = 64) -> tuple[list[bytes], int]:
    """Up to `limit` records of `size` bytes waiting on `sock` (a non-blocking
    SOCK_SEQPACKET; the rest wakes its watcher again), and how many records
    of another size were dropped."""
    records, dropped = [], 0
    for _ in range(limit):
        try:
            record = sock.recv(64)
        except (BlockingIOError, InterruptedError):
            break
        if not record:
            break
        if len(record) == size:
            records.append(record)
        else:
            dropped += 1
    return records, dropped
