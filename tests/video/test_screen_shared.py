"""The Screen across processes: its pickled copy (what a VM's worker gets)
draws into the parent's memory; the parent validates what it reads back,
its listeners, captures and VNC clients see the pixels, and its requests
reach the copy through the socket pair."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import numpy as np
import pytest
from vnc_client import BLACK, RAW, connect, opaque, pattern, rgb_values, wait_for

from vmbus import guid, handoff
from vmbus.errors import UsageError
from vmbus.guest import Guest, GuestDevice
from vmbus.testing import loopback
from vsc.video import Framebuffer
from vsp.video import Screen, VideoVsp, VncServer
from vsp.video.screen import CONTROL_SIZE, Rect
from vsp.video.shared import FRAMES, MAX_DIMENSION


def handed(obj: object) -> object:
    """`obj` through vmbus.handoff, in process: the copy gets descriptors of its own."""
    data, fds = handoff.dumps(obj)
    return handoff.loads(data, [os.dup(fd) for fd in fds])


class Damage:
    """A listener that lets a test wait for the rectangles it was told about."""

    def __init__(self) -> None:
        self.rects: list[Rect] = []
        self.changed = threading.Condition()

    def __call__(self, rects: list[Rect]) -> None:
        with self.changed:
            self.rects += rects
            self.changed.notify_all()

    def wait(self, rect: Rect) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: rect in self.rects, timeout=10)


@pytest.fixture
def pair() -> Iterator[tuple[Screen, Screen]]:
    parent = Screen(40, 30)
    worker = handed(parent)
    assert isinstance(worker, Screen)
    yield parent, worker
    worker.close()
    parent.close()


def test_the_copy_draws_into_the_parents_frame(pair: tuple[Screen, Screen]) -> None:
    parent, worker = pair
    damage = Damage()
    parent.add_listener(damage)
    pixels = pattern(30, 40, seed=3)
    worker.update(pixels, [(2, 3, 20, 10)])
    damage.wait((2, 3, 20, 10))
    assert (parent.frame_copy()[3:10, 2:20] == opaque(pixels[3:10, 2:20])).all()
    assert (parent.frame_copy()[10:] == BLACK).all()
    parent.remove_listener(damage)


def test_a_resize_in_the_copy_reaches_the_parent(pair: tuple[Screen, Screen]) -> None:
    parent, worker = pair
    damage = Damage()
    parent.add_listener(damage)
    generation = parent.geometry()[0]
    worker.resize(64, 16)
    damage.wait((0, 0, 64, 16))
    assert parent.geometry() == (generation + 1, 64, 16)
    capture = parent.capture([(0, 0, 1, 1)], generation)  # stale: the whole new frame
    assert capture.rects == [(0, 0, 64, 16)]
    parent.remove_listener(damage)


def test_the_copy_never_fills_the_frame_the_parent_reads(pair: tuple[Screen, Screen]) -> None:
    """A read in progress (the parent pinned the newest frame) holds the
    writer up no more than it lets the writer change what is read: each
    copy fills one of the other frames and becomes the newest."""
    parent, worker = pair
    shm = parent._shm
    first = pattern(30, 40, seed=1)
    worker.update(first)
    index, *_ = shm.pin_front()  # a capture in progress
    seq = shm.frame_seq(index)
    for seed in range(2, 8):
        worker.update(pattern(30, 40, seed=seed), [(seed, 0, seed + 10, 30)])
        assert shm.front != index and shm.frame_seq(index) == seq
    assert (shm.frame(index, 40, 30) == opaque(first)).all()  # still what was pinned
    shm.pin(None)
    newest = opaque(first)
    for seed in range(2, 8):
        newest[:, seed : seed + 10] = opaque(pattern(30, 40, seed=seed))[:, seed : seed + 10]
    assert (parent.frame_copy() == newest).all()  # every frame caught up on the others
    assert len({shm.frame_seq(k) for k in range(FRAMES)}) > 1  # all of them took turns
    parent.request_size(800, 600)
    assert worker.read_control() == [(CONTROL_SIZE, 800, 600)]


def test_a_hostile_header_is_bounded_by_the_parent(pair: tuple[Screen, Screen]) -> None:
    parent, worker = pair
    damage = Damage()
    parent.add_listener(damage)
    words = worker._shm.words
    words[3], words[4] = MAX_DIMENSION + 1, 7  # over the bound
    assert parent.geometry()[1:] == (1, 1)
    assert parent.frame_copy().shape == (1, 1, 4)
    words[3], words[4] = 40, 30
    words[16], words[17] = 5 | 5 << 32, 10**6 | 10**6 << 32  # a rectangle past the frame
    words[5] += np.uint64(1)
    os.eventfd_write(worker._events, 1)
    damage.wait((5, 5, 40, 30))  # clipped to the frame
    words[9] = 500 | 500 << 16  # a cursor over CURSOR_MAX
    assert parent.cursor().pixels.shape == (0, 0, 4)
    words[1] += np.uint64(1)  # a writer that never finishes: a torn copy, not a hang
    parent.frame_copy()
    assert parent.torn == 1
    parent.remove_listener(damage)


def test_a_worker_that_shrinks_the_screens_memory_is_refused(pair: tuple[Screen, Screen]) -> None:
    """Shrunk, the parent's reads of the frame would fault (SIGBUS): the
    memfd is sealed at its size before any worker holds it."""
    parent, worker = pair
    size = os.fstat(worker._shm.fd).st_size
    for length in (0, size // 2, size + (1 << 20)):
        with pytest.raises(PermissionError):
            os.ftruncate(worker._shm.fd, length)
    assert os.fstat(parent._shm.fd).st_size == size
    assert parent.frame_copy().shape == (30, 40, 4)


def test_a_malformed_request_is_dropped(pair: tuple[Screen, Screen]) -> None:
    parent, worker = pair
    parent._control.send(b"short")
    parent.request_size(1, 2)
    assert worker.read_control() == [(CONTROL_SIZE, 1, 2)] and worker.dropped_controls == 1


def test_the_cursor_crosses(pair: tuple[Screen, Screen]) -> None:
    parent, worker = pair
    shape = np.arange(8 * 6 * 4, dtype=np.uint8).reshape(6, 8, 4)
    worker.set_cursor(shape, 3, 2)
    cursor = parent.cursor()
    assert (cursor.hot_x, cursor.hot_y, cursor.serial) == (3, 2, 1)
    assert (cursor.pixels == shape).all()


def test_a_handed_video_vsp_is_seen_by_a_vnc_client_of_the_parent() -> None:
    """The round trip a worker process makes, in process: the VSP served is
    the pickled copy; the parent's Screen and its VNC server show its pixels."""
    vsp = VideoVsp(Screen(64, 64), vram_megabytes=2, resolutions=[(640, 480)])
    served = handed(vsp)
    assert isinstance(served, VideoVsp) and served.screen is not vsp.screen
    devices: list[GuestDevice] = []

    def register(guest: Guest) -> None:
        guest.register(guid.SYNTHVID, devices.append)

    with VncServer(vsp.screen, port=0, authenticate=False) as server, loopback([served], register):
        fb = Framebuffer(devices[0], 320, 240)
        fb.wait_ready()
        fb.pixels[:] = pattern(240, 320, seed=5)
        fb.update()
        wait_for(lambda: np.array_equal(vsp.screen.frame_copy(), opaque(fb.pixels)))
        client = connect(server, RAW)
        client.request(False)
        assert client.read_update() == [(0, 0, 320, 240, RAW)]
        assert (client.fb == rgb_values(fb.pixels)).all()
        assert served.stats()["frames"] >= 1 and served.stats()["mode"][:2] == [320, 240]
        # The pointer shape the guest set (Linux's hidden 1x1 one) crossed too.
        wait_for(lambda: vsp.screen.cursor().serial >= 1)
        cursor = vsp.screen.cursor()
        assert cursor.pixels.tolist() == [[[0, 1, 1, 1]]] and served.stats()["cursor_shapes"] >= 1
        fb.close()
        client.close()
    served.screen.close()


