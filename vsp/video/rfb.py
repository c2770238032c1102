"""RFB wire pieces for `vsp.video.vnc`: pixel formats, Raw/Zlib/ZRLE pixel data, VNC auth.

Frames come in as the Screen's BGRX (XRGB8888 little-endian) uint8 arrays and
leave as bytes in the client's pixel format. VNC Authentication needs single
DES, implemented here (one 16-byte challenge per connection: speed is moot)
rather than adding a cryptography dependency for it.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

__all__ = [
    "BGR233",
    "DEFAULT_FORMAT",
    "ENC_DESKTOP_SIZE",
    "ENC_RAW",
    "ENC_ZLIB",
    "ENC_ZRLE",
    "PixelFormat",
    "colour_map",
    "des_encrypt",
    "encode_pixels",
    "encode_rect",
    "pixel_values",
    "vnc_auth_response",
    "zrle_tiles",
]

ENC_RAW, ENC_ZLIB, ENC_ZRLE, ENC_DESKTOP_SIZE = 0, 6, 16, -223
_PIXEL_FORMAT = struct.Struct(">BBBBHHHBBB3x")
_ZRLE_TILE = 64

Pixels = npt.NDArray[np.uint8]
Values = npt.NDArray[np.uint32]


@dataclass(frozen=True)
class PixelFormat:
    bpp: int = 32
    depth: int = 24
    big_endian: bool = False
    true_colour: bool = True
    red_max: int = 255
    green_max: int = 255
    blue_max: int = 255
    red_shift: int = 16
    green_shift: int = 8
    blue_shift: int = 0

    def pack(self) -> bytes:
        return _PIXEL_FORMAT.pack(
            self.bpp, self.depth, self.big_endian, self.true_colour, self.red_max,
            self.green_max, self.blue_max, self.red_shift, self.green_shift, self.blue_shift,
        )  # fmt: skip

    @classmethod
    def unpack(cls, data: bytes) -> PixelFormat:
        bpp, depth, be, tc, *rest = _PIXEL_FORMAT.unpack(data)
        return cls(bpp, depth, bool(be), bool(tc), *rest)

    @property
    def padding(self) -> int:
        """The bits of a 32 bpp pixel no channel uses, sent set: clients that
        read them as alpha (noVNC 1.3 does) would otherwise show a blank screen."""
        if self.bpp != 32 or not self.true_colour:
            return 0
        used = (
            (self.red_max << self.red_shift)
            | (self.green_max << self.green_shift)
            | (self.blue_max << self.blue_shift)
        )
        return 0xFFFFFFFF & ~used

    def valid(self) -> bool:
        if self.bpp not in (8, 16, 32):
            return False
        if not self.true_colour:
            return self.bpp == 8
        channels = zip(
            (self.red_max, self.green_max, self.blue_max),
            (self.red_shift, self.green_shift, self.blue_shift),
            strict=True,
        )
        return all(
            m > 0 and m & (m + 1) == 0 and s + m.bit_length() <= self.bpp for m, s in channels
        )


DEFAULT_FORMAT = PixelFormat()  # the frame's own XRGB8888 little-endian layout
# A colour-mapped client gets entry i = blue(2 bits) green(3) red(3), as true colour would.
BGR233 = PixelFormat(8, 8, False, True, 7, 7, 3, 0, 3, 6)


def pixel_values(fmt: PixelFormat, pix: Pixels) -> Values:
    """The (h, w) pixel values of BGRX `pix` in the client's true-colour format."""
    value = np.zeros(pix.shape[:2], np.uint32)
    for channel, cmax, shift in (
        (2, fmt.red_max, fmt.red_shift),
        (1, fmt.green_max, fmt.green_shift),
        (0, fmt.blue_max, fmt.blue_shift),
    ):
        c = pix[:, :, channel].astype(np.uint32)
        if cmax != 255:
            c = (c * cmax + 127) // 255
        value |= c << shift
    if fmt.padding:
        value |= np.uint32(fmt.padding)
    return value


def value_bytes(fmt: PixelFormat, values: Values) -> bytes:
    code = {8: "u1", 16: "u2", 32: "u4"}[fmt.bpp]
    return values.astype(np.dtype((">" if fmt.big_endian else "<") + code)).tobytes()


def encode_pixels(fmt: PixelFormat, pix: Pixels) -> bytes:
    if fmt == DEFAULT_FORMAT:  # the frame's own layout, the guest's unused byte set
        return (np.ascontiguousarray(pix).view("<u4") | np.uint32(0xFF000000)).tobytes()
    return value_bytes(fmt, pixel_values(fmt, pix))


