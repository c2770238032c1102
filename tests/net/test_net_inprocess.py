"""NetAdapters against their netvsps in this process (vmbus.testing.loopback):
two adapters on one LearningSwitch, the MTU the sections are sized from,
the status of a refused frame, and a burst that the switch must not lose."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import pytest

from vmbus import guid
from vmbus.guest import Guest, GuestDevice
from vmbus.testing import ethernet as eth
from vmbus.testing import loopback
from vsc.net import NetAdapter
from vsp.net import LearningSwitch, NetVsp

MAC_A, MAC_B = bytes.fromhex("020000001a01"), bytes.fromhex("020000001b02")
ETHERTYPE = 0x88B5  # local experimental


def frame(dst: bytes, src: bytes, payload: bytes) -> bytes:
    return eth.ethernet(dst, src, ETHERTYPE, payload.ljust(46, b"."))


@contextlib.contextmanager
def adapters(vsps: Sequence[NetVsp]) -> Iterator[dict[bytes, NetAdapter]]:
    """NetAdapters bound to `vsps` in an in-process guest, by MAC."""
    devices: list[GuestDevice] = []

    def bind(device: GuestDevice) -> GuestDevice:
        devices.append(device)
        return device  # bound: the guest offers it to no driver again

    def register(guest: Guest) -> None:
        guest.register(guid.NETWORK, bind)

    with loopback(vsps, register):
        nics = {nic.mac: nic for nic in map(NetAdapter, devices)}
        try:
            yield nics
        finally:
            for nic in nics.values():
                nic.close()


@pytest.fixture
def pair() -> Iterator[tuple[NetAdapter, NetAdapter, LearningSwitch]]:
    switch = LearningSwitch()
    vsps = [NetVsp(switch.port(MAC_A), mac=MAC_A), NetVsp(switch.port(MAC_B), mac=MAC_B)]
    with adapters(vsps) as nics:
        yield nics[MAC_A], nics[MAC_B], switch


def test_two_adapters_exchange_frames_through_the_switch(
    pair: tuple[NetAdapter, NetAdapter, LearningSwitch],
) -> None:
    a, b, _ = pair
    assert (a.mtu, b.mtu, a.link_up) == (1500, 1500, True)
    a.send(frame(MAC_B, MAC_A, b"hello b"))
    assert b.receive(5.0) == frame(MAC_B, MAC_A, b"hello b")
    b.send_batch([frame(MAC_A, MAC_B, b"%d" % n) for n in range(10)])
    assert [a.receive(5.0) for _ in range(10)] == [
        frame(MAC_A, MAC_B, b"%d" % n) for n in range(10)
    ]
    assert a.send_failures == b.send_failures == 0


def test_burst_child_to_child_through_the_switch_arrives_complete(
    pair: tuple[NetAdapter, NetAdapter, LearningSwitch],
) -> None:
    """Far more frames than B's port queue and receive sections hold: the
    switch holds A back instead of dropping (the burst lost 37-65 %)."""
    a, b, switch = pair
    count = 6000
    got: list[bytes] = []
    receiver = threading.Thread(target=lambda: got.extend(b.receive(10.0) for _ in range(count)))
    receiver.start()
    a.send_batch([frame(MAC_B, MAC_A, n.to_bytes(4, "big")) for n in range(count)])
    receiver.join(30)
    assert not receiver.is_alive()
    assert [int.from_bytes(f[14:18], "big") for f in got] == list(range(count))
    port_a, port_b = switch.stats()
    assert port_b.dropped == port_a.refused == 0 and a.send_failures == 0
    assert port_a.held > 0  # the sender was slowed down, not lost


def test_larger_mtu_frames_are_not_lost_to_small_sections() -> None:
    """A 9000-byte MTU is advertised only with sections that hold its frames
    (the default 1728/6144-byte sections made them vanish)."""
    switch = LearningSwitch(mtu=9000)
    peer = switch.port(MAC_B)
    with adapters([NetVsp(switch.port(MAC_A), mac=MAC_A)]) as nics:
        nic = nics[MAC_A]
        assert nic.mtu == 9000
        jumbo = frame(MAC_B, MAC_A, bytes(9000))  # 9014 bytes
        nic.send(jumbo)
        while nic.sending:
            nic._pump(5.0)
        assert peer.receive(8) == [jumbo] and nic.send_failures == 0
        back = frame(MAC_A, MAC_B, b"\x01" * 9000)
        peer.send([back])
        assert nic.receive(5.0) == back


def test_sections_given_too_small_for_the_mtu_report_an_mtu_that_fits() -> None:
    switch = LearningSwitch(mtu=9000)
    vsp = NetVsp(switch.port(MAC_A), mac=MAC_A, recv_section_size=1728, send_section_size=6144)
    assert vsp.mtu == 1728 - 44 - 18  # an RNDIS PACKET header and a tagged Ethernet header
    with adapters([vsp]) as nics:
        assert nics[MAC_A].mtu == vsp.mtu


def test_frame_the_switch_refuses_is_reported_to_the_sender(
    pair: tuple[NetAdapter, NetAdapter, LearningSwitch],
) -> None:
    """A frame spoofing B's address is refused: its send completes with
    NVSP_STAT_FAIL, not SUCCESS, and both sides count it."""
    a, b, switch = pair
    a.send(frame(MAC_B, MAC_B, b"spoofed"))
    a.send(frame(MAC_B, MAC_A, b"honest"))
    assert b.receive(5.0) == frame(MAC_B, MAC_A, b"honest")
    while a.sending:
        a._pump(5.0)
    assert a.send_failures == 1 and switch.stats()[0].spoofed == 1
