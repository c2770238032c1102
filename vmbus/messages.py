"""VMBus channel (control) messages: one wire struct per message, `encode` and
`decode`, and GPADL splitting and reassembly.

Source: PROTOCOL-FACTS §3 (include/linux/hyperv.h, drivers/hv/channel_mgmt.c,
drivers/hv/connection.c). Every message starts with
struct vmbus_channel_message_header { u32 msgtype; u32 padding; }, declared
here as the first two fields of each struct, and is at most
MAX_MESSAGE_PAYLOAD bytes.

Sans-I/O: `decode` turns the payload of one message into a message object and
`encode` does the reverse; nothing here knows how messages travel or which
side may send which message (that is the connection state machine's job).

Like Linux, `decode` accepts a fixed-size message longer than its struct
(newer protocol versions append fields) and ignores the extra bytes, so
`encode(decode(x))` is `x` cut to the struct size; for messages of exactly
their struct size, which is all that Linux sends, it is `x`.
"""

from __future__ import annotations

import dataclasses
import struct
import uuid
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Annotated, Any, ClassVar, TypeVar

from vmbus.errors import PeerError
from vmbus.gpadl import Gpadl  # the one GPADL record; re-exported here
from vmbus.memory import PfnList
from vmbus.wire import GUID, U8, U16, U32, U64, Bytes, WireError, WireStruct, wire_struct

__all__ = [
    "EVENT_CONNECTION_ID",
    "GPADL_BODY_MAX_PFNS",
    "GPADL_HEADER_MAX_PFNS",
    "GPADL_MAX_PFNS",
    "GUEST_VERSION_ORDER",
    "HOST_SUPPORTED_VERSIONS",
    "HV_PAGE_SIZE",
    "INVALID_RELID",
    "MAX_MESSAGE_PAYLOAD",
    "MAX_PENDING_GPADLS",
    "MAX_PENDING_PFNS",
    "MESSAGE_CONNECTION_ID",
    "MESSAGE_CONNECTION_ID_4",
    "MESSAGE_SINT",
    "MONITOR_CONNECTION_ID",
    "USER_DEFINED_BYTES",
    "AllOffersDelivered",
    "CloseChannel",
    "Gpadl",
    "GpadlAssembler",
    "GpadlBody",
    "GpadlCreated",
    "GpadlError",
    "GpadlQuotaExceeded",
    "GpadlHeader",
    "GpadlTeardown",
    "GpadlTorndown",
    "InitiateContact",
    "Message",
    "MessageError",
    "MessageType",
    "ModifyChannel",
    "ModifyChannelResponse",
    "OfferChannel",
    "OfferFlags",
    "OpenChannel",
    "OpenChannelResult",
    "RelidReleased",
    "RequestOffers",
    "RescindChannelOffer",
    "UnknownMessageError",
    "Unload",
    "UnloadResponse",
    "VersionResponse",
    "VmbusVersion",
    "decode",
    "encode",
    "format_version",
    "gpadl_messages",
    "initiate_contact_connection_id",
]

# Transport limits and ids (HV, drivers/hv/hyperv_vmbus.h).
MAX_MESSAGE_PAYLOAD = 240  # HV_MESSAGE_PAYLOAD_BYTE_COUNT: 256-byte SynIC message - 16 header
HEADER_SIZE = 8  # struct vmbus_channel_message_header
MESSAGE_CONNECTION_ID = 1  # VMBUS_MESSAGE_CONNECTION_ID: all messages before 5.0
EVENT_CONNECTION_ID = 2  # VMBUS_EVENT_CONNECTION_ID
MONITOR_CONNECTION_ID = 3  # VMBUS_MONITOR_CONNECTION_ID
MESSAGE_CONNECTION_ID_4 = 4  # VMBUS_MESSAGE_CONNECTION_ID_4: INITIATE_CONTACT from 5.0
MESSAGE_SINT = 2  # VMBUS_MESSAGE_SINT
INVALID_RELID = 0xFFFFFFFF
USER_DEFINED_BYTES = 120  # MAX_USER_DEFINED_BYTES: offer user_def, open userdata

