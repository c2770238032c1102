"""A minimal RFB client written here for the VNC server's tests: handshake,
requests, Raw/Zlib/ZRLE/Hextile/Tight (fill, basic, JPEG) decoding, Cursor
and ExtendedDesktopSize; and what a client must see."""

from __future__ import annotations

import socket
import struct
import time
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from vsp.video.rfb import vnc_auth_response
from vsp.video.vnc import VncServer

RAW, COPYRECT, HEXTILE, ZLIB, TIGHT, ZRLE, DESKTOP_SIZE = 0, 1, 5, 6, 7, 16, -223
CURSOR, EXTENDED_DESKTOP_SIZE = -239, -308
QUALITY_6 = -26  # noVNC's default JPEG quality level
# (bpp, depth, big_endian, true_colour, red_max, green_max, blue_max, shifts r, g, b)
DEFAULT_PF = (32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
PF = struct.Struct(">BBBBHHHBBB3x")
W, H = 150, 100


def pattern(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Random pixels, plus ZRLE's cases: a solid tile, 2-, 3- and 7-colour tiles."""
    rng = np.random.default_rng(seed)
    pix = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    pix[:64, :64] = (10, 20, 30, 0)
    for tile, n in ((pix[:64, 64:128], 2), (pix[:64, 128:192], 3), (pix[64:, :64], 7)):
        palette = rng.integers(0, 256, (n, 4), dtype=np.uint8)
        tile[:] = palette[rng.integers(0, n, tile.shape[:2])]
    return pix


def opaque(pix: np.ndarray) -> np.ndarray:
    """`pix` (h, w, 4) as a Screen keeps it: the unused byte 0xFF."""
    out = pix.copy()
    out[..., 3] = 0xFF
    return out


BLACK = (0, 0, 0, 0xFF)  # a new Screen's pixels


def padding(pf: tuple[int, ...]) -> int:
    """The unused bits of a 32 bpp pixel, which must arrive set (opaque to noVNC)."""
    used = sum(m << s for m, s in zip(pf[4:7], pf[7:10], strict=True))
    return 0xFFFFFFFF & ~used if pf[0] == 32 else 0


def expected_values(pix: np.ndarray, pf: tuple[int, ...]) -> np.ndarray:
    """The pixel values a client with true-colour format `pf` must receive."""
    maxes, shifts = pf[4:7], pf[7:10]
    value = np.full(pix.shape[:2], padding(pf), np.uint32)
    for channel, cmax, shift in zip((2, 1, 0), maxes, shifts, strict=True):
        value |= ((pix[:, :, channel].astype(np.uint32) * cmax + 127) // 255) << shift
    return value


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class Rfb:
    """A minimal RFB client: handshake, requests, and Raw/Zlib/ZRLE decoding into
    `self.fb`, the (h, w) pixel values in the client's pixel format."""

    def __init__(self, address: tuple[str, int], rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(5)
        self.sock.connect(address)
        self.pf = DEFAULT_PF
        self.zlib, self.zrle = zlib.decompressobj(), zlib.decompressobj()
        self.tight = [zlib.decompressobj() for _ in range(4)]
        self.colour_map: bytes | None = None
        self.cursor: tuple[int, int, np.ndarray, np.ndarray] | None = None  # hot x, y, values, mask
        self.layouts: list[
            tuple[int, int, int, int]
        ] = []  # ExtendedDesktopSize: reason, status, w, h
        self.jpeg_rects = 0

    def recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("server closed")
            data += chunk
        return data

    def closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1 << 20) == b""
        except ConnectionResetError:
            return True

    def handshake(self, version: bytes = b"RFB 003.008\n", password: str | None = None) -> bytes:
        """Through ServerInit; returns its pixel format and name (checked into attributes)."""
        assert self.recv(12) == b"RFB 003.008\n"
        self.sock.sendall(version)
        if version == b"RFB 003.003\n":
            (sec,) = struct.unpack(">I", self.recv(4))
        else:
            n = self.recv(1)[0]
            types = list(self.recv(n))
            sec = types[0]
            self.sock.sendall(bytes([sec]))
        assert sec == (2 if password is not None else 1)
        if sec == 2:
            assert password is not None
            self.sock.sendall(vnc_auth_response(password, self.recv(16)))
        if sec == 2 or version not in (b"RFB 003.003\n", b"RFB 003.007\n"):
            assert self.recv(4) == b"\0\0\0\0", "SecurityResult OK"
        self.sock.sendall(b"\x01")  # ClientInit: shared
        self.width, self.height = struct.unpack(">HH", self.recv(4))
        self.server_pf = self.recv(16)
        (name_len,) = struct.unpack(">I", self.recv(4))
        self.name = self.recv(name_len)
        self.fb = np.zeros((self.height, self.width), np.uint32)
        return self.server_pf

    def set_encodings(self, *encodings: int) -> None:
        msg = struct.pack(">BxH", 2, len(encodings)) + struct.pack(
            f">{len(encodings)}i", *encodings
        )
        self.sock.sendall(msg)

    def set_pixel_format(self, pf: tuple[int, ...]) -> None:
        self.pf = pf
        self.sock.sendall(b"\0\0\0\0" + PF.pack(*pf))

    def request(self, incremental: bool, rect: tuple[int, int, int, int] | None = None) -> None:
        x, y, w, h = rect or (0, 0, self.width, self.height)
        self.sock.sendall(struct.pack(">BBHHHH", 3, incremental, x, y, w, h))

    def read_update(self) -> list[tuple[int, int, int, int, int]]:
        """Reads one FramebufferUpdate into `fb`; returns its (x, y, w, h, encoding)s."""
        while (kind := self.recv(1)[0]) != 0:
            assert kind == 1, f"unexpected server message {kind}"
            first, count = struct.unpack(">xHH", self.recv(5))
            self.colour_map = self.recv(6 * count)
        (count,) = struct.unpack(">xH", self.recv(3))
        rects = []
        for _ in range(count):
            x, y, w, h, enc = struct.unpack(">HHHHi", self.recv(12))
            rects.append((x, y, w, h, enc))
            if enc == DESKTOP_SIZE:
                self.width, self.height = w, h
                self.fb = np.zeros((h, w), np.uint32)
            elif enc == EXTENDED_DESKTOP_SIZE:
                screens = self.recv(4)[0]
                self.recv(16 * screens)
                self.layouts.append((x, y, w, h))
                if (w, h) != (self.width, self.height):
                    self.width, self.height = w, h
                    self.fb = np.zeros((h, w), np.uint32)
            elif enc == CURSOR:
                pixels = self.values(self.recv(w * h * self.bypp), h, w)
                mask = np.unpackbits(
                    np.frombuffer(self.recv((w + 7) // 8 * h), np.uint8).reshape(h, -1), axis=1
                )[:, :w]
                self.cursor = (x, y, pixels, mask)
            elif enc == COPYRECT:
                sx, sy = struct.unpack(">HH", self.recv(4))
                self.fb[y : y + h, x : x + w] = self.fb[sy : sy + h, sx : sx + w].copy()
            elif enc == HEXTILE:
                self.decode_hextile(x, y, w, h)
            elif enc == TIGHT:
                self.decode_tight(x, y, w, h)
            elif enc == RAW:
                self.fb[y : y + h, x : x + w] = self.values(self.recv(w * h * self.bypp), h, w)
            elif enc == ZLIB:
                (n,) = struct.unpack(">I", self.recv(4))
                data = self.zlib.decompress(self.recv(n))
                self.fb[y : y + h, x : x + w] = self.values(data, h, w)
            elif enc == ZRLE:
                (n,) = struct.unpack(">I", self.recv(4))
                self.decode_zrle(self.zrle.decompress(self.recv(n)), x, y, w, h)
            else:
                raise AssertionError(f"unexpected encoding {enc}")
        return rects

    @property
    def bypp(self) -> int:
        return self.pf[0] // 8

    def values(self, data: bytes, h: int, w: int) -> np.ndarray:
        dtype = np.dtype((">" if self.pf[2] else "<") + f"u{self.bypp}")
        return np.frombuffer(data, dtype).reshape(h, w).astype(np.uint32)

    def cpixels(self, data: bytes, n: int) -> tuple[np.ndarray, int]:
        """`n` ZRLE CPIXELs from `data` as values, and the bytes they took."""
        bpp, depth, be = self.pf[:3]
        mask = sum(m << s for m, s in zip(self.pf[4:7], self.pf[7:10], strict=True))
        if bpp == 32 and depth <= 24 and (mask < 1 << 24 or mask & 0xFF == 0):
            low = mask < 1 << 24
            cp = np.frombuffer(data[: 3 * n], np.uint8).reshape(n, 3)
            full = np.full((n, 4), 0xFF, np.uint8)  # the padding byte ZRLE leaves out
            col = 0 if low != bool(be) else 1
            full[:, col : col + 3] = cp
            return self.values(full.tobytes(), 1, n)[0], 3 * n
        return self.values(data[: n * self.bypp], 1, n)[0], n * self.bypp

    def decode_zrle(self, data: bytes, x: int, y: int, w: int, h: int) -> None:
        pos = 0
        for ty in range(y, y + h, 64):
            for tx in range(x, x + w, 64):
                th, tw = min(64, y + h - ty), min(64, x + w - tx)
                sub = data[pos]
                pos += 1
                if sub == 0:
                    tile, used = self.cpixels(data[pos:], th * tw)
                    tile = tile.reshape(th, tw)
                elif sub == 1:
                    colour, used = self.cpixels(data[pos:], 1)
                    tile = np.full((th, tw), colour[0], np.uint32)
                elif 2 <= sub <= 16:
                    palette, used = self.cpixels(data[pos:], sub)
                    bits = 1 if sub == 2 else 2 if sub <= 4 else 4
                    row_bytes = (tw * bits + 7) // 8
                    packed = np.frombuffer(data, np.uint8, th * row_bytes, pos + used)
                    idx = np.unpackbits(packed.reshape(th, row_bytes), axis=1)
                    idx = idx.reshape(th, -1, bits) @ (1 << np.arange(bits - 1, -1, -1))
                    tile = palette[idx[:, :tw]]
                    used += th * row_bytes
                else:
                    raise AssertionError(f"unexpected ZRLE subencoding {sub}")
                pos += used
                self.fb[ty : ty + th, tx : tx + tw] = tile
        assert pos == len(data)

    def pixel(self) -> int:
        return int(self.values(self.recv(self.bypp), 1, 1)[0, 0])

    def decode_hextile(self, x: int, y: int, w: int, h: int) -> None:
        bg = fg = 0
        for ty in range(y, y + h, 16):
            for tx in range(x, x + w, 16):
                th, tw = min(16, y + h - ty), min(16, x + w - tx)
                sub = self.recv(1)[0]
                if sub & 1:  # raw
                    self.fb[ty : ty + th, tx : tx + tw] = self.values(
                        self.recv(th * tw * self.bypp), th, tw
                    )
                    continue
                if sub & 2:
                    bg = self.pixel()
                self.fb[ty : ty + th, tx : tx + tw] = bg
                if sub & 4:
                    fg = self.pixel()
                if sub & 8:
                    for _ in range(self.recv(1)[0]):
                        colour = self.pixel() if sub & 16 else fg
                        xy, wh = self.recv(2)
                        sx, sy = tx + (xy >> 4), ty + (xy & 15)
                        self.fb[sy : sy + (wh & 15) + 1, sx : sx + (wh >> 4) + 1] = colour

    def tpixel24(self) -> bool:
        return self.pf[0] == 32 and self.pf[1] == 24 and self.pf[4:7] == (255, 255, 255)

    def tpixels(self, data: bytes, h: int, w: int) -> np.ndarray:
        """TPIXELs as values: R, G, B bytes for 24-bit formats, else whole pixels."""
        if not self.tpixel24():
            return self.values(data, h, w)
        rgb = np.frombuffer(data, np.uint8).reshape(h, w, 3).astype(np.uint32)
        rs, gs, bs = self.pf[7:10]
        return (rgb[..., 0] << rs | rgb[..., 1] << gs | rgb[..., 2] << bs) | padding(self.pf)

    def compact(self) -> int:
        n = 0
        for shift in (0, 7, 14):
            byte = self.recv(1)[0]
            n |= (byte & (0x7F if shift < 14 else 0xFF)) << shift
            if shift < 14 and not byte & 0x80:
                break
        return n

    def decode_tight(self, x: int, y: int, w: int, h: int) -> None:
        control = self.recv(1)[0]
        for stream in range(4):
            if control & (1 << stream):
                self.tight[stream] = zlib.decompressobj()
        kind = control >> 4
        tsize = 3 if self.tpixel24() else self.bypp
        if kind == 8:  # fill
            self.fb[y : y + h, x : x + w] = self.tpixels(self.recv(tsize), 1, 1)[0, 0]
        elif kind == 9:  # JPEG
            import simplejpeg

            rgb = simplejpeg.decode_jpeg(self.recv(self.compact()), colorspace="RGB")
            assert rgb.shape == (h, w, 3)
            self.fb[y : y + h, x : x + w] = self.tpixels(rgb.tobytes(), h, w)
            self.jpeg_rects += 1
        else:
            assert kind < 8 and not kind & 4, f"unexpected Tight control {control:#x}"
            size = w * h * tsize
            data = (
                self.recv(size)
                if size < 12
                else self.tight[kind & 3].decompress(self.recv(self.compact()))
            )
            assert len(data) == size
            self.fb[y : y + h, x : x + w] = self.tpixels(data, h, w)

    def set_desktop_size(self, w: int, h: int) -> None:
        self.sock.sendall(
            struct.pack(">BxHHBx", 251, w, h, 1) + struct.pack(">IHHHHI", 0, 0, 0, w, h, 0)
        )

    def close(self) -> None:
        self.sock.close()


class Events:
    def __init__(self) -> None:
        self.keys: list[tuple[int, bool]] = []
        self.pointer: list[tuple[int, int, int]] = []

    def on_key(self, keysym: int, down: bool) -> None:
        self.keys.append((keysym, down))

    def on_pointer(self, x: int, y: int, buttons: int) -> None:
        self.pointer.append((x, y, buttons))


def connect(server: VncServer, *encodings: int, **kwargs: Any) -> Rfb:
    client = Rfb(server.address, kwargs.pop("rcvbuf", None))
    client.handshake(**kwargs)
    if encodings:
        client.set_encodings(*encodings)
    return client


def rgb_values(pix: np.ndarray) -> np.ndarray:
    return expected_values(pix, DEFAULT_PF)
