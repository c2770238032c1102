"""VMBus channel messages: golden bytes, round trips, hostile input, GPADLs.

Golden vectors are written by hand from the offset tables of
docs/protocol.md §3.3 (not produced by the code under test).
"""

from __future__ import annotations

import uuid

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from vmbus import guid
from vmbus.messages import (
    GPADL_BODY_MAX_PFNS,
    GPADL_HEADER_MAX_PFNS,
    GPADL_MAX_PFNS,
    GUEST_VERSION_ORDER,
    HOST_SUPPORTED_VERSIONS,
    MAX_MESSAGE_PAYLOAD,
    MAX_PENDING_GPADLS,
    AllOffersDelivered,
    CloseChannel,
    Gpadl,
    GpadlAssembler,
    GpadlBody,
    GpadlCreated,
    GpadlError,
    GpadlHeader,
    GpadlTeardown,
    GpadlTorndown,
    InitiateContact,
    Message,
    MessageError,
    MessageType,
    ModifyChannel,
    ModifyChannelResponse,
    OfferChannel,
    OfferFlags,
    OpenChannel,
    OpenChannelResult,
    RelidReleased,
    RequestOffers,
    RescindChannelOffer,
    UnknownMessageError,
    Unload,
    UnloadResponse,
    VersionResponse,
    VmbusVersion,
    decode,
    encode,
    format_version,
    gpadl_messages,
    initiate_contact_connection_id,
)
from vmbus.testing.strategies import wire_values
from vmbus.wire import WireError

INSTANCE = uuid.UUID("12345678-9abc-def0-1122-334455667788")
GPADL = 0xE1E10  # Linux's first GPADL handle
RELID = 15

# --- Golden vectors: (message, hex). Header = msgtype u32 @0, padding u32 @4. ---

