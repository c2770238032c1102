"""pytest-benchmark tests of the video path's pieces in one process and one
thread: the parent's Screen copy of dirty rectangles, a DIRT's whole trip
from the guest through an in-process channel (vmbus.testing.VspHarness) to
the VideoVsp and its Screen, and the VNC server's encodings of a full frame
(Raw, ZRLE, Hextile, Tight with zlib and with JPEG). No process wakes
another: these are CPU costs, the floor of
the cross-process figures.

    .venv/bin/pytest benchmarks/test_bench_video.py --benchmark-enable -p no:cacheprovider

The cross-process figures are `python -m benchmarks.video_bench`.
"""

from __future__ import annotations

import mmap
import multiprocessing
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import numpy as np
import pytest

from benchmarks import video_bench
from benchmarks.video_bench import BATCH, FRAME_BYTES, HEIGHT, TILE, WIDTH, Pixels, frames
from vmbus.memory import PAGE_SIZE
from vmbus.protocols import video as sv
from vmbus.testing import VspHarness
from vsp.video import VideoVsp, rfb
from vsp.video.encodings import ENC_HEXTILE, ENC_TIGHT, Encoder
from vsp.video.screen import Capture, Rect, Screen

MiB = 1 << 20
RING = 256 * 1024


def vram_frame() -> Pixels:
    """A page-aligned (height, width, 4) array holding a frame, as VRAM is."""
    buffer = mmap.mmap(-1, FRAME_BYTES)
    pixels = np.frombuffer(buffer, np.uint8).reshape(HEIGHT, WIDTH, 4)
    pixels[:] = frames(WIDTH, HEIGHT)[0]
    return pixels


def places(n: int) -> list[Rect]:
    rng = random.Random(1)
    spots = [(rng.randrange(WIDTH - TILE), rng.randrange(HEIGHT - TILE)) for _ in range(n)]
    return [(x, y, x + TILE, y + TILE) for x, y in spots]


# --- the parent's copy -------------------------------------------------------------


def test_numpy_copy_full_frame(benchmark) -> None:  # type: ignore[no-untyped-def]
    """The reference: np.copyto of a frame between two arrays."""
    source, target = vram_frame(), np.zeros((HEIGHT, WIDTH, 4), np.uint8)
    benchmark(np.copyto, target, source)
    assert np.array_equal(target, source)


@pytest.mark.parametrize("rects", [0, 1, BATCH], ids=["full", "one-64x64", "64-64x64"])
def test_screen_update(benchmark, rects: int) -> None:  # type: ignore[no-untyped-def]
    """Screen.update from a VRAM view: the whole frame, or 64x64 rectangles."""
    screen, pixels = Screen(WIDTH, HEIGHT), vram_frame()
    dirty = places(rects) if rects else None
    benchmark(screen.update, pixels, dirty)
    x1, y1, x2, y2 = dirty[0] if dirty else (0, 0, WIDTH, HEIGHT)
    # The Screen keeps the unused byte 0xFF: the colours are the pixels'.
    assert np.array_equal(screen.frame_copy()[y1:y2, x1:x2, :3], pixels[y1:y2, x1:x2, :3])


def test_screen_capture_full_frame(benchmark) -> None:  # type: ignore[no-untyped-def]
    """What the VNC server copies out of the Screen for each full update."""
    screen = Screen(WIDTH, HEIGHT)
    screen.update(vram_frame())
    capture = benchmark(screen.capture, [(0, 0, WIDTH, HEIGHT)], 0)
    assert capture.pixels[0].shape == (HEIGHT, WIDTH, 4)


# --- a DIRT's whole trip, child to Screen ------------------------------------------


