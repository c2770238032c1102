"""The learning switch's flow control and address pinning: a full port
holds its senders back (transmit), a port that never drains stops holding
anyone after stall_seconds, and no port can take another's address."""

from __future__ import annotations

import select
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmbus.errors import UsageError
from vsp.net import LearningSwitch, SwitchPort

MAC_A, MAC_B, MAC_C = (bytes([2, 0, 0, 0, 0, n]) for n in (0xA, 0xB, 0xC))
BROADCAST = b"\xff" * 6


def frame(dst: bytes, src: bytes, n: int = 0) -> bytes:
    return dst + src + struct.pack("!HI", 0x88B5, n) + bytes(42)


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_full_port_holds_the_sender_back_until_it_drains() -> None:
    switch = LearningSwitch(queue_frames=4, stall_seconds=None)
    a, b = switch.port(MAC_A), switch.port(MAC_B)
    frames = [frame(MAC_B, MAC_A, n) for n in range(10)]
    sent = a.transmit(frames)
    assert sent == (4, 0) and a.held == 1 and not readable(a.space_fileno())
    assert len(b.receive(1)) == 1 and not readable(a.space_fileno())  # 3 left: above half
    assert len(b.receive(1)) == 1 and readable(a.space_fileno())  # 2: drained to half
    assert a.transmit(frames[4:]) == (2, 0)  # the room there is; the wake-up is consumed
    assert not readable(a.space_fileno())
    got = b.receive(16)
    assert [struct.unpack_from("!I", f, 14)[0] for f in got] == [2, 3, 4, 5]
    assert b.dropped == 0 and a.refused == 0


def test_receiver_that_never_reads_stalls_nobody_for_long() -> None:
    """After stall_seconds of waiting on a port that drains nothing, its
    senders are released and frames to it are dropped, counted there."""
    switch = LearningSwitch(queue_frames=4, stall_seconds=60)
    a, b = switch.port(MAC_A), switch.port(MAC_B)
    frames = [frame(MAC_B, MAC_A, n) for n in range(10)]
    assert a.transmit(frames).taken == 4
    switch.check_stalls(time.monotonic() + 61)  # the watchdog's check, a minute later
    assert b.stalled and readable(a.space_fileno())
    assert a.transmit(frames[4:]) == (6, 6)  # taken, and refused: B's port drops them
    assert b.dropped == 6 and switch.stats()[1].dropped == 6
    b.receive(16)  # B drains at last: it is a port like any other again
    assert not b.stalled and a.transmit(frames[:1]) == (1, 0)


def test_send_never_waits_and_flooding_never_holds() -> None:
    switch = LearningSwitch(queue_frames=2, stall_seconds=None)
    a, b, c = switch.port(MAC_A), switch.port(MAC_B), switch.port(MAC_C)
    assert a.send([frame(MAC_B, MAC_A, n) for n in range(5)]) == 2  # 3 lost at B's port
    floods = [frame(BROADCAST, MAC_A, n) for n in range(3)]
    assert a.transmit(floods) == (3, 1)  # C took two; the third reached no port
    assert b.dropped == 6 and c.dropped == 1 and a.held == 0


def test_port_cannot_claim_another_ports_mac() -> None:
    """A frame from another port's address is dropped and counted: the
    spoofer neither sends as it nor learns its traffic away."""
    switch = LearningSwitch()
    a, b, c = switch.port(MAC_A), switch.port(MAC_B), switch.port()
    assert c.send([frame(BROADCAST, MAC_A)]) == 0 and c.spoofed == 1
    assert a.receive(8) == b.receive(8) == []
    b.send([frame(MAC_A, MAC_B)])
    assert len(a.receive(8)) == 1 and c.receive(8) == []  # A's traffic still goes to A


def test_port_address_is_pinned_by_its_first_frame() -> None:
    switch = LearningSwitch()
    a, c, d = switch.port(MAC_A), switch.port(), switch.port()
    c.send([frame(BROADCAST, MAC_C)])  # C's address from now on
    assert c.mac == MAC_C and len(d.receive(8)) == 1
    assert d.send([frame(BROADCAST, MAC_C)]) == 0 and d.spoofed == 1
    a.receive(8)
    a.send([frame(MAC_C, MAC_A)])
    assert len(c.receive(8)) == 1 and d.receive(8) == []
    assert [s.spoofed for s in switch.stats()] == [0, 0, 1]


def test_two_ports_cannot_be_made_with_one_address() -> None:
    switch = LearningSwitch()
    port: SwitchPort = switch.port(MAC_A)
    with pytest.raises(UsageError):
        switch.port(MAC_A)
    port.close()
    switch.port(MAC_A).close()  # free again once its port is gone


@given(
    st.lists(
        st.tuples(st.sampled_from("ab"), st.sampled_from("ABx*"), st.integers(1, 6)), max_size=40
    )
)
@settings(max_examples=100, deadline=None)
def test_every_frame_is_delivered_held_or_counted(steps: list[tuple[str, str, int]]) -> None:
    """Whatever ports A and B send (to each other, to an unknown address,
    flooded) and however little they read, each frame offered is received,
    still queued, still held by its sender, or counted as lost (two ports:
    a flooded frame has one copy)."""
    switch = LearningSwitch(queue_frames=3, stall_seconds=None)
    ports = {"a": switch.port(MAC_A), "b": switch.port(MAC_B)}
    macs = {"A": MAC_A, "B": MAC_B, "x": MAC_C, "*": BROADCAST}
    offered = received = held = 0
    for who, to, n in steps:
        port = ports[who]
        if to == "x" and who == "b":  # B reads instead
            received += len(port.receive(n))
            continue
        frames = [frame(macs[to], macs[who.upper()], i) for i in range(n)]
        sent = port.transmit(frames)
        held += n - sent.taken  # a netvsp would offer these again later
        offered += n
    stats = switch.stats()
    queued = sum(s.queued for s in stats)
    lost = sum(s.dropped + s.refused + s.spoofed for s in stats)
    to_self = sum(  # frames to the sender's own address are filtered, not lost
        n for who, to, n in steps if (who, to) in (("a", "A"), ("b", "B"))
    )
    assert offered - held == received + queued + lost + to_self
