"""storvsp against a hostile guest, in one process: the real VSP on one end
of a channel pair, hand-made VSTOR packets on the other. Every bad request
is completed with the right error; nothing escapes; nothing else suffers.
Driven through vmbus.testing.VspHarness (pages 0 and 1 stand for the rings)."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmbus.channel import COMPLETION_REQUESTED
from vmbus.memory import PAGE_SIZE
from vmbus.packet import GpaRange, PacketType, encode_gpa_direct_header
from vmbus.protocols import storage as vstor
from vmbus.testing import VspHarness
from vmbus.testing.harness import RING_PFNS
from vsp.storage import FaultyBackend, RamBackend, StorVsp

MiB = 1 << 20
DATA_PAGES = 64  # the guest's data buffer: up to 256 KiB


class Guest:
    """The guest end of a VspHarness, speaking VSTOR by hand."""

    def __init__(self, vsp: StorVsp, request_ring: int = 64 << 10, memory: int = 2 * MiB) -> None:
        self.harness = VspHarness(vsp, memory_size=memory, ring_size=request_ring)
        self.memory, self.channel = self.harness.memory, self.harness.guest
        self.data_pfn = self.harness.allocate(DATA_PAGES)[0]
        self.next_id = 1
        protocol = vstor.StorvscProtocol()
        packet = protocol.start()
        while packet is not None:
            packet = protocol.receive(self.request(packet))

    def data(self, length: int) -> memoryview:
        """The first `length` bytes of the data buffer."""
        return self.memory.view(self.data_pfn * PAGE_SIZE, length)

    def send(self, payload: bytes, header: bytes = b"") -> int:
        trans_id, self.next_id = self.next_id, self.next_id + 1
        kind = PacketType.DATA_USING_GPA_DIRECT if header else PacketType.DATA_INBAND
        self.channel.send(
            payload, type=kind, flags=COMPLETION_REQUESTED, trans_id=trans_id, header=header
        )
        return trans_id

    def request(self, payload: bytes, header: bytes = b"") -> memoryview:
        trans_id = self.send(payload, header)
        self.harness.pump(1)
        reply = self.channel.poll()
        assert reply is not None and reply.trans_id == trans_id
        assert reply.type == PacketType.COMP
        return reply.payload

    def srb(
        self, cdb: bytes, direction: int, length: int, ranges: list[GpaRange] | None = None
    ) -> vstor.SrbCompletion:
        if ranges is None and length:
            pages = -(-length // PAGE_SIZE)
            ranges = [GpaRange(length, 0, tuple(range(self.data_pfn, self.data_pfn + pages)))]
        header = encode_gpa_direct_header(ranges) if ranges else b""
        packet = vstor.build_srb(cdb, 0, direction, length)
        return vstor.parse_completion(self.request(packet, header))


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


READ, WRITE, NONE = 1, 0, 2


def test_reads_and_writes_move_data_through_guest_pages() -> None:
    guest = Guest(StorVsp([RamBackend(MiB)]))
    guest.data(8192)[:] = bytes(range(256)) * 32
    assert guest.srb(write10(8, 16), WRITE, 8192).succeeded
    guest.data(8192)[:] = bytes(8192)
    completion = guest.srb(read10(8, 16), READ, 8192)
    assert completion.succeeded and completion.transferred == 8192
    assert bytes(guest.data(8192)) == bytes(range(256)) * 32


def test_guest_names_pages_beyond_its_memory() -> None:
    vsp = StorVsp([RamBackend(MiB)])
    guest = Guest(vsp)
    beyond = [GpaRange(4096, 0, (guest.memory.page_count + 3,))]
    completion = guest.srb(read10(0, 8), READ, 4096, beyond)
    assert completion.srb_status & 0x3F == vstor.SrbStatus.INVALID_REQUEST
    assert vsp.errors >= 1
    assert guest.srb(read10(0, 8), READ, 4096).succeeded  # the channel goes on


def test_guest_points_data_at_its_own_ring() -> None:
    vsp = StorVsp([RamBackend(MiB)])
    guest = Guest(vsp)
    ring_page = [GpaRange(4096, 0, (min(RING_PFNS),))]
    completion = guest.srb(read10(0, 8), READ, 4096, ring_page)
    assert completion.srb_status & 0x3F == vstor.SrbStatus.INVALID_REQUEST
    assert guest.srb(read10(0, 8), READ, 4096).succeeded


def test_guest_asks_more_than_its_buffer_holds() -> None:
    guest = Guest(StorVsp([RamBackend(MiB)]))
    small = [GpaRange(4096, 0, (guest.data_pfn,))]
    completion = guest.srb(read10(0, 16), READ, 8192, small)  # 8 KiB into 4 KiB
    assert completion.srb_status & 0x3F == vstor.SrbStatus.INVALID_REQUEST


def test_guest_transfers_more_than_max_transfer() -> None:
    guest = Guest(StorVsp([RamBackend(MiB)], max_transfer_bytes=64 << 10))
    completion = guest.srb(read10(0, 256), READ, 128 << 10)
    assert completion.srb_status & 0x3F == vstor.SrbStatus.INVALID_REQUEST


def test_guest_cdb_disagrees_with_its_buffer() -> None:
    guest = Guest(StorVsp([RamBackend(MiB)]))
    completion = guest.srb(read10(0, 16), READ, 4096)  # CDB says 8 KiB, buffer 4 KiB
    assert completion.scsi_status == 0x02  # CHECK CONDITION
    assert (completion.sense[2] & 0xF, completion.sense[12]) == (0x5, 0x24)


def test_guest_addresses_unknown_lun() -> None:
    guest = Guest(StorVsp({0: RamBackend(MiB)}))
    packet = vstor.build_srb(read10(0, 1), 9, READ, 0)
    completion = vstor.parse_completion(guest.request(packet))
    assert completion.srb_status & 0x3F == vstor.SrbStatus.INVALID_LUN


def test_backend_error_fails_that_request_only() -> None:
    backend = FaultyBackend(RamBackend(MiB), fail_reads=[(64 * 512, 65 * 512)])
    guest = Guest(StorVsp([backend]))
    completion = guest.srb(read10(64, 1), READ, 512)
    assert completion.srb_status & 0x3F == vstor.SrbStatus.ERROR
    assert (completion.sense[2] & 0xF, completion.sense[12]) == (0x3, 0x11)  # MEDIUM ERROR
    assert guest.srb(read10(63, 1), READ, 512).succeeded
    assert guest.srb(read10(65, 1), READ, 512).succeeded


def test_guest_floods_requests_without_reading_replies() -> None:
    """More requests than the reply ring can hold: the VSP takes only what it
    can answer, and every request is answered once the guest reads."""
    guest = Guest(StorVsp([RamBackend(MiB)]), request_ring=256 << 10)
    sent = [guest.send(vstor.build_srb(read10(0, 1), 0, NONE, 0)) for _ in range(1500)]
    answered: list[int] = []
    for _ in range(200):
        guest.harness.pump(1)
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
    guest = Guest(StorVsp([RamBackend(256 << 10)]), memory=MiB)
    first = guest.data_pfn
    ranges = [GpaRange(pages * PAGE_SIZE, 0, tuple(range(first, first + pages)))] if pages else []
    header = encode_gpa_direct_header(ranges) if ranges else b""
    packet = vstor.build_srb(cdb, 0, direction, length)
    completion = vstor.parse_completion(guest.request(packet, header))
    assert completion.transferred <= length
    assert completion.scsi_status in (0x00, 0x02)
    guest.harness.close()
