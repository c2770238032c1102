"""Helpers shared by the SCSI target tests: sense bytes, CDB builders and
ways to run a command with a data buffer. Spelled out by hand from SPC-4 and
SBC-3, never built from scsi_wire, so that a wrong layout cannot agree with
itself."""

from __future__ import annotations

import struct

from vmbus.channel import COMPLETION_REQUESTED
from vmbus.protocols import storage as vstor
from vmbus.testing import VspHarness
from vsp.storage.backends import RamBackend
from vsp.storage.scsi import ScsiDisk, ScsiResult, ScsiTarget

MIB = 1 << 20
BLOCKS = MIB // 512
OUT, IN, NONE = 0, 1, 2  # vmscsi_request.data_in


def sense(key: int, asc: int, ascq: int = 0) -> bytes:
    """Fixed-format sense data, current error (SPC-4 §4.5.3)."""
    return bytes([0x70, 0, key, 0, 0, 0, 0, 10, 0, 0, 0, 0, asc, ascq, 0, 0, 0, 0])


NO_SENSE = sense(0, 0)
READ_ERROR = sense(3, 0x11)
WRITE_ERROR = sense(3, 0x0C)
PARAMETER_LIST_LENGTH = sense(5, 0x1A)
INVALID_OPCODE = sense(5, 0x20)
LBA_RANGE = sense(5, 0x21)
INVALID_FIELD = sense(5, 0x24)
NO_SUCH_LUN = sense(5, 0x25)
INVALID_PARAMETER = sense(5, 0x26)
SAVING_UNSUPPORTED = sense(5, 0x39)
CAPACITY_CHANGED = sense(6, 0x2A, 0x09)
WRITE_PROTECTED = sense(7, 0x27)
NO_SPACE = sense(7, 0x27, 0x07)
GOOD = ScsiResult(0, b"", 0)

Unit = ScsiDisk | ScsiTarget


def execute(
    unit: Unit, cdb: bytes, data: list[memoryview], direction: int, lun: int = 0
) -> ScsiResult:
    if isinstance(unit, ScsiTarget):
        return unit.execute(lun, cdb, data, direction)
    return unit.execute(cdb, data, direction)


def run(unit: Unit, cdb: bytes, data: bytes = b"", direction: int = NONE) -> ScsiResult:
    return execute(unit, cdb, [memoryview(bytearray(data))] if data else [], direction)


def data_in(unit: Unit, cdb: bytes, size: int = 4096, lun: int = 0) -> tuple[ScsiResult, bytes]:
    buffer = bytearray(size)
    result = execute(unit, cdb, [memoryview(buffer)], IN, lun)
    return result, bytes(buffer[: result.transferred])


def failed(result: ScsiResult) -> bytes:
    assert result.status == 2 and result.transferred == 0, result
    return result.sense


def rw(opcode: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    """A READ/WRITE/VERIFY/WRITE SAME/SYNCHRONIZE CACHE CDB of any size."""
    size = {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}[opcode >> 5]
    if size == 6:
        return struct.pack(">BBHBB", opcode, lba >> 16, lba & 0xFFFF, blocks, 0)
    layout = {10: ">BBIBHB", 12: ">BBIIBB", 16: ">BBQIBB"}[size]
    fields = (lba, 0, blocks) if size == 10 else (lba, blocks, 0)
    return struct.pack(layout, opcode, flags, *fields, 0)


def pattern(length: int, seed: int = 1) -> bytes:
    return bytes((i * 13 + seed) % 251 for i in range(length))


class SpyBackend(RamBackend):
    """A RAM disk that records flushes, discards and write-zeroes."""

    def __init__(self, size: int = MIB, block_size: int = 512) -> None:
        super().__init__(size, block_size)
        self.calls: list[tuple[str, int, int]] = []

    def flush(self) -> None:
        self.calls.append(("flush", 0, 0))

    def discard(self, offset: int, length: int) -> None:
        self.calls.append(("discard", offset, length))
        super().discard(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        self.calls.append(("write_zeroes", offset, length))
        super().write_zeroes(offset, length)


def unmap(
    disk: ScsiDisk,
    *ranges: tuple[int, int],
    descriptor_length: int | None = None,
    length: int | None = None,
    flags: int = 0,
) -> ScsiResult:
    """UNMAP with a parameter list of `ranges`; the lengths can be forced."""
    descriptors = b"".join(struct.pack(">QI4x", lba, blocks) for lba, blocks in ranges)
    size = len(descriptors) if descriptor_length is None else descriptor_length
    params = struct.pack(">HH4x", 6 + len(descriptors), size) + descriptors
    cdb = struct.pack(">BBIBHB", 0x42, flags, 0, 0, len(params) if length is None else length, 0)
    return run(disk, cdb, params, OUT)


def negotiate(harness: VspHarness, versions: tuple[int, ...] | None = None) -> None:
    """Run storvsc's VSTOR handshake over a harnessed channel."""
    protocol = vstor.StorvscProtocol() if versions is None else vstor.StorvscProtocol(versions)
    packet = protocol.start()
    while packet is not None:
        harness.guest.send(packet, flags=COMPLETION_REQUESTED, trans_id=1 << 40)
        harness.pump()
        reply = harness.guest.poll()
        assert reply is not None
        packet = protocol.receive(reply.payload)
