"""NVSP wire format (docs/protocol.md §6.1-6.3): versions, message types and
status, each nvsp_message member declared once, and their codec.

Every NVSP message is one `struct nvsp_message`: a u32 type, then a union.
Linux and DPDK send 40 bytes, FreeBSD 32 (§10.1); every member declared here
fits in 32, so `encode` pads to 40 and `decode` (the VSP's rule) accepts 32
or more. Hosts send shorter replies: `decode_short` (the VSC's rule) takes
what Linux's netvsc takes, the type field and the one member. Each struct
below is the type field followed by one union member; quoted C comes from
drivers/net/hyperv/hyperv_net.h.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Annotated, Any, TypeVar

from vmbus.errors import PeerError, UsageError
from vmbus.wire import U16, U32, U64, WireStruct, open_enum, wire_struct

# Protocol versions (§6.1), newest first as Linux tries them.
NVSP_PROTOCOL_VERSION_1 = 0x00000002
NVSP_PROTOCOL_VERSION_2 = 0x00030002
NVSP_PROTOCOL_VERSION_4 = 0x00040000
NVSP_PROTOCOL_VERSION_5 = 0x00050000  # first with sub-channels and NDIS 6.30
NVSP_PROTOCOL_VERSION_6 = 0x00060000
NVSP_PROTOCOL_VERSION_61 = 0x00060001
NVSP_INVALID_PROTOCOL_VERSION = 0xFFFFFFFF
NVSP_VERSIONS = (
    NVSP_PROTOCOL_VERSION_61,
    NVSP_PROTOCOL_VERSION_6,
    NVSP_PROTOCOL_VERSION_5,
    NVSP_PROTOCOL_VERSION_4,
    NVSP_PROTOCOL_VERSION_2,
    NVSP_PROTOCOL_VERSION_1,
)
NDIS_VERSION_6_1 = 0x00060001  # what Linux announces up to NVSP 4
NDIS_VERSION_6_30 = 0x0006001E  # from NVSP 5 on

# Sizes and ids (§6.3, §6.4, §10.1).
NVSP_MESSAGE_SIZE = 40  # what we send; Linux and DPDK send this too
NVSP_MIN_MESSAGE_SIZE = 32  # FreeBSD's requests
RECEIVE_BUFFER_ID = 0xCAFE  # Linux's id; also the transfer-page pageset id
SEND_BUFFER_ID = 0  # Linux's id (DPDK and FreeBSD send 0xFACE)
INVALID_SECTION_INDEX = 0xFFFFFFFF  # SEND_RNDIS_PKT not in the send buffer
MIN_SECTION_SIZE = 68  # Linux refuses smaller sections (ETH_MIN_MTU)
DEFAULT_RECV_SECTION_SIZE = 1728  # Linux's default: holds one RNDIS-framed 1514-byte frame
DEFAULT_SEND_SECTION_SIZE = 6144  # Linux's default
VRSS_SEND_TABLE_SIZE = 16  # Linux requires exactly this many entries
SUBCHANNEL_ALLOCATE = 1  # nvsp_5_subchannel_request.op

# Caps on what a guest can make us hold.
MAX_RECEIVE_SECTIONS = 1 << 15  # bounds the free list; Linux's 31 MiB maximum needs ~19,000
MAX_SUB_CHANNELS = 64  # Linux's maximum channel count; each costs a ring pair
MAX_SECTION_SIZE = 1 << 20  # a section holds one RNDIS message, or a batch of them

# NDIS_CONFIG capability bits (§6.3).
CAPABILITY_SRIOV = 1 << 2
CAPABILITY_IEEE8021Q = 1 << 3
CAPABILITY_TEAMING = 1 << 5  # Linux: needed to get link-speed updates
CAPABILITY_RSC = 1 << 7


class NvspError(PeerError, ValueError):
    """An NVSP message that cannot be decoded, or a VSP reply a VSC cannot
    accept: the peer broke the protocol."""


class NvspMessageType(IntEnum):
    """The u32 at offset 0 of every nvsp_message (§6.2). Open: unknown values stay ints."""

    NONE = 0
    INIT = 1
    INIT_COMPLETE = 2
    SEND_NDIS_VER = 100
    SEND_RECV_BUF = 101
    SEND_RECV_BUF_COMPLETE = 102
    REVOKE_RECV_BUF = 103
    SEND_SEND_BUF = 104
    SEND_SEND_BUF_COMPLETE = 105
    REVOKE_SEND_BUF = 106
    SEND_RNDIS_PKT = 107
    SEND_RNDIS_PKT_COMPLETE = 108
    SEND_NDIS_CONFIG = 125
    SEND_VF_ASSOCIATION = 128
    SWITCH_DATA_PATH = 129
    SUBCHANNEL = 133  # request and reply
    SEND_INDIRECTION_TABLE = 134


class NvspStatus(IntEnum):
    NONE = 0
    SUCCESS = 1
    FAIL = 2
    PROTOCOL_TOO_NEW = 3
    PROTOCOL_TOO_OLD = 4
    INVALID_RNDIS_PKT = 5
    BUSY = 6
    PROTOCOL_UNSUPPORTED = 7


class RndisChannel(IntEnum):
    """SEND_RNDIS_PKT channel_type."""

    DATA = 0  # RMC_DATA: PACKET messages
    CONTROL = 1  # RMC_CONTROL: everything else


_M = TypeVar("_M", bound=WireStruct)


# --- Wire structs: each is the message type, then its union member (§6.3) ----


@wire_struct(size=12)
@dataclass(frozen=True)
class NvspInit(WireStruct):
    """struct nvsp_message_init { u32 min_protocol_ver; u32 max_protocol_ver; }"""

    msg_type: Annotated[int, U32] = NvspMessageType.INIT
    min_protocol_ver: Annotated[int, U32] = 0
    max_protocol_ver: Annotated[int, U32] = 0


@wire_struct(size=16)
@dataclass(frozen=True)
class NvspInitComplete(WireStruct):
    """struct nvsp_message_init_complete {
    u32 negotiated_protocol_ver; u32 max_mdl_chain_len; u32 status; }"""

    msg_type: Annotated[int, U32] = NvspMessageType.INIT_COMPLETE
    negotiated_protocol_ver: Annotated[int, U32] = NVSP_INVALID_PROTOCOL_VERSION
    max_mdl_chain_len: Annotated[int, U32] = 0
    status: Annotated[int, U32] = NvspStatus.FAIL


@wire_struct(size=12)
@dataclass(frozen=True)
class SendNdisVersion(WireStruct):
    """struct nvsp_1_message_send_ndis_version { u32 ndis_major_ver; u32 ndis_minor_ver; }"""

    msg_type: Annotated[int, U32] = NvspMessageType.SEND_NDIS_VER
    ndis_major_ver: Annotated[int, U32] = 0
    ndis_minor_ver: Annotated[int, U32] = 0


@wire_struct(size=20)
@dataclass(frozen=True)
class SendNdisConfig(WireStruct):
    """struct nvsp_2_send_ndis_config { u32 mtu; u32 reserved; u64 capability; } __packed;
    Linux sends its MTU plus the 14-byte Ethernet header."""

    msg_type: Annotated[int, U32] = NvspMessageType.SEND_NDIS_CONFIG
    mtu: Annotated[int, U32] = 0
    reserved: Annotated[int, U32] = 0
    capability: Annotated[int, U64] = 0


@wire_struct(size=10)
@dataclass(frozen=True)
class SendReceiveBuffer(WireStruct):
    """struct nvsp_1_message_send_receive_buffer { u32 gpadl_handle; u16 id; } __packed;"""

    msg_type: Annotated[int, U32] = NvspMessageType.SEND_RECV_BUF
    gpadl_handle: Annotated[int, U32] = 0
    id: Annotated[int, U16] = RECEIVE_BUFFER_ID


@wire_struct(size=28)
@dataclass(frozen=True)
class SendReceiveBufferComplete(WireStruct):
    """struct nvsp_1_message_send_receive_buffer_complete {
        u32 status; u32 num_sections;
        struct nvsp_1_receive_buffer_section sections[1] {
            u32 offset; u32 sub_alloc_size; u32 num_sub_allocs; u32 end_offset; };
    } __packed;  Linux requires exactly one section, at offset 0."""

    msg_type: Annotated[int, U32] = NvspMessageType.SEND_RECV_BUF_COMPLETE
    status: Annotated[int, U32] = NvspStatus.FAIL
    num_sections: Annotated[int, U32] = 0
    offset: Annotated[int, U32] = 0
    sub_alloc_size: Annotated[int, U32] = 0
    num_sub_allocs: Annotated[int, U32] = 0
    end_offset: Annotated[int, U32] = 0


@wire_struct(size=6)
@dataclass(frozen=True)
class RevokeReceiveBuffer(WireStruct):
    """struct nvsp_1_message_revoke_receive_buffer { u16 id; }"""

    msg_type: Annotated[int, U32] = NvspMessageType.REVOKE_RECV_BUF
    id: Annotated[int, U16] = RECEIVE_BUFFER_ID


@wire_struct(size=10)
@dataclass(frozen=True)
class SendSendBuffer(WireStruct):
    """struct nvsp_1_message_send_send_buffer { u32 gpadl_handle; u16 id; } __packed;"""

    msg_type: Annotated[int, U32] = NvspMessageType.SEND_SEND_BUF
    gpadl_handle: Annotated[int, U32] = 0
    id: Annotated[int, U16] = SEND_BUFFER_ID


@wire_struct(size=12)
@dataclass(frozen=True)
class SendSendBufferComplete(WireStruct):
    """struct nvsp_1_message_send_send_buffer_complete { u32 status; u32 section_size; }"""

    msg_type: Annotated[int, U32] = NvspMessageType.SEND_SEND_BUF_COMPLETE
    status: Annotated[int, U32] = NvspStatus.FAIL
    section_size: Annotated[int, U32] = 0


@wire_struct(size=6)
@dataclass(frozen=True)
class RevokeSendBuffer(WireStruct):
    """struct nvsp_1_message_revoke_send_buffer { u16 id; }"""

    msg_type: Annotated[int, U32] = NvspMessageType.REVOKE_SEND_BUF
    id: Annotated[int, U16] = SEND_BUFFER_ID


@wire_struct(size=16)
@dataclass(frozen=True)
class SendRndisPacket(WireStruct):
    """struct nvsp_1_message_send_rndis_packet {
    u32 channel_type; u32 send_buf_section_index; u32 send_buf_section_size; }"""

    msg_type: Annotated[int, U32] = NvspMessageType.SEND_RNDIS_PKT
    channel_type: Annotated[int, U32] = RndisChannel.DATA
    send_buf_section_index: Annotated[int, U32] = INVALID_SECTION_INDEX
    send_buf_section_size: Annotated[int, U32] = 0


@wire_struct(size=8)
@dataclass(frozen=True)
class SendRndisPacketComplete(WireStruct):
    """struct nvsp_1_message_send_rndis_packet_complete { u32 status; }"""

    msg_type: Annotated[int, U32] = NvspMessageType.SEND_RNDIS_PKT_COMPLETE
    status: Annotated[int, U32] = NvspStatus.SUCCESS


@wire_struct(size=12)
@dataclass(frozen=True)
class SubChannelRequest(WireStruct):
    """struct nvsp_5_subchannel_request { u32 op; u32 num_subchannels; }"""

    msg_type: Annotated[int, U32] = NvspMessageType.SUBCHANNEL
    op: Annotated[int, U32] = SUBCHANNEL_ALLOCATE
    num_subchannels: Annotated[int, U32] = 0


@wire_struct(size=12)
@dataclass(frozen=True)
class SubChannelComplete(WireStruct):
    """struct nvsp_5_subchannel_complete { u32 status; u32 num_subchannels; /* allocated */ }"""

    msg_type: Annotated[int, U32] = NvspMessageType.SUBCHANNEL
    status: Annotated[int, U32] = NvspStatus.FAIL
    num_subchannels: Annotated[int, U32] = 0


@wire_struct(size=12)
@dataclass(frozen=True)
class SendIndirectionTable(WireStruct):
    """struct nvsp_5_send_indirect_table { u32 count; u32 offset; /* of u32 table[count] */ }"""

    msg_type: Annotated[int, U32] = NvspMessageType.SEND_INDIRECTION_TABLE
    count: Annotated[int, U32] = VRSS_SEND_TABLE_SIZE
    offset: Annotated[int, U32] = NVSP_MESSAGE_SIZE


# Guest -> host, then host -> guest. SEND_RNDIS_PKT(_COMPLETE) go both ways.
GUEST_MESSAGES: tuple[type[WireStruct], ...] = (NvspInit, SendNdisVersion, SendNdisConfig)
GUEST_MESSAGES += (SendReceiveBuffer, RevokeReceiveBuffer, SendSendBuffer, RevokeSendBuffer)
GUEST_MESSAGES += (SendRndisPacket, SendRndisPacketComplete, SubChannelRequest)
HOST_MESSAGES: tuple[type[WireStruct], ...] = (NvspInitComplete, SendReceiveBufferComplete)
HOST_MESSAGES += (SendSendBufferComplete, SendRndisPacket, SendRndisPacketComplete)
HOST_MESSAGES += (SubChannelComplete, SendIndirectionTable)
MESSAGES = tuple(dict.fromkeys(GUEST_MESSAGES + HOST_MESSAGES))
if any(m.SIZE > NVSP_MIN_MESSAGE_SIZE for m in MESSAGES):  # decode relies on it
    raise TypeError("an nvsp_message member does not fit FreeBSD's 32 bytes")


def type_of(cls: type[WireStruct]) -> NvspMessageType:
    """The message type a struct class declares (its first field's default)."""
    return NvspMessageType(dataclasses.fields(cls)[0].default)  # type: ignore[arg-type]


def encode(message: WireStruct) -> bytes:
    """The wire bytes of a message, zero-padded to 40 like Linux's."""
    return message.pack().ljust(NVSP_MESSAGE_SIZE, b"\0")


def message_type(payload: Any) -> NvspMessageType | int:
    view = memoryview(payload).cast("B")
    if len(view) < 4:
        raise NvspError(f"{len(view)}-byte NVSP message has no type")
    return open_enum(NvspMessageType, int.from_bytes(view[:4], "little"))


def decode(payload: Any, cls: type[_M]) -> _M:
    """Decode a message from a guest: 32 bytes or more (bytes past the struct
    are the union's rest and ring padding), of cls's type."""
    return _decode(payload, cls, NVSP_MIN_MESSAGE_SIZE)


def decode_short(payload: Any, cls: type[_M]) -> _M:
    """Decode a message from a host as Linux's netvsc does: the type field
    and cls's union member suffice (an 8-byte SEND_RNDIS_PKT_COMPLETE, a
    28-byte SEND_RECV_BUF_COMPLETE)."""
    return _decode(payload, cls, cls.SIZE)


def _decode(payload: Any, cls: type[_M], least: int) -> _M:
    view = memoryview(payload).cast("B")
    if len(view) < least:
        raise NvspError(f"{len(view)}-byte {cls.__name__}, needs {least}")
    got, want = message_type(view), type_of(cls)
    if got != want:
        raise NvspError(f"message type {got!r} where {want.name} was expected")
    return cls.unpack(view)


def send_rndis_packet(
    channel_type: int, section_index: int = INVALID_SECTION_INDEX, section_size: int = 0
) -> bytes:
    """SEND_RNDIS_PKT: from a VSC, and as the payload of a VSP's transfer-page packet."""
    return encode(
        SendRndisPacket(NvspMessageType.SEND_RNDIS_PKT, channel_type, section_index, section_size)
    )


def encode_indirection_table(table: Sequence[int]) -> bytes:
    """SEND_INDIRECTION_TABLE with the table at offset 40: where Linux looks for
    it whatever the offset field says (a host bug it works around for NVSP <= 6),
    and where the offset field points, for newer guests."""
    if len(table) != VRSS_SEND_TABLE_SIZE:
        raise UsageError(f"Linux takes a table of {VRSS_SEND_TABLE_SIZE} entries, not {len(table)}")
    header = encode(SendIndirectionTable(count=len(table), offset=NVSP_MESSAGE_SIZE))
    return header + b"".join(int(entry).to_bytes(4, "little") for entry in table)


def decode_indirection_table(payload: Any) -> tuple[int, ...]:
    """The table, checked as Linux checks it: count 16, inside the message."""
    view = memoryview(payload).cast("B")
    header = decode(view, SendIndirectionTable)
    if header.count != VRSS_SEND_TABLE_SIZE:
        raise NvspError(f"indirection table of {header.count} entries")
    if header.offset + 4 * header.count > len(view):
        raise NvspError(f"indirection table at {header.offset} runs past {len(view)} bytes")
    table = view[header.offset : header.offset + 4 * header.count]
    return tuple(int.from_bytes(table[i : i + 4], "little") for i in range(0, len(table), 4))


class BufferKind(Enum):
    RECEIVE = "receive buffer"
    SEND = "send buffer"


@dataclass(frozen=True)
class Buffer:
    """A receive or send buffer: a GPADL cut into equal sections."""

    gpadl_handle: int
    id: int  # the guest's; a receive buffer's is the transfer-page pageset id
    section_size: int
    section_count: int
