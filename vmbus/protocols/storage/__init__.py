"""VSTOR, the storvsc/storvsp protocol: wire structs, the VSP state machine
(sans-I/O) and helpers for a VSC.

Source: PROTOCOL-FACTS §5 (drivers/scsi/storvsc_drv.c; pre-Win8 sizes from
the Sengar patch), cross-checked with the UEFI VSC in microsoft/mu_msvm
(MsvmPkg/StorvscDxe: VstorageProtocol.h, StorchannelDxe.c) and FreeBSD's
storvsc. Every VSTOR message is one `struct vstor_packet`.

Sizes: from protocol 5.1 (Win8) on, a vstor_packet is 64 bytes; before, it
is its first 48 (the vmscsi_request lacks its 16-byte Win8 extension). One
declaration serves both, as in Linux: `VstorPacket.encode(size)` cuts,
`VstorPacket.decode` zero-fills. Before a version is agreed guests use
either size (recent Linux and FreeBSD 64, UEFI 48); the VSP answers in the
size it was asked in, and in the negotiated size afterwards.

Sans-I/O: `StorvspProtocol.receive` takes one packet's payload (and the GPA
ranges of a GPA-direct packet) and returns exactly one event. The caller
sends replies as completions echoing the packet's transaction id, and for
`ExecuteSrb` moves the data and calls `complete_srb`. A hostile guest never
raises here: a bad packet is answered with a non-zero NTSTATUS (a bad SRB
with an SRB error status) and counted in `StorvspProtocol.errors`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum, IntEnum, IntFlag
from typing import Annotated

from vmbus.packet import MAX_GPA_PFNS, PAGE_SIZE, GpaRange
from vmbus.wire import U8, U16, U32, U64, Bytes, WireError, WireStruct, open_enum, wire_struct

# Protocol versions (§5.1): major << 8 | minor.
VSTOR_VERSION_WIN6 = 0x0200
VSTOR_VERSION_WIN7 = 0x0402
VSTOR_VERSION_WIN8 = 0x0501  # first with the 64-byte packet and sub-channels
VSTOR_VERSION_WIN8_1 = 0x0600
VSTOR_VERSION_WIN10 = 0x0602
VSC_VERSIONS = (VSTOR_VERSION_WIN10, VSTOR_VERSION_WIN8_1, VSTOR_VERSION_WIN8)  # recent Linux
VSP_VERSIONS = (*VSC_VERSIONS, VSTOR_VERSION_WIN7, VSTOR_VERSION_WIN6)

# Sizes (§5.3, §5.4).
VSTOR_PACKET_SIZE = 64
PRE_WIN8_VSTOR_PACKET_SIZE = 48
VMSCSI_REQUEST_SIZE = 52
PRE_WIN8_VMSCSI_REQUEST_SIZE = 36
SENSE_BUFFER_SIZE = 20  # STORVSC_SENSE_BUFFER_SIZE 0x14: the whole cdb/sense union
PRE_WIN8_SENSE_BUFFER_SIZE = 18
MAX_CDB_LENGTH = 16  # STORVSC_MAX_CMD_LEN: SCSI has no longer CDBs
STORAGE_CHANNEL_PROPERTIES_BYTES = 24  # also the OPENCHANNEL userdata, all zero
UNION_SIZE = VSTOR_PACKET_SIZE - 12  # after operation, flags, status

# Flags and transaction ids (§5.3, §5.7, §2.6).
REQUEST_COMPLETION_FLAG = 0x1  # vstor_packet.flags: Linux always sets it
STORAGE_CHANNEL_SUPPORTS_MULTI_CHANNEL = 0x1  # storage_channel_properties.flags
VMBUS_RQST_INIT = 0xFFFF_FFFF_FFFF_FFFD  # trans_id of Linux's initialization packets

# vstor_packet.status values (NTSTATUS). Guests only test for zero, except
# UEFI's VSC, which tries the next version only on REVISION_MISMATCH.
STATUS_SUCCESS = 0
STATUS_INVALID_PARAMETER = 0xC000000D  # malformed packet or field
STATUS_REVISION_MISMATCH = 0xC0000059  # protocol version declined
STATUS_NOT_SUPPORTED = 0xC00000BB  # operation this VSP does not implement
STATUS_INVALID_DEVICE_STATE = 0xC0000184  # operation out of order

# Caps on what a guest can make us accept, and on our own configuration.
SCSI_MAX_PATHS = 8  # Linux STORVSC_MAX_CHANNELS: path_id range (§5.7)
SCSI_MAX_TARGETS = 2  # Linux STORVSC_MAX_TARGETS (UEFI's VSC probes 0..2: give it 3)
SCSI_MAX_LUNS = 255  # Linux STORVSC_MAX_LUNS_PER_TARGET
MAX_SUB_CHANNELS = 64  # each costs the host a ring pair and a worker
# A transfer must fit one GPA-direct packet as vmbus.packet decodes it, even unaligned.
MAX_TRANSFER_BYTES_LIMIT = (MAX_GPA_PFNS - 1) * PAGE_SIZE


class Operation(IntEnum):
    """enum vstor_packet_operation (§5.2). Open: unknown values stay ints."""

    COMPLETE_IO = 1
    REMOVE_DEVICE = 2
    EXECUTE_SRB = 3
    RESET_LUN = 4
    RESET_ADAPTER = 5
    RESET_BUS = 6
    BEGIN_INITIALIZATION = 7
    END_INITIALIZATION = 8
    QUERY_PROTOCOL_VERSION = 9
    QUERY_PROPERTIES = 10
    ENUMERATE_BUS = 11
    FCHBA_DATA = 12
    CREATE_SUB_CHANNELS = 13


class SrbStatus(IntEnum):
    """srb_status (§5.6): a code in the low 6 bits, two flag bits on top."""

    SUCCESS = 0x01
    ABORTED = 0x02
    ERROR = 0x04
    INVALID_REQUEST = 0x06
    TIMEOUT = 0x09
    SELECTION_TIMEOUT = 0x0A
    BUS_RESET = 0x0E
    DATA_OVERRUN = 0x12  # Linux keeps data_transfer_length only for this error
    INVALID_LUN = 0x20  # Linux removes the LUN
    INTERNAL_ERROR = 0x30
    QUEUE_FROZEN = 0x40  # flag
    AUTOSENSE_VALID = 0x80  # flag: sense_data holds sense_info_length bytes


SRB_STATUS_FLAGS = SrbStatus.AUTOSENSE_VALID | SrbStatus.QUEUE_FROZEN


class SrbFlags(IntFlag):
    """srb_flags (§5.5). IntFlag keeps unknown bits."""

    NO_DATA_TRANSFER = 0x00000000
    QUEUE_ACTION_ENABLE = 0x00000002
    DISABLE_DISCONNECT = 0x00000004
    DISABLE_SYNCH_TRANSFER = 0x00000008  # Linux always sets it
    BYPASS_FROZEN_QUEUE = 0x00000010
    DISABLE_AUTOSENSE = 0x00000020
    DATA_IN = 0x00000040
    DATA_OUT = 0x00000080
    NO_QUEUE_FREEZE = 0x00000100
    ADAPTER_CACHE_ENABLE = 0x00000200
    FREE_SENSE_BUFFER = 0x00000400
    D3_PROCESSING = 0x00000800
    IS_ACTIVE = 0x00010000
    ALLOCATED_FROM_ZONE = 0x00020000
    SGLIST_FROM_POOL = 0x00040000
    BYPASS_LOCKED_QUEUE = 0x00080000
    NO_KEEP_AWAKE = 0x00100000
    PORT_DRIVER_ALLOCSENSE = 0x00200000
    PORT_DRIVER_SENSEHASPORT = 0x00400000
    DONT_START_NEXT_PACKET = 0x00800000
    PORT_DRIVER_RESERVED = 0x0F000000
    CLASS_DRIVER_RESERVED = 0xF0000000


class DataDirection(IntEnum):
    """vmscsi_request.data_in (enum storvsc_request_type)."""

    WRITE_TYPE = 0
    READ_TYPE = 1
    UNKNOWN_TYPE = 2  # no data


def _fit(value: bytes, size: int, what: str) -> bytes:
    """Zero-pad a fixed byte field; refuse what struct would silently cut."""
    if len(value) > size:
        raise WireError(f"{what} is {size} bytes, got {len(value)}")
    return bytes(value).ljust(size, b"\0")


def packet_size(version: int) -> int:
    """The vstor_packet size a protocol version uses."""
    return VSTOR_PACKET_SIZE if version >= VSTOR_VERSION_WIN8 else PRE_WIN8_VSTOR_PACKET_SIZE


def sense_buffer_size(version: int) -> int:
    """The sense bytes a protocol version carries back."""
    return SENSE_BUFFER_SIZE if version >= VSTOR_VERSION_WIN8 else PRE_WIN8_SENSE_BUFFER_SIZE


@wire_struct(size=VSTOR_PACKET_SIZE)
@dataclass(frozen=True)
class VstorPacket(WireStruct):
    """struct vstor_packet {
        enum vstor_packet_operation operation;     /* u32 */
        u32 flags;                                 /* REQUEST_COMPLETION_FLAG */
        u32 status;                                /* NTSTATUS, host replies */
        union {
            struct vmscsi_request vm_srb;
            struct vmstorage_channel_properties storage_channel_properties;
            struct vmstorage_protocol_version version;
            struct hv_fc_wwn_packet wwn_packet;
            u16 sub_channel_count;
            u8 buffer[0x34];
        };
    } __packed;
    Pre-Win8 protocols send its first PRE_WIN8_VSTOR_PACKET_SIZE bytes."""

    operation: Annotated[int, U32]
    flags: Annotated[int, U32] = REQUEST_COMPLETION_FLAG
    status: Annotated[int, U32] = 0
    body: Annotated[bytes, Bytes(UNION_SIZE)] = bytes(UNION_SIZE)  # the union

    def __post_init__(self) -> None:
        object.__setattr__(self, "body", _fit(self.body, UNION_SIZE, "VstorPacket.body"))

    def encode(self, size: int = VSTOR_PACKET_SIZE) -> bytes:
        """The wire bytes in the 64-byte or the pre-Win8 48-byte form."""
        if size not in (VSTOR_PACKET_SIZE, PRE_WIN8_VSTOR_PACKET_SIZE):
            raise ValueError(f"a vstor_packet is 64 or 48 bytes, not {size}")
        return self.pack()[:size]

    @classmethod
    def decode(
        cls, payload: bytes | bytearray | memoryview, min_size: int = PRE_WIN8_VSTOR_PACKET_SIZE
    ) -> VstorPacket:
        """Either form; a short one gets a zero Win8 extension, bytes past 64
        (ring padding) are ignored. WireError when shorter than min_size."""
        view = memoryview(payload).cast("B")
        if len(view) < min_size:
            raise WireError(f"vstor_packet of {len(view)} bytes, needs {min_size}")
        return cls.unpack(bytes(view[:VSTOR_PACKET_SIZE]).ljust(VSTOR_PACKET_SIZE, b"\0"))


@wire_struct(size=VMSCSI_REQUEST_SIZE)
@dataclass(frozen=True)
class VmScsiRequest(WireStruct):
    """struct vmscsi_request {
        u16 length; u8 srb_status; u8 scsi_status;
        u8 port_number; u8 path_id; u8 target_id; u8 lun;
        u8 cdb_length; u8 sense_info_length; u8 data_in; u8 reserved;
        u32 data_transfer_length;
        union { u8 cdb[16]; u8 sense_data[20]; u8 reserved_array[20]; };
        struct vmscsi_win8_extension {             /* absent before Win8 */
            u16 reserve; u8 queue_tag; u8 queue_action;
            u32 srb_flags; u32 time_out_value; u32 queue_sort_ey;
        } win8_extension;
    } __packed;
    Pre-Win8 protocols carry its first PRE_WIN8_VMSCSI_REQUEST_SIZE bytes."""

    length: Annotated[int, U16] = VMSCSI_REQUEST_SIZE  # not checked: the packet size says it
    srb_status: Annotated[int, U8] = 0
    scsi_status: Annotated[int, U8] = 0
    port_number: Annotated[int, U8] = 0
    path_id: Annotated[int, U8] = 0
    target_id: Annotated[int, U8] = 0
    lun: Annotated[int, U8] = 0
    cdb_length: Annotated[int, U8] = 0
    sense_info_length: Annotated[int, U8] = 0  # guest: room; host: valid sense bytes
    data_in: Annotated[int, U8] = DataDirection.UNKNOWN_TYPE
    reserved: Annotated[int, U8] = 0
    data_transfer_length: Annotated[int, U32] = 0  # guest: buffer; host: bytes moved
    data: Annotated[bytes, Bytes(SENSE_BUFFER_SIZE)] = bytes(SENSE_BUFFER_SIZE)  # cdb/sense
    reserve: Annotated[int, U16] = 0
    queue_tag: Annotated[int, U8] = 0
    queue_action: Annotated[int, U8] = 0
    srb_flags: Annotated[int, U32] = 0
    time_out_value: Annotated[int, U32] = 0
    queue_sort_key: Annotated[int, U32] = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", _fit(self.data, SENSE_BUFFER_SIZE, "VmScsiRequest.data"))

    @property
    def cdb(self) -> bytes:
        return self.data[: self.cdb_length]

    @property
    def sense(self) -> bytes:
        return self.data[: self.sense_info_length]


@wire_struct(size=STORAGE_CHANNEL_PROPERTIES_BYTES)
@dataclass(frozen=True)
class StorageChannelProperties(WireStruct):
    """struct vmstorage_channel_properties {
        u32 reserved; u16 max_channel_cnt; u16 reserved1;
        u32 flags; u32 max_transfer_bytes; u64 reserved2;
    } __packed;"""

    reserved: Annotated[int, U32] = 0
    max_channel_cnt: Annotated[int, U16] = 0  # sub-channels the VSC may ask for
    reserved1: Annotated[int, U16] = 0
    flags: Annotated[int, U32] = 0  # STORAGE_CHANNEL_SUPPORTS_MULTI_CHANNEL
    max_transfer_bytes: Annotated[int, U32] = 0
    reserved2: Annotated[int, U64] = 0


@wire_struct(size=4)
@dataclass(frozen=True)
class ProtocolVersion(WireStruct):
    """struct vmstorage_protocol_version { u16 major_minor; u16 revision; } __packed;"""

    major_minor: Annotated[int, U16]
    revision: Annotated[int, U16] = 0  # Windows build number; Linux sends 0


@wire_struct(size=2)
@dataclass(frozen=True)
class SubChannelCount(WireStruct):
    """u16 sub_channel_count; (the union member of CREATE_SUB_CHANNELS)"""

    sub_channel_count: Annotated[int, U16]


def _completion(status: int, body: bytes, size: int) -> bytes:
    """A host reply: COMPLETE_IO with `status` and the union `body`."""
    return VstorPacket(Operation.COMPLETE_IO, 0, status, body).encode(size)


def _failed_srb(request: VmScsiRequest, srb_status: int) -> bytes:
    """The vm_srb of a refused request: no data moved, no sense."""
    return replace(
        request, srb_status=srb_status, scsi_status=0, sense_info_length=0, data_transfer_length=0
    ).pack()


# --- The VSP side -----------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """Send `payload` now, as the completion of the packet."""

    payload: bytes
    error: str | None = None  # why the guest's packet was refused (counted in errors)


@dataclass(frozen=True)
class ExecuteSrb:
    """A valid SCSI request for the I/O layer: move the data through `ranges`,
    then send `StorvspProtocol.complete_srb(request, ...)`. The direction is
    data_in's; srb_flags pass through unchecked."""

    request: VmScsiRequest
    direction: DataDirection
    ranges: tuple[GpaRange, ...] = ()

    @property
    def cdb(self) -> bytes:
        return self.request.cdb

    @property
    def lun(self) -> int:
        return self.request.lun

    @property
    def transfer_length(self) -> int:
        return self.request.data_transfer_length


