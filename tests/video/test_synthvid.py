"""Synthetic video: golden bytes, round trips, the VSP against the VSC
in-process, and a hostile guest.

Golden vectors are written by hand from the tables of docs/protocol.md §8
(not produced by the code under test).
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmbus.memory import PAGE_SIZE
from vmbus.protocols import video as sv
from vmbus.protocols.video import (
    SYNTHVID_VERSION_WIN7,
    SYNTHVID_VERSION_WIN8,
    SYNTHVID_VERSION_WIN10,
    Dirty,
    ModeSet,
    PointerPosition,
    PointerShape,
    SynthvidClient,
    SynthvidProtocolError,
    SynthvidServer,
    VramLocation,
)
from vmbus.testing.strategies import from_hex as h
from vmbus.testing.strategies import wire_values as any_struct
from vmbus.wire import WireError, WireStruct

VRAM = 8 << 20  # the WIN8 framebuffer size
GPA = 0xF800_0000  # where Linux's VRAM typically sits (MMIO below 4 GiB)


def any_ram(gpa: int, size: int) -> bool:
    return gpa + size <= 1 << 40


def message(msg_type: int, body: bytes) -> bytes:
    """A guest message framed by hand: both sizes count the synthvid header."""
    return struct.pack("<IIII", 1, 8 + len(body), msg_type, 8 + len(body)) + body


def situation(width: int, height: int, pitch: int, *, depth: int = 32, offset: int = 0) -> bytes:
    output = struct.pack("<BIBIII", 1, offset, depth, width, height, pitch)
    return message(5, struct.pack("<QB", 0, 1) + output)


def dirt(*rects: tuple[int, int, int, int], count: int | None = None) -> bytes:
    body = struct.pack("<BB", 0, len(rects) if count is None else count)
    return message(10, body + b"".join(struct.pack("<4i", *r) for r in rects))


def run(server: SynthvidServer, client: SynthvidClient, first: bytes) -> list[Any]:
    """Deliver `first` and everything the two sides answer; the server's events."""
    events: list[Any] = []
    pending = [first]
    while pending:
        replies, new = server.receive(pending.pop(0), vram_ok=any_ram)
        events += new
        for reply in replies:
            pending += client.receive(reply)
    return events


def ready(width: int = 1024, height: int = 768) -> tuple[SynthvidServer, SynthvidClient]:
    """A server and client through Linux's whole sequence, mode set."""
    server, client = SynthvidServer(VRAM), SynthvidClient()
    run(server, client, client.start())
    run(server, client, client.vram_location(GPA))
    for m in client.hide_pointer():
        run(server, client, m)
    run(server, client, client.situation_update(width, height))
    assert server.mode is not None and client.vram_acked
    return server, client


# --- Golden bytes -------------------------------------------------------------

VERSION_REQUEST_WIN10 = h(
    """
    01000000   # pipe type PIPE_MSG_DATA
    0c000000   # pipe size 12, the same as the synthvid size
    01000000   # synthvid type VERSION_REQUEST
    0c000000   # synthvid size: 8 (header) + 4
    03000500   # version 3.5: major 3 in the low half, minor 5 in the high
    """
)


def test_version_encoding() -> None:
    assert SYNTHVID_VERSION_WIN7 == 0x0000_0003
    assert SYNTHVID_VERSION_WIN8 == 0x0002_0003
    assert SYNTHVID_VERSION_WIN10 == 0x0005_0003
    assert sv.version_tuple(SYNTHVID_VERSION_WIN10) == (3, 5)


def test_golden_version_exchange() -> None:
    server, client = SynthvidServer(VRAM), SynthvidClient()
    assert client.start() == VERSION_REQUEST_WIN10
    replies, events = server.receive(VERSION_REQUEST_WIN10, vram_ok=any_ram)
    assert replies == [
        h(
            """
            01000000   # pipe type PIPE_MSG_DATA
            0e000000   # pipe size 14
            02000000   # synthvid type VERSION_RESPONSE
            0e000000   # synthvid size 8 + 6
            03000500   # version WIN10, echoed
            01         # is_accepted
            01         # max_video_outputs
            """
        )
    ]
    assert events == [] and server.version == SYNTHVID_VERSION_WIN10
    win7 = message(1, bytes.fromhex("03000000"))
    refused = server.receive(win7, vram_ok=any_ram)[0][0]
    assert refused[16:] == h("03000000  # WIN7\n 00  # refused\n 01") and server.version is None


