"""storvsc's compiled steady state (vsc.storage._fast) against the declared
structs it stands in for: the same SRB bytes as vstor.build_srb for random
requests, the same GPA-direct header as encode_gpa_direct_header, and the
same completion (or the same error) as vstor.parse_completion for random
and hostile completion bytes, short and malformed ones included."""

from __future__ import annotations

import os
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmbus.errors import UsageError
from vmbus.memory import PAGE_SIZE
from vmbus.packet import (
    MAX_GPA_PFNS,
    GpaRange,
    PacketError,
    PacketType,
    encode_gpa_direct_header,
)
from vmbus.protocols import storage as vstor
from vmbus.protocols.storage import scsi_wire as w
from vmbus.ring import RingReader, RingWriter
from vmbus.testing.rings import ring_buffer
from vmbus.wire import WireError
from vsc.storage import _fast, _lone

VERSIONS = st.one_of(
    st.sampled_from(
        [
            vstor.VSTOR_VERSION_WIN6,
            vstor.VSTOR_VERSION_WIN7,
            vstor.VSTOR_VERSION_WIN8,
            vstor.VSTOR_VERSION_WIN8_1,
            vstor.VSTOR_VERSION_WIN10,
        ]
    ),
    st.integers(0, 0xFFFF),
)
U8, U32 = st.integers(0, 0xFF), st.integers(0, 0xFFFF_FFFF)


