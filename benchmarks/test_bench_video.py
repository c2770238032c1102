"""pytest-benchmark tests of the video path's pieces in one process and one
thread: the parent's Screen copy of dirty rectangles, a DIRT's whole trip
from a Framebuffer through an in-process channel to the VideoVsp and its
Screen, and the VNC server's Raw and ZRLE encodings of a full frame. No
process wakes another: these are CPU costs, the floor of the cross-process
figures.

    .venv/bin/pytest benchmarks/test_bench_video.py --benchmark-enable -p no:cacheprovider

The cross-process figures are `python -m benchmarks.video_bench`.
"""

from __future__ import annotations

import mmap
import multiprocessing
import random
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest

from benchmarks import video_bench
from benchmarks.video_bench import BATCH, FRAME_BYTES, HEIGHT, TILE, WIDTH, Pixels, frames
from vmbus import messages as m
from vmbus.channel import Channel
from vmbus.device import OpenContext
from vmbus.guest import GuestDevice
from vmbus.memory import PAGE_SIZE, GuestMemory, PageAllocator
from vmbus.testing import ring_buffer
from vmbus.transport import Signal
from vsc.video import Framebuffer
from vsp.video import VideoVsp, rfb
from vsp.video.screen import Rect, Screen

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
    assert np.array_equal(screen.frame_copy()[y1:y2, x1:x2], pixels[y1:y2, x1:x2])


def test_screen_capture_full_frame(benchmark) -> None:  # type: ignore[no-untyped-def]
    """What the VNC server copies out of the Screen for each full update."""
    screen = Screen(WIDTH, HEIGHT)
    screen.update(vram_frame())
    capture = benchmark(screen.capture, [(0, 0, WIDTH, HEIGHT)], 0)
    assert capture.pixels[0].shape == (HEIGHT, WIDTH, 4)


# --- a DIRT's whole trip, child to Screen ------------------------------------------


class PumpedChannel(Channel):
    """The guest's end of an in-process channel whose waits serve the VSP."""

    serve: Any = None

    def wait(self, deadline: float | None) -> None:
        self.serve()

    def _sleep(self, deadline: float | None, what: str) -> None:
        self.serve()

    def close(self) -> None:
        pass


class Loopback:
    """Just enough of a GuestDevice (and its Guest) for a Framebuffer: guest
    memory for VRAM, GPADLs the VideoVsp can check, and open() wiring a
    PumpedChannel to the VSP."""

    def __init__(self, vsp: VideoVsp) -> None:
        self.vsp = vsp
        self.memory = GuestMemory.create(vsp.vram_size + 4 * MiB, name="video-bench")
        self.allocator = PageAllocator(self.memory)
        self.guest, self.relid = self, 1
        self.offer = SimpleNamespace(mmio_megabytes=vsp.vram_size >> 20)
        self.gpadls: dict[int, m.Gpadl] = {}
        self.host: Channel | None = None

    def create_gpadl(self, relid: int, pfns: list[int]) -> int:
        handle = len(self.gpadls) + 1
        self.gpadls[handle] = m.Gpadl(relid, handle, len(pfns) * PAGE_SIZE, 0, tuple(pfns))
        return handle

    def teardown_gpadl(self, relid: int, handle: int) -> None:
        del self.gpadls[handle]

    def open(self, send_size: int, receive_size: int) -> Channel:
        outbound, inbound = ring_buffer(send_size), ring_buffer(receive_size)
        to_host, to_guest = Signal(), Signal()
        guest = PumpedChannel(outbound, inbound, to_host, to_guest, spin_seconds=0.0)
        self.host = Channel(inbound, outbound, to_guest, to_host, spin_seconds=0.0)
        context = OpenContext(
            offer=self.vsp.offers()[0],
            userdata=b"",
            memory=self.memory,
            ring_pfns=frozenset(),  # the rings are not in guest memory here
            partition="bench",
            add_offer=lambda offer: None,
            gpadls=self.gpadls,
            watch=lambda fd, callback: None,
            unwatch=lambda fd: None,
        )
        self.vsp.open(self.host, context)
        guest.serve = self.serve
        return guest

    def serve(self) -> None:
        assert self.host is not None
        self.host.service(self.vsp.on_packet)


@pytest.fixture
def loopback() -> Iterator[tuple[Framebuffer, Loopback]]:
    vsp = VideoVsp(Screen(WIDTH, HEIGHT))
    device = Loopback(vsp)
    fb = Framebuffer(cast(GuestDevice, device), WIDTH, HEIGHT)
    fb.wait_ready()
    fb.pixels[:] = frames(WIDTH, HEIGHT)[0]
    yield fb, device
    fb.close()
    vsp.close()  # drops its VRAM view
    device.memory.close()