def test_golden_vram_location_and_ack() -> None:
    server, client = SynthvidServer(VRAM), SynthvidClient()
    run(server, client, client.start())
    request = client.vram_location(GPA)
    assert request == h(
        """
        01000000           # pipe type PIPE_MSG_DATA
        19000000           # pipe size 25
        03000000           # synthvid type VRAM_LOCATION
        19000000           # synthvid size 8 + 17
        000000f800000000   # user_ctx = the GPA, as Linux sends it
        01                 # is_vram_gpa_specified
        000000f800000000   # vram_gpa
        """
    )
    replies, events = server.receive(request, vram_ok=any_ram)
    assert replies == [
        h(
            """
            01000000           # pipe type PIPE_MSG_DATA
            10000000           # pipe size 16
            04000000           # synthvid type VRAM_LOCATION_ACK
            10000000           # synthvid size 8 + 8
            000000f800000000   # user_ctx, echoed
            """
        )
    ]
    assert events == [VramLocation(GPA)]
    assert client.receive(replies[0]) == [] and client.vram_acked


def test_golden_situation_update() -> None:
    server, client = SynthvidServer(VRAM), SynthvidClient()
    run(server, client, client.start())
    update = client.situation_update(1024, 768)
    assert update == h(
        """
        01000000           # pipe type PIPE_MSG_DATA
        23000000           # pipe size 35
        05000000           # synthvid type SITUATION_UPDATE
        23000000           # synthvid size 8 + 27
        0000000000000000   # user_ctx 0
        01                 # video_output_count
        01                 # active
        00000000           # vram_offset 0
        20                 # depth_bits 32
        00040000           # width_pixels 1024
        00030000           # height_pixels 768
        00100000           # pitch_bytes 4096
        """
    )
    replies, events = server.receive(update, vram_ok=any_ram)
    assert replies == [
        h("01000000 10000000 06000000 10000000  # SITUATION_UPDATE_ACK\n" + "00" * 8)
    ]
    assert events == [ModeSet(1024, 768, 32, 4096, 0, active=True)]


def test_golden_dirt() -> None:
    server, client = ready()
    wire = client.dirt((10, 20, 30, 40))
    assert wire == h(
        """
        01000000   # pipe type PIPE_MSG_DATA
        1a000000   # pipe size 26
        0a000000   # synthvid type DIRT
        1a000000   # synthvid size 8 + 18
        00         # video_output 0
        01         # dirt_count
        0a000000   # x1 10
        14000000   # y1 20
        1e000000   # x2 30 (exclusive)
        28000000   # y2 40 (exclusive)
        """
    )
    assert server.receive(wire, vram_ok=any_ram) == ([], [Dirty(((10, 20, 30, 40),))])


def test_golden_resolution_response() -> None:
    server = SynthvidServer(VRAM, [(1280, 1024), (1024, 768)], default=(1024, 768))
    server.receive(VERSION_REQUEST_WIN10, vram_ok=any_ram)
    request = h("01000000 09000000 0d000000 09000000  # RESOLUTION_REQUEST\n 40  # room for 64")
    (reply,), _ = server.receive(request, vram_ok=any_ram)
    assert len(reply) == 16 + 387 and len(reply) <= sv.MAX_HOST_PAYLOAD
    assert reply[:16] == h("01000000 8b010000 0e000000 8b010000  # sizes 8 + 387")
    edid = reply[16:144]
    assert edid[:8] == h("00ffffffffffff00") and sum(edid) % 256 == 0
    assert reply[144:147] == h("02  # count\n 01  # default index\n 00  # is_standard")
    assert reply[147:155] == h("0005 0004  # 1280x1024\n 0004 0003  # 1024x768")
    assert reply[155:] == bytes(62 * 4)  # the rest of the 64 entries


def test_golden_feature_change() -> None:
    assert SynthvidServer(VRAM).feature_change(dirt=True) == h(
        """
        01000000   # pipe type PIPE_MSG_DATA
        0c000000   # pipe size 12
        09000000   # synthvid type FEATURE_CHANGE
        0c000000   # synthvid size 8 + 4
        01         # is_dirt_needed
        00         # is_ptr_pos_needed
        00         # is_ptr_shape_needed
        00         # is_situ_needed
        """
    )


