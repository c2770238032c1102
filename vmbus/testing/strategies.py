"""Hypothesis strategies for property-testing VMBus framing: ring packets,
GPA ranges, control messages, and the raw bytes a hostile peer may send.

    from hypothesis import given
    from vmbus.testing import strategies as vs

    @given(vs.control_messages())
    def test_round_trip(message): ...
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from typing import Any, get_type_hints

from hypothesis import strategies as st

from vmbus import messages as m
from vmbus.packet import GpaRange, PacketType
from vmbus.wire import GUID, Fmt, WireStruct

__all__ = [
    "RingPacket",
    "control_messages",
    "from_hex",
    "gpa_range",
    "gpa_ranges",
    "hostile_bytes",
    "ring_packets",
    "trans_ids",
    "wire_values",
]

U32 = st.integers(0, 2**32 - 1)
trans_ids = st.integers(0, 2**64 - 1)


@dataclass(frozen=True)
class RingPacket:
    """The arguments of one RingWriter.write call."""

    type: int
    flags: int
    trans_id: int
    header: bytes
    payload: bytes


def ring_packets(max_payload: int = 512) -> st.SearchStrategy[RingPacket]:
    """Packets any ring implementation must carry unchanged (payloads come
    back padded with zeros to 8 bytes)."""
    return st.builds(
        RingPacket,
        type=st.sampled_from(list(PacketType)[1:]),  # VM_PKT_INVALID never goes on a ring
        flags=st.sampled_from([0, 1]),
        trans_id=trans_ids,
        header=st.integers(0, 4).map(lambda n: bytes(8 * n)),
        payload=st.binary(max_size=max_payload),
    )


@st.composite
def gpa_range(draw: st.DrawFn, max_pages: int = 4, max_pfn: int = 2**64) -> GpaRange:
    offset = draw(st.integers(0, 4095))
    count = draw(st.integers(1, max_pages * 4096 - offset))
    pages = -(-(offset + count) // 4096)
    pfns = draw(st.lists(st.integers(0, max_pfn - 1), min_size=pages, max_size=pages))
    return GpaRange(count, offset, tuple(pfns))


def gpa_ranges(max_ranges: int = 4, max_pfn: int = 2**64) -> st.SearchStrategy[list[GpaRange]]:
    return st.lists(gpa_range(max_pfn=max_pfn), min_size=1, max_size=max_ranges)


def control_messages() -> st.SearchStrategy[m.Message]:
    """Valid VMBus channel messages of every fixed-size type."""
    uuids = st.uuids()
    return st.one_of(
        st.builds(m.InitiateContact, vmbus_version_requested=U32, target_vcpu=U32),
        st.builds(m.VersionResponse, version_supported=st.integers(0, 1), msg_conn_id=U32),
        st.just(m.RequestOffers()),
        st.just(m.AllOffersDelivered()),
        st.builds(
            m.OfferChannel,
            if_type=uuids,
            if_instance=uuids,
            sub_channel_index=st.integers(0, 0xFFFF),
            child_relid=U32,
            connection_id=U32,
        ),
        st.builds(
            m.OpenChannel,
            child_relid=U32,
            openid=U32,
            ringbuffer_gpadlhandle=U32,
            downstream_ringbuffer_pageoffset=U32,
        ),
        st.builds(m.OpenChannelResult, child_relid=U32, openid=U32, status=U32),
        st.builds(m.CloseChannel, child_relid=U32),
        st.builds(m.GpadlCreated, child_relid=U32, gpadl=U32, creation_status=U32),
        st.builds(m.GpadlTeardown, child_relid=U32, gpadl=U32),
        st.builds(m.GpadlTorndown, gpadl=U32),
        st.builds(m.RescindChannelOffer, child_relid=U32),
        st.builds(m.RelidReleased, child_relid=U32),
        st.just(m.Unload()),
        st.just(m.UnloadResponse()),
    )


def hostile_bytes(max_size: int = 512) -> st.SearchStrategy[bytes]:
    """What a misbehaving peer might send: random bytes, and valid messages
    cut short or with a byte flipped."""

    def mutated(data: bytes, cut: int, flip: int) -> bytes:
        data = data[: max(0, len(data) - cut)]
        if data:
            i = flip % len(data)
            data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
        return data

    valid = control_messages().map(m.encode)
    return st.one_of(
        st.binary(max_size=max_size),
        st.builds(mutated, valid, st.integers(0, 16), st.integers(0, 255)),
    )


def field_values(fmt: Fmt) -> st.SearchStrategy[Any]:
    """Any value of one wire field: integers of its width and sign, GUIDs,
    or byte strings of its exact size."""
    if fmt is GUID:
        return st.uuids()
    if fmt.code.endswith("s"):
        size = int(fmt.code[:-1])
        return st.binary(min_size=size, max_size=size)
    bits = 8 * struct.calcsize(fmt.code)
    if fmt.code.islower():  # signed
        return st.integers(-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    return st.integers(0, (1 << bits) - 1)


def wire_values(cls: type[WireStruct], skip: int = 0) -> st.SearchStrategy[Any]:
    """Instances of a wire struct with any field values, read off its own
    field table; the first `skip` fields (e.g. a message type) keep their
    defaults."""
    hints = get_type_hints(cls, include_extras=True)
    fields = {
        field.name: field_values(
            next(m for m in hints[field.name].__metadata__ if isinstance(m, Fmt))
        )
        for field in dataclasses.fields(cls)[skip:]  # type: ignore[arg-type]
    }
    return st.builds(cls, **fields)


def from_hex(text: str) -> bytes:
    """Golden bytes written as hex, one field per line, with # comments."""
    return bytes.fromhex("".join(line.split("#")[0] for line in text.splitlines()))
