"""Integration components (ICs): heartbeat, shutdown, time sync and KVP.

Sources: docs/protocol.md §11 (include/linux/hyperv.h, include/uapi/linux/
hyperv.h, drivers/hv/hv_util.c, hv_kvp.c, channel_mgmt.c's
vmbus_prep_negotiate_resp; OpenVMM's hyperv_ic_protocol for the host side).

Every IC message is one inband packet: a pipe header, the IC message header,
then the body its type names. The host sends requests (TRANSACTION |
REQUEST); the guest answers in place: the same bytes, the same length and
the same VMBus transaction id, with TRANSACTION | RESPONSE, a status, and
the body it changed (a heartbeat's sequence number plus one, a KVP value).

Choices where the sources leave room:
- The pipe header's flags are 1 (a data message, as synthvid's and synthhid's
  pipes say); Linux ignores them.
- A KVP request always carries a whole hv_kvp_msg (KVP_MESSAGE_SIZE), so the
  guest's in-place answer fits whatever the operation.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Annotated

from vmbus import guid
from vmbus.errors import UsageError
from vmbus.memory import PAGE_SIZE
from vmbus.wire import U8, U16, U32, U64, Bytes, Fmt, WireError, WireStruct, open_enum, wire_struct

Buffer = bytes | bytearray | memoryview
I8 = Fmt("b")
Version = tuple[int, int]  # (major, minor); Linux's tables write major << 16 | minor

# --- framing ------------------------------------------------------------------

PIPE_DATA = 1  # vmbuspipe_hdr.flags of a data message [choice: Linux ignores it]
PIPE_HEADER_SIZE = 8
IC_HEADER_SIZE = 20
ICMSG_HDR = PIPE_HEADER_SIZE + IC_HEADER_SIZE  # where a body starts (Linux's ICMSG_HDR)
MAX_VERSION_COUNT = 100  # IC_VERSION_NEGOTIATION_MAX_VER_COUNT
NEGOTIATE_RESPONSE_SIZE = 16  # icmsgsize Linux writes into its answer: 8 + two versions
# Linux reads heartbeat, shutdown and time sync into one page, KVP into four.
UTIL_RECEIVE_LIMIT = PAGE_SIZE
KVP_RECEIVE_LIMIT = 4 * PAGE_SIZE
# Linux opens every util channel with VMBUS_RING_SIZE(3 pages): 4 pages each way.
RING_SIZE = 4 * PAGE_SIZE


class MessageType(IntEnum):
    """ICMSGTYPE_*. Open: unknown values stay ints."""

    NEGOTIATE = 0
    HEARTBEAT = 1
    KVP_EXCHANGE = 2
    SHUTDOWN = 3
    TIMESYNC = 4
    VSS = 5
    FCOPY = 7


class IcFlags(IntFlag):
    """icmsg_hdr.icflags (ICMSGHDRFLAG_*)."""

    TRANSACTION = 1
    REQUEST = 2
    RESPONSE = 4


REQUEST_FLAGS = IcFlags.TRANSACTION | IcFlags.REQUEST
RESPONSE_FLAGS = IcFlags.TRANSACTION | IcFlags.RESPONSE


class Status(IntEnum):
    """The HRESULTs ICs answer with (include/uapi/linux/hyperv.h)."""

    S_OK = 0x00000000
    E_FAIL = 0x80004005
    S_CONT = 0x80070103  # KVP: no such key, or past the pool's end
    NOT_SUPPORTED = 0x80070032
    MACHINE_LOCKED = 0x800704F7
    DEVICE_NOT_CONNECTED = 0x8007048F
    INVALIDARG = 0x80070057
    GUID_NOTFOUND = 0x80041002
    ALREADY_EXISTS = 0x80070050


# --- versions: what Linux's hv_utils accepts, newest first ---------------------

FRAMEWORK_VERSIONS: tuple[Version, ...] = ((3, 0), (1, 0))  # UTIL_FW_VERSION, UTIL_WS2K8
HEARTBEAT_VERSIONS: tuple[Version, ...] = ((3, 0), (1, 0))
SHUTDOWN_VERSIONS: tuple[Version, ...] = ((3, 2), (3, 1), (3, 0), (1, 0))
TIMESYNC_VERSIONS: tuple[Version, ...] = ((4, 0), (3, 0), (1, 0))
KVP_VERSIONS: tuple[Version, ...] = ((4, 0), (3, 0), (1, 0))
TIMESYNC_REF_VERSION: Version = (4, 0)  # from 4.0 on, samples are ictimesync_ref_data

# Offer class GUIDs (guid.HEARTBEAT etc., §4) and each service's message type.
CLASS_IDS: dict[MessageType, uuid.UUID] = {
    MessageType.HEARTBEAT: guid.HEARTBEAT,
    MessageType.SHUTDOWN: guid.SHUTDOWN,
    MessageType.TIMESYNC: guid.TIMESYNC,
    MessageType.KVP_EXCHANGE: guid.KVP,
}


def message_type(value: int) -> MessageType | int:
    return open_enum(MessageType, value)


@wire_struct(size=PIPE_HEADER_SIZE)
@dataclass(frozen=True)
class PipeHeader(WireStruct):
    """struct vmbuspipe_hdr { u32 flags; u32 msgsize; }; msgsize = bytes after it."""

    flags: Annotated[int, U32]
    msgsize: Annotated[int, U32]


@wire_struct(size=IC_HEADER_SIZE)
@dataclass(frozen=True)
class IcHeader(WireStruct):
    """struct icmsg_hdr { ic_version icverframe; u16 icmsgtype; ic_version
    icvermsg; u16 icmsgsize; u32 status; u8 ictransaction_id; u8 icflags;
    u8 reserved[2]; } (struct ic_version { u16 major; u16 minor; })."""

    framework_major: Annotated[int, U16]
    framework_minor: Annotated[int, U16]
    msgtype: Annotated[int, U16]
    message_major: Annotated[int, U16]
    message_minor: Annotated[int, U16]
    msgsize: Annotated[int, U16]  # bytes of the body
    status: Annotated[int, U32] = 0
    transaction_id: Annotated[int, U8] = 0
    flags: Annotated[int, U8] = 0
    reserved: Annotated[int, U16] = 0

    @property
    def framework(self) -> Version:
        return (self.framework_major, self.framework_minor)

    @property
    def message(self) -> Version:
        return (self.message_major, self.message_minor)


@wire_struct(size=8)
@dataclass(frozen=True)
class NegotiateHeader(WireStruct):
    """struct icmsg_negotiate { u16 icframe_vercnt; u16 icmsg_vercnt;
    u32 reserved; struct ic_version icversion_data[]; }"""

    framework_count: Annotated[int, U16]
    message_count: Annotated[int, U16]
    reserved: Annotated[int, U32] = 0


@wire_struct(size=4)
@dataclass(frozen=True)
class IcVersion(WireStruct):
    major: Annotated[int, U16]
    minor: Annotated[int, U16]


@wire_struct(size=40)
@dataclass(frozen=True)
class HeartbeatData(WireStruct):
    """struct heartbeat_msg_data { u64 seq_num; u32 reserved[8]; }"""

    seq_num: Annotated[int, U64]
    reserved: Annotated[bytes, Bytes(32)] = bytes(32)


SHUTDOWN_MESSAGE_BYTES = 2048


class ShutdownFlags(IntFlag):
    """shutdown_msg_data.flags: Linux takes 0/1 (shut down), 2/3 (reboot),
    4/5 (hibernate); bit 0 forces it."""

    FORCE = 1
    REBOOT = 2
    HIBERNATE = 4


@wire_struct(size=12 + SHUTDOWN_MESSAGE_BYTES)
@dataclass(frozen=True)
class ShutdownData(WireStruct):
    """struct shutdown_msg_data { u32 reason_code; u32 timeout_seconds;
    u32 flags; u8 display_message[2048]; } (the message: UTF-16LE, NUL-ended)."""

    reason_code: Annotated[int, U32]
    timeout_seconds: Annotated[int, U32]
    flags: Annotated[int, U32]
    display_message: Annotated[bytes, Bytes(SHUTDOWN_MESSAGE_BYTES)] = b""


SHTDN_REASON_FLAG_PLANNED = 0x80000000  # Windows SDK, as OpenVMM sends


class TimeSyncFlags(IntFlag):
    """ICTIMESYNCFLAG_*: PROBE is 0 (no bit)."""

    SYNC = 1  # set the clock now (after boot or restore)
    SAMPLE = 2  # a sample to discipline the clock with


WLTIMEDELTA = 116444736000000000  # 1601-01-01 to 1970-01-01 in 100 ns units


@wire_struct(size=25)
@dataclass(frozen=True)
class TimeSyncData(WireStruct):
    """struct ictimesync_data { u64 parenttime; u64 childtime; u64
    roundtriptime; u8 flags; } (message versions before 4.0)."""

    parenttime: Annotated[int, U64]  # the host's UTC, 100 ns since 1601
    childtime: Annotated[int, U64] = 0
    roundtriptime: Annotated[int, U64] = 0
    flags: Annotated[int, U8] = TimeSyncFlags.SAMPLE


@wire_struct(size=22)
@dataclass(frozen=True)
class TimeSyncRefData(WireStruct):
    """struct ictimesync_ref_data { u64 parenttime; u64 vmreferencetime;
    u8 flags; char leapflags; char stratum; u8 reserved[3]; } (4.0)."""

    parenttime: Annotated[int, U64]
    vmreferencetime: Annotated[int, U64] = 0  # the guest's reference counter then
    flags: Annotated[int, U8] = TimeSyncFlags.SAMPLE
    leapflags: Annotated[int, I8] = 0
    stratum: Annotated[int, I8] = 0
    reserved: Annotated[bytes, Bytes(3)] = bytes(3)


# --- KVP ----------------------------------------------------------------------

KVP_MAX_KEY_SIZE = 512  # bytes of UTF-16 with its NUL: 255 characters
KVP_MAX_VALUE_SIZE = 2048  # bytes of UTF-16 with its NUL: 1023 characters
KVP_MAX_KEY_UNITS = KVP_MAX_KEY_SIZE // 2 - 1
KVP_MAX_VALUE_UNITS = KVP_MAX_VALUE_SIZE // 2 - 1
# The body union's largest member, hv_kvp_ipaddr_value: 256 + 2 + 2048 * 3 + 1024.
KVP_IPADDR_VALUE_SIZE = 7426
KVP_MESSAGE_SIZE = 4 + KVP_IPADDR_VALUE_SIZE  # sizeof(struct hv_kvp_msg)


class KvpOp(IntEnum):
    """enum hv_kvp_exchg_op."""

    GET = 0
    SET = 1
    DELETE = 2
    ENUMERATE = 3
    GET_IP_INFO = 4
    SET_IP_INFO = 5


class KvpPool(IntEnum):
    """enum hv_kvp_exchg_pool."""

    EXTERNAL = 0  # written by the host
    GUEST = 1  # written by the guest
    AUTO = 2  # the guest's generated facts (FQDN, OS name, ...)
    AUTO_EXTERNAL = 3
    AUTO_INTERNAL = 4


KVP_POOLS = len(KvpPool)


class RegType(IntEnum):
    """Registry value types of hv_kvp_exchg_msg_value.value_type."""

    SZ = 1
    U32 = 4
    U64 = 8


@wire_struct(size=4)
@dataclass(frozen=True)
class KvpHeader(WireStruct):
    """struct hv_kvp_hdr { u8 operation; u8 pool; u16 pad; }"""

    operation: Annotated[int, U8]
    pool: Annotated[int, U8]
    pad: Annotated[int, U16] = 0


@wire_struct(size=12 + KVP_MAX_KEY_SIZE + KVP_MAX_VALUE_SIZE)
@dataclass(frozen=True)
class KvpValue(WireStruct):
    """struct hv_kvp_exchg_msg_value { u32 value_type; u32 key_size; u32
    value_size; u8 key[512]; union { u8 value[2048]; u32 value_u32; u64
    value_u64; }; } (sizes in bytes, NUL included)."""

    value_type: Annotated[int, U32]
    key_size: Annotated[int, U32]
    value_size: Annotated[int, U32]
    key: Annotated[bytes, Bytes(KVP_MAX_KEY_SIZE)] = b""
    value: Annotated[bytes, Bytes(KVP_MAX_VALUE_SIZE)] = b""


@wire_struct(size=4 + KVP_MAX_KEY_SIZE)
@dataclass(frozen=True)
class KvpDelete(WireStruct):
    """struct hv_kvp_msg_delete { u32 key_size; u8 key[512]; }"""

    key_size: Annotated[int, U32]
    key: Annotated[bytes, Bytes(KVP_MAX_KEY_SIZE)] = b""


KVP_BODY = KvpHeader.SIZE  # where the operation's struct starts in hv_kvp_msg


def utf16_units(text: str) -> int:
    """UTF-16 code units of `text` (a character past U+FFFF takes two)."""
    return len(text.encode("utf-16-le")) // 2


def encode_utf16(text: str, field_bytes: int, what: str) -> tuple[bytes, int]:
    """(UTF-16LE bytes, size with the NUL) for a KVP field; UsageError when
    it does not fit, or holds a NUL (the guest would cut it there)."""
    if "\0" in text:
        raise UsageError(f"a KVP {what} cannot hold a NUL character")
    data = text.encode("utf-16-le", errors="surrogatepass")
    limit = field_bytes // 2 - 1
    if len(data) // 2 > limit:
        raise UsageError(f"a KVP {what} is at most {limit} UTF-16 units, got {len(data) // 2}")
    return data, len(data) + 2


def decode_utf16(field: bytes, size: int, what: str) -> str:
    """A UTF-16LE field of `size` bytes (its NUL included, or not), as the
    guest or the host sent it. WireError for a size the field cannot hold,
    an odd size or bytes that are not UTF-16."""
    if size > len(field) or size % 2:
        raise WireError(f"KVP {what} size {size} (field of {len(field)} bytes)")
    try:
        text = field[:size].decode("utf-16-le")
    except UnicodeDecodeError as error:
        raise WireError(f"KVP {what} is not UTF-16: {error.reason}") from None
    return text.split("\0", 1)[0]


def kvp_value_text(value: KvpValue) -> str:
    """The value as text: REG_SZ decoded, REG_U32 and REG_U64 in decimal
    (as Linux's hv_kvp hands them to its daemon)."""
    if value.value_type == RegType.U32:
        return str(int.from_bytes(value.value[:4], "little"))
    if value.value_type == RegType.U64:
        return str(int.from_bytes(value.value[:8], "little"))
    if value.value_type != RegType.SZ:
        raise WireError(f"KVP value type {value.value_type}")
    return decode_utf16(value.value, value.value_size, "value")


def make_kvp_value(key: str, value: str = "") -> KvpValue:
    key_bytes, key_size = encode_utf16(key, KVP_MAX_KEY_SIZE, "key")
    value_bytes, value_size = encode_utf16(value, KVP_MAX_VALUE_SIZE, "value")
    return KvpValue(RegType.SZ, key_size, value_size, key_bytes, value_bytes)


def encode_kvp_body(op: int, pool: int, key: str = "", value: str = "", index: int = 0) -> bytes:
    """A whole hv_kvp_msg for `op` (KVP_MESSAGE_SIZE bytes)."""
    header = KvpHeader(op, pool).pack()
    if op == KvpOp.DELETE:
        key_bytes, key_size = encode_utf16(key, KVP_MAX_KEY_SIZE, "key")
        body = KvpDelete(key_size, key_bytes).pack()
    elif op == KvpOp.ENUMERATE:
        body = index.to_bytes(4, "little") + KvpValue(RegType.SZ, 0, 0).pack()
    else:
        body = make_kvp_value(key, value).pack()
    return (header + body).ljust(KVP_MESSAGE_SIZE, b"\0")


def kvp_value_at(body: Buffer, op: int) -> KvpValue:
    """The hv_kvp_exchg_msg_value of a GET, SET or ENUMERATE body."""
    offset = KVP_BODY + (4 if op == KvpOp.ENUMERATE else 0)
    return KvpValue.unpack_from(body, offset)


def kvp_index(body: Buffer) -> int:
    """hv_kvp_msg_enumerate.index of an ENUMERATE body."""
    return int.from_bytes(bytes(memoryview(body)[KVP_BODY : KVP_BODY + 4]), "little")


# --- messages -------------------------------------------------------------------


def encode_message(header: IcHeader, body: Buffer) -> bytes:
    """Pipe header, IC header, body; header.msgsize is the caller's."""
    payload = header.pack() + bytes(body)
    return PipeHeader(PIPE_DATA, len(payload)).pack() + payload


def decode_message(payload: Buffer) -> tuple[IcHeader, bytes]:
    """(IC header, the whole body after it) of one message: ONE private copy,
    parsed once. The body is everything after the header (a guest answers
    in the request's full length); WireError when the framing does not add
    up (too short, or msgsize past the end)."""
    data = bytes(payload)
    pipe = PipeHeader.unpack_from(data)
    header = IcHeader.unpack_from(data, PIPE_HEADER_SIZE)
    if pipe.msgsize > len(data) - PIPE_HEADER_SIZE:
        raise WireError(f"pipe msgsize {pipe.msgsize} in a {len(data)}-byte packet")
    if header.msgsize > len(data) - ICMSG_HDR:
        raise WireError(f"icmsgsize {header.msgsize} in a {len(data)}-byte packet")
    return header, data[ICMSG_HDR:]


def encode_negotiate(
    framework_versions: tuple[Version, ...] | list[Version],
    message_versions: tuple[Version, ...] | list[Version],
) -> bytes:
    """An icmsg_negotiate body: the counts, then every version (framework
    versions first)."""
    versions = [*framework_versions, *message_versions]
    return NegotiateHeader(len(framework_versions), len(message_versions)).pack() + b"".join(
        IcVersion(major, minor).pack() for major, minor in versions
    )


def decode_negotiate(body: Buffer) -> tuple[list[Version], list[Version]]:
    """(framework versions, message versions) of a negotiate body; WireError
    past MAX_VERSION_COUNT or when the versions do not fit the body (Linux's
    checks)."""
    head = NegotiateHeader.unpack_from(body)
    counts = (head.framework_count, head.message_count)
    if max(counts) > MAX_VERSION_COUNT:
        raise WireError(f"negotiate counts {counts}, at most {MAX_VERSION_COUNT} each")
    need = NegotiateHeader.SIZE + IcVersion.SIZE * sum(counts)
    if need > memoryview(body).nbytes:
        raise WireError(f"negotiate with {sum(counts)} versions in {memoryview(body).nbytes} bytes")
    versions = [
        IcVersion.unpack_from(body, NegotiateHeader.SIZE + IcVersion.SIZE * i)
        for i in range(sum(counts))
    ]
    pairs = [(v.major, v.minor) for v in versions]
    return pairs[: counts[0]], pairs[counts[0] :]


def choose_version(offered: list[Version], supported: tuple[Version, ...]) -> Version | None:
    """vmbus_prep_negotiate_resp's pick: the first of our own versions (newest
    first) that the other side offered, or None."""
    return next((version for version in supported if version in offered), None)