def test_golden_hidden_pointer() -> None:
    position, shape = SynthvidClient().hide_pointer()
    assert position[16:] == h("01  # visible\n 00  # output\n 00000000 00000000  # at 0, 0")
    assert shape[16:] == h(
        """
        ff                  # part_idx CURSOR_COMPLETE
        01                  # is_argb
        01000000 01000000   # 1 x 1
        00000000 00000000   # hot spot 0, 0
        00010101            # the one pixel Linux sends
        """
    )


# --- Round trips ----------------------------------------------------------------


STRUCTS: list[type[WireStruct]] = [
    sv.SynthvidHeader,
    sv.SynthvidVersionReq,
    sv.SynthvidVersionResp,
    sv.SynthvidVramLocation,
    sv.SynthvidAck,
    sv.SynthvidSituationUpdate,
    sv.VideoOutputSituation,
    sv.SynthvidPointerPosition,
    sv.SynthvidPointerShape,
    sv.SynthvidFeatureChange,
    sv.SynthvidDirt,
    sv.Rect,
    sv.SynthvidResolutionReq,
    sv.SynthvidResolutionResp,
    sv.HvdScreenInfo,
]


def test_struct_sizes() -> None:
    sizes = {cls.__name__: cls.SIZE for cls in STRUCTS}
    assert sizes == {
        "SynthvidHeader": 8,
        "SynthvidVersionReq": 4,
        "SynthvidVersionResp": 6,
        "SynthvidVramLocation": 17,
        "SynthvidAck": 8,
        "SynthvidSituationUpdate": 9,  # + 18 per output: 27 with one
        "VideoOutputSituation": 18,
        "SynthvidPointerPosition": 10,
        "SynthvidPointerShape": 18,  # + ARGB data: 22 as Linux sends it
        "SynthvidFeatureChange": 4,
        "SynthvidDirt": 2,  # + 16 per rect
        "Rect": 16,
        "SynthvidResolutionReq": 1,
        "SynthvidResolutionResp": 131,  # + 64 entries: 387
        "HvdScreenInfo": 4,
    }
    assert sv.RESOLUTION_RESPONSE_BODY == 387


@pytest.mark.parametrize("cls", STRUCTS, ids=lambda c: c.__name__)
@given(data=st.data())
@settings(max_examples=30)
def test_every_struct_round_trips(cls: type[WireStruct], data: st.DataObject) -> None:
    value = data.draw(any_struct(cls))
    wire = value.pack()
    assert len(wire) == cls.SIZE
    assert cls.unpack(wire) == value


@given(msg_type=st.integers(0, 2**32 - 1), body=st.binary(max_size=64), pad=st.integers(0, 7))
def test_messages_round_trip(msg_type: int, body: bytes, pad: int) -> None:
    wire = sv.encode_message(msg_type, body)
    assert sv.decode_message(wire + bytes(pad)) == (msg_type, body)  # ring padding ignored


@given(
    width=st.integers(1, 1920),
    height=st.integers(1, 1080),
    extra=st.integers(0, 64),
)
@settings(max_examples=50)
def test_situation_update_round_trip(width: int, height: int, extra: int) -> None:
    server, client = SynthvidServer(VRAM), SynthvidClient()
    run(server, client, client.start())
    pitch = width * 4 + extra
    events = run(server, client, client.situation_update(width, height, pitch=pitch))
    fits = pitch * height <= VRAM
    assert events == ([ModeSet(width, height, 32, pitch, 0)] if fits else [])


@given(rects=st.lists(st.tuples(*[st.integers(-(2**31), 2**31 - 1)] * 4), max_size=8))
@settings(max_examples=50)
def test_dirt_is_clipped_to_the_screen(rects: list[tuple[int, int, int, int]]) -> None:
    server, client = ready(640, 480)
    _, events = server.receive(client.dirt(*rects), vram_ok=any_ram)
    kept = [r for e in events if isinstance(e, Dirty) for r in e.rects]
    for x1, y1, x2, y2 in kept:
        assert 0 <= x1 < x2 <= 640 and 0 <= y1 < y2 <= 480
    assert len(kept) + server.errors["dirt_outside"] == len(rects)


# --- The VSC and the VSP together -----------------------------------------------


