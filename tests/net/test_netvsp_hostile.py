"""netvsp against a hostile guest, in one process: the real VSP on one end
of a channel pair, hand-made NVSP and RNDIS on the other. Each bad message
is answered with an error status and counted, and service goes on."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from vmbus import guid
from vmbus import messages as m
from vmbus.channel import COMPLETION_REQUESTED, Channel
from vmbus.device import OpenContext
from vmbus.host import OfferSpec
from vmbus.memory import PAGE_SIZE, GuestMemory
from vmbus.packet import PacketType
from vmbus.protocols.net import nvsp
from vmbus.protocols.net import rndis as r
from vmbus.testing import channel_pair
from vmbus.testing import ethernet as eth
from vsp.net import NetVsp
from vsp.net.backends import LearningSwitch

MAC = bytes.fromhex("020000000d04")
RECV, SEND = 0x100, 0x200  # GPADL handles
GPADLS = {
    RECV: m.Gpadl(1, RECV, 64 * PAGE_SIZE, 0, tuple(range(16, 80))),
    SEND: m.Gpadl(1, SEND, 16 * PAGE_SIZE, 0, tuple(range(80, 96))),
}


class Guest:
    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.switch = LearningSwitch()
        self.peer = self.switch.port()
        self.vsp = NetVsp(self.switch.port(MAC), mac=MAC)
        self.channel, host = channel_pair(256 * 1024)
        self.watched: dict[int, object] = {}
        context = OpenContext(
            OfferSpec(guid.NETWORK, uuid.uuid4()),
            memory,
            ring_pfns=frozenset({0, 1}),
            partition="test",
            gpadls=GPADLS,
            watch=self.watched.__setitem__,
            unwatch=self.watched.pop,
        )
        self.host: Channel = host
        self.handler = self.vsp.open(host, context)
        self.next_id = 1

    def request(self, payload: bytes) -> memoryview | None:
        trans_id, self.next_id = self.next_id, self.next_id + 1
        self.channel.send(payload.ljust(40, b"\0"), flags=COMPLETION_REQUESTED, trans_id=trans_id)
        self.host.service(self.handler.on_packet, self.handler.reserve)
        while (reply := self.channel.poll()) is not None:
            if reply.type == PacketType.COMP:  # others: RNDIS replies on the receive path
                assert reply.trans_id == trans_id
                return reply.payload
        return None

    def status(self, payload: bytes, cls: type) -> int:
        reply = self.request(payload)
        assert reply is not None
        return int(nvsp.decode(reply, cls).status)

    def initialize(self) -> None:
        init = nvsp.encode(nvsp.NvspInit(min_protocol_ver=0x60001, max_protocol_ver=0x60001))
        assert self.status(init, nvsp.NvspInitComplete) == nvsp.NvspStatus.SUCCESS
        recv = nvsp.encode(nvsp.SendReceiveBuffer(gpadl_handle=RECV))
        assert self.status(recv, nvsp.SendReceiveBufferComplete) == nvsp.NvspStatus.SUCCESS
        send = nvsp.encode(nvsp.SendSendBuffer(gpadl_handle=SEND))
        assert self.status(send, nvsp.SendSendBufferComplete) == nvsp.NvspStatus.SUCCESS
        control = r.RndisClient().initialize()
        assert self.rndis(control, 0, channel=nvsp.RndisChannel.CONTROL) == 1
        assert self.handler.rndis.initialized

    def rndis(self, message: bytes, section: int, channel: int = nvsp.RndisChannel.DATA) -> int:
        offset = 80 * PAGE_SIZE + section * 6144
        self.memory.view(offset, len(message))[:] = message
        packet = nvsp.send_rndis_packet(channel, section, len(message))
        return self.status(packet, nvsp.SendRndisPacketComplete)


@pytest.fixture
def guest() -> Iterator[Guest]:
    with GuestMemory.create(1 << 20) as memory:
        g = Guest(memory)
        yield g
        g.handler.close()
        del g


def test_guest_sends_rndis_before_init(guest: Guest) -> None:
    packet = nvsp.send_rndis_packet(nvsp.RndisChannel.DATA, 0, 60)
    assert guest.status(packet, nvsp.SendRndisPacketComplete) == nvsp.NvspStatus.FAIL
    assert guest.handler.nvsp.errors.total() == 1
    guest.initialize()  # the channel goes on


def test_guest_names_receive_buffer_it_never_granted(guest: Guest) -> None:
    init = nvsp.encode(nvsp.NvspInit(min_protocol_ver=0x60001, max_protocol_ver=0x60001))
    guest.request(init)
    unknown = nvsp.encode(nvsp.SendReceiveBuffer(gpadl_handle=0xDEAD))
    assert guest.status(unknown, nvsp.SendReceiveBufferComplete) == nvsp.NvspStatus.FAIL
    ok = nvsp.encode(nvsp.SendReceiveBuffer(gpadl_handle=RECV))
    assert guest.status(ok, nvsp.SendReceiveBufferComplete) == nvsp.NvspStatus.SUCCESS
    again = nvsp.encode(nvsp.SendSendBuffer(gpadl_handle=RECV))  # the same GPADL twice
    assert guest.status(again, nvsp.SendSendBufferComplete) == nvsp.NvspStatus.FAIL


def test_guest_names_send_section_out_of_range(guest: Guest) -> None:
    guest.initialize()
    packet = nvsp.send_rndis_packet(nvsp.RndisChannel.DATA, 10_000, 60)
    assert guest.status(packet, nvsp.SendRndisPacketComplete) == nvsp.NvspStatus.INVALID_RNDIS_PKT


def test_guest_claims_rndis_length_beyond_its_message(guest: Guest) -> None:
    guest.initialize()
    frame = eth.ethernet(eth.BROADCAST, MAC, 0x88B5, b"x" * 46)
    message = bytearray(r.encode_packet(frame))
    message[4:8] = (len(message) + 4096).to_bytes(4, "little")  # msg_len past the section
    assert guest.rndis(bytes(message), 0) == nvsp.NvspStatus.INVALID_RNDIS_PKT
    assert guest.peer.receive(10) == []  # nothing reached the wire
    good = r.encode_packet(frame)
    assert guest.rndis(good, 1) == nvsp.NvspStatus.SUCCESS
    assert guest.peer.receive(10) == [frame]


def test_guest_sends_oversize_frame(guest: Guest) -> None:
    guest.initialize()
    huge = eth.ethernet(eth.BROADCAST, MAC, 0x88B5, bytes(3000))
    status = guest.rndis(r.encode_packet(huge), 0)
    assert status == nvsp.NvspStatus.SUCCESS  # accepted by NVSP, dropped by the medium
    assert guest.peer.receive(10) == [] and guest.vsp.backend.drops == 1