@pytest.mark.parametrize("rects", [0, 1, BATCH], ids=["full", "one-64x64", "64-64x64"])
def test_dirt_to_screen(benchmark, loopback, rects: int) -> None:  # type: ignore[no-untyped-def]
    """Framebuffer.update(), then the VSP serves the channel: encode, ring,
    decode, validate and Screen.update (the child's pixel writes left out)."""
    fb, device = loopback
    dirty = places(rects)

    def trip() -> None:
        fb.update(*dirty)
        device.serve()

    before = device.vsp.frames
    benchmark(trip)
    assert device.vsp.frames > before and device.vsp.server.errors.total() == 0
    assert np.array_equal(device.vsp.screen.frame_copy(), fb.pixels)


@pytest.mark.parametrize("rects", [1, BATCH], ids=["one-64x64", "64-64x64"])
def test_dirt_encode(benchmark, loopback, rects: int) -> None:  # type: ignore[no-untyped-def]
    """The child's side of a DIRT: SynthvidClient.dirt (the VSC's message)."""
    fb, _ = loopback
    dirty = places(rects)
    assert len(benchmark(fb.client.dirt, *dirty)) == 10 + 16 * rects + 8


@pytest.mark.parametrize("rects", [1, BATCH], ids=["one-64x64", "64-64x64"])
def test_dirt_decode(benchmark, loopback, rects: int) -> None:  # type: ignore[no-untyped-def]
    """The parent's side before the copy: SynthvidServer.receive decodes and clips."""
    fb, device = loopback
    payload = fb.client.dirt(*places(rects))
    server = device.vsp.server

    def decode() -> object:
        return server.receive(payload, vram_ok=device.vsp.vram_ok)

    replies, events = benchmark(decode)
    assert not replies and len(events) == 1 and server.errors.total() == 0


# --- the VNC server's encodings of a full frame ------------------------------------


def test_vnc_raw_encode(benchmark) -> None:  # type: ignore[no-untyped-def]
    """Raw in the server's own pixel format: mask the unused byte, to bytes."""
    pixels = vram_frame()
    data = benchmark(rfb.encode_pixels, rfb.DEFAULT_FORMAT, pixels)
    assert len(data) == FRAME_BYTES


def test_vnc_update_assembly(benchmark) -> None:  # type: ignore[no-untyped-def]
    """Framing a Raw update as VncServer._update does: the rectangle's parts
    joined, then the message header prepended (two copies of the frame)."""
    body = rfb.encode_pixels(rfb.DEFAULT_FORMAT, vram_frame())
    header = struct.pack(">HHHHi", 0, 0, WIDTH, HEIGHT, rfb.ENC_RAW)

    def assemble() -> bytes:
        return struct.pack(">BxH", 0, 1) + b"".join([header, body])

    assert len(benchmark(assemble)) == FRAME_BYTES + 16


def test_vnc_zrle_tiles(benchmark) -> None:  # type: ignore[no-untyped-def]
    """ZRLE before deflate: pixel values, then 64x64 tiles (all raw for this frame)."""
    pixels = vram_frame()

    def tiles() -> bytes:
        return rfb.zrle_tiles(rfb.DEFAULT_FORMAT, rfb.pixel_values(rfb.DEFAULT_FORMAT, pixels))

    assert len(benchmark(tiles)) > 0


def test_vnc_zrle_deflate(benchmark) -> None:  # type: ignore[no-untyped-def]
    """ZRLE's deflate of those tiles on the connection's stream (zlib's default level)."""
    fmt = rfb.DEFAULT_FORMAT
    data = rfb.zrle_tiles(fmt, rfb.pixel_values(fmt, vram_frame()))
    stream = zlib.compressobj()

    def deflate() -> bytes:
        return stream.compress(data) + stream.flush(zlib.Z_SYNC_FLUSH)

    assert len(benchmark(deflate)) > 0


# --- the cross-process runner, smoke test ------------------------------------------


def test_video_bench_runs_and_cleans_up(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "video.md"
    only = [video_bench.REFERENCE, video_bench.FULL, video_bench.RAW]
    args = ["--quick", "--repeats", "1", "--seconds", "0.1", "--markdown", str(out)]
    video_bench.main([*args, *(a for name in only for a in ("--only", name))])
    assert "VNC client, Raw" in capsys.readouterr().out
    assert out.read_text().count("\n| ") == 2 + len(only)  # header, rule, rows
    assert not multiprocessing.active_children()
