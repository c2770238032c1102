"""Type stub of the compiled netvsp fast path (vsp/net/_fast.pyx)."""

from typing import Any

class FastPath:
    served: int
    declined: int
    delivered: int
    def __init__(self, channel: Any, reserve: int) -> None: ...
    def drain(self, handler: Any) -> int: ...
    def deliver(self, handler: Any, limit: int) -> list[bytes] | None: ...
    def deliver_coalesced(
        self, handler: Any, room: int, worst: int
    ) -> list[tuple[bytes, bytes]] | None: ...
