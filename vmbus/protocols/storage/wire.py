"""VSTOR wire formats: the vstor_packet and its union members, operations,
SRB status and flags, versions and sizes (docs/protocol.md §5, from
drivers/scsi/storvsc_drv.c; pre-Win8 sizes from the Sengar patch;
cross-checked with microsoft/mu_msvm StorvscDxe and FreeBSD's storvsc).

Sizes: from protocol 5.1 (Win8) on, a vstor_packet is 64 bytes; before, it
is its first 48 (the vmscsi_request lacks its 16-byte Win8 extension). One
declaration serves both, as in Linux: `VstorPacket.encode(size)` cuts,
`VstorPacket.decode` zero-fills.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Annotated

from vmbus.errors import PeerError, UsageError
from vmbus.packet import MAX_GPA_PFNS, PAGE_SIZE
from vmbus.wire import U8, U16, U32, U64, Bytes, WireError, WireStruct, wire_struct

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
VSTOR_HEADER_SIZE = 12  # operation, flags, status
UNION_SIZE = VSTOR_PACKET_SIZE - VSTOR_HEADER_SIZE

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


class StorageProtocolError(PeerError, ValueError):
    """The VSP answered wrongly (a remote error): a refused step, a reply
    that is no COMPLETE_IO, a truncated packet, no common version."""


@wire_struct(size=VSTOR_HEADER_SIZE)
@dataclass(frozen=True)
class VstorHeader(WireStruct):
    """The first 12 bytes of every vstor_packet, before its union: what a
    receiver reads to learn which union member follows."""

    operation: Annotated[int, U32]
    flags: Annotated[int, U32] = REQUEST_COMPLETION_FLAG
    status: Annotated[int, U32] = 0


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
            raise UsageError(f"a vstor_packet is 64 or 48 bytes, not {size}")
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