@dataclass(frozen=True)
class CreateSubChannels:
    """Offer `count` sub-channels, then send `reply`."""

    count: int
    reply: bytes


Event = Reply | ExecuteSrb | CreateSubChannels


class VspState(Enum):
    WAIT_BEGIN = "waiting for BEGIN_INITIALIZATION"
    WAIT_VERSION = "waiting for an acceptable QUERY_PROTOCOL_VERSION"
    WAIT_PROPERTIES = "waiting for QUERY_PROPERTIES"
    WAIT_END = "waiting for END_INITIALIZATION"
    READY = "ready"


# (state, operation) -> the state after it succeeds. Any other pair is out of order.
_VSP_TRANSITIONS = {
    (VspState.WAIT_BEGIN, Operation.BEGIN_INITIALIZATION): VspState.WAIT_VERSION,
    (VspState.WAIT_VERSION, Operation.QUERY_PROTOCOL_VERSION): VspState.WAIT_PROPERTIES,
    (VspState.WAIT_PROPERTIES, Operation.QUERY_PROPERTIES): VspState.WAIT_END,
    (VspState.WAIT_END, Operation.END_INITIALIZATION): VspState.READY,
    (VspState.READY, Operation.EXECUTE_SRB): VspState.READY,
    (VspState.READY, Operation.RESET_LUN): VspState.READY,
    (VspState.READY, Operation.RESET_ADAPTER): VspState.READY,
    (VspState.READY, Operation.RESET_BUS): VspState.READY,
    (VspState.READY, Operation.CREATE_SUB_CHANNELS): VspState.READY,
}
_VSP_OPERATIONS = frozenset(op for _, op in _VSP_TRANSITIONS)