def cpixel_bytes(fmt: PixelFormat, values: Values) -> bytes:
    """ZRLE's compressed pixels: 3 bytes where a 32 bpp pixel's colour fits in 3
    (RFC 6143 7.7.6: the padding byte is left out), else the whole pixel."""
    raw = value_bytes(fmt, values)
    if fmt.bpp != 32 or not fmt.true_colour or fmt.depth > 24:
        return raw
    mask = (
        (fmt.red_max << fmt.red_shift)
        | (fmt.green_max << fmt.green_shift)
        | (fmt.blue_max << fmt.blue_shift)
    )
    if mask < 1 << 24:
        low = True
    elif mask & 0xFF == 0:
        low = False
    else:
        return raw
    # Least significant bytes come first in little-endian, last in big-endian.
    skip = 0 if low != fmt.big_endian else 1
    return np.frombuffer(raw, np.uint8).reshape(-1, 4)[:, skip : skip + 3].tobytes()


def _pack_indices(idx: npt.NDArray[np.uint8], bits: int) -> bytes:
    """Palette indices packed MSB first, `bits` each, every row starting on a byte."""
    per = 8 // bits
    h, w = idx.shape
    padded = np.zeros((h, -(-w // per) * per), np.uint8)
    padded[:, :w] = idx
    groups = padded.reshape(h, -1, per)
    packed = np.zeros(groups.shape[:2], np.uint8)
    for k in range(per):
        packed |= groups[:, :, k] << (8 - bits * (k + 1))
    return packed.tobytes()


def zrle_tiles(fmt: PixelFormat, values: Values) -> bytes:
    """The uncompressed ZRLE data of a rectangle: solid, packed-palette or raw tiles."""
    out = []
    h, w = values.shape
    for ty in range(0, h, _ZRLE_TILE):
        for tx in range(0, w, _ZRLE_TILE):
            tile = values[ty : ty + _ZRLE_TILE, tx : tx + _ZRLE_TILE]
            palette, inverse = np.unique(tile, return_inverse=True)
            n = len(palette)
            if n == 1:
                out += [b"\x01", cpixel_bytes(fmt, palette)]
            elif n <= 16:
                bits = 1 if n == 2 else 2 if n <= 4 else 4
                idx = inverse.reshape(tile.shape).astype(np.uint8)
                out += [bytes([n]), cpixel_bytes(fmt, palette), _pack_indices(idx, bits)]
            else:
                out += [b"\x00", cpixel_bytes(fmt, tile)]
    return b"".join(out)


class Compressor(Protocol):
    """A zlib compression stream (zlib.compressobj())."""

    def compress(self, data: bytes, /) -> bytes: ...
    def flush(self, mode: int = ..., /) -> bytes: ...


def encode_rect(
    encoding: int, fmt: PixelFormat, pix: Pixels, zlib_stream: Compressor, zrle_stream: Compressor
) -> bytes:
    """One rectangle's data in `encoding`. The zlib streams are the
    connection's (one per encoding); each rectangle ends on a sync flush."""
    if encoding == ENC_RAW:
        return encode_pixels(fmt, pix)
    if encoding == ENC_ZRLE:
        stream, data = zrle_stream, zrle_tiles(fmt, pixel_values(fmt, pix))
    else:
        stream, data = zlib_stream, encode_pixels(fmt, pix)
    out = stream.compress(data) + stream.flush(zlib.Z_SYNC_FLUSH)
    return struct.pack(">I", len(out)) + out


def colour_map() -> bytes:
    """SetColourMapEntries for BGR233: entry i has red i&7, green (i>>3)&7, blue i>>6."""
    i = np.arange(256, dtype=np.uint32)
    rgb = np.stack([(i & 7) * 65535 // 7, ((i >> 3) & 7) * 65535 // 7, (i >> 6) * 65535 // 3], 1)
    return struct.pack(">BxHH", 1, 0, 256) + rgb.astype(">u2").tobytes()


def _permute(value: int, table: bytes, width: int) -> int:
    """DES bit permutation: output bit i is input bit table[i] (1 = most significant)."""
    out = 0
    for pos in table:
        out = (out << 1) | ((value >> (width - pos)) & 1)
    return out


def des_encrypt(key: bytes, block: bytes) -> bytes:
    """Single DES (FIPS 46-3) of one 8-byte block; VNC auth needs nothing else."""
    cd = _permute(int.from_bytes(key, "big"), _PC1, 64)
    c, d = cd >> 28, cd & 0xFFFFFFF
    lr = _permute(int.from_bytes(block, "big"), _IP, 64)
    left, right = lr >> 32, lr & 0xFFFFFFFF
    for shift in _SHIFTS:
        c = ((c << shift) | (c >> (28 - shift))) & 0xFFFFFFF
        d = ((d << shift) | (d >> (28 - shift))) & 0xFFFFFFF
        x = _permute(right, _E, 32) ^ _permute((c << 28) | d, _PC2, 56)
        s = 0
        for i in range(8):
            six = (x >> (42 - 6 * i)) & 0x3F
            s = (s << 4) | _SBOX[i][(six & 0x20) | ((six & 1) << 4) | ((six >> 1) & 0xF)]
        left, right = right, left ^ _permute(s, _P, 32)
    return _permute((right << 32) | left, _FP, 64).to_bytes(8, "big")


def vnc_auth_response(password: str, challenge: bytes) -> bytes:
    """The 16-byte answer to `challenge`: VNC's key is the password with each byte's
    bits reversed (first 8 bytes, NUL padded)."""
    pw = password.encode("latin-1", "replace")[:8].ljust(8, b"\0")
    key = bytes(int(f"{b:08b}"[::-1], 2) for b in pw)
    return des_encrypt(key, challenge[:8]) + des_encrypt(key, challenge[8:16])


# fmt: off
_PC1 = bytes((57, 49, 41, 33, 25, 17, 9, 1, 58, 50, 42, 34, 26, 18, 10, 2, 59, 51, 43, 35, 27,
              19, 11, 3, 60, 52, 44, 36, 63, 55, 47, 39, 31, 23, 15, 7, 62, 54, 46, 38, 30, 22,
              14, 6, 61, 53, 45, 37, 29, 21, 13, 5, 28, 20, 12, 4))
_PC2 = bytes((14, 17, 11, 24, 1, 5, 3, 28, 15, 6, 21, 10, 23, 19, 12, 4, 26, 8, 16, 7, 27, 20,
              13, 2, 41, 52, 31, 37, 47, 55, 30, 40, 51, 45, 33, 48, 44, 49, 39, 56, 34, 53,
              46, 42, 50, 36, 29, 32))
_SHIFTS = (1, 1, 2, 2, 2, 2, 2, 2, 1, 2, 2, 2, 2, 2, 2, 1)
_IP = bytes((58, 50, 42, 34, 26, 18, 10, 2, 60, 52, 44, 36, 28, 20, 12, 4, 62, 54, 46, 38, 30,
             22, 14, 6, 64, 56, 48, 40, 32, 24, 16, 8, 57, 49, 41, 33, 25, 17, 9, 1, 59, 51, 43,
             35, 27, 19, 11, 3, 61, 53, 45, 37, 29, 21, 13, 5, 63, 55, 47, 39, 31, 23, 15, 7))
_FP = bytes(_IP.index(i) + 1 for i in range(1, 65))  # the inverse of IP
_E = bytes((32, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9, 8, 9, 10, 11, 12, 13, 12, 13, 14, 15, 16, 17,
            16, 17, 18, 19, 20, 21, 20, 21, 22, 23, 24, 25, 24, 25, 26, 27, 28, 29, 28, 29, 30,
            31, 32, 1))
_P = bytes((16, 7, 20, 21, 29, 12, 28, 17, 1, 15, 23, 26, 5, 18, 31, 10, 2, 8, 24, 14, 32, 27,
            3, 9, 19, 13, 30, 6, 22, 11, 4, 25))
# Each 64 nibbles row-major: row = the outer two bits, column = the inner four.
_SBOX = [bytes(int(c, 16) for c in row) for row in (
    "e4d12fb83a6c59070f74e2d1a6cb953841e8d62bfc973a50fc8249175b3ea06d",
    "f18e6b34972dc05a3d47f28ec01a69b50e7ba4d158c6932fd8a13f42b67c05e9",
    "a09e63f51dc7b428d709346a285ecbf1d6498f30b12c5ae71ad069874fe3b52c",
    "7de3069a1285bc4fd8b56f03472c1ae9a690cb7df13e52843f06a1d8945bc72e",
    "2c417ab6853fd0e9eb2c47d150fa3986421bad78f9c5630eb8c71e2d6f09a453",
    "c1af92680d34e75baf427c9561de0b389ef528c3704a1db6432c95fabe17608d",
    "4b2ef08d3c975a61d0b7491ae35c2f8614bdc37eaf6805926bd814a7950fe23c",
    "d2846fb1a93e50c71fd8a374c56b0e927b419ce206adf35821e74a8dfc90356b",
)]
# fmt: on
