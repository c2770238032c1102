"""Tight (7) rectangles for `vsp.video.encodings.Encoder`.

A solid rectangle is a fill; with a JPEG quality level announced, a
rectangle in a 24-bit colour format is JPEG (libjpeg-turbo through
simplejpeg); otherwise basic compression, copy filter, pixels as 3-byte
TPIXELs deflated. Rectangles are split into bands of at most
TIGHT_MAX_WIDTH x (TIGHT_MAX_PIXELS / width) so every compact length fits.

With a helper pool (`Encoder.pool`, the VNC server's when PARALLEL > 1), a large rectangle
is cut into PARALLEL bands of rows encoded at once, the first by the
calling thread, the others by the helpers (the pixel shuffle, deflate and
libjpeg-turbo release the GIL): band k of each group is deflated on zlib
stream k of Tight's four, so each stream still carries its data in order.
Without a pool every band is stream 0's, one after another.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from vsp.video.encodings import (
    ENC_TIGHT,
    Pixels,
    compact_length,
    deflate,
    is_tpixel24,
    pack,
    rect_header,
    solid,
)

try:
    import simplejpeg  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - Tight then never uses JPEG
    simplejpeg = None

if TYPE_CHECKING:
    from vsp.video.encodings import Encoder, OutBuffer

__all__ = ["PARALLEL", "PARALLEL_MIN_PIXELS", "TIGHT_MAX_PIXELS", "TIGHT_MAX_WIDTH", "encode"]

TIGHT_MAX_WIDTH = 2048
TIGHT_MAX_PIXELS = 1 << 20  # 3 MiB of TPIXELs at most: compressed, under 4 MiB
# Bands encoded at once (the VNC server makes PARALLEL - 1 helpers). 1: off,
# since on this project's two shared cores, the child animating, the helper
# waited for a core and Tight-zlib went from 20 to 12 updates/s; a host with
# idle cores may set it higher.
PARALLEL = 1
PARALLEL_MIN_PIXELS = 1 << 17  # a smaller rectangle is not worth the hand-over

Band = tuple[int, int, Pixels]  # x, y, pixels


def encode(enc: Encoder, x: int, y: int, pix: Pixels) -> int:
    """Append `pix` at (x, y) as Tight rectangles to `enc.out`; their count."""
    h, w = pix.shape[:2]
    band_w = min(w, TIGHT_MAX_WIDTH)
    band_h = max(1, min(h, TIGHT_MAX_PIXELS // band_w))
    bands = [
        (x + bx, y + by, pix[by : by + band_h, bx : bx + band_w])
        for by in range(0, h, band_h)
        for bx in range(0, w, band_w)
    ]
    group = PARALLEL if enc.pool is not None else 1
    if group > 1 and len(bands) == 1 and h * w >= PARALLEL_MIN_PIXELS and h >= PARALLEL:
        step = -(-h // PARALLEL)
        bands = [(x, y + by, pix[by : by + step]) for by in range(0, h, step)]
    for start in range(0, len(bands), group):
        _encode_group(enc, bands[start : start + group])
    return len(bands)


def _encode_group(enc: Encoder, bands: Sequence[Band]) -> None:
    """Bands on streams 0, 1, ...: the helpers take all but the first."""
    for stream in range(len(bands)):
        enc.tight_stream(stream)  # made here, not raced for in a helper
    pending = []
    if len(bands) > 1:
        assert enc.pool is not None
        pending = [enc.pool.submit(_body, enc, b[2], k) for k, b in enumerate(bands) if k]
    bodies = [_body(enc, bands[0][2], 0)] + [future.result() for future in pending]
    out = enc.out
    for (bx, by, pixels), body in zip(bands, bodies, strict=True):
        out.write(rect_header(bx, by, pixels.shape[1], pixels.shape[0], ENC_TIGHT))
        for part in body:
            out.write(part)


def _body(enc: Encoder, pix: Pixels, stream: int) -> list[bytes]:
    """One Tight rectangle's data after its header (any thread: it touches
    only stream `stream` and its work buffer)."""
    tpixel24 = is_tpixel24(enc.fmt)
    work = enc.tight_work(stream)
    work.reset()
    if solid(pix):
        _tpixels(enc, pix[:1, :1], work, tpixel24)
        return [b"\x80", bytes(work.view())]  # fill
    if enc.quality is not None and tpixel24 and simplejpeg is not None:
        jpeg: bytes = simplejpeg.encode_jpeg(
            pix, enc.quality, colorspace="BGRX", colorsubsampling="420", fastdct=True
        )
        return [b"\x90", compact_length(len(jpeg)), jpeg]
    control = bytes([stream << 4])  # basic, this stream, copy filter
    _tpixels(enc, pix, work, tpixel24)
    if work.size < 12:  # sent as is
        return [control, bytes(work.view())]
    z = enc.tight_stream(stream)
    compressed: bytes = z.compress(work.view()) + z.flush(deflate.Z_SYNC_FLUSH)
    return [control, compact_length(len(compressed)), compressed]


def _tpixels(enc: Encoder, pix: Pixels, out: OutBuffer, tpixel24: bool) -> None:
    if not tpixel24:
        enc.pixel_bytes(pix, out)
        return
    h, w = pix.shape[:2]
    pack(pix, out.reserve(h * w * 3), (2, 1, 0))
