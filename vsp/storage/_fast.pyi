"""Type stub of the compiled storvsp fast path (vsp/storage/_fast.pyx)."""

from collections.abc import Iterable
from typing import Any

RUN_IDLE: int
RUN_PYTHON: int
RUN_STUCK: int

class FastPath:
    served: int
    declined: int
    def __init__(
        self, channel: Any, memory: Any, ring_pfns: Iterable[int], reserve: int
    ) -> None: ...
    def drain(self, vsp: Any) -> int: ...
    def poll(self, seconds: float) -> bool: ...
    def run(self, vsp: Any, spin: float, turn: float, idle: float) -> tuple[int, int]: ...
