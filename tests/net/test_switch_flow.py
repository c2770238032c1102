"""The learning switch's flow control and address pinning: a full port
holds its senders back (the frame waits in the switch, the frames behind it
in the sender's ring, then the sender's transmit), a port that never drains
stops holding anyone after stall_seconds, and no port can take another's
address. The switch here has no thread (serve=False): ports in the
switch's own process forward as they send, and `pump()` does the rest."""

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


def numbers(frames: list[bytes]) -> list[int]:
    return [struct.unpack_from("!I", f, 14)[0] for f in frames]


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_full_port_holds_frames_in_the_switch_until_it_drains() -> None:
    switch = LearningSwitch(queue_frames=4, stall_seconds=None, serve=False)
    a, b = switch.port(MAC_A), switch.port(MAC_B)
    assert a.transmit([frame(MAC_B, MAC_A, n) for n in range(10)]) == (10, 0)  # its ring took all
    port_a, port_b = switch.stats()
    assert (port_b.queued, port_a.waiting, a.held) == (4, 6, 1)
    assert numbers(b.receive(1)) == [0] and switch.stats()[0].waiting == 6  # 3 left: above half
    assert numbers(b.receive(1)) == [1] and switch.stats()[0].waiting == 4  # drained to half
    got = numbers(b.receive(64))
    while len(got) < 8:
        switch.pump()
        got += numbers(b.receive(64))
    assert got == list(range(2, 10)) and b.dropped == 0 and a.refused == 0


def test_full_port_holds_back_the_senders_transmit_without_loss() -> None:
    """Once the sender's own ring is full too, transmit takes no more and its
    space descriptor says when to offer the rest: nothing is lost."""
    switch = LearningSwitch(queue_frames=2, stall_seconds=None, serve=False)
    a, b = switch.port(MAC_A), switch.port(MAC_B)
    offered = [frame(MAC_B, MAC_A, n) for n in range(2000)]
    sent = a.transmit(offered)
    assert 0 < sent.taken < len(offered) and sent.refused == 0
    got: list[bytes] = []
    rest = offered[sent.taken :]
    while len(got) < len(offered):
        got += b.receive(64)
        switch.pump()
        if rest and readable(a.space_fileno()):
            rest = rest[a.transmit(rest).taken :]
    assert numbers(got) == list(range(2000))
    stats = switch.stats()
    assert stats[1].dropped == 0 and stats[0].refused == 0 and stats[0].held > 0


def test_receiver_that_never_reads_stalls_nobody_for_long() -> None:
    """After stall_seconds of waiting on a port that drains nothing, its
    senders are released and frames to it are dropped, counted there."""
    switch = LearningSwitch(queue_frames=4, stall_seconds=60, serve=False)
    a, b = switch.port(MAC_A), switch.port(MAC_B)
    a.transmit([frame(MAC_B, MAC_A, n) for n in range(10)])
    assert switch.stats()[0].waiting == 6
    switch.check_stalls(time.monotonic() + 61)  # the watchdog's check, a minute later
    switch.pump()
    assert b.stalled and switch.stats()[0].waiting == 0
    assert b.dropped == 6 and switch.stats()[1].queued == 4
    b.receive(16)  # B drains at last: it is a port like any other again
    switch.pump()
    assert not b.stalled
    a.transmit([frame(MAC_B, MAC_A, 99)])
    assert numbers(b.receive(16)) == [99]


def test_flooding_never_holds() -> None:
    """A flooded frame is dropped (counted) at each full port, never held."""
    switch = LearningSwitch(queue_frames=2, stall_seconds=None, serve=False)
    a, b, c = switch.port(MAC_A), switch.port(MAC_B), switch.port(MAC_C)
    assert a.send([frame(MAC_B, MAC_A, n) for n in range(2)]) == 2  # B is full now
    a.send([frame(BROADCAST, MAC_A, n) for n in range(3)])
    assert b.dropped == 3 and c.dropped == 1 and a.held == 0
    assert numbers(c.receive(8)) == [0, 1] and numbers(b.receive(8)) == [0, 1]