class StorvspProtocol:
    """The VSP side of one storage device (its primary channel and
    sub-channels share it). max_channel_count counts the primary: more than
    1 offers max_channel_count - 1 sub-channels from protocol 5.1 on."""

    def __init__(
        self,
        max_transfer_bytes: int,
        max_channel_count: int = 1,
        *,
        accept_versions: Sequence[int] = VSP_VERSIONS,
        max_paths: int = SCSI_MAX_PATHS,
        max_targets: int = SCSI_MAX_TARGETS,
        max_luns: int = SCSI_MAX_LUNS,
    ) -> None:
        if not PAGE_SIZE <= max_transfer_bytes <= MAX_TRANSFER_BYTES_LIMIT:
            raise ValueError(f"max_transfer_bytes {max_transfer_bytes} is not in 4 KiB..32 MiB")
        if not 1 <= max_channel_count <= 1 + MAX_SUB_CHANNELS:
            raise ValueError(f"max_channel_count {max_channel_count} is not in 1..65")
        if not accept_versions or any(not 0 < v <= 0xFFFF for v in accept_versions):
            raise ValueError(f"accept_versions {accept_versions!r} must be u16 versions")
        self.max_transfer_bytes = max_transfer_bytes
        self.max_channel_count = max_channel_count
        self.accept_versions = tuple(accept_versions)
        self.limits = (max_paths, max_targets, max_luns)
        self.state = VspState.WAIT_BEGIN
        self.version: int | None = None
        self.sub_channels = 0
        self.errors: Counter[str] = Counter()

    @property
    def packet_size(self) -> int:
        if self.version is None:
            raise ValueError("no protocol version negotiated yet")
        return packet_size(self.version)

    @property
    def max_sub_channels(self) -> int:
        """What QUERY_PROPERTIES offers: none before Win8 (64-byte packets)."""
        if self.version is None or self.version < VSTOR_VERSION_WIN8:
            return 0
        return self.max_channel_count - 1

    def receive(
        self, payload: bytes | bytearray | memoryview, ranges: Sequence[GpaRange] = ()
    ) -> Event:
        """The one answer to one packet from the guest. `ranges` are the GPA
        ranges of a GPA-direct packet, already checked against guest memory."""
        view = memoryview(payload).cast("B")
        if self.version is None:  # answer in the size we were asked in
            size = minimum = PRE_WIN8_VSTOR_PACKET_SIZE
            if len(view) >= VSTOR_PACKET_SIZE:
                size = VSTOR_PACKET_SIZE
        else:
            size = minimum = self.packet_size
        packet = VstorPacket.decode(view[:size], min_size=0)
        op = open_enum(Operation, packet.operation)
        if len(view) < minimum:
            reason = f"{len(view)}-byte packet, needs {minimum}"
            return self._refuse(packet, size, STATUS_INVALID_PARAMETER, "malformed", reason)
        if op not in _VSP_OPERATIONS:
            reason = f"operation {op!r} is not one a VSC sends to this VSP"
            return self._refuse(packet, size, STATUS_NOT_SUPPORTED, "unsupported", reason)
        after = _VSP_TRANSITIONS.get((self.state, Operation(op)))
        if after is None:
            reason = f"{Operation(op).name} while {self.state.value}"
            return self._refuse(packet, size, STATUS_INVALID_DEVICE_STATE, "out_of_order", reason)
        event, advance = self._handle(Operation(op), packet, size, ranges)
        if advance:
            self.state = after
        return event

    def _handle(
        self, op: Operation, packet: VstorPacket, size: int, ranges: Sequence[GpaRange]
    ) -> tuple[Event, bool]:
        if op == Operation.EXECUTE_SRB:
            return self._execute_srb(packet, size, ranges), True
        if op == Operation.QUERY_PROTOCOL_VERSION:
            version = ProtocolVersion.unpack(packet.body).major_minor
            if version not in self.accept_versions:  # the guest tries its next one
                return Reply(_completion(STATUS_REVISION_MISMATCH, packet.body, size)), False
            self.version = version
        elif op == Operation.QUERY_PROPERTIES:
            subs = self.max_sub_channels
            properties = StorageChannelProperties(
                max_channel_cnt=subs,
                flags=STORAGE_CHANNEL_SUPPORTS_MULTI_CHANNEL if subs else 0,
                max_transfer_bytes=self.max_transfer_bytes,
            )
            return Reply(_completion(STATUS_SUCCESS, properties.pack(), size)), True
        elif op == Operation.CREATE_SUB_CHANNELS:
            return self._create_sub_channels(packet, size)
        # BEGIN/END_INITIALIZATION, and resets: outstanding SRBs complete on their own.
        return Reply(_completion(STATUS_SUCCESS, packet.body, size)), True

    def _refuse(self, packet: VstorPacket, size: int, status: int, kind: str, reason: str) -> Reply:
        """Complete a bad packet with `status`; an SRB also fails as an SRB."""
        self.errors[kind] += 1
        body = packet.body
        if packet.operation == Operation.EXECUTE_SRB:
            body = _failed_srb(VmScsiRequest.unpack(body), SrbStatus.INVALID_REQUEST)
        return Reply(_completion(status, body, size), reason)

    def _execute_srb(self, packet: VstorPacket, size: int, ranges: Sequence[GpaRange]) -> Event:
        request = VmScsiRequest.unpack(packet.body)
        problem = self._srb_problem(request, ranges)
        srb_status = SrbStatus.INVALID_REQUEST
        if problem is None:
            paths, targets, luns = self.limits
            if request.path_id < paths and request.target_id < targets and request.lun < luns:
                return ExecuteSrb(request, DataDirection(request.data_in), tuple(ranges))
            problem = f"no LUN {request.path_id}:{request.target_id}:{request.lun}"
            srb_status = SrbStatus.INVALID_LUN
        self.errors["bad_srb"] += 1
        return Reply(_completion(STATUS_SUCCESS, _failed_srb(request, srb_status), size), problem)

    def _srb_problem(self, request: VmScsiRequest, ranges: Sequence[GpaRange]) -> str | None:
        if not 1 <= request.cdb_length <= MAX_CDB_LENGTH:
            return f"cdb_length {request.cdb_length} is not in 1..{MAX_CDB_LENGTH}"
        if request.sense_info_length > SENSE_BUFFER_SIZE:
            return f"sense_info_length {request.sense_info_length} is over {SENSE_BUFFER_SIZE}"
        direction = open_enum(DataDirection, request.data_in)
        if not isinstance(direction, DataDirection):
            return f"data_in {request.data_in} is no direction"
        length = request.data_transfer_length
        if length > self.max_transfer_bytes:
            return f"transfer of {length} bytes is over max_transfer_bytes"
        if direction == DataDirection.UNKNOWN_TYPE and length:
            return f"UNKNOWN_TYPE (no data) with a {length}-byte transfer"
        buffer = sum(r.byte_count for r in ranges)
        if length > buffer:
            return f"transfer of {length} bytes into a {buffer}-byte buffer"
        return None

    def _create_sub_channels(self, packet: VstorPacket, size: int) -> tuple[Event, bool]:
        count = SubChannelCount.unpack(packet.body).sub_channel_count
        limit = self.max_sub_channels
        if not limit:
            status, reason = STATUS_NOT_SUPPORTED, "sub-channels are not offered"
        elif self.sub_channels:
            status, reason = STATUS_INVALID_DEVICE_STATE, "sub-channels were already created"
        elif not 1 <= count <= limit:
            status, reason = STATUS_INVALID_PARAMETER, f"{count} sub-channels, not 1..{limit}"
        else:
            self.sub_channels = count
            return CreateSubChannels(count, _completion(STATUS_SUCCESS, packet.body, size)), True
        return self._refuse(packet, size, status, "bad_sub_channels", reason), False

    def complete_srb(
        self,
        request: VmScsiRequest,
        srb_status: int,
        scsi_status: int = 0,
        sense: bytes = b"",
        transferred: int = 0,
    ) -> bytes:
        """The reply to an `ExecuteSrb`. Sense is cut to the room the guest
        gave and the protocol allows; when any is left, AUTOSENSE_VALID is set."""
        if not 0 <= transferred <= request.data_transfer_length:
            raise ValueError(f"{transferred} bytes transferred of {request.data_transfer_length}")
        room = min(request.sense_info_length, sense_buffer_size(self.version or 0))
        sense = bytes(sense[:room])
        if sense:
            srb_status |= SrbStatus.AUTOSENSE_VALID
        result = replace(
            request,
            srb_status=srb_status,
            scsi_status=scsi_status,
            sense_info_length=len(sense),
            data_transfer_length=transferred,
            data=sense,
        )
        return _completion(STATUS_SUCCESS, result.pack(), self.packet_size)


