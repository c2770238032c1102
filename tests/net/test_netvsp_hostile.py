"""netvsp against a hostile guest, in one process: the real VSP served by
VspHarness, hand-made NVSP and RNDIS on the guest's end. Each bad message
is answered with an error status and counted, and service goes on."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from vmbus.channel import COMPLETION_REQUESTED
from vmbus.memory import PAGE_SIZE
from vmbus.packet import GpaRange, PacketType, encode_gpa_direct_header
from vmbus.protocols.net import wire as nvsp
from vmbus.protocols.net.rndis_wire import encode_packet
from vmbus.protocols.net.vsc import RndisClient
from vmbus.testing import VspHarness
from vmbus.testing import ethernet as eth
from vsp.net import LearningSwitch, NetVsp, NetvspChannel

MAC = bytes.fromhex("020000000d04")
PEER_MAC = bytes.fromhex("020000000d05")
SEND_SECTION = nvsp.DEFAULT_SEND_SECTION_SIZE


class Guest:
    """The guest's end of one netvsp channel, speaking NVSP by hand."""

    def __init__(self, harness: VspHarness, switch: LearningSwitch) -> None:
        self.harness = harness
        self.switch = switch
        self.peer = switch.port(PEER_MAC)
        self.handler = harness.handler
        assert isinstance(self.handler, NetvspChannel)
        self.recv = harness.grant(64)
        self.send_buffer = harness.grant(16)
        self.next_id = 1

    def request(self, payload: bytes, header: bytes = b"") -> memoryview | None:
        trans_id, self.next_id = self.next_id, self.next_id + 1
        type = PacketType.DATA_USING_GPA_DIRECT if header else PacketType.DATA_INBAND
        self.harness.guest.send(
            payload.ljust(40, b"\0"),
            type=type,
            flags=COMPLETION_REQUESTED,
            trans_id=trans_id,
            header=header,
        )
        self.harness.pump()
        while (reply := self.harness.guest.poll()) is not None:
            if reply.type == PacketType.COMP:  # others: RNDIS replies on the receive path
                assert reply.trans_id == trans_id
                return reply.payload
            self.complete(reply.trans_id)
        return None

    def complete(self, trans_id: int) -> None:
        """The 8-byte receive completion Linux sends."""
        done = nvsp.SendRndisPacketComplete(status=nvsp.NvspStatus.SUCCESS).pack()
        self.harness.guest.send(done, type=PacketType.COMP, trans_id=trans_id)

    def status(self, payload: bytes, cls: type, header: bytes = b"") -> int:
        reply = self.request(payload, header)
        assert reply is not None
        return int(nvsp.decode(reply, cls).status)

    def initialize(self) -> None:
        init = nvsp.encode(nvsp.NvspInit(min_protocol_ver=0x60001, max_protocol_ver=0x60001))
        assert self.status(init, nvsp.NvspInitComplete) == nvsp.NvspStatus.SUCCESS
        recv = nvsp.encode(nvsp.SendReceiveBuffer(gpadl_handle=self.recv.gpadl))
        assert self.status(recv, nvsp.SendReceiveBufferComplete) == nvsp.NvspStatus.SUCCESS
        send = nvsp.encode(nvsp.SendSendBuffer(gpadl_handle=self.send_buffer.gpadl))
        assert self.status(send, nvsp.SendSendBufferComplete) == nvsp.NvspStatus.SUCCESS
        control = RndisClient().initialize()
        assert self.rndis(control, 0, channel=nvsp.RndisChannel.CONTROL) == 1
        assert self.handler.rndis.initialized
        self.handler.rndis._packet_filter = 0x0D  # as Linux sets it next

    def write_section(self, section: int, message: bytes) -> None:
        offset = self.send_buffer.pfns[0] * PAGE_SIZE + section * SEND_SECTION
        self.harness.memory.view(offset, len(message))[:] = message

    def rndis(self, message: bytes, section: int, channel: int = nvsp.RndisChannel.DATA) -> int:
        self.write_section(section, message)
        packet = nvsp.send_rndis_packet(channel, section, len(message))
        return self.status(packet, nvsp.SendRndisPacketComplete)