class Guest:
    """The guest's side of a VideoVsp in the harness, spoken by hand with a
    SynthvidClient (in this thread: `pump` serves the VSP): negotiated, VRAM
    granted and placed, the mode set and DIRT asked for. `pixels` is VRAM."""

    def __init__(self, harness: VspHarness) -> None:
        self.harness, self.client = harness, sv.SynthvidClient()
        vsp = cast(VideoVsp, harness.vsp)
        gpa = harness.grant(vsp.vram_size // PAGE_SIZE).pfns[0] * PAGE_SIZE
        self.exchange([self.client.start()], lambda: self.client.negotiated)
        self.exchange([self.client.vram_location(gpa)], lambda: self.client.vram_acked)
        mode = [*self.client.hide_pointer(), self.client.situation_update(WIDTH, HEIGHT)]
        self.exchange(mode, lambda: self.client.dirt_needed)
        view = harness.memory.view(gpa, FRAME_BYTES)
        self.pixels = np.frombuffer(view, np.uint8).reshape(HEIGHT, WIDTH, 4)

    def exchange(self, payloads: list[bytes], done: Callable[[], bool]) -> None:
        for _ in range(16):
            for payload in payloads:
                self.harness.guest.send(payload)
            self.harness.pump()
            payloads = []
            while (packet := self.harness.guest.poll()) is not None:
                payloads += self.client.receive(packet.payload)
            if done() and not payloads:
                return
        raise AssertionError("the VSP did not answer")


@pytest.fixture
def guest() -> Iterator[Guest]:
    vsp = VideoVsp(Screen(WIDTH, HEIGHT))
    with VspHarness(vsp, memory_size=vsp.vram_size + 4 * MiB, ring_size=RING) as harness:
        guest = Guest(harness)
        guest.pixels[:] = frames(WIDTH, HEIGHT)[0]
        yield guest
        del guest.pixels  # the harness closes guest memory


@pytest.mark.parametrize("rects", [0, 1, BATCH], ids=["full", "one-64x64", "64-64x64"])
def test_dirt_to_screen(benchmark, guest: Guest, rects: int) -> None:  # type: ignore[no-untyped-def]
    """A DIRT sent, then the VSP serves the channel as its worker does:
    encode, ring, copy out, decode, validate and Screen.update (the child's
    pixel writes left out)."""
    dirty = places(rects) or [(0, 0, WIDTH, HEIGHT)]
    vsp = cast(VideoVsp, guest.harness.vsp)

    def trip() -> None:
        guest.harness.guest.send(guest.client.dirt(*dirty))
        guest.harness.pump()

    before = vsp.frames
    benchmark(trip)
    assert vsp.frames > before and vsp.errors.total() == 0
    x1, y1, x2, y2 = dirty[0]
    shown = vsp.screen.frame_copy()
    assert np.array_equal(shown[y1:y2, x1:x2, :3], guest.pixels[y1:y2, x1:x2, :3])


@pytest.mark.parametrize("rects", [1, BATCH], ids=["one-64x64", "64-64x64"])
def test_dirt_encode(benchmark, rects: int) -> None:  # type: ignore[no-untyped-def]
    """The child's side of a DIRT: SynthvidClient.dirt (the VSC's message)."""
    dirty = places(rects)
    assert len(benchmark(sv.SynthvidClient().dirt, *dirty)) == 10 + 16 * rects + 8


@pytest.mark.parametrize("rects", [1, BATCH], ids=["one-64x64", "64-64x64"])
def test_dirt_decode(benchmark, guest: Guest, rects: int) -> None:  # type: ignore[no-untyped-def]
    """The parent's side before the copy: SynthvidServer.receive decodes and clips."""
    payload = guest.client.dirt(*places(rects))
    handler = cast(VideoVsp, guest.harness.vsp).handler
    assert handler is not None
    server = handler.server

    def decode() -> object:
        return server.receive(payload, vram_ok=lambda gpa, size: False)

    replies, events = benchmark(decode)
    assert not replies and len(events) == 1 and server.errors.total() == 0


# --- the VNC server's encodings of a full frame ------------------------------------

NOVNC_FORMAT = rfb.PixelFormat(32, 24, False, True, 255, 255, 255, 0, 8, 16)  # RGBX
ENCODINGS = {
    "raw": (rfb.ENC_RAW,),
    "zrle": (rfb.ENC_ZRLE,),
    "hextile": (ENC_HEXTILE,),
    "tight-zlib": (ENC_TIGHT,),
    "tight-jpeg": (ENC_TIGHT, -26),  # noVNC's default quality level
}


@pytest.mark.parametrize("fmt", [rfb.DEFAULT_FORMAT, NOVNC_FORMAT], ids=["bgrx", "novnc-rgbx"])
@pytest.mark.parametrize("name", sorted(ENCODINGS))
def test_vnc_encode_full_frame(benchmark, name: str, fmt: rfb.PixelFormat) -> None:  # type: ignore[no-untyped-def]
    """One full-frame rectangle in each encoding, as the server writes it:
    into the client's reused buffer, zlib streams carried on (two frames
    alternating, as the child animates)."""
    pair = frames(WIDTH, HEIGHT)
    encoder = Encoder()
    encoder.set_format(fmt)
    encoder.set_encodings(ENCODINGS[name])
    turn = [0]

    def encode() -> int:
        turn[0] ^= 1
        encoder.out.reset()
        return encoder.rect(0, 0, pair[turn[0]])

    assert benchmark(encode) >= 1 and encoder.out.size > 0


def test_vnc_update_send_ready(benchmark) -> None:  # type: ignore[no-untyped-def]
    """Screen.capture straight into the encoder (Raw's path): no frame-sized temporary."""
    screen = Screen(WIDTH, HEIGHT)
    screen.update(vram_frame())
    encoder = Encoder()

    def raw(cap: Capture) -> None:
        encoder.work.reset()
        encoder.pixel_bytes(cap.pixels[0], encoder.work)

    benchmark(screen.capture, [(0, 0, WIDTH, HEIGHT)], 0, encode=raw)
    assert encoder.work.size == FRAME_BYTES


# --- the cross-process runner, smoke test ------------------------------------------


def test_video_bench_runs_and_cleans_up(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "video.md"
    only = [video_bench.REFERENCE, video_bench.FULL, video_bench.RAW]
    args = ["--quick", "--repeats", "1", "--seconds", "0.1", "--markdown", str(out)]
    video_bench.main([*args, *(a for name in only for a in ("--only", name))])
    assert "VNC client, Raw" in capsys.readouterr().out
    assert out.read_text().count("\n| ") == 2 + len(only)  # header, rule, rows
    assert not multiprocessing.active_children()
