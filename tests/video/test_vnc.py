"""The VNC server against a raw-socket RFB client written here, and against vncdotool."""

from __future__ import annotations

import socket
import struct
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vsp.video.rfb import des_encrypt, vnc_auth_response
from vsp.video.screen import Screen
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


@pytest.fixture
def screen() -> Screen:
    s = Screen(W, H)
    s.update(pattern(H, W))
    return s


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def serve(screen: Screen, events: Events) -> Iterator[Callable[..., VncServer]]:
    servers: list[VncServer] = []

    def make(**kwargs: Any) -> VncServer:
        # Security None unless the test sets a password (the default is tested on its own).
        kwargs.setdefault("authenticate", kwargs.get("password") is not None)
        kwargs.setdefault("on_key", events.on_key)
        kwargs.setdefault("on_pointer", events.on_pointer)
        server = VncServer(kwargs.pop("screen", screen), port=0, name="test-console", **kwargs)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def server(serve: Callable[..., VncServer]) -> VncServer:
    return serve()


def connect(server: VncServer, *encodings: int, **kwargs: Any) -> Rfb:
    client = Rfb(server.address, kwargs.pop("rcvbuf", None))
    client.handshake(**kwargs)
    if encodings:
        client.set_encodings(*encodings)
    return client


def rgb_values(pix: np.ndarray) -> np.ndarray:
    return expected_values(pix, DEFAULT_PF)


def test_des_known_answer() -> None:
    # The worked example of FIPS 46 (as in J. Orlin Grabbe's "The DES Algorithm Illustrated").
    key, plain = bytes.fromhex("133457799BBCDFF1"), bytes.fromhex("0123456789ABCDEF")
    assert des_encrypt(key, plain) == bytes.fromhex("85E813540F0AB405")


def test_binds_loopback_by_default(screen: Screen) -> None:
    with VncServer(screen, port=0, authenticate=False) as server:
        assert server.address[0] == "127.0.0.1" and server.address[1] > 0


def test_handshake_none_and_server_init(server: VncServer) -> None:
    client = connect(server)
    assert (client.width, client.height) == (W, H)
    assert client.server_pf == PF.pack(*DEFAULT_PF)
    assert client.name == b"test-console"
    client.close()


@pytest.mark.parametrize("version", [b"RFB 003.003\n", b"RFB 003.007\n", b"RFB 003.889\n"])
@pytest.mark.parametrize("password", [None, "hunter2"])
def test_older_and_other_versions(
    serve: Callable[..., VncServer], version: bytes, password: str | None
) -> None:
    client = connect(serve(password=password), version=version, password=password)
    client.request(False)
    assert client.read_update() == [(0, 0, W, H, RAW)]


def test_vnc_auth(serve: Callable[..., VncServer], screen: Screen) -> None:
    server = serve(password="s3cret-and-more")  # only the first 8 bytes count
    client = connect(server, password="s3cret-a")
    client.request(False)
    client.read_update()
    assert (client.fb == rgb_values(screen.frame_copy())).all()


@pytest.mark.parametrize("version", [b"RFB 003.008\n", b"RFB 003.003\n"])
def test_vnc_auth_wrong_password(serve: Callable[..., VncServer], version: bytes) -> None:
    client = Rfb(serve(password="right").address)
    with pytest.raises(AssertionError, match="SecurityResult"):
        client.handshake(version, password="wrong")
    # 3.8 says why; either way the server hangs up.
    tail = client.sock.recv(100)
    if version == b"RFB 003.008\n":
        assert tail == struct.pack(">I", 21) + b"authentication failed"
    assert client.closed_by_server()


def test_unoffered_security_type_is_refused(server: VncServer) -> None:
    client = Rfb(server.address)
    client.recv(12)
    client.sock.sendall(b"RFB 003.008\n")
    assert client.recv(2) == b"\x01\x01"
    client.sock.sendall(b"\x02")
    assert client.recv(4) == b"\0\0\0\x01"
    assert client.recv(4 + 25) == struct.pack(">I", 25) + b"unsupported security type"
    assert client.closed_by_server()


