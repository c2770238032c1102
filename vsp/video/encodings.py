"""RFB rectangle encodings for `vsp.video.vnc`, written into reused buffers.

Each client has an `Encoder`: its pixel format, the encoding it gets (the
first one it announces that the server has: Tight 7, ZRLE 16, Hextile 5,
Zlib 6, Raw 0), its pseudo-encodings (DesktopSize, ExtendedDesktopSize,
Cursor, CopyRect, JPEG quality and compression levels), its zlib streams,
and two buffers it keeps across updates: `out` (the FramebufferUpdate being
sent) and `work` (uncompressed data before zlib). Updates are written into
them with numpy's `out=` forms, so a steady stream of updates allocates
nothing the size of a frame (the zlib module's compressed output aside).

Fast paths cover the formats real viewers use: 32 bpp true colour with 8-bit
channels on byte boundaries (the frame's own BGRX, noVNC's RGBX, ...): a pixel
is then a byte shuffle of the frame's. Other formats go through
`rfb.pixel_values` (per rectangle temporaries; correct, slower).

Tight (7): `vsp.video.tight` (fills, JPEG, zlib; large rectangles in
bands encoded at once on the server's helper threads).
Hextile (5): 16x16 tiles, each solid (background) or raw.
"""

from __future__ import annotations

import os
import struct
import types
import zlib
from concurrent.futures import Executor
from typing import Any

import numpy as np
import numpy.typing as npt

from vsp.video import rfb
from vsp.video.rfb import PixelFormat

try:
    import simplejpeg  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - Tight then never uses JPEG
    simplejpeg = None
_fast: types.ModuleType | None = None
try:  # the compiled pixel shuffle; VMBUS_VIDEO_FAST=0 keeps numpy's
    if os.environ.get("VMBUS_VIDEO_FAST", "1") != "0":
        from vsp.video import _fast
except ImportError:  # pragma: no cover - not built
    pass
deflate: types.ModuleType = zlib
try:  # zlib-ng: the same deflate streams, about 4x faster at level 1
    from zlib_ng import zlib_ng

    deflate = zlib_ng
except ImportError:  # pragma: no cover - the standard library's zlib
    pass

__all__ = [
    "ENC_COPYRECT",
    "ENC_CURSOR",
    "ENC_EXTENDED_DESKTOP_SIZE",
    "ENC_HEXTILE",
    "ENC_TIGHT",
    "JPEG_AVAILABLE",
    "Encoder",
    "OutBuffer",
]

ENC_COPYRECT, ENC_HEXTILE, ENC_TIGHT = 1, 5, 7
ENC_CURSOR, ENC_EXTENDED_DESKTOP_SIZE = -239, -308
ENC_QUALITY_0, ENC_QUALITY_9 = -32, -23
ENC_COMPRESS_0, ENC_COMPRESS_9 = -256, -247
JPEG_AVAILABLE = simplejpeg is not None
# The encodings a client may get, the rest being pseudo-encodings.
PIXEL_ENCODINGS = (ENC_TIGHT, rfb.ENC_ZRLE, ENC_HEXTILE, rfb.ENC_ZLIB, rfb.ENC_RAW)
# TurboVNC's quality levels as JPEG qualities.
JPEG_QUALITY = (15, 29, 41, 42, 62, 77, 79, 86, 92, 100)
ZRLE_TILE, HEXTILE_TILE = 64, 16
DEFAULT_ZLIB_LEVEL = 1  # a console favours frames per second over bytes

Pixels = npt.NDArray[np.uint8]
_RECT_HEADER = struct.Struct(">HHHHi")


def rect_header(x: int, y: int, w: int, h: int, encoding: int) -> bytes:
    return _RECT_HEADER.pack(x, y, w, h, encoding)