def test_a_screen_smaller_than_the_vram_is_refused() -> None:
    with pytest.raises(UsageError):
        VideoVsp(Screen(64, 64, capacity=1 << 20), vram_megabytes=2)


def test_a_viewers_size_resizes_a_guest_that_follows_the_host() -> None:
    """SetDesktopSize's path without the VNC part: Screen.request_size in the
    parent, the VSP's FEATURE_CHANGE, the guest's new RESOLUTION_REQUEST and
    the mode it then sets."""
    vsp = VideoVsp(Screen(64, 64), vram_megabytes=2, resolutions=[(640, 480), (320, 240)])
    served = handed(vsp)
    assert isinstance(served, VideoVsp)
    devices: list[GuestDevice] = []

    def register(guest: Guest) -> None:
        guest.register(guid.SYNTHVID, devices.append)

    with loopback([served], register):
        fb = Framebuffer(devices[0], 320, 240, follow_host=True)
        fb.wait_ready()
        vsp.screen.request_size(500, 2000)  # taller than any mode: clamped to 480
        wait_for(lambda: fb.poll() or fb.mode_changes > 0)
        assert (fb.width, fb.height) == (500, 480)
        fb.pixels[:] = 0x5A
        fb.update()
        wait_for(lambda: vsp.screen.geometry()[1:] == (500, 480))
        wait_for(lambda: bool((vsp.screen.frame_copy() == (0x5A, 0x5A, 0x5A, 0xFF)).all()))
        assert served.stats()["size_requests"] == [[500, 2000]]
        fb.close()
    served.screen.close()


