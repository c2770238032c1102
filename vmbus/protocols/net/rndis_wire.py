"""RNDIS wire format (docs/protocol.md §6.5-6.7): message types, status
values, OIDs, each message declared once, and their codecs.

Every RNDIS message starts with {u32 msg_type, u32 msg_len}; the structs
below include that header, so struct offsets are the facts' offsets. Buffer
offsets on the wire are relative to byte 8 (the end of the header). Quoted C
comes from include/linux/rndis.h and drivers/net/hyperv/hyperv_net.h.

Everything the peer controls is checked: msg_len against the bytes given,
each buffer offset and length against msg_len, each per-packet-info element
against its area. A decoder raises only `RndisError`. The VSP parses each
message once: `parse_request` (a control message: its fixed part and info
buffer) and `decode_packets` (a batch of PACKET messages: each header read
once, the frames as views into the caller's private copy).
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Annotated, Any, ClassVar, NamedTuple, TypeVar, cast

from vmbus.errors import PeerError, UsageError
from vmbus.wire import U32, WireStruct, open_enum, wire_struct

RNDIS_MAJOR_VERSION = 1
RNDIS_MINOR_VERSION = 0
RNDIS_HEADER_SIZE = 8
COMPLETION = 0x80000000  # msg_type bit of a completion
RNDIS_DF_CONNECTIONLESS = 0x1  # INITIALIZE_CMPLT dev_flags
RNDIS_MEDIUM_802_3 = 0

# Caps on what a peer can make us decode.
MAX_CONTROL_MESSAGE = 4096  # one page: Linux's largest request (RSS parameters) is 620 bytes
MAX_PPIS = 32  # Linux sends at most 5 per packet; bounds per-packet work
MAX_MESSAGES_PER_BATCH = 64  # a send section batches max_pkt_per_msg (8) messages


class RndisError(PeerError, ValueError):
    """RNDIS bytes that cannot be decoded: a length or offset outside the
    message, a wrong type, a truncated element: the peer broke the protocol."""


class RndisMessageType(IntEnum):
    """ndis_msg_type (§6.5). Open: unknown values stay ints."""

    PACKET = 0x00000001
    INITIALIZE = 0x00000002
    INITIALIZE_CMPLT = 0x80000002
    HALT = 0x00000003
    QUERY = 0x00000004
    QUERY_CMPLT = 0x80000004
    SET = 0x00000005
    SET_CMPLT = 0x80000005
    RESET = 0x00000006
    RESET_CMPLT = 0x80000006
    INDICATE_STATUS = 0x00000007
    KEEPALIVE = 0x00000008
    KEEPALIVE_CMPLT = 0x80000008
    BUS = 0xFF000001  # reserved


class RndisStatus(IntEnum):
    """Completion status values and status indications (§6.7)."""

    SUCCESS = 0x00000000
    PENDING = 0x00000103
    FAILURE = 0xC0000001
    NOT_SUPPORTED = 0xC00000BB
    INVALID_LENGTH = 0xC0010014  # NDIS: info buffer too short for the OID
    INVALID_DATA = 0xC0010015  # NDIS: info buffer contents invalid for the OID
    ONLINE = 0x40010003
    RESET_START = 0x40010004
    RESET_END = 0x40010005
    MEDIA_CONNECT = 0x4001000B
    MEDIA_DISCONNECT = 0x4001000C
    LINK_SPEED_CHANGE = 0x40010013  # buffer: u32 speed in 100 bit/s units
    NETWORK_CHANGE = 0x40010018


class PpiType(IntEnum):
    """Per-packet-info types (§6.5), bits 0-30 of the type field."""

    TCPIP_CHKSUM = 0
    IPSEC = 1
    TCP_LARGESEND = 2
    CLASSIFICATION_HANDLE = 3
    NDIS_RESERVED = 4
    SG_LIST = 5
    IEEE_8021Q = 6
    ORIGINAL = 7
    NBL_HASH_VALUE = 8  # also PACKET_CANCEL_ID
    ORIGINAL_NET_BUFLIST = 9
    CACHED_NET_BUFLIST = 10
    SHORT_PKT_PADINFO = 11


PPI_INTERNAL = 1 << 31  # type bit: a Hyper-V internal PPI
RNDIS_PKTINFO_ID = PPI_INTERNAL | 1  # RSC fragment info

_M = TypeVar("_M", bound=WireStruct)
_T = RndisMessageType


# --- Messages (§6.5): header included; BUFFER names a trailing buffer's fields --


@wire_struct(size=8)
@dataclass(frozen=True)
class RndisHeader(WireStruct):
    """struct rndis_message { u32 ndis_msg_type; u32 msg_len; /* union follows */ }"""

    msg_type: Annotated[int, U32]
    msg_len: Annotated[int, U32]


@wire_struct(size=24)
@dataclass(frozen=True)
class Initialize(WireStruct):
    """struct rndis_initialize_request { u32 req_id; u32 major_ver; u32 minor_ver;
    u32 max_xfer_size; }"""

    msg_type: Annotated[int, U32] = _T.INITIALIZE
    msg_len: Annotated[int, U32] = 24
    req_id: Annotated[int, U32] = 0
    major_ver: Annotated[int, U32] = RNDIS_MAJOR_VERSION
    minor_ver: Annotated[int, U32] = RNDIS_MINOR_VERSION
    max_xfer_size: Annotated[int, U32] = 0x4000  # what Linux sends


@wire_struct(size=52)
@dataclass(frozen=True)
class InitializeComplete(WireStruct):
    """struct rndis_initialize_complete { u32 req_id; u32 status; u32 major_ver;
    u32 minor_ver; u32 dev_flags; u32 medium; u32 max_pkt_per_msg;
    u32 max_xfer_size; u32 pkt_alignment_factor; /* align = 1 << factor */
    u32 af_list_offset; u32 af_list_size; }"""

    msg_type: Annotated[int, U32] = _T.INITIALIZE_CMPLT
    msg_len: Annotated[int, U32] = 52
    req_id: Annotated[int, U32] = 0
    status: Annotated[int, U32] = RndisStatus.SUCCESS
    major_ver: Annotated[int, U32] = RNDIS_MAJOR_VERSION
    minor_ver: Annotated[int, U32] = RNDIS_MINOR_VERSION
    dev_flags: Annotated[int, U32] = RNDIS_DF_CONNECTIONLESS
    medium: Annotated[int, U32] = RNDIS_MEDIUM_802_3
    max_pkt_per_msg: Annotated[int, U32] = 0
    max_xfer_size: Annotated[int, U32] = 0
    pkt_alignment_factor: Annotated[int, U32] = 0
    af_list_offset: Annotated[int, U32] = 0
    af_list_size: Annotated[int, U32] = 0


@wire_struct(size=12)
@dataclass(frozen=True)
class Halt(WireStruct):
    """struct rndis_halt_request { u32 req_id; }  (no completion)"""

    msg_type: Annotated[int, U32] = _T.HALT
    msg_len: Annotated[int, U32] = 12
    req_id: Annotated[int, U32] = 0


@wire_struct(size=28)
@dataclass(frozen=True)
class Query(WireStruct):
    """struct rndis_query_request { u32 req_id; u32 oid; u32 info_buflen;
    u32 info_buf_offset; u32 dev_vc_handle; }  info buffer follows"""

    BUFFER: ClassVar[tuple[str, str]] = ("info_buflen", "info_buf_offset")
    msg_type: Annotated[int, U32] = _T.QUERY
    msg_len: Annotated[int, U32] = 28
    req_id: Annotated[int, U32] = 0
    oid: Annotated[int, U32] = 0
    info_buflen: Annotated[int, U32] = 0
    info_buf_offset: Annotated[int, U32] = 0
    dev_vc_handle: Annotated[int, U32] = 0


@wire_struct(size=24)
@dataclass(frozen=True)
class QueryComplete(WireStruct):
    """struct rndis_query_complete { u32 req_id; u32 status; u32 info_buflen;
    u32 info_buf_offset; }  info buffer follows"""

    BUFFER: ClassVar[tuple[str, str]] = ("info_buflen", "info_buf_offset")
    msg_type: Annotated[int, U32] = _T.QUERY_CMPLT
    msg_len: Annotated[int, U32] = 24
    req_id: Annotated[int, U32] = 0
    status: Annotated[int, U32] = RndisStatus.SUCCESS
    info_buflen: Annotated[int, U32] = 0
    info_buf_offset: Annotated[int, U32] = 0


@wire_struct(size=28)
@dataclass(frozen=True)
class Set(WireStruct):
    """struct rndis_set_request { u32 req_id; u32 oid; u32 info_buflen;
    u32 info_buf_offset; u32 dev_vc_handle; u8 info_buf[]; }"""

    BUFFER: ClassVar[tuple[str, str]] = ("info_buflen", "info_buf_offset")
    msg_type: Annotated[int, U32] = _T.SET
    msg_len: Annotated[int, U32] = 28
    req_id: Annotated[int, U32] = 0
    oid: Annotated[int, U32] = 0
    info_buflen: Annotated[int, U32] = 0
    info_buf_offset: Annotated[int, U32] = 0
    dev_vc_handle: Annotated[int, U32] = 0


@wire_struct(size=16)
@dataclass(frozen=True)
class SetComplete(WireStruct):
    """struct rndis_set_complete { u32 req_id; u32 status; }"""

    msg_type: Annotated[int, U32] = _T.SET_CMPLT
    msg_len: Annotated[int, U32] = 16
    req_id: Annotated[int, U32] = 0
    status: Annotated[int, U32] = RndisStatus.SUCCESS


@wire_struct(size=12)
@dataclass(frozen=True)
class Reset(WireStruct):
    """struct rndis_reset_request { u32 reserved; }"""

    msg_type: Annotated[int, U32] = _T.RESET
    msg_len: Annotated[int, U32] = 12
    reserved: Annotated[int, U32] = 0


@wire_struct(size=16)
@dataclass(frozen=True)
class ResetComplete(WireStruct):
    """struct rndis_reset_complete { u32 status; u32 addressing_reset; }  (no req_id)"""

    msg_type: Annotated[int, U32] = _T.RESET_CMPLT
    msg_len: Annotated[int, U32] = 16
    status: Annotated[int, U32] = RndisStatus.SUCCESS
    addressing_reset: Annotated[int, U32] = 0


@wire_struct(size=20)
@dataclass(frozen=True)
class IndicateStatus(WireStruct):
    """struct rndis_indicate_status { u32 status; u32 status_buflen;
    u32 status_buf_offset; }  status buffer follows"""

    BUFFER: ClassVar[tuple[str, str]] = ("status_buflen", "status_buf_offset")
    msg_type: Annotated[int, U32] = _T.INDICATE_STATUS
    msg_len: Annotated[int, U32] = 20
    status: Annotated[int, U32] = 0
    status_buflen: Annotated[int, U32] = 0
    status_buf_offset: Annotated[int, U32] = 0


@wire_struct(size=12)
@dataclass(frozen=True)
class Keepalive(WireStruct):
    """struct rndis_keepalive_request { u32 req_id; }"""

    msg_type: Annotated[int, U32] = _T.KEEPALIVE
    msg_len: Annotated[int, U32] = 12
    req_id: Annotated[int, U32] = 0


@wire_struct(size=16)
@dataclass(frozen=True)
class KeepaliveComplete(WireStruct):
    """struct rndis_keepalive_complete { u32 req_id; u32 status; }"""

    msg_type: Annotated[int, U32] = _T.KEEPALIVE_CMPLT
    msg_len: Annotated[int, U32] = 16
    req_id: Annotated[int, U32] = 0
    status: Annotated[int, U32] = RndisStatus.SUCCESS


@wire_struct(size=44)
@dataclass(frozen=True)
class PacketHeader(WireStruct):
    """struct rndis_packet { u32 data_offset; u32 data_len; u32 oob_data_offset;
    u32 oob_data_len; u32 num_oob_data_elements; u32 per_pkt_info_offset;
    u32 per_pkt_info_len; u32 vc_handle; u32 reserved; }  offsets from byte 8"""

    msg_type: Annotated[int, U32] = _T.PACKET
    msg_len: Annotated[int, U32] = 44
    data_offset: Annotated[int, U32] = 0
    data_len: Annotated[int, U32] = 0
    oob_data_offset: Annotated[int, U32] = 0
    oob_data_len: Annotated[int, U32] = 0
    num_oob_data_elements: Annotated[int, U32] = 0
    per_pkt_info_offset: Annotated[int, U32] = 0
    per_pkt_info_len: Annotated[int, U32] = 0
    vc_handle: Annotated[int, U32] = 0
    reserved: Annotated[int, U32] = 0


@wire_struct(size=12)
@dataclass(frozen=True)
class PpiHeader(WireStruct):
    """struct rndis_per_packet_info { u32 size; /* with this header */ u32 type;
    u32 ppi_offset; /* of the value, from this header */ }"""

    size: Annotated[int, U32]
    type: Annotated[int, U32]
    ppi_offset: Annotated[int, U32] = 12


MESSAGES: tuple[type[WireStruct], ...] = (Initialize, InitializeComplete, Halt, Query)
MESSAGES += (QueryComplete, Set, SetComplete, Reset, ResetComplete, IndicateStatus)
MESSAGES += (Keepalive, KeepaliveComplete, PacketHeader)


def type_of(cls: type[WireStruct]) -> RndisMessageType:
    """The message type a struct class declares (its first field's default)."""
    return RndisMessageType(dataclasses.fields(cls)[0].default)  # type: ignore[arg-type]


def encode(message: WireStruct, buffer: bytes = b"") -> bytes:
    """A control message with msg_len set and, for a message with a buffer,
    the buffer right after the fixed part (offset and length set to match)."""
    names: tuple[str, str] | None = getattr(message, "BUFFER", None)
    fields = {"msg_len": message.SIZE + len(buffer)}
    if names is not None:
        fields[names[0]] = len(buffer)
        fields[names[1]] = message.SIZE - RNDIS_HEADER_SIZE
    elif buffer:
        raise UsageError(f"{type(message).__name__} carries no buffer")
    fixed: bytes = dataclasses.replace(cast(Any, message), **fields).pack()
    return fixed + bytes(buffer)


def message_view(data: Any) -> tuple[RndisMessageType | int, memoryview]:
    """The type and the bytes of the message at the start of `data`: msg_len
    must cover the header and lie within data (later bytes are padding)."""
    view = memoryview(data).cast("B")
    if len(view) < RNDIS_HEADER_SIZE:
        raise RndisError(f"{len(view)}-byte RNDIS message has no header")
    header = RndisHeader.unpack(view)
    if not RNDIS_HEADER_SIZE <= header.msg_len <= len(view):
        raise RndisError(f"msg_len {header.msg_len} in {len(view)} bytes")
    return open_enum(RndisMessageType, header.msg_type), view[: header.msg_len]


def area(message: memoryview, offset: int, length: int, fixed: int) -> memoryview:
    """A buffer at `offset` (from byte 8) of `length` bytes: after the fixed
    part and inside the message. Empty when length is 0, whatever the offset."""
    if not length:
        return message[:0]
    start = RNDIS_HEADER_SIZE + offset
    if offset < fixed - RNDIS_HEADER_SIZE or start + length > len(message):
        raise RndisError(f"{length} bytes at offset {offset} of a {len(message)}-byte message")
    return message[start : start + length]


def _decode(data: Any, cls: type[_M]) -> tuple[_M, memoryview]:
    msg_type, view = message_view(data)
    if msg_type != type_of(cls):
        raise RndisError(f"message type {msg_type!r} where {type_of(cls).name} was expected")
    if len(view) < cls.SIZE:
        raise RndisError(f"{len(view)}-byte {cls.__name__}, needs {cls.SIZE}")
    return cls.unpack(view), view


def decode(data: Any, cls: type[_M]) -> tuple[_M, memoryview]:
    """A message of type cls and its buffer (empty for messages without one)."""
    message, view = _decode(data, cls)
    names: tuple[str, str] | None = getattr(cls, "BUFFER", None)
    if names is None:
        return message, view[:0]
    length, offset = getattr(message, names[0]), getattr(message, names[1])
    return message, area(view, offset, length, cls.SIZE)


CONTROL_REQUESTS: dict[int, type[WireStruct]] = {
    type_of(cls): cls for cls in (Initialize, Halt, Query, Set, Reset, Keepalive)
}


class ControlRequest(NamedTuple):
    """A control message parsed once: its fixed part, and its info buffer
    (None when the buffer's offset or length lies outside the message: the
    request is answered INVALID_DATA)."""

    request: WireStruct
    info: memoryview | None


def parse_request(data: Any) -> ControlRequest:
    """One control request (INITIALIZE, HALT, QUERY, SET, RESET, KEEPALIVE)
    of at most MAX_CONTROL_MESSAGE bytes. RndisError for anything else."""
    msg_type, view = message_view(data)
    cls = CONTROL_REQUESTS.get(msg_type)
    if cls is None:
        raise RndisError(f"message type {msg_type!r} is no control request")
    if not cls.SIZE <= len(view) <= MAX_CONTROL_MESSAGE:
        raise RndisError(f"{len(view)}-byte {cls.__name__}")
    request = cls.unpack(view)
    names: tuple[str, str] | None = getattr(cls, "BUFFER", None)
    if names is None:
        return ControlRequest(request, view[:0])
    length, offset = getattr(request, names[0]), getattr(request, names[1])
    try:
        return ControlRequest(request, area(view, offset, length, cls.SIZE))
    except RndisError:
        return ControlRequest(request, None)


def split_messages(data: Any, limit: int = MAX_MESSAGES_PER_BATCH) -> list[memoryview]:
    """The messages a guest batched back to back in one send section (each
    msg_len includes its alignment padding); no bytes may be left over."""
    view, pos = memoryview(data).cast("B"), 0
    out: list[memoryview] = []
    while pos < len(view):
        if len(out) == limit:
            raise RndisError(f"more than {limit} RNDIS messages in one batch")
        out.append(message_view(view[pos:])[1])
        pos += len(out[-1])
    return out


# --- Data packets -------------------------------------------------------------


class Ppi(NamedTuple):
    """One per-packet-info element: its type (with PPI_INTERNAL) and value."""

    type: int
    value: bytes


_PACKET_BODY = PacketHeader.SIZE - RNDIS_HEADER_SIZE  # 36: where Linux puts its PPIs


def encode_packet(frame: Any, ppis: Iterable[tuple[int, bytes]] = ()) -> bytes:
    """A PACKET message as Linux builds one: PPIs right after the header, then the frame."""
    size = len(frame)
    if not size:
        raise UsageError("an RNDIS packet carries a frame")
    pack = _PPI_HEADER.pack
    info = b"".join([pack(_PPI_SIZE + len(v), t, _PPI_SIZE) + bytes(v) for t, v in ppis])
    header = _PACKET_WHOLE.pack(
        _T.PACKET, _PACKET_SIZE + len(info) + size, _PACKET_BODY + len(info), size,
        0, 0, 0, _PACKET_BODY, len(info), 0, 0,
    )  # fmt: skip
    return b"".join((header, info, frame))


# The data path's hot headers: packed and unpacked in one struct call, not as dataclasses.
_PACKET_HEADER = struct.Struct("<9I")  # msg_type .. per_pkt_info_len of PacketHeader
_PACKET_WHOLE = struct.Struct("<11I")  # PacketHeader, every field
_PPI_HEADER = struct.Struct("<III")  # PpiHeader: size, type, ppi_offset
_PACKET_SIZE, _PPI_SIZE = 44, 12


def decode_packet(data: Any) -> tuple[memoryview, tuple[Ppi, ...]]:
    """The frame (a view into data) and the PPIs of a PACKET message."""
    frame, ppis, _ = _packet_at(memoryview(data).cast("B"), 0)
    return frame, ppis


def decode_packets(
    data: Any, limit: int = MAX_MESSAGES_PER_BATCH
) -> list[tuple[memoryview, tuple[Ppi, ...]]]:
    """The frames and PPIs of the PACKET messages a guest batched back to
    back (each msg_len includes its alignment padding; nothing left over),
    each header read once: `split_messages` and `decode_packet` in one pass."""
    view, pos = memoryview(data).cast("B"), 0
    out: list[tuple[memoryview, tuple[Ppi, ...]]] = []
    while pos < len(view):
        if len(out) == limit:
            raise RndisError(f"more than {limit} RNDIS messages in one batch")
        frame, ppis, size = _packet_at(view, pos)
        out.append((frame, ppis))
        pos += size
    return out


def _packet_at(view: memoryview, pos: int) -> tuple[memoryview, tuple[Ppi, ...], int]:
    """The PACKET message at `pos`: frame, PPIs and msg_len."""
    left = len(view) - pos
    if left < PacketHeader.SIZE:
        raise RndisError(f"{left}-byte RNDIS PACKET, needs {PacketHeader.SIZE}")
    msg_type, msg_len, data_offset, data_len, oob_offset, oob_len, _, ppi_offset, ppi_len = (
        _PACKET_HEADER.unpack_from(view, pos)
    )
    if msg_type != _T.PACKET:
        raise RndisError(f"message type {open_enum(RndisMessageType, msg_type)!r}, not PACKET")
    if not PacketHeader.SIZE <= msg_len <= left:
        raise RndisError(f"msg_len {msg_len} in {left} bytes")
    message = view[pos : pos + msg_len]
    frame = area(message, data_offset, data_len, PacketHeader.SIZE)
    if not frame:
        raise RndisError("RNDIS packet without a frame")
    area(message, oob_offset, oob_len, PacketHeader.SIZE)  # bounds only
    info = area(message, ppi_offset, ppi_len, PacketHeader.SIZE)
    return frame, _decode_ppis(info) if ppi_len else (), msg_len


def _decode_ppis(info: memoryview) -> tuple[Ppi, ...]:
    ppis: list[Ppi] = []
    pos = 0
    while pos < len(info):
        if len(ppis) == MAX_PPIS:
            raise RndisError(f"more than {MAX_PPIS} per-packet-info elements")
        if len(info) - pos < PpiHeader.SIZE:
            raise RndisError(f"{len(info) - pos} bytes left for a per-packet-info header")
        size, kind, offset = _PPI_HEADER.unpack_from(info, pos)
        if not _PPI_SIZE <= size <= len(info) - pos:
            raise RndisError(f"per-packet-info of {size} bytes, {len(info) - pos} left")
        if not _PPI_SIZE <= offset <= size:
            raise RndisError(f"per-packet-info value at {offset} of {size}")
        ppis.append(Ppi(kind, bytes(info[pos + offset : pos + size])))
        pos += size
    return tuple(ppis)


assert _PACKET_WHOLE.size == PacketHeader.SIZE == _PACKET_SIZE and PpiHeader.SIZE == _PPI_SIZE