@pytest.mark.parametrize("encoding", [RAW, ZLIB, ZRLE])
def test_updates_pixel_exact(server: VncServer, screen: Screen, encoding: int) -> None:
    client = connect(server, encoding, RAW)
    client.request(False)
    assert client.read_update() == [(0, 0, W, H, encoding)]
    assert (client.fb == rgb_values(screen.frame_copy())).all()
    # The compressed streams go on across updates; a sub-rectangle decodes in place.
    screen.update(pattern(H, W, seed=9), [(3, 70, 140, 99)])
    client.request(True)
    assert client.read_update() == [(3, 70, 137, 29, encoding)]
    assert (client.fb == rgb_values(screen.frame_copy())).all()


PIXEL_FORMATS = {
    "bgr32-big-endian": (32, 24, 1, 1, 255, 255, 255, 0, 8, 16),
    "xrgb32-high-bytes": (32, 24, 0, 1, 255, 255, 255, 24, 16, 8),
    "rgb565": (16, 16, 0, 1, 31, 63, 31, 11, 5, 0),
    "rgb555-big-endian": (16, 15, 1, 1, 31, 31, 31, 10, 5, 0),
    "bgr233": (8, 8, 0, 1, 7, 7, 3, 0, 3, 6),
}


@pytest.mark.parametrize("encoding", [RAW, ZRLE])
@pytest.mark.parametrize("name", sorted(PIXEL_FORMATS))
def test_pixel_formats(server: VncServer, screen: Screen, name: str, encoding: int) -> None:
    pf = PIXEL_FORMATS[name]
    client = connect(server, encoding)
    client.set_pixel_format(pf)
    client.request(False)
    client.read_update()
    assert (client.fb == expected_values(screen.frame_copy(), pf)).all()


def test_colour_mapped_client_gets_a_bgr233_map(server: VncServer, screen: Screen) -> None:
    client = connect(server)
    client.set_pixel_format((8, 8, 0, 0, 0, 0, 0, 0, 0, 0))
    client.pf = PIXEL_FORMATS["bgr233"]
    client.request(False)
    client.read_update()
    assert client.colour_map is not None
    cmap = np.frombuffer(client.colour_map, ">u2").reshape(256, 3)
    assert tuple(cmap[0b11_000_111]) == (65535, 0, 65535)  # blue 3, green 0, red 7
    assert (client.fb == expected_values(screen.frame_copy(), client.pf)).all()


def test_invalid_pixel_format_drops_the_client(server: VncServer) -> None:
    client = connect(server)
    client.set_pixel_format((24, 24, 0, 1, 255, 255, 255, 16, 8, 0))
    assert client.closed_by_server()
    wait_for(lambda: server.client_count == 0)


def test_incremental_updates_cover_only_dirty_rects(server: VncServer, screen: Screen) -> None:
    client = connect(server)
    client.request(False)
    client.read_update()
    client.request(True, (0, 0, 50, 50))
    client.sock.settimeout(0.3)
    with pytest.raises(TimeoutError):  # nothing changed: the request waits
        client.recv(1)
    client.sock.settimeout(5)
    vram = pattern(H, W, seed=5)
    screen.update(vram, [(60, 60, 70, 70), (40, 40, 55, 55)])
    assert client.read_update() == [(40, 40, 10, 10, RAW)]  # inside the request only
    client.request(True)  # the rest of the damage was kept for later
    rects = client.read_update()
    assert sorted(r[:4] for r in rects) == [(40, 50, 15, 5), (50, 40, 5, 10), (60, 60, 10, 10)]
    assert (client.fb == rgb_values(screen.frame_copy())).all()


