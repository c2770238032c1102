"""The console Screen and its PNG snapshots, read back by a decoder written here."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from vnc_client import BLACK, opaque

from vsp.video.png import PNG_SIGNATURE, encode_png
from vsp.video.screen import MAX_UPDATE_RECTS, Screen


def decode_png(data: bytes) -> np.ndarray:
    """An 8-bit RGB PNG with filter 0 on every row (what the encoder must write)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks.append((kind, body))
        pos += 12 + length
    kinds = [k for k, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    width, height, depth, colour, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour, comp, filt, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    rows = np.frombuffer(raw, np.uint8).reshape(height, 1 + 3 * width)
    assert (rows[:, 0] == 0).all(), "every scanline uses filter type 0"
    return rows[:, 1:].reshape(height, width, 3)


def rgb_of(frame: np.ndarray) -> np.ndarray:
    return frame[:, :, 2::-1]  # BGRX -> RGB


def pattern(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)


def test_encode_png_round_trip() -> None:
    rgb = pattern(37, 53)[:, :, :3]
    data = encode_png(rgb)
    assert data.startswith(PNG_SIGNATURE)
    assert (decode_png(data) == rgb).all()


def test_encode_png_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ValueError):
        encode_png(np.zeros((0, 4, 3), np.uint8))


def test_snapshot_png_to_path_and_file(tmp_path: Path) -> None:
    screen = Screen(64, 48)
    pixels = pattern(48, 64, 1)
    screen.update(pixels)
    screen.snapshot_png(tmp_path / "shot.png")
    assert (decode_png((tmp_path / "shot.png").read_bytes()) == rgb_of(pixels)).all()
    buf = io.BytesIO()
    screen.snapshot_png(buf)
    assert (decode_png(buf.getvalue()) == rgb_of(pixels)).all()


def test_known_colours_land_in_the_right_channels() -> None:
    screen = Screen(3, 1)
    vram = np.array([[[0, 0, 255, 0], [0, 255, 0, 0], [255, 0, 0, 0]]], np.uint8)  # B, G, R bytes
    screen.update(vram)
    buf = io.BytesIO()
    screen.snapshot_png(buf)
    assert decode_png(buf.getvalue()).tolist() == [[[255, 0, 0], [0, 255, 0], [0, 0, 255]]]


def test_update_copies_only_dirty_rects_from_a_strided_view() -> None:
    screen = Screen(40, 30)
    # VRAM with a pitch wider than the mode: a strided (30, 40, 4) view of (30, 64, 4).
    vram = pattern(30, 64, 2)
    view = vram[:, :40]
    assert not view.flags.c_contiguous
    screen.update(view, [(5, 6, 15, 20), (30, 0, 40, 3)])
    frame = screen.frame_copy()
    expected = np.zeros_like(frame)
    expected[6:20, 5:15] = view[6:20, 5:15]
    expected[0:3, 30:40] = view[0:3, 30:40]
    assert (frame == opaque(expected)).all()


def test_frame_is_a_copy_the_guest_cannot_tear() -> None:
    screen = Screen(16, 16)
    vram = pattern(16, 16, 3)
    screen.update(vram)
    before = screen.frame_copy()
    vram[:] = 0  # the guest rewrites VRAM after the update
    assert (screen.frame_copy() == before).all()
    assert before.any()


def test_hostile_rects_are_clipped_and_merged() -> None:
    screen = Screen(20, 10)
    seen: list[list[tuple[int, int, int, int]]] = []
    screen.add_listener(seen.append)
    vram = pattern(8, 30, 4)  # narrower than the screen in height, wider in width
    screen.update(vram, [(-5, -5, 100, 100), (7, 7, 3, 3), (0, 50, 5, 60)])
    assert seen == [[(0, 0, 20, 8)]]
    assert (screen.frame_copy()[:8] == opaque(vram[:, :20])).all()
    seen.clear()
    flood = [(i % 20, i // 20, i % 20 + 1, i // 20 + 1) for i in range(MAX_UPDATE_RECTS + 1)]
    screen.update(vram, flood)
    assert seen == [[(0, 0, 20, 4)]]
    seen.clear()
    screen.update(vram, [(1, 1, 2, 2), (0, 0, 20, 8), (1, 1, 2, 2)])  # the screen covers all
    assert seen == [[(0, 0, 20, 8)]]
    seen.clear()
    screen.update(vram, [(1, 1, 2, 2), (3, 3, 4, 4), (1, 1, 2, 2)])  # a DIRT repeated
    assert seen == [[(1, 1, 2, 2), (3, 3, 4, 4)]]


def test_resize_gives_a_black_frame_and_notifies() -> None:
    screen = Screen(8, 8)
    screen.update(pattern(8, 8, 5))
    seen: list[list[tuple[int, int, int, int]]] = []
    screen.add_listener(seen.append)
    generation = screen.geometry()[0]
    screen.resize(12, 5)
    assert screen.geometry() == (generation + 1, 12, 5)
    assert screen.frame_copy().shape == (5, 12, 4) and (screen.frame_copy() == BLACK).all()
    assert seen == [[(0, 0, 12, 5)]]
    capture = screen.capture([(0, 0, 2, 2)], generation)  # stale: the whole frame
    assert capture.rects == [(0, 0, 12, 5)] and capture.generation == generation + 1
    with pytest.raises(ValueError):
        screen.resize(0, 5)


def test_update_rejects_a_wrong_array() -> None:
    with pytest.raises(ValueError):
        Screen(4, 4).update(np.zeros((4, 4, 3), np.uint8))
