"""The Screen's three frames as a state machine (Hypothesis): whatever the
worker's copy draws, resizes and however the parent's reads interleave, the
parent reads exactly the frame a single-buffered model holds, the damage it
is told covers every pixel that changed, and a frame pinned for a read is
never written while it is pinned."""

from __future__ import annotations

import os

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from vnc_client import opaque, pattern

from vmbus import handoff
from vsp.video.screen import Screen
from vsp.video.shared import FRAMES

SIZE = st.integers(1, 32)
RECT = st.tuples(st.integers(-4, 28), st.integers(-4, 28), st.integers(-4, 28), st.integers(-4, 28))


def black(width: int, height: int) -> np.ndarray:
    frame = np.zeros((height, width, 4), np.uint8)
    frame[..., 3] = 0xFF
    return frame


class ScreenFrames(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.parent = Screen(16, 12, capacity=32 * 32 * 4)
        data, fds = handoff.dumps(self.parent)  # the worker's copy, as a VM's worker gets it
        worker = handoff.loads(data, [os.dup(fd) for fd in fds])
        assert isinstance(worker, Screen)
        self.worker = worker
        self.model = black(16, 12)
        self.generation = 0
        self.pinned: tuple[int, int, np.ndarray] | None = None  # index, its seq, its pixels
        self.seen = self.parent.damage_cursor()
        self.shown = self.parent.frame_copy()

    @rule(rects=st.lists(RECT, max_size=3), grow=st.integers(-3, 3), seed=st.integers(0, 99))
    def draw(self, rects: list[tuple[int, int, int, int]], grow: int, seed: int) -> None:
        """The VSP copies dirty rectangles of a VRAM view (of any size) in."""
        height, width = self.model.shape[:2]
        vram = pattern(max(1, height + grow), max(1, width + grow), seed=seed)
        self.worker.update(vram, rects or None)
        w, h = min(width, vram.shape[1]), min(height, vram.shape[0])
        for x1, y1, x2, y2 in rects or [(0, 0, w, h)]:
            x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
            if x1 < x2 and y1 < y2:
                self.model[y1:y2, x1:x2] = opaque(vram)[y1:y2, x1:x2]

    @rule(width=SIZE, height=SIZE)
    def resize(self, width: int, height: int) -> None:
        self.worker.resize(width, height)
        self.model = black(width, height)
        self.generation += 1

    @precondition(lambda self: self.pinned is None)
    @rule()
    def start_a_long_read(self) -> None:
        """The parent pins the newest frame, as a send in progress does."""
        shm = self.parent._shm
        index, generation, width, height, consistent = shm.pin_front()
        assert consistent and generation == self.generation
        assert (width, height) == self.model.shape[1::-1]
        pixels = shm.frame(index, width, height).copy()
        assert (pixels == self.model).all()
        self.pinned = (index, shm.frame_seq(index), pixels)

    @precondition(lambda self: self.pinned is not None)
    @rule()
    def end_the_long_read(self) -> None:
        self.parent._shm.pin(None)
        self.pinned = None

    @invariant()
    def a_pinned_frame_holds_still(self) -> None:
        if self.pinned is None:
            return
        index, seq, pixels = self.pinned
        shm = self.parent._shm
        assert shm.frame_seq(index) == seq
        height, width = pixels.shape[:2]
        assert (shm.frame(index, width, height) == pixels).all()

    @precondition(lambda self: self.pinned is None)  # a capture pins (and unpins) itself
    @rule()
    def read(self) -> None:
        """What the parent reads is the model; the damage covers each change."""
        parent = self.parent
        assert parent.geometry() == (self.generation, *self.model.shape[1::-1])
        frame = parent.frame_copy()
        assert (frame == self.model).all()
        rects, self.seen = parent.damage_since(self.seen)
        if frame.shape == self.shown.shape:
            changed = (frame != self.shown).any(axis=2)
            covered = np.zeros_like(changed)
            for x1, y1, x2, y2 in rects or []:
                covered[y1:y2, x1:x2] = True
            assert not (changed & ~covered).any()
        else:
            assert rects == [(0, 0, *frame.shape[1::-1])]
        self.shown = frame
        assert parent.torn == 0
        assert len({parent._shm.front, parent._shm.pinned}) <= FRAMES - 1

    def teardown(self) -> None:
        self.worker.close()
        self.parent.close()


ScreenFrames.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_the_screens_frames = ScreenFrames.TestCase
