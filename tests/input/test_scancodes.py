"""X11 keysyms to set-1 scan codes: the US keyboard, key by key."""

from __future__ import annotations

import pytest

from vmbus.protocols.input import KEYSYM_TO_SCANCODE, ScanCode, keysym_to_scancode


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
