"""The video VSP in process: through `VspHarness` with the guest spoken by
hand (a slow reader, VRAM grants), and the real `Framebuffer` against it
through `loopback`."""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from vnc_client import opaque

from vmbus import guid
from vmbus.guest import Guest, GuestDevice
from vmbus.memory import PAGE_SIZE
from vmbus.protocols import video as sv
from vmbus.testing import VspHarness, loopback
from vsc.video import Framebuffer
from vsp.video import Screen, VideoHandler, VideoVsp

GREY, DARK = (0x7F, 0x7F, 0x7F, 0xFF), (0x40, 0x40, 0x40, 0xFF)  # as the Screen keeps them

VRAM_MB = 2  # 640x480 at most; keeps the guest's memory small
MODES = [(640, 480)]
WIDTH, HEIGHT = 320, 240


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class HandGuest:
    """The guest's end of the harness, spoken with a SynthvidClient."""

    def __init__(self, harness: VspHarness) -> None:
        self.harness, self.client = harness, sv.SynthvidClient()
        self.received: list[tuple[sv.MessageType | int, memoryview]] = []

    def send(self, *payloads: bytes) -> None:
        for payload in payloads:
            self.harness.guest.send(payload, timeout=1)

    def read(self) -> list[bytes]:
        """Everything the VSP has sent; the client's answers to it."""
        answers: list[bytes] = []
        while (packet := self.harness.guest.poll()) is not None:
            self.received.append(sv.decode_message(bytes(packet.payload)))
            answers += self.client.receive(packet.payload)
        return answers

    def exchange(self, *payloads: bytes, done: Callable[[], bool]) -> None:
        pending = list(payloads)
        for _ in range(16):
            self.send(*pending)
            self.harness.pump()
            pending = self.read()
            if done() and not pending:
                return
        raise AssertionError("the VSP did not answer")

    def ready(self, gpa: int) -> None:
        """Linux's sequence up to DIRT, VRAM at `gpa`."""
        self.exchange(self.client.start(), done=lambda: self.client.negotiated)
        self.exchange(self.client.vram_location(gpa), done=lambda: self.client.vram_acked)
        mode = [*self.client.hide_pointer(), self.client.situation_update(WIDTH, HEIGHT)]
        self.exchange(*mode, done=lambda: self.client.dirt_needed)


@pytest.fixture
def harness() -> Iterator[VspHarness]:
    vsp = VideoVsp(Screen(64, 64), vram_megabytes=VRAM_MB, resolutions=MODES)
    with VspHarness(vsp, memory_size=8 << 20, ring_size=16 << 10) as harness:
        yield harness


def handler_of(harness: VspHarness) -> VideoHandler:
    assert isinstance(harness.handler, VideoHandler)
    return harness.handler


def test_guest_that_stops_reading_keeps_its_channel(harness: VspHarness) -> None:
    """Answers wait for room (the reserve), FEATURE_CHANGE for the backlog:
    a guest that floods requests and reads nothing until both rings are full
    loses no answer and keeps its channel."""
    guest = HandGuest(harness)
    guest.exchange(guest.client.start(), done=lambda: guest.client.negotiated)
    resolutions = sv.encode_message(
        sv.MessageType.RESOLUTION_REQUEST, sv.SynthvidResolutionReq().pack()
    )
    pending = collections.deque([resolutions] * 1000 + [guest.client.situation_update(64, 48)])
    reading = False
    for _ in range(10_000):
        while pending and harness.guest.try_send(pending[0]):
            pending.popleft()
            harness.pump()
        if pending and not reading:  # both rings full: the VSP waits for room
            assert harness.host.reader.bytes_available > 0
            reading = True
        if reading and (packet := harness.guest.poll()) is not None:  # one at a time
            guest.received.append(sv.decode_message(bytes(packet.payload)))
            guest.client.receive(packet.payload)
        harness.pump()
        drained = not harness.host.reader.bytes_available and not handler_of(harness).backlog
        if not pending and drained and not harness.guest.reader.bytes_available:
            break
    assert reading and not pending
    kinds = [kind for kind, _ in guest.received]
    assert kinds.count(sv.MessageType.RESOLUTION_RESPONSE) == 1001  # + negotiation's
    assert kinds[-2:] == [sv.MessageType.SITUATION_UPDATE_ACK, sv.MessageType.FEATURE_CHANGE]
    assert handler_of(harness).server.errors.total() == 0 and guest.client.dirt_needed


def test_guest_places_vram_outside_its_grants(harness: VspHarness) -> None:
    guest = HandGuest(harness)
    guest.exchange(guest.client.start(), done=lambda: guest.client.negotiated)
    vram_pages = (VRAM_MB << 20) // PAGE_SIZE
    short = harness.grant(vram_pages - 1)  # one page too few
    ungranted = harness.allocate(vram_pages)
    rings = 0  # the pages standing for the channel's rings
    for gpa in (short.pfns[0] * PAGE_SIZE, ungranted[0] * PAGE_SIZE, rings):
        guest.send(guest.client.vram_location(gpa))
        harness.pump()
        assert guest.read() == [] and not guest.client.vram_acked
    assert handler_of(harness).server.errors["bad_vram"] == 3
    assert harness.context.peer_log.count == 3  # counted and logged, rate-limited
    granted = harness.grant(vram_pages)
    guest.exchange(
        guest.client.vram_location(granted.pfns[0] * PAGE_SIZE),
        done=lambda: guest.client.vram_acked,
    )