def test_linux_sequence_win10() -> None:
    server, client = SynthvidServer(VRAM), SynthvidClient()
    assert run(server, client, client.start()) == []
    assert client.version == SYNTHVID_VERSION_WIN10
    assert client.resolutions == sv.STANDARD_RESOLUTIONS
    assert client.preferred == (1024, 768) and client.max_size == (1920, 1200)  # per axis
    assert run(server, client, client.vram_location(GPA)) == [VramLocation(GPA)]
    pointer = [e for m in client.hide_pointer() for e in run(server, client, m)]
    assert pointer == [PointerPosition(True, 0, 0), PointerShape(1, 1, 0, 0, b"\0\1\1\1")]
    assert run(server, client, client.situation_update(*client.preferred)) == [
        ModeSet(1024, 768, 32, 4096, 0)
    ]
    # The host wants dirt: Linux re-sends pointer and mode, then sends DIRT.
    resent = client.receive(server.feature_change(dirt=True))
    assert client.dirt_needed and len(resent) == 3
    events = [e for m in resent for e in server.receive(m, vram_ok=any_ram)[1]]
    assert events[-1] == ModeSet(1024, 768, 32, 4096, 0)
    assert run(server, client, client.dirt((0, 0, 8, 8))) == [Dirty(((0, 0, 8, 8),))]
    assert server.errors == {}


def test_vsc_falls_back_to_win8() -> None:
    server = SynthvidServer(VRAM, versions=[SYNTHVID_VERSION_WIN8])
    client = SynthvidClient()
    run(server, client, client.start())
    assert client.version == server.version == SYNTHVID_VERSION_WIN8
    assert client.resolutions == () and client.max_size == (1600, 1200)


def test_vsc_gives_up_when_no_version_is_common() -> None:
    server = SynthvidServer(VRAM, versions=[SYNTHVID_VERSION_WIN8])
    client = SynthvidClient(versions=[SYNTHVID_VERSION_WIN10])
    with pytest.raises(SynthvidProtocolError):
        run(server, client, client.start())


def test_vsc_refuses_a_bad_resolution_list() -> None:
    client = SynthvidClient()
    head = bytes(128) + bytes([2, 2, 0])  # default index past the count
    with pytest.raises(SynthvidProtocolError):
        client.receive(sv.encode_message(14, head + bytes(256)))


def test_server_configuration_is_checked() -> None:
    with pytest.raises(ValueError):
        SynthvidServer(4 << 20, [(1920, 1080)], default=(1920, 1080))  # 8.3 MB > 4 MiB
    with pytest.raises(ValueError):
        SynthvidServer(VRAM, [(1024, 768)], default=(800, 600))
    with pytest.raises(ValueError):
        SynthvidServer(VRAM, versions=[SYNTHVID_VERSION_WIN7])
    with pytest.raises(WireError):
        sv.SynthvidResolutionResp(bytes(127), 1, 0)


def test_short_resolution_request_keeps_the_default() -> None:
    server = SynthvidServer(VRAM, default=(1920, 1080))
    server.receive(VERSION_REQUEST_WIN10, vram_ok=any_ram)
    (reply,), _ = server.receive(message(13, b"\x02"), vram_ok=any_ram)
    count, index = reply[144], reply[145]
    entries = struct.unpack_from(f"<{2 * count}H", reply, 147)
    assert count == 2 and entries[2 * index : 2 * index + 2] == (1920, 1080)


# --- A hostile guest ---------------------------------------------------------------


def test_guest_sets_mode_larger_than_vram() -> None:
    server, _ = ready()
    before = server.mode
    for update, kind in [
        (situation(2560, 1600, 2560 * 4), "bad_mode"),  # past the largest resolution
        (situation(1920, 1080, 1920 * 4, offset=1 << 20), "mode_exceeds_vram"),  # ends past VRAM
        (situation(0, 768, 4096), "bad_mode"),
        (situation(1024, 768, 4096, depth=16), "bad_mode"),  # WIN7's depth
    ]:
        assert server.receive(update, vram_ok=any_ram) == ([], [])  # no ACK, no ModeSet
        assert server.errors[kind] >= 1
    assert server.mode == before and sum(server.errors.values()) == 4


