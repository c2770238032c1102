"""Input: the synthetic keyboard and the synthetic HID mouse, wire formats
and sans-I/O state machines of both sides.

- `wire`: the structs, open enums, constants and codecs of both devices
  (the HID pipe header, which synthvid shares, is declared there once);
- `vsp`: `KeyboardServer`, `MouseServer`, the VSP sides;
- `vsc`: `KeyboardClient`, `MouseClient`, the VSC sides, their events
  and errors;
- `scancodes`: X11 keysyms (what a VNC client sends) to set-1 scan codes.

The names below are what a device or a test imports; every struct is in
`vmbus.protocols.input.wire`.
"""

from vmbus.protocols.input.scancodes import KEYSYM_TO_SCANCODE, ScanCode, keysym_to_scancode
from vmbus.protocols.input.vsc import (
    HidProtocolError,
    KeyboardClient,
    KeyboardProtocolError,
    KeyEvent,
    MouseClient,
    MouseEvent,
)
from vmbus.protocols.input.vsp import KeyboardServer, MouseServer, MouseState
from vmbus.protocols.input.wire import (
    ABS_MAX,
    BUTTONS_MASK,
    MOUSE_REPORT_DESCRIPTOR,
    PIPE_HEADER_SIZE,
    PIPE_MESSAGE_DATA,
    SYNTH_KBD_VERSION,
    SYNTHHID_INPUT_VERSION,
    WHEEL_MAX,
    Buffer,
    HidMessageType,
    KeyboardMessageType,
    PipeHeader,
    decode_hid_message,
    decode_keyboard_message,
    encode_hid_message,
    encode_keyboard_message,
    encode_keystroke,
    encode_mouse_report,
)

__all__ = [
    "ABS_MAX",
    "BUTTONS_MASK",
    "KEYSYM_TO_SCANCODE",
    "MOUSE_REPORT_DESCRIPTOR",
    "PIPE_HEADER_SIZE",
    "PIPE_MESSAGE_DATA",
    "SYNTHHID_INPUT_VERSION",
    "SYNTH_KBD_VERSION",
    "WHEEL_MAX",
    "Buffer",
    "HidMessageType",
    "HidProtocolError",
    "KeyEvent",
    "KeyboardClient",
    "KeyboardMessageType",
    "KeyboardProtocolError",
    "KeyboardServer",
    "MouseClient",
    "MouseEvent",
    "MouseServer",
    "MouseState",
    "PipeHeader",
    "ScanCode",
    "decode_hid_message",
    "decode_keyboard_message",
    "encode_hid_message",
    "encode_keyboard_message",
    "encode_keystroke",
    "encode_mouse_report",
    "keysym_to_scancode",
]
