"""Synthetic keyboard and HID mouse: golden bytes, round trips, the VSPs
against their VSCs in-process, a hostile guest, and the keysym table.

Golden vectors are written by hand from PROTOCOL-FACTS §7 and §10 (not
produced by the code under test); the report descriptor is checked by a HID
item walker written here, independent of vmbus.protocols.input.hid.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmbus.protocols.input import hid, keyboard
from vmbus.protocols.input.hid import MouseClient, MouseEvent, MouseServer, MouseState
from vmbus.protocols.input.keyboard import KeyboardClient, KeyboardServer, KeyEvent
from vmbus.protocols.input.scancodes import KEYSYM_TO_SCANCODE, ScanCode, keysym_to_scancode
from vmbus.testing.strategies import from_hex as h
from vmbus.testing.strategies import wire_values as any_struct
from vmbus.wire import WireError, WireStruct


def negotiated_keyboard() -> tuple[KeyboardServer, KeyboardClient]:
    server, client = KeyboardServer(), KeyboardClient()
    for reply in server.receive(client.request()):
        client.receive(reply)
    assert client.accepted
    return server, client


def ready_mouse() -> tuple[MouseServer, MouseClient]:
    server, client = MouseServer(), MouseClient()
    pending = server.receive(client.request())
    while pending:
        replies, _ = client.receive(pending.pop(0))
        for reply in replies:
            pending += server.receive(reply)
    assert server.state == MouseState.READY and client.approved
    return server, client


# --- Keyboard golden bytes ----------------------------------------------------

KBD_PROTOCOL_REQUEST = h(
    """
    01000000   # type PROTOCOL_REQUEST
    00000100   # version 1.0 (major 1 << 16 | minor 0)
    """
)
KBD_PROTOCOL_ACCEPTED = h(
    """
    02000000   # type PROTOCOL_RESPONSE
    01000000   # proto_status: bit 0 PROTOCOL_ACCEPTED
    """
)


def test_golden_keyboard_protocol_exchange() -> None:
    server, client = KeyboardServer(), KeyboardClient()
    assert client.request() == KBD_PROTOCOL_REQUEST
    assert server.receive(KBD_PROTOCOL_REQUEST) == [KBD_PROTOCOL_ACCEPTED]
    refused = h("02000000  # PROTOCOL_RESPONSE\n 00000000  # proto_status: not accepted")
    assert KeyboardServer().receive(h("01000000 00000200  # version 2.0")) == [refused]


def test_golden_keystrokes() -> None:
    server, _ = negotiated_keyboard()
    a_down = h(
        """
        03000000   # type EVENT
        1e00       # make_code 0x1E ('a')
        0000       # reserved0
        00000000   # info: a make, no prefix
        """
    )
    right_up = h(
        """
        03000000   # type EVENT
        4d00       # make_code 0x4D (Right, with E0)
        0000       # reserved0
        06000000   # info: IS_BREAK (bit 1) | IS_E0 (bit 2)
        """
    )
    assert server.keystroke(0x1E, down=True) == a_down
    assert server.keystroke(0x4D, down=False, e0=True) == right_up


def test_keystrokes_reach_the_client_as_linux_sees_them() -> None:
    server, client = negotiated_keyboard()
    up = client.receive(server.keystroke(0x4D, down=False, e0=True) or b"")
    assert up == KeyEvent(0x4D, pressed=False, e0=True)
    assert up.serio_bytes == b"\xe0\xcd"  # E0 prefix, then 0x80 | make
    pause = client.receive(server.keystroke(0x1D, down=True, e1=True) or b"")
    assert pause is not None and pause.serio_bytes == b"\xe1\x1d"
    unit = client.receive(server.keystroke(0x20AC, down=True, unicode=True) or b"")
    assert unit == KeyEvent(0x20AC, pressed=True, unicode=True)


@given(
    code=st.integers(0, 0x7F),
    down=st.booleans(),
    prefix=st.sampled_from(["", "e0", "e1"]),
)
def test_keystroke_round_trip(code: int, down: bool, prefix: str) -> None:
    server, client = negotiated_keyboard()
    wire = server.keystroke(code, down=down, e0=prefix == "e0", e1=prefix == "e1")
    assert wire is not None and len(wire) == 12
    event = client.receive(wire)
    assert event == KeyEvent(code, down, prefix == "e0", prefix == "e1")


def test_keyboard_refuses_other_versions_and_renegotiates() -> None:
    server, client = KeyboardServer(), KeyboardClient()
    client.receive(server.receive(client.request(0x0002_0000))[0])
    assert client.accepted is False and not server.negotiated
    assert server.keystroke(0x1E, down=True) is None
    client.receive(server.receive(client.request())[0])
    assert client.accepted and server.keystroke(0x1E, down=True) is not None


def test_keystroke_misuse_is_a_local_error() -> None:
    server, _ = negotiated_keyboard()
    with pytest.raises(ValueError):
        server.keystroke(0x80, down=True)  # bit 7 is the break bit
    with pytest.raises(ValueError):
        server.keystroke(0x1D, down=True, e0=True, e1=True)
    with pytest.raises(ValueError):
        server.keystroke(0x10000, down=True, unicode=True)


def test_led_indicators_are_recorded_raw() -> None:
    server, _ = negotiated_keyboard()
    assert server.receive(h("04000000  # LED_INDICATORS\n 0300 0000")) == []
    assert server.leds == bytes.fromhex("03000000")
    assert server.receive(h("04000000")) == [] and server.leds == b""
    assert not server.errors


def test_keyboard_client_refuses_what_it_cannot_use() -> None:
    client = KeyboardClient()
    with pytest.raises(keyboard.KeyboardProtocolError):
        client.receive(b"\x02\x00")  # no header
    with pytest.raises(keyboard.KeyboardProtocolError):
        client.receive(h("03000000 1e000000 00000000"))  # a keystroke before acceptance


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
    descriptor = hid.MOUSE_REPORT_DESCRIPTOR
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
    descriptor = hid.MOUSE_REPORT_DESCRIPTOR
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
    assert bits == 48 == 8 * hid.MouseReport.SIZE


def test_golden_input_report() -> None:
    server, client = ready_mouse()
    wire = server.report(0x1234, 0x7FFF, 0b101, wheel=-1)
    assert wire == h(
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
    assert client.receive(wire) == ([], MouseEvent(0x1234, 0x7FFF, 0b101, -1))


@given(
    x=st.integers(0, hid.ABS_MAX),
    y=st.integers(0, hid.ABS_MAX),
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
    assert client.info == hid.HvInputDevInfo()
    assert client.info.vendor == 0x045E and client.info.product == 0x0621
    assert client.report_descriptor == hid.MOUSE_REPORT_DESCRIPTOR
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
    body = hid.device_info_body(report_descriptor=other)
    with pytest.raises(hid.HidProtocolError):
        MouseClient().receive(hid.encode_message(hid.MessageType.INITIAL_DEVICE_INFO, body))
    with pytest.raises(hid.HidProtocolError):
        MouseClient().receive(b"\x01\x00\x00\x00\xff\x00\x00\x00")  # pipe size past the end


# --- Round trips ----------------------------------------------------------------

STRUCTS: list[type[WireStruct]] = [
    keyboard.KeyboardHeader,
    keyboard.ProtocolRequest,
    keyboard.ProtocolResponse,
    keyboard.Keystroke,
    hid.PipeHeader,
    hid.SynthhidHeader,
    hid.ProtocolRequest,
    hid.ProtocolResponse,
    hid.HvInputDevInfo,
    hid.HidDescriptor,
    hid.DeviceInfoAck,
    hid.MouseReport,
]


@pytest.mark.parametrize("cls", STRUCTS, ids=lambda c: f"{c.__module__[17:]}.{c.__name__}")
@given(data=st.data())
@settings(max_examples=30)
def test_every_struct_round_trips(cls: type[WireStruct], data: st.DataObject) -> None:
    value = data.draw(any_struct(cls))
    wire = value.pack()
    assert len(wire) == cls.SIZE
    assert cls.unpack(wire) == value


@given(msg_type=st.integers(0, 2**32 - 1), body=st.binary(max_size=64), pad=st.integers(0, 7))
def test_hid_messages_round_trip(msg_type: int, body: bytes, pad: int) -> None:
    wire = hid.encode_message(msg_type, body)
    assert hid.decode_message(wire + bytes(pad)) == (msg_type, body)  # ring padding ignored


@given(msg_type=st.integers(0, 2**32 - 1), body=st.binary(max_size=64))
def test_keyboard_messages_round_trip(msg_type: int, body: bytes) -> None:
    assert keyboard.decode_message(keyboard.encode_message(msg_type, body)) == (msg_type, body)


def test_byte_fields_refuse_the_wrong_length() -> None:
    with pytest.raises(WireError):
        hid.HvInputDevInfo(reserved=bytes(23))


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


def test_guest_sends_messages_before_negotiation() -> None:
    keys = KeyboardServer()
    assert keys.receive(h("04000000 01000000")) == []  # LED_INDICATORS first
    assert keys.errors["before_negotiation"] == 1 and keys.leds is None
    assert keys.keystroke(0x1E, down=True) is None and keys.dropped_keystrokes == 1
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


def test_guest_sends_oversize_keyboard_message() -> None:
    server, _ = negotiated_keyboard()
    assert server.receive(h("04000000") + bytes(300)) == []
    assert server.errors == {"oversize": 1} and server.leds is None


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        (b"\x01\x00", "malformed"),  # no header
        (h("01000000 0000"), "malformed"),  # PROTOCOL_REQUEST without a full version
        (h("03000000 1e000000 00000000"), "unsupported"),  # EVENT is host-only
        (h("ffffffff"), "unsupported"),
    ],
)
def test_guest_sends_broken_keyboard_message(payload: bytes, kind: str) -> None:
    server = KeyboardServer()
    assert server.receive(payload) == []
    assert server.errors == {kind: 1}


@pytest.mark.parametrize("steps", [0, 1, 2])
@given(payload=st.binary(max_size=300))
@settings(max_examples=100)
def test_arbitrary_bytes_never_raise(steps: int, payload: bytes) -> None:
    mouse = MouseServer()
    for message in [HID_PROTOCOL_REQUEST, HID_DEVICE_INFO_ACK][:steps]:
        mouse.receive(message)
    keys = KeyboardServer()
    if steps:
        keys.receive(KBD_PROTOCOL_REQUEST)
    for replies in (mouse.receive(payload), keys.receive(payload)):
        assert all(isinstance(r, bytes) and len(r) + 16 <= 4096 for r in replies)


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


# --- Keysyms to scan codes ------------------------------------------------------------


@pytest.mark.parametrize(
    ("keysym", "expected"),
    [
        (ord("a"), ScanCode(0x1E)),
        (ord("A"), ScanCode(0x1E)),  # Shift comes as its own key
        (ord("1"), ScanCode(0x02)),
        (ord("!"), ScanCode(0x02)),
        (ord("0"), ScanCode(0x0B)),
        (ord("?"), ScanCode(0x35)),
        (ord("`"), ScanCode(0x29)),
        (ord("~"), ScanCode(0x29)),
        (ord("\\"), ScanCode(0x2B)),
        (ord("|"), ScanCode(0x2B)),
        (ord(" "), ScanCode(0x39)),
        (ord("m"), ScanCode(0x32)),
        (ord("p"), ScanCode(0x19)),
        (0xFF0D, ScanCode(0x1C)),  # Return
        (0xFF1B, ScanCode(0x01)),  # Escape
        (0xFF08, ScanCode(0x0E)),  # BackSpace
        (0xFF09, ScanCode(0x0F)),  # Tab
        (0xFFE1, ScanCode(0x2A)),  # Shift_L
        (0xFFE2, ScanCode(0x36)),  # Shift_R
        (0xFFE3, ScanCode(0x1D)),  # Control_L
        (0xFFE4, ScanCode(0x1D, True)),  # Control_R
        (0xFFE9, ScanCode(0x38)),  # Alt_L
        (0xFFEA, ScanCode(0x38, True)),  # Alt_R
        (0xFFE5, ScanCode(0x3A)),  # Caps_Lock
        (0xFFBE, ScanCode(0x3B)),  # F1
        (0xFFC7, ScanCode(0x44)),  # F10
        (0xFFC8, ScanCode(0x57)),  # F11
        (0xFFC9, ScanCode(0x58)),  # F12
        (0xFF51, ScanCode(0x4B, True)),  # Left
        (0xFF52, ScanCode(0x48, True)),  # Up
        (0xFF53, ScanCode(0x4D, True)),  # Right
        (0xFF54, ScanCode(0x50, True)),  # Down
        (0xFF50, ScanCode(0x47, True)),  # Home
        (0xFF57, ScanCode(0x4F, True)),  # End
        (0xFF55, ScanCode(0x49, True)),  # Page_Up
        (0xFF56, ScanCode(0x51, True)),  # Page_Down
        (0xFF63, ScanCode(0x52, True)),  # Insert
        (0xFFFF, ScanCode(0x53, True)),  # Delete
        (0xFFB7, ScanCode(0x47)),  # KP_7: Home's key without E0
        (0xFFB0, ScanCode(0x52)),  # KP_0
        (0xFFAE, ScanCode(0x53)),  # KP_Decimal
        (0xFF8D, ScanCode(0x1C, True)),  # KP_Enter
        (0xFFAF, ScanCode(0x35, True)),  # KP_Divide
        (0xFFAA, ScanCode(0x37)),  # KP_Multiply
        (0xFFAD, ScanCode(0x4A)),  # KP_Subtract
        (0xFFAB, ScanCode(0x4E)),  # KP_Add
        (0xFF7F, ScanCode(0x45)),  # Num_Lock
    ],
)
def test_keysym_to_scancode(keysym: int, expected: ScanCode) -> None:
    assert keysym_to_scancode(keysym) == expected


def test_scancode_table_covers_the_us_keyboard() -> None:
    printable = [chr(c) for c in range(0x20, 0x7F)]
    assert all(ord(c) in KEYSYM_TO_SCANCODE for c in printable)
    for c in "abcdefghijklmnopqrstuvwxyz":
        assert keysym_to_scancode(ord(c.upper())) == keysym_to_scancode(ord(c))
    assert all(0 < code.make_code <= 0x7F for code in KEYSYM_TO_SCANCODE.values())
    # Distinct unshifted characters are distinct keys.
    plain = "`1234567890-=qwertyuiop[]\\asdfghjkl;'zxcvbnm,./ "
    assert len({keysym_to_scancode(ord(c)) for c in plain}) == len(plain)
    assert keysym_to_scancode(0x1234) is None
