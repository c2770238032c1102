"""storvsp against a hostile guest, in one process: the real VSP on one end
of a channel pair, hand-made VSTOR packets on the other. Every bad request
is completed with the right error; nothing escapes; nothing else suffers."""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmbus import guid
from vmbus.channel import COMPLETION_REQUESTED
from vmbus.device import OpenContext
from vmbus.host import OfferSpec
from vmbus.memory import PAGE_SIZE, GuestMemory
from vmbus.packet import GpaRange, PacketType, encode_gpa_direct_header
from vmbus.protocols import storage as vstor
from vmbus.testing import channel_pair
from vsp.storage import StorVsp
from vsp.storage.backends import FaultyBackend, RamBackend

MiB = 1 << 20
RING_PFNS = frozenset({0, 1})  # pretend the channel's rings live in pages 0 and 1
DATA_PFN = 16  # first page of the guest's data buffer


class Guest:
    """The guest end, speaking VSTOR by hand."""

    def __init__(self, vsp: StorVsp, memory: GuestMemory, request_ring: int = 64 << 10) -> None:
        self.memory = memory
        self.channel, host = channel_pair(request_ring)
        context = OpenContext(
            OfferSpec(guid.SCSI, uuid.uuid4()),
            memory,
            ring_pfns=RING_PFNS,
            partition="test",
            add_offer=print,
        )
        self.host, self.handler = host, vsp.open(host, context)
        self.next_id = 1
        protocol = vstor.StorvscProtocol()
        packet = protocol.start()
        while packet is not None:
            packet = protocol.receive(self.request(packet))

    def send(self, payload: bytes, header: bytes = b"") -> int:
        trans_id, self.next_id = self.next_id, self.next_id + 1
        kind = PacketType.DATA_USING_GPA_DIRECT if header else PacketType.DATA_INBAND
        self.channel.send(
            payload, type=kind, flags=COMPLETION_REQUESTED, trans_id=trans_id, header=header
        )
        return trans_id

    def request(self, payload: bytes, header: bytes = b"") -> memoryview:
        trans_id = self.send(payload, header)
        self.host.service(self.handler.on_packet, self.handler.reserve)
        reply = self.channel.poll()
        assert reply is not None and reply.trans_id == trans_id
        assert reply.type == PacketType.COMP
        return reply.payload

    def srb(
        self, cdb: bytes, direction: int, length: int, ranges: list[GpaRange] | None = None
    ) -> vstor.SrbCompletion:
        if ranges is None and length:
            ranges = [GpaRange(length, 0, tuple(range(DATA_PFN, DATA_PFN + -(-length // 4096))))]
        header = encode_gpa_direct_header(ranges) if ranges else b""
        packet = vstor.build_srb(cdb, 0, direction, length)
        return vstor.parse_completion(self.request(packet, header))


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory.create(MiB) as guest_memory:
        yield guest_memory


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


READ, WRITE, NONE = 1, 0, 2


def test_reads_and_writes_move_data_through_guest_pages(memory: GuestMemory) -> None:
    guest = Guest(StorVsp([RamBackend(MiB)]), memory)
    memory.view(DATA_PFN * PAGE_SIZE, 8192)[:] = bytes(range(256)) * 32
    assert guest.srb(write10(8, 16), WRITE, 8192).succeeded
    memory.view(DATA_PFN * PAGE_SIZE, 8192)[:] = bytes(8192)
    completion = guest.srb(read10(8, 16), READ, 8192)
    assert completion.succeeded and completion.transferred == 8192
    assert bytes(memory.view(DATA_PFN * PAGE_SIZE, 8192)) == bytes(range(256)) * 32


def test_guest_names_pages_beyond_its_memory(memory: GuestMemory) -> None:
    vsp = StorVsp([RamBackend(MiB)])
    guest = Guest(vsp, memory)
    beyond = [GpaRange(4096, 0, (memory.page_count + 3,))]
    completion = guest.srb(read10(0, 8), READ, 4096, beyond)
    assert completion.srb_status & 0x3F == vstor.SrbStatus.INVALID_REQUEST
    assert vsp.errors >= 1
    assert guest.srb(read10(0, 8), READ, 4096).succeeded  # the channel goes on


def test_guest_points_data_at_its_own_ring(memory: GuestMemory) -> None:
    vsp = StorVsp([RamBackend(MiB)])
    guest = Guest(vsp, memory)
    ring_page = [GpaRange(4096, 0, (min(RING_PFNS),))]
    completion = guest.srb(read10(0, 8), READ, 4096, ring_page)
    assert completion.srb_status & 0x3F == vstor.SrbStatus.INVALID_REQUEST
    assert guest.srb(read10(0, 8), READ, 4096).succeeded


def test_guest_asks_more_than_its_buffer_holds(memory: GuestMemory) -> None:
    guest = Guest(StorVsp([RamBackend(MiB)]), memory)
    small = [GpaRange(4096, 0, (DATA_PFN,))]
    completion = guest.srb(read10(0, 16), READ, 8192, small)  # 8 KiB into 4 KiB
    assert completion.srb_status & 0x3F == vstor.SrbStatus.INVALID_REQUEST


def test_guest_transfers_more_than_max_transfer(memory: GuestMemory) -> None:
    guest = Guest(StorVsp([RamBackend(MiB)], max_transfer_bytes=64 << 10), memory)
    completion = guest.srb(read10(0, 256), READ, 128 << 10)
    assert completion.srb_status & 0x3F == vstor.SrbStatus.INVALID_REQUEST


def test_guest_cdb_disagrees_with_its_buffer(memory: GuestMemory) -> None:
    guest = Guest(StorVsp([RamBackend(MiB)]), memory)
    completion = guest.srb(read10(0, 16), READ, 4096)  # CDB says 8 KiB, buffer 4 KiB
    assert completion.scsi_status == 0x02  # CHECK CONDITION
    assert (completion.sense[2] & 0xF, completion.sense[12]) == (0x5, 0x24)


def test_guest_addresses_unknown_lun(memory: GuestMemory) -> None:
    guest = Guest(StorVsp({0: RamBackend(MiB)}), memory)
    packet = vstor.build_srb(read10(0, 1), 9, READ, 0)
    completion = vstor.parse_completion(guest.request(packet))
    assert completion.srb_status & 0x3F == vstor.SrbStatus.INVALID_LUN


def test_backend_error_fails_that_request_only(memory: GuestMemory) -> None:
    backend = FaultyBackend(RamBackend(MiB), fail_reads=[(64 * 512, 65 * 512)])
    guest = Guest(StorVsp([backend]), memory)
    completion = guest.srb(read10(64, 1), READ, 512)
    assert completion.srb_status & 0x3F == vstor.SrbStatus.ERROR
    assert (completion.sense[2] & 0xF, completion.sense[12]) == (0x3, 0x11)  # MEDIUM ERROR
    assert guest.srb(read10(63, 1), READ, 512).succeeded
    assert guest.srb(read10(65, 1), READ, 512).succeeded


def test_guest_floods_requests_without_reading_replies(memory: GuestMemory) -> None:
    """More requests than the reply ring can hold: the VSP takes only what it
    can answer, and every request is answered once the guest reads."""
    guest = Guest(StorVsp([RamBackend(MiB)]), memory, request_ring=256 << 10)
    sent = [guest.send(vstor.build_srb(read10(0, 1), 0, NONE, 0)) for _ in range(1500)]
    answered: list[int] = []
    for _ in range(200):
        guest.host.service(guest.handler.on_packet, guest.handler.reserve)
        while (reply := guest.channel.poll()) is not None:
            answered.append(reply.trans_id)
        if len(answered) == len(sent):
            break
    assert answered == sent


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cdb=st.binary(min_size=1, max_size=16),
    direction=st.integers(0, 2),
    length=st.integers(0, 16 << 10),
    pages=st.integers(0, 5),
)
def test_any_cdb_gets_one_completion(cdb: bytes, direction: int, length: int, pages: int) -> None:
    with GuestMemory.create(MiB) as memory:
        guest = Guest(StorVsp([RamBackend(256 << 10)]), memory)
        ranges = (
            [GpaRange(pages * 4096, 0, tuple(range(DATA_PFN, DATA_PFN + pages)))] if pages else []
        )
        header = encode_gpa_direct_header(ranges) if ranges else b""
        packet = vstor.build_srb(cdb, 0, direction, length)
        completion = vstor.parse_completion(guest.request(packet, header))
        assert completion.transferred <= length
        assert completion.scsi_status in (0x00, 0x02)
        del guest
