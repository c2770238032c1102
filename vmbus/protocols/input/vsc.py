"""The VSC sides of the keyboard and the mouse, sans-I/O: the first message
to send (`request`), and `receive` to decode what the VSP sends. A message
a client cannot use raises its device's protocol error (a PeerError)."""

from __future__ import annotations

from dataclasses import dataclass

from vmbus.errors import PeerError
from vmbus.protocols.input.wire import (
    HID_DESCRIPTOR_SIZE,
    HV_INPUT_DEV_INFO_SIZE,
    PROTOCOL_ACCEPTED,
    SYNTH_KBD_VERSION,
    SYNTHHID_INPUT_VERSION,
    Buffer,
    DeviceInfoAck,
    HidDescriptor,
    HidMessageType,
    HidProtocolRequest,
    HidProtocolResponse,
    HvInputDevInfo,
    KeyboardMessageType,
    KeyboardProtocolRequest,
    KeyboardProtocolResponse,
    Keystroke,
    KeystrokeInfo,
    MouseReport,
    decode_hid_message,
    decode_keyboard_message,
    encode_hid_message,
    encode_keyboard_message,
    input_report_bits,
)
from vmbus.wire import WireError

__all__ = [
    "HidProtocolError",
    "KeyEvent",
    "KeyboardClient",
    "KeyboardProtocolError",
    "MouseClient",
    "MouseEvent",
]


class KeyboardProtocolError(PeerError, ValueError):
    """The VSP sent something a keyboard VSC cannot use."""


class HidProtocolError(PeerError, ValueError):
    """The VSP sent something a mouse VSC cannot use."""


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
    """`request()` is the first message; `receive` records the VSP's answer
    in `accepted` and decodes keystrokes into KeyEvents."""

    def __init__(self) -> None:
        self.accepted: bool | None = None

    def request(self, version: int = SYNTH_KBD_VERSION) -> bytes:
        body = KeyboardProtocolRequest(version).pack()
        return encode_keyboard_message(KeyboardMessageType.PROTOCOL_REQUEST, body)

    def receive(self, payload: Buffer) -> KeyEvent | None:
        try:
            msg_type, body = decode_keyboard_message(payload)
            if msg_type == KeyboardMessageType.PROTOCOL_RESPONSE:
                status = KeyboardProtocolResponse.unpack(body).proto_status
                self.accepted = bool(status & PROTOCOL_ACCEPTED)
                return None
            if msg_type == KeyboardMessageType.EVENT and self.accepted:
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


@dataclass(frozen=True)
class MouseEvent:
    x: int
    y: int
    buttons: int
    wheel: int = 0


class MouseClient:
    """`request()` is the first message; `receive` returns the messages to
    send back and the decoded input report, if any."""

    def __init__(self) -> None:
        self.approved: bool | None = None
        self.info: HvInputDevInfo | None = None
        self.hid_descriptor: HidDescriptor | None = None
        self.report_descriptor: bytes | None = None

    def request(self, version: int = SYNTHHID_INPUT_VERSION) -> bytes:
        body = HidProtocolRequest(version).pack()
        return encode_hid_message(HidMessageType.PROTOCOL_REQUEST, body)

    def receive(self, payload: Buffer) -> tuple[list[bytes], MouseEvent | None]:
        try:
            msg_type, body = decode_hid_message(payload)
            if msg_type == HidMessageType.PROTOCOL_RESPONSE:
                self.approved = bool(HidProtocolResponse.unpack(body).approved)
                return [], None
            if msg_type == HidMessageType.INITIAL_DEVICE_INFO:
                self._device_info(body)
                ack = DeviceInfoAck().pack()
                return [encode_hid_message(HidMessageType.INITIAL_DEVICE_INFO_ACK, ack)], None
            if msg_type == HidMessageType.INPUT_REPORT and self.report_descriptor is not None:
                report = MouseReport.unpack(body)
                return [], MouseEvent(report.x, report.y, report.buttons, report.wheel)
        except WireError as error:
            raise HidProtocolError(str(error)) from None
        raise HidProtocolError(f"unexpected message type {msg_type!r}")

    def _device_info(self, body: bytes) -> None:
        info = HvInputDevInfo.unpack(body)
        hid = HidDescriptor.unpack_from(body, HV_INPUT_DEV_INFO_SIZE)
        start = HV_INPUT_DEV_INFO_SIZE + hid.length
        descriptor = body[start : start + hid.report_descriptor_length]
        if hid.length < HID_DESCRIPTOR_SIZE or not descriptor:
            raise WireError(f"HID descriptor of {hid.length} bytes, report descriptor empty")
        if len(descriptor) < hid.report_descriptor_length:
            raise WireError(f"report descriptor cut at {len(descriptor)} bytes")
        bits = input_report_bits(descriptor)
        if bits != 8 * MouseReport.SIZE:
            raise WireError(f"input report of {bits} bits; this VSC decodes {MouseReport.SIZE}")
        self.info, self.hid_descriptor, self.report_descriptor = info, hid, descriptor