@pytest.mark.parametrize("desktop_size", [True, False])
def test_resize(server: VncServer, screen: Screen, desktop_size: bool) -> None:
    client = connect(server, *([RAW, DESKTOP_SIZE] if desktop_size else [RAW]))
    client.request(False)
    client.read_update()
    client.request(True)
    screen.resize(90, 40)
    rects = client.read_update()
    if desktop_size:
        assert rects == [(0, 0, 90, 40, DESKTOP_SIZE), (0, 0, 90, 40, RAW)]
    else:
        assert rects == [(0, 0, 90, 40, RAW)]
        client.fb = client.fb[:40, :90]
    assert (client.fb == padding(DEFAULT_PF)).all()  # black, opaque
    screen.update(pattern(40, 90, seed=7), [(10, 5, 80, 35)])
    client.request(True)
    assert (10, 5, 70, 30, RAW) in client.read_update()
    assert (client.fb == rgb_values(screen.frame_copy())).all()


def test_key_pointer_and_cut_text(server: VncServer, events: Events) -> None:
    client = connect(server)
    cut = struct.pack(">B3xI", 6, 10) + b"0123456789"
    client.sock.sendall(struct.pack(">BBxxI", 4, 1, 0x61) + cut[:9])
    client.sock.sendall(cut[9:] + struct.pack(">BBxxI", 4, 0, 0xFF0D))
    client.sock.sendall(struct.pack(">BBHH", 5, 0b101, 10, 20))
    client.sock.sendall(struct.pack(">BBHH", 5, 0, 5000, 6000))  # clamped to the screen
    wait_for(lambda: len(events.pointer) == 2)
    assert events.keys == [(0x61, True), (0xFF0D, False)]
    assert events.pointer == [(10, 20, 5), (W - 1, H - 1, 0)]


def test_failing_callback_does_not_hurt(serve: Callable[..., VncServer]) -> None:
    def broken(keysym: int, down: bool) -> None:
        raise RuntimeError("guest keyboard gone")

    client = connect(serve(on_key=broken))
    client.sock.sendall(struct.pack(">BBxxI", 4, 1, 0x61))
    client.request(False)
    assert client.read_update() == [(0, 0, W, H, RAW)]


def test_two_clients(server: VncServer, screen: Screen) -> None:
    a, b = connect(server, ZRLE), connect(server, RAW)
    for client in (a, b):
        client.request(False)
        client.read_update()
        client.request(True)
    screen.update(pattern(H, W, seed=3), [(0, 0, 30, 30)])
    for client in (a, b):
        assert [r[:4] for r in client.read_update()] == [(0, 0, 30, 30)]
        assert (client.fb == rgb_values(screen.frame_copy())).all()
    assert server.client_count == 2


BAD_CLIENTS = {
    "garbage-version": b"GET / HTTP/1.1\r\n\r\n",
    "garbage-message": None,  # after the handshake
    "cut-mid-message": b"RFB 003.008\n\x01\x01\x02\x00\x00\x05\x00\x00",
}


@pytest.mark.parametrize("bad", sorted(BAD_CLIENTS))
def test_bad_client_is_dropped_alone(server: VncServer, screen: Screen, bad: str) -> None:
    good = connect(server)
    evil = Rfb(server.address)
    data = BAD_CLIENTS[bad]
    if data is None:
        evil.handshake()
        data = b"\xee" + bytes(range(200))
    else:
        evil.recv(12)
    evil.sock.sendall(data)
    if bad == "cut-mid-message":
        evil.close()
    else:
        assert evil.closed_by_server()
    wait_for(lambda: server.client_count == 1)
    good.request(False)
    good.read_update()
    assert (good.fb == rgb_values(screen.frame_copy())).all()