GOLDEN: list[tuple[Message, str]] = [
    (
        OfferChannel(
            if_type=guid.SCSI,
            if_instance=INSTANCE,
            reserved1=0x11,
            chn_flags=0x0405,
            mmio_megabytes=8,
            user_def=b"\x01\x02\x03",
            sub_channel_index=1,
            child_relid=RELID,
            monitorid=3,
            monitor_flags=1,
            interrupt_flags=1,
            connection_id=0x2001,
        ),
        "01000000 00000000"  # @0 msgtype 1, padding
        "d96361baa104294db60572e2ffb1dc7f"  # @8 if_type: SCSI, bytes_le
        "78563412bc9af0de1122334455667788"  # @24 if_instance
        "1100000000000000"  # @40 reserved1 u64
        "0000000000000000"  # @48 reserved2 u64
        "0504"  # @56 chn_flags 0x0405
        "0800"  # @58 mmio_megabytes 8
        "010203"
        + "00"
        * 117  # @60 user_def[120]
        + "0100"  # @180 sub_channel_index 1
        "0000"  # @182 reserved3
        "0f000000"  # @184 child_relid 15
        "03"  # @188 monitorid 3
        "01"  # @189 monitor_allocated
        "0100"  # @190 is_dedicated_interrupt
        "01200000",  # @192 connection_id 0x2001
    ),
    (
        RescindChannelOffer(child_relid=RELID),
        "02000000 00000000 0f000000",  # child_relid @8
    ),
    (RequestOffers(), "03000000 00000000"),
    (AllOffersDelivered(), "04000000 00000000"),
    (
        OpenChannel(
            child_relid=RELID,
            openid=RELID,
            ringbuffer_gpadlhandle=GPADL,
            target_vp=2,
            downstream_ringbuffer_pageoffset=65,
        ),
        "05000000 00000000"
        "0f000000"  # @8 child_relid
        "0f000000"  # @12 openid
        "101e0e00"  # @16 ringbuffer_gpadlhandle 0xe1e10
        "02000000"  # @20 target_vp
        "41000000" + "00" * 120,  # @24 downstream page offset 65; @28 userdata[120]
    ),
    (
        OpenChannelResult(child_relid=RELID, openid=RELID, status=0xC0000001),
        "06000000 00000000 0f000000 0f000000 010000c0",  # relid @8, openid @12, status @16
    ),
    (CloseChannel(child_relid=RELID), "07000000 00000000 0f000000"),
    (
        GpadlHeader(
            child_relid=RELID,
            gpadl=GPADL,
            range_buflen=24,
            rangecount=1,
            byte_count=8192,
            pfns=(0x12345, 0x12346),
        ),
        "08000000 00000000"
        "0f000000"  # @8 child_relid
        "101e0e00"  # @12 gpadl
        "1800"  # @16 range_buflen 24 = 8 + 8 x 2
        "0100"  # @18 rangecount 1
        "00200000"  # @20 range[0].byte_count 8192
        "00000000"  # @24 range[0].byte_offset
        "4523010000000000 4623010000000000",  # @28 pfn_array
    ),
    (
        GpadlBody(msgnumber=1, gpadl=GPADL, pfns=(0xABCDEF012,)),
        "09000000 00000000 01000000 101e0e00"  # msgnumber @8, gpadl @12
        "12f0debc0a000000",  # @16 pfn
    ),
    (
        GpadlCreated(child_relid=RELID, gpadl=GPADL, creation_status=0),
        "0a000000 00000000 0f000000 101e0e00 00000000",  # relid, gpadl, status
    ),
    (GpadlTeardown(child_relid=RELID, gpadl=GPADL), "0b000000 00000000 0f000000 101e0e00"),
    (GpadlTorndown(gpadl=GPADL), "0c000000 00000000 101e0e00"),
    (RelidReleased(child_relid=RELID), "0d000000 00000000 0f000000"),
    (
        InitiateContact.for_version(
            VmbusVersion.WIN10,
            interrupt_page=0x1_2345_6000,
            monitor_page1=0x1_2346_0000,
            monitor_page2=0x1_2347_0000,
        ),
        "0e000000 00000000"
        "00000400"  # @8 version 4.0
        "00000000"  # @12 target_vcpu
        "0060452301000000"  # @16 interrupt_page GPA (< 5.0)
        "0000462301000000"  # @24 monitor_page1
        "0000472301000000",  # @32 monitor_page2
    ),
    (
        InitiateContact.for_version(
            VmbusVersion.WIN10_V5_3,
            target_vcpu=1,
            monitor_page1=0x1_2346_0000,
            monitor_page2=0x1_2347_0000,
        ),
        "0e000000 00000000"
        "03000500"  # @8 version 5.3
        "01000000"  # @12 target_vcpu 1
        "02 00 000000000000"  # @16 msg_sint 2, @17 msg_vtl 0, @18 reserved (>= 5.0)
        "0000462301000000"  # @24 monitor_page1
        "0000472301000000",  # @32 monitor_page2
    ),
    (
        VersionResponse(version_supported=1, connection_state=0, msg_conn_id=4),
        "0f000000 00000000 01 00 0000 04000000",  # supported @8, state @9, pad @10, conn id @12
    ),
    (Unload(), "10000000 00000000"),
    (UnloadResponse(), "11000000 00000000"),
    (ModifyChannel(child_relid=RELID, target_vp=3), "16000000 00000000 0f000000 03000000"),
    (
        ModifyChannelResponse(child_relid=RELID, status=1),
        "18000000 00000000 0f000000 01000000",  # relid @8, status @12
    ),
]

GOLDEN_IDS = [type(message).__name__ for message, _ in GOLDEN]


@pytest.mark.parametrize(("message", "wire"), GOLDEN, ids=GOLDEN_IDS)
def test_golden_encode(message: Message, wire: str) -> None:
    assert encode(message) == bytes.fromhex(wire)


@pytest.mark.parametrize(("message", "wire"), GOLDEN, ids=GOLDEN_IDS)
def test_golden_decode(message: Message, wire: str) -> None:
    assert decode(bytes.fromhex(wire)) == message


def test_golden_covers_every_message_class() -> None:
    golden_types = {type(message) for message, _ in GOLDEN}
    assert golden_types == set(MESSAGE_CLASSES)


