"""Type stub of storvsc's compiled lone request (vsc/storage/_lone.pyx)."""

from typing import Any

from vmbus._cring import RingReader, RingWriter

ONE_DONE: int
ONE_FAILED: int
ONE_FULL: int
ONE_TIMEOUT: int
ONE_REMOVED: int

def run_one(
    writer: RingWriter,
    reader: RingReader,
    command: Any,
    slot: Any,
    trans_id: int,
    notify_fd: int,
    wake_fd: int,
    spin: float,
    timeout: float,
    channel: Any = None,
) -> tuple[int, Any, int, float]: ...
def run_lone(
    controller: Any,
    channel: Any,
    writer: RingWriter,
    reader: RingReader,
    command: Any,
    results: list[Any] | None,
    policy: tuple[int, float, int, float, float, float, float],
) -> bool: ...
