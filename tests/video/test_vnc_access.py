"""Who may use the VNC console, and what every client is sent: a password
by default, login backoff, the client limit, the idle timeout; updates that
fit clients without DesktopSize; opaque 32 bpp pixels."""

from __future__ import annotations

import itertools
import struct
import time
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from vnc_client import (
    DEFAULT_PF,
    DESKTOP_SIZE,
    RAW,
    ZLIB,
    ZRLE,
    H,
    Rfb,
    W,
    connect,
    padding,
    pattern,
    rgb_values,
    wait_for,
)

from vsp.video.access import MAX_SOURCES, LoginBackoff
from vsp.video.rfb import PixelFormat, encode_pixels, pixel_values, vnc_auth_response
from vsp.video.screen import Screen
from vsp.video.vnc import VncServer

VERSION_38, VERSION_33 = b"RFB 003.008\n", b"RFB 003.003\n"


def refusal(server: VncServer, version: bytes = VERSION_38) -> bytes:
    """Connect, say `version`, and return the reason the server refuses with."""
    client = Rfb(server.address)
    assert client.recv(12) == VERSION_38
    client.sock.sendall(version)
    zero = client.recv(4 if version == VERSION_33 else 1)
    assert not any(zero), "the server offered security types"
    (length,) = struct.unpack(">I", client.recv(4))
    reason = client.recv(length)
    assert client.closed_by_server()
    return reason


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- a password, by default -------------------------------------------------------


def test_console_without_a_password_is_not_open_to_any_local_process(screen: Screen) -> None:
    with VncServer(screen, port=0) as one, VncServer(screen, port=0) as other:
        assert one.password and other.password and one.password != other.password
        assert len(one.password) == 8  # what VNC authentication checks
        client = Rfb(one.address)
        client.recv(12)
        client.sock.sendall(VERSION_38)
        assert client.recv(2) == b"\x01\x02"  # VNC authentication only, no None
        client.close()
        viewer = connect(one, password=one.password)
        viewer.request(False)
        viewer.read_update()
        assert (viewer.fb == rgb_values(screen.frame_copy())).all()


def test_password_and_authenticate_false_conflict(screen: Screen) -> None:
    with pytest.raises(ValueError, match="authenticate=False"):
        VncServer(screen, password="pw", authenticate=False)


# --- failed logins back off -----------------------------------------------------------


def test_backoff_grows_per_failure_and_is_bounded() -> None:
    clock = Clock()
    backoff = LoginBackoff(base=0.5, maximum=8.0, clock=clock)
    delays = [backoff.failed("10.0.0.1") for _ in range(8)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]
    assert backoff.wait("10.0.0.1") == 8.0 and backoff.wait("10.0.0.2") == 0.0
    clock.now += 8.0
    assert backoff.wait("10.0.0.1") == 0.0
    backoff.succeeded("10.0.0.1")
    assert backoff.failed("10.0.0.1") == 0.5  # a success forgets the source
    for n in range(2 * MAX_SOURCES):
        backoff.failed(f"source-{n}")
    assert len(backoff._sources) <= MAX_SOURCES  # the table is bounded


def test_wrong_password_makes_the_source_wait_before_its_next_login(
    serve: Callable[..., VncServer],
) -> None:
    clock = Clock()
    server = serve(password="right", backoff=LoginBackoff(base=2.0, clock=clock))
    with pytest.raises(AssertionError, match="SecurityResult"):
        Rfb(server.address).handshake(password="wrong")
    # Even the right password is not checked while the source waits.
    assert refusal(server) == b"too many authentication failures: retry in 2 s"
    assert refusal(server, VERSION_33) == b"too many authentication failures: retry in 2 s"
    clock.now += 2.0
    connect(server, password="right").close()


def test_guesses_made_in_parallel_during_the_backoff_are_not_checked(
    serve: Callable[..., VncServer],
) -> None:
    server = serve(password="right", backoff=LoginBackoff(base=60.0))
    a, b = Rfb(server.address), Rfb(server.address)
    challenges = []
    for client in (a, b):  # both reach the challenge before either answers
        client.recv(12)
        client.sock.sendall(VERSION_38)
        assert client.recv(2) == b"\x01\x02"
        client.sock.sendall(b"\x02")
        challenges.append(client.recv(16))
    a.sock.sendall(vnc_auth_response("wrong", challenges[0]))
    assert a.recv(4) == struct.pack(">I", 1)
    b.sock.sendall(vnc_auth_response("right", challenges[1]))  # right, but too late
    assert b.recv(4) == struct.pack(">I", 1)
    reason = b"too many authentication failures"
    assert b.recv(4 + len(reason)) == struct.pack(">I", len(reason)) + reason


# --- the client limit and the idle timeout -----------------------------------------


@pytest.mark.parametrize("version", [VERSION_38, VERSION_33])
def test_client_past_the_limit_is_refused_with_a_reason(
    serve: Callable[..., VncServer], version: bytes
) -> None:
    server = serve(max_clients=2)
    viewers = [connect(server), connect(server)]
    assert refusal(server, version) == b"too many clients (at most 2)"
    viewers[0].close()
    wait_for(lambda: server.admitted_count == 1)
    connect(server).close()