def test_port_cannot_claim_another_ports_mac() -> None:
    """A frame from another port's address is dropped and counted: the
    spoofer neither sends as it nor learns its traffic away."""
    switch = LearningSwitch(serve=False)
    a, b, c = switch.port(MAC_A), switch.port(MAC_B), switch.port()
    assert c.send([frame(BROADCAST, MAC_A)]) == 1  # its ring took it; the switch refuses it
    assert c.spoofed == 1 and a.receive(8) == b.receive(8) == []
    b.send([frame(MAC_A, MAC_B)])
    assert len(a.receive(8)) == 1 and c.receive(8) == []  # A's traffic still goes to A


def test_port_made_with_a_mac_refuses_other_sources_itself() -> None:
    """So its netvsp can report the refusal to the guest (NVSP_STAT_FAIL)."""
    switch = LearningSwitch(serve=False)
    a, b = switch.port(MAC_A), switch.port(MAC_B)
    assert a.transmit([frame(MAC_B, MAC_C), frame(MAC_B, MAC_A)]) == (2, 1)
    assert numbers(b.receive(8)) == [0] and a.spoofed == 1 and a.refused == 0


def test_port_address_is_pinned_by_its_first_frame() -> None:
    switch = LearningSwitch(serve=False)
    a, c, d = switch.port(MAC_A), switch.port(), switch.port()
    c.send([frame(BROADCAST, MAC_C)])  # C's address from now on
    assert switch.stats()[1].mac == MAC_C and len(d.receive(8)) == 1
    d.send([frame(BROADCAST, MAC_C)])
    assert d.spoofed == 1
    a.receive(8)
    a.send([frame(MAC_C, MAC_A)])
    assert len(c.receive(8)) == 1 and d.receive(8) == []
    assert [s.spoofed for s in switch.stats()] == [0, 0, 1]


def test_two_ports_cannot_be_made_with_one_address() -> None:
    switch = LearningSwitch(serve=False)
    port: SwitchPort = switch.port(MAC_A)
    with pytest.raises(UsageError):
        switch.port(MAC_A)
    port.close()
    switch.port(MAC_A).close()  # free again once its port is gone


@given(
    st.lists(
        st.tuples(st.sampled_from("ab"), st.sampled_from("Ax*"), st.integers(1, 6)), max_size=40
    )
)
@settings(max_examples=60, deadline=None)
def test_every_frame_is_delivered_held_or_counted(steps: list[tuple[str, str, int]]) -> None:
    """Whatever ports A and B send (to each other, to an unknown address,
    flooded) and however little they read, each frame offered is received,
    still queued, waiting in the switch, still held by its sender, or
    counted as lost (two ports: a flooded frame has one copy). "A" is the
    other port's address ("a" sends to B)."""
    switch = LearningSwitch(queue_frames=3, stall_seconds=None, serve=False)
    ports = {"a": switch.port(MAC_A), "b": switch.port(MAC_B)}
    macs = {"A": MAC_A, "B": MAC_B, "x": MAC_C, "*": BROADCAST}
    offered = received = held = 0
    for who, to, n in steps:
        port = ports[who]
        if to == "x" and who == "b":  # B reads instead
            received += len(port.receive(n))
            switch.pump()
            continue
        dst = macs["B"] if (who, to) == ("a", "A") else macs[to]
        frames = [frame(dst, macs[who.upper()], i) for i in range(n)]
        sent = port.transmit(frames)
        held += n - sent.taken  # a netvsp would offer these again later
        offered += n
    stats = switch.stats()
    queued = sum(s.queued + s.waiting for s in stats)
    lost = sum(s.dropped + s.refused + s.spoofed for s in stats)
    assert offered - held == received + queued + lost
    switch.close()
    for port in ports.values():
        port.close()


def test_port_used_after_its_switch_closed_fails_quietly() -> None:
    """Its frames are refused (its link is down), nothing raises (a closed
    switch's selector raised from the port's next send)."""
    switch = LearningSwitch(serve=False)
    a = switch.port(MAC_A)
    switch.close()
    assert a.transmit([frame(BROADCAST, MAC_A)]) == (1, 1) and a.receive(8) == []
    a.close()