class OutBuffer:
    """Bytes appended into a reused numpy buffer. `view()` stays valid
    after growth (a larger buffer replaces the old one, which lives on
    while viewed)."""

    def __init__(self, capacity: int = 1 << 16) -> None:
        self.array: npt.NDArray[np.uint8] = np.empty(capacity, np.uint8)
        self.size = 0

    def reset(self) -> None:
        self.size = 0

    def reserve(self, n: int) -> npt.NDArray[np.uint8]:
        """The next `n` bytes, to be written in place; they count as written."""
        end = self.size + n
        if end > len(self.array):
            bigger = np.empty(max(end, 2 * len(self.array)), np.uint8)
            bigger[: self.size] = self.array[: self.size]
            self.array = bigger
        chunk = self.array[self.size : end]
        self.size = end
        return chunk

    def write(self, data: Any) -> None:
        n = len(data) if not isinstance(data, np.ndarray) else data.nbytes
        self.reserve(n)[:] = (
            np.frombuffer(data, np.uint8)
            if not isinstance(data, np.ndarray)
            else data.reshape(-1).view(np.uint8)
        )

    def view(self) -> memoryview:
        return memoryview(self.array[: self.size])  # type: ignore[arg-type]


def byte_order(fmt: PixelFormat) -> tuple[int, ...] | None:
    """For a 32 bpp format with 8-bit channels on byte boundaries: for each
    output byte, the frame byte (0 blue, 1 green, 2 red) it takes, or 3 for
    padding (sent 0xFF). None for any other format."""
    if fmt.bpp != 32 or not fmt.true_colour:
        return None
    if (fmt.red_max, fmt.green_max, fmt.blue_max) != (255, 255, 255):
        return None
    shifts = (fmt.blue_shift, fmt.green_shift, fmt.red_shift)
    if any(s % 8 for s in shifts) or len(set(shifts)) != 3:
        return None
    order = [3, 3, 3, 3]
    for source, shift in enumerate(shifts):
        position = shift // 8
        order[3 - position if fmt.big_endian else position] = source
    return tuple(order)


def is_tpixel24(fmt: PixelFormat) -> bool:
    """Tight's TPIXEL is R, G, B bytes for these formats."""
    return (
        fmt.bpp == 32
        and fmt.depth == 24
        and fmt.true_colour
        and (fmt.red_max, fmt.green_max, fmt.blue_max) == (255, 255, 255)
    )


def compact_length(n: int) -> bytes:
    """Tight's 1-3 byte length."""
    if n < 0x80:
        return bytes([n])
    if n < 0x4000:
        return bytes([n & 0x7F | 0x80, n >> 7])
    return bytes([n & 0x7F | 0x80, (n >> 7) & 0x7F | 0x80, n >> 14])


def pack_numpy(pix: Pixels, target: npt.NDArray[np.uint8], order: tuple[int, ...]) -> None:
    """The definition of `_fast.pack_pixels`: each pixel of `pix` (h, w, 4)
    as len(order) bytes, byte k = pix byte order[k] (3: 0xFF), into `target`."""
    h, w = pix.shape[:2]
    n = len(order)
    shaped = target[: h * w * n].reshape(h, w, n)
    if order == (0, 1, 2, 3):  # the frame's own layout: one pass
        np.bitwise_or(pix.view(np.uint32), np.uint32(0xFF000000), out=shaped.view(np.uint32))
        return
    for k, source in enumerate(order):
        if source == 3:
            shaped[:, :, k] = 0xFF
        else:
            shaped[:, :, k] = pix[:, :, source]


def pack(pix: Pixels, target: npt.NDArray[np.uint8], order: tuple[int, ...]) -> None:
    if _fast is not None and pix.size and order != (0, 1, 2, 3):  # numpy's OR is SIMD
        _fast.pack_pixels(pix, target, bytes(order))
    else:
        pack_numpy(pix, target, order)


