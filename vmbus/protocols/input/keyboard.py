"""Synthetic keyboard: wire structs, the VSP state machine (sans-I/O) and a VSC.

Source: PROTOCOL-FACTS §7.1 (drivers/input/serio/hyperv-keyboard.c),
cross-checked with FreeBSD's sys/dev/hyperv/input/hv_kbdc.c. There is no
pipe header: each inband payload is a u32 message type and a body.

Sequence: the guest sends PROTOCOL_REQUEST (version 1.0) and waits up to
10 s for PROTOCOL_RESPONSE with bit 0 set; then the VSP sends one KEYSTROKE
per make or break of a PC/XT set-1 scan code (Linux turns IS_BREAK into
the 0x80 bit and IS_E0/IS_E1 into prefix bytes for its 8042-XL serio port).
Replies go inband, not as completions (FreeBSD logs completions as
unhandled).

Choices where the sources leave room:
- LED_INDICATORS has no known layout: its body is kept raw in `leds`.
- A PROTOCOL_REQUEST at any time renegotiates (a guest resuming from
  hibernation sends it again); a refused one stops keystrokes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Annotated

from vmbus.wire import U16, U32, WireError, WireStruct, open_enum, wire_struct

Buffer = bytes | bytearray | memoryview

# Versions and status (hyperv-keyboard.c).
SYNTH_KBD_VERSION = 0x0001_0000  # 1.0: major << 16 | minor
PROTOCOL_ACCEPTED = 0x1  # proto_status bit 0
HEADER_SIZE = 4

# Caps.
HK_MAXIMUM_MESSAGE_SIZE = 256  # Linux's own bound on a keyboard message
MAX_MAKE_CODE = 0x7F  # set-1 make codes; bit 7 is the break bit Linux adds
MAX_UTF16_UNIT = 0xFFFF


class MessageType(IntEnum):
    """enum synth_kbd_msg_type (§7.1). Open: unknown values stay ints."""

    PROTOCOL_REQUEST = 1
    PROTOCOL_RESPONSE = 2
    EVENT = 3  # a keystroke
    LED_INDICATORS = 4


def message_type(value: int) -> MessageType | int:
    """Open enum: the MessageType member for a known value, else the int."""
    return open_enum(MessageType, value)


class KeystrokeInfo(IntFlag):
    """synth_kbd_keystroke.info bits."""

    IS_UNICODE = 0x1  # make_code is a UTF-16 unit
    IS_BREAK = 0x2  # key released
    IS_E0 = 0x4
    IS_E1 = 0x8


@wire_struct(size=HEADER_SIZE)
@dataclass(frozen=True)
class KeyboardHeader(WireStruct):
    """struct synth_kbd_msg_hdr { __le32 type; };"""

    type: Annotated[int, U32]


@wire_struct(size=4)
@dataclass(frozen=True)
class ProtocolRequest(WireStruct):
    """struct synth_kbd_protocol_request { header; union synth_kbd_version
    version_requested; }; (the body after the header)"""

    version: Annotated[int, U32]


@wire_struct(size=4)
@dataclass(frozen=True)
class ProtocolResponse(WireStruct):
    """struct synth_kbd_protocol_response { header; __le32 proto_status; };"""

    proto_status: Annotated[int, U32]


@wire_struct(size=8)
@dataclass(frozen=True)
class Keystroke(WireStruct):
    """struct synth_kbd_keystroke { header; __le16 make_code; __le16 reserved0;
    __le32 info; }; (the body after the header)"""

    make_code: Annotated[int, U16]
    reserved0: Annotated[int, U16] = 0
    info: Annotated[int, U32] = 0


def encode_message(msg_type: int, body: bytes) -> bytes:
    return KeyboardHeader(msg_type).pack() + body


def decode_message(payload: Buffer) -> tuple[MessageType | int, bytes]:
    """(type, body); WireError when there is no header."""
    view = memoryview(payload).cast("B")
    return message_type(KeyboardHeader.unpack_from(view).type), bytes(view[HEADER_SIZE:])


# --- The VSP side -----------------------------------------------------------


class KeyboardServer:
    """The VSP side of one keyboard. `receive` takes one inband payload and
    returns the payloads to send; a bad message is dropped and counted in
    `errors` (the reason in `last_error`), never raised."""

    def __init__(self) -> None:
        self.negotiated = False
        self.leds: bytes | None = None  # the last LED_INDICATORS body, raw
        self.errors: Counter[str] = Counter()
        self.last_error: str | None = None
        self.dropped_keystrokes = 0  # asked for before the guest negotiated

    def _drop(self, kind: str, reason: str) -> list[bytes]:
        self.errors[kind] += 1
        self.last_error = reason
        return []

    def receive(self, payload: Buffer) -> list[bytes]:
        view = memoryview(payload).cast("B")
        if len(view) > HK_MAXIMUM_MESSAGE_SIZE:
            return self._drop("oversize", f"{len(view)}-byte message")
        try:
            msg_type, body = decode_message(view)
        except WireError as error:
            return self._drop("malformed", str(error))
        if msg_type == MessageType.PROTOCOL_REQUEST:
            if len(body) < ProtocolRequest.SIZE:
                return self._drop("malformed", f"PROTOCOL_REQUEST body of {len(body)} bytes")
            self.negotiated = ProtocolRequest.unpack(body).version == SYNTH_KBD_VERSION
            status = PROTOCOL_ACCEPTED if self.negotiated else 0
            return [encode_message(MessageType.PROTOCOL_RESPONSE, ProtocolResponse(status).pack())]
        if msg_type != MessageType.LED_INDICATORS:
            return self._drop("unsupported", f"message type {msg_type!r} from a guest")
        if not self.negotiated:
            return self._drop("before_negotiation", "LED_INDICATORS before PROTOCOL_REQUEST")
        self.leds = body
        return []

    def keystroke(
        self,
        scan_code: int,
        *,
        down: bool,
        e0: bool = False,
        e1: bool = False,
        unicode: bool = False,
    ) -> bytes | None:
        """One KEYSTROKE (a set-1 make code, or a UTF-16 unit with unicode);
        None, counted in dropped_keystrokes, before the guest negotiated."""
        limit = MAX_UTF16_UNIT if unicode else MAX_MAKE_CODE
        if not 0 <= scan_code <= limit:
            raise ValueError(f"scan code {scan_code:#x} is not in 0..{limit:#x}")
        if e0 and e1:
            raise ValueError("a scan code has one prefix, E0 or E1")
        if not self.negotiated:
            self.dropped_keystrokes += 1
            return None
        flags = (
            (KeystrokeInfo.IS_UNICODE, unicode),
            (KeystrokeInfo.IS_BREAK, not down),
            (KeystrokeInfo.IS_E0, e0),
            (KeystrokeInfo.IS_E1, e1),
        )
        info = sum(flag for flag, on in flags if on)
        return encode_message(MessageType.EVENT, Keystroke(scan_code, 0, info).pack())


# --- The VSC side -----------------------------------------------------------


class KeyboardProtocolError(ValueError):
    """The VSP sent something a keyboard VSC cannot use (a remote error)."""


@dataclass(frozen=True)
class KeyEvent:
    scan_code: int
    pressed: bool
    e0: bool = False
    e1: bool = False
    unicode: bool = False

    @property
    def serio_bytes(self) -> bytes:
        """What Linux feeds its serio port: prefix, then code | 0x80 on release."""
        prefix = b"\xe0" if self.e0 else b""
        prefix += b"\xe1" if self.e1 else b""
        return prefix + bytes([(self.scan_code & 0xFF) | (0 if self.pressed else 0x80)])


class KeyboardClient:
    """The VSC side: `request()` is the first message; `receive` records the
    VSP's answer in `accepted` and decodes keystrokes into KeyEvents."""

    def __init__(self) -> None:
        self.accepted: bool | None = None

    def request(self, version: int = SYNTH_KBD_VERSION) -> bytes:
        return encode_message(MessageType.PROTOCOL_REQUEST, ProtocolRequest(version).pack())

    def receive(self, payload: Buffer) -> KeyEvent | None:
        try:
            msg_type, body = decode_message(payload)
            if msg_type == MessageType.PROTOCOL_RESPONSE:
                status = ProtocolResponse.unpack(body).proto_status
                self.accepted = bool(status & PROTOCOL_ACCEPTED)
                return None
            if msg_type == MessageType.EVENT and self.accepted:
                stroke = Keystroke.unpack(body)
                info = KeystrokeInfo(stroke.info)
                return KeyEvent(
                    stroke.make_code,
                    pressed=not info & KeystrokeInfo.IS_BREAK,
                    e0=bool(info & KeystrokeInfo.IS_E0),
                    e1=bool(info & KeystrokeInfo.IS_E1),
                    unicode=bool(info & KeystrokeInfo.IS_UNICODE),
                )
        except WireError as error:
            raise KeyboardProtocolError(str(error)) from None
        raise KeyboardProtocolError(f"unexpected message type {msg_type!r}")