# GPADL limits. A gpa_range is { u32 byte_count; u32 byte_offset; u64 pfn[]; }.
HV_PAGE_SIZE = 4096  # PFNs count Hyper-V pages whatever the guest's page size
GPA_RANGE_SIZE = 8
PFN_SIZE = 8
GPADL_HEADER_MAX_PFNS = 26  # (240 - 28) // 8: PFNs after the header and first range
GPADL_BODY_MAX_PFNS = 28  # (240 - 16) // 8
# range_buflen is a u16 counting the range header plus 8 bytes per PFN (~32 MiB).
GPADL_MAX_PFNS = (0xFFFF - GPA_RANGE_SIZE) // PFN_SIZE
# Guests build one GPADL at a time per channel they are opening; bounds the
# memory a guest can make us hold for unfinished GPADLs: 64 headers, and
# PFNs they announce (reserved at the header, 8 bytes each: 512 KiB).
MAX_PENDING_GPADLS = 64
MAX_PENDING_PFNS = 1 << 16


class MessageType(IntEnum):
    """enum vmbus_channel_message_type. Open: unknown values stay ints."""

    INVALID = 0
    OFFERCHANNEL = 1
    RESCIND_CHANNELOFFER = 2
    REQUESTOFFERS = 3
    ALLOFFERS_DELIVERED = 4
    OPENCHANNEL = 5
    OPENCHANNEL_RESULT = 6
    CLOSECHANNEL = 7
    GPADL_HEADER = 8
    GPADL_BODY = 9
    GPADL_CREATED = 10
    GPADL_TEARDOWN = 11
    GPADL_TORNDOWN = 12
    RELID_RELEASED = 13
    INITIATE_CONTACT = 14
    VERSION_RESPONSE = 15
    UNLOAD = 16
    UNLOAD_RESPONSE = 17
    OPEN_RESERVED_CHANNEL = 18  # Linux: CHANNELMSG_18
    CLOSE_RESERVED_CHANNEL = 19  # Linux: CHANNELMSG_19
    CLOSE_RESERVED_RESPONSE = 20  # Linux: CHANNELMSG_20
    TL_CONNECT_REQUEST = 21
    MODIFYCHANNEL = 22
    TL_CONNECT_RESULT = 23
    MODIFYCHANNEL_RESPONSE = 24
    MODIFY_CONNECTION = 25  # third-party header only
    MODIFY_CONNECTION_RESPONSE = 26  # third-party header only


class VmbusVersion(IntEnum):
    """VMBus protocol versions (VERSION_* in hyperv.h): major << 16 | minor."""

    WS2008 = 0x0000000D
    WIN7 = 0x00010001
    WIN8 = 0x00020004
    WIN8_1 = 0x00030000
    WIN10 = 0x00040000
    WIN10_V4_1 = 0x00040001
    WIN10_V5 = 0x00050000
    WIN10_V5_1 = 0x00050001
    WIN10_V5_2 = 0x00050002
    WIN10_V5_3 = 0x00050003
    WIN10_V6_0 = 0x00060000  # 2025 patch series only; not supported here


HOST_SUPPORTED_VERSIONS = (
    VmbusVersion.WIN8,
    VmbusVersion.WIN8_1,
    VmbusVersion.WIN10,
    VmbusVersion.WIN10_V4_1,
    VmbusVersion.WIN10_V5,
    VmbusVersion.WIN10_V5_1,
    VmbusVersion.WIN10_V5_2,
    VmbusVersion.WIN10_V5_3,
)
# The order a recent Linux guest tries, one INITIATE_CONTACT per refusal.
GUEST_VERSION_ORDER = tuple(reversed(HOST_SUPPORTED_VERSIONS))


def format_version(version: int) -> str:
    """ "5.3" for 0x00050003; works for versions outside the enum too."""
    return f"{version >> 16}.{version & 0xFFFF}"


def initiate_contact_connection_id(version: int) -> int:
    """The connection id INITIATE_CONTACT for `version` is posted to."""
    return MESSAGE_CONNECTION_ID_4 if version >= VmbusVersion.WIN10_V5 else MESSAGE_CONNECTION_ID


