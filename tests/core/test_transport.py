"""The hypercall transport: SynIC framing, descriptor hand-over, hostile frames."""

from __future__ import annotations

import contextlib
import os
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmbus.transport import (
    MAX_PAYLOAD,
    SYNIC_HEADER,
    LocalPort,
    MalformedMessage,
    PortClosed,
    Signal,
    SocketPort,
    frame,
    unframe,
)


@given(st.binary(max_size=MAX_PAYLOAD))
def test_frame_round_trip(payload: bytes) -> None:
    data = frame(payload)
    assert data[:8] == bytes([1, 0, 0, 0, len(payload), 0, 0, 0])
    assert unframe(data) == payload


@given(st.binary(max_size=300))
def test_unframe_of_any_bytes_raises_only_malformed(data: bytes) -> None:
    with contextlib.suppress(MalformedMessage):
        assert len(unframe(data)) <= MAX_PAYLOAD


def test_oversized_payload_is_refused_locally() -> None:
    with pytest.raises(ValueError, match="exceeds 240"):
        frame(bytes(241))


@pytest.fixture(params=["socket", "local"])
def ports(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    pair = SocketPort.pair() if request.param == "socket" else LocalPort.pair()
    yield pair
    for port in pair:
        port.close()


def test_messages_arrive_in_order(ports) -> None:  # type: ignore[no-untyped-def]
    parent, child = ports
    for i in range(50):
        child.post(b"msg %d" % i)
    for i in range(50):
        assert parent.receive(timeout=1) == (b"msg %d" % i, [])
    assert parent.receive(timeout=0.01) is None


def test_child_receives_eventfds_from_parent(ports) -> None:  # type: ignore[no-untyped-def]
    parent, child = ports
    signal = Signal()
    parent.post(b"open", [signal.fd])
    payload, fds = child.receive(timeout=1)
    assert payload == b"open" and len(fds) == 1
    Signal(fds[0]).set()
    assert signal.wait(1)
    os.close(fds[0])
    signal.close()


def test_closed_peer_is_reported(ports) -> None:  # type: ignore[no-untyped-def]
    parent, child = ports
    child.close()
    with pytest.raises(PortClosed):
        parent.receive(timeout=1)


def test_parent_drops_descriptors_a_child_sends() -> None:
    parent, child = SocketPort.pair()
    fd = os.eventfd(0)
    before = len(os.listdir("/proc/self/fd"))
    child.post(b"hello", [fd, fd, fd])
    assert parent.receive(timeout=1) == (b"hello", [])
    assert len(os.listdir("/proc/self/fd")) == before
    os.close(fd)
    parent.close()
    child.close()


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("child_sends_frame_shorter_than_header", b"\x01\x00"),
        ("child_sends_wrong_message_type", SYNIC_HEADER.pack(7, 0, 0, 0, 0)),
        ("child_lies_about_payload_size", SYNIC_HEADER.pack(1, 9, 0, 0, 0) + b"abc"),
        ("child_sends_oversized_message", SYNIC_HEADER.pack(1, 240, 0, 0, 0) + bytes(300)),
    ],
)
def test_hostile_frames_are_malformed_and_port_survives(name: str, data: bytes) -> None:
    parent, child = SocketPort.pair()
    child.sock.send(data)
    with pytest.raises(MalformedMessage):
        parent.receive(timeout=1)
    child.post(b"still fine")
    assert parent.receive(timeout=1) == (b"still fine", [])
    parent.close()
    child.close()


def test_signal_counts_and_wakes() -> None:
    signal = Signal()
    assert not signal.wait(0)
    signal.set()
    signal.set()
    assert signal.wait(0) and not signal.wait(0)  # one wake for both
    assert signal.sent == 2
    signal.close()


def test_socket_port_survives_peer_killing_socket_mid_message() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    parent = SocketPort(a, accept_fds=False)
    b.close()
    with pytest.raises(PortClosed):
        parent.post(b"x")
    parent.close()


def test_peer_that_fills_the_eventfd_counter_cannot_break_the_doorbell() -> None:
    """The peer shares the eventfd and can push its counter to the maximum;
    ringing it must neither raise nor go unnoticed."""
    signal = Signal()
    try:
        os.eventfd_write(signal.fileno(), 0xFFFF_FFFF_FFFF_FFFE)  # the counter's maximum
        signal.set()  # would be EAGAIN
        assert signal.sent == 1
        assert signal.wait(0)  # still reads as signalled
        assert not signal.wait(0)
    finally:
        signal.close()
