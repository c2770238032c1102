"""A worker's poll mode: before its loop sleeps, a short spin on the open
channels with their signals masked (the guest skips its doorbell), since
waking a sleeping thread costs far more than a short spin.

The spin adapts as a channel's does: after SPIN_MISSES fruitless spins in a
row (a slow guest, or more VMs than cores, where spinning takes the CPU the
guest needs) only every SPIN_PROBE-th pass spins. A ring found corrupt is
reported, for its channel alone to fail."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from vmbus.channel import SPIN_MISSES, SPIN_PROBE, Channel

__all__ = ["PollMode"]


class PollMode:
    def __init__(self, spin_seconds: float) -> None:
        self.spin_seconds = spin_seconds  # 0: off (it holds the GIL while it spins)
        self.polls = self.misses = 0

    def spin(self, channels: Sequence[tuple[int, Channel]]) -> tuple[int | None, dict[int, str]]:
        """The relid of a channel with packets (None if the spin found
        none, or did not spin), and the channels whose rings failed."""
        failed: dict[int, str] = {}
        if not self.spin_seconds or not channels:
            return None, failed
        self.polls += 1
        if self.misses >= SPIN_MISSES and self.polls % SPIN_PROBE:
            return None, failed

        def check(relid: int, step: Callable[[], object]) -> object:
            try:
                return step()
            except Exception as error:  # a corrupt ring: that channel only
                failed.setdefault(relid, str(error))
                return None

        for relid, channel in channels:
            check(relid, channel.reader.begin_drain)
        end = time.perf_counter() + self.spin_seconds
        ready = None
        while ready is None and not failed and time.perf_counter() < end:
            for relid, channel in channels:  # no allocation in the spin
                try:
                    available = channel.reader.bytes_available
                except Exception as error:  # a corrupt ring: that channel only
                    failed.setdefault(relid, str(error))
                    break
                if available:
                    ready = relid
                    break
        for relid, channel in channels:  # unmask; anything that slipped in is served
            if check(relid, channel.reader.end_drain) and ready is None:
                ready = relid
        self.misses = 0 if ready is not None else self.misses + 1
        return (None if ready in failed else ready), failed