class OfferFlags(IntFlag):
    """chn_flags of an offer (VMBUS_CHANNEL_* in hyperv.h)."""

    ENUMERATE_DEVICE_INTERFACE = 0x0001
    SERVER_SUPPORTS_TRANSFER_PAGES = 0x0002
    SERVER_SUPPORTS_GPADLS = 0x0004
    NAMED_PIPE_MODE = 0x0010
    LOOPBACK_OFFER = 0x0100
    PARENT_OFFER = 0x0200
    REQUEST_MONITORED_NOTIFICATION = 0x0400
    TLNPI_PROVIDER_OFFER = 0x2000


class MessageError(PeerError, ValueError):
    """The peer sent bytes that are not a valid message (a remote error)."""


class UnknownMessageError(MessageError):
    """A message type with no struct here: log it and drop the message."""

    def __init__(self, msgtype: int) -> None:
        self.msgtype = msgtype
        super().__init__(f"unsupported message type {_type_name(msgtype)}")


class GpadlError(MessageError):
    """The peer described a GPADL wrongly. The GPADL is forgotten; answer
    GPADL_CREATED with a failure status when `child_relid` is known."""

    def __init__(self, reason: str, gpadl: int, child_relid: int | None = None) -> None:
        self.gpadl = gpadl
        self.child_relid = child_relid
        super().__init__(f"gpadl {gpadl:#x}: {reason}")


class GpadlQuotaExceeded(GpadlError):
    """A well-formed GPADL refused because the child holds too much: `quota`
    names the limit (the key of the host's refusal counter)."""

    def __init__(self, quota: str, reason: str, gpadl: int, child_relid: int | None) -> None:
        self.quota = quota
        super().__init__(reason, gpadl, child_relid)


def _type_name(msgtype: int) -> str:
    try:
        return f"{msgtype} ({MessageType(msgtype).name})"
    except ValueError:
        return str(msgtype)


class Message(WireStruct):
    """Base of the channel messages. Each one is a frozen dataclass whose first
    two fields are the header; msgtype defaults to the message's `TYPE`."""

    TYPE: ClassVar[MessageType]
    msgtype: int
    padding: int

    def __post_init__(self) -> None:
        if self.msgtype != self.TYPE:
            raise ValueError(f"{type(self).__name__} is msgtype {self.TYPE}, not {self.msgtype}")
        object.__setattr__(self, "msgtype", self.TYPE)  # show the name in repr

    def _pad(self, name: str, size: int) -> None:
        """Zero-pad a fixed byte field; refuse what struct would truncate."""
        value = getattr(self, name)
        if len(value) > size:
            raise ValueError(f"{type(self).__name__}.{name} is {size} bytes, got {len(value)}")
        object.__setattr__(self, name, bytes(value).ljust(size, b"\0"))

    @classmethod
    def _decode(cls, data: bytes) -> Message:
        """Decode from `data`, already known to be at least SIZE bytes."""
        return cls.unpack(data)


M = TypeVar("M", bound=Message)
_MESSAGE_CLASSES: dict[int, type[Message]] = {}


def _typed(size: int) -> Callable[[type[M]], type[M]]:
    """`wire_struct(size)`, and TYPE from the msgtype field's default."""

    def apply(cls: type[M]) -> type[M]:
        cls = wire_struct(size)(cls)
        cls.TYPE = MessageType(cls.msgtype)
        return cls

    return apply


def _register(cls: type[M]) -> type[M]:
    """Make `decode` use `cls` for its TYPE."""
    _MESSAGE_CLASSES[cls.TYPE] = cls
    return cls


def _message(size: int) -> Callable[[type[M]], type[M]]:
    return lambda cls: _register(_typed(size)(cls))


_NIL = uuid.UUID(int=0)


