"""StorVsp as a device, through vmbus.testing.VspHarness: which SCSI
addresses answer when a guest scans the bus as Linux does, the one
transfer limit it advertises and enforces, and what it keeps of a channel
after the channel closes."""

from __future__ import annotations

import struct

import pytest

from vmbus.channel import COMPLETION_REQUESTED
from vmbus.memory import PAGE_SIZE
from vmbus.packet import GpaRange, PacketType, encode_gpa_direct_header
from vmbus.protocols import storage as vstor
from vmbus.testing import VspHarness
from vsp.storage import RamBackend, StorVsp

MiB = 1 << 20
READ, NONE = 1, 2
INQUIRY_LENGTH = 36


class Initiator:
    """A guest's storvsc on a harnessed channel: VSTOR by hand, SCSI
    commands addressed to any path, target and LUN."""

    def __init__(self, vsp: StorVsp) -> None:
        self.harness = VspHarness(vsp)
        self.buffer_pfn = self.harness.allocate(16)[0]
        self.trans_ids = iter(range(1, 1 << 30))
        protocol = vstor.StorvscProtocol()
        packet = protocol.start()
        while packet is not None:
            packet = protocol.receive(self.request(packet))
        self.properties = protocol.properties

    def request(self, payload: bytes, header: bytes = b"") -> bytes:
        trans_id = next(self.trans_ids)
        kind = PacketType.DATA_USING_GPA_DIRECT if header else PacketType.DATA_INBAND
        self.harness.guest.send(
            payload, type=kind, flags=COMPLETION_REQUESTED, trans_id=trans_id, header=header
        )
        self.harness.pump(1)
        reply = self.harness.guest.poll()
        assert reply is not None and reply.trans_id == trans_id
        return bytes(reply.payload)

    def command(
        self, cdb: bytes, length: int, address: tuple[int, int, int] = (0, 0, 0)
    ) -> tuple[vstor.SrbCompletion, bytes]:
        """Run a data-in command; its completion and the whole buffer."""
        path, target, lun = address
        buffer = self.harness.memory.view(self.buffer_pfn * PAGE_SIZE, max(length, 1))
        buffer[:] = bytes(len(buffer))
        pages = tuple(range(self.buffer_pfn, self.buffer_pfn + -(-length // PAGE_SIZE)))
        header = encode_gpa_direct_header([GpaRange(length, 0, pages)]) if length else b""
        packet = vstor.build_srb(
            cdb, lun, READ if length else NONE, length, target_id=target, path_id=path
        )
        completion = vstor.parse_completion(self.request(packet, header))
        return completion, bytes(buffer)


def inquiry(page: int | None = None, length: int = INQUIRY_LENGTH) -> bytes:
    evpd = 0 if page is None else 1
    return struct.pack(">BBBHB", 0x12, evpd, page or 0, length, 0)


def report_luns(length: int = 4096) -> bytes:
    return struct.pack(">BBB3xIBB", 0xA0, 0, 0, length, 0, 0)


def linux_inquiry(guest: Initiator, address: tuple[int, int, int]) -> bytes:
    """INQUIRY as Linux sees it: storvsc forces every INQUIRY completion to
    success and keeps data_transfer_length; scsi_probe_lun zeroes its buffer
    first, so what was not moved reads as zero."""
    completion, data = guest.command(inquiry(), INQUIRY_LENGTH, address)
    return data[: completion.transferred].ljust(INQUIRY_LENGTH, b"\0")


def is_logical_unit(data: bytes) -> bool:
    """scsi_probe_and_add_lun: qualifier 3, or 1 with type 1Fh, is no LU."""
    qualifier, kind = data[0] >> 5, data[0] & 0x1F
    return qualifier != 3 and not (qualifier == 1 and kind == 0x1F)


def linux_scan(guest: Initiator) -> list[tuple[int, int, int]]:
    """The disks a Linux guest finds: each channel (path) and target, LUN 0
    first, then REPORT LUNS for the rest (storvsc sets BLIST_REPORTLUN2),
    falling back to a sequential scan when REPORT LUNS fails."""
    found = []
    for path in range(vstor.SCSI_MAX_PATHS):
        for target in range(vstor.SCSI_MAX_TARGETS):
            lun0 = linux_inquiry(guest, (path, target, 0))
            if is_logical_unit(lun0):
                found.append((path, target, 0))
            elif lun0[0] >> 5 != 3:
                continue  # no target at all
            completion, data = guest.command(report_luns(), 4096, (path, target, 0))
            if completion.succeeded and completion.scsi_status == 0:
                count = struct.unpack_from(">I", data)[0] // 8
                for i in range(count):
                    lun = struct.unpack_from(">H", data, 8 + 8 * i)[0] & 0x3FFF
                    if lun and is_logical_unit(linux_inquiry(guest, (path, target, lun))):
                        found.append((path, target, lun))
                continue
            for lun in range(1, 8):  # REPORT LUNS failed (DID_NO_CONNECT...): one by one
                if not is_logical_unit(linux_inquiry(guest, (path, target, lun))):
                    break
                found.append((path, target, lun))
    return found


@pytest.mark.parametrize("luns", [[0], [0, 3, 7], [2, 5]], ids=str)
def test_guest_scanning_every_path_and_target_finds_each_disk_once(luns: list[int]) -> None:
    guest = Initiator(StorVsp({lun: RamBackend(MiB) for lun in luns}))
    assert linux_scan(guest) == [(0, 0, lun) for lun in luns]


def test_absent_path_or_target_answers_as_hyper_v_does_for_no_device() -> None:
    guest = Initiator(StorVsp([RamBackend(MiB)]))
    for address in [(1, 0, 0), (0, 1, 0), (7, 1, 3)]:
        completion, _ = guest.command(struct.pack(">BBIBHB", 0x28, 0, 0, 0, 1, 0), 512, address)
        assert completion.srb_status == vstor.SrbStatus.INVALID_LUN  # Linux: DID_NO_CONNECT
        assert completion.transferred == 0
        completion, data = guest.command(inquiry(), INQUIRY_LENGTH, address)
        assert completion.srb_status == vstor.SrbStatus.INVALID_LUN
        assert data[0] == 0x7F  # and, for Linux's forced success: no logical unit here
    assert guest.harness.vsp.errors == 0  # scanning is no protocol error


@pytest.mark.parametrize("max_transfer", [64 << 10, 1 << 20, 2 << 20])
def test_block_limits_advertise_the_transfer_limit_storvsp_enforces(max_transfer: int) -> None:
    guest = Initiator(StorVsp([RamBackend(4 * MiB)], max_transfer_bytes=max_transfer))
    assert guest.properties is not None
    assert guest.properties.max_transfer_bytes == max_transfer
    completion, page = guest.command(inquiry(0xB0, 64), 64)
    assert completion.succeeded
    advertised = struct.unpack_from(">I", page, 8)[0] * 512  # MAXIMUM TRANSFER LENGTH
    assert advertised == max_transfer
    blocks = advertised // 512
    read16 = struct.pack(">BBQIBB", 0x88, 0, 0, blocks, 0, 0)
    harness, pfn = guest.harness, guest.harness.allocate(max_transfer // PAGE_SIZE)[0]
    header = encode_gpa_direct_header(
        [GpaRange(max_transfer, 0, tuple(range(pfn, pfn + max_transfer // PAGE_SIZE)))]
    )
    packet = vstor.build_srb(read16, 0, READ, max_transfer)
    assert vstor.parse_completion(guest.request(packet, header)).succeeded
    assert harness.vsp.errors == 0


def test_closed_channel_leaves_no_handler_but_its_errors_count() -> None:
    vsp = StorVsp([RamBackend(MiB)])
    for cycle in range(1, 4):
        guest = Initiator(vsp)  # opens the primary again
        guest.request(vstor.VstorPacket(vstor.Operation.FCHBA_DATA).encode())  # unsupported
        assert len(vsp.handlers) == 1
        guest.harness.close()
        assert vsp.handlers == []
        assert vsp.errors == cycle
    assert vsp.served[0] == 3 * 5  # each time: 4 initialization packets and the bad one