def test_struct_sizes() -> None:
    sizes = {cls: cls.SIZE for cls in MESSAGE_CLASSES}
    assert sizes[OfferChannel] == 196
    assert sizes[OpenChannel] == 148
    assert sizes[InitiateContact] == 40
    assert sizes[VersionResponse] == 16
    assert sizes[GpadlHeader] == 28  # header + child_relid, gpadl, buflen, count + gpa_range
    assert sizes[GpadlBody] == 16
    assert sizes[GpadlCreated] == sizes[OpenChannelResult] == 20
    assert {sizes[c] for c in (RequestOffers, AllOffersDelivered, Unload, UnloadResponse)} == {8}


def test_gpadl_pfn_limits_fill_one_message() -> None:
    assert GpadlHeader.SIZE + 8 * GPADL_HEADER_MAX_PFNS == 236  # 4 bytes spare
    assert GpadlHeader.SIZE + 8 * (GPADL_HEADER_MAX_PFNS + 1) > MAX_MESSAGE_PAYLOAD
    assert GpadlBody.SIZE + 8 * GPADL_BODY_MAX_PFNS == MAX_MESSAGE_PAYLOAD
    assert GPADL_MAX_PFNS == 8190  # largest range_buflen 8 + 8n that fits a u16


def test_decoded_types_are_named() -> None:
    message = decode(bytes.fromhex("0d000000 00000000 0f000000"))
    assert isinstance(message, RelidReleased)
    assert message.msgtype is MessageType.RELID_RELEASED


def test_decode_accepts_any_bytes_like() -> None:
    wire = bytes.fromhex("07000000 00000000 0f000000")
    assert decode(bytearray(wire)) == decode(memoryview(wire)) == CloseChannel(child_relid=RELID)


def test_initiate_contact_union_reads_by_version() -> None:
    new = InitiateContact.for_version(VmbusVersion.WIN10_V5, msg_sint=2, msg_vtl=1)
    assert (new.msg_sint, new.msg_vtl, new.interrupt_page) == (2, 1, 0x0102)
    old = InitiateContact.for_version(VmbusVersion.WIN8_1, interrupt_page=0x5000, msg_sint=7)
    assert old.interrupt_page == 0x5000


def test_offer_flag_and_bit_accessors() -> None:
    offer = OfferChannel(chn_flags=0x8004, monitor_flags=0xFE, interrupt_flags=0x1)
    assert OfferFlags.SERVER_SUPPORTS_GPADLS in offer.offer_flags
    assert int(offer.offer_flags) == 0x8004  # open: the unknown bit survives
    assert not offer.monitor_allocated  # only bit 0 counts
    assert offer.is_dedicated_interrupt


def test_versions() -> None:
    assert [format_version(v) for v in GUEST_VERSION_ORDER] == [
        "5.3", "5.2", "5.1", "5.0", "4.1", "4.0", "3.0", "2.4",
    ]  # fmt: skip
    assert min(HOST_SUPPORTED_VERSIONS) == 0x00020004
    assert max(HOST_SUPPORTED_VERSIONS) == 0x00050003
    assert format_version(0x00070002) == "7.2"
    assert initiate_contact_connection_id(VmbusVersion.WIN10_V4_1) == 1
    assert initiate_contact_connection_id(VmbusVersion.WIN10_V5) == 4


def test_message_type_values() -> None:
    assert MessageType.OFFERCHANNEL == 1
    assert MessageType.INITIATE_CONTACT == 14
    assert MessageType.MODIFYCHANNEL == 22
    assert MessageType.MODIFYCHANNEL_RESPONSE == 24


# --- Device class GUIDs ---


@pytest.mark.parametrize(
    ("class_guid", "wire"),
    [
        (guid.SCSI, "d9 63 61 ba a1 04 29 4d b6 05 72 e2 ff b1 dc 7f"),
        (guid.IDE, "32 26 41 32 cb 86 a2 44 9b 5c 50 d1 41 73 54 f5"),
        (guid.NETWORK, "63 51 61 f8 3e df c5 46 91 3f f2 d2 f9 65 ed 0e"),
        (guid.KEYBOARD, "6d ad 12 f9 17 2b ea 48 bd 65 f9 27 a6 1c 76 84"),
        (guid.MOUSE, "9e b6 a8 cf 4a 5b c0 4c b9 8b 8b a1 a1 f3 f9 5a"),
        (guid.SYNTHVID, "02 78 0a da 77 e3 ac 4a 8e 77 05 58 eb 10 73 f8"),
    ],
)
def test_class_guid_wire_bytes(class_guid: uuid.UUID, wire: str) -> None:
    assert guid.guid_to_wire(class_guid) == bytes.fromhex(wire)
    assert guid.guid_from_wire(bytes.fromhex(wire)) == class_guid


