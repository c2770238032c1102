"""The synthetic keyboard's protocol: golden bytes, round trips, and a
hostile guest.

Golden vectors are written by hand from docs/protocol.md §7.1 (not produced
by the code under test).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmbus.protocols.input import (
    KeyboardClient,
    KeyboardProtocolError,
    KeyboardServer,
    KeyEvent,
    wire,
)
from vmbus.testing.strategies import from_hex as h
from vmbus.testing.strategies import wire_values as any_struct
from vmbus.wire import WireStruct


def negotiated_keyboard() -> tuple[KeyboardServer, KeyboardClient]:
    server, client = KeyboardServer(), KeyboardClient()
    for reply in server.receive(client.request()):
        client.receive(reply)
    assert client.accepted
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
    raw = server.keystroke(code, down=down, e0=prefix == "e0", e1=prefix == "e1")
    assert raw is not None and len(raw) == 12
    event = client.receive(raw)
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
    with pytest.raises(KeyboardProtocolError):
        client.receive(b"\x02\x00")  # no header
    with pytest.raises(KeyboardProtocolError):
        client.receive(h("03000000 1e000000 00000000"))  # a keystroke before acceptance


# --- Round trips ----------------------------------------------------------------

STRUCTS: list[type[WireStruct]] = [
    wire.KeyboardHeader,
    wire.KeyboardProtocolRequest,
    wire.KeyboardProtocolResponse,
    wire.Keystroke,
]


@pytest.mark.parametrize("cls", STRUCTS, ids=lambda c: c.__name__)
@given(data=st.data())
@settings(max_examples=30)
def test_every_struct_round_trips(cls: type[WireStruct], data: st.DataObject) -> None:
    value = data.draw(any_struct(cls))
    raw = value.pack()
    assert len(raw) == cls.SIZE
    assert cls.unpack(raw) == value


@given(msg_type=st.integers(0, 2**32 - 1), body=st.binary(max_size=64))
def test_keyboard_messages_round_trip(msg_type: int, body: bytes) -> None:
    assert wire.decode_keyboard_message(wire.encode_keyboard_message(msg_type, body)) == (
        msg_type,
        body,
    )


# --- A hostile guest --------------------------------------------------------------


def test_guest_sends_keys_before_negotiation() -> None:
    keys = KeyboardServer()
    assert keys.receive(h("04000000 01000000")) == []  # LED_INDICATORS first
    assert keys.errors["before_negotiation"] == 1 and keys.leds is None
    assert keys.keystroke(0x1E, down=True) is None and keys.dropped_keystrokes == 1


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


@given(payload=st.binary(max_size=300), negotiated=st.booleans())
@settings(max_examples=100)
def test_arbitrary_bytes_never_raise(payload: bytes, negotiated: bool) -> None:
    keys = KeyboardServer()
    if negotiated:
        keys.receive(KBD_PROTOCOL_REQUEST)
    assert all(isinstance(r, bytes) and len(r) <= 256 for r in keys.receive(payload))
