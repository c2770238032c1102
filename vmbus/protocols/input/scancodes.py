"""X11 keysyms (what a VNC client sends) to PC/XT set-1 scan codes (what the
synthetic keyboard carries) for a US keyboard.

Source: the standard IBM PC/XT "scan code set 1" make codes of the 101/104-key
US layout (break code = make | 0x80; extended keys carry an E0 prefix), as
used by the i8042 and by Linux's atkbd translation; keysym values from
X11's keysymdef.h (Latin-1 keysyms equal their character codes).

A keysym names a symbol, a scan code a key: an uppercase letter or a shifted
symbol maps to its unshifted key, because the VNC client sends Shift as a
key of its own.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["KEYSYM_TO_SCANCODE", "ScanCode", "keysym_to_scancode"]


class ScanCode(NamedTuple):
    make_code: int  # set-1 make code, 0x01..0x7F
    e0: bool = False  # extended key: sent with the E0 prefix


# Printable keys, row by row: (unshifted, shifted, first make code); the
# codes run consecutively along each row.
_ROWS = (
    ("1234567890-=", "!@#$%^&*()_+", 0x02),
    ("qwertyuiop[]", "QWERTYUIOP{}", 0x10),
    ("asdfghjkl;'`", 'ASDFGHJKL:"~', 0x1E),
    ("\\zxcvbnm,./", "|ZXCVBNM<>?", 0x2B),
)

# Named keysyms (keysymdef.h) -> make code and E0 prefix.
_NAMED: dict[int, ScanCode] = {
    0x0020: ScanCode(0x39),  # space
    0xFF08: ScanCode(0x0E),  # BackSpace
    0xFF09: ScanCode(0x0F),  # Tab
    0xFE20: ScanCode(0x0F),  # ISO_Left_Tab (Shift+Tab)
    0xFF0D: ScanCode(0x1C),  # Return
    0xFF1B: ScanCode(0x01),  # Escape
    0xFFE1: ScanCode(0x2A),  # Shift_L
    0xFFE2: ScanCode(0x36),  # Shift_R
    0xFFE3: ScanCode(0x1D),  # Control_L
    0xFFE4: ScanCode(0x1D, True),  # Control_R
    0xFFE5: ScanCode(0x3A),  # Caps_Lock
    0xFFE7: ScanCode(0x38),  # Meta_L (sent by some clients for Alt)
    0xFFE8: ScanCode(0x38, True),  # Meta_R
    0xFFE9: ScanCode(0x38),  # Alt_L
    0xFFEA: ScanCode(0x38, True),  # Alt_R
    0xFE03: ScanCode(0x38, True),  # ISO_Level3_Shift (AltGr)
    0xFFEB: ScanCode(0x5B, True),  # Super_L
    0xFFEC: ScanCode(0x5C, True),  # Super_R
    0xFF67: ScanCode(0x5D, True),  # Menu
    0xFF7F: ScanCode(0x45),  # Num_Lock
    0xFF14: ScanCode(0x46),  # Scroll_Lock
    0xFF61: ScanCode(0x37, True),  # Print
    # Navigation keys (the grey ones, E0)
    0xFF50: ScanCode(0x47, True),  # Home
    0xFF51: ScanCode(0x4B, True),  # Left
    0xFF52: ScanCode(0x48, True),  # Up
    0xFF53: ScanCode(0x4D, True),  # Right
    0xFF54: ScanCode(0x50, True),  # Down
    0xFF55: ScanCode(0x49, True),  # Page_Up (Prior)
    0xFF56: ScanCode(0x51, True),  # Page_Down (Next)
    0xFF57: ScanCode(0x4F, True),  # End
    0xFF63: ScanCode(0x52, True),  # Insert
    0xFFFF: ScanCode(0x53, True),  # Delete
    # Keypad: operators and Enter
    0xFFAA: ScanCode(0x37),  # KP_Multiply
    0xFFAB: ScanCode(0x4E),  # KP_Add
    0xFFAD: ScanCode(0x4A),  # KP_Subtract
    0xFFAF: ScanCode(0x35, True),  # KP_Divide
    0xFF8D: ScanCode(0x1C, True),  # KP_Enter
}

# Keypad digits and their Num Lock-off names share keys (no E0):
# (KP_n keysym, Num Lock-off keysym, make code).
_KEYPAD = (
    (0xFFB7, 0xFF95, 0x47),  # KP_7, KP_Home
    (0xFFB8, 0xFF97, 0x48),  # KP_8, KP_Up
    (0xFFB9, 0xFF9A, 0x49),  # KP_9, KP_Page_Up
    (0xFFB4, 0xFF96, 0x4B),  # KP_4, KP_Left
    (0xFFB5, 0xFF9D, 0x4C),  # KP_5, KP_Begin
    (0xFFB6, 0xFF98, 0x4D),  # KP_6, KP_Right
    (0xFFB1, 0xFF9C, 0x4F),  # KP_1, KP_End
    (0xFFB2, 0xFF99, 0x50),  # KP_2, KP_Down
    (0xFFB3, 0xFF9B, 0x51),  # KP_3, KP_Page_Down
    (0xFFB0, 0xFF9E, 0x52),  # KP_0, KP_Insert
    (0xFFAE, 0xFF9F, 0x53),  # KP_Decimal, KP_Delete
)

F1, F11, F12 = 0xFFBE, 0xFFC8, 0xFFC9  # keysyms


def _build() -> dict[int, ScanCode]:
    table = dict(_NAMED)
    for plain, shifted, first in _ROWS:
        for offset, (low, high) in enumerate(zip(plain, shifted, strict=True)):
            table[ord(low)] = table[ord(high)] = ScanCode(first + offset)
    for digit, other, code in _KEYPAD:
        table[digit] = table[other] = ScanCode(code)
    for n in range(10):  # F1..F10 are 0x3B..0x44; F11, F12 come after the keypad
        table[F1 + n] = ScanCode(0x3B + n)
    table[F11], table[F12] = ScanCode(0x57), ScanCode(0x58)
    return table


KEYSYM_TO_SCANCODE: dict[int, ScanCode] = _build()


def keysym_to_scancode(keysym: int) -> ScanCode | None:
    """The key that produces `keysym` on a US keyboard, or None."""
    return KEYSYM_TO_SCANCODE.get(keysym)
