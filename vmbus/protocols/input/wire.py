"""Input wire formats: the synthetic keyboard and the synthetic HID mouse.

Sources: docs/protocol.md §7.1 (drivers/input/serio/hyperv-keyboard.c, with
FreeBSD's hv_kbdc.c), §7.2 (drivers/hid/hid-hyperv.c) and §10.1 (FreeBSD's
hv_hid.c).

Keyboard: no pipe header; each inband payload is a u32 message type and a
body. HID: every message is a pipe header, a synthhid header whose size
counts the body only, then the body. The pipe header is declared here once;
synthvid frames its messages with it too.

Both devices answer inband, never with completions: Linux ignores
completions on these channels and FreeBSD logs them as unhandled.

Choices where the sources leave room:
- The keyboard's LED_INDICATORS has no known layout: its body stays raw.
- HID PROTOCOL_RESPONSE keeps Linux's sizes (pipe 13, synthhid 5) and is
  padded with zeros to a 24-byte payload: FreeBSD reads {version u32,
  approved u32} and wants exactly 24 bytes, Linux accepts up to 24.
- The report descriptor is ours (Hyper-V's is not in the sources): an
  absolute pointer, 3 buttons, a wheel; input report {buttons u8, x u16,
  y u16, wheel s8}.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Annotated

from vmbus.errors import UsageError
from vmbus.memory import PAGE_SIZE
from vmbus.wire import U8, U16, U32, Bytes, Fmt, WireError, WireStruct, open_enum, wire_struct

Buffer = bytes | bytearray | memoryview
I8 = Fmt("b")

# The default max_pkt_size of these channels less the packet descriptor:
# every host-to-guest payload must fit (§7.2).
MAX_HOST_PAYLOAD = PAGE_SIZE - 16

# ============================================================================
# Keyboard (§7.1)
# ============================================================================

SYNTH_KBD_VERSION = 0x0001_0000  # 1.0: major << 16 | minor
PROTOCOL_ACCEPTED = 0x1  # proto_status bit 0
KEYBOARD_HEADER_SIZE = 4
HK_MAXIMUM_MESSAGE_SIZE = 256  # Linux's own bound on a keyboard message
MAX_MAKE_CODE = 0x7F  # set-1 make codes; bit 7 is the break bit Linux adds
MAX_UTF16_UNIT = 0xFFFF


class KeyboardMessageType(IntEnum):
    """enum synth_kbd_msg_type. Open: unknown values stay ints."""

    PROTOCOL_REQUEST = 1
    PROTOCOL_RESPONSE = 2
    EVENT = 3  # a keystroke
    LED_INDICATORS = 4


def keyboard_message_type(value: int) -> KeyboardMessageType | int:
    """Open enum: the member for a known value, else the int."""
    return open_enum(KeyboardMessageType, value)


class KeystrokeInfo(IntFlag):
    """synth_kbd_keystroke.info bits."""

    IS_UNICODE = 0x1  # make_code is a UTF-16 unit
    IS_BREAK = 0x2  # key released
    IS_E0 = 0x4
    IS_E1 = 0x8


@wire_struct(size=KEYBOARD_HEADER_SIZE)
@dataclass(frozen=True)
class KeyboardHeader(WireStruct):
    """struct synth_kbd_msg_hdr { __le32 type; };"""

    type: Annotated[int, U32]


@wire_struct(size=4)
@dataclass(frozen=True)
class KeyboardProtocolRequest(WireStruct):
    """struct synth_kbd_protocol_request { header; union synth_kbd_version
    version_requested; }; (the body after the header)"""

    version: Annotated[int, U32]


@wire_struct(size=4)
@dataclass(frozen=True)
class KeyboardProtocolResponse(WireStruct):
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


KEYSTROKE_PAYLOAD = KEYBOARD_HEADER_SIZE + Keystroke.SIZE
KEYBOARD_RESPONSE_PAYLOAD = KEYBOARD_HEADER_SIZE + KeyboardProtocolResponse.SIZE


def encode_keyboard_message(msg_type: int, body: bytes) -> bytes:
    return KeyboardHeader(msg_type).pack() + body


def decode_keyboard_message(payload: Buffer) -> tuple[KeyboardMessageType | int, bytes]:
    """(type, body); WireError when there is no header."""
    view = memoryview(payload).cast("B")
    header = KeyboardHeader.unpack_from(view)
    return keyboard_message_type(header.type), bytes(view[KEYBOARD_HEADER_SIZE:])


def encode_keystroke(
    scan_code: int, *, down: bool, e0: bool = False, e1: bool = False, unicode: bool = False
) -> bytes:
    """One EVENT message: a set-1 make code (or a UTF-16 unit with
    `unicode`) pressed or released. UsageError for a code no key has."""
    limit = MAX_UTF16_UNIT if unicode else MAX_MAKE_CODE
    if not 0 <= scan_code <= limit:
        raise UsageError(f"scan code {scan_code:#x} is not in 0..{limit:#x}")
    if e0 and e1:
        raise UsageError("a scan code has one prefix, E0 or E1")
    info = (
        (KeystrokeInfo.IS_UNICODE if unicode else 0)
        | (0 if down else KeystrokeInfo.IS_BREAK)
        | (KeystrokeInfo.IS_E0 if e0 else 0)
        | (KeystrokeInfo.IS_E1 if e1 else 0)
    )
    return encode_keyboard_message(KeyboardMessageType.EVENT, Keystroke(scan_code, 0, info).pack())


# ============================================================================
# HID mouse (§7.2, §10.1)
# ============================================================================

PIPE_MESSAGE_DATA = 1  # enum pipe_prot_msg_type; 0 is INVALID
PIPE_HEADER_SIZE = 8
SYNTHHID_HEADER_SIZE = 8
HID_MESSAGE_OVERHEAD = PIPE_HEADER_SIZE + SYNTHHID_HEADER_SIZE
SYNTHHID_INPUT_VERSION = 0x0002_0000  # 2.0: major << 16 | minor
HV_INPUT_DEV_INFO_SIZE = 32
HID_DESCRIPTOR_SIZE = 9
HID_DT_HID = 0x21
HID_DT_REPORT = 0x22
HID_BCD_VERSION = 0x0111  # HID 1.11
MOUSE_VENDOR = 0x045E  # Microsoft: Linux's hid-hyperv binds to 045E:0621
MOUSE_PRODUCT = 0x0621
MOUSE_VERSION = 0x0001  # [U] the value Hyper-V sends is unknown; guests only copy it

PROTOCOL_RESPONSE_PAYLOAD = 24  # FreeBSD's exact size, Linux's maximum (§10.1)
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


class HidMessageType(IntEnum):
    """enum synthhid_msg_type. Open: unknown values stay ints."""

    PROTOCOL_REQUEST = 0
    PROTOCOL_RESPONSE = 1
    INITIAL_DEVICE_INFO = 2
    INITIAL_DEVICE_INFO_ACK = 3
    INPUT_REPORT = 4


def hid_message_type(value: int) -> HidMessageType | int:
    """Open enum: the member for a known value, else the int."""
    return open_enum(HidMessageType, value)


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
class HidProtocolRequest(WireStruct):
    """struct synthhid_protocol_request { header; union synthhid_version version_requested; };
    (the body after the header; version = major << 16 | minor)"""

    version: Annotated[int, U32]


@wire_struct(size=5)
@dataclass(frozen=True)
class HidProtocolResponse(WireStruct):
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


MOUSE_REPORT_PAYLOAD = HID_MESSAGE_OVERHEAD + MouseReport.SIZE


def encode_hid_message(msg_type: int, body: bytes) -> bytes:
    """Pipe header, synthhid header, body."""
    return (
        PipeHeader(PIPE_MESSAGE_DATA, SYNTHHID_HEADER_SIZE + len(body)).pack()
        + SynthhidHeader(msg_type, len(body)).pack()
        + body
    )


def decode_hid_message(payload: Buffer) -> tuple[HidMessageType | int, bytes]:
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
    start = HID_MESSAGE_OVERHEAD
    return hid_message_type(header.type), bytes(view[start : start + header.size])


def encode_protocol_response(version: int, approved: bool) -> bytes:
    """PROTOCOL_RESPONSE, padded to the 24 bytes FreeBSD wants."""
    body = HidProtocolResponse(version, int(approved)).pack()
    message = encode_hid_message(HidMessageType.PROTOCOL_RESPONSE, body)
    return message.ljust(PROTOCOL_RESPONSE_PAYLOAD, b"\0")


def encode_mouse_report(x: int, y: int, buttons: int, wheel: int = 0) -> bytes:
    """One INPUT_REPORT: an absolute position (0..ABS_MAX on each axis),
    buttons (bits 0-2) and wheel clicks. UsageError when out of range."""
    if not (0 <= x <= ABS_MAX and 0 <= y <= ABS_MAX):
        raise UsageError(f"position ({x}, {y}) is not in 0..{ABS_MAX}")
    if buttons & ~BUTTONS_MASK or not -WHEEL_MAX <= wheel <= WHEEL_MAX:
        raise UsageError(f"buttons {buttons:#x} or wheel {wheel} out of range")
    body = MouseReport(buttons, x, y, wheel).pack()
    return encode_hid_message(HidMessageType.INPUT_REPORT, body)


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


DEVICE_INFO_PAYLOAD = HID_MESSAGE_OVERHEAD + len(device_info_body())
