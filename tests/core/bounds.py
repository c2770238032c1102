"""Resource figures of a process, for the bounds hostile tests assert: what
a child could make the parent or its worker hold."""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path
from typing import Any

# A sibling keeps at least this fraction of the rate it had alone while a
# hostile child attacks (generous: two cores, shared with the attack itself).
SIBLING_FLOOR = 0.1


def resources(pid: int | str = "self") -> dict[str, int]:
    """Resident memory, open descriptors, mappings and threads of `pid`."""
    proc = Path(f"/proc/{pid}")
    if pid == "self":
        gc.collect()
    status = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines())
    return {
        "rss": int(status["VmRSS"].split()[0]) * 1024,
        "fds": len(os.listdir(proc / "fd")),
        "maps": (proc / "maps").read_text().count("\n"),
        "threads": int(status["Threads"]),
    }


def within(measured: dict[str, int], baseline: dict[str, int], slack: dict[str, int]) -> None:
    for key, allowed in slack.items():
        assert measured[key] - baseline[key] <= allowed, (key, baseline, measured)


def gone(pid: int) -> bool:
    """True once `pid` is no process (or a zombie nobody reaps)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def echoed(child: Any) -> int:
    """Echoes the child's first echo channel has served so far."""
    packets: list[int] = child.device_stats()[0]["packets"]
    return packets[0] if packets else 0


def rate_while(child: Any, busy: Any) -> float:
    """The child's echo rate (per second) while `busy()` is true, sampled
    from its worker's counters."""
    start, count = time.monotonic(), echoed(child)
    while busy():
        time.sleep(0.05)
    elapsed = max(time.monotonic() - start, 1e-3)
    return (echoed(child) - count) / elapsed


def rate_for(child: Any, seconds: float) -> float:
    deadline = time.monotonic() + seconds
    return rate_while(child, lambda: time.monotonic() < deadline)
