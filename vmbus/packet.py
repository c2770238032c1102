"""In-ring packet codecs (docs/protocol.md §2): packet types, the GPA-direct
and transfer-page headers, completions, and a dispatcher for read packets.

The ring writes and reads the 16-byte descriptor; this module owns what sits
between it and the payload (`RingWriter.write(header=...)`, `Packet.header`).
Headers come from an untrusted peer: every decoder checks each count and
length against the bytes it has and raises only `PacketError`.

Payloads handed out by `parse` include the ring's zero padding to 8 bytes;
the device message inside says how long it really is.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Annotated, Any, NamedTuple, Protocol

from vmbus._ringpacket import Packet
from vmbus.errors import PeerError
from vmbus.wire import U8, U16, U32, WireStruct, open_enum, wire_struct


class PacketError(PeerError, ValueError):
    """A packet header that is malformed, over a limit, or of a type we do
    not handle; or values that cannot be encoded as one."""


class PacketType(IntEnum):
    """enum vmbus_packet_type (§2.2)."""

    INVALID = 0x0
    SYNCH = 0x1
    ADD_XFER_PAGESET = 0x2
    RM_XFER_PAGESET = 0x3
    ESTABLISH_GPADL = 0x4
    TEARDOWN_GPADL = 0x5
    DATA_INBAND = 0x6
    DATA_USING_XFER_PAGES = 0x7
    DATA_USING_GPADL = 0x8
    DATA_USING_GPA_DIRECT = 0x9
    CANCEL_REQUEST = 0xA
    COMP = 0xB
    DATA_USING_ADDITIONAL_PKT = 0xC
    ADDITIONAL_DATA = 0xD


def packet_type(value: int) -> PacketType | int:
    """Open enum: the PacketType member for a known value, else the plain int."""
    return open_enum(PacketType, value)


# VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED: the receiver must answer with a
# VM_PKT_COMP packet echoing the trans_id.
COMPLETION_REQUESTED = 0x1

PAGE_SIZE = 4096  # PFNs and byte offsets are in 4 KiB units on every guest (§2.3)

# Limits on what a peer may make us decode in one packet.
MAX_GPA_RANGES = 256  # 8x Linux's MAX_PAGE_BUFFER_COUNT (32): headroom, yet bounded work
MAX_GPA_PFNS = 8192  # 32 MiB per packet: above any storvsc/netvsc transfer
MAX_TRANSFER_RANGES = 562  # netvsc's receive-coalescing maximum, what Linux sizes for

_U64_LIMIT = 1 << 64
_U32_LIMIT = 1 << 32


@wire_struct(size=8)
@dataclass(frozen=True)
class _GpaDirectFixed(WireStruct):
    """struct vmbus_packet_mpb_array after its descriptor:
    { u32 reserved; u32 rangecount; struct hv_mpb_array range[]; }"""

    reserved: Annotated[int, U32]
    rangecount: Annotated[int, U32]


@wire_struct(size=8)
@dataclass(frozen=True)
class _GpaRangeFixed(WireStruct):
    """struct gpa_range { u32 byte_count; u32 byte_offset; u64 pfn_array[]; }
    without the PFNs (n = ceil((byte_offset + byte_count) / 4096) of them)."""

    byte_count: Annotated[int, U32]
    byte_offset: Annotated[int, U32]


@wire_struct(size=8)
@dataclass(frozen=True)
class _TransferPageFixed(WireStruct):
    """struct vmtransfer_page_packet_header after its descriptor:
    { u16 xfer_pageset_id; u8 sender_owns_set; u8 reserved; u32 range_cnt;
      struct vmtransfer_page_range ranges[]; }"""

    xfer_pageset_id: Annotated[int, U16]
    sender_owns_set: Annotated[int, U8]
    reserved: Annotated[int, U8]
    range_cnt: Annotated[int, U32]


@wire_struct(size=8)
@dataclass(frozen=True)
class _TransferRangeWire(WireStruct):
    """struct vmtransfer_page_range { u32 byte_count; u32 byte_offset; }"""

    byte_count: Annotated[int, U32]
    byte_offset: Annotated[int, U32]


def pages_spanned(byte_offset: int, byte_count: int) -> int:
    """How many 4 KiB pages a range starting byte_offset into its first page covers."""
    return -(-(byte_offset + byte_count) // PAGE_SIZE)


@dataclass(frozen=True)
class GpaRange:
    """A guest buffer: byte_count bytes from byte_offset into pfns[0]."""

    byte_count: int
    byte_offset: int
    pfns: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "pfns", tuple(self.pfns))
        if not 0 < self.byte_count < _U32_LIMIT:
            raise PacketError(f"GPA range byte_count {self.byte_count} is not in [1, 2**32)")
        if not 0 <= self.byte_offset < PAGE_SIZE:
            raise PacketError(f"GPA range byte_offset {self.byte_offset} is not in [0, 4096)")
        needed = pages_spanned(self.byte_offset, self.byte_count)
        if len(self.pfns) != needed:
            raise PacketError(
                f"GPA range of {self.byte_count} bytes at offset {self.byte_offset} "
                f"spans {needed} pages, not {len(self.pfns)}"
            )
        if min(self.pfns) < 0 or max(self.pfns) >= _U64_LIMIT:  # C-speed, per page
            raise PacketError("GPA range PFN does not fit 64 bits")


def encode_gpa_direct_header(ranges: Sequence[GpaRange]) -> bytes:
    """The header of a GPA-direct packet (§2.3), for `RingWriter.write(header=)`."""
    _check_gpa_limits(len(ranges), sum(len(r.pfns) for r in ranges))
    parts = [_GpaDirectFixed(reserved=0, rangecount=len(ranges)).pack()]
    for r in ranges:
        parts.append(_GpaRangeFixed(r.byte_count, r.byte_offset).pack())
        parts.append(struct.pack(f"<{len(r.pfns)}Q", *r.pfns))
    return b"".join(parts)


def _check_gpa_limits(range_count: int, pfn_count: int) -> None:
    if range_count == 0:
        raise PacketError("GPA-direct packet without ranges")
    if range_count > MAX_GPA_RANGES:
        raise PacketError(f"{range_count} GPA ranges exceed the limit of {MAX_GPA_RANGES}")
    if pfn_count > MAX_GPA_PFNS:
        raise PacketError(f"{pfn_count} PFNs exceed the limit of {MAX_GPA_PFNS} per packet")


def decode_gpa_direct_header(header: Any, max_pfn: int | None = None) -> list[GpaRange]:
    """Decode a peer's GPA-direct header (`Packet.header`). PFNs >= max_pfn
    (outside guest memory) are rejected. The ranges must fill the header
    exactly: every sender sizes offset8 to the end of the last range."""
    view = memoryview(header).cast("B")
    size = len(view)
    if size < _GpaDirectFixed.SIZE:
        raise PacketError(f"GPA-direct header of {size} bytes is shorter than 8")
    count = _GpaDirectFixed.unpack_from(view).rangecount
    _check_gpa_limits(count, 0)
    # Each range takes at least 16 bytes (fixed part plus one PFN).
    room = (size - _GpaDirectFixed.SIZE) // (_GpaRangeFixed.SIZE + 8)
    if count > room:
        raise PacketError(f"peer claims {count} GPA ranges, a {size}-byte header holds {room}")
    ranges, pos, total_pfns = [], _GpaDirectFixed.SIZE, 0
    for i in range(count):
        if pos + _GpaRangeFixed.SIZE > size:
            raise PacketError(f"GPA range {i} starts past the end of the {size}-byte header")
        fixed = _GpaRangeFixed.unpack_from(view, pos)
        if fixed.byte_count == 0:
            raise PacketError(f"GPA range {i} is empty")
        if fixed.byte_offset >= PAGE_SIZE:
            raise PacketError(f"GPA range {i} byte_offset {fixed.byte_offset} is past its page")
        n = pages_spanned(fixed.byte_offset, fixed.byte_count)
        total_pfns += n
        _check_gpa_limits(count, total_pfns)
        pos += _GpaRangeFixed.SIZE
        if pos + 8 * n > size:
            raise PacketError(f"GPA range {i} needs {n} PFNs, overrunning the {size}-byte header")
        pfns = struct.unpack_from(f"<{n}Q", view, pos)
        pos += 8 * n
        if max_pfn is not None and max(pfns) >= max_pfn:
            raise PacketError(f"GPA range {i} names PFN {max(pfns):#x} beyond guest memory")
        ranges.append(GpaRange(fixed.byte_count, fixed.byte_offset, pfns))
    if pos != size:
        raise PacketError(f"{size - pos} bytes of garbage after the last GPA range")
    return ranges


class TransferRange(NamedTuple):
    """One range of a transfer-page packet: bytes at byte_offset in the pageset."""

    byte_count: int
    byte_offset: int


@dataclass(frozen=True)
class TransferPageHeader:
    """A transfer-page packet's header (§2.4): ranges of a receive buffer."""

    xfer_pageset_id: int
    ranges: tuple[TransferRange, ...]
    sender_owns_set: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranges", tuple(TransferRange(*r) for r in self.ranges))
        if not 0 <= self.xfer_pageset_id < 1 << 16:
            raise PacketError(f"xfer_pageset_id {self.xfer_pageset_id} does not fit 16 bits")
        if not 0 <= self.sender_owns_set < 1 << 8:
            raise PacketError(f"sender_owns_set {self.sender_owns_set} does not fit 8 bits")
        _check_transfer_count(len(self.ranges))
        for count, offset in self.ranges:
            if not (0 <= count < _U32_LIMIT and 0 <= offset < _U32_LIMIT):
                raise PacketError(f"transfer range ({count}, {offset}) does not fit 32 bits")


