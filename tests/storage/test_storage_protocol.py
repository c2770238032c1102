"""VSTOR (storvsc/storvsp): golden bytes, round trips, the VSP state machine
against a model, a VSC and the VSP talking in-process, and a hostile guest.

Golden vectors are written by hand from the offset tables of
docs/protocol.md §5.3/§5.4 (not produced by the code under test).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from vmbus.packet import GpaRange
from vmbus.protocols.storage import (
    MAX_SUB_CHANNELS,
    SCSI_MAX_LUNS,
    SCSI_MAX_PATHS,
    SCSI_MAX_TARGETS,
    STATUS_INVALID_DEVICE_STATE,
    STATUS_INVALID_PARAMETER,
    STATUS_NOT_SUPPORTED,
    STATUS_REVISION_MISMATCH,
    STORAGE_CHANNEL_PROPERTIES_BYTES,
    VSC_VERSIONS,
    VSP_VERSIONS,
    VSTOR_PACKET_SIZE,
    VSTOR_VERSION_WIN7,
    VSTOR_VERSION_WIN8,
    VSTOR_VERSION_WIN8_1,
    VSTOR_VERSION_WIN10,
    CreateSubChannels,
    DataDirection,
    ExecuteSrb,
    Operation,
    ProtocolVersion,
    Reply,
    SrbFlags,
    SrbStatus,
    StorageChannelProperties,
    StorageProtocolError,
    StorvscProtocol,
    StorvspProtocol,
    SubChannelCount,
    VmScsiRequest,
    VscState,
    VspState,
    VstorHeader,
    VstorPacket,
    build_srb,
    parse_completion,
)
from vmbus.testing.strategies import from_hex as h
from vmbus.testing.strategies import wire_values as any_struct
from vmbus.wire import WireError

READ10 = bytes.fromhex("28 00 00000800 00 0008 00")  # READ(10): LBA 0x800, 8 blocks
ONE_PAGE = (GpaRange(4096, 0, (0x1234,)),)

# --- Golden bytes -------------------------------------------------------------

BEGIN_INITIALIZATION = h(
    """
    07000000   # operation BEGIN_INITIALIZATION
    01000000   # flags REQUEST_COMPLETION_FLAG
    00000000   # status
    """
) + bytes(52)  # union unused

QUERY_VERSION_WIN10 = h(
    """
    09000000   # operation QUERY_PROTOCOL_VERSION
    01000000   # flags
    00000000   # status
    0206       # version.major_minor 0x0602
    0000       # version.revision
    """
) + bytes(48)

PROPERTIES_REPLY = h(
    """
    01000000          # operation COMPLETE_IO
    00000000          # flags: a reply asks for nothing
    00000000          # status success
    00000000          # @12 properties.reserved
    0300              # @16 max_channel_cnt: 3 sub-channels
    0000              # @18 reserved1
    01000000          # @20 flags SUPPORTS_MULTI_CHANNEL
    00001000          # @24 max_transfer_bytes 0x100000
    0000000000000000  # @28 reserved2
    """
) + bytes(28)

READ10_REQUEST = h(
    """
    03000000   # operation EXECUTE_SRB
    01000000   # flags
    00000000   # status
    3400       # @12 vm_srb.length 52
    00         # @14 srb_status
    00         # @15 scsi_status
    00         # @16 port_number
    00         # @17 path_id
    00         # @18 target_id
    01         # @19 lun 1
    0a         # @20 cdb_length 10
    14         # @21 sense_info_length 20
    01         # @22 data_in READ_TYPE
    00         # @23 reserved
    00100000   # @24 data_transfer_length 4096
    28 00 00000800 00 0008 00 00000000000000000000  # @28 cdb, zero to 20 bytes
    0000       # @48 reserve
    00         # @50 queue_tag
    00         # @51 queue_action
    48000000   # @52 srb_flags DATA_IN | DISABLE_SYNCH_TRANSFER
    3c000000   # @56 time_out_value 60
    00000000   # @60 queue_sort_key
    """
)

READ10_REPLY = h(
    """
    01000000   # operation COMPLETE_IO
    00000000   # flags
    00000000   # status
    3400       # length, echoed
    01         # srb_status SUCCESS
    00         # scsi_status GOOD
    00 00 00 01  # port, path, target, lun echoed
    0a         # cdb_length echoed
    00         # sense_info_length: no sense
    01         # data_in echoed
    00         # reserved
    00100000   # data_transfer_length: 4096 moved
    0000000000000000000000000000000000000000  # sense_data (the cdb is gone)
    0000 00 00 48000000 3c000000 00000000  # Win8 extension echoed
    """
)

# TEST UNIT READY under protocol 4.2: 48 bytes, a 36-byte vm_srb, 18 sense bytes.
PRE_WIN8_TUR_REQUEST = h(
    """
    03000000   # operation EXECUTE_SRB
    01000000   # flags
    00000000   # status
    2400       # vm_srb.length 36
    00 00      # srb_status, scsi_status
    00 00 00 00  # port, path, target, lun 0
    06         # cdb_length 6
    12         # sense_info_length 18
    02         # data_in UNKNOWN_TYPE
    00         # reserved
    00000000   # data_transfer_length 0
    000000000000 0000000000000000000000000000  # cdb TEST UNIT READY, zero to 20
    """
)

# Its failure, CHECK CONDITION with fixed-format sense NOT READY / 3A (medium absent).
PRE_WIN8_TUR_REPLY = h(
    """
    01000000 00000000 00000000  # COMPLETE_IO, flags, status
    2400       # length echoed
    84         # srb_status ERROR | AUTOSENSE_VALID
    02         # scsi_status CHECK CONDITION
    00 00 00 00  # port, path, target, lun
    06         # cdb_length
    12         # sense_info_length 18 valid sense bytes
    02 00      # data_in, reserved
    00000000   # nothing moved
    700002000000000a000000003a0000000000 0000  # 18 sense bytes, 2 zero
    """
)
NOT_READY_SENSE = bytes.fromhex("700002000000000a000000003a0000000000")


def ready_vsp(version: int = VSTOR_VERSION_WIN10, channels: int = 4) -> StorvspProtocol:
    """A VSP through initialization at `version`."""
    vsp = StorvspProtocol(0x100000, channels, accept_versions=(version,))
    vsc = StorvscProtocol(versions=(version,))
    packet: bytes | None = vsc.start()
    while packet is not None:
        event = vsp.receive(packet)
        assert isinstance(event, Reply)
        packet = vsc.receive(event.payload)
    assert vsp.state == VspState.READY
    return vsp


def reply_of(event: object) -> VstorPacket:
    assert isinstance(event, Reply), event
    assert event.payload[:4] == b"\x01\0\0\0"  # COMPLETE_IO
    return VstorPacket.decode(event.payload)


def test_golden_begin_initialization() -> None:
    assert StorvscProtocol().start() == BEGIN_INITIALIZATION
    assert VstorPacket.decode(BEGIN_INITIALIZATION).operation == Operation.BEGIN_INITIALIZATION


def test_golden_query_protocol_version() -> None:
    vsc = StorvscProtocol()
    vsc.start()
    assert vsc.receive(bytes([1]) + bytes(63)) == QUERY_VERSION_WIN10
    assert ProtocolVersion.unpack(VstorPacket.decode(QUERY_VERSION_WIN10).body) == (
        ProtocolVersion(0x0602, 0)
    )


def test_golden_query_properties_reply() -> None:
    vsp = StorvspProtocol(0x100000, 4)
    vsp.receive(BEGIN_INITIALIZATION)
    vsp.receive(QUERY_VERSION_WIN10)
    event = vsp.receive(VstorPacket(Operation.QUERY_PROPERTIES).encode())
    assert event == Reply(PROPERTIES_REPLY)
    properties = StorageChannelProperties.unpack(VstorPacket.decode(PROPERTIES_REPLY).body)
    assert (properties.max_channel_cnt, properties.flags) == (3, 1)
    assert properties.max_transfer_bytes == 0x100000


def test_golden_execute_srb_read10_and_its_completion() -> None:
    assert build_srb(READ10, lun=1, direction=DataDirection.READ_TYPE, transfer_length=4096) == (
        READ10_REQUEST
    )
    vsp = ready_vsp()
    event = vsp.receive(READ10_REQUEST, ONE_PAGE)
    assert isinstance(event, ExecuteSrb)
    assert (event.cdb, event.lun, event.direction, event.transfer_length) == (
        READ10,
        1,
        DataDirection.READ_TYPE,
        4096,
    )
    assert event.request.srb_flags == SrbFlags.DATA_IN | SrbFlags.DISABLE_SYNCH_TRANSFER
    assert event.ranges == ONE_PAGE
    reply = vsp.complete_srb(event.request, SrbStatus.SUCCESS, transferred=4096)
    assert reply == READ10_REPLY
    completion = parse_completion(reply)
    assert completion.succeeded
    assert (completion.status, completion.scsi_status, completion.sense) == (0, 0, b"")
    assert completion.transferred == 4096


def test_golden_pre_win8_execute_srb_and_check_condition() -> None:
    request = build_srb(bytes(6), 0, DataDirection.UNKNOWN_TYPE, 0, version=VSTOR_VERSION_WIN7)
    assert request == PRE_WIN8_TUR_REQUEST
    vsp = ready_vsp(VSTOR_VERSION_WIN7)
    event = vsp.receive(request)
    assert isinstance(event, ExecuteSrb)
    assert event.request.srb_flags == 0  # no Win8 extension on the wire
    # The SCSI layer's sense may be longer: cut to the 18 bytes pre-Win8 carries.
    reply = vsp.complete_srb(event.request, SrbStatus.ERROR, 0x02, NOT_READY_SENSE + b"\xff\xff")
    assert reply == PRE_WIN8_TUR_REPLY
    completion = parse_completion(reply)
    assert not completion.succeeded
    assert completion.srb_status == SrbStatus.ERROR | SrbStatus.AUTOSENSE_VALID
    assert completion.sense == NOT_READY_SENSE


def test_struct_sizes() -> None:
    assert VstorPacket.SIZE == VSTOR_PACKET_SIZE == 64
    assert VmScsiRequest.SIZE == 52
    assert StorageChannelProperties.SIZE == STORAGE_CHANNEL_PROPERTIES_BYTES == 24
    assert (ProtocolVersion.SIZE, SubChannelCount.SIZE) == (4, 2)
    assert VstorPacket(Operation.EXECUTE_SRB).encode(48) == VstorPacket(3).pack()[:48]


def test_enum_values() -> None:
    assert [op.value for op in Operation] == list(range(1, 14))
    assert (SrbStatus.INVALID_REQUEST, SrbStatus.INVALID_LUN) == (0x06, 0x20)
    assert (SrbStatus.QUEUE_FROZEN, SrbStatus.AUTOSENSE_VALID) == (0x40, 0x80)
    assert SrbFlags(0x48) == SrbFlags.DATA_IN | SrbFlags.DISABLE_SYNCH_TRANSFER
    assert int(SrbFlags(0x1000_0048)) == 0x1000_0048  # unknown bits kept
    assert [d.value for d in DataDirection] == [0, 1, 2]
    assert VSP_VERSIONS == (0x0602, 0x0600, 0x0501, 0x0402, 0x0200)


def test_byte_fields_pad_and_refuse_overflow() -> None:
    assert VmScsiRequest(data=b"\x12").data == b"\x12" + bytes(19)
    with pytest.raises(WireError, match="20 bytes"):
        VmScsiRequest(data=bytes(21))
    with pytest.raises(WireError, match="needs 48"):
        VstorPacket.decode(bytes(47))


# --- Round trips --------------------------------------------------------------


STRUCTS = [
    VstorHeader,
    VstorPacket,
    VmScsiRequest,
    StorageChannelProperties,
    ProtocolVersion,
    SubChannelCount,
]


@pytest.mark.parametrize("cls", STRUCTS, ids=lambda c: c.__name__)
@given(data=st.data())
@settings(max_examples=50)
def test_every_struct_round_trips(cls: type, data: st.DataObject) -> None:
    value = data.draw(any_struct(cls))
    wire = value.pack()
    assert len(wire) == cls.SIZE
    assert cls.unpack(wire) == value
    assert cls.unpack(wire).pack() == wire


@given(st.binary(min_size=48, max_size=80))
def test_vstor_packet_both_forms_round_trip(wire: bytes) -> None:
    packet = VstorPacket.decode(wire)
    assert packet.encode() == wire[:64].ljust(64, b"\0")  # ring padding past 64 is ignored
    assert packet.encode(48) == wire[:48]
    assert VstorPacket.decode(wire[:48]).body[36:] == bytes(16)  # no Win8 extension: zero


# --- The VSP against a model --------------------------------------------------

UNHANDLED = st.one_of(
    st.sampled_from([1, 2, 11, 12]),  # host-to-guest operations and FC
    st.integers(14, 0xFFFF_FFFF),
    st.just(0),
)


class VspMachine(RuleBasedStateMachine):
    """Random valid and invalid packets; a model says what each answer must be."""

    def __init__(self) -> None:
        super().__init__()
        self.accept = (0x0602, 0x0501, 0x0402)
        self.vsp = StorvspProtocol(0x10000, 3, accept_versions=self.accept)
        self.phase = VspState.WAIT_BEGIN
        self.version: int | None = None
        self.sub_channels = 0
        self.errors = 0

    def size(self, ask: int) -> int:
        return ask if self.version is None else (64 if self.version >= 0x0501 else 48)

    def send(self, op: int, body: bytes = b"", ask: int = 64, **kw: Any) -> Any:
        packet = VstorPacket(op, body=body).encode(ask)
        event = self.vsp.receive(packet, **kw)  # never raises
        assert isinstance(event, (Reply, ExecuteSrb, CreateSubChannels))
        if isinstance(event, Reply):
            assert len(event.payload) == self.size(ask)
            assert event.payload[:8] == b"\x01\0\0\0\0\0\0\0"  # COMPLETE_IO, no flags
        return event

    def expect_status(self, event: Any, status: int, counted: bool = True) -> VstorPacket:
        reply = reply_of(event)
        assert reply.status == status
        self.errors += bool(status and counted)
        return reply

    def in_order(self, phase: VspState, event: Any) -> bool:
        if self.phase == phase:
            return True
        self.expect_status(event, STATUS_INVALID_DEVICE_STATE)
        return False

    def ask(self, form: int) -> int:
        """A well-formed size: either before negotiation, the agreed one after."""
        return form if self.version is None else self.size(64)

    @rule(form=st.sampled_from([48, 64]))
    def begin(self, form: int) -> None:
        event = self.send(Operation.BEGIN_INITIALIZATION, ask=self.ask(form))
        if self.in_order(VspState.WAIT_BEGIN, event):
            self.expect_status(event, 0)
            self.phase = VspState.WAIT_VERSION

    @rule(version=st.sampled_from([0x0602, 0x0600, 0x0501, 0x0402, 0x0200, 0x0700, 0]))
    def query_version(self, version: int) -> None:
        event = self.send(Operation.QUERY_PROTOCOL_VERSION, ProtocolVersion(version).pack())
        if not self.in_order(VspState.WAIT_VERSION, event):
            return
        if version in self.accept:
            reply = self.expect_status(event, 0)
            self.phase, self.version = VspState.WAIT_PROPERTIES, version
        else:
            # Declining a version is negotiation, not misbehaviour: not counted.
            reply = self.expect_status(event, STATUS_REVISION_MISMATCH, counted=False)
        assert ProtocolVersion.unpack(reply.body).major_minor == version

    @rule()
    def query_properties(self) -> None:
        event = self.send(Operation.QUERY_PROPERTIES, ask=self.ask(64))
        if self.in_order(VspState.WAIT_PROPERTIES, event):
            props = StorageChannelProperties.unpack(self.expect_status(event, 0).body)
            win8 = self.version is not None and self.version >= 0x0501
            assert (props.max_channel_cnt, props.flags) == ((2, 1) if win8 else (0, 0))
            assert props.max_transfer_bytes == 0x10000
            self.phase = VspState.WAIT_END

    @rule()
    def end(self) -> None:
        event = self.send(Operation.END_INITIALIZATION, ask=self.ask(64))
        if self.in_order(VspState.WAIT_END, event):
            self.expect_status(event, 0)
            self.phase = VspState.READY

    @rule(
        cdb_length=st.sampled_from([0, 1, 6, 10, 16, 17, 255]),
        sense=st.sampled_from([0, 18, 20, 21, 255]),
        data_in=st.integers(0, 3),
        length=st.sampled_from([0, 512, 4096, 0x10000, 0x10001]),
        lun=st.sampled_from([0, 7, 254, 255]),
        target_id=st.integers(0, 3),
        with_buffer=st.booleans(),
    )
    def execute_srb(self, **f: Any) -> None:
        request = VmScsiRequest(
            cdb_length=f["cdb_length"],
            sense_info_length=f["sense"],
            data_in=f["data_in"],
            data_transfer_length=f["length"],
            lun=f["lun"],
            target_id=f["target_id"],
            data=b"\x28" * 16,
        )
        ranges = (GpaRange(0x10000, 0, tuple(range(16))),) if f["with_buffer"] else ()
        event = self.send(Operation.EXECUTE_SRB, request.pack(), ask=self.ask(64), ranges=ranges)
        if not self.in_order(VspState.READY, event):
            assert VmScsiRequest.unpack(reply_of(event).body).srb_status == 0x06
            return
        valid = (
            1 <= f["cdb_length"] <= 16
            and f["sense"] <= 20
            and f["data_in"] <= 2
            and f["length"] <= 0x10000
            and not (f["data_in"] == 2 and f["length"])
            and (f["with_buffer"] or not f["length"])
        )
        exists = f["lun"] < SCSI_MAX_LUNS and f["target_id"] < SCSI_MAX_TARGETS
        if valid and exists:
            assert isinstance(event, ExecuteSrb)
            assert event.request == request and event.ranges == ranges
            reply = self.vsp.complete_srb(request, 1, transferred=f["length"])
            assert len(reply) == self.size(64)
            assert parse_completion(reply).transferred == f["length"]
            return
        srb = VmScsiRequest.unpack(self.expect_status(event, 0).body)
        assert srb.srb_status == (0x06 if not valid else 0x20)
        assert (srb.data_transfer_length, srb.sense_info_length, srb.lun) == (0, 0, f["lun"])
        self.errors += 1

    @initialize(steps=st.integers(0, 4), version=st.sampled_from([0x0602, 0x0501, 0x0402]))
    def start_part_way(self, steps: int, version: int) -> None:
        """Begin anywhere in initialization, READY included."""
        for _ in range(steps):
            self.next_init_step(version)

    @rule(version=st.sampled_from([0x0602, 0x0501, 0x0402]))
    def next_init_step(self, version: int) -> None:
        """The step a well-behaved guest takes next, so runs reach READY often."""
        if self.phase == VspState.WAIT_BEGIN:
            self.begin(64)
        elif self.phase == VspState.WAIT_VERSION:
            self.query_version(version)
        elif self.phase == VspState.WAIT_PROPERTIES:
            self.query_properties()
        elif self.phase == VspState.WAIT_END:
            self.end()

    @rule(
        cdb_length=st.integers(1, 16),
        data_in=st.integers(0, 1),
        length=st.integers(0, 0x10000),
        lun=st.integers(0, SCSI_MAX_LUNS - 1),
    )
    def good_srb(self, cdb_length: int, data_in: int, length: int, lun: int) -> None:
        self.execute_srb(
            cdb_length=cdb_length,
            sense=20,
            data_in=data_in,
            length=length,
            lun=lun,
            target_id=0,
            with_buffer=True,
        )

    @rule(count=st.integers(0, 4))
    def create_sub_channels(self, count: int) -> None:
        event = self.send(Operation.CREATE_SUB_CHANNELS, SubChannelCount(count).pack(), 64)
        if not self.in_order(VspState.READY, event):
            return
        assert self.version is not None
        if self.version >= 0x0501 and not self.sub_channels and 1 <= count <= 2:
            assert isinstance(event, CreateSubChannels)
            assert event.count == count and VstorPacket.decode(event.reply).status == 0
            self.sub_channels = count
        else:
            assert reply_of(event).status != 0
            self.errors += 1

    @rule(op=st.sampled_from([4, 5, 6]))
    def reset(self, op: int) -> None:
        event = self.send(op, ask=self.ask(64))
        if self.in_order(VspState.READY, event):
            self.expect_status(event, 0)

    @rule(op=UNHANDLED, body=st.binary(max_size=52), form=st.sampled_from([48, 64]))
    def unknown_operation(self, op: int, body: bytes, form: int) -> None:
        self.expect_status(self.send(op, body, self.ask(form)), STATUS_NOT_SUPPORTED)

    @rule(data=st.binary(max_size=63))
    def short_packet(self, data: bytes) -> None:
        minimum = self.size(48) if self.version else 48
        if len(data) >= minimum:
            return
        event = self.vsp.receive(data)
        reply = self.expect_status(event, STATUS_INVALID_PARAMETER)
        assert len(event.payload) == self.size(48)
        if data[:4] == b"\x03\0\0\0":
            assert VmScsiRequest.unpack(reply.body).srb_status == 0x06

    @invariant()
    def agrees_with_model(self) -> None:
        assert self.vsp.state == self.phase
        assert self.vsp.version == self.version
        assert sum(self.vsp.errors.values()) == self.errors


VspMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestVspStateMachine = VspMachine.TestCase


# --- VSC and VSP together -----------------------------------------------------


def run_init(vsc: StorvscProtocol, vsp: StorvspProtocol) -> list[bytes]:
    """Drive both through initialization; the packets the VSC sent."""
    sent = [vsc.start()]
    while True:
        event = vsp.receive(sent[-1])
        assert isinstance(event, Reply) and event.error is None
        following = vsc.receive(event.payload)
        if following is None:
            return sent
        sent.append(following)


@pytest.mark.parametrize("version", VSP_VERSIONS, ids=hex)
def test_vsc_and_vsp_agree_on_each_accepted_version(version: int) -> None:
    vsp = StorvspProtocol(0x40000, 4, accept_versions=(version,))
    vsc = StorvscProtocol(versions=VSP_VERSIONS)
    sent = run_init(vsc, vsp)
    tried = VSP_VERSIONS.index(version) + 1
    assert [VstorPacket.decode(p).operation for p in sent] == [7] + [9] * tried + [10, 8]
    assert vsc.version == vsp.version == version
    assert vsc.state == VscState.READY and vsp.state == VspState.READY
    size = 64 if version >= VSTOR_VERSION_WIN8 else 48
    assert vsc.packet_size == vsp.packet_size == size
    assert vsc.max_sub_channels == (3 if version >= VSTOR_VERSION_WIN8 else 0)
    assert vsc.properties is not None and vsc.properties.max_transfer_bytes == 0x40000
    request = build_srb(READ10, 2, DataDirection.READ_TYPE, 4096, version=version)
    assert len(request) == size
    event = vsp.receive(request, ONE_PAGE)
    assert isinstance(event, ExecuteSrb) and event.lun == 2
    reply = vsp.complete_srb(event.request, SrbStatus.SUCCESS, transferred=4096)
    assert len(reply) == size and parse_completion(reply).transferred == 4096
    assert not vsp.errors


def test_vsc_falls_back_past_refused_versions() -> None:
    vsp = StorvspProtocol(0x40000, 4, accept_versions=(VSTOR_VERSION_WIN8,))
    vsc = StorvscProtocol()  # offers 6.2, 6.0, 5.1 like recent Linux
    replies = []
    packet: bytes | None = vsc.start()
    while packet is not None:
        replies.append(reply_of(vsp.receive(packet)))
        packet = vsc.receive(replies[-1].encode())
    refused = [STATUS_REVISION_MISMATCH] * 2
    assert [r.status for r in replies] == [0, *refused, 0, 0, 0]
    assert vsc.version == VSTOR_VERSION_WIN8 and VSC_VERSIONS[-1] == VSTOR_VERSION_WIN8
    assert not vsp.errors  # refusing a version is no guest error


def test_vsc_gives_up_when_no_version_is_common() -> None:
    vsp = StorvspProtocol(0x40000, accept_versions=(VSTOR_VERSION_WIN7,))
    vsc = StorvscProtocol()
    with pytest.raises(StorageProtocolError, match="accepts none"):
        run_init(vsc, vsp)
    assert vsp.state == VspState.WAIT_VERSION


def test_uefi_style_vsc_negotiates_with_48_byte_packets() -> None:
    """UEFI sends 48-byte packets until a version is agreed and wants replies
    of the size it sent; 64 afterwards for Win8.1."""
    vsp = StorvspProtocol(0x40000)
    vsc = StorvscProtocol(versions=(VSTOR_VERSION_WIN8_1,), initial_size=48)
    packet: bytes | None = vsc.start()
    sizes = []
    while packet is not None:
        event = vsp.receive(packet)
        assert isinstance(event, Reply)
        sizes.append((len(packet), len(event.payload)))
        packet = vsc.receive(event.payload)
    assert sizes == [(48, 48), (48, 48), (64, 64), (64, 64)]


def test_sub_channels_end_to_end() -> None:
    vsp = StorvspProtocol(0x40000, 8)
    vsc = StorvscProtocol()
    run_init(vsc, vsp)
    assert vsc.max_sub_channels == 7
    event = vsp.receive(vsc.create_sub_channels(5))
    assert isinstance(event, CreateSubChannels) and event.count == 5
    assert vsc.receive(event.reply) is None and vsc.state == VscState.READY
    assert vsp.sub_channels == 5


# --- A hostile guest ----------------------------------------------------------


def refusal(event: object, status: int) -> VstorPacket:
    assert isinstance(event, Reply) and event.error, event
    reply = reply_of(event)
    assert reply.status == status
    return reply


def srb_refusal(event: object, srb_status: int) -> VmScsiRequest:
    assert isinstance(event, Reply) and event.error, event
    srb = VmScsiRequest.unpack(reply_of(event).body)
    assert (srb.srb_status, srb.data_transfer_length, srb.sense_info_length) == (srb_status, 0, 0)
    return srb


def test_guest_executes_srb_before_initialization() -> None:
    vsp = StorvspProtocol(0x40000)
    reply = refusal(vsp.receive(READ10_REQUEST, ONE_PAGE), STATUS_INVALID_DEVICE_STATE)
    assert VmScsiRequest.unpack(reply.body).srb_status == SrbStatus.INVALID_REQUEST
    assert vsp.errors == {"out_of_order": 1} and vsp.state == VspState.WAIT_BEGIN


def test_guest_sends_cdb_longer_than_16() -> None:
    vsp = ready_vsp()
    request = VmScsiRequest(cdb_length=17, data_in=2)
    event = vsp.receive(VstorPacket(Operation.EXECUTE_SRB, body=request.pack()).encode())
    srb_refusal(event, SrbStatus.INVALID_REQUEST)
    assert vsp.errors == {"bad_srb": 1}


def test_guest_sends_empty_cdb() -> None:
    request = VmScsiRequest(cdb_length=0, data_in=2)
    event = ready_vsp().receive(VstorPacket(3, body=request.pack()).encode())
    srb_refusal(event, SrbStatus.INVALID_REQUEST)


def test_guest_claims_silly_sense_info_length() -> None:
    request = VmScsiRequest(cdb_length=6, sense_info_length=200, data_in=2)
    event = ready_vsp().receive(VstorPacket(3, body=request.pack()).encode())
    srb_refusal(event, SrbStatus.INVALID_REQUEST)
    assert isinstance(event, Reply) and event.error == "sense_info_length 200 is over 20"


def test_guest_sends_unknown_data_direction() -> None:
    request = VmScsiRequest(cdb_length=6, data_in=7)
    srb_refusal(ready_vsp().receive(VstorPacket(3, body=request.pack()).encode()), 0x06)


def test_guest_sends_no_data_srb_with_a_transfer_length() -> None:
    request = VmScsiRequest(cdb_length=6, data_in=2, data_transfer_length=512)
    event = ready_vsp().receive(VstorPacket(3, body=request.pack()).encode(), ONE_PAGE)
    srb_refusal(event, 0x06)


def test_guest_reads_more_than_max_transfer_bytes() -> None:
    vsp = ready_vsp()  # 1 MiB
    request = build_srb(READ10, 0, DataDirection.READ_TYPE, 0x100001)
    big = (GpaRange(0x100001, 0, tuple(range(257))),)
    srb_refusal(vsp.receive(request, big), 0x06)


def test_guest_reads_more_than_its_buffer() -> None:
    request = build_srb(READ10, 0, DataDirection.READ_TYPE, 8192)
    srb_refusal(ready_vsp().receive(request, ONE_PAGE), 0x06)
    srb_refusal(ready_vsp().receive(request), 0x06)  # inband: no buffer at all


@pytest.mark.parametrize(
    ("path", "target", "lun"),
    [(SCSI_MAX_PATHS, 0, 0), (0, SCSI_MAX_TARGETS, 0), (0, 0, SCSI_MAX_LUNS)],
)
def test_guest_addresses_lun_out_of_range(path: int, target: int, lun: int) -> None:
    request = build_srb(READ10, lun, 1, 4096, target_id=target, path_id=path)
    srb = srb_refusal(ready_vsp().receive(request, ONE_PAGE), SrbStatus.INVALID_LUN)
    assert (srb.path_id, srb.target_id, srb.lun) == (path, target, lun)  # echoed


def test_guest_sends_packet_shorter_than_48() -> None:
    vsp = StorvspProtocol(0x40000)
    for data in (b"", b"\x07", BEGIN_INITIALIZATION[:47]):
        event = vsp.receive(data)
        refusal(event, STATUS_INVALID_PARAMETER)
        assert isinstance(event, Reply) and len(event.payload) == 48
    assert vsp.errors == {"malformed": 3} and vsp.state == VspState.WAIT_BEGIN


def test_guest_sends_48_byte_packet_after_negotiating_win8() -> None:
    vsp = ready_vsp(VSTOR_VERSION_WIN8)
    event = vsp.receive(READ10_REQUEST[:48], ONE_PAGE)
    reply = refusal(event, STATUS_INVALID_PARAMETER)
    assert isinstance(event, Reply) and len(event.payload) == 64
    assert VmScsiRequest.unpack(reply.body).srb_status == SrbStatus.INVALID_REQUEST


@pytest.mark.parametrize("op", [0, 1, 2, 11, 12, 14, 0xFFFF_FFFF])
def test_guest_sends_unknown_or_host_only_operation(op: int) -> None:
    vsp = StorvspProtocol(0x40000)
    refusal(vsp.receive(VstorPacket(op).encode()), STATUS_NOT_SUPPORTED)
    assert vsp.errors == {"unsupported": 1}


def test_guest_skips_version_negotiation() -> None:
    vsp = StorvspProtocol(0x40000)
    vsp.receive(BEGIN_INITIALIZATION)
    refusal(vsp.receive(VstorPacket(Operation.QUERY_PROPERTIES).encode()), 0xC0000184)
    refusal(vsp.receive(VstorPacket(Operation.END_INITIALIZATION).encode()), 0xC0000184)
    assert vsp.state == VspState.WAIT_VERSION


def test_guest_begins_initialization_twice() -> None:
    vsp = ready_vsp()
    refusal(vsp.receive(BEGIN_INITIALIZATION), STATUS_INVALID_DEVICE_STATE)
    assert vsp.state == VspState.READY


def test_guest_asks_more_sub_channels_than_offered() -> None:
    vsp = ready_vsp(channels=4)  # 3 sub-channels
    ask = VstorPacket(Operation.CREATE_SUB_CHANNELS, body=SubChannelCount(4).pack()).encode()
    refusal(vsp.receive(ask), STATUS_INVALID_PARAMETER)
    assert vsp.sub_channels == 0 and vsp.errors == {"bad_sub_channels": 1}


def test_guest_asks_zero_sub_channels() -> None:
    ask = VstorPacket(Operation.CREATE_SUB_CHANNELS, body=SubChannelCount(0).pack()).encode()
    refusal(ready_vsp().receive(ask), STATUS_INVALID_PARAMETER)


def test_guest_asks_sub_channels_twice() -> None:
    vsp = ready_vsp()
    ask = VstorPacket(Operation.CREATE_SUB_CHANNELS, body=SubChannelCount(1).pack()).encode()
    assert isinstance(vsp.receive(ask), CreateSubChannels)
    refusal(vsp.receive(ask), STATUS_INVALID_DEVICE_STATE)
    assert vsp.sub_channels == 1


def test_guest_asks_sub_channels_before_initialization() -> None:
    vsp = StorvspProtocol(0x40000, 4)
    ask = VstorPacket(Operation.CREATE_SUB_CHANNELS, body=SubChannelCount(1).pack()).encode()
    refusal(vsp.receive(ask), STATUS_INVALID_DEVICE_STATE)


@pytest.mark.parametrize(("version", "channels"), [(VSTOR_VERSION_WIN7, 4), (0x0602, 1)])
def test_guest_asks_sub_channels_none_were_offered(version: int, channels: int) -> None:
    vsp = ready_vsp(version, channels)
    ask = VstorPacket(Operation.CREATE_SUB_CHANNELS, body=SubChannelCount(1).pack())
    refusal(vsp.receive(ask.encode(vsp.packet_size)), STATUS_NOT_SUPPORTED)


def test_guest_offers_only_unknown_versions() -> None:
    vsp = StorvspProtocol(0x40000)
    vsp.receive(BEGIN_INITIALIZATION)
    for version in (0x0700, 0x0100, 0xFFFF):
        event = vsp.receive(VstorPacket(9, body=ProtocolVersion(version).pack()).encode())
        assert reply_of(event).status == STATUS_REVISION_MISMATCH
    assert vsp.state == VspState.WAIT_VERSION and not vsp.errors


@given(st.binary(max_size=200), st.sampled_from([None, VSTOR_VERSION_WIN7, VSTOR_VERSION_WIN10]))
def test_arbitrary_bytes_always_get_one_answer(data: bytes, version: int | None) -> None:
    vsp = StorvspProtocol(0x40000, 4) if version is None else ready_vsp(version)
    event = vsp.receive(data, ONE_PAGE)
    if isinstance(event, Reply):
        assert event.payload[:4] == b"\x01\0\0\0" and len(event.payload) in (48, 64)
    else:
        assert isinstance(event, (ExecuteSrb, CreateSubChannels))


def test_resets_complete_when_ready() -> None:
    vsp = ready_vsp()
    for op in (Operation.RESET_LUN, Operation.RESET_ADAPTER, Operation.RESET_BUS):
        assert reply_of(vsp.receive(VstorPacket(op).encode())).status == 0
    assert not vsp.errors


# --- Our own mistakes and a VSP's ------------------------------------------------


def test_complete_srb_cuts_sense_to_the_guests_room() -> None:
    vsp = ready_vsp()
    request = VmScsiRequest(cdb_length=6, sense_info_length=8, data_in=1, data_transfer_length=512)
    completion = parse_completion(vsp.complete_srb(request, 4, 2, NOT_READY_SENSE, 0))
    assert completion.sense == NOT_READY_SENSE[:8]
    assert completion.srb_status == 0x84
    with pytest.raises(ValueError, match="513 bytes transferred of 512"):
        vsp.complete_srb(request, 1, transferred=513)
    # Pre-Win8 carries 18 sense bytes, even to a guest that left room for 20.
    roomy = dataclasses.replace(request, sense_info_length=20)
    old = ready_vsp(VSTOR_VERSION_WIN7)
    assert parse_completion(old.complete_srb(roomy, 4, 2, bytes(range(20)))).sense == (
        bytes(range(18))
    )


def test_vsc_clamps_sense_a_vsp_overstates() -> None:
    srb = VmScsiRequest(srb_status=0x84, scsi_status=2, sense_info_length=200, data=b"\x70" * 20)
    completion = parse_completion(VstorPacket(1, 0, 0, srb.pack()).encode())
    assert completion.sense == b"\x70" * 20


def test_vsp_reports_sense_bytes_without_autosense_valid() -> None:
    """Sense is valid only with AUTOSENSE_VALID (Linux copies it only then):
    bytes left in the union otherwise are no sense."""
    srb = VmScsiRequest(
        srb_status=SrbStatus.ERROR, scsi_status=2, sense_info_length=18, data=NOT_READY_SENSE
    )
    completion = parse_completion(VstorPacket(1, 0, 0, srb.pack()).encode())
    assert completion.sense == b"" and not completion.succeeded
    flagged = dataclasses.replace(srb, srb_status=SrbStatus.ERROR | SrbStatus.AUTOSENSE_VALID)
    assert parse_completion(VstorPacket(1, 0, 0, flagged.pack()).encode()).sense == (
        NOT_READY_SENSE
    )


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="max_transfer_bytes"):
        StorvspProtocol(0)
    with pytest.raises(ValueError, match="max_channel_count"):
        StorvspProtocol(0x40000, 2 + MAX_SUB_CHANNELS)
    with pytest.raises(ValueError, match="accept_versions"):
        StorvspProtocol(0x40000, accept_versions=())
    with pytest.raises(ValueError, match="CDB is 1..16"):
        build_srb(bytes(17), 0, 2, 0)
    with pytest.raises(ValueError, match="cannot ask"):
        StorvscProtocol().create_sub_channels(1)


def test_vsc_rejects_a_vsp_that_refuses_or_answers_wrongly() -> None:
    vsc = StorvscProtocol()
    vsc.start()
    with pytest.raises(StorageProtocolError, match="status 0xc0000001"):
        vsc.receive(VstorPacket(1, status=0xC0000001).encode())
    with pytest.raises(StorageProtocolError, match="EXECUTE_SRB"):
        vsc.receive(VstorPacket(3).encode())
    with pytest.raises(StorageProtocolError, match="needs 48"):
        parse_completion(bytes(20))


# --- Parse once -------------------------------------------------------------------


def test_srb_is_parsed_once_from_a_private_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """One copy of the packet, each struct decoded once; the guest rewriting
    its ring afterwards changes nothing the VSP acts on."""
    vsp = ready_vsp()
    decoded: list[str] = []
    for cls in (VstorHeader, VstorPacket, VmScsiRequest):
        original = cls.unpack_from.__func__  # type: ignore[attr-defined]

        def counting(c: Any, buffer: Any, offset: int = 0, _original: Any = original) -> Any:
            decoded.append(c.__name__)
            return _original(c, buffer, offset)

        monkeypatch.setattr(cls, "unpack_from", classmethod(counting))
    ring = bytearray(READ10_REQUEST)
    event = vsp.receive(memoryview(ring), ONE_PAGE)
    assert sorted(decoded) == ["VmScsiRequest", "VstorHeader"]
    ring[12:] = bytes(52)  # a double fetch would now see no SRB at all
    assert isinstance(event, ExecuteSrb)
    assert (event.cdb, event.lun, event.transfer_length) == (READ10, 1, 4096)
