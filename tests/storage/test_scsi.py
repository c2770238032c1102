"""The SCSI disk target, command by command: exact parameter data and sense
bytes, per-request medium errors, unit attention. The Hypothesis tests are
in test_scsi_properties."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest
from scsi_support import (
    BLOCKS,
    CAPACITY_CHANGED,
    GOOD,
    IN,
    INVALID_FIELD,
    INVALID_OPCODE,
    INVALID_PARAMETER,
    LBA_RANGE,
    MIB,
    NO_SENSE,
    NO_SPACE,
    NO_SUCH_LUN,
    NONE,
    OUT,
    PARAMETER_LIST_LENGTH,
    READ_ERROR,
    SAVING_UNSUPPORTED,
    WRITE_ERROR,
    WRITE_PROTECTED,
    SpyBackend,
    data_in,
    failed,
    pattern,
    run,
    rw,
    unmap,
)

from vsp.storage.backends import (
    FaultyBackend,
    NullBackend,
    RamBackend,
    RawFileBackend,
    ReadOnlyBackend,
)
from vsp.storage.scsi import MAX_TRANSFER_BYTES, ScsiDisk, ScsiResult, ScsiTarget


@pytest.fixture
def spy() -> SpyBackend:
    return SpyBackend()


@pytest.fixture
def disk(spy: SpyBackend) -> ScsiDisk:
    return ScsiDisk(spy, serial="SERIAL42", device_id=0x123456789ABCDEF)


def read_only_disk() -> ScsiDisk:
    return ScsiDisk(ReadOnlyBackend(RamBackend(MIB)), serial="RO")


# --- simple commands and malformed CDBs ---


def test_test_unit_ready_start_stop_and_verify(disk: ScsiDisk) -> None:
    assert run(disk, bytes(6)) == GOOD
    assert run(disk, bytes([0x1B, 0, 0, 0, 1, 0])) == GOOD
    assert run(disk, bytes(6) + bytes(10)) == GOOD  # storvsc's padded 16-byte cdb
    for op in (0x2F, 0x8F):
        assert run(disk, rw(op, BLOCKS - 4, 4)) == GOOD
        assert failed(run(disk, rw(op, BLOCKS - 4, 5))) == LBA_RANGE
        assert failed(run(disk, rw(op, 0, 1, flags=0x02))) == INVALID_FIELD  # BYTCHK


@pytest.mark.parametrize(
    ("cdb", "expected"),
    [
        (b"", INVALID_OPCODE),
        (b"\xff" + bytes(15), INVALID_OPCODE),
        (b"\x01" + bytes(5), INVALID_OPCODE),  # REZERO UNIT: not ours
        (bytes([0x28]) + bytes(8), INVALID_FIELD),  # READ (10) cut short
        (bytes([0, 0, 0, 0, 0, 0x04]), INVALID_FIELD),  # NACA
        (bytes([0, 0, 0, 0, 0, 0x01]), INVALID_FIELD),  # LINK
    ],
)
def test_malformed_cdbs(disk: ScsiDisk, cdb: bytes, expected: bytes) -> None:
    assert failed(run(disk, cdb)) == expected
    assert disk.check_conditions == 1


def test_request_sense(disk: ScsiDisk) -> None:
    assert data_in(disk, bytes([0x03, 0, 0, 0, 252, 0])) == (ScsiResult(0, b"", 18), NO_SENSE)
    assert data_in(disk, bytes([0x03, 0, 0, 0, 8, 0]))[1] == NO_SENSE[:8]
    assert failed(run(disk, bytes([0x03, 1, 0, 0, 18, 0]))) == INVALID_FIELD  # DESC


# --- INQUIRY ---


def test_standard_inquiry(disk: ScsiDisk) -> None:
    expected = bytes([0, 0, 6, 0x12, 31, 0, 0, 2]) + b"VMBUSPY VirtualDisk     0001"
    assert data_in(disk, bytes([0x12, 0, 0, 0, 255, 0])) == (ScsiResult(0, b"", 36), expected)
    assert data_in(disk, bytes([0x12, 0, 0, 0, 5, 0]))[1] == expected[:5]
    assert data_in(disk, bytes([0x12, 0, 0, 1, 0, 0]), size=10)[1] == expected[:10]
    assert data_in(disk, bytes([0x12, 0, 0, 0, 0, 0])) == (GOOD, b"")


VPD_B0 = struct.pack(
    ">BBHBBHIIIIIIIQ20x", 0, 0xB0, 0x3C, 1, 0, 0, 2048, 0, 0, 2 * MIB, 256, 8, 0, 512 * 1024
)


@pytest.mark.parametrize(
    ("page", "expected"),
    [
        (0x00, bytes.fromhex("0000 0006 00 80 83 b0 b1 b2")),
        (0x80, bytes.fromhex("0080 0008") + b"SERIAL42"),
        (
            0x83,
            bytes.fromhex("0083 0020  01030008 3123456789abcdef  02010010") + b"VMBUSPY SERIAL42",
        ),
        (0xB0, VPD_B0),
        (0xB1, bytes.fromhex("00b1 003c 0001") + bytes(58)),
        (0xB2, bytes.fromhex("00b2 0004 00 e4 02 00")),  # LBPU LBPWS LBPWS10 LBPRZ, thin
    ],
)
def test_vpd_pages(disk: ScsiDisk, page: int, expected: bytes) -> None:
    result, data = data_in(disk, bytes([0x12, 1, page, 0x01, 0x00, 0]))
    assert (result.status, data) == (0, expected)


def test_vpd_pages_of_a_read_only_disk_offer_no_unmap() -> None:
    disk = read_only_disk()
    assert data_in(disk, bytes([0x12, 1, 0xB2, 0, 255, 0]))[1] == bytes.fromhex("00b200040000 0000")
    limits = data_in(disk, bytes([0x12, 1, 0xB0, 0, 255, 0]))[1]
    assert struct.unpack_from(">IIII", limits, 20) == (0, 0, 0, 0)  # unmap count, granularity


def test_default_device_id_is_naa_locally_assigned_from_the_serial() -> None:
    def naa(serial: str) -> bytes:
        disk = ScsiDisk(RamBackend(MIB), serial=serial)
        return data_in(disk, bytes([0x12, 1, 0x83, 0, 255, 0]))[1][8:16]

    assert naa("A") == naa("A") != naa("B")
    assert naa("A")[0] >> 4 == naa("B")[0] >> 4 == 3


@pytest.mark.parametrize(
    "cdb",
    [
        bytes([0x12, 1, 0x81, 0, 255, 0]),  # unsupported VPD page
        bytes([0x12, 0, 0x80, 0, 255, 0]),  # page code without EVPD
        bytes([0x12, 2, 0, 0, 255, 0]),  # CMDDT
    ],
)
def test_bad_inquiry(disk: ScsiDisk, cdb: bytes) -> None:
    assert failed(run(disk, cdb, bytes(255), IN)) == INVALID_FIELD


def test_identity_is_checked() -> None:
    with pytest.raises(ValueError, match="ASCII"):
        ScsiDisk(RamBackend(MIB), vendor="TOO-LONG-VENDOR")
    with pytest.raises(ValueError):
        ScsiDisk(RamBackend(MIB), serial="séri")
    with pytest.raises(ValueError, match="60 bits"):
        ScsiDisk(RamBackend(MIB), device_id=1 << 60)


# --- READ CAPACITY ---


def test_read_capacity_10(disk: ScsiDisk) -> None:
    cdb = bytes([0x25]) + bytes(9)
    assert data_in(disk, cdb) == (ScsiResult(0, b"", 8), bytes.fromhex("000007ff 00000200"))
    four_k = ScsiDisk(RamBackend(MIB, block_size=4096))
    assert data_in(four_k, cdb)[1] == bytes.fromhex("000000ff 00001000")
    huge = ScsiDisk(NullBackend(((1 << 32) + 2) * 512))
    assert data_in(huge, cdb)[1] == bytes.fromhex("ffffffff 00000200")  # use (16)
    assert (
        failed(run(disk, bytes([0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0]), bytes(8), IN)) == INVALID_FIELD
    )
    assert data_in(disk, bytes([0x25, 0, 0, 0, 0, 1, 0, 0, 1, 0]))[0].status == 0  # PMI


def test_read_capacity_16(disk: ScsiDisk) -> None:
    cdb = bytes([0x9E, 0x10]) + bytes(8) + bytes([0, 0, 0, 32, 0, 0])
    expected = bytes.fromhex("00000000000007ff 00000200 00 00 c000") + bytes(16)
    assert data_in(disk, cdb) == (ScsiResult(0, b"", 32), expected)
    assert data_in(disk, cdb[:13] + bytes([12]) + cdb[14:])[1] == expected[:12]
    huge = ScsiDisk(NullBackend(((1 << 32) + 2) * 512))
    assert data_in(huge, cdb)[1][:8] == bytes.fromhex("0000000100000001")
    assert data_in(read_only_disk(), cdb)[1][12:16] == bytes(4)  # no LBPME/LBPRZ
    wrong_action = bytes([0x9E, 0x11]) + cdb[2:]
    assert failed(run(disk, wrong_action, bytes(32), IN)) == INVALID_FIELD


# --- READ and WRITE ---

READ_WRITE = [(0x08, 0x0A), (0x28, 0x2A), (0xA8, 0xAA), (0x88, 0x8A)]


@pytest.mark.parametrize(("read_op", "write_op"), READ_WRITE)
def test_read_write_round_trip(
    read_op: int, write_op: int, spy: SpyBackend, disk: ScsiDisk
) -> None:
    data = pattern(1536)
    segments = [memoryview(bytearray(data[:7])), memoryview(bytearray(data[7:1000]))]
    segments.append(memoryview(bytearray(data[1000:])))
    assert disk.execute(rw(write_op, 5, 3), segments, OUT) == ScsiResult(0, b"", 1536)
    assert spy.data[5 * 512 : 8 * 512] == data and spy.data[: 5 * 512] == bytes(2560)
    out = bytearray(2000)
    views = [memoryview(out)[:100], memoryview(out)[100:1100], memoryview(out)[1100:]]
    assert disk.execute(rw(read_op, 5, 3), views, IN) == ScsiResult(0, b"", 1536)
    assert out[:1536] == data and out[1536:] == bytes(464)  # a residual, untouched


@pytest.mark.parametrize(("read_op", "write_op"), READ_WRITE)
def test_lba_out_of_range(read_op: int, write_op: int, disk: ScsiDisk) -> None:
    for op, direction in ((read_op, IN), (write_op, OUT)):
        assert failed(run(disk, rw(op, BLOCKS - 1, 2), bytes(1024), direction)) == LBA_RANGE
        assert run(disk, rw(op, BLOCKS - 2, 2), bytes(1024), direction).status == 0
        if op >> 5:  # not six-byte CDBs, where length 0 means 256 blocks
            assert run(disk, rw(op, BLOCKS, 0), b"", direction) == GOOD
            assert failed(run(disk, rw(op, BLOCKS + 1, 0), b"", direction)) == LBA_RANGE
    assert failed(run(disk, rw(0x88, (1 << 64) - 1, 1), bytes(512), IN)) == LBA_RANGE


def test_six_byte_length_zero_means_256_blocks(spy: SpyBackend, disk: ScsiDisk) -> None:
    spy.data[:] = pattern(MIB)
    result, data = data_in(disk, rw(0x08, 1, 0), size=256 * 512)
    assert result == ScsiResult(0, b"", 256 * 512) and data == spy.data[512 : 257 * 512]


def test_transfers_are_all_or_nothing(spy: SpyBackend, disk: ScsiDisk) -> None:
    assert failed(run(disk, rw(0x2A, 0, 2), b"\x01" * 1000, OUT)) == INVALID_FIELD
    assert spy.data[:1024] == bytes(1024)
    buffer = bytearray(b"\xee" * 1000)
    assert failed(disk.execute(rw(0x28, 0, 2), [memoryview(buffer)], IN)) == INVALID_FIELD
    assert buffer == b"\xee" * 1000


@pytest.mark.parametrize(
    ("cdb", "direction"),
    [(rw(0x28, 0, 1), OUT), (rw(0x28, 0, 1), NONE), (rw(0x2A, 0, 1), IN), (rw(0x28, 0, 1), 7)],
)
def test_data_phase_against_the_declared_direction(
    disk: ScsiDisk, cdb: bytes, direction: int
) -> None:
    buffer = bytearray(b"\x5a" * 512)
    assert failed(disk.execute(cdb, [memoryview(buffer)], direction)) == INVALID_FIELD
    assert buffer == b"\x5a" * 512


def test_read_only_buffer_cannot_receive_data(disk: ScsiDisk) -> None:
    assert failed(disk.execute(rw(0x28, 0, 1), [memoryview(bytes(512))], IN)) == INVALID_FIELD


def test_transfer_cap_and_protection_fields() -> None:
    disk = ScsiDisk(NullBackend(1 << 34))
    blocks = MAX_TRANSFER_BYTES // 512
    buffer = [memoryview(bytearray(MAX_TRANSFER_BYTES + 512))]
    assert disk.execute(rw(0x88, 0, blocks), buffer, IN).transferred == MAX_TRANSFER_BYTES
    assert failed(disk.execute(rw(0x88, 0, blocks + 1), buffer, IN)) == INVALID_FIELD
    assert failed(disk.execute(rw(0x28, 0, 1, flags=0x20), buffer, IN)) == INVALID_FIELD


def test_writes_to_a_read_only_disk() -> None:
    disk = read_only_disk()
    assert failed(run(disk, rw(0x2A, 0, 1), bytes(512), OUT)) == WRITE_PROTECTED
    assert failed(run(disk, rw(0x2A, BLOCKS, 1), bytes(512), OUT)) == LBA_RANGE  # range first
    assert run(disk, rw(0x28, 0, 1), bytes(512), IN).status == 0
    assert run(disk, rw(0x35, 0, 0)) == GOOD  # nothing to write back, not an error


# --- FUA and SYNCHRONIZE CACHE ---


def test_fua_and_synchronize_cache_flush(spy: SpyBackend, disk: ScsiDisk) -> None:
    def flushes() -> int:
        return spy.calls.count(("flush", 0, 0))

    run(disk, rw(0x2A, 0, 1), bytes(512), OUT)
    run(disk, rw(0x28, 0, 1, flags=0x08), bytes(512), IN)  # FUA read: nothing to flush
    assert flushes() == 0
    for write_op in (0x2A, 0xAA, 0x8A):
        assert run(disk, rw(write_op, 0, 1, flags=0x08), bytes(512), OUT).status == 0
    assert flushes() == 3
    assert run(disk, rw(0x35, 0, 0)) == GOOD and run(disk, rw(0x91, 10, 5)) == GOOD
    assert flushes() == 5
    assert failed(run(disk, rw(0x91, BLOCKS, 1))) == LBA_RANGE
    assert flushes() == 5


def test_file_backend_fua_and_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    monkeypatch.setattr(os, "fdatasync", synced.append)
    path = tmp_path / "disk.img"
    with RawFileBackend(path, size=MIB) as backend:
        disk = ScsiDisk(backend)
        assert run(disk, rw(0x8A, 7, 2, flags=0x08), pattern(1024), OUT).status == 0
        assert len(synced) == 1
        assert run(disk, rw(0x35, 0, 0)) == GOOD
        assert synced == [backend.fd, backend.fd]
    with RawFileBackend(path) as backend:
        assert data_in(ScsiDisk(backend), rw(0x28, 7, 2))[1] == pattern(1024)


def test_failed_flush_is_a_write_error() -> None:
    disk = ScsiDisk(FaultyBackend(RamBackend(MIB), fail_flush=True))
    assert failed(run(disk, rw(0x35, 0, 0))) == WRITE_ERROR
    assert failed(run(disk, rw(0x2A, 0, 1, flags=0x08), bytes(512), OUT)) == WRITE_ERROR


# --- UNMAP and WRITE SAME ---


def test_unmap(spy: SpyBackend, disk: ScsiDisk) -> None:
    spy.data[:] = b"\x77" * MIB
    assert unmap(disk, (1, 2), (10, 1), (20, 0)) == ScsiResult(0, b"", 56)
    assert spy.calls == [("discard", 512, 1024), ("discard", 5120, 512)]
    assert spy.data[512:1536] == bytes(1024) and spy.data[5120:5632] == bytes(512)
    assert spy.data.count(0) == 1536
    assert unmap(disk, (1, 1), length=0) == GOOD
    # 24 bytes of descriptors: the second one is partial and ignored.
    assert unmap(disk, (3, 1), (5, 1), descriptor_length=24) == ScsiResult(0, b"", 40)
    assert spy.calls[-1] == ("discard", 1536, 512) and len(spy.calls) == 3


def test_unmap_errors_discard_nothing(spy: SpyBackend, disk: ScsiDisk) -> None:
    assert failed(unmap(disk, (1, 1), length=4)) == PARAMETER_LIST_LENGTH
    assert failed(unmap(disk, (1, 1), descriptor_length=32)) == INVALID_PARAMETER
    assert failed(unmap(disk, *[(i, 1) for i in range(257)])) == INVALID_PARAMETER
    assert failed(unmap(disk, (1, 1), (BLOCKS - 1, 2))) == LBA_RANGE
    assert failed(unmap(disk, (1, 1), flags=0x01)) == INVALID_FIELD  # ANCHOR
    assert failed(unmap(disk, (1, 1), length=100)) == INVALID_FIELD  # buffer shorter
    assert failed(unmap(read_only_disk(), (1, 1))) == WRITE_PROTECTED
    huge = ScsiDisk(NullBackend(1 << 40))
    assert failed(unmap(huge, (0, 1 << 21), (1 << 21, 1 << 21))) == INVALID_PARAMETER
    assert spy.calls == []


@pytest.mark.parametrize("op", [0x41, 0x93])
def test_write_same(op: int, spy: SpyBackend, disk: ScsiDisk) -> None:
    spy.data[:] = b"\x77" * MIB
    block = pattern(512, seed=5)
    assert run(disk, rw(op, 8, 4), block, OUT) == ScsiResult(0, b"", 512)
    assert spy.data[8 * 512 : 12 * 512] == block * 4
    assert spy.data[7 * 512 : 8 * 512] == spy.data[12 * 512 : 13 * 512] == b"\x77" * 512
    assert run(disk, rw(op, 8, 4, flags=0x08), block, OUT).status == 0  # UNMAP, not zeros: write
    assert run(disk, rw(op, 20, 3), bytes(512), OUT).status == 0
    assert run(disk, rw(op, 30, 2, flags=0x08), bytes(512), OUT).status == 0
    assert spy.calls == [("write_zeroes", 20 * 512, 1536), ("discard", 30 * 512, 1024)]
    assert spy.data[20 * 512 : 23 * 512] == bytes(1536)
    assert spy.data[30 * 512 : 32 * 512] == bytes(1024)


def test_write_same_refusals_and_no_data_out(spy: SpyBackend, disk: ScsiDisk) -> None:
    assert failed(run(disk, rw(0x93, 0, 0), bytes(512), OUT)) == INVALID_FIELD  # WSNZ
    assert failed(run(disk, rw(0x93, 0, (256 * MIB) // 512 + 1), bytes(512), OUT)) == INVALID_FIELD
    assert failed(run(disk, rw(0x93, 0, 1, flags=0x10), bytes(512), OUT)) == INVALID_FIELD
    assert failed(run(disk, rw(0x93, BLOCKS - 1, 2), bytes(512), OUT)) == LBA_RANGE
    assert failed(run(disk, rw(0x41, 0, 1), bytes(100), OUT)) == INVALID_FIELD
    assert failed(run(read_only_disk(), rw(0x41, 0, 1), bytes(512), OUT)) == WRITE_PROTECTED
    assert spy.calls == []
    assert run(disk, rw(0x93, 4, 2, flags=0x09)) == GOOD  # NDOB + UNMAP: no buffer at all
    assert spy.calls == [("discard", 2048, 1024)]


def test_write_same_spans_several_backend_writes() -> None:
    backend = RamBackend(8 * MIB)
    disk = ScsiDisk(backend)
    block = pattern(512, seed=9)
    blocks = MAX_TRANSFER_BYTES // 512 * 2 + 5
    assert run(disk, rw(0x93, 3, blocks), block, OUT).status == 0
    assert backend.data[3 * 512 : (3 + blocks) * 512] == block * blocks
    assert backend.data[(3 + blocks) * 512 :].count(0) == 8 * MIB - (3 + blocks) * 512


# --- MODE SENSE ---

CACHING = bytes.fromhex("0812 04 00") + bytes(16)  # WCE
CONTROL = bytes.fromhex("0a0a 00 10") + bytes(8)  # queue algorithm modifier 1
DESCRIPTOR = bytes.fromhex("00000800 00 000200")  # 2048 blocks of 512


@pytest.mark.parametrize(
    ("cdb", "expected"),
    [
        (
            bytes([0x1A, 0, 0x3F, 0, 255, 0]),
            bytes.fromhex("2b001008") + DESCRIPTOR + CACHING + CONTROL,
        ),
        (bytes([0x1A, 8, 0x3F, 0, 255, 0]), bytes.fromhex("23001000") + CACHING + CONTROL),
        (bytes([0x1A, 8, 0x3F, 0xFF, 255, 0]), bytes.fromhex("23001000") + CACHING + CONTROL),
        (bytes([0x1A, 8, 0x08, 0, 255, 0]), bytes.fromhex("17001000") + CACHING),
        (bytes([0x1A, 0, 0x0A, 0, 255, 0]), bytes.fromhex("17001008") + DESCRIPTOR + CONTROL),
        (bytes([0x1A, 8, 0x88, 0, 255, 0]), bytes.fromhex("17001000") + CACHING),  # default
        (bytes([0x1A, 0, 0x3F, 0, 4, 0]), bytes.fromhex("2b001008")),  # allocation length
        (
            bytes([0x1A, 0, 0x7F, 0, 255, 0]),  # changeable: nothing
            bytes.fromhex("2b001008")
            + bytes(8)
            + CACHING[:2]
            + bytes(18)
            + CONTROL[:2]
            + bytes(10),
        ),
        (
            bytes([0x5A, 0, 0x3F, 0, 0, 0, 0, 1, 0, 0]),
            bytes.fromhex("002e 00 10 00 00 0008") + DESCRIPTOR + CACHING + CONTROL,
        ),
        (
            bytes([0x5A, 8, 0x08, 0, 0, 0, 0, 0, 255, 0]),
            bytes.fromhex("001a 00 10 00 00 0000") + CACHING,
        ),
    ],
)
def test_mode_sense(disk: ScsiDisk, cdb: bytes, expected: bytes) -> None:
    assert data_in(disk, cdb) == (ScsiResult(0, b"", len(expected)), expected)


def test_mode_sense_write_protect_bit() -> None:
    header = data_in(read_only_disk(), bytes([0x1A, 8, 0x08, 0, 255, 0]))[1][:4]
    assert header == bytes.fromhex("17009000")  # WP | DPOFUA


@pytest.mark.parametrize(
    ("cdb", "expected"),
    [
        (bytes([0x1A, 0, 0xFF, 0, 255, 0]), SAVING_UNSUPPORTED),  # saved values
        (bytes([0x1A, 0, 0x1C, 0, 255, 0]), INVALID_FIELD),  # no such page
        (bytes([0x1A, 0, 0x08, 1, 255, 0]), INVALID_FIELD),  # no subpages
        (bytes([0x5A, 0, 0x3F, 0xFE, 0, 0, 0, 0, 255, 0]), INVALID_FIELD),
    ],
)
def test_bad_mode_sense(disk: ScsiDisk, cdb: bytes, expected: bytes) -> None:
    assert failed(run(disk, cdb, bytes(255), IN)) == expected


# --- REPORT LUNS and the target ---


def report_luns(select: int = 0, allocation: int = 256) -> bytes:
    return struct.pack(">BBB3xIxB", 0xA0, 0, select, allocation, 0)


def test_target_reports_its_luns_on_any_lun() -> None:
    target = ScsiTarget({300: ScsiDisk(RamBackend(MIB)), 0: ScsiDisk(RamBackend(MIB))})
    target.disks[1] = ScsiDisk(RamBackend(MIB))
    expected = bytes.fromhex("00000018 00000000 0000000000000000 0001000000000000 412c000000000000")
    for lun in (0, 7):
        result, data = data_in(target, report_luns(), lun=lun)
        assert (result.status, data) == (0, expected)
    assert data_in(target, report_luns(1))[1] == bytes(8)
    for bad in (report_luns(3), report_luns(allocation=15)):
        assert failed(target.execute(0, bad, [memoryview(bytearray(64))], IN)) == INVALID_FIELD


def test_disk_alone_is_lun_0(disk: ScsiDisk) -> None:
    assert data_in(disk, report_luns())[1] == bytes.fromhex("00000008 00000000") + bytes(8)


def test_target_routes_by_lun_and_answers_for_absent_luns() -> None:
    backends = {lun: RamBackend(MIB) for lun in (0, 2)}
    target = ScsiTarget({lun: ScsiDisk(b) for lun, b in backends.items()})
    assert (
        target.execute(2, rw(0x2A, 0, 1), [memoryview(bytearray(b"\x42" * 512))], OUT).status == 0
    )
    assert backends[2].data[:512] == b"\x42" * 512 and backends[0].data[:512] == bytes(512)
    inquiry = bytearray(36)
    assert target.execute(1, bytes([0x12, 0, 0, 0, 36, 0]), [memoryview(inquiry)], IN).status == 0
    assert inquiry[0] == 0x7F  # qualifier 011b: no logical unit here
    assert failed(target.execute(1, bytes(6))) == NO_SUCH_LUN
    assert (
        failed(target.execute(1, bytes([0x12, 1, 0, 0, 36, 0]), [memoryview(inquiry)], IN))
        == NO_SUCH_LUN
    )
    sense_data = bytearray(18)
    assert target.execute(1, bytes([3, 0, 0, 0, 18, 0]), [memoryview(sense_data)], IN).status == 0
    assert sense_data == NO_SUCH_LUN
    with pytest.raises(ValueError, match="LUN"):
        ScsiTarget({16384: ScsiDisk(RamBackend(MIB))})


# --- medium errors and unit attention ---


def test_medium_errors_fail_only_that_request() -> None:
    backend = FaultyBackend(
        RamBackend(MIB), fail_reads=[(5120, 5632)], fail_writes=[(10240, 10752)]
    )
    disk = ScsiDisk(backend)
    assert failed(run(disk, rw(0x28, 10, 1), bytes(512), IN)) == READ_ERROR
    assert failed(run(disk, rw(0x88, 9, 2), bytes(1024), IN)) == READ_ERROR
    assert run(disk, rw(0x28, 11, 1), bytes(512), IN) == ScsiResult(0, b"", 512)
    assert run(disk, bytes(6)) == GOOD
    assert data_in(disk, bytes([3, 0, 0, 0, 18, 0]))[1] == NO_SENSE  # nothing deferred
    assert failed(run(disk, rw(0x2A, 20, 1), bytes(512), OUT)) == WRITE_ERROR
    assert failed(run(disk, rw(0x41, 19, 4), b"\x01" * 512, OUT)) == WRITE_ERROR
    assert failed(run(disk, rw(0x93, 20, 1, flags=0x08), bytes(512), OUT)) == WRITE_ERROR
    assert failed(unmap(disk, (18, 3))) == WRITE_ERROR
    assert run(disk, rw(0x2A, 21, 1), bytes(512), OUT).status == 0
    assert failed(run(disk, rw(0x28, 10, 1), bytes(512), IN)) == READ_ERROR  # again: per request
    assert backend.faults == 7


def test_full_thin_disk_is_data_protect() -> None:
    disk = ScsiDisk(
        FaultyBackend(RamBackend(MIB), fail_writes=[(0, MIB)], errno_value=errno.ENOSPC)
    )
    assert failed(run(disk, rw(0x2A, 0, 1), bytes(512), OUT)) == NO_SPACE


def test_unit_attention_once_after_capacity_change(spy: SpyBackend, disk: ScsiDisk) -> None:
    spy.resize(2 * MIB)
    disk.notify_capacity_changed()
    assert data_in(disk, bytes([0x12, 0, 0, 0, 36, 0]))[0].status == 0  # exempt
    assert data_in(disk, report_luns())[0].status == 0  # exempt
    assert failed(run(disk, bytes(6))) == CAPACITY_CHANGED
    assert run(disk, bytes(6)) == GOOD
    assert data_in(disk, bytes([0x25]) + bytes(9))[1] == bytes.fromhex("00000fff 00000200")
    disk.notify_capacity_changed()
    assert failed(run(disk, b"\xff" + bytes(5))) == CAPACITY_CHANGED  # before the opcode check
    disk.notify_capacity_changed()
    assert data_in(disk, bytes([3, 0, 0, 0, 18, 0]))[1] == CAPACITY_CHANGED  # REQUEST SENSE
    assert run(disk, bytes(6)) == GOOD