def _check_transfer_count(count: int) -> None:
    if count == 0:
        raise PacketError("transfer-page packet without ranges")
    if count > MAX_TRANSFER_RANGES:
        raise PacketError(f"{count} transfer ranges exceed the limit of {MAX_TRANSFER_RANGES}")


def encode_transfer_page_header(
    xfer_pageset_id: int, ranges: Sequence[tuple[int, int]], sender_owns_set: int = 0
) -> bytes:
    """The header of a transfer-page packet; ranges are (byte_count, byte_offset)."""
    parsed = TransferPageHeader(  # validates every field
        xfer_pageset_id, tuple(TransferRange(*r) for r in ranges), sender_owns_set
    )
    fixed = _TransferPageFixed(xfer_pageset_id, sender_owns_set, 0, len(parsed.ranges))
    return fixed.pack() + b"".join(_TransferRangeWire(*r).pack() for r in parsed.ranges)


def decode_transfer_page_header(header: Any, buffer_size: int | None = None) -> TransferPageHeader:
    """Decode a peer's transfer-page header (`Packet.header`). Like Linux,
    bytes after the ranges are ignored (offset8*8 >= 24 + 8*range_cnt). With
    buffer_size, every range must lie inside the receive buffer."""
    view = memoryview(header).cast("B")
    size = len(view)
    if size < _TransferPageFixed.SIZE:
        raise PacketError(f"transfer-page header of {size} bytes is shorter than 8")
    fixed = _TransferPageFixed.unpack_from(view)
    count = fixed.range_cnt
    _check_transfer_count(count)
    room = (size - _TransferPageFixed.SIZE) // _TransferRangeWire.SIZE
    if count > room:
        raise PacketError(f"peer claims {count} transfer ranges, a {size}-byte header holds {room}")
    ranges = []
    for i in range(count):
        wire = _TransferRangeWire.unpack_from(view, _TransferPageFixed.SIZE + 8 * i)
        end = wire.byte_offset + wire.byte_count
        if buffer_size is not None and end > buffer_size:
            raise PacketError(
                f"transfer range {i} ends at {end}, past the {buffer_size}-byte buffer"
            )
        ranges.append(TransferRange(wire.byte_count, wire.byte_offset))
    return TransferPageHeader(fixed.xfer_pageset_id, tuple(ranges), fixed.sender_owns_set)