class Encoder:
    """One client's encoding state (touched by the server thread only)."""

    def __init__(self) -> None:
        self.fmt = rfb.DEFAULT_FORMAT
        self.order: tuple[int, ...] | None = byte_order(self.fmt)
        self.corder = tuple(k for k in self.order or () if k != 3)
        self.encoding = rfb.ENC_RAW
        self.desktop_size = self.extended_desktop_size = False
        self.cursor = self.copyrect = False
        self.quality: int | None = None  # a JPEG quality, when the client asked for one
        self.level = DEFAULT_ZLIB_LEVEL
        self.out = OutBuffer()
        self.work = OutBuffer()
        self.scratch: Pixels = np.empty((0, 0, 4), np.uint8)  # what the client was sent
        self.synced = False  # scratch holds all the client has (CopyRect may copy from it)
        self._streams: dict[int, Any] = {}
        self.pool: Executor | None = None  # helper threads (the server's): Tight's bands at once
        self._tight_works: list[OutBuffer] = []

    def set_format(self, fmt: PixelFormat) -> None:
        self.fmt = fmt
        self.order = byte_order(fmt)
        self.corder = tuple(k for k in self.order or () if k != 3)  # ZRLE's CPIXEL bytes

    def set_encodings(self, encodings: tuple[int, ...]) -> None:
        announced = set(encodings)
        self.desktop_size = rfb.ENC_DESKTOP_SIZE in announced
        self.extended_desktop_size = ENC_EXTENDED_DESKTOP_SIZE in announced
        self.cursor = ENC_CURSOR in announced
        self.copyrect = ENC_COPYRECT in announced
        preferred = [e for e in encodings if e in PIXEL_ENCODINGS]
        self.encoding = preferred[0] if preferred else rfb.ENC_RAW
        qualities = [e for e in encodings if ENC_QUALITY_0 <= e <= ENC_QUALITY_9]
        self.quality = JPEG_QUALITY[qualities[0] - ENC_QUALITY_0] if qualities else None
        levels = [e for e in encodings if ENC_COMPRESS_0 <= e <= ENC_COMPRESS_9]
        level = levels[0] - ENC_COMPRESS_0 if levels else DEFAULT_ZLIB_LEVEL
        # Levels 0-3 deflate at 1: level 0 stores (more bytes, no faster on a
        # LAN), and zlib-ng's 2 and 3 cost twice its 1 for a tenth fewer bytes
        # (noVNC asks for 2).
        self.level = level if level > 3 else 1
        # The streams go on across SetEncodings (the client's inflaters do).

    def stream(self, key: int) -> Any:
        if key not in self._streams:
            self._streams[key] = deflate.compressobj(self.level)
        return self._streams[key]

    def tight_stream(self, stream: int) -> Any:
        """Tight's zlib stream 0-3 (stream 0 was the only one before bands)."""
        return self.stream(ENC_TIGHT + 100 * stream)

    def tight_work(self, stream: int) -> OutBuffer:
        """The TPIXELs buffer of the band on `stream` (the first is `work`)."""
        while len(self._tight_works) <= stream:
            self._tight_works.append(self.work if not self._tight_works else OutBuffer())
        return self._tight_works[stream]

    # Pixels in the client's format.

    def pixel_bytes(self, pix: Pixels, out: OutBuffer) -> None:
        """`pix` (h, w, 4) BGRX as the client's pixels, appended to `out`."""
        h, w = pix.shape[:2]
        order = self.order
        if order is None:
            out.write(rfb.encode_pixels(self.fmt, pix))
            return
        pack(pix, out.reserve(h * w * 4), order)

    def cpixel_bytes(self, pix: Pixels, out: OutBuffer) -> None:
        """ZRLE's CPIXELs: the 3 colour bytes of a fast-path format, in order."""
        order = self.order
        assert order is not None
        h, w = pix.shape[:2]
        pack(pix, out.reserve(h * w * 3), self.corder)

    def cpixel_fits(self) -> bool:
        """ZRLE may drop the padding byte: it is at an end of the pixel."""
        order = self.order
        return order is not None and self.fmt.depth <= 24 and order.index(3) in (0, 3)

    # Rectangles.

    def rect(self, x: int, y: int, pix: Pixels) -> int:
        """Append `pix` at (x, y) in the client's encoding; the rectangle count."""
        h, w = pix.shape[:2]
        out, enc = self.out, self.encoding
        if enc == ENC_TIGHT:
            return tight.encode(self, x, y, pix)
        out.write(_RECT_HEADER.pack(x, y, w, h, enc))
        if enc == rfb.ENC_RAW:
            self.pixel_bytes(pix, out)
        elif enc == rfb.ENC_ZLIB:
            self.work.reset()
            self.pixel_bytes(pix, self.work)
            self._deflate(rfb.ENC_ZLIB, self.work.view(), length=4)
        elif enc == rfb.ENC_ZRLE:
            self.work.reset()
            self._zrle(pix, self.work)
            self._deflate(rfb.ENC_ZRLE, self.work.view(), length=4)
        else:
            self._hextile(pix)
        return 1

    def _deflate(self, key: int, data: memoryview, *, length: int) -> int:
        stream = self.stream(key)
        compressed = stream.compress(data) + stream.flush(deflate.Z_SYNC_FLUSH)
        n = len(compressed)
        self.out.write(struct.pack(">I", n) if length == 4 else compact_length(n))
        self.out.write(compressed)
        return n

    def _zrle(self, pix: Pixels, out: OutBuffer) -> None:
        if not self.cpixel_fits():
            out.write(rfb.zrle_tiles(self.fmt, rfb.pixel_values(self.fmt, pix)))
            return
        h, w = pix.shape[:2]
        values = pix.view(np.uint32)[:, :, 0]
        for ty in range(0, h, ZRLE_TILE):
            band = pix[ty : ty + ZRLE_TILE]
            th = band.shape[0]
            full = w // ZRLE_TILE
            if full and not _any_few_colours(values[ty : ty + th, : full * ZRLE_TILE], th):
                # A row of raw tiles at once: a zero byte, then the tile's CPIXELs.
                tiles = out.reserve(full * (1 + th * ZRLE_TILE * 3)).reshape(full, -1)
                tiles[:, 0] = 0
                body = tiles[:, 1:].reshape(full, th, ZRLE_TILE, 3)
                self._cpixels_into(band[:, : full * ZRLE_TILE], body)
                start = full * ZRLE_TILE
            else:
                start = 0
            for tx in range(start, w, ZRLE_TILE):
                self._zrle_tile(band[:, tx : tx + ZRLE_TILE], out)

    def _cpixels_into(self, pix: Pixels, body: npt.NDArray[np.uint8]) -> None:
        """`pix` (th, n * 64, 4) into `body` (n, th, 64, 3), tile by tile."""
        for t in range(body.shape[0]):
            pack(pix[:, t * ZRLE_TILE : (t + 1) * ZRLE_TILE], body[t].reshape(-1), self.corder)

    def _zrle_tile(self, tile: Pixels, out: OutBuffer) -> None:
        colours = tile.view(np.uint32)[:, :, 0] & np.uint32(0xFFFFFF)
        palette, first, inverse = np.unique(colours, return_index=True, return_inverse=True)
        n = len(palette)
        if n == 1:
            out.write(b"\x01")
            self.cpixel_bytes(tile[:1, :1], out)
        elif n <= 16:
            bits = 1 if n == 2 else 2 if n <= 4 else 4
            out.write(bytes([n]))
            self.cpixel_bytes(tile.reshape(-1, 1, 4)[first], out)
            out.write(rfb._pack_indices(inverse.reshape(colours.shape).astype(np.uint8), bits))
        else:
            out.write(b"\x00")
            self.cpixel_bytes(tile, out)

    def _hextile(self, pix: Pixels) -> None:
        h, w = pix.shape[:2]
        out, T = self.out, HEXTILE_TILE
        converted = self.work
        converted.reset()
        self.pixel_bytes(pix, converted)
        bypp = self.fmt.bpp // 8
        data = converted.array[: h * w * bypp].reshape(h, w, bypp)
        colours = pix.view(np.uint32)[:, :, 0] & np.uint32(0xFFFFFF)
        background = None
        full = w // T
        for ty in range(0, h, T):
            th = min(T, h - ty)
            start = 0
            if full:
                tiles = colours[ty : ty + th, : full * T].reshape(th, full, T)
                if not (tiles == tiles[:1, :, :1]).all(axis=(0, 2)).any():
                    # No solid tile among the row's full ones: all raw, at once.
                    block = out.reserve(full * (1 + th * T * bypp)).reshape(full, -1)
                    block[:, 0] = 1
                    block[:, 1:].reshape(full, th, T, bypp)[:] = (
                        data[ty : ty + th, : full * T]
                        .reshape(th, full, T, bypp)
                        .transpose(1, 0, 2, 3)
                    )
                    start, background = full * T, None
            for tx in range(start, w, T):
                tile = colours[ty : ty + T, tx : tx + T]
                first = tile[0, 0]
                if (tile == first).all():
                    if background != first:
                        out.write(b"\x02")
                        out.write(data[ty, tx])
                        background = first
                    else:
                        out.write(b"\x00")
                else:
                    out.write(b"\x01")
                    out.write(np.ascontiguousarray(data[ty : ty + T, tx : tx + T]))
                    background = None  # be explicit after a raw tile

    # Pseudo-rectangles.

    def cursor_rect(self, hot_x: int, hot_y: int, shape: Pixels) -> None:
        """The Cursor pseudo-encoding: pixels, then a bitmask of alpha >= 128."""
        h, w = shape.shape[:2]
        self.out.write(_RECT_HEADER.pack(hot_x, hot_y, w, h, ENC_CURSOR))
        if not w or not h:
            return
        self.pixel_bytes(shape, self.out)
        self.out.write(np.packbits(shape[:, :, 3] >= 128, axis=1))

    def copy_rect(self, x: int, y: int, w: int, h: int, src_x: int, src_y: int) -> None:
        self.out.write(_RECT_HEADER.pack(x, y, w, h, ENC_COPYRECT))
        self.out.write(struct.pack(">HH", src_x, src_y))


