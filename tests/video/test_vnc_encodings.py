"""The VNC encodings decoded back to pixels by the test's own client:
Tight (fill, zlib, JPEG within a tolerance), Hextile, ZRLE, Raw and Zlib
pixel-exact in every pixel format, Cursor, ExtendedDesktopSize, and the
encoding each client gets."""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vnc_client import (
    COPYRECT,
    CURSOR,
    DESKTOP_SIZE,
    EXTENDED_DESKTOP_SIZE,
    HEXTILE,
    QUALITY_6,
    RAW,
    TIGHT,
    ZLIB,
    ZRLE,
    H,
    Rfb,
    W,
    connect,
    expected_values,
    pattern,
    rgb_values,
    wait_for,
)

from vsp.video import encodings, tight
from vsp.video.rfb import PixelFormat
from vsp.video.screen import CONTROL_SIZE, Screen
from vsp.video.vnc import VncServer

FORMATS = {
    "server-bgrx": (32, 24, 0, 1, 255, 255, 255, 16, 8, 0),
    "novnc-rgbx": (32, 24, 0, 1, 255, 255, 255, 0, 8, 16),
    "bgr32-big-endian": (32, 24, 1, 1, 255, 255, 255, 0, 8, 16),
    "xrgb32-high-bytes": (32, 24, 0, 1, 255, 255, 255, 24, 16, 8),
    "rgb565": (16, 16, 0, 1, 31, 63, 31, 11, 5, 0),
    "bgr233": (8, 8, 0, 1, 7, 7, 3, 0, 3, 6),
}


@pytest.mark.parametrize("encoding", [TIGHT, HEXTILE, ZRLE, ZLIB, RAW])
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_encoding_decodes_pixel_exact(
    server: VncServer, screen: Screen, encoding: int, name: str
) -> None:
    client = connect(server, encoding, RAW)
    client.set_pixel_format(FORMATS[name])
    client.request(False)
    assert [r[4] for r in client.read_update()] == [encoding]
    assert (client.fb == expected_values(screen.frame_copy(), FORMATS[name])).all()
    # Streams go on across updates; a sub-rectangle decodes in place.
    screen.update(pattern(H, W, seed=4), [(3, 70, 140, 99)])
    client.request(True)
    assert client.read_update() == [(3, 70, 137, 29, encoding)]
    assert (client.fb == expected_values(screen.frame_copy(), FORMATS[name])).all()


def test_tight_fills_a_solid_rectangle(server: VncServer, screen: Screen) -> None:
    client = connect(server, TIGHT)
    client.request(False)
    client.read_update()
    screen.update(np.full((H, W, 4), 0x33, np.uint8), [(10, 10, 90, 60)])
    client.request(True)
    assert client.read_update() == [(10, 10, 80, 50, TIGHT)]
    assert (client.fb == rgb_values(screen.frame_copy())).all()