def test_class_names() -> None:
    assert guid.class_name(guid.NETWORK) == "network"
    assert guid.class_name(INSTANCE) == str(INSTANCE)
    assert len(guid.CLASS_NAMES) == 21
    with pytest.raises(ValueError, match="16 bytes"):
        guid.guid_from_wire(b"\x00" * 15)


# --- Hypothesis: round trips ---

MESSAGE_CLASSES: list[type[Message]] = [
    OfferChannel,
    RescindChannelOffer,
    RequestOffers,
    AllOffersDelivered,
    OpenChannel,
    OpenChannelResult,
    CloseChannel,
    GpadlHeader,
    GpadlBody,
    GpadlCreated,
    GpadlTeardown,
    GpadlTorndown,
    RelidReleased,
    InitiateContact,
    VersionResponse,
    Unload,
    UnloadResponse,
    ModifyChannel,
    ModifyChannelResponse,
]
FIXED_CLASSES = [cls for cls in MESSAGE_CLASSES if cls not in (GpadlHeader, GpadlBody)]
U64_MAX = 2**64 - 1


@st.composite
def gpadl_header(draw: st.DrawFn) -> GpadlHeader:
    here = draw(st.integers(0, GPADL_HEADER_MAX_PFNS))
    total = draw(st.integers(max(here, 1), GPADL_MAX_PFNS))
    byte_offset = draw(st.integers(0, 4095))
    byte_count = draw(
        st.integers(max(1, (total - 1) * 4096 - byte_offset + 1), total * 4096 - byte_offset)
    )
    return GpadlHeader(
        padding=draw(st.integers(0, 0xFFFF_FFFF)),
        child_relid=draw(st.integers(0, 0xFFFF_FFFF)),
        gpadl=draw(st.integers(0, 0xFFFF_FFFF)),
        range_buflen=8 + 8 * total,
        byte_count=byte_count,
        byte_offset=byte_offset,
        pfns=tuple(draw(st.lists(st.integers(0, U64_MAX), min_size=here, max_size=here))),
    )


gpadl_body = st.builds(
    GpadlBody,
    padding=st.integers(0, 0xFFFF_FFFF),
    msgnumber=st.integers(0, 0xFFFF_FFFF),
    gpadl=st.integers(0, 0xFFFF_FFFF),
    pfns=st.lists(st.integers(0, U64_MAX), max_size=GPADL_BODY_MAX_PFNS).map(tuple),
)

# skip=1: msgtype stays the class's own
any_message = st.one_of(
    [wire_values(cls, skip=1) for cls in FIXED_CLASSES] + [gpadl_header(), gpadl_body]
)


@given(any_message)
def test_every_message_round_trips(message: Message) -> None:
    wire = encode(message)
    assert len(wire) <= MAX_MESSAGE_PAYLOAD
    assert int.from_bytes(wire[:4], "little") == message.TYPE
    assert decode(wire) == message
    assert encode(decode(wire)) == wire


def test_round_trip_strategies_cover_every_message_class() -> None:
    assert len(FIXED_CLASSES) + 2 == len(MESSAGE_CLASSES) == 19


# --- Hypothesis: hostile bytes ---

known_type_then_junk = st.builds(
    lambda msgtype, rest: msgtype.to_bytes(4, "little") + rest,
    st.integers(0, 30),
    st.binary(max_size=MAX_MESSAGE_PAYLOAD),
)