def solid(pix: Pixels) -> bool:
    """One colour (the unused byte aside); cheap for most rectangles that are not."""
    colours = pix.view(np.uint32)[:, :, 0]
    first = colours[0, 0] & np.uint32(0xFFFFFF)
    if ((colours[0] & np.uint32(0xFFFFFF)) != first).any():
        return False
    return bool(((colours & np.uint32(0xFFFFFF)) == first).all())


def _any_few_colours(values: npt.NDArray[np.uint32], th: int) -> bool:
    """Could a tile of this row of full tiles have 16 colours or fewer? A
    tile whose first row already has more than 16 cannot."""
    first_rows = (values[0].reshape(-1, ZRLE_TILE) & np.uint32(0xFFFFFF)).copy()
    first_rows.sort(axis=1)
    distinct = 1 + (first_rows[:, 1:] != first_rows[:, :-1]).sum(axis=1)
    return bool((distinct <= 16).any())


# CopyRect: content the client already has, moved up or down (a scroll).

# Random per process: a guest cannot draw rows that collide on purpose.
_HASH_KEY = np.random.default_rng().integers(1, 2**63, 4096, dtype=np.uint64) | np.uint64(1)
MIN_SCROLL_ROWS = 32  # a shorter moved band is not worth a CopyRect


def row_hashes(pix: Pixels) -> npt.NDArray[np.uint64]:
    """One 64-bit hash per row of `pix` (h, w, 4), the unused byte ignored."""
    h, w = pix.shape[:2]
    colours = (pix.view(np.uint32)[:, :, 0] & np.uint32(0xFFFFFF)).astype(np.uint64)
    key = np.resize(_HASH_KEY, w)
    with np.errstate(over="ignore"):
        hashes: npt.NDArray[np.uint64] = (colours * key).sum(axis=1, dtype=np.uint64)
    return hashes


