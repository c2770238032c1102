"""The library's errors: one base, and two sides of blame.

`UsageError` means the caller misused the API (a bug in the program using
the library); `PeerError` means the other side broke the protocol (a
hostile or buggy guest, or host). h11's LocalProtocolError and
RemoteProtocolError draw the same line. A VSP answers a `PeerError` with the
protocol's error status, or fails the one channel; it never lets it reach
the worker. Every other error of the library derives from `VmbusError`.

Most classes also derive from the builtin they refine (ValueError,
TimeoutError, OSError), so `except ValueError` keeps working.
"""

from __future__ import annotations

import logging
import time

__all__ = ["PeerError", "PeerLog", "UsageError", "VmbusError"]


class VmbusError(Exception):
    """Base of every error this library raises on purpose."""


class UsageError(VmbusError, ValueError):
    """The caller misused the API: a bad argument, a call in the wrong state."""


class PeerError(VmbusError):
    """The peer broke the protocol: bytes no correct peer would send."""


class PeerLog:
    """Counts a peer's protocol errors and logs them at a bounded rate, so a
    child that sends garbage in a loop cannot flood the parent's log.

    At most `burst` lines are written per `period` seconds; the rest are
    counted and summed up in the next line that gets through."""

    def __init__(
        self, logger: logging.Logger, who: str, *, burst: int = 10, period: float = 10.0
    ) -> None:
        self.logger, self.who = logger, who
        self.burst, self.period = burst, period
        self.count = 0  # every error reported, logged or not
        self._window_start = -period
        self._in_window = 0
        self._suppressed = 0

    def __call__(self, reason: str, *args: object) -> None:
        """One protocol error of this peer (printf-style, like logging)."""
        self.count += 1
        now = time.monotonic()
        if now - self._window_start >= self.period:
            self._window_start, self._in_window = now, 0
        if self._in_window >= self.burst:
            self._suppressed += 1
            return
        self._in_window += 1
        if self._suppressed:
            reason += " (and %d more not logged)"
            args = (*args, self._suppressed)
            self._suppressed = 0
        self.logger.warning("%s: " + reason, self.who, *args)