@pytest.fixture
def guest() -> Iterator[Guest]:
    switch = LearningSwitch()
    port = switch.port(MAC)
    with VspHarness(NetVsp(port, mac=MAC), ring_size=256 << 10) as harness:
        guest = Guest(harness, switch)
        yield guest
    guest.peer.close()  # the ports' and the switch's descriptors go with the test
    port.close()
    switch.close()


def frame(payload: bytes = b"x" * 46, dst: bytes = eth.BROADCAST) -> bytes:
    return eth.ethernet(dst, MAC, 0x88B5, payload)


def test_guest_sends_rndis_before_init(guest: Guest) -> None:
    packet = nvsp.send_rndis_packet(nvsp.RndisChannel.DATA, 0, 60)
    assert guest.status(packet, nvsp.SendRndisPacketComplete) == nvsp.NvspStatus.FAIL
    assert guest.handler.nvsp.errors.total() == 1
    assert guest.harness.context.peer_log.count == 1
    guest.initialize()  # the channel goes on


def test_guest_names_receive_buffer_it_never_granted(guest: Guest) -> None:
    init = nvsp.encode(nvsp.NvspInit(min_protocol_ver=0x60001, max_protocol_ver=0x60001))
    guest.request(init)
    unknown = nvsp.encode(nvsp.SendReceiveBuffer(gpadl_handle=0xDEAD))
    assert guest.status(unknown, nvsp.SendReceiveBufferComplete) == nvsp.NvspStatus.FAIL
    ok = nvsp.encode(nvsp.SendReceiveBuffer(gpadl_handle=guest.recv.gpadl))
    assert guest.status(ok, nvsp.SendReceiveBufferComplete) == nvsp.NvspStatus.SUCCESS
    again = nvsp.encode(nvsp.SendSendBuffer(gpadl_handle=guest.recv.gpadl))  # the same GPADL
    assert guest.status(again, nvsp.SendSendBufferComplete) == nvsp.NvspStatus.FAIL


def test_guest_names_its_ring_pages_as_receive_buffer(guest: Guest) -> None:
    rings = guest.harness.grant(sorted(guest.harness.context.ring_pfns))
    init = nvsp.encode(nvsp.NvspInit(min_protocol_ver=0x60001, max_protocol_ver=0x60001))
    guest.request(init)
    bad = nvsp.encode(nvsp.SendReceiveBuffer(gpadl_handle=rings.gpadl))
    assert guest.status(bad, nvsp.SendReceiveBufferComplete) == nvsp.NvspStatus.FAIL
    assert not guest.handler.buffers


def test_guest_names_send_section_out_of_range(guest: Guest) -> None:
    guest.initialize()
    packet = nvsp.send_rndis_packet(nvsp.RndisChannel.DATA, 10_000, 60)
    assert guest.status(packet, nvsp.SendRndisPacketComplete) == nvsp.NvspStatus.INVALID_RNDIS_PKT


def test_guest_claims_rndis_length_beyond_its_message(guest: Guest) -> None:
    guest.initialize()
    message = bytearray(encode_packet(frame()))
    message[4:8] = (len(message) + 4096).to_bytes(4, "little")  # msg_len past the section
    assert guest.rndis(bytes(message), 0) == nvsp.NvspStatus.INVALID_RNDIS_PKT
    assert guest.peer.receive(10) == []  # nothing reached the wire
    assert guest.rndis(encode_packet(frame()), 1) == nvsp.NvspStatus.SUCCESS
    assert guest.peer.receive(10) == [frame()]


def test_guest_frame_refused_by_the_backend_completes_with_fail(guest: Guest) -> None:
    """An oversize frame (the medium refuses it) is no SUCCESS: the guest is
    told, and netvsp counts it."""
    guest.initialize()
    huge = frame(bytes(3000))
    assert guest.rndis(encode_packet(huge), 0) == nvsp.NvspStatus.FAIL
    assert guest.peer.receive(10) == [] and guest.handler.refused == 1
    assert guest.rndis(encode_packet(frame()), 1) == nvsp.NvspStatus.SUCCESS  # service goes on


