"""Type stub of netvsc's compiled steady state (vsc/net/_fast.pyx)."""

from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

class Engine:
    sent: int
    received: int
    reassembly: Any  # the adapter's offload.Reassembly (coalesced receives)
    def __init__(
        self,
        channel: Any,
        send_view: Any,
        recv_view: Any,
        section_size: int,
        max_packets: int,
        alignment: int,
    ) -> None: ...
    def release(self) -> None: ...
    def pack(
        self,
        frames: Sequence[Any],
        start: int,
        free: deque[int],
        sending: dict[int, int],
        ids: Iterator[int],
    ) -> tuple[int, tuple[bytes, int] | None]: ...
    def reap(self, sending: dict[int, int], free: deque[int], frames: deque[bytes]) -> int: ...