def test_guest_sets_pitch_that_does_not_fit() -> None:
    server, _ = ready()
    before = server.mode
    assert server.receive(situation(1024, 768, 1024 * 4 - 1), vram_ok=any_ram) == ([], [])
    assert server.receive(situation(1024, 768, 0xFFFF_FFFF), vram_ok=any_ram) == ([], [])
    assert server.errors == {"bad_pitch": 1, "mode_exceeds_vram": 1}
    assert server.mode == before


def test_guest_sends_dirt_outside_screen() -> None:
    server, _ = ready(640, 480)
    outside = [(640, 0, 700, 10), (-50, -50, 0, 0), (10, 10, 5, 20), (0, 480, 640, 481)]
    assert server.receive(dirt(*outside), vram_ok=any_ram) == ([], [])
    assert server.errors["dirt_outside"] == 4
    partly = dirt((-10, -10, 10, 10), (600, 400, 9999, 9999), (640, 0, 641, 1))
    assert server.receive(partly, vram_ok=any_ram)[1] == [
        Dirty(((0, 0, 10, 10), (600, 400, 640, 480)))
    ]
    assert server.errors["dirt_outside"] == 5
    flood = dirt(*[(0, 0, 1, 1)] * (sv.MAX_DIRT_RECTS + 1))
    assert server.receive(flood, vram_ok=any_ram)[1] == [Dirty(((0, 0, 640, 480),))]
    assert server.errors["too_many_rects"] == 1
    lying = dirt((0, 0, 1, 1), count=5)  # claims five rects, carries one
    assert server.receive(lying, vram_ok=any_ram) == ([], []) and server.errors["malformed"] == 1
    other = message(10, struct.pack("<BB4i", 1, 1, 0, 0, 1, 1))  # output 1 does not exist
    assert server.receive(other, vram_ok=any_ram) == ([], []) and server.errors["bad_output"] == 1


def test_guest_sends_dirt_before_a_mode() -> None:
    server, client = SynthvidServer(VRAM), SynthvidClient()
    run(server, client, client.start())
    assert server.receive(client.dirt((0, 0, 1, 1)), vram_ok=any_ram) == ([], [])
    assert server.errors["dirt_outside"] == 1


def test_guest_places_vram_outside_memory() -> None:
    server, client = SynthvidServer(VRAM), SynthvidClient()
    run(server, client, client.start())
    asked: list[tuple[int, int]] = []

    def no_ram(gpa: int, size: int) -> bool:
        asked.append((gpa, size))
        return False

    assert server.receive(client.vram_location(GPA), vram_ok=no_ram) == ([], [])
    assert asked == [(GPA, VRAM)] and server.vram_gpa is None
    unaligned = client.vram_location(GPA + 1)
    no_gpa = message(3, struct.pack("<QBQ", GPA, 0, GPA))
    wraps = client.vram_location(2**64 - PAGE_SIZE)
    for request in (unaligned, no_gpa, wraps):
        assert server.receive(request, vram_ok=any_ram) == ([], [])
    assert server.errors["bad_vram"] == 4 and server.vram_gpa is None


def test_guest_sends_messages_before_negotiation() -> None:
    server = SynthvidServer(VRAM)
    early = [
        situation(1024, 768, 4096),
        SynthvidClient().vram_location(GPA),
        dirt((0, 0, 1, 1)),
        message(13, b"\x40"),
        *SynthvidClient().hide_pointer(),
    ]
    for m in early:
        assert server.receive(m, vram_ok=any_ram) == ([], [])
    assert server.errors == {"before_version": len(early)} and server.mode is None


def test_guest_asks_resolutions_after_negotiating_win8() -> None:
    server = SynthvidServer(VRAM)
    server.receive(message(1, struct.pack("<I", SYNTHVID_VERSION_WIN8)), vram_ok=any_ram)
    assert server.receive(message(13, b"\x40"), vram_ok=any_ram) == ([], [])
    assert server.errors["out_of_order"] == 1


