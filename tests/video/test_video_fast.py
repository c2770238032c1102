"""The compiled pixel shuffle against its numpy definition: byte-identical
output for any pixels, strides (sub-rectangles, reversed views) and order."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vsp.video import encodings

fast = pytest.importorskip("vsp.video._fast", reason="the Cython extension is not built")

ORDERS = st.one_of(
    st.lists(st.integers(0, 3), min_size=3, max_size=4).map(tuple),
    st.sampled_from([(0, 1, 2, 3), (2, 1, 0, 3), (3, 2, 1, 0), (2, 1, 0), (0, 1, 2)]),
)


@settings(max_examples=200, deadline=None)
@given(
    height=st.integers(0, 40),
    width=st.integers(0, 40),
    crop=st.tuples(st.integers(0, 5), st.integers(0, 5)),
    flip=st.booleans(),
    order=ORDERS,
    seed=st.integers(0, 2**32 - 1),
)
def test_pack_pixels_matches_numpy(
    height: int, width: int, crop: tuple[int, int], flip: bool, order: tuple[int, ...], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    frame = rng.integers(0, 256, (height + crop[0], width + crop[1], 4), dtype=np.uint8)
    pix = frame[crop[0] :, crop[1] :]
    if flip:
        pix = pix[::-1]
    n = len(order)
    compiled = np.full(height * width * n + 3, 0xAA, np.uint8)
    reference = compiled.copy()
    fast.pack_pixels(pix, compiled, bytes(order))
    encodings.pack_numpy(pix, reference, order)
    assert compiled.tobytes() == reference.tobytes()


def test_pack_pixels_refuses_a_short_target() -> None:
    with pytest.raises(ValueError):
        fast.pack_pixels(np.zeros((2, 2, 4), np.uint8), np.zeros(15, np.uint8), bytes([0, 1, 2, 3]))
    with pytest.raises(ValueError):
        fast.pack_pixels(np.zeros((2, 2, 4), np.uint8), np.zeros(16, np.uint8), bytes([0, 4, 2]))
