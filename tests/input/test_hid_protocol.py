"""The synthetic HID mouse's protocol: golden bytes, the report descriptor,
round trips, and a hostile guest.

Golden vectors are written by hand from docs/protocol.md §7.2 and §10.1 (not
produced by the code under test); the report descriptor is checked by a HID
item walker written here, independent of vmbus.protocols.input.wire.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmbus.memory import PAGE_SIZE
from vmbus.protocols.input import (
    HidProtocolError,
    MouseClient,
    MouseEvent,
    MouseServer,
    MouseState,
    wire,
)
from vmbus.testing.strategies import from_hex as h
from vmbus.testing.strategies import wire_values as any_struct
from vmbus.wire import WireError, WireStruct


def ready_mouse() -> tuple[MouseServer, MouseClient]:
    server, client = MouseServer(), MouseClient()
    pending = server.receive(client.request())
    while pending:
        replies, _ = client.receive(pending.pop(0))
        for reply in replies:
            pending += server.receive(reply)
    assert server.state == MouseState.READY and client.approved
    return server, client


# --- HID golden bytes ---------------------------------------------------------

HID_PROTOCOL_REQUEST = h(
    """
    01000000   # pipe type PIPE_MESSAGE_DATA
    0c000000   # pipe size 12: synthhid header + body
    00000000   # synthhid type PROTOCOL_REQUEST
    04000000   # synthhid size 4: the body
    00000200   # version 2.0 (minor u16, major u16)
    """
)
HID_PROTOCOL_RESPONSE = h(
    """
    01000000   # pipe type PIPE_MESSAGE_DATA
    0d000000   # pipe size 13, as Linux's packed struct (Linux needs 8 + size <= 24)
    01000000   # synthhid type PROTOCOL_RESPONSE
    05000000   # synthhid size 5
    00000200   # version 2.0, echoed
    01         # approved
    000000     # zero padding: FreeBSD reads approved as a u32 and wants 24 bytes
    """
)
HID_DEVICE_INFO_ACK = h(
    """
    01000000   # pipe type PIPE_MESSAGE_DATA
    09000000   # pipe size 9
    03000000   # synthhid type INITIAL_DEVICE_INFO_ACK
    01000000   # synthhid size 1
    00         # reserved
    """
)


def test_golden_hid_protocol_exchange() -> None:
    client, server = MouseClient(), MouseServer()
    assert client.request() == HID_PROTOCOL_REQUEST
    response, _ = server.receive(HID_PROTOCOL_REQUEST)
    assert response == HID_PROTOCOL_RESPONSE
    pipe_size = struct.unpack_from("<I", response, 4)[0]
    assert 8 + pipe_size <= 24  # Linux's bound on what it copies
    assert len(response) == 24 and struct.unpack_from("<I", response, 20)[0] == 1  # FreeBSD


def test_golden_initial_device_info() -> None:
    _, info = MouseServer().receive(HID_PROTOCOL_REQUEST)
    descriptor = wire.MOUSE_REPORT_DESCRIPTOR
    n = len(descriptor)
    head = h(
        f"""
        01000000   # pipe type PIPE_MESSAGE_DATA
        {8 + 32 + 9 + n:02x}000000   # pipe size: synthhid header + body
        02000000   # synthhid type INITIAL_DEVICE_INFO
        {32 + 9 + n:02x}000000   # synthhid size: dev info + HID descriptor + report descriptor
        20000000   # hv_input_dev_info.size 32
        5e04       # vendor 0x045E
        2106       # product 0x0621
        0100       # version
        {"00" * 22}  # reserved[11]
        09         # bLength 9: the report descriptor follows it
        21         # bDescriptorType HID
        1101       # bcdHID 1.11
        00         # bCountryCode
        01         # bNumDescriptors
        22         # report descriptor type
        {n:02x}00  # wDescriptorLength
        """
    )
    assert info == head + descriptor
    assert len(info) + 16 <= 4096


def walk_hid_items(descriptor: bytes) -> list[dict[str, Any]]:
    """The Input items of a report descriptor with the global and local state
    each one sees (HID 1.11 §6.2.2). Short items only."""
    inputs: list[dict[str, Any]] = []
    glob: dict[str, int] = {}
    local: dict[str, Any] = {"usages": []}
    depth = at = 0
    while at < len(descriptor):
        prefix = descriptor[at]
        size = [0, 1, 2, 4][prefix & 3]
        raw = descriptor[at + 1 : at + 1 + size]
        assert len(raw) == size, f"item at {at} is cut"
        value = int.from_bytes(raw, "little")
        signed = int.from_bytes(raw, "little", signed=True)
        kind, tag = (prefix >> 2) & 3, prefix >> 4
        if kind == 0:  # main
            if tag == 0x8:  # Input
                inputs.append({**glob, **local, "flags": value})
            elif tag == 0xA:  # Collection
                depth += 1
            elif tag == 0xC:  # End Collection
                depth -= 1
            local = {"usages": []}
        elif kind == 1:  # global
            names = {0: "page", 1: "lmin", 2: "lmax", 7: "size", 9: "count"}
            assert tag in names, f"unexpected global item {prefix:#x}"
            glob[names[tag]] = signed if tag in (1, 2) else value
        elif kind == 2:  # local
            if tag == 0:
                local["usages"].append(value)
            else:
                local[{1: "umin", 2: "umax"}[tag]] = value
        at += 1 + size
    assert depth == 0, "unbalanced collections"
    return inputs


def test_report_descriptor_describes_a_six_byte_absolute_mouse() -> None:
    descriptor = wire.MOUSE_REPORT_DESCRIPTOR
    assert descriptor[:6] == bytes([0x05, 0x01, 0x09, 0x02, 0xA1, 0x01])  # desktop / mouse / app
    assert descriptor[14] != 0x25  # Linux would rewrite it to 0x29
    buttons, padding, xy, wheel = walk_hid_items(descriptor)
    assert (buttons["page"], buttons["umin"], buttons["umax"]) == (0x09, 1, 3)
    assert (buttons["lmin"], buttons["lmax"], buttons["size"], buttons["count"]) == (0, 1, 1, 3)
    assert padding["flags"] & 1 and padding["size"] * padding["count"] == 5  # constant
    assert (xy["page"], xy["usages"], xy["flags"]) == (0x01, [0x30, 0x31], 0x02)  # absolute
    assert (xy["lmin"], xy["lmax"], xy["size"], xy["count"]) == (0, 32767, 16, 2)
    assert (wheel["usages"], wheel["flags"]) == ([0x38], 0x06)  # relative
    assert (wheel["lmin"], wheel["lmax"], wheel["size"], wheel["count"]) == (-127, 127, 8, 1)
    bits = sum(i["size"] * i["count"] for i in (buttons, padding, xy, wheel))
    assert bits == 48 == 8 * wire.MouseReport.SIZE


def test_golden_input_report() -> None:
    server, client = ready_mouse()
    raw = server.report(0x1234, 0x7FFF, 0b101, wheel=-1)
    assert raw == h(
        """
        01000000   # pipe type PIPE_MESSAGE_DATA
        0e000000   # pipe size 14
        04000000   # synthhid type INPUT_REPORT
        06000000   # synthhid size 6
        05         # buttons 1 and 3
        3412       # x 0x1234
        ff7f       # y 32767
        ff         # wheel -1
        """
    )
    assert client.receive(raw or b"") == ([], MouseEvent(0x1234, 0x7FFF, 0b101, -1))


@given(
    x=st.integers(0, wire.ABS_MAX),
    y=st.integers(0, wire.ABS_MAX),
    buttons=st.integers(0, 7),
    wheel=st.integers(-127, 127),
)
@settings(max_examples=50)
def test_input_report_round_trip(x: int, y: int, buttons: int, wheel: int) -> None:
    server, client = ready_mouse()
    assert client.receive(server.report(x, y, buttons, wheel) or b"") == (
        [],
        MouseEvent(x, y, buttons, wheel),
    )


def test_mouse_sequence_and_client_view() -> None:
    server, client = ready_mouse()
    assert client.info == wire.HvInputDevInfo()
    assert client.info.vendor == 0x045E and client.info.product == 0x0621
    assert client.report_descriptor == wire.MOUSE_REPORT_DESCRIPTOR
    assert server.errors == {} and server.dropped_reports == 0


def test_mouse_refuses_other_versions() -> None:
    server, client = MouseServer(), MouseClient()
    replies = server.receive(client.request(0x0001_0000))
    assert len(replies) == 1  # no device info after a refusal
    client.receive(replies[0])
    assert client.approved is False and server.state == MouseState.WAIT_PROTOCOL


def test_report_misuse_is_a_local_error() -> None:
    server, _ = ready_mouse()
    for args in [(-1, 0, 0), (0, 32768, 0), (0, 0, 8)]:
        with pytest.raises(ValueError):
            server.report(*args)
    with pytest.raises(ValueError):
        server.report(0, 0, 0, wheel=-128)


def test_mouse_client_refuses_a_report_layout_it_cannot_decode() -> None:
    other = bytes.fromhex("05010902a101 7508 9504 8102 c0")  # a 4-byte report
    body = wire.device_info_body(report_descriptor=other)
    with pytest.raises(HidProtocolError):
        message = wire.encode_hid_message(wire.HidMessageType.INITIAL_DEVICE_INFO, body)
        MouseClient().receive(message)
    with pytest.raises(HidProtocolError):
        MouseClient().receive(b"\x01\x00\x00\x00\xff\x00\x00\x00")  # pipe size past the end


# --- Round trips ----------------------------------------------------------------

STRUCTS: list[type[WireStruct]] = [
    wire.PipeHeader,
    wire.SynthhidHeader,
    wire.HidProtocolRequest,
    wire.HidProtocolResponse,
    wire.HvInputDevInfo,
    wire.HidDescriptor,
    wire.DeviceInfoAck,
    wire.MouseReport,
]


@pytest.mark.parametrize("cls", STRUCTS, ids=lambda c: c.__name__)
@given(data=st.data())
@settings(max_examples=30)
def test_every_struct_round_trips(cls: type[WireStruct], data: st.DataObject) -> None:
    value = data.draw(any_struct(cls))
    raw = value.pack()
    assert len(raw) == cls.SIZE
    assert cls.unpack(raw) == value


@given(msg_type=st.integers(0, 2**32 - 1), body=st.binary(max_size=64), pad=st.integers(0, 7))
def test_hid_messages_round_trip(msg_type: int, body: bytes, pad: int) -> None:
    raw = wire.encode_hid_message(msg_type, body)
    assert wire.decode_hid_message(raw + bytes(pad)) == (msg_type, body)  # ring padding ignored


def test_byte_fields_refuse_the_wrong_length() -> None:
    with pytest.raises(WireError):
        wire.HvInputDevInfo(reserved=bytes(23))


# --- A hostile guest --------------------------------------------------------------


def hid_message(msg_type: int, body: bytes, pipe_size: int | None = None) -> bytes:
    size = 8 + len(body) if pipe_size is None else pipe_size
    return struct.pack("<IIII", 1, size, msg_type, len(body)) + body


def test_guest_sends_oversize_hid_ack() -> None:
    server = MouseServer()
    server.receive(HID_PROTOCOL_REQUEST)
    assert server.receive(hid_message(3, b"\0\0")) == []  # a 2-byte body
    assert server.receive(hid_message(3, b"\0" * 200)) == []  # past the payload cap
    assert server.errors["oversize"] == 2 and server.state == MouseState.WAIT_ACK
    assert server.report(1, 1, 0) is None and server.dropped_reports == 1
    assert server.receive(HID_DEVICE_INFO_ACK) == [] and server.ready  # service goes on


def test_guest_acks_before_negotiation() -> None:
    mouse = MouseServer()
    assert mouse.receive(HID_DEVICE_INFO_ACK) == []  # an ACK before any device info
    assert mouse.errors["out_of_order"] == 1 and mouse.state == MouseState.WAIT_PROTOCOL
    assert mouse.report(0, 0, 0) is None and mouse.dropped_reports == 1


def test_guest_acks_twice() -> None:
    server, _ = ready_mouse()
    assert server.receive(HID_DEVICE_INFO_ACK) == []
    assert server.errors["out_of_order"] == 1 and server.ready


def test_guest_renegotiates_after_hibernation() -> None:
    server, _ = ready_mouse()
    assert len(server.receive(HID_PROTOCOL_REQUEST)) == 2 and not server.ready
    assert server.receive(HID_DEVICE_INFO_ACK) == [] and server.ready


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        (b"\x01\x00\x00", "malformed"),  # no pipe header
        (struct.pack("<IIII", 0, 12, 0, 4) + bytes(4), "malformed"),  # pipe type INVALID
        (hid_message(0, b"\0\0\0\x02", pipe_size=40), "malformed"),  # pipe size past the end
        (struct.pack("<IIII", 1, 12, 0, 9) + bytes(4), "malformed"),  # synthhid size past pipe
        (hid_message(0, b"\0\0"), "malformed"),  # short PROTOCOL_REQUEST
        (hid_message(4, bytes(6)), "unsupported"),  # INPUT_REPORT is host-only
        (hid_message(99, b""), "unsupported"),  # unknown type
    ],
)
def test_guest_sends_broken_hid_message(payload: bytes, kind: str) -> None:
    server = MouseServer()
    assert server.receive(payload) == []
    assert server.errors == {kind: 1} and server.last_error


@pytest.mark.parametrize("steps", [0, 1, 2])
@given(payload=st.binary(max_size=300))
@settings(max_examples=100)
def test_arbitrary_bytes_never_raise(steps: int, payload: bytes) -> None:
    mouse = MouseServer()
    for message in [HID_PROTOCOL_REQUEST, HID_DEVICE_INFO_ACK][:steps]:
        mouse.receive(message)
    replies = mouse.receive(payload)
    assert all(isinstance(r, bytes) and len(r) + 16 <= PAGE_SIZE for r in replies)


@given(
    msg_type=st.integers(0, 6),
    sizes=st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)) | st.none(),
    body=st.binary(max_size=40),
)
@settings(max_examples=100)
def test_framed_garbage_never_raises(
    msg_type: int, sizes: tuple[int, int] | None, body: bytes
) -> None:
    pipe, inner = sizes or (8 + len(body), len(body))
    server = MouseServer()
    server.receive(struct.pack("<IIII", 1, pipe, msg_type, inner) + body)
    server.receive(HID_PROTOCOL_REQUEST)
    server.receive(struct.pack("<IIII", 1, pipe, msg_type, inner) + body)
