"""The VSP sides of the keyboard and the mouse, sans-I/O.

Each server takes one inband payload from the guest (`receive`) and returns
the payloads to send back, inband; a bad message is dropped and counted in
`errors` (the reason in `last_error`), never raised. Injected events are
encoded by `keystroke` / `report` and let through only once the guest has
negotiated.

Keyboard sequence (§7.1): the guest sends PROTOCOL_REQUEST (version 1.0)
and waits up to 10 s for PROTOCOL_RESPONSE with bit 0 set; then the VSP
sends one KEYSTROKE per make or break. A PROTOCOL_REQUEST at any time
renegotiates (a guest resuming from hibernation sends it again); a refused
one stops keystrokes.

Mouse sequence (§7.2): the guest sends PROTOCOL_REQUEST; the VSP answers
PROTOCOL_RESPONSE and then INITIAL_DEVICE_INFO; the guest sends
INITIAL_DEVICE_INFO_ACK; from then on the VSP sends INPUT_REPORTs. A
PROTOCOL_REQUEST in any state starts over; a refused one leaves the device
unusable until the next.
"""

from __future__ import annotations

from collections import Counter
from enum import Enum

from vmbus.errors import UsageError
from vmbus.protocols.input.wire import (
    HK_MAXIMUM_MESSAGE_SIZE,
    MAX_GUEST_PAYLOAD,
    MAX_HOST_PAYLOAD,
    PROTOCOL_ACCEPTED,
    SYNTH_KBD_VERSION,
    SYNTHHID_INPUT_VERSION,
    Buffer,
    DeviceInfoAck,
    HidMessageType,
    HidProtocolRequest,
    HvInputDevInfo,
    KeyboardMessageType,
    KeyboardProtocolRequest,
    KeyboardProtocolResponse,
    decode_hid_message,
    decode_keyboard_message,
    device_info_body,
    encode_hid_message,
    encode_keyboard_message,
    encode_keystroke,
    encode_mouse_report,
    encode_protocol_response,
)
from vmbus.wire import WireError

__all__ = ["KeyboardServer", "MouseServer", "MouseState"]


class _Server:
    def __init__(self) -> None:
        self.errors: Counter[str] = Counter()
        self.last_error: str | None = None

    def _drop(self, kind: str, reason: str) -> list[bytes]:
        self.errors[kind] += 1
        self.last_error = reason
        return []


class KeyboardServer(_Server):
    """The VSP side of one keyboard."""

    def __init__(self) -> None:
        super().__init__()
        self.negotiated = False
        self.leds: bytes | None = None  # the last LED_INDICATORS body, raw
        self.dropped_keystrokes = 0  # asked for before the guest negotiated

    def receive(self, payload: Buffer) -> list[bytes]:
        view = memoryview(payload).cast("B")
        if len(view) > HK_MAXIMUM_MESSAGE_SIZE:
            return self._drop("oversize", f"{len(view)}-byte message")
        try:
            msg_type, body = decode_keyboard_message(view)
        except WireError as error:
            return self._drop("malformed", str(error))
        if msg_type == KeyboardMessageType.PROTOCOL_REQUEST:
            if len(body) < KeyboardProtocolRequest.SIZE:
                return self._drop("malformed", f"PROTOCOL_REQUEST body of {len(body)} bytes")
            version = KeyboardProtocolRequest.unpack_from(body).version
            self.negotiated = version == SYNTH_KBD_VERSION
            status = KeyboardProtocolResponse(PROTOCOL_ACCEPTED if self.negotiated else 0)
            return [encode_keyboard_message(KeyboardMessageType.PROTOCOL_RESPONSE, status.pack())]
        if msg_type != KeyboardMessageType.LED_INDICATORS:
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
        """One KEYSTROKE (see `encode_keystroke`); None, counted in
        dropped_keystrokes, before the guest negotiated."""
        return self.admit(encode_keystroke(scan_code, down=down, e0=e0, e1=e1, unicode=unicode))

    def admit(self, keystroke: bytes) -> bytes | None:
        """An encoded keystroke if the guest may receive it now, else None
        (counted): for a VSP that encodes on the injecting thread."""
        if not self.negotiated:
            self.dropped_keystrokes += 1
            return None
        return keystroke


class MouseState(Enum):
    WAIT_PROTOCOL = "waiting for an acceptable PROTOCOL_REQUEST"
    WAIT_ACK = "waiting for INITIAL_DEVICE_INFO_ACK"
    READY = "ready"


# What a guest may send: its exact body size, and (state, type) -> next state.
_GUEST_BODY_SIZES: dict[int, int] = {
    HidMessageType.PROTOCOL_REQUEST: HidProtocolRequest.SIZE,
    HidMessageType.INITIAL_DEVICE_INFO_ACK: DeviceInfoAck.SIZE,
}
_TRANSITIONS = {
    **{(s, HidMessageType.PROTOCOL_REQUEST): MouseState.WAIT_ACK for s in MouseState},
    (MouseState.WAIT_ACK, HidMessageType.INITIAL_DEVICE_INFO_ACK): MouseState.READY,
}


class MouseServer(_Server):
    """The VSP side of one mouse."""

    def __init__(self, info: HvInputDevInfo | None = None) -> None:
        super().__init__()
        self.state = MouseState.WAIT_PROTOCOL
        body = device_info_body(info)
        self.device_info = encode_hid_message(HidMessageType.INITIAL_DEVICE_INFO, body)
        if len(self.device_info) > MAX_HOST_PAYLOAD:
            raise UsageError(f"INITIAL_DEVICE_INFO of {len(self.device_info)} bytes")
        self.dropped_reports = 0  # reports asked for before the guest was ready

    def receive(self, payload: Buffer) -> list[bytes]:
        view = memoryview(payload).cast("B")
        if len(view) > MAX_GUEST_PAYLOAD:
            return self._drop("oversize", f"{len(view)}-byte message, cap {MAX_GUEST_PAYLOAD}")
        try:
            msg_type, body = decode_hid_message(view)
        except WireError as error:
            return self._drop("malformed", str(error))
        expected = _GUEST_BODY_SIZES.get(msg_type)
        if expected is None:
            return self._drop("unsupported", f"message type {msg_type!r} from a guest")
        if len(body) != expected:
            kind = "oversize" if len(body) > expected else "malformed"
            return self._drop(kind, f"{msg_type!r} body of {len(body)} bytes, not {expected}")
        after = _TRANSITIONS.get((self.state, HidMessageType(msg_type)))
        if after is None:
            return self._drop("out_of_order", f"{msg_type!r} while {self.state.value}")
        if msg_type == HidMessageType.PROTOCOL_REQUEST:
            version = HidProtocolRequest.unpack(body).version
            approved = version == SYNTHHID_INPUT_VERSION
            self.state = after if approved else MouseState.WAIT_PROTOCOL
            reply = encode_protocol_response(version, approved)
            return [reply, self.device_info] if approved else [reply]
        self.state = after
        return []

    @property
    def ready(self) -> bool:
        return self.state == MouseState.READY

    def report(self, x: int, y: int, buttons: int, wheel: int = 0) -> bytes | None:
        """An INPUT_REPORT (see `encode_mouse_report`); None, counted in
        dropped_reports, until the guest has acknowledged the device info."""
        return self.admit(encode_mouse_report(x, y, buttons, wheel))

    def admit(self, report: bytes) -> bytes | None:
        """An encoded report if the guest may receive it now, else None
        (counted): for a VSP that encodes on the injecting thread."""
        if not self.ready:
            self.dropped_reports += 1
            return None
        return report