# --- The VSC side -----------------------------------------------------------


class StorageProtocolError(ValueError):
    """The VSP answered wrongly (a remote error): a refused step, a reply
    that is no COMPLETE_IO, a truncated packet, no common version."""


@dataclass(frozen=True)
class SrbCompletion:
    """The result of one SRB, as the VSP reported it."""

    status: int  # vstor_packet.status
    srb_status: int  # with its flag bits
    scsi_status: int
    sense: bytes
    transferred: int

    @property
    def succeeded(self) -> bool:
        return self.srb_status & ~SRB_STATUS_FLAGS == SrbStatus.SUCCESS


def _decode_reply(payload: bytes | bytearray | memoryview) -> VstorPacket:
    try:
        packet = VstorPacket.decode(payload)
    except WireError as error:
        raise StorageProtocolError(str(error)) from None
    if packet.operation != Operation.COMPLETE_IO:
        raise StorageProtocolError(f"reply is operation {open_enum(Operation, packet.operation)!r}")
    return packet


def parse_completion(payload: bytes | bytearray | memoryview) -> SrbCompletion:
    """Decode the VSP's reply to an EXECUTE_SRB."""
    reply = _decode_reply(payload)
    srb = VmScsiRequest.unpack(reply.body)  # srb.sense stops at the union, as Linux clamps
    return SrbCompletion(
        reply.status, srb.srb_status, srb.scsi_status, srb.sense, srb.data_transfer_length
    )