def test_connections_in_the_handshake_do_not_hold_the_limit(
    serve: Callable[..., VncServer],
) -> None:
    server = serve(password="pw", max_clients=1)
    silent = [Rfb(server.address) for _ in range(4)]  # never log in
    wait_for(lambda: server.client_count == 4)
    viewer = connect(server, password="pw")
    viewer.request(False)
    assert viewer.read_update() == [(0, 0, W, H, RAW)]
    assert server.admitted_count == 1
    for client in silent:
        client.close()


def test_idle_client_is_dropped_and_an_active_one_kept(serve: Callable[..., VncServer]) -> None:
    server = serve(idle_timeout=0.5)
    idle, active = connect(server), connect(server)
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:  # three idle timeouts
        active.sock.sendall(struct.pack(">BBHH", 5, 0, 1, 1))  # a pointer event
        time.sleep(0.05)
    assert idle.closed_by_server()
    active.request(False)
    assert active.read_update() == [(0, 0, W, H, RAW)]
    assert server.client_count == 1


# --- what every client is sent ----------------------------------------------------


def test_client_without_desktop_size_is_sent_only_what_fits_after_a_grow(
    server: VncServer, screen: Screen
) -> None:
    plain, resizing = connect(server, RAW), connect(server, RAW, DESKTOP_SIZE)
    for client in (plain, resizing):
        client.request(False)
        client.read_update()
        client.request(True)
    bigger = pattern(2 * H, 2 * W, seed=11)
    screen.resize(2 * W, 2 * H)
    screen.update(bigger)
    _read_until(plain, rgb_values(bigger[:H, :W]))  # its own framebuffer, no more
    assert resizing.read_update()[0] == (0, 0, 2 * W, 2 * H, DESKTOP_SIZE)
    screen.update(pattern(2 * H, 2 * W, seed=12), [(W - 10, H - 10, W + 10, H + 10)])
    plain.request(True)
    _read_until(plain, rgb_values(screen.frame_copy()[:H, :W]))


def _read_until(client: Rfb, expected: np.ndarray, updates: int = 4) -> None:
    """Read updates until the client's framebuffer shows `expected`, each
    rectangle inside the client's own size. A resize and the frame drawn
    after it may arrive as one update or as two, as the server's thread
    happens to see them."""
    height, width = client.fb.shape
    for _ in range(updates):
        rects = client.read_update()
        assert all(x + w <= width and y + h <= height for x, y, w, h, _ in rects), rects
        if (client.fb == expected).all():
            return
        client.request(True)
    raise AssertionError(f"no update showed the expected frame in {updates}")


HIGH_ALPHA = (32, 24, 0, 1, 255, 255, 255, 0, 8, 24)  # unused byte 2: ZRLE sends 4 bytes


@pytest.mark.parametrize("encoding", [RAW, ZLIB, ZRLE])
@pytest.mark.parametrize("pf", [DEFAULT_PF, HIGH_ALPHA], ids=["xrgb", "unused-byte-2"])
def test_unused_byte_is_sent_set_for_clients_that_read_it_as_alpha(
    server: VncServer, encoding: int, pf: tuple[int, ...]
) -> None:
    """noVNC 1.3 shows a blank screen when the unused byte is 0."""
    client = connect(server, encoding)
    if pf != DEFAULT_PF:
        client.set_pixel_format(pf)
    client.request(False)
    client.read_update()
    assert (client.fb & padding(pf) == padding(pf)).all()
    if encoding == RAW and pf == DEFAULT_PF:  # byte 3 of every pixel, as sent
        assert (client.fb.astype("<u4").view(np.uint8)[..., 3::4] == 0xFF).all()


@st.composite
def formats_32bpp(draw: st.DrawFn) -> PixelFormat:
    """Any valid true-colour 32 bpp format: channel widths 1..8 bits anywhere."""
    bits = [draw(st.integers(1, 8)) for _ in range(3)]
    shifts = [draw(st.integers(0, 32 - b)) for b in bits]
    maxes = [(1 << b) - 1 for b in bits]
    spans = sorted(zip(shifts, bits, strict=True))
    assume(all(s1 + b1 <= s2 for (s1, b1), (s2, _) in itertools.pairwise(spans)))
    big_endian = draw(st.booleans())
    return PixelFormat(32, sum(bits), big_endian, True, *maxes, *shifts)


@given(fmt=formats_32bpp(), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=60)
def test_every_32bpp_format_sends_its_unused_bits_set(fmt: PixelFormat, seed: int) -> None:
    pix = np.random.default_rng(seed).integers(0, 256, (4, 5, 4), dtype=np.uint8)
    values = pixel_values(fmt, pix)
    assert fmt.valid() and (values & fmt.padding == fmt.padding).all()
    red = (values >> fmt.red_shift) & fmt.red_max  # the channels are untouched
    assert (red == (pix[..., 2].astype(np.uint32) * fmt.red_max + 127) // 255).all()
    wire = np.frombuffer(encode_pixels(fmt, pix), ">u4" if fmt.big_endian else "<u4")
    assert (wire.reshape(4, 5) == values).all()
