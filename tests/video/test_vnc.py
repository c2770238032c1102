"""The VNC server against a raw-socket RFB client written here, and against vncdotool."""

from __future__ import annotations

import struct
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from vnc_client import (
    DEFAULT_PF,
    DESKTOP_SIZE,
    PF,
    RAW,
    ZLIB,
    ZRLE,
    Events,
    H,
    Rfb,
    W,
    connect,
    expected_values,
    padding,
    pattern,
    rgb_values,
    wait_for,
)

from vsp.video.rfb import des_encrypt, vnc_auth_response
from vsp.video.screen import Screen
from vsp.video.vnc import VncServer


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
    # The damage: its rectangle, or the whole frame when the resize's own
    # damage reached the server after it had sent the new frame.
    update = client.read_update()
    assert (10, 5, 70, 30, RAW) in update or (0, 0, 90, 40, RAW) in update
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
