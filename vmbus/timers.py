"""Timers a worker's loop runs: a VSP's periodic work (a heartbeat, a time
sample) on the one thread that touches its channels, without a thread of
its own."""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Timer", "TimerQueue"]


@dataclass(order=True)
class Timer:
    """One pending call; `cancel` it and it never runs."""

    due: float
    order: int
    callback: Callable[[], None] = field(compare=False)
    owner: int | None = field(compare=False, default=None)  # the channel whose VSP set it
    cancelled: bool = field(compare=False, default=False)

    def cancel(self) -> None:
        self.cancelled = True


class TimerQueue:
    """Timers by due time. A cancelled timer leaves the heap when it comes
    up; the heap is rebuilt without them whenever it has doubled since the
    last rebuild, so a VSP that sets and cancels timers forever holds a
    bounded heap."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._heap: list[Timer] = []
        self._order = itertools.count()
        self._rebuild_at = 64

    def __len__(self) -> int:
        return sum(1 for timer in self._heap if not timer.cancelled)

    def add(self, delay: float, callback: Callable[[], None], owner: int | None = None) -> Timer:
        if len(self._heap) >= self._rebuild_at:
            self._rebuild(lambda timer: not timer.cancelled)
        timer = Timer(self.clock() + max(0.0, delay), next(self._order), callback, owner)
        heapq.heappush(self._heap, timer)
        return timer

    def cancel_owned(self, owner: int) -> None:
        """Drop every timer a channel's VSP set: the channel closed."""
        self._rebuild(lambda timer: timer.owner != owner and not timer.cancelled)

    def timeout(self, longest: float) -> float:
        """How long the loop may sleep: until the next due timer, at most `longest`."""
        while self._heap and self._heap[0].cancelled:
            heapq.heappop(self._heap)
        if not self._heap:
            return longest
        return min(longest, max(0.0, self._heap[0].due - self.clock()))

    def due(self) -> list[Timer]:
        """The timers due now, taken off the queue, in due order."""
        now = self.clock()
        ready = []
        while self._heap and self._heap[0].due <= now:
            timer = heapq.heappop(self._heap)
            if not timer.cancelled:
                ready.append(timer)
        return ready

    def _rebuild(self, keep: Callable[[Timer], bool]) -> None:
        self._heap = [timer for timer in self._heap if keep(timer)]
        heapq.heapify(self._heap)
        self._rebuild_at = max(64, 2 * len(self._heap))
