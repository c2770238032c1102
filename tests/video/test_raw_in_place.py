"""Raw straight from the shared frame (`Session._update_in_place`) against
Raw copied out first: the same bytes on the wire for any screen, requests
and socket room; what a torn read or a raising encoder leaves behind."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vnc_client import BLACK, opaque, pattern

from vmbus import handoff
from vsp.video.screen import Rect, Screen
from vsp.video.session import Session

W, H = 48, 32


def session(sock: Any, screen: Screen, *, in_place: bool) -> Session:
    """A Raw client of the server's own format, past the handshake."""
    client = Session(sock, "test", screen.geometry()[0])
    client.state = "normal"
    client.width, client.height = screen.width, screen.height
    client.in_place = in_place
    return client


def wire(client: Session, peer: socket.socket | None) -> bytes:
    """What the update put on the wire, and what it queued behind."""
    sent = b""
    if peer is not None:
        peer.setblocking(False)
        while True:
            try:
                chunk = peer.recv(1 << 20)
            except BlockingIOError:
                break
            sent += chunk
    queued = b"".join(bytes(view) for view in client.out)
    client.out.clear()
    return sent + queued


@pytest.fixture
def pairs() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def pair(opened: list[socket.socket], room: int | None = None) -> tuple[socket.socket, ...]:
    ours, peer = socket.socketpair()
    opened += [ours, peer]
    ours.setblocking(False)
    if room is not None:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, room)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, room)
    return ours, peer