def test_guest_version_request_starts_over() -> None:
    server, client = ready()
    run(server, client, client.start())
    assert server.mode is None and server.vram_gpa is None and server.version is not None


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (struct.pack("<BBIIII", 0xFF, 1, 97, 1, 0, 0) + bytes(97 * 4), "bad_pointer"),
        (struct.pack("<BBIIII", 0xFF, 1, 2, 2, 0, 0) + bytes(15), "malformed"),  # 16 needed
        (struct.pack("<BBIIII", 0, 1, 1, 1, 0, 0) + bytes(4), "unsupported"),  # a part
        (struct.pack("<BBIIII", 0xFF, 0, 1, 1, 0, 0) + bytes(4), "unsupported"),  # not ARGB
    ],
)
def test_guest_sends_bad_pointer_shape(body: bytes, kind: str) -> None:
    server, _ = ready()
    assert server.receive(message(8, body), vram_ok=any_ram) == ([], [])
    assert server.errors == {kind: 1}


def test_guest_sends_largest_pointer_shape() -> None:
    server, _ = ready()
    argb = bytes(range(256)) * (96 * 96 * 4 // 256)
    body = struct.pack("<BBIIII", 0xFF, 1, 96, 96, 95, 95) + argb
    assert server.receive(message(8, body), vram_ok=any_ram)[1] == [
        PointerShape(96, 96, 95, 95, argb)
    ]


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        (b"\x01\x00\x00\x00", "malformed"),
        (struct.pack("<IIII", 0, 12, 1, 12) + bytes(4), "malformed"),  # pipe type INVALID
        (struct.pack("<IIII", 1, 12, 1, 40) + bytes(4), "malformed"),  # size past the end
        (struct.pack("<IIII", 1, 12, 1, 4) + bytes(4), "malformed"),  # size under the header
        (message(1, b"\x03\x00"), "malformed"),  # short VERSION_REQUEST
        (message(2, bytes(6)), "unsupported"),  # VERSION_RESPONSE is host-only
        (message(0x1234, b""), "unsupported"),
        (message(8, bytes(sv.MAX_GUEST_PAYLOAD)), "oversize"),
        (situation(1024, 768, 4096)[:-1], "malformed"),  # cut short
    ],
)
def test_guest_sends_broken_message(payload: bytes, kind: str) -> None:
    server, _ = ready()
    assert server.receive(payload, vram_ok=any_ram) == ([], [])
    assert server.errors == {kind: 1} and server.last_error


def test_guest_sends_situation_without_outputs() -> None:
    server, _ = ready()
    body = struct.pack("<QB", 0, 0) + struct.pack("<BIBIII", 1, 0, 32, 640, 480, 2560)
    assert server.receive(message(5, body), vram_ok=any_ram) == ([], [])
    assert server.errors == {"malformed": 1}


@pytest.mark.parametrize("negotiated", [False, True])
@given(payload=st.binary(max_size=200), vram=st.booleans())
@settings(max_examples=100)
def test_arbitrary_bytes_never_raise(negotiated: bool, payload: bytes, vram: bool) -> None:
    server = SynthvidServer(VRAM)
    if negotiated:
        server.receive(VERSION_REQUEST_WIN10, vram_ok=any_ram)
        server.receive(situation(1024, 768, 4096), vram_ok=any_ram)
    replies, _ = server.receive(payload, vram_ok=lambda gpa, size: vram)
    assert all(len(r) <= sv.MAX_HOST_PAYLOAD for r in replies)


@given(msg_type=st.integers(0, 15), body=st.binary(max_size=120))
@settings(max_examples=200)
def test_well_framed_garbage_never_raises(msg_type: int, body: bytes) -> None:
    server, _ = ready()
    replies, events = server.receive(message(msg_type, body), vram_ok=any_ram)
    assert all(len(r) <= sv.MAX_HOST_PAYLOAD for r in replies)
    if server.mode is not None:
        for e in events:
            if isinstance(e, Dirty):
                assert all(0 <= r[0] < r[2] <= server.mode.width for r in e.rects)


def test_prefer_makes_a_viewers_size_the_clamped_default() -> None:
    server = sv.SynthvidServer(1 << 20, [(640, 400), (320, 200)], (320, 200))
    change = server.prefer(5000, 300)  # wider than any mode
    assert change == server.feature_change(dirt=True, situation=True)
    assert server.default == (640, 300) and server.resolutions[0] == (640, 300)
    assert server.prefer(640, 300) is None  # nothing changed
    server.prefer(600, 410)  # taller than any mode: 400 rows
    assert server.default == (600, 400) and (640, 300) not in server.resolutions
    assert all(w * h * 4 <= 1 << 20 for w, h in server.resolutions)
