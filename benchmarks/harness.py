"""Run one producer process and one consumer process, time the consumer.

The same timing for every method: the consumer prepares, starts the clock,
releases the producer (one byte on a pipe) and stops the clock once it has
copied out the last message. The children die with the parent
(PR_SET_PDEATHSIG) and are killed by PID if anything goes wrong.
"""

from __future__ import annotations

import ctypes
import mmap
import multiprocessing as mp
import os
import resource
import signal
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Protocol

from vmbus.sandbox import Policy

# A setup runs in the child after fork and returns the timed loop; a consumer
# loop returns the payload bytes it received.
Setup = Callable[[], Callable[[], int]]
TIMEOUT = 60.0  # default bound of one measurement, seconds
# The benchmarks' own child programs report to their runner over a Unix
# socket; they are trusted, so their sandbox lets them connect to one.
CHILD_POLICY = Policy(unix_sockets=True)


class Method(Protocol):
    """Move `messages` payloads of `size` bytes; messages/s. TimeoutError
    when the run takes longer than `timeout` seconds."""

    def __call__(self, messages: int, size: int, timeout: float = TIMEOUT) -> float: ...


_PR_SET_PDEATHSIG = 1


def padded(size: int) -> int:
    """Payload length as the VMBus ring reports it (rounded up to 8)."""
    return (size + 7) & ~7


def page_buffer(size: int) -> mmap.mmap:
    """A private, page-aligned, pre-faulted buffer of `size` bytes."""
    buf = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.write(bytes(len(buf)))
    buf.seek(0)
    return buf


def _die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def run_pair(
    messages: int, size: int, producer: Setup, consumer: Setup, timeout: float = TIMEOUT
) -> float:
    """Fork `producer` and `consumer`; messages/s as the consumer timed it."""
    ctx = mp.get_context("fork")
    go_r, go_w = os.pipe()
    result_r, result_w = ctx.Pipe(duplex=False)
    parent = os.getpid()

    def producer_main() -> None:
        _die_with_parent(parent)
        loop = producer()
        os.read(go_r, 1)
        loop()

    def consumer_main() -> None:
        _die_with_parent(parent)
        loop = consumer()
        start = time.perf_counter()
        os.write(go_w, b"g")
        received = loop()
        result_w.send((time.perf_counter() - start, received))

    procs: list[BaseProcess] = [
        ctx.Process(target=consumer_main, name="bench-consumer", daemon=True),
        ctx.Process(target=producer_main, name="bench-producer", daemon=True),
    ]
    try:
        for proc in procs:
            proc.start()
        seconds, received = _wait_result(result_r, procs, timeout)
        for proc in procs:
            proc.join(timeout)
    finally:
        _reap(procs)
        for conn in (result_r, result_w):
            conn.close()
        os.close(go_r)
        os.close(go_w)
    if received != messages * padded(size):
        raise RuntimeError(f"consumer got {received} bytes, expected {messages * padded(size)}")
    return messages / seconds


def _wait_result(conn: Connection, procs: list[BaseProcess], timeout: float) -> tuple[float, int]:
    deadline = time.monotonic() + timeout
    while not conn.poll(0.01):
        failed = [p for p in procs if p.exitcode not in (None, 0)]
        if failed:
            raise RuntimeError(f"{failed[0].name} exited with code {failed[0].exitcode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no result after {timeout:.0f} s")
    seconds, received = conn.recv()
    return float(seconds), int(received)


def _reap(procs: list[BaseProcess]) -> None:
    """Kill (by PID, via the Process handle) whatever is still running."""
    for proc in procs:
        if proc.pid is None:
            continue
        if proc.is_alive():
            proc.kill()
        proc.join()


def cpu_snapshot() -> tuple[float, float, float]:
    """(wall clock, CPU-seconds the machine spent busy incl. steal, CPU-seconds
    this process and its reaped descendants used), for others_cpu()."""
    with open("/proc/stat") as stat:
        ticks = [int(v) for v in stat.readline().split()[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
    own = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    mine = sum(r.ru_utime + r.ru_stime for r in own)
    return time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), mine


def others_cpu(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """CPUs' worth of time other processes (and the host, as steal) took between
    two snapshots: 0 on a quiet machine, up to the vCPU count."""
    wall, busy, mine = (a - b for a, b in zip(after, before, strict=True))
    return max(0.0, (busy - mine) / wall) if wall > 0 else 0.0


def render_table(headers: list[str], rows: list[list[str]], markdown: bool, labels: int = 2) -> str:
    """A table as Markdown, or as aligned text: the first `labels` columns
    left-aligned, the figures right-aligned."""
    if markdown:
        lines = [headers, ["---"] * labels + ["---:"] * (len(headers) - labels), *rows]
        return "\n".join("| " + " | ".join(line) + " |" for line in lines)
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i < labels else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [headers, *rows]
    )


def on_sigterm(pid: int) -> Callable[[int, object], None]:
    """A SIGTERM handler that runs the cleanups (SystemExit) in process `pid`
    only. pyroute2 forks helpers and ends them with SIGTERM: a helper that
    raised SystemExit would unwind this process's stack in the copy, and its
    cleanups would delete the live namespaces and the work directory."""

    def handler(signo: int, frame: object) -> None:
        if os.getpid() != pid:
            os._exit(128 + signo)
        sys.exit(128 + signo)

    return handler