RECTS = st.lists(
    st.tuples(st.integers(-4, W), st.integers(-4, H), st.integers(0, W + 4), st.integers(0, H + 4)),
    max_size=5,
)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    damage=RECTS,
    full=st.one_of(st.none(), st.tuples(st.integers(0, W), st.integers(0, H))),
    resize=st.booleans(),
    desktop_size=st.booleans(),
)
def test_raw_in_place_sends_the_bytes_of_the_copied_raw(
    seed: int,
    damage: list[Rect],
    full: tuple[int, int] | None,
    resize: bool,
    desktop_size: bool,
) -> None:
    screen = Screen(W, H)
    opened: list[socket.socket] = []
    try:
        ours, peer = pair(opened)
        direct, copied = session(ours, screen, in_place=True), session(None, screen, in_place=False)
        if resize:
            screen.resize(W - 7, H - 5)  # both were told the old generation
        screen.update(pattern(H, W, seed))
        for client in (direct, copied):
            if desktop_size:
                client.encoder.set_encodings((0, -223))
            for rect in damage:
                client.add_dirty(rect)
            client.want_incr = (0, 0, W, H)
            if full is not None:
                client.want_full = (full[0] // 2, full[1] // 2, full[0], full[1])
        queued = [client.update(screen) for client in (direct, copied)]
        assert queued[0] == queued[1]
        assert wire(direct, peer) == wire(copied, None)
        assert direct.dirty == copied.dirty
        assert (direct.width, direct.height) == (copied.width, copied.height)
    finally:
        for sock in opened:
            sock.close()
        screen.close()


def test_raw_in_place_queues_what_the_socket_does_not_take(pairs: list[socket.socket]) -> None:
    screen = Screen(256, 256)
    screen.update(pattern(256, 256, 9))
    ours, peer = pair(pairs, room=16 * 1024)  # a 256 KiB update does not fit
    direct, copied = session(ours, screen, in_place=True), session(None, screen, in_place=False)
    for client in (direct, copied):
        client.want_full = (0, 0, 256, 256)
        assert client.update(screen)
    assert direct.out, "the socket took the whole update: the test needs less room"
    assert wire(direct, peer) == wire(copied, None)


def test_raw_in_place_sends_the_padding_a_viewer_reads_as_alpha(
    pairs: list[socket.socket],
) -> None:
    screen = Screen(8, 4)
    vram = pattern(4, 8, 3)
    vram[..., 3] = 0  # what a guest leaves in the unused byte
    screen.update(vram, [(0, 0, 4, 4)])
    ours, peer = pair(pairs)
    client = session(ours, screen, in_place=True)
    client.want_full = (0, 0, 8, 4)
    assert client.update(screen)
    pixels = np.frombuffer(wire(client, peer)[16:], np.uint8).reshape(4, 8, 4)
    assert (pixels[:, :4] == opaque(vram[:, :4])).all()
    assert (pixels[:, 4:] == BLACK).all()


class WriterMidSend:
    """A socket whose send lets the worker's copy of the Screen change the
    frame, as the worker could mid-send; `ignore_pin`: a hostile worker
    that rewrites the very frame being sent."""

    def __init__(self, writer: Screen, *, ignore_pin: bool) -> None:
        self.writer, self.ignore_pin, self.sent = writer, ignore_pin, b""

    def sendmsg(self, buffers: list[memoryview]) -> int:
        shm = self.writer._shm
        if self.ignore_pin:
            index = shm.pinned
            assert index is not None
            shm.begin_fill(index)
            shm.frame(index, W, H)[:4, :4] = 0
            shm.end_fill(index)
        else:
            self.writer.update(pattern(H, W, 5), [(0, 0, 4, 4)])
        data = b"".join(bytes(b) for b in buffers)
        self.sent += data
        return len(data)


@pytest.mark.parametrize("ignore_pin", [False, True], ids=["writer", "hostile_writer"])
def test_a_frame_changed_during_an_in_place_send(ignore_pin: bool) -> None:
    """The writer fills another frame: what is sent holds still. A writer
    that rewrites the frame being sent anyway: the update goes out torn and
    its rectangles stay dirty, to be sent again."""
    screen = Screen(W, H)
    data, fds = handoff.dumps(screen)  # the worker's copy draws into the same memory
    writer = handoff.loads(data, [os.dup(fd) for fd in fds])
    assert isinstance(writer, Screen)
    try:
        writer.update(pattern(H, W, 4))
        sock = WriterMidSend(writer, ignore_pin=ignore_pin)
        client = session(sock, screen, in_place=True)
        client.add_dirty((0, 0, 16, 16))
        client.want_incr = (0, 0, W, H)
        assert client.update(screen)
        assert len(sock.sent) == 16 + 16 * 16 * 4  # the update went out
        if ignore_pin:
            assert client.dirty == [(0, 0, 16, 16)] and screen.torn == 1
        else:
            assert client.dirty == [] and screen.torn == 0
            rows = np.frombuffer(sock.sent[16:], np.uint8).reshape(16, 16, 4)
            assert (rows == opaque(pattern(H, W, 4))[:16, :16]).all()  # the frame before
    finally:
        writer.close()
        screen.close()


class Broken:
    def sendmsg(self, buffers: list[memoryview]) -> int:
        raise ConnectionResetError("gone")


def test_a_send_that_fails_mid_read_does_not_leave_the_frame_pinned() -> None:
    screen = Screen(W, H)
    data, fds = handoff.dumps(screen)  # the parent pins what it reads from the header
    writer = handoff.loads(data, [os.dup(fd) for fd in fds])
    try:
        client = session(Broken(), screen, in_place=True)
        client.want_full = (0, 0, W, H)
        with pytest.raises(ConnectionResetError):
            client.update(screen)
        assert screen._shm.pinned is None
    finally:
        writer.close()
        screen.close()


def test_the_screen_keeps_the_unused_byte_set_from_any_view() -> None:
    screen = Screen(W, H)
    vram = pattern(H, W, 8)
    planar = np.moveaxis(np.ascontiguousarray(np.moveaxis(vram, 2, 0)), 0, 2)
    assert planar.strides[2] != 1  # its channel bytes are apart: the copy's slow path
    screen.update(planar, [(0, 0, W, H // 2)])
    screen.update(vram[::-1], [(0, H // 2, W, H)])
    frame = screen.frame_copy()
    assert (frame[: H // 2] == opaque(vram[: H // 2])).all()
    assert (frame[H // 2 :] == opaque(vram[::-1][H // 2 :])).all()


def test_an_update_waits_for_the_writers_doorbell_instead_of_spinning(
    pairs: list[socket.socket],
) -> None:
    screen = Screen(W, H)
    ours, peer = pair(pairs)
    client = session(ours, screen, in_place=True)
    client.want_full = (0, 0, W, H)
    screen._shm.begin_write()  # a writer mid-copy
    assert screen.writing()
    assert not client.update(screen) and not client.out  # no spin: its doorbell brings us back
    assert screen.damage_since(screen.damage_cursor(), wait=False)[0] is None
    screen._shm.end_write()
    assert client.update(screen)
    assert len(wire(client, peer)) == 16 + W * H * 4


def test_a_writer_stuck_mid_copy_gets_a_torn_update_not_a_stalled_viewer(
    pairs: list[socket.socket],
) -> None:
    screen = Screen(W, H)
    data, fds = handoff.dumps(screen)  # the parent's Screen reads the mode from the header
    writer = handoff.loads(data, [os.dup(fd) for fd in fds])
    try:
        ours, peer = pair(pairs)
        client = session(ours, screen, in_place=True)
        client.want_full = (0, 0, W, H)
        screen._shm.begin_write()  # and never ends it (a hostile worker)
        assert not client.update(screen)
        assert client.busy_since is not None
        client.busy_since -= 1.0  # past the patience
        assert client.update(screen)
        assert len(wire(client, peer)) == 16 + W * H * 4 and screen.torn == 1
        assert client.dirty == [(0, 0, W, H)]  # sent again once the writer is done
    finally:
        writer.close()
        screen.close()