@st.composite
def mangled_gpadl_header(draw: st.DrawFn) -> bytes:
    """A GPADL_HEADER with every range field chosen by the adversary."""
    fixed = bytes.fromhex("08000000 00000000 0f000000 101e0e00")
    ranges = [draw(st.integers(0, 0xFFFF)) for _ in range(2)]
    ranges += [draw(st.integers(0, 0xFFFF_FFFF)) for _ in range(2)]
    tail = draw(st.binary(max_size=MAX_MESSAGE_PAYLOAD - 20))
    return (
        fixed
        + b"".join(v.to_bytes(n, "little") for v, n in zip(ranges, (2, 2, 4, 4), strict=True))
        + tail
    )


@given(st.one_of(st.binary(max_size=300), known_type_then_junk, mangled_gpadl_header()))
@example(b"")
@example(bytes(241))
def test_arbitrary_bytes_decode_or_raise_message_error(data: bytes) -> None:
    try:
        message = decode(data)
    except MessageError:
        return
    wire = encode(message)
    # Bytes past a fixed struct are ignored; a message with PFNs is its bytes.
    assert wire == (data if isinstance(message, GpadlHeader | GpadlBody) else data[: len(wire)])


# --- GPADL splitting and reassembly ---


def split_and_assemble(pages: int, byte_offset: int = 0) -> tuple[list[bytes], Gpadl | None]:
    pfns = [0x10_0000 + 3 * i for i in range(pages)]
    byte_count = pages * 4096 - byte_offset
    wires = [encode(m) for m in gpadl_messages(RELID, GPADL, byte_count, pfns, byte_offset)]
    assembler = GpadlAssembler()
    results = []
    for wire in wires:
        message = decode(wire)
        assert isinstance(message, GpadlHeader | GpadlBody)
        results.append(assembler.feed(message))
    assert results[:-1] == [None] * (len(wires) - 1)
    assert assembler.pending == frozenset()
    return wires, results[-1]


@given(st.integers(1, 600), st.integers(0, 4095))
@example(26, 0)
@example(27, 0)
@example(54, 0)
@example(55, 0)
@example(1, 4095)
def test_gpadl_split_and_assemble(pages: int, byte_offset: int) -> None:
    wires, gpadl = split_and_assemble(pages, byte_offset)
    assert all(len(wire) <= MAX_MESSAGE_PAYLOAD for wire in wires)
    assert gpadl == Gpadl(
        RELID,
        GPADL,
        pages * 4096 - byte_offset,
        byte_offset,
        tuple(0x10_0000 + 3 * i for i in range(pages)),
    )


@pytest.mark.parametrize(
    ("pages", "lengths"),
    [
        (1, [36]),
        (26, [236]),
        (27, [236, 24]),
        (54, [236, 240]),
        (55, [236, 240, 24]),
    ],
)
def test_gpadl_split_boundaries(pages: int, lengths: list[int]) -> None:
    wires, gpadl = split_and_assemble(pages)
    assert [len(wire) for wire in wires] == lengths
    assert gpadl is not None and len(gpadl.pfns) == pages


def test_gpadl_header_carries_total_range_buflen() -> None:
    header, *bodies = gpadl_messages(RELID, GPADL, 60 * 4096, range(60))
    assert isinstance(header, GpadlHeader)
    assert (header.range_buflen, header.rangecount, header.total_pfns) == (8 + 8 * 60, 1, 60)
    assert [len(body.pfns) for body in bodies] == [28, 6]
    assert all(isinstance(b, GpadlBody) and b.gpadl == GPADL for b in bodies)


def test_guest_interleaves_two_gpadls() -> None:
    first = gpadl_messages(1, 0x100, 40 * 4096, range(40))
    second = gpadl_messages(2, 0x200, 30 * 4096, range(1000, 1030))
    assembler = GpadlAssembler()
    assert assembler.feed(first[0]) is None
    assert assembler.feed(second[0]) is None
    assert assembler.pending == {0x100, 0x200}
    done_second = assembler.feed(second[1])
    done_first = assembler.feed(first[1])
    assert done_second is not None and done_second.pfns == tuple(range(1000, 1030))
    assert done_first is not None and done_first.child_relid == 1
    assert done_first.pfns == tuple(range(40))