def test_guest_that_revokes_its_vram_grant_is_no_longer_read(harness: VspHarness) -> None:
    guest = HandGuest(harness)
    grant = harness.grant((VRAM_MB << 20) // PAGE_SIZE)
    gpa = grant.pfns[0] * PAGE_SIZE
    guest.ready(gpa)
    vram = np.frombuffer(harness.memory.view(gpa, WIDTH * HEIGHT * 4), np.uint8)
    vram[:] = 0x7F
    guest.send(guest.client.dirt((0, 0, 8, 8)))
    harness.pump()
    screen = handler_of(harness).screen
    assert (screen.frame_copy()[:8, :8] == GREY).all()
    del harness.gpadls[grant.gpadl]  # the guest tore the GPADL down
    vram[:] = 0x11
    guest.send(guest.client.dirt((0, 0, 8, 8)))
    harness.pump()
    assert (screen.frame_copy()[:8, :8] == GREY).all() and handler_of(harness).vram is None
    del vram


def test_unchanged_mode_keeps_the_frame(harness: VspHarness) -> None:
    """Linux re-sends its mode after FEATURE_CHANGE: that is no resize (which
    would make every VNC client fetch a whole black frame)."""
    guest = HandGuest(harness)
    guest.ready(harness.grant((VRAM_MB << 20) // PAGE_SIZE).pfns[0] * PAGE_SIZE)
    screen = handler_of(harness).screen
    generation = screen.geometry()[0]
    guest.send(guest.client.situation_update(WIDTH, HEIGHT))
    harness.pump()
    assert screen.geometry() == (generation, WIDTH, HEIGHT)


# --- the real Framebuffer, in process ------------------------------------------------


@contextlib.contextmanager
def served(vsp: VideoVsp) -> Iterator[Framebuffer]:
    """A Framebuffer in this process, `vsp` serving it from a worker loop."""
    devices: list[GuestDevice] = []

    def register(guest: Guest) -> None:
        guest.register(guid.SYNTHVID, devices.append)

    with loopback([vsp], register):
        fb = Framebuffer(devices[0], WIDTH, HEIGHT)
        fb.wait_ready()
        yield fb
        fb.close()


@pytest.fixture
def framebuffer() -> Iterator[tuple[Framebuffer, VideoVsp]]:
    vsp = VideoVsp(Screen(64, 64), vram_megabytes=VRAM_MB, resolutions=MODES)
    with served(vsp) as fb:
        yield fb, vsp


def test_framebuffer_draws_onto_the_screen(framebuffer: tuple[Framebuffer, VideoVsp]) -> None:
    fb, vsp = framebuffer
    assert (vsp.screen.width, vsp.screen.height) == (WIDTH, HEIGHT)
    rng = np.random.default_rng(1)
    fb.pixels[:] = rng.integers(0, 256, fb.pixels.shape, dtype=np.uint8)
    fb.update()
    wait_for(lambda: np.array_equal(vsp.screen.frame_copy(), opaque(fb.pixels)))
    fb.pixels[10:20, 30:40] = 0xAB
    fb.update((30, 10, 40, 20))
    wait_for(lambda: np.array_equal(vsp.screen.frame_copy(), opaque(fb.pixels)))
    assert vsp.frames >= 2 and vsp.errors.total() == 0


def test_framebuffer_changes_mode(framebuffer: tuple[Framebuffer, VideoVsp]) -> None:
    fb, vsp = framebuffer
    fb.set_mode(160, 120)
    fb.pixels[:] = 0x40
    fb.update()
    wait_for(lambda: vsp.screen.width == 160 and (vsp.screen.frame_copy() == DARK).all())
    with pytest.raises(ValueError):
        fb.set_mode(1024, 1024)  # 4 MiB: more than its 2 MiB of VRAM


def test_guest_streaming_faster_than_anyone_watches_is_copied_at_the_vsps_pace() -> None:
    """A guest that sends DIRTs as fast as it can, with nobody waiting for
    newer pixels, is copied at most max_copies_per_second (its pending
    damage by the worker loop's timer), and its last frame still arrives."""
    rate, seconds = 20.0, 0.5
    vsp = VideoVsp(
        Screen(64, 64), vram_megabytes=VRAM_MB, resolutions=MODES, max_copies_per_second=rate
    )
    copies: list[float] = []
    with served(vsp) as fb:
        vsp.screen.add_listener(lambda rects: copies.append(time.monotonic()))
        start, sent = time.monotonic(), 0
        while time.monotonic() - start < seconds:
            sent += 1
            fb.pixels[:] = sent & 0xFF
            fb.update()
        expected = opaque(fb.pixels)
        wait_for(lambda: np.array_equal(vsp.screen.frame_copy(), expected))
    assert sent > 10 * rate * seconds  # the guest outran the copies
    assert len(copies) <= rate * (copies[-1] - start) + 2
    assert vsp.handler is not None and vsp.handler.throttled > 0
