"""Packet codecs (docs/protocol.md §2): round trips through both rings, golden
bytes from the §2 tables, and a hostile peer's headers."""

from __future__ import annotations

import struct
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmbus._ringdefs import HEADER_SIZE
from vmbus._ringpacket import Packet
from vmbus.packet import (
    COMPLETION_REQUESTED,
    MAX_GPA_PFNS,
    MAX_GPA_RANGES,
    MAX_TRANSFER_RANGES,
    CompletionPacket,
    GpaDirectPacket,
    GpaRange,
    InbandPacket,
    PacketError,
    PacketType,
    TransferPageHeader,
    TransferPagePacket,
    decode_gpa_direct_header,
    decode_transfer_page_header,
    encode_gpa_direct_header,
    encode_transfer_page_header,
    packet_type,
    parse,
    write_completion,
    write_gpa_direct,
    write_inband,
    write_transfer_page,
)

DATA_SIZE = 8192
U32 = struct.Struct("<I")
U64_MAX = (1 << 64) - 1
ring_settings = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


# Strategies (to move to vmbus/testing/ later).


@st.composite
def gpa_range(draw: st.DrawFn, max_pages: int = 4) -> GpaRange:
    offset = draw(st.integers(0, 4095))
    count = draw(st.integers(1, max_pages * 4096 - offset))
    n = -(-(offset + count) // 4096)
    pfns = draw(st.lists(st.integers(0, U64_MAX), min_size=n, max_size=n))
    return GpaRange(count, offset, tuple(pfns))


def gpa_ranges(max_ranges: int = 4) -> st.SearchStrategy[list[GpaRange]]:
    return st.lists(gpa_range(), min_size=1, max_size=max_ranges)


def transfer_page_ranges(max_ranges: int = 8) -> st.SearchStrategy[list[tuple[int, int]]]:
    u32 = st.integers(0, 2**32 - 1)
    return st.lists(st.tuples(u32, u32), min_size=1, max_size=max_ranges)


trans_ids = st.integers(0, U64_MAX)
payloads = st.binary(max_size=300)


# Helpers.


def make_ring(impl: ModuleType) -> tuple[bytearray, Any, Any]:
    buf = bytearray(HEADER_SIZE + DATA_SIZE)
    impl.init_ring(buf)
    return buf, impl.RingWriter(buf), impl.RingReader(buf)


def read_one(writer: Any, reader: Any) -> Packet:
    writer.commit()
    packet = reader.read()
    assert packet is not None
    return packet


def padded(payload: bytes) -> bytes:
    return payload + bytes(-len(payload) % 8)


def packet_from_wire(data: bytes) -> Packet:
    """A Packet as a ring reader would build it from these bytes."""
    type_, offset8, len8, flags, trans_id = struct.unpack_from("<HHHHQ", data)
    assert len8 * 8 == len(data)
    return Packet(type_, flags, trans_id, offset8, memoryview(data))


def gpa_header(rangecount: int, *ranges: tuple[int, int, list[int]]) -> bytes:
    """A GPA-direct header built by hand, as a peer might (mis)build it."""
    out = struct.pack("<II", 0, rangecount)
    for count, offset, pfns in ranges:
        out += struct.pack(f"<II{len(pfns)}Q", count, offset, *pfns)
    return out


# Packet types.


def test_packet_types_have_the_hyper_v_values() -> None:
    assert [t.value for t in PacketType] == list(range(0xE))
    assert PacketType.DATA_INBAND == 6
    assert PacketType.DATA_USING_XFER_PAGES == 7
    assert PacketType.DATA_USING_GPA_DIRECT == 9
    assert PacketType.COMP == 0xB
    assert COMPLETION_REQUESTED == 1


def test_packet_type_is_an_open_enum() -> None:
    assert packet_type(9) is PacketType.DATA_USING_GPA_DIRECT
    unknown = packet_type(0x42)
    assert unknown == 0x42 and type(unknown) is int


# Round trips through both real rings.


@ring_settings
@given(payload=payloads, trans_id=trans_ids, request=st.booleans())
def test_inband_round_trip(
    ring_impl: ModuleType, payload: bytes, trans_id: int, request: bool
) -> None:
    _, writer, reader = make_ring(ring_impl)
    assert write_inband(writer, payload, trans_id, request_completion=request)
    packet = read_one(writer, reader)
    assert packet.type == PacketType.DATA_INBAND
    parsed = parse(packet)
    assert isinstance(parsed, InbandPacket)
    assert (parsed.trans_id, parsed.completion_requested) == (trans_id, request)
    assert bytes(parsed.payload) == padded(payload)


@ring_settings
@given(ranges=gpa_ranges(), payload=payloads, trans_id=trans_ids)
def test_gpa_direct_round_trip(
    ring_impl: ModuleType, ranges: list[GpaRange], payload: bytes, trans_id: int
) -> None:
    _, writer, reader = make_ring(ring_impl)
    assert write_gpa_direct(writer, ranges, payload, trans_id)
    packet = read_one(writer, reader)
    assert (packet.type, packet.flags) == (PacketType.DATA_USING_GPA_DIRECT, COMPLETION_REQUESTED)
    parsed = parse(packet)
    assert isinstance(parsed, GpaDirectPacket)
    assert parsed.ranges == ranges
    assert (parsed.trans_id, parsed.completion_requested) == (trans_id, True)
    assert bytes(parsed.payload) == padded(payload)


@ring_settings
@given(
    pageset=st.integers(0, 0xFFFF),
    ranges=transfer_page_ranges(),
    payload=payloads,
    trans_id=trans_ids,
    request=st.booleans(),
)
def test_transfer_page_round_trip(
    ring_impl: ModuleType,
    pageset: int,
    ranges: list[tuple[int, int]],
    payload: bytes,
    trans_id: int,
    request: bool,
) -> None:
    _, writer, reader = make_ring(ring_impl)
    assert write_transfer_page(writer, pageset, ranges, payload, trans_id, request)
    packet = read_one(writer, reader)
    assert packet.type == PacketType.DATA_USING_XFER_PAGES
    parsed = parse(packet)
    assert isinstance(parsed, TransferPagePacket)
    assert parsed.header == TransferPageHeader(pageset, tuple(ranges))
    assert parsed.header.ranges == tuple(ranges)
    assert (parsed.trans_id, parsed.completion_requested) == (trans_id, request)
    assert bytes(parsed.payload) == padded(payload)


@ring_settings
@given(payload=payloads, trans_id=trans_ids)
def test_completion_round_trip(ring_impl: ModuleType, payload: bytes, trans_id: int) -> None:
    _, writer, reader = make_ring(ring_impl)
    assert write_completion(writer, trans_id, payload)
    packet = read_one(writer, reader)
    assert (packet.type, packet.flags, packet.offset8) == (PacketType.COMP, 0, 2)
    parsed = parse(packet)
    assert isinstance(parsed, CompletionPacket)
    assert parsed.trans_id == trans_id
    assert bytes(parsed.payload) == padded(payload)


def test_helpers_report_a_full_ring(ring_impl: ModuleType) -> None:
    _, writer, _ = make_ring(ring_impl)
    big = bytes(DATA_SIZE // 2)
    assert write_inband(writer, big, 1)
    assert not write_inband(writer, big, 2)
    assert not write_completion(writer, 3, big)
    assert not write_gpa_direct(writer, [GpaRange(1, 0, (5,))], big, 4)
    assert not write_transfer_page(writer, 0xCAFE, [(1, 0)], big, 5)


# Golden bytes, from the §2 tables. Each packet is written at write index 0,
# so its trailer (old write index << 32) is zero.

GOLDEN = {
    "inband": (
        lambda w: write_inband(w, b"\x01\x02\x03", 0x1122334455667788, request_completion=True),
        "0600 0200 0300 0100"  # type 6, offset8 2, len8 3 (16 + 3 -> 24), flags 1
        "8877665544332211"  # trans_id
        "0102030000000000"  # payload, zero pad to 8
        "0000000000000000",  # trailer
    ),
    "gpa_direct": (
        lambda w: write_gpa_direct(
            w, [GpaRange(0x1800, 0x800, (0x12345, 0x12346))], b"ABCDEFGH", 5
        ),
        "0900 0600 0700 0100"  # type 9, offset8 6 (16 + 32), len8 7, flags 1
        "0500000000000000"  # trans_id
        "00000000 01000000"  # reserved, rangecount 1
        "00180000 00080000"  # byte_count 0x1800, byte_offset 0x800: 0x2000 bytes = 2 pages
        "4523010000000000 4623010000000000"  # pfn_array
        "4142434445464748"  # payload
        "0000000000000000",  # trailer
    ),
    "transfer_page": (
        lambda w: write_transfer_page(w, 0xCAFE, [(100, 0), (60, 4096)], b"\x6b\0\0\0", 7),
        "0700 0500 0600 0000"  # type 7, offset8 5 (16 + 24), len8 6, flags 0
        "0700000000000000"  # trans_id
        "feca 00 00 02000000"  # xfer_pageset_id 0xCAFE, sender_owns_set, reserved, range_cnt 2
        "64000000 00000000"  # range 0: 100 bytes at 0
        "3c000000 00100000"  # range 1: 60 bytes at 4096
        "6b00000000000000"  # payload (nvsp type 107), pad
        "0000000000000000",  # trailer
    ),
    "completion": (
        lambda w: write_completion(w, 0xFFFFFFFFFFFFFFFD, b"\x01\0\0\0\x02\0\0\0"),
        "0b00 0200 0300 0000"  # type 0xB, offset8 2, len8 3, flags 0
        "fdffffffffffffff"  # trans_id echoed (VMBUS_RQST_ID_NO_RESPONSE)
        "0100000002000000"  # payload
        "0000000000000000",  # trailer
    ),
}

GOLDEN_PARSED = {
    "inband": InbandPacket(0x1122334455667788, 1, memoryview(b"\x01\x02\x03" + bytes(5))),
    "gpa_direct": GpaDirectPacket(
        5, 1, [GpaRange(0x1800, 0x800, (0x12345, 0x12346))], memoryview(b"ABCDEFGH")
    ),
    "transfer_page": TransferPagePacket(
        7, 0, TransferPageHeader(0xCAFE, ((100, 0), (60, 4096))), memoryview(b"k" + bytes(7))
    ),
    "completion": CompletionPacket(0xFFFFFFFFFFFFFFFD, 0, memoryview(b"\x01\0\0\0\x02\0\0\0")),
}


@pytest.mark.parametrize("kind", sorted(GOLDEN))
def test_golden_bytes_on_the_ring(ring_impl: ModuleType, kind: str) -> None:
    write, expected = GOLDEN[kind]
    buf, writer, _ = make_ring(ring_impl)
    assert write(writer)
    writer.commit()
    written = U32.unpack_from(buf, 0)[0]
    assert buf[HEADER_SIZE : HEADER_SIZE + written].hex() == bytes.fromhex(expected).hex()


@pytest.mark.parametrize("kind", sorted(GOLDEN))
def test_golden_bytes_parse(kind: str) -> None:
    wire = bytes.fromhex(GOLDEN[kind][1])[:-8]  # without the trailer
    assert parse(packet_from_wire(wire)) == GOLDEN_PARSED[kind]


# Encoding refuses what no correct peer sends.


@pytest.mark.parametrize(
    ("count", "offset", "pfns"),
    [(0, 0, ()), (1, 4096, (1,)), (4096, 1, (1,)), (4096, 0, (1, 2)), (1, 0, (1 << 64,))],
)
def test_gpa_range_rejects_inconsistent_fields(
    count: int, offset: int, pfns: tuple[int, ...]
) -> None:
    with pytest.raises(PacketError):
        GpaRange(count, offset, pfns)


def test_gpa_range_spans_pages_from_its_offset() -> None:
    assert GpaRange(4096, 0, (1,)).pfns == (1,)
    assert GpaRange(4096, 1, [1, 2]).pfns == (1, 2)  # normalised to a tuple


def test_encoders_refuse_empty_or_oversized_packets() -> None:
    with pytest.raises(PacketError, match="without ranges"):
        encode_gpa_direct_header([])
    with pytest.raises(PacketError, match="limit"):
        encode_gpa_direct_header([GpaRange(1, 0, (1,))] * (MAX_GPA_RANGES + 1))
    with pytest.raises(PacketError, match="without ranges"):
        encode_transfer_page_header(1, [])
    with pytest.raises(PacketError, match="limit"):
        encode_transfer_page_header(1, [(1, 0)] * (MAX_TRANSFER_RANGES + 1))
    with pytest.raises(PacketError, match="16 bits"):
        encode_transfer_page_header(0x10000, [(1, 0)])
    with pytest.raises(PacketError, match="32 bits"):
        encode_transfer_page_header(1, [(1 << 32, 0)])


# A hostile peer's headers.


def test_peer_claims_more_ranges_than_header_holds() -> None:
    header = gpa_header(3, (1, 0, [7]), (1, 0, [8]))
    with pytest.raises(PacketError, match="claims 3 GPA ranges"):
        decode_gpa_direct_header(header)


def test_peer_claims_absurd_range_count() -> None:
    with pytest.raises(PacketError, match="limit"):
        decode_gpa_direct_header(gpa_header(0xFFFFFFFF, (1, 0, [7])))


def test_peer_names_pfn_beyond_guest_memory() -> None:
    header = gpa_header(1, (8192, 0, [0x3FF, 0x400]))
    assert decode_gpa_direct_header(header, max_pfn=0x401)[0].pfns == (0x3FF, 0x400)
    with pytest.raises(PacketError, match="PFN 0x400 beyond guest memory"):
        decode_gpa_direct_header(header, max_pfn=0x400)


def test_peer_sets_byte_offset_past_page() -> None:
    with pytest.raises(PacketError, match="byte_offset 4096 is past its page"):
        decode_gpa_direct_header(gpa_header(1, (1, 4096, [7, 8])))


def test_peer_sends_empty_range() -> None:
    with pytest.raises(PacketError, match="empty"):
        decode_gpa_direct_header(gpa_header(1, (0, 0, [7])))


def test_peer_sends_gpa_direct_packet_without_ranges() -> None:
    with pytest.raises(PacketError, match="without ranges"):
        decode_gpa_direct_header(gpa_header(0, (1, 0, [7])))


def test_peer_sends_fewer_pfns_than_byte_count_spans() -> None:
    # 4097 bytes at offset 0 span two pages; the peer lists one PFN.
    with pytest.raises(PacketError, match="needs 2 PFNs"):
        decode_gpa_direct_header(gpa_header(1, (4097, 0, [7])))


def test_peer_sends_more_pfns_than_byte_count_spans() -> None:
    with pytest.raises(PacketError, match="garbage"):
        decode_gpa_direct_header(gpa_header(1, (4096, 0, [7, 8])))


def test_peer_claims_more_pfns_than_packet_limit() -> None:
    # byte_count 0xFFFFFFFF spans a million pages: refused before reading them.
    with pytest.raises(PacketError, match=f"limit of {MAX_GPA_PFNS}"):
        decode_gpa_direct_header(gpa_header(1, (0xFFFFFFFF, 0, [7])))


def test_peer_truncates_gpa_header() -> None:
    with pytest.raises(PacketError, match="shorter than 8"):
        decode_gpa_direct_header(b"\0\0\0\0\x01\0")


def test_transfer_header_carries_sender_owns_set() -> None:
    header = encode_transfer_page_header(0xCAFE, [(1, 2)], sender_owns_set=1)
    # id 0xCAFE, sender_owns_set 1, reserved 0, range_cnt 1; range: 1 byte at 2
    assert header == bytes.fromhex("feca 01 00 01000000 01000000 02000000")
    assert decode_transfer_page_header(header) == TransferPageHeader(0xCAFE, ((1, 2),), 1)


def test_peer_claims_more_transfer_ranges_than_header_holds() -> None:
    header = encode_transfer_page_header(0xCAFE, [(1, 0), (2, 8)])
    forged = header[:4] + U32.pack(3) + header[8:]
    with pytest.raises(PacketError, match="claims 3 transfer ranges"):
        decode_transfer_page_header(forged)


def test_peer_pads_transfer_header_as_linux_allows() -> None:
    # §2.4 only requires offset8*8 >= 24 + 8*range_cnt.
    header = encode_transfer_page_header(0xCAFE, [(1, 0)]) + bytes(16)
    assert decode_transfer_page_header(header).ranges == ((1, 0),)


def test_peer_points_transfer_range_past_receive_buffer() -> None:
    header = encode_transfer_page_header(0xCAFE, [(100, 0), (100, 0xFFFFFFF0)])
    with pytest.raises(PacketError, match="range 1 ends at"):
        decode_transfer_page_header(header, buffer_size=1 << 20)


def test_peer_claims_absurd_transfer_range_count() -> None:
    with pytest.raises(PacketError, match="limit"):
        decode_transfer_page_header(struct.pack("<HBBI", 0xCAFE, 0, 0, 0xFFFFFFFF) + bytes(64))


@pytest.mark.parametrize("kind", [1, 2, 3, 4, 5, 8, 0xA, 0xC, 0xD, 0x42])
def test_peer_sends_unsupported_packet_type(kind: int) -> None:
    data = struct.pack("<HHHHQ", kind, 2, 3, 0, 1) + bytes(8)
    with pytest.raises(PacketError, match="unsupported packet type"):
        parse(Packet(kind, 0, 1, 2, memoryview(data)))


def test_peer_sends_inband_packet_with_a_header() -> None:
    # Linux skips to offset8 regardless of type; so do we.
    data = struct.pack("<HHHHQ", 6, 3, 4, 0, 9) + bytes(8) + b"payload!"
    parsed = parse(Packet(6, 0, 9, 3, memoryview(data)))
    assert isinstance(parsed, InbandPacket)
    assert bytes(parsed.payload) == b"payload!"


def only_packet_errors(decode: Any, *args: Any, **kwargs: Any) -> Any:
    """The decoded value, or None if the decoder raised PacketError."""
    try:
        return decode(*args, **kwargs)
    except PacketError:
        return None


@settings(max_examples=300)
@given(data=st.binary(max_size=200), max_pfn=st.none() | st.integers(0, 1 << 40))
def test_gpa_decoder_survives_arbitrary_bytes(data: bytes, max_pfn: int | None) -> None:
    only_packet_errors(decode_gpa_direct_header, data, max_pfn)


@settings(max_examples=300)
@given(data=st.binary(max_size=200), buffer_size=st.none() | st.integers(0, 1 << 33))
def test_transfer_decoder_survives_arbitrary_bytes(data: bytes, buffer_size: int | None) -> None:
    only_packet_errors(decode_transfer_page_header, data, buffer_size)


@settings(max_examples=200)
@given(ranges=gpa_ranges(), pos=st.integers(0), value=st.integers(0, 255))
def test_gpa_decoder_survives_a_corrupted_valid_header(
    ranges: list[GpaRange], pos: int, value: int
) -> None:
    header = bytearray(encode_gpa_direct_header(ranges))
    header[pos % len(header)] = value
    decoded = only_packet_errors(decode_gpa_direct_header, header, 1 << 63)
    if decoded is not None:  # what we accept, we read exactly (reserved aside)
        assert encode_gpa_direct_header(decoded)[4:] == header[4:]


@settings(max_examples=200)
@given(ranges=transfer_page_ranges(), pos=st.integers(0), value=st.integers(0, 255))
def test_transfer_decoder_survives_a_corrupted_valid_header(
    ranges: list[tuple[int, int]], pos: int, value: int
) -> None:
    header = bytearray(encode_transfer_page_header(1, ranges))
    header[pos % len(header)] = value
    decoded = only_packet_errors(decode_transfer_page_header, header, 1 << 32)
    if decoded is not None:  # what we accept, we read exactly (reserved and padding aside)
        again = encode_transfer_page_header(
            decoded.xfer_pageset_id, decoded.ranges, decoded.sender_owns_set
        )
        assert again[:3] + again[4:] == header[:3] + header[4 : len(again)]


@settings(max_examples=300)
@given(
    kind=st.integers(0, 0xFFFF),
    flags=st.integers(0, 0xFFFF),
    header=st.binary(max_size=120).map(padded),
    payload=st.binary(max_size=32).map(padded),
)
def test_parse_survives_arbitrary_packets(
    kind: int, flags: int, header: bytes, payload: bytes
) -> None:
    offset8 = 2 + len(header) // 8
    len8 = offset8 + len(payload) // 8
    data = struct.pack("<HHHHQ", kind, offset8, len8, flags, 1) + header + payload
    packet = Packet(kind, flags, 1, offset8, memoryview(data))
    only_packet_errors(parse, packet, max_pfn=1 << 30, buffer_size=1 << 30)