def find_scroll(
    old: npt.NDArray[np.uint64], new: npt.NDArray[np.uint64]
) -> tuple[int, int, int] | None:
    """The longest run of rows [a, b) of the new content that equals the old
    content's rows [a + dy, b + dy), dy != 0: (a, b, dy), or None if no run
    has MIN_SCROLL_ROWS rows. Candidates: where a few new rows sit in the old."""
    h = len(new)
    if h < MIN_SCROLL_ROWS or len(old) != h:
        return None
    where: dict[int, int] = {}
    for i, value in enumerate(old.tolist()):
        where.setdefault(value, i)
    best: tuple[int, int, int] | None = None
    for probe in (h // 4, h // 2, 3 * h // 4):
        at = where.get(int(new[probe]))
        if at is None or at == probe:
            continue
        dy = at - probe
        lo, hi = max(0, -dy), min(h, h - dy)  # rows whose source is inside
        same = new[lo:hi] == old[lo + dy : hi + dy]
        if not same[probe - lo]:
            continue
        a = probe - lo
        while a > 0 and same[a - 1]:
            a -= 1
        b = probe - lo
        while b < len(same) and same[b]:
            b += 1
        run = (lo + a, lo + b, dy)
        if b - a >= MIN_SCROLL_ROWS and (best is None or b - a > best[1] - best[0]):
            best = run
    return best


from vsp.video import tight  # noqa: E402 - it builds on this module's pieces