@_message(size=196)
@dataclass(frozen=True)
class OfferChannel(Message):
    """struct vmbus_channel_offer_channel (struct vmbus_channel_offer inline)."""

    msgtype: Annotated[int, U32] = MessageType.OFFERCHANNEL
    padding: Annotated[int, U32] = 0
    if_type: Annotated[uuid.UUID, GUID] = _NIL  # device class, vmbus.guid
    if_instance: Annotated[uuid.UUID, GUID] = _NIL  # sub-channels repeat the primary's
    reserved1: Annotated[int, U64] = 0  # DPDK: latency in 100 ns units
    reserved2: Annotated[int, U64] = 0  # DPDK: chrev u32, svrctx_sz u32
    chn_flags: Annotated[int, U16] = 0  # OfferFlags
    mmio_megabytes: Annotated[int, U16] = 0
    user_def: Annotated[bytes, Bytes(USER_DEFINED_BYTES)] = bytes(USER_DEFINED_BYTES)
    sub_channel_index: Annotated[int, U16] = 0  # 0 = primary channel
    reserved3: Annotated[int, U16] = 0
    child_relid: Annotated[int, U32] = 0
    monitorid: Annotated[int, U8] = 0
    monitor_flags: Annotated[int, U8] = 0  # bit 0 monitor_allocated, rest reserved
    interrupt_flags: Annotated[int, U16] = 0  # bit 0 is_dedicated_interrupt, rest reserved
    connection_id: Annotated[int, U32] = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._pad("user_def", USER_DEFINED_BYTES)

    @property
    def offer_flags(self) -> OfferFlags:
        return OfferFlags(self.chn_flags)

    @property
    def monitor_allocated(self) -> bool:
        return bool(self.monitor_flags & 1)

    @property
    def is_dedicated_interrupt(self) -> bool:
        return bool(self.interrupt_flags & 1)


@_message(size=12)
@dataclass(frozen=True)
class RescindChannelOffer(Message):
    """struct vmbus_channel_rescind_offer"""

    msgtype: Annotated[int, U32] = MessageType.RESCIND_CHANNELOFFER
    padding: Annotated[int, U32] = 0
    child_relid: Annotated[int, U32] = 0


@_message(size=8)
@dataclass(frozen=True)
class RequestOffers(Message):
    """struct vmbus_channel_message_header (no parameters)"""

    msgtype: Annotated[int, U32] = MessageType.REQUESTOFFERS
    padding: Annotated[int, U32] = 0


@_message(size=8)
@dataclass(frozen=True)
class AllOffersDelivered(Message):
    """struct vmbus_channel_message_header (no parameters)"""

    msgtype: Annotated[int, U32] = MessageType.ALLOFFERS_DELIVERED
    padding: Annotated[int, U32] = 0


@_message(size=148)
@dataclass(frozen=True)
class OpenChannel(Message):
    """struct vmbus_channel_open_channel"""

    msgtype: Annotated[int, U32] = MessageType.OPENCHANNEL
    padding: Annotated[int, U32] = 0
    child_relid: Annotated[int, U32] = 0
    openid: Annotated[int, U32] = 0  # echoed in OPENCHANNEL_RESULT
    ringbuffer_gpadlhandle: Annotated[int, U32] = 0  # one GPADL for both rings
    target_vp: Annotated[int, U32] = 0
    downstream_ringbuffer_pageoffset: Annotated[int, U32] = 0  # host->guest ring, in pages
    userdata: Annotated[bytes, Bytes(USER_DEFINED_BYTES)] = bytes(USER_DEFINED_BYTES)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._pad("userdata", USER_DEFINED_BYTES)


@_message(size=20)
@dataclass(frozen=True)
class OpenChannelResult(Message):
    """struct vmbus_channel_open_result"""

    msgtype: Annotated[int, U32] = MessageType.OPENCHANNEL_RESULT
    padding: Annotated[int, U32] = 0
    child_relid: Annotated[int, U32] = 0
    openid: Annotated[int, U32] = 0
    status: Annotated[int, U32] = 0  # 0 = success


@_message(size=12)
@dataclass(frozen=True)
class CloseChannel(Message):
    """struct vmbus_channel_close_channel (no response)"""

    msgtype: Annotated[int, U32] = MessageType.CLOSECHANNEL
    padding: Annotated[int, U32] = 0
    child_relid: Annotated[int, U32] = 0


def _unpack_pfns(tail: memoryview, what: str) -> tuple[int, ...]:
    if len(tail) % PFN_SIZE:
        raise MessageError(f"{what}: {len(tail)} bytes after it are not whole u64 PFNs")
    return struct.unpack(f"<{len(tail) // PFN_SIZE}Q", tail)


def _pack_pfns(pfns: tuple[int, ...], what: str) -> bytes:
    try:
        return struct.pack(f"<{len(pfns)}Q", *pfns)
    except struct.error as error:
        raise WireError(f"{what}.pfns: {error}") from None