# Parsed packets: the payload is a view into the ring, valid until the reader commits.


@dataclass(frozen=True)
class InbandPacket:
    trans_id: int
    flags: int
    payload: memoryview

    @property
    def completion_requested(self) -> bool:
        return bool(self.flags & COMPLETION_REQUESTED)


@dataclass(frozen=True)
class CompletionPacket:
    """VM_PKT_COMP: trans_id echoes the request this completes."""

    trans_id: int
    flags: int
    payload: memoryview


@dataclass(frozen=True)
class GpaDirectPacket:
    trans_id: int
    flags: int
    ranges: list[GpaRange]
    payload: memoryview

    @property
    def completion_requested(self) -> bool:
        return bool(self.flags & COMPLETION_REQUESTED)


@dataclass(frozen=True)
class TransferPagePacket:
    trans_id: int
    flags: int
    header: TransferPageHeader
    payload: memoryview

    @property
    def completion_requested(self) -> bool:
        return bool(self.flags & COMPLETION_REQUESTED)


ParsedPacket = InbandPacket | GpaDirectPacket | TransferPagePacket | CompletionPacket


def parse(
    packet: Packet, *, max_pfn: int | None = None, buffer_size: int | None = None
) -> ParsedPacket:
    """Decode a packet read off a ring. Inband packets and completions carry
    no header; like Linux we skip one if a peer sends it anyway. Other
    packet types are not supported and raise PacketError."""
    kind = packet_type(packet.type)
    if kind == PacketType.DATA_INBAND:
        return InbandPacket(packet.trans_id, packet.flags, packet.payload)
    if kind == PacketType.COMP:
        return CompletionPacket(packet.trans_id, packet.flags, packet.payload)
    if kind == PacketType.DATA_USING_GPA_DIRECT:
        ranges = decode_gpa_direct_header(packet.header, max_pfn)
        return GpaDirectPacket(packet.trans_id, packet.flags, ranges, packet.payload)
    if kind == PacketType.DATA_USING_XFER_PAGES:
        header = decode_transfer_page_header(packet.header, buffer_size)
        return TransferPagePacket(packet.trans_id, packet.flags, header, packet.payload)
    name = kind.name if isinstance(kind, PacketType) else f"{kind:#x}"
    raise PacketError(f"unsupported packet type {name}")


