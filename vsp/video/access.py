"""Who may use the VNC console: a password made for each run when the
caller gives none, and a growing, bounded delay per source after failed
logins (VNC authentication checks only 8 bytes, so guessing must be slow)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "BACKOFF_BASE",
    "BACKOFF_MAX",
    "PASSWORD_LENGTH",
    "LoginBackoff",
    "generate_password",
]

PASSWORD_LENGTH = 8  # what VNC authentication uses of a password
BACKOFF_BASE = 0.5  # seconds a source waits after its first failed login
BACKOFF_MAX = 30.0  # ... doubling per failure up to this
MAX_SOURCES = 1024  # sources remembered; the table cannot grow without bound


def generate_password() -> str:
    """A fresh password: 8 URL-safe characters, 48 random bits."""
    return secrets.token_urlsafe(6)[:PASSWORD_LENGTH]


@dataclass
class _Source:
    failures: int = 0
    until: float = 0.0  # no login from this source before this time


class LoginBackoff:
    """Failed logins per source (an IP address): after the n-th failure in a
    row the source must wait base * 2**(n-1) seconds, at most `maximum`,
    before its next login is even checked. A success forgets the source."""

    def __init__(
        self,
        base: float = BACKOFF_BASE,
        maximum: float = BACKOFF_MAX,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base, self.maximum, self.clock = base, maximum, clock
        self._sources: dict[str, _Source] = {}

    def delay(self, failures: int) -> float:
        """The wait after `failures` failed logins in a row."""
        if failures <= 0:
            return 0.0
        return min(self.base * (1 << min(failures - 1, 32)), self.maximum)

    def wait(self, source: str) -> float:
        """Seconds `source` must still wait before logging in (0: may try now)."""
        entry = self._sources.get(source)
        return 0.0 if entry is None else max(0.0, entry.until - self.clock())

    def failed(self, source: str) -> float:
        """Count a failed login of `source`; the delay it now has to wait."""
        entry = self._sources.pop(source, None) or _Source()
        entry.failures += 1
        delay = self.delay(entry.failures)
        entry.until = self.clock() + delay
        self._sources[source] = entry  # most recent last
        if len(self._sources) > MAX_SOURCES:
            self._forget_oldest()
        return delay

    def succeeded(self, source: str) -> None:
        self._sources.pop(source, None)

    def _forget_oldest(self) -> None:
        now = self.clock()
        for source in [s for s, e in self._sources.items() if e.until <= now]:
            del self._sources[source]
        while len(self._sources) > MAX_SOURCES:
            del self._sources[next(iter(self._sources))]