_DIRECTION_FLAGS = {
    DataDirection.WRITE_TYPE: SrbFlags.DATA_OUT,
    DataDirection.READ_TYPE: SrbFlags.DATA_IN,
    DataDirection.UNKNOWN_TYPE: SrbFlags.NO_DATA_TRANSFER,
}


def build_srb(
    cdb: bytes,
    lun: int,
    direction: DataDirection | int,
    transfer_length: int,
    sense_info_length: int | None = None,
    *,
    target_id: int = 0,
    path_id: int = 0,
    port_number: int = 0,
    srb_flags: int | None = None,
    time_out_value: int = 60,
    version: int = VSTOR_VERSION_WIN10,
) -> bytes:
    """An EXECUTE_SRB packet as Linux builds it; sense_info_length defaults to
    the version's sense buffer (20, or 18 before Win8)."""
    if not 1 <= len(cdb) <= MAX_CDB_LENGTH:
        raise ValueError(f"a CDB is 1..{MAX_CDB_LENGTH} bytes, got {len(cdb)}")
    direction = DataDirection(direction)
    if srb_flags is None:
        srb_flags = SrbFlags.DISABLE_SYNCH_TRANSFER | _DIRECTION_FLAGS[direction]
    win8 = version >= VSTOR_VERSION_WIN8
    if sense_info_length is None:
        sense_info_length = sense_buffer_size(version)
    request = VmScsiRequest(
        VMSCSI_REQUEST_SIZE if win8 else PRE_WIN8_VMSCSI_REQUEST_SIZE,
        port_number=port_number,
        path_id=path_id,
        target_id=target_id,
        lun=lun,
        cdb_length=len(cdb),
        sense_info_length=sense_info_length,
        data_in=direction,
        data_transfer_length=transfer_length,
        data=cdb,
        srb_flags=srb_flags,
        time_out_value=time_out_value,
    )
    return VstorPacket(Operation.EXECUTE_SRB, body=request.pack()).encode(packet_size(version))


