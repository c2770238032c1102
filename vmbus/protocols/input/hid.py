"""Synthetic HID, the Hyper-V mouse: wire structs, the VSP state machine
(sans-I/O) and a VSC.

Source: PROTOCOL-FACTS §7.2 (drivers/hid/hid-hyperv.c) and §10 (FreeBSD
sys/dev/hyperv/input/hv_hid.c). Every message is a pipe header, a synthhid
header whose size counts the body only, then the body. The pipe header is
declared here once; synthvid imports it.

Sequence: the guest sends PROTOCOL_REQUEST; the VSP answers PROTOCOL_RESPONSE
and then INITIAL_DEVICE_INFO (vendor/product ids, a HID descriptor and the
report descriptor below); the guest sends INITIAL_DEVICE_INFO_ACK; from then
on the VSP sends INPUT_REPORTs. Replies go inband, not as completions: Linux
ignores completions and FreeBSD logs them as unhandled.

Choices where the sources leave room:
- PROTOCOL_RESPONSE keeps Linux's sizes (pipe 13, synthhid 5) and is padded
  with zeros to a 24-byte payload: FreeBSD reads {version u32, approved u32}
  and wants exactly 24 bytes, Linux accepts up to 24.
- The report descriptor is ours (Hyper-V's is not in the sources): an
  absolute pointer, 3 buttons, a wheel; input report {buttons u8, x u16,
  y u16, wheel s8}.
- A PROTOCOL_REQUEST in any state starts over (a guest resuming from
  hibernation renegotiates); a refused one leaves the device unusable.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Annotated

from vmbus.wire import U8, U16, U32, Bytes, Fmt, WireError, WireStruct, open_enum, wire_struct

Buffer = bytes | bytearray | memoryview
I8 = Fmt("b")

# Framing and ids (§7.2, hid-hyperv.c).
PIPE_MESSAGE_DATA = 1  # enum pipe_prot_msg_type; 0 is INVALID
PIPE_HEADER_SIZE = 8
SYNTHHID_HEADER_SIZE = 8
SYNTHHID_INPUT_VERSION = 0x0002_0000  # 2.0: major << 16 | minor
HV_INPUT_DEV_INFO_SIZE = 32
HID_DESCRIPTOR_SIZE = 9
HID_DT_HID = 0x21
HID_DT_REPORT = 0x22
HID_BCD_VERSION = 0x0111  # HID 1.11
MOUSE_VENDOR = 0x045E  # Microsoft: Linux's hid-hyperv binds to 045E:0621
MOUSE_PRODUCT = 0x0621
MOUSE_VERSION = 0x0001  # [U] the value Hyper-V sends is unknown; guests only copy it

# Caps and limits.
PROTOCOL_RESPONSE_PAYLOAD = 24  # FreeBSD's exact size, Linux's maximum (§10)
MAX_HOST_PAYLOAD = 4096 - 16  # default max_pkt_size less the packet descriptor
MAX_GUEST_PAYLOAD = 64  # guests send 20 and 17 bytes; room for ring padding
ABS_MAX = 32767  # logical maximum of X and Y
WHEEL_MAX = 127  # wheel logical range is -WHEEL_MAX..WHEEL_MAX
BUTTONS_MASK = 0x07  # three buttons

# The report descriptor. Linux rewrites byte 14 when it is 0x25 (its SA-167
# workaround for Hyper-V's own descriptor); here byte 14 is 0x29 already.
# fmt: off
MOUSE_REPORT_DESCRIPTOR = bytes([
    0x05, 0x01,        # Usage Page (Generic Desktop)
    0x09, 0x02,        # Usage (Mouse)
    0xA1, 0x01,        # Collection (Application)
    0x09, 0x01,        #   Usage (Pointer)
    0xA1, 0x00,        #   Collection (Physical)
    0x05, 0x09,        #     Usage Page (Button)
    0x19, 0x01,        #     Usage Minimum (1)
    0x29, 0x03,        #     Usage Maximum (3)
    0x15, 0x00,        #     Logical Minimum (0)
    0x25, 0x01,        #     Logical Maximum (1)
    0x95, 0x03,        #     Report Count (3)
    0x75, 0x01,        #     Report Size (1)
    0x81, 0x02,        #     Input (Data, Var, Abs): buttons 1-3
    0x95, 0x01,        #     Report Count (1)
    0x75, 0x05,        #     Report Size (5)
    0x81, 0x03,        #     Input (Const): padding to a byte
    0x05, 0x01,        #     Usage Page (Generic Desktop)
    0x09, 0x30,        #     Usage (X)
    0x09, 0x31,        #     Usage (Y)
    0x15, 0x00,        #     Logical Minimum (0)
    0x26, 0xFF, 0x7F,  #     Logical Maximum (32767)
    0x75, 0x10,        #     Report Size (16)
    0x95, 0x02,        #     Report Count (2)
    0x81, 0x02,        #     Input (Data, Var, Abs): X, Y
    0x09, 0x38,        #     Usage (Wheel)
    0x15, 0x81,        #     Logical Minimum (-127)
    0x25, 0x7F,        #     Logical Maximum (127)
    0x75, 0x08,        #     Report Size (8)
    0x95, 0x01,        #     Report Count (1)
    0x81, 0x06,        #     Input (Data, Var, Rel): wheel
    0xC0,              #   End Collection
    0xC0,              # End Collection
])
# fmt: on
if MOUSE_REPORT_DESCRIPTOR[14] == 0x25:
    raise TypeError("Linux would rewrite byte 14 of the report descriptor")


class MessageType(IntEnum):
    """enum synthhid_msg_type (§7.2). Open: unknown values stay ints."""

    PROTOCOL_REQUEST = 0
    PROTOCOL_RESPONSE = 1
    INITIAL_DEVICE_INFO = 2
    INITIAL_DEVICE_INFO_ACK = 3
    INPUT_REPORT = 4


def message_type(value: int) -> MessageType | int:
    """Open enum: the MessageType member for a known value, else the int."""
    return open_enum(MessageType, value)


@wire_struct(size=PIPE_HEADER_SIZE)
@dataclass(frozen=True)
class PipeHeader(WireStruct):
    """struct pipe_prt_msg { enum pipe_prot_msg_type type; u32 size; char data[]; };
    (synthvid's struct pipe_msg_hdr is the same). size = bytes after it."""

    type: Annotated[int, U32]
    size: Annotated[int, U32]


@wire_struct(size=SYNTHHID_HEADER_SIZE)
@dataclass(frozen=True)
class SynthhidHeader(WireStruct):
    """struct synthhid_msg_hdr { enum synthhid_msg_type type; u32 size; };
    size = bytes of the body after it."""

    type: Annotated[int, U32]
    size: Annotated[int, U32]


@wire_struct(size=4)
@dataclass(frozen=True)
class ProtocolRequest(WireStruct):
    """struct synthhid_protocol_request { header; union synthhid_version version_requested; };
    (the body after the header; version = major << 16 | minor)"""

    version: Annotated[int, U32]


@wire_struct(size=5)
@dataclass(frozen=True)
class ProtocolResponse(WireStruct):
    """struct synthhid_protocol_response { header; union synthhid_version
    version_requested; unsigned char approved; } (packed; the body)"""

    version: Annotated[int, U32]
    approved: Annotated[int, U8]


@wire_struct(size=HV_INPUT_DEV_INFO_SIZE)
@dataclass(frozen=True)
class HvInputDevInfo(WireStruct):
    """struct hv_input_dev_info { unsigned int size; unsigned short vendor;
    unsigned short product; unsigned short version; unsigned short reserved[11]; };"""

    size: Annotated[int, U32] = HV_INPUT_DEV_INFO_SIZE
    vendor: Annotated[int, U16] = MOUSE_VENDOR
    product: Annotated[int, U16] = MOUSE_PRODUCT
    version: Annotated[int, U16] = MOUSE_VERSION
    reserved: Annotated[bytes, Bytes(22)] = bytes(22)

    def __post_init__(self) -> None:
        if len(self.reserved) != 22:  # struct would pad or cut it silently
            raise WireError(f"reserved is 22 bytes, got {len(self.reserved)}")


@wire_struct(size=HID_DESCRIPTOR_SIZE)
@dataclass(frozen=True)
class HidDescriptor(WireStruct):
    """struct hid_descriptor { u8 bLength; u8 bDescriptorType; __le16 bcdHID;
    u8 bCountryCode; u8 bNumDescriptors; struct hid_class_descriptor
    { u8 bDescriptorType; __le16 wDescriptorLength; } rpt_desc; } __packed;"""

    length: Annotated[int, U8] = HID_DESCRIPTOR_SIZE  # guests find the report descriptor by it
    descriptor_type: Annotated[int, U8] = HID_DT_HID
    bcd_hid: Annotated[int, U16] = HID_BCD_VERSION
    country_code: Annotated[int, U8] = 0
    num_descriptors: Annotated[int, U8] = 1
    report_descriptor_type: Annotated[int, U8] = HID_DT_REPORT
    report_descriptor_length: Annotated[int, U16] = len(MOUSE_REPORT_DESCRIPTOR)


@wire_struct(size=1)
@dataclass(frozen=True)
class DeviceInfoAck(WireStruct):
    """struct synthhid_device_info_ack { header; unsigned char reserved; };"""

    reserved: Annotated[int, U8] = 0


@wire_struct(size=6)
@dataclass(frozen=True)
class MouseReport(WireStruct):
    """The input report MOUSE_REPORT_DESCRIPTOR declares."""

    buttons: Annotated[int, U8]
    x: Annotated[int, U16]
    y: Annotated[int, U16]
    wheel: Annotated[int, I8] = 0


def encode_message(msg_type: int, body: bytes) -> bytes:
    """Pipe header, synthhid header, body."""
    return (
        PipeHeader(PIPE_MESSAGE_DATA, SYNTHHID_HEADER_SIZE + len(body)).pack()
        + SynthhidHeader(msg_type, len(body)).pack()
        + body
    )


def decode_message(payload: Buffer) -> tuple[MessageType | int, bytes]:
    """(type, body) of one message; bytes past the declared sizes (ring
    padding) are ignored. WireError when the framing does not add up."""
    view = memoryview(payload).cast("B")
    pipe = PipeHeader.unpack_from(view)
    if pipe.type != PIPE_MESSAGE_DATA:
        raise WireError(f"pipe message type {pipe.type}, not DATA")
    if not SYNTHHID_HEADER_SIZE <= pipe.size <= len(view) - PIPE_HEADER_SIZE:
        raise WireError(f"pipe size {pipe.size} in a {len(view)}-byte payload")
    header = SynthhidHeader.unpack_from(view, PIPE_HEADER_SIZE)
    if header.size > pipe.size - SYNTHHID_HEADER_SIZE:
        raise WireError(f"synthhid size {header.size} over pipe size {pipe.size}")
    start = PIPE_HEADER_SIZE + SYNTHHID_HEADER_SIZE
    return message_type(header.type), bytes(view[start : start + header.size])


def input_report_bits(descriptor: bytes) -> int:
    """Bits in the input report a report descriptor declares (the sum of
    Report Size x Report Count at each Input item). Report IDs and
    Push/Pop are not supported: WireError."""
    bits = size = count = 0
    at = 0
    while at < len(descriptor):
        prefix = descriptor[at]
        if prefix == 0xFE:  # long item: data size in the next byte
            if at + 1 >= len(descriptor):
                raise WireError("truncated long item")
            at += 3 + descriptor[at + 1]
            continue
        length = (0, 1, 2, 4)[prefix & 3]
        if at + 1 + length > len(descriptor):
            raise WireError(f"truncated item at byte {at}")
        value = int.from_bytes(descriptor[at + 1 : at + 1 + length], "little")
        item = prefix & 0xFC
        if item == 0x74:  # Report Size
            size = value
        elif item == 0x94:  # Report Count
            count = value
        elif item in (0x84, 0xA4, 0xB4):  # Report ID, Push, Pop
            raise WireError(f"item {item:#04x} is not supported")
        elif item == 0x80:  # Input
            bits += size * count
        at += 1 + length
    return bits


def device_info_body(
    info: HvInputDevInfo | None = None, report_descriptor: bytes = MOUSE_REPORT_DESCRIPTOR
) -> bytes:
    """The INITIAL_DEVICE_INFO body: device info, HID descriptor, report descriptor."""
    hid = HidDescriptor(report_descriptor_length=len(report_descriptor))
    return (info or HvInputDevInfo()).pack() + hid.pack() + report_descriptor


# --- The VSP side -----------------------------------------------------------


class MouseState(Enum):
    WAIT_PROTOCOL = "waiting for an acceptable PROTOCOL_REQUEST"
    WAIT_ACK = "waiting for INITIAL_DEVICE_INFO_ACK"
    READY = "ready"


# What a guest may send: its exact body size, and (state, type) -> next state.
_GUEST_BODY_SIZES: dict[int, int] = {
    MessageType.PROTOCOL_REQUEST: ProtocolRequest.SIZE,
    MessageType.INITIAL_DEVICE_INFO_ACK: DeviceInfoAck.SIZE,
}
_TRANSITIONS = {
    **{(s, MessageType.PROTOCOL_REQUEST): MouseState.WAIT_ACK for s in MouseState},
    (MouseState.WAIT_ACK, MessageType.INITIAL_DEVICE_INFO_ACK): MouseState.READY,
}


class MouseServer:
    """The VSP side of one mouse. `receive` takes one inband payload from the
    guest and returns the payloads to send; a bad message is dropped and
    counted in `errors` (the reason in `last_error`), never raised."""

    def __init__(self, info: HvInputDevInfo | None = None) -> None:
        self.state = MouseState.WAIT_PROTOCOL
        self.device_info = encode_message(MessageType.INITIAL_DEVICE_INFO, device_info_body(info))
        if len(self.device_info) > MAX_HOST_PAYLOAD:
            raise ValueError(f"INITIAL_DEVICE_INFO of {len(self.device_info)} bytes")
        self.errors: Counter[str] = Counter()
        self.last_error: str | None = None
        self.dropped_reports = 0  # reports asked for before the guest was ready

    def _drop(self, kind: str, reason: str) -> list[bytes]:
        self.errors[kind] += 1
        self.last_error = reason
        return []

    def receive(self, payload: Buffer) -> list[bytes]:
        view = memoryview(payload).cast("B")
        if len(view) > MAX_GUEST_PAYLOAD:
            return self._drop("oversize", f"{len(view)}-byte message, cap {MAX_GUEST_PAYLOAD}")
        try:
            msg_type, body = decode_message(view)
        except WireError as error:
            return self._drop("malformed", str(error))
        expected = _GUEST_BODY_SIZES.get(msg_type)
        if expected is None:
            return self._drop("unsupported", f"message type {msg_type!r} from a guest")
        if len(body) != expected:
            kind = "oversize" if len(body) > expected else "malformed"
            return self._drop(kind, f"{msg_type!r} body of {len(body)} bytes, not {expected}")
        after = _TRANSITIONS.get((self.state, MessageType(msg_type)))
        if after is None:
            return self._drop("out_of_order", f"{msg_type!r} while {self.state.value}")
        if msg_type == MessageType.PROTOCOL_REQUEST:
            version = ProtocolRequest.unpack(body).version
            approved = version == SYNTHHID_INPUT_VERSION
            self.state = after if approved else MouseState.WAIT_PROTOCOL
            response = ProtocolResponse(version, int(approved)).pack()
            reply = encode_message(MessageType.PROTOCOL_RESPONSE, response)
            reply = reply.ljust(PROTOCOL_RESPONSE_PAYLOAD, b"\0")
            return [reply, self.device_info] if approved else [reply]
        self.state = after
        return []

    @property
    def ready(self) -> bool:
        return self.state == MouseState.READY

    def report(self, x: int, y: int, buttons: int, wheel: int = 0) -> bytes | None:
        """An INPUT_REPORT; None (counted in dropped_reports) until the guest
        has acknowledged the device info."""
        if not (0 <= x <= ABS_MAX and 0 <= y <= ABS_MAX):
            raise ValueError(f"position ({x}, {y}) is not in 0..{ABS_MAX}")
        if buttons & ~BUTTONS_MASK or not -WHEEL_MAX <= wheel <= WHEEL_MAX:
            raise ValueError(f"buttons {buttons:#x} or wheel {wheel} out of range")
        if not self.ready:
            self.dropped_reports += 1
            return None
        return encode_message(MessageType.INPUT_REPORT, MouseReport(buttons, x, y, wheel).pack())


# --- The VSC side -----------------------------------------------------------


class HidProtocolError(ValueError):
    """The VSP sent something a mouse VSC cannot use (a remote error)."""


@dataclass(frozen=True)
class MouseEvent:
    x: int
    y: int
    buttons: int
    wheel: int = 0


class MouseClient:
    """The VSC side: `request()` is the first message; `receive` returns
    the messages to send back and the decoded input report, if any."""

    def __init__(self) -> None:
        self.approved: bool | None = None
        self.info: HvInputDevInfo | None = None
        self.hid_descriptor: HidDescriptor | None = None
        self.report_descriptor: bytes | None = None

    def request(self, version: int = SYNTHHID_INPUT_VERSION) -> bytes:
        return encode_message(MessageType.PROTOCOL_REQUEST, ProtocolRequest(version).pack())

    def receive(self, payload: Buffer) -> tuple[list[bytes], MouseEvent | None]:
        try:
            msg_type, body = decode_message(payload)
            if msg_type == MessageType.PROTOCOL_RESPONSE:
                self.approved = bool(ProtocolResponse.unpack(body).approved)
                return [], None
            if msg_type == MessageType.INITIAL_DEVICE_INFO:
                self._device_info(body)
                ack = encode_message(MessageType.INITIAL_DEVICE_INFO_ACK, DeviceInfoAck().pack())
                return [ack], None
            if msg_type == MessageType.INPUT_REPORT and self.report_descriptor is not None:
                report = MouseReport.unpack(body)
                return [], MouseEvent(report.x, report.y, report.buttons, report.wheel)
        except WireError as error:
            raise HidProtocolError(str(error)) from None
        raise HidProtocolError(f"unexpected message type {msg_type!r}")

    def _device_info(self, body: bytes) -> None:
        self.info = HvInputDevInfo.unpack(body)
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
        self.hid_descriptor, self.report_descriptor = hid, descriptor