def test_guest_gpa_direct_frame_goes_through_the_checked_ranges(guest: Guest) -> None:
    guest.initialize()
    (page,) = guest.harness.allocate(1)
    message = encode_packet(frame(b"gpa direct".ljust(46, b".")))
    guest.harness.memory.view(page * PAGE_SIZE, len(message))[:] = message
    header = encode_gpa_direct_header([GpaRange(len(message), 0, (page,))])
    packet = nvsp.send_rndis_packet(nvsp.RndisChannel.DATA)
    assert guest.status(packet, nvsp.SendRndisPacketComplete, header) == nvsp.NvspStatus.SUCCESS
    assert guest.peer.receive(10) == [frame(b"gpa direct".ljust(46, b"."))]


def test_guest_points_gpa_direct_at_its_rings(guest: Guest) -> None:
    guest.initialize()
    ring = min(guest.harness.context.ring_pfns)
    header = encode_gpa_direct_header([GpaRange(100, 0, (ring,))])
    packet = nvsp.send_rndis_packet(nvsp.RndisChannel.DATA)
    status = guest.status(packet, nvsp.SendRndisPacketComplete, header)
    assert status == nvsp.NvspStatus.INVALID_RNDIS_PKT  # refused; the channel goes on
    assert guest.harness.context.bad_ranges == 1
    assert guest.rndis(encode_packet(frame()), 0) == nvsp.NvspStatus.SUCCESS


def test_guest_completes_receive_with_8_bytes_and_sections_come_back(guest: Guest) -> None:
    guest.initialize()
    sections = guest.handler.receive_sections
    assert sections is not None
    free = sections.free_count
    guest.peer.send([eth.ethernet(MAC, PEER_MAC, 0x88B5, b"y" * 46)])
    guest.harness.pump()
    delivered = guest.harness.guest.poll()
    assert delivered is not None and delivered.type == PacketType.DATA_USING_XFER_PAGES
    assert sections.free_count == free - 1
    guest.complete(delivered.trans_id)
    guest.harness.pump()
    assert sections.free_count == free


def test_guest_completes_a_receive_it_never_got(guest: Guest) -> None:
    guest.initialize()
    guest.complete(0xBAD)
    guest.harness.pump()
    assert guest.harness.context.peer_log.count == 1
    assert guest.rndis(encode_packet(frame()), 0) == nvsp.NvspStatus.SUCCESS


def test_guest_sending_into_a_full_port_is_held_not_dropped() -> None:
    """Frames for a full switch port wait in the switch (and, once the
    sender's ring is full too, with their completions), in order, until the
    port drains: none is dropped."""
    switch = LearningSwitch(queue_frames=2, stall_seconds=None)
    port = switch.port(MAC)
    with port, VspHarness(NetVsp(port, mac=MAC), ring_size=256 << 10) as harness:
        guest = Guest(harness, switch)
        guest.initialize()
        frames = [frame(bytes([n]) * 46, dst=PEER_MAC) for n in range(6)]
        for section, data in enumerate(frames):
            message = encode_packet(data)
            guest.write_section(section, message)
            packet = nvsp.send_rndis_packet(nvsp.RndisChannel.DATA, section, len(message))
            harness.guest.send(packet, flags=COMPLETION_REQUESTED, trans_id=100 + section)
        harness.pump()
        done = completions(harness)
        sender, peer = switch.stats()
        assert sender.held == 1 and sender.waiting == 4 and peer.queued == 2  # the switch holds
        received = guest.peer.receive(8)
        harness.pump()
        while len(received) < len(frames):
            received += guest.peer.receive(8)
            harness.pump()
        done |= completions(harness)
        assert received == frames and done == {100 + n: 1 for n in range(6)}
        assert switch.stats()[1].dropped == 0
        assert guest.handler.held is None and not guest.handler.paused
        guest.peer.close()
    switch.close()


def completions(harness: VspHarness) -> dict[int, int]:
    """trans_id -> NVSP status of the completions waiting for the guest."""
    done = {}
    while (packet := harness.guest.poll()) is not None:
        if packet.type == PacketType.COMP:
            done[packet.trans_id] = nvsp.decode(packet.payload, nvsp.SendRndisPacketComplete).status
    return done
