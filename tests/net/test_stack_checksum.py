"""The child stack's checksum completion (vsc.net.stack.complete_checksum):
what the kernel leaves partial (the pseudo-header sum in the field) is
completed so that a receiver's check, pseudo-header included, holds."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from vsc.net.stack import complete_checksum


def ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


@given(st.binary(min_size=36, max_size=300), st.integers(0, 18), st.integers(0, 8))
def test_completed_checksum_verifies_with_the_pseudo_header(
    data: bytes, start: int, word: int
) -> None:
    offset = 2 * word  # TCP's field is at 16, UDP's at 6: even
    frame = bytearray(data)
    pseudo = int.from_bytes(frame[start + offset : start + offset + 2], "big")
    out = complete_checksum(memoryview(frame), start, offset)
    total = ones_sum(bytes(out[start:])) + pseudo
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    assert total == 0xFFFF
    assert out[:start] == frame[:start] and len(out) == len(frame)


def test_a_checksum_place_outside_the_frame_leaves_it_alone() -> None:
    frame = bytes(range(40))
    assert complete_checksum(memoryview(frame), 30, 16) == bytearray(frame)