def outcome(call: Any, *args: Any, **kwargs: Any) -> Any:
    """What a call gives: its value, or its error's class."""
    try:
        return call(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - the class is what is compared
        return type(error)


# --- the SRB ----------------------------------------------------------------------


@given(
    cdb=st.binary(min_size=1, max_size=16),
    lun=U8,
    direction=st.integers(0, 2),
    transfer_length=U32,
    sense_info_length=st.none() | U8,
    target_id=U8,
    path_id=U8,
    port_number=U8,
    srb_flags=st.none() | U32,
    time_out_value=U32,
    version=VERSIONS,
)
def test_build_srb_packs_the_bytes_the_declared_structs_pack(**fields: Any) -> None:
    cdb, lun, direction, length = (
        fields.pop(k) for k in ("cdb", "lun", "direction", "transfer_length")
    )
    sense = fields.pop("sense_info_length")
    expected = vstor.build_srb(cdb, lun, direction, length, sense, **fields)
    assert _fast.build_srb(cdb, lun, direction, length, sense, **fields) == expected


OUT_OF_RANGE = st.one_of(st.integers(max_value=-1), st.integers(min_value=1 << 32))


@given(
    cdb=st.binary(max_size=24),
    direction=st.integers(-2, 5),
    lun=st.one_of(U8, OUT_OF_RANGE, st.integers(256, 1 << 9)),
    transfer_length=st.one_of(U32, OUT_OF_RANGE),
    time_out_value=st.one_of(U32, OUT_OF_RANGE),
)
def test_build_srb_refuses_what_the_declared_structs_refuse(
    cdb: bytes, direction: int, lun: int, transfer_length: int, time_out_value: int
) -> None:
    args = (cdb, lun, direction, transfer_length)
    expected = outcome(vstor.build_srb, *args, time_out_value=time_out_value)
    assert outcome(_fast.build_srb, *args, time_out_value=time_out_value) == expected


@given(
    lun=U8,
    write=st.booleans(),
    fua=st.booleans(),
    lba=st.integers(0, (1 << 64) - 1),
    blocks=U32,
    transfer_length=U32,
    version=VERSIONS,
)
def test_build_rw16_is_build_srb_of_a_rw16_cdb(
    lun: int, write: bool, fua: bool, lba: int, blocks: int, transfer_length: int, version: int
) -> None:
    opcode = w.Opcode.WRITE_16 if write else w.Opcode.READ_16
    cdb = w.Rw16Cdb(opcode, w.FUA if fua else 0, lba, blocks, 0, 0).pack()
    direction = vstor.DataDirection.WRITE_TYPE if write else vstor.DataDirection.READ_TYPE
    expected = vstor.build_srb(cdb, lun, direction, transfer_length, version=version)
    assert _fast.build_rw16(lun, write, fua, lba, blocks, transfer_length, version) == expected


def test_build_rw16_refuses_a_lun_past_255() -> None:
    with pytest.raises(WireError):
        _fast.build_rw16(256, False, False, 0, 1, 512)


# --- the GPA-direct header --------------------------------------------------------------


@given(
    pfn=st.integers(0, 1 << 40),
    offset=st.integers(0, PAGE_SIZE - 1),
    length=st.integers(1, 64 * PAGE_SIZE),
)
def test_gpa_header_is_the_declared_header_of_one_contiguous_range(
    pfn: int, offset: int, length: int
) -> None:
    pages = -(-(offset + length) // PAGE_SIZE)
    expected = encode_gpa_direct_header([GpaRange(length, offset, tuple(range(pfn, pfn + pages)))])
    assert _fast.gpa_header(pfn * PAGE_SIZE + offset, length) == expected


@pytest.mark.parametrize("length", [0, -1, 1 << 32, MAX_GPA_PFNS * PAGE_SIZE + 1])
def test_gpa_header_refuses_an_empty_or_oversized_range(length: int) -> None:
    with pytest.raises(PacketError):
        _fast.gpa_header(PAGE_SIZE, length)


# --- the completion -----------------------------------------------------------------


def completion_bytes(
    operation: int, status: int, srb_status: int, scsi_status: int, sense_length: int, data: bytes
) -> bytes:
    srb = vstor.VmScsiRequest(
        srb_status=srb_status,
        scsi_status=scsi_status,
        sense_info_length=sense_length,
        data_transfer_length=len(data) * 97,
        data=data,
    )
    return vstor.VstorPacket(operation, status=status, body=srb.pack()).encode()


COMPLETIONS = st.one_of(
    st.binary(max_size=100),  # anything at all, short ones included
    st.builds(
        completion_bytes,
        operation=st.sampled_from([1, 1, 1, 3, 7, 0xFFFF_FFFF]),
        status=U32,
        srb_status=U8,
        scsi_status=U8,
        sense_length=U8,
        data=st.binary(max_size=20),
    ),
)


@given(payload=COMPLETIONS, cut=st.integers(0, 80), padding=st.binary(max_size=24))
def test_parse_completion_agrees_with_the_declared_parse(
    payload: bytes, cut: int, padding: bytes
) -> None:
    """Whole, cut short, or padded (as the ring pads): the same SrbCompletion
    or the same StorageProtocolError; `completed` is its bytes moved when it
    succeeded, else -1."""
    for candidate in (payload, payload[:cut], payload + padding):
        expected = outcome(vstor.parse_completion, candidate)
        got = outcome(_fast.parse_completion, memoryview(candidate))
        assert got == expected
        success = isinstance(expected, vstor.SrbCompletion) and expected.succeeded
        assert _fast.completed(candidate) == (expected.transferred if success else -1)


def test_parse_completion_says_what_is_wrong_as_the_declared_parse_does() -> None:
    short, wrong = bytes(40), struct.pack("<I", vstor.Operation.EXECUTE_SRB).ljust(64, b"\0")
    for payload in (short, wrong):
        with pytest.raises(vstor.StorageProtocolError) as declared:
            vstor.parse_completion(payload)
        with pytest.raises(vstor.StorageProtocolError) as fast:
            _fast.parse_completion(payload)
        assert str(fast.value) == str(declared.value)


def test_a_cdb_longer_than_sixteen_bytes_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        _fast.build_srb(bytes(17), 0, 1, 0)


# --- reaping completions off the ring ---------------------------------------------


class Slot:
    def __init__(self) -> None:
        self.view = memoryview(bytes(range(256)) * 16)


@given(payload=COMPLETIONS)
def test_reap_finishes_each_completion_as_the_python_path_does(payload: bytes) -> None:
    """A completion of ours between an unsolicited packet and one of nobody's:
    a success copies the bounce read out of its slot (no more than the
    buffer, whatever the VSP claims); anything else reaches `finish` with
    the reply's first 64 bytes, whose parse is the parse of the whole."""
    ring = ring_buffer(16 * 1024)
    writer, reader = RingWriter(ring), RingReader(ring)
    writer.write(b"enumerate", PacketType.DATA_INBAND, 0, 0)
    writer.write(payload, PacketType.COMP, 0, 7)
    writer.write(payload, PacketType.COMP, 0, 8)  # no request of ours
    writer.commit()
    padded = payload.ljust(-(-len(payload) // 8) * 8, b"\0")  # as the ring pads it
    into, slot = bytearray(1000), Slot()
    command = (b"", len(into), -1, memoryview(into), True, 3)
    flight: dict[int, Any] = {7: (command, slot)}
    free: list[Any] = []
    failures: list[tuple[int, Any]] = []
    finished: list[bytes] = []

    def finish(cmd: Any, sl: Any, reply: bytes) -> str:
        assert (cmd, sl) == (command, slot)
        finished.append(reply)
        return "failed"

    assert _fast.reap(reader, flight, free, failures, finish) == 1
    assert (flight, free, reader.bytes_available) == ({}, [slot], 0)  # all three read
    moved = _fast.completed(padded)
    if moved >= 0:
        assert (finished, failures) == ([], [])
        count = min(moved, len(into))
        assert into[:count] == slot.view[:count] and not any(into[count:])
    else:
        assert failures == [(3, "failed")] and finished == [padded[:64]]
        assert outcome(_fast.parse_completion, finished[0]) == outcome(
            vstor.parse_completion, padded
        )


# --- one request, sent and waited for in one call ----------------------------------


def lone_rings() -> tuple[Any, Any, Any, Any]:
    """The guest's two rings: its writer (to the VSP), the VSP's reader of
    it, the VSP's writer back, and the guest's reader."""
    out, back = ring_buffer(16 * 1024), ring_buffer(16 * 1024)
    return RingWriter(out), RingReader(out), RingWriter(back), RingReader(back)


@given(payload=COMPLETIONS)
def test_run_one_sends_the_srb_and_finishes_its_completion_as_reap_does(payload: bytes) -> None:
    """run_one writes the SRB with the slot's GPA-direct header and reaps its
    completion past an unsolicited packet and one of nobody's (all three
    consumed); the completion is finished as reap finishes it."""
    to_vsp, vsp_reads, from_vsp, reader = lone_rings()
    from_vsp.write(b"enumerate", PacketType.DATA_INBAND, 0, 0)
    from_vsp.write(payload, PacketType.COMP, 0, 8)  # no request of ours
    from_vsp.write(payload, PacketType.COMP, 0, 7)
    from_vsp.commit()
    padded = payload.ljust(-(-len(payload) // 8) * 8, b"\0")
    into, slot = bytearray(1000), Slot()
    slot.header = lambda length: _fast.gpa_header(5 * PAGE_SIZE, length)  # type: ignore[attr-defined]
    packet = _fast.build_rw16(0, False, False, 0, 2, len(into))
    command = (packet, len(into), -1, memoryview(into), True, 3)
    notify, wake = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    try:
        outcome_, value, _, _ = _lone.run_one(
            to_vsp, reader, command, slot, 7, notify, wake, 0.0, 5.0
        )
    finally:
        os.close(notify)
        os.close(wake)
    sent = vsp_reads.read()
    assert sent is not None and (sent.type, sent.trans_id) == (PacketType.DATA_USING_GPA_DIRECT, 7)
    assert bytes(sent.data[sent.offset8 * 8 :][: len(packet)]) == packet
    assert bytes(sent.data[16 : sent.offset8 * 8]) == _fast.gpa_header(5 * PAGE_SIZE, len(into))
    assert reader.bytes_available == 0
    moved = _fast.completed(padded)
    if moved >= 0:
        assert (outcome_, value) == (_lone.ONE_DONE, moved)
        count = min(moved, len(into))
        assert into[:count] == slot.view[:count] and not any(into[count:])
    else:
        assert (outcome_, value) == (_lone.ONE_FAILED, padded[:64])


def test_run_one_sends_nothing_into_a_full_ring_and_times_out_unanswered() -> None:
    to_vsp, vsp_reads, _, reader = lone_rings()
    packet = _fast.build_rw16(0, False, False, 0, 1, 512)
    command = (packet, 512, 5 * PAGE_SIZE, memoryview(bytearray(512)), True, 0)
    notify, wake = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    try:
        answers = [_lone.run_one(to_vsp, reader, command, None, 1, notify, wake, 0.0, 0.01)]
        assert answers[0][0] == _lone.ONE_TIMEOUT and os.eventfd_read(notify) == 1  # rung
        while to_vsp.write(packet, PacketType.DATA_INBAND, 0, 0):
            pass  # fill the ring
        answers.append(_lone.run_one(to_vsp, reader, command, None, 2, notify, wake, 0.0, 1.0))
    finally:
        os.close(notify)
        os.close(wake)
    assert answers[1][0] == _lone.ONE_FULL
    first = vsp_reads.read()
    assert first is not None and first.trans_id == 1  # the timed-out one went out