def test_local_gpadl_misuse_is_value_error_not_message_error() -> None:
    with pytest.raises(ValueError, match="span 2 pages, not 1") as info:
        gpadl_messages(RELID, GPADL, 4097, [1])
    assert not isinstance(info.value, MessageError)
    with pytest.raises(ValueError, match="outside 1..8190"):
        gpadl_messages(RELID, GPADL, 8191 * 4096, range(8191))
    with pytest.raises(ValueError, match="over 240"):
        encode(GpadlHeader(range_buflen=8 + 8 * 27, byte_count=27 * 4096, pfns=tuple(range(27))))


def test_local_field_misuse() -> None:
    with pytest.raises(ValueError, match="msgtype"):
        CloseChannel(msgtype=MessageType.OPENCHANNEL)
    with pytest.raises(ValueError, match="120 bytes, got 121"):
        OpenChannel(userdata=bytes(121))
    with pytest.raises(WireError):
        encode(CloseChannel(child_relid=2**32))
    with pytest.raises(WireError):
        encode(GpadlBody(pfns=(-1,)))
    assert OpenChannel(userdata=bytes(24)).userdata == bytes(120)  # storvsc's 24 bytes


# --- Negative tests, named after the peer's misbehaviour ---


def test_guest_sends_oversized_message() -> None:
    body = GpadlBody(gpadl=GPADL, pfns=tuple(range(28))).pack() + bytes(8)  # 29 PFNs
    with pytest.raises(MessageError, match="248 bytes, over 240"):
        decode(body)


def test_peer_sends_less_than_a_header() -> None:
    with pytest.raises(MessageError, match="shorter than its header"):
        decode(bytes.fromhex("01000000 000000"))


def test_host_sends_truncated_offer() -> None:
    wire = encode(OfferChannel(child_relid=RELID))[:195]
    with pytest.raises(MessageError, match="OFFERCHANNEL of 195 bytes, needs 196"):
        decode(wire)


@pytest.mark.parametrize("msgtype", [0, 18, 21, 23, 25, 99, 0xFFFF_FFFF])
def test_peer_sends_unknown_message_type(msgtype: int) -> None:
    with pytest.raises(UnknownMessageError) as info:
        decode(msgtype.to_bytes(4, "little") + bytes(60))
    assert info.value.msgtype == msgtype
    assert isinstance(info.value, MessageError)


def test_guest_appends_newer_fields_to_open_channel() -> None:
    wire = encode(OpenChannel(child_relid=RELID)) + bytes.fromhex("01000000 0200 0100")
    message = decode(wire)  # a 6.0-style ConnectionId/EventFlag/Flags tail is ignored
    assert message == OpenChannel(child_relid=RELID)
    assert encode(message) == wire[:148]


def gpadl_header_wire(
    range_buflen: int, rangecount: int, byte_count: int, pfns: int, byte_offset: int = 0
) -> bytes:
    return (
        bytes.fromhex("08000000 00000000 0f000000 101e0e00")
        + range_buflen.to_bytes(2, "little")
        + rangecount.to_bytes(2, "little")
        + byte_count.to_bytes(4, "little")
        + byte_offset.to_bytes(4, "little")
        + bytes(8 * pfns)
    )


def test_guest_claims_more_pfns_than_range_buflen() -> None:
    with pytest.raises(GpadlError, match="3 PFNs, more than range_buflen's 2") as info:
        decode(gpadl_header_wire(8 + 16, 1, 8192, pfns=3))
    assert (info.value.gpadl, info.value.child_relid) == (GPADL, RELID)


def test_guest_sends_more_gpadl_bodies_than_range_buflen() -> None:
    header, body = gpadl_messages(RELID, GPADL, 30 * 4096, range(30))
    assembler = GpadlAssembler()
    assembler.feed(header)
    extra = GpadlBody(gpadl=GPADL, pfns=(*range(4), 99))
    with pytest.raises(GpadlError, match="brings 31 PFNs, more than range_buflen's 30"):
        assembler.feed(extra)
    assert assembler.pending == frozenset()  # forgotten: the host answers with a failure


def test_guest_sends_gpadl_header_with_partial_pfn() -> None:
    with pytest.raises(MessageError, match="12 bytes after it are not whole u64 PFNs"):
        decode(gpadl_header_wire(8 + 16, 1, 8192, pfns=1) + bytes(4))