class Writer(Protocol):
    """What the helpers need of a ring writer (`vmbus.ring.RingWriter`)."""

    def write(
        self,
        payload: Any,
        type: int = ...,
        flags: int = ...,
        trans_id: int = ...,
        header: Any = ...,
    ) -> bool: ...


def write_inband(
    writer: Writer, payload: Any, trans_id: int, request_completion: bool = False
) -> bool:
    """Write a VM_PKT_DATA_INBAND packet. False: the ring is full."""
    flags = COMPLETION_REQUESTED if request_completion else 0
    return writer.write(payload, PacketType.DATA_INBAND, flags, trans_id)


def write_gpa_direct(
    writer: Writer, ranges: Sequence[GpaRange], payload: Any, trans_id: int
) -> bool:
    """Write a GPA-direct packet; like Linux, it always requests a completion."""
    header = encode_gpa_direct_header(ranges)
    return writer.write(
        payload, PacketType.DATA_USING_GPA_DIRECT, COMPLETION_REQUESTED, trans_id, header
    )


def write_transfer_page(
    writer: Writer,
    xfer_pageset_id: int,
    ranges: Sequence[tuple[int, int]],
    payload: Any,
    trans_id: int,
    request_completion: bool = False,
) -> bool:
    """Write a transfer-page packet naming (byte_count, byte_offset) ranges."""
    header = encode_transfer_page_header(xfer_pageset_id, ranges)
    flags = COMPLETION_REQUESTED if request_completion else 0
    return writer.write(payload, PacketType.DATA_USING_XFER_PAGES, flags, trans_id, header)


def write_completion(writer: Writer, trans_id: int, payload: Any = b"") -> bool:
    """Complete the request `trans_id`: a VM_PKT_COMP echoing it, no header."""
    return writer.write(payload, PacketType.COMP, 0, trans_id)
