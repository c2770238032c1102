"""A minimal RFB client written here for the VNC server's tests: handshake,
requests, Raw/Zlib/ZRLE decoding; and what a client must see."""

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

RAW, ZLIB, ZRLE, DESKTOP_SIZE = 0, 6, 16, -223
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
        self.colour_map: bytes | None = None

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