def _range_problem(byte_count: int, byte_offset: int, pages: int) -> str | None:
    """Why one gpa_range of `pages` PFNs cannot hold byte_count bytes starting
    byte_offset into its first page (hyperv.h: the bytes imply the PFN count)."""
    if not 1 <= pages <= GPADL_MAX_PFNS:
        return f"{pages} pages is outside 1..{GPADL_MAX_PFNS}"
    if byte_count < 1:
        return "byte_count is 0"
    if not 0 <= byte_offset < HV_PAGE_SIZE:
        return f"byte_offset {byte_offset} is not inside the first page"
    spanned = -(-(byte_offset + byte_count) // HV_PAGE_SIZE)
    if spanned != pages:
        return f"{byte_count} bytes at offset {byte_offset} span {spanned} pages, not {pages}"
    return None


class _WithPfns(Message):
    """Local extension of wire.py for the messages that end in a u64 PFN array:
    the private base `_FIXED` declares the fixed part as a wire struct, the
    message adds `pfns` as its last field. unpack_from takes PFNs up to the end
    of the buffer."""

    _FIXED: ClassVar[type[Any]]  # a wire-struct dataclass
    pfns: tuple[int, ...]

    def pack(self) -> bytes:
        fixed = self._FIXED(*(getattr(self, f.name) for f in dataclasses.fields(self._FIXED)))
        return bytes(fixed.pack()) + _pack_pfns(self.pfns, type(self).__name__)

    def pack_into(self, buffer: Any, offset: int = 0) -> None:
        data = self.pack()
        memoryview(buffer).cast("B")[offset : offset + len(data)] = data

    @classmethod
    def unpack_from(cls: type[P], buffer: Any, offset: int = 0) -> P:
        fixed = cls._FIXED.unpack_from(buffer, offset)
        tail = memoryview(buffer).cast("B")[offset + fixed.SIZE :]
        values = [*dataclasses.astuple(fixed), _unpack_pfns(tail, cls.TYPE.name)]
        return cls(*values)


P = TypeVar("P", bound=_WithPfns)


@_typed(size=28)
@dataclass(frozen=True)
class _GpadlHeaderFixed(Message):
    msgtype: Annotated[int, U32] = MessageType.GPADL_HEADER
    padding: Annotated[int, U32] = 0
    child_relid: Annotated[int, U32] = 0
    gpadl: Annotated[int, U32] = 0  # handle chosen by the guest
    range_buflen: Annotated[int, U16] = 0  # bytes of all ranges incl. PFNs in later bodies
    rangecount: Annotated[int, U16] = 1
    byte_count: Annotated[int, U32] = 0  # range[0]
    byte_offset: Annotated[int, U32] = 0  # range[0], into its first page


@_register
@dataclass(frozen=True)
class GpadlHeader(_WithPfns, _GpadlHeaderFixed):
    """struct vmbus_channel_gpadl_header with its one struct gpa_range; the
    first PFNs of range[0].pfn_array follow, the rest come in GPADL_BODYs."""

    _FIXED = _GpadlHeaderFixed
    pfns: tuple[int, ...] = ()

    @property
    def total_pfns(self) -> int:
        """PFNs of the whole GPADL, header and bodies, per range_buflen."""
        return (self.range_buflen - GPA_RANGE_SIZE) // PFN_SIZE

    @classmethod
    def _decode(cls, data: bytes) -> GpadlHeader:
        message = cls.unpack(data)
        message.check()
        return message

    def check(self) -> None:
        """Raise GpadlError unless the header is self-consistent."""
        reason = None
        if self.rangecount != 1:  # every known guest sends one range
            reason = f"rangecount {self.rangecount}, only 1 is supported"
        elif self.range_buflen < GPA_RANGE_SIZE or (self.range_buflen - GPA_RANGE_SIZE) % PFN_SIZE:
            reason = f"range_buflen {self.range_buflen} is not 8 + 8 x pages"
        elif len(self.pfns) > self.total_pfns:
            reason = f"{len(self.pfns)} PFNs, more than range_buflen's {self.total_pfns}"
        else:
            reason = _range_problem(self.byte_count, self.byte_offset, self.total_pfns)
        if reason:
            raise GpadlError(f"GPADL_HEADER: {reason}", self.gpadl, self.child_relid)


@_typed(size=16)
@dataclass(frozen=True)
class _GpadlBodyFixed(Message):
    msgtype: Annotated[int, U32] = MessageType.GPADL_BODY
    padding: Annotated[int, U32] = 0
    msgnumber: Annotated[int, U32] = 0  # Linux leaves it 0; ignored
    gpadl: Annotated[int, U32] = 0


@_register
@dataclass(frozen=True)
class GpadlBody(_WithPfns, _GpadlBodyFixed):
    """struct vmbus_channel_gpadl_body: more PFNs of a GPADL, after its header."""

    _FIXED = _GpadlBodyFixed
    pfns: tuple[int, ...] = ()


@_message(size=20)
@dataclass(frozen=True)
class GpadlCreated(Message):
    """struct vmbus_channel_gpadl_created"""

    msgtype: Annotated[int, U32] = MessageType.GPADL_CREATED
    padding: Annotated[int, U32] = 0
    child_relid: Annotated[int, U32] = 0
    gpadl: Annotated[int, U32] = 0
    creation_status: Annotated[int, U32] = 0  # 0 = success


@_message(size=16)
@dataclass(frozen=True)
class GpadlTeardown(Message):
    """struct vmbus_channel_gpadl_teardown"""

    msgtype: Annotated[int, U32] = MessageType.GPADL_TEARDOWN
    padding: Annotated[int, U32] = 0
    child_relid: Annotated[int, U32] = 0
    gpadl: Annotated[int, U32] = 0


@_message(size=12)
@dataclass(frozen=True)
class GpadlTorndown(Message):
    """struct vmbus_channel_gpadl_torndown"""

    msgtype: Annotated[int, U32] = MessageType.GPADL_TORNDOWN
    padding: Annotated[int, U32] = 0
    gpadl: Annotated[int, U32] = 0


@_message(size=12)
@dataclass(frozen=True)
class RelidReleased(Message):
    """struct vmbus_channel_relid_released"""

    msgtype: Annotated[int, U32] = MessageType.RELID_RELEASED
    padding: Annotated[int, U32] = 0
    child_relid: Annotated[int, U32] = 0


@_message(size=40)
@dataclass(frozen=True)
class InitiateContact(Message):
    """struct vmbus_channel_initiate_contact. The u64 at offset 16 is a union:
    the interrupt page GPA before 5.0; from 5.0 msg_sint (byte 16), msg_vtl
    (byte 17) and 6 reserved bytes. It is kept whole so any bytes round-trip."""

    msgtype: Annotated[int, U32] = MessageType.INITIATE_CONTACT
    padding: Annotated[int, U32] = 0
    vmbus_version_requested: Annotated[int, U32] = 0
    target_vcpu: Annotated[int, U32] = 0  # VP the host sends messages to
    interrupt_page: Annotated[int, U64] = 0  # the union; see msg_sint, msg_vtl
    monitor_page1: Annotated[int, U64] = 0  # parent -> child
    monitor_page2: Annotated[int, U64] = 0  # child -> parent

    @classmethod
    def for_version(
        cls,
        version: int,
        *,
        target_vcpu: int = 0,
        interrupt_page: int = 0,
        msg_sint: int = MESSAGE_SINT,
        msg_vtl: int = 0,
        monitor_page1: int = 0,
        monitor_page2: int = 0,
    ) -> InitiateContact:
        """Fill the union the way `version` reads it (§3.6)."""
        if version >= VmbusVersion.WIN10_V5:
            interrupt_page = msg_sint | msg_vtl << 8
        return cls(
            vmbus_version_requested=version,
            target_vcpu=target_vcpu,
            interrupt_page=interrupt_page,
            monitor_page1=monitor_page1,
            monitor_page2=monitor_page2,
        )

    @property
    def msg_sint(self) -> int:
        """From 5.0: the SINT the host posts messages to."""
        return self.interrupt_page & 0xFF

    @property
    def msg_vtl(self) -> int:
        return (self.interrupt_page >> 8) & 0xFF


@_message(size=16)
@dataclass(frozen=True)
class VersionResponse(Message):
    """struct vmbus_channel_version_response"""

    msgtype: Annotated[int, U32] = MessageType.VERSION_RESPONSE
    padding: Annotated[int, U32] = 0
    version_supported: Annotated[int, U8] = 0  # non-zero = accepted
    connection_state: Annotated[int, U8] = 0
    reserved: Annotated[int, U16] = 0  # C: padding
    msg_conn_id: Annotated[int, U32] = 0  # from 5.0: id for all later guest messages


@_message(size=8)
@dataclass(frozen=True)
class Unload(Message):
    """struct vmbus_channel_message_header (no parameters)"""

    msgtype: Annotated[int, U32] = MessageType.UNLOAD
    padding: Annotated[int, U32] = 0


@_message(size=8)
@dataclass(frozen=True)
class UnloadResponse(Message):
    """struct vmbus_channel_message_header (no parameters)"""

    msgtype: Annotated[int, U32] = MessageType.UNLOAD_RESPONSE
    padding: Annotated[int, U32] = 0


@_message(size=16)
@dataclass(frozen=True)
class ModifyChannel(Message):
    """struct vmbus_channel_modifychannel (from 4.1)"""

    msgtype: Annotated[int, U32] = MessageType.MODIFYCHANNEL
    padding: Annotated[int, U32] = 0
    child_relid: Annotated[int, U32] = 0
    target_vp: Annotated[int, U32] = 0


@_message(size=16)
@dataclass(frozen=True)
class ModifyChannelResponse(Message):
    """struct vmbus_channel_modifychannel_response (from 5.3)"""

    msgtype: Annotated[int, U32] = MessageType.MODIFYCHANNEL_RESPONSE
    padding: Annotated[int, U32] = 0
    child_relid: Annotated[int, U32] = 0
    status: Annotated[int, U32] = 0  # non-zero: Linux returns EAGAIN


def encode(message: Message) -> bytes:
    """The wire bytes of `message`. Raises ValueError (our own mistake) for a
    field out of range or a message over MAX_MESSAGE_PAYLOAD."""
    data = message.pack()
    if len(data) > MAX_MESSAGE_PAYLOAD:
        raise ValueError(
            f"{type(message).__name__} is {len(data)} bytes, over {MAX_MESSAGE_PAYLOAD}"
        )
    return data


def decode(data: bytes | bytearray | memoryview) -> Message:
    """The message in one message payload. Raises MessageError (or its
    subclass UnknownMessageError) and nothing else for bad bytes."""
    view = memoryview(data)
    if view.nbytes > MAX_MESSAGE_PAYLOAD:
        raise MessageError(f"message of {view.nbytes} bytes, over {MAX_MESSAGE_PAYLOAD}")
    if view.nbytes < HEADER_SIZE:
        raise MessageError(f"message of {view.nbytes} bytes, shorter than its header")
    raw = view.tobytes()
    msgtype = int.from_bytes(raw[:4], "little")
    cls = _MESSAGE_CLASSES.get(msgtype)
    if cls is None:
        raise UnknownMessageError(msgtype)
    if len(raw) < cls.SIZE:
        raise MessageError(f"{cls.TYPE.name} of {len(raw)} bytes, needs {cls.SIZE}")
    return cls._decode(raw)


def gpadl_messages(
    child_relid: int, gpadl: int, byte_count: int, pfns: Sequence[int], byte_offset: int = 0
) -> list[GpadlHeader | GpadlBody]:
    """The GPADL_HEADER and GPADL_BODY messages that describe `byte_count`
    bytes starting `byte_offset` into the first of the pages `pfns`."""
    pfns = tuple(pfns)
    reason = _range_problem(byte_count, byte_offset, len(pfns))
    if reason:
        raise ValueError(f"gpadl {gpadl:#x}: {reason}")
    head = GPADL_HEADER_MAX_PFNS
    messages: list[GpadlHeader | GpadlBody] = [
        GpadlHeader(
            child_relid=child_relid,
            gpadl=gpadl,
            range_buflen=GPA_RANGE_SIZE + PFN_SIZE * len(pfns),
            byte_count=byte_count,
            byte_offset=byte_offset,
            pfns=pfns[:head],
        )
    ]
    for start in range(head, len(pfns), GPADL_BODY_MAX_PFNS):
        messages.append(GpadlBody(gpadl=gpadl, pfns=pfns[start : start + GPADL_BODY_MAX_PFNS]))
    return messages


@dataclass
class _Partial:
    header: GpadlHeader
    pfns: array[int]  # compact: a guest may make us hold up to GPADL_MAX_PFNS


class GpadlAssembler:
    """Reassembles GPADLs from GPADL_HEADER and GPADL_BODY messages (sans-I/O).

    Feed each decoded GPADL message in arrival order; `feed` returns the
    `Gpadl` once its last PFN arrived, else None. Guests may interleave GPADLs
    of different channels, so several can be in progress, keyed by handle:
    at most `max_pending`, announcing at most `max_pending_pfns` PFNs in all
    (GpadlQuotaExceeded beyond). On a GpadlError the GPADL concerned is
    forgotten. Whether a handle is already taken by an established GPADL is
    for the channel layer to check.
    """

    def __init__(
        self, max_pending: int = MAX_PENDING_GPADLS, max_pending_pfns: int = MAX_PENDING_PFNS
    ) -> None:
        self.max_pending = max_pending
        self.max_pending_pfns = max_pending_pfns
        self._pending: dict[int, _Partial] = {}
        self._announced = 0  # PFNs the pending headers announce

    @property
    def pending(self) -> frozenset[int]:
        """Handles of the GPADLs still waiting for bodies."""
        return frozenset(self._pending)

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def pending_pfns(self) -> int:
        """PFNs the GPADLs in progress announce (their whole size, reserved)."""
        return self._announced

    def in_progress(self, gpadl: int) -> bool:
        return gpadl in self._pending

    def feed(self, message: GpadlHeader | GpadlBody) -> Gpadl | None:
        if isinstance(message, GpadlHeader):
            return self._header(message)
        return self._body(message)

    def discard(self, gpadl: int) -> None:
        self._drop(gpadl)

    def discard_channel(self, child_relid: int) -> None:
        """Forget the unfinished GPADLs of a channel that closed or went away."""
        for gpadl, partial in list(self._pending.items()):
            if partial.header.child_relid == child_relid:
                self._drop(gpadl)

    def _drop(self, gpadl: int) -> _Partial | None:
        partial = self._pending.pop(gpadl, None)
        if partial is not None:
            self._announced -= partial.header.total_pfns
        return partial

    def _header(self, header: GpadlHeader) -> Gpadl | None:
        if self._drop(header.gpadl) is not None:
            raise GpadlError(
                "second GPADL_HEADER while the first is in progress; both dropped",
                header.gpadl,
                header.child_relid,
            )
        header.check()
        quota = None
        if len(self._pending) >= self.max_pending:
            quota = "pending_gpadls", f"more than {self.max_pending} GPADLs in progress"
        elif self._announced + header.total_pfns > self.max_pending_pfns:
            quota = (
                "pending_pfns",
                (
                    f"{header.total_pfns} PFNs more would pass the {self.max_pending_pfns} "
                    f"that GPADLs in progress may announce ({self._announced} now)"
                ),
            )
        if quota is not None:
            raise GpadlQuotaExceeded(quota[0], quota[1], header.gpadl, header.child_relid)
        partial = _Partial(header, array("Q", header.pfns))
        self._pending[header.gpadl] = partial
        self._announced += header.total_pfns
        return self._complete(partial)

    def _body(self, body: GpadlBody) -> Gpadl | None:
        partial = self._pending.get(body.gpadl)
        if partial is None:
            raise GpadlError("GPADL_BODY without a GPADL_HEADER in progress", body.gpadl)
        relid = partial.header.child_relid
        total = partial.header.total_pfns
        if not body.pfns:
            self._drop(body.gpadl)
            raise GpadlError("GPADL_BODY without PFNs", body.gpadl, relid)
        if len(partial.pfns) + len(body.pfns) > total:
            self._drop(body.gpadl)
            raise GpadlError(
                f"GPADL_BODY brings {len(partial.pfns) + len(body.pfns)} PFNs, "
                f"more than range_buflen's {total}",
                body.gpadl,
                relid,
            )
        partial.pfns.extend(body.pfns)
        return self._complete(partial)

    def _complete(self, partial: _Partial) -> Gpadl | None:
        header = partial.header
        if len(partial.pfns) < header.total_pfns:
            return None
        self._drop(header.gpadl)
        return Gpadl(
            header.child_relid,
            header.gpadl,
            header.byte_count,
            header.byte_offset,
            PfnList.adopt(partial.pfns),  # no copy: 8 bytes a page, as reassembled
        )