def test_guest_sends_gpadl_header_with_two_ranges() -> None:
    with pytest.raises(GpadlError, match="rangecount 2"):
        decode(gpadl_header_wire(8 + 16, 2, 8192, pfns=2))


@pytest.mark.parametrize("range_buflen", [0, 7, 8, 8 + 12])
def test_guest_sends_range_buflen_that_is_not_whole_pages(range_buflen: int) -> None:
    with pytest.raises(GpadlError, match="range_buflen|0 pages"):
        decode(gpadl_header_wire(range_buflen, 1, 4096, pfns=0))


def test_guest_sends_byte_count_beyond_its_pages() -> None:
    with pytest.raises(GpadlError, match="8193 bytes at offset 0 span 3 pages, not 2"):
        decode(gpadl_header_wire(8 + 16, 1, 8193, pfns=2))


def test_guest_sends_byte_offset_outside_first_page() -> None:
    with pytest.raises(GpadlError, match="byte_offset 4096"):
        decode(gpadl_header_wire(8 + 8, 1, 1, pfns=1, byte_offset=4096))


def test_guest_sends_empty_gpadl() -> None:
    with pytest.raises(GpadlError, match="byte_count is 0"):
        decode(gpadl_header_wire(8 + 8, 1, 0, pfns=1))


def test_guest_sends_gpadl_body_before_header() -> None:
    header, body = gpadl_messages(RELID, GPADL, 30 * 4096, range(30))
    assembler = GpadlAssembler()
    with pytest.raises(GpadlError, match="GPADL_BODY without a GPADL_HEADER") as info:
        assembler.feed(body)
    assert info.value.child_relid is None
    assert assembler.feed(header) is None  # the body is not kept
    assert assembler.pending == {GPADL}


def test_guest_sends_gpadl_body_after_gpadl_completed() -> None:
    (header,) = gpadl_messages(RELID, GPADL, 4096, [7])
    assembler = GpadlAssembler()
    assert assembler.feed(header) == Gpadl(RELID, GPADL, 4096, 0, (7,))
    with pytest.raises(GpadlError, match="without a GPADL_HEADER"):
        assembler.feed(GpadlBody(gpadl=GPADL, pfns=(8,)))


def test_guest_sends_empty_gpadl_body() -> None:
    header, _ = gpadl_messages(RELID, GPADL, 30 * 4096, range(30))
    assembler = GpadlAssembler()
    assembler.feed(header)
    empty = decode(bytes.fromhex("09000000 00000000 00000000 101e0e00"))
    assert isinstance(empty, GpadlBody)
    with pytest.raises(GpadlError, match="without PFNs"):
        assembler.feed(empty)
    assert assembler.pending == frozenset()


def test_guest_reuses_gpadl_handle_while_assembling() -> None:
    header, body = gpadl_messages(RELID, GPADL, 30 * 4096, range(30))
    assembler = GpadlAssembler()
    assembler.feed(header)
    with pytest.raises(GpadlError, match="second GPADL_HEADER"):
        assembler.feed(header)
    with pytest.raises(GpadlError, match="without a GPADL_HEADER"):
        assembler.feed(body)  # both were dropped


def test_guest_starts_too_many_gpadls_at_once() -> None:
    assembler = GpadlAssembler()
    for handle in range(MAX_PENDING_GPADLS):
        header = gpadl_messages(RELID, handle, 30 * 4096, range(30))[0]
        assert assembler.feed(header) is None
    header = gpadl_messages(RELID, 0xFFFF, 30 * 4096, range(30))[0]
    with pytest.raises(GpadlError, match=f"more than {MAX_PENDING_GPADLS} GPADLs"):
        assembler.feed(header)
    assert len(assembler.pending) == MAX_PENDING_GPADLS


def test_channel_closes_with_gpadls_unfinished() -> None:
    assembler = GpadlAssembler()
    assembler.feed(gpadl_messages(1, 0x100, 30 * 4096, range(30))[0])
    assembler.feed(gpadl_messages(2, 0x200, 30 * 4096, range(30))[0])
    assembler.discard_channel(1)
    assert assembler.pending == {0x200}
    assembler.discard(0x200)
    assert assembler.pending == frozenset()