class VscState(Enum):
    BEGIN = "BEGIN_INITIALIZATION sent"
    VERSION = "QUERY_PROTOCOL_VERSION sent"
    PROPERTIES = "QUERY_PROPERTIES sent"
    END = "END_INITIALIZATION sent"
    READY = "ready"
    SUB_CHANNELS = "CREATE_SUB_CHANNELS sent"


class StorvscProtocol:
    """The VSC side of initialization, sans-I/O. `start()` is the first
    packet; `receive(reply)` returns the next one, or None once ready. Send
    each inband with trans_id VMBUS_RQST_INIT and COMPLETION_REQUESTED.
    Packets before a version is agreed are `initial_size` bytes (UEFI: 48)."""

    def __init__(
        self, versions: Sequence[int] = VSC_VERSIONS, initial_size: int = VSTOR_PACKET_SIZE
    ) -> None:
        if not versions:
            raise ValueError("no protocol version to offer")
        self.versions = tuple(versions)
        self.initial_size = initial_size
        self.state = VscState.BEGIN
        self.version: int | None = None
        self.properties: StorageChannelProperties | None = None
        self._tried = 0

    @property
    def packet_size(self) -> int:
        return self.initial_size if self.version is None else packet_size(self.version)

    def _packet(self, op: Operation, body: bytes = b"") -> bytes:
        return VstorPacket(op, body=body).encode(self.packet_size)

    def _query_version(self) -> bytes:
        body = ProtocolVersion(self.versions[self._tried]).pack()
        return self._packet(Operation.QUERY_PROTOCOL_VERSION, body)

    def start(self) -> bytes:
        self.state = VscState.BEGIN
        return self._packet(Operation.BEGIN_INITIALIZATION)

    def receive(self, payload: bytes | bytearray | memoryview) -> bytes | None:
        reply = _decode_reply(payload)
        if self.state == VscState.READY:
            raise StorageProtocolError("a reply while no request is outstanding")
        if self.state == VscState.VERSION and reply.status != STATUS_SUCCESS:
            self._tried += 1
            if self._tried == len(self.versions):
                raise StorageProtocolError(f"the VSP accepts none of {self.versions}")
            return self._query_version()
        if reply.status != STATUS_SUCCESS:
            raise StorageProtocolError(f"{self.state.value}: status {reply.status:#x}")
        if self.state == VscState.BEGIN:
            self.state = VscState.VERSION
            return self._query_version()
        if self.state == VscState.VERSION:
            self.version = self.versions[self._tried]
            self.state = VscState.PROPERTIES
            return self._packet(Operation.QUERY_PROPERTIES)
        if self.state == VscState.PROPERTIES:
            self.properties = StorageChannelProperties.unpack(reply.body)
            self.state = VscState.END
            return self._packet(Operation.END_INITIALIZATION)
        self.state = VscState.READY  # END or SUB_CHANNELS done
        return None

    @property
    def max_sub_channels(self) -> int:
        """How many sub-channels the VSP lets us create (0: none)."""
        p = self.properties
        if p is None or not p.flags & STORAGE_CHANNEL_SUPPORTS_MULTI_CHANNEL:
            return 0
        return p.max_channel_cnt

    def create_sub_channels(self, count: int) -> bytes:
        """CREATE_SUB_CHANNELS; Linux asks for min(CPUs - 1, max_sub_channels)."""
        if self.state != VscState.READY or not 1 <= count <= self.max_sub_channels:
            raise ValueError(f"cannot ask for {count} sub-channels ({self.state.value})")
        self.state = VscState.SUB_CHANNELS
        return self._packet(Operation.CREATE_SUB_CHANNELS, SubChannelCount(count).pack())
