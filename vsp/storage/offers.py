"""Sub-channel offers for a primary channel served on a thread of its own.

Only the worker's loop talks to the control plane (it alone may offer a
channel), so a primary on another thread that is asked for sub-channels
(CREATE_SUB_CHANNELS) only records how many and wakes the loop through an
eventfd the loop watches; the loop then makes the offers.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable

from vmbus.device import OpenContext
from vmbus.errors import UsageError

__all__ = ["SubChannelOffers"]


class SubChannelOffers:
    """`request(count)` from the channel's thread; `offer(count)` runs in
    the worker's loop, woken by `fd`'s watch. `fd` is -1 where the context
    has no loop to watch it (a test harness): offer inline then."""

    def __init__(self, offer: Callable[[int], None], context: OpenContext) -> None:
        self.offer, self.context = offer, context
        self.lock = threading.Lock()
        self.count = 0
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            context.watch(self.fd, self._offer)
        except UsageError:
            os.close(self.fd)
            self.fd = -1

    def request(self, count: int) -> None:
        with self.lock:
            self.count = max(self.count, count)
        os.eventfd_write(self.fd, 1)

    def _offer(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.fd)
        with self.lock:
            count, self.count = self.count, 0
        if count:
            self.offer(count)

    def close(self) -> None:
        if self.fd >= 0:
            self.context.unwatch(self.fd)
            os.close(self.fd)
            self.fd = -1