def test_slow_reader_and_idle_handshake_are_dropped(serve: Callable[..., VncServer]) -> None:
    big = Screen(1920, 1080)  # 8 MiB raw: more than the socket buffers hold
    big.update(pattern(1080, 1920))
    server = serve(screen=big, send_stall_timeout=0.4, handshake_timeout=0.4)
    slow = connect(server, rcvbuf=4096)
    idle = Rfb(server.address)  # never says its version
    for _ in range(3):
        slow.request(False)  # and never reads
    good = connect(server, ZLIB)
    small = (0, 0, 64, 64)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.0:  # the good client is served all along
        good.request(False, small)
        assert good.read_update() == [(*small, ZLIB)]
    assert server.client_count == 1
    slow.close()
    idle.close()


# vncdotool 1.4.2 reads ZRLE packed-palette tiles without the row padding RFC 6143
# 7.7.6 requires, so its screens have only tiles a multiple of 8 pixels wide.
VW, VH = 192, 100


@pytest.fixture(scope="module")
def vnc_api() -> Iterator[Any]:
    from vncdotool import api  # in the test extra: missing is an error, not a skip

    yield api
    api.shutdown()  # its Twisted reactor thread, once for the module


@pytest.mark.parametrize("password", [None, "pa55word"])
@pytest.mark.parametrize("encoding", ["raw", "zrle"])
def test_vncdotool_capture(
    vnc_api: Any, serve: Callable[..., VncServer], tmp_path: Path, encoding: str,
    password: str | None,
) -> None:  # fmt: skip
    from PIL import Image
    from vncdotool import client as vclient
    from vncdotool import rfb

    class ZrleClient(vclient.VNCDoToolClient):
        encoding = rfb.Encoding.ZRLE

    class ZrleFactory(vclient.VNCDoToolFactory):
        protocol = ZrleClient

    factory = ZrleFactory if encoding == "zrle" else vclient.VNCDoToolFactory
    screen = Screen(VW, VH)
    screen.update(pattern(VH, VW, seed=8))
    port = serve(screen=screen, password=password).address[1]
    with warnings.catch_warnings():  # vncdotool's DES goes through a deprecated TripleDES
        warnings.simplefilter("ignore")
        client = vnc_api.connect(f"127.0.0.1::{port}", password, factory, timeout=10)
        client.captureScreen(str(tmp_path / "shot.png"))
    shot = np.asarray(Image.open(tmp_path / "shot.png").convert("RGB"))
    assert (shot == screen.frame_copy()[:, :, 2::-1]).all()
    client.disconnect()


def test_vncdotool_resize_keys_and_mouse(
    vnc_api: Any, server: VncServer, screen: Screen, events: Events, tmp_path: Path
) -> None:
    from PIL import Image

    client = vnc_api.connect(f"127.0.0.1::{server.address[1]}", timeout=10)
    client.captureScreen(str(tmp_path / "before.png"))
    screen.resize(120, 70)
    screen.update(pattern(70, 120, seed=4))
    client.captureScreen(str(tmp_path / "after.png"))
    shot = np.asarray(Image.open(tmp_path / "after.png").convert("RGB"))
    assert (shot == screen.frame_copy()[:, :, 2::-1]).all()
    client.keyPress("a")
    client.keyPress("enter")
    client.mouseMove(33, 44)
    client.mousePress(1)
    wait_for(lambda: len(events.pointer) == 3 and len(events.keys) == 4)
    assert events.keys == [(0x61, True), (0x61, False), (0xFF0D, True), (0xFF0D, False)]
    assert events.pointer == [(33, 44, 0), (33, 44, 1), (33, 44, 0)]
    client.disconnect()


def test_vnc_auth_response_matches_vncdotool() -> None:
    from vncdotool import rfb

    challenge = bytes(range(16))
    for password in ("", "a", "password", "longer than eight"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            key = rfb._vnc_des(password)
            reference = rfb.des_encrypt(key, challenge)
        assert vnc_auth_response(password, challenge) == reference


def test_stop_closes_clients(serve: Callable[..., VncServer]) -> None:
    server = serve()
    client = connect(server)
    server.stop()
    assert client.closed_by_server()
    done = threading.Event()
    threading.Thread(target=lambda: (server.stop(), done.set())).start()  # idempotent
    assert done.wait(5)