def smooth(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    pix = np.zeros((height, width, 4), np.uint8)
    pix[..., 0], pix[..., 1], pix[..., 2] = x % 256, y % 256, (x + y) // 2 % 256
    return pix


def channels(values: np.ndarray) -> np.ndarray:
    return np.stack([(values >> s) & 0xFF for s in (16, 8, 0)], -1).astype(np.int16)


@pytest.mark.skipif(not encodings.JPEG_AVAILABLE, reason="simplejpeg is not installed")
def test_tight_jpeg_is_close_to_the_frame(server: VncServer, screen: Screen) -> None:
    screen.update(smooth(H, W))
    client = connect(server, TIGHT, QUALITY_6)
    client.request(False)
    assert client.read_update() == [(0, 0, W, H, TIGHT)] and client.jpeg_rects == 1
    error = np.abs(channels(client.fb) - channels(rgb_values(screen.frame_copy())))
    assert error.mean() < 3 and error.max() < 48


def test_tight_splits_wide_and_large_rectangles(serve: Callable[..., VncServer]) -> None:
    screen = Screen(2100, 600)
    screen.update(pattern(600, 2100, seed=2))
    client = connect(serve(screen=screen), TIGHT)
    client.request(False)
    rects = client.read_update()
    assert len(rects) > 2 and all(w <= 2048 and w * h <= 1 << 20 for _, _, w, h, _ in rects)
    assert (client.fb == rgb_values(screen.frame_copy())).all()


def test_tight_encodes_a_large_rectangle_in_bands_on_two_streams(
    serve: Callable[..., VncServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tight, "PARALLEL", 2)  # the server gets a helper
    screen = Screen(512, 300)  # over tight.PARALLEL_MIN_PIXELS
    screen.update(pattern(300, 512, seed=3))
    client = connect(serve(screen=screen), TIGHT)
    client.request(False)
    assert client.read_update() == [(0, 0, 512, 150, TIGHT), (0, 150, 512, 150, TIGHT)]
    assert (client.fb == rgb_values(screen.frame_copy())).all()
    screen.update(pattern(300, 512, seed=4))  # each stream goes on where it was
    client.request(False)
    client.read_update()
    assert (client.fb == rgb_values(screen.frame_copy())).all()


@pytest.mark.skipif(not encodings.JPEG_AVAILABLE, reason="simplejpeg is not installed")
def test_tight_jpeg_bands_are_close_to_the_frame(
    serve: Callable[..., VncServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tight, "PARALLEL", 2)
    screen = Screen(512, 300)
    y, x = np.mgrid[0:300, 0:512]
    ramp = np.zeros((300, 512, 4), np.uint8)  # smooth, with no wrap-around edge at 256
    ramp[..., 0], ramp[..., 1], ramp[..., 2] = x // 2, y * 255 // 299, (x + y) * 255 // 810
    screen.update(ramp)
    client = connect(serve(screen=screen), TIGHT, QUALITY_6)
    client.request(False)
    assert len(client.read_update()) == 2 and client.jpeg_rects == 2
    error = np.abs(channels(client.fb) - channels(rgb_values(screen.frame_copy())))
    assert error.mean() < 3 and error.max() < 48


def test_the_client_gets_the_first_encoding_it_announces(server: VncServer) -> None:
    client = connect(server, 99, ZRLE, TIGHT, RAW)  # 99: unknown, skipped
    client.request(False)
    assert client.read_update()[0][4] == ZRLE


def test_cursor_shape_reaches_a_client_that_announces_cursor(
    server: VncServer, screen: Screen
) -> None:
    shape = np.zeros((5, 9, 4), np.uint8)
    shape[..., 2] = 200  # red
    shape[1:4, 2:7, 3] = 255  # opaque in the middle
    screen.set_cursor(shape, 4, 2)
    client = connect(server, RAW, CURSOR)
    client.request(False)
    assert (4, 2, 9, 5, CURSOR) in client.read_update()
    assert client.cursor is not None
    hot_x, hot_y, pixels, mask = client.cursor
    assert (pixels == rgb_values(shape)).all()
    assert (mask == (shape[..., 3] >= 128)).all()
    screen.update(pattern(H, W), [(0, 0, 4, 4)])
    client.request(True)
    assert all(r[4] != CURSOR for r in client.read_update())  # sent once per shape


def test_extended_desktop_size_and_set_desktop_size(server: VncServer, screen: Screen) -> None:
    client = connect(server, RAW, EXTENDED_DESKTOP_SIZE, DESKTOP_SIZE)
    client.request(False)
    client.read_update()
    assert client.layouts == [(0, 0, W, H)]  # the server says it has the extension
    client.set_desktop_size(300, 200)
    client.request(True)
    wait_for(lambda: bool(screen.read_control()))  # the size request, for the guest
    client.read_update()
    assert client.layouts[-1] == (1, 0, W, H)  # accepted; the guest changes mode later
    screen.resize(300, 200)
    client.request(True)
    assert client.read_update()[0] == (0, 0, 300, 200, EXTENDED_DESKTOP_SIZE)


def test_a_set_desktop_size_request_is_forwarded(server: VncServer, screen: Screen) -> None:
    client = connect(server, RAW, EXTENDED_DESKTOP_SIZE)
    client.set_desktop_size(640, 480)
    requests: list[tuple[int, int, int]] = []
    wait_for(lambda: bool(requests.extend(screen.read_control()) or requests))
    assert requests == [(CONTROL_SIZE, 640, 480)]


def test_set_desktop_size_refused_when_resizing_is_off(
    serve: Callable[..., VncServer], screen: Screen
) -> None:
    client = connect(serve(resize=False), RAW, EXTENDED_DESKTOP_SIZE)
    client.request(False)
    client.read_update()
    client.set_desktop_size(640, 480)
    client.request(True)
    client.read_update()
    assert client.layouts[-1] == (1, 1, W, H)  # prohibited
    assert screen.read_control() == []


class BytesRfb(Rfb):
    """The test client's decoders over bytes an Encoder wrote."""

    def __init__(self, data: bytes, pf: tuple[int, ...], height: int, width: int) -> None:
        self.data, self.pos, self.pf = data, 0, pf
        self.zlib, self.zrle = zlib.decompressobj(), zlib.decompressobj()
        self.tight = [zlib.decompressobj() for _ in range(4)]
        self.fb = np.zeros((height, width), np.uint32)
        self.width, self.height = width, height
        self.cursor, self.layouts, self.jpeg_rects = None, [], 0

    def recv(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        assert len(chunk) == n, "short update"
        self.pos += n
        return chunk


@settings(max_examples=60, deadline=None)
@given(
    encoding=st.sampled_from([TIGHT, HEXTILE, ZRLE, ZLIB, RAW]),
    name=st.sampled_from(sorted(FORMATS)),
    height=st.integers(1, 140),
    width=st.integers(1, 140),
    colours=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
)
def test_encoder_round_trips_any_rectangle(
    encoding: int, name: str, height: int, width: int, colours: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, (colours, 4), dtype=np.uint8)
    pix = palette[rng.integers(0, colours, (height, width))]
    encoder = encodings.Encoder()
    pf = FORMATS[name]
    encoder.set_format(PixelFormat(*pf[:4], *pf[4:]))  # type: ignore[arg-type]
    encoder.set_encodings((encoding,))
    encoder.out.reset()
    encoder.out.reserve(4)  # the FramebufferUpdate header, as the server writes it
    count = encoder.rect(0, 0, pix)
    encoder.out.array[:4] = [0, 0, count >> 8, count & 0xFF]
    client = BytesRfb(bytes(encoder.out.view()), pf, height, width)
    assert len(client.read_update()) == count and client.pos == len(client.data)
    assert (client.fb == expected_values(pix, pf)).all()


@pytest.mark.parametrize("encoding", [ZRLE, TIGHT, HEXTILE])
def test_a_scroll_is_sent_as_copyrect(server: VncServer, screen: Screen, encoding: int) -> None:
    client = connect(server, encoding, COPYRECT)
    client.request(False)
    client.read_update()
    before = screen.frame_copy()
    scrolled = np.roll(before, -37, axis=0)
    scrolled[-37:] = pattern(37, W, seed=8)  # the new lines at the bottom
    screen.update(scrolled)
    client.request(True)
    rects = client.read_update()
    assert rects[0] == (0, 0, W, H - 37, COPYRECT)  # from (0, 37): read by the client
    assert [r[4] for r in rects[1:]] == [encoding]
    assert (client.fb == rgb_values(screen.frame_copy())).all()


def test_no_copyrect_for_a_client_that_does_not_announce_it(
    server: VncServer, screen: Screen
) -> None:
    client = connect(server, ZRLE)
    client.request(False)
    client.read_update()
    screen.update(np.roll(screen.frame_copy(), -37, axis=0))
    client.request(True)
    assert all(r[4] == ZRLE for r in client.read_update())
    assert (client.fb == rgb_values(screen.frame_copy())).all()


def test_find_scroll_needs_a_long_enough_band() -> None:
    rng = np.random.default_rng(3)
    old = rng.integers(0, 256, (100, 80, 4), dtype=np.uint8)
    new = rng.integers(0, 256, (100, 80, 4), dtype=np.uint8)
    new[10:30] = old[50:70]  # 20 rows moved: under MIN_SCROLL_ROWS
    assert encodings.find_scroll(encodings.row_hashes(old), encodings.row_hashes(new)) is None
    new[10:60] = old[40:90]
    assert encodings.find_scroll(encodings.row_hashes(old), encodings.row_hashes(new)) == (
        10,
        60,
        30,
    )