def test_a_guest_that_does_not_follow_keeps_its_mode() -> None:
    vsp = VideoVsp(Screen(64, 64), vram_megabytes=2, resolutions=[(640, 480), (320, 240)])
    devices: list[GuestDevice] = []

    def register(guest: Guest) -> None:
        guest.register(guid.SYNTHVID, devices.append)

    with loopback([vsp], register):
        fb = Framebuffer(devices[0], 320, 240)  # as Linux: re-sends its own mode
        fb.wait_ready()
        vsp.screen.request_size(640, 480)
        wait_for(lambda: vsp.handler is not None and vsp.handler.size_requests == [(640, 480)])
        for _ in range(20):
            fb.poll()
        assert (fb.width, fb.height) == (320, 240) and fb.mode_changes == 0
        fb.close()


def test_vnc_servers_hear_the_copys_damage_by_doorbell_or_listener(
    pair: tuple[Screen, Screen],
) -> None:
    """The first server reads the ring when the doorbell rings; a second one
    on the same Screen falls back to a listener; both send the change."""
    parent, worker = pair
    first = VncServer(parent, port=0, authenticate=False)
    second = VncServer(parent, port=0, authenticate=False)
    with first, second:
        assert first._doorbell is not None and second._doorbell is None
        clients = [connect(server, RAW) for server in (first, second)]
        for client in clients:
            client.request(False)
            client.read_update()
            client.request(True)  # waits for a change: the viewer wants newer pixels
        # Both servers hold their incremental request, so both have finished
        # reading the first frame: a change while a read is still in progress
        # (client.read_update returns once the bytes have arrived) leaves the
        # whole frame dirty, and the next update would resend it all.
        sessions = [s for server in (first, second) for s in server._clients.values()]
        wait_for(lambda: all(s.want_incr is not None for s in sessions) and parent.wanted)
        pixels = pattern(30, 40, seed=11)
        worker.update(pixels, [(4, 5, 30, 25)])
        for client in clients:
            assert client.read_update() == [(4, 5, 26, 20, RAW)]
            assert (client.fb[5:25, 4:30] == rgb_values(pixels[5:25, 4:30])).all()
            client.close()
    assert parent.claim_doorbell() is not None  # released by the first server's stop
