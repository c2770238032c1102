"""Cross-process throughput, one function per method: `method(messages, size)`
forks a producer and a consumer (see harness.run_pair), moves `messages`
payloads of `size` bytes and returns messages/s. The consumer always ends up
with each payload in a buffer of its own.
"""

from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from types import ModuleType

import numpy as np

from benchmarks.harness import TIMEOUT, Method, padded, page_buffer, run_pair

RING_DATA_BYTES = 1 << 20  # ring data area: room for 15 packets of 64 KiB
MAX_BATCH = 256  # packets per write_packed / read_packed call
# Ring loops busy-poll, yielding the CPU after this many failed polls in a row
# (~20 us): free on an idle machine, and on a busy one it keeps the two
# spinners from burning whole time slices while their peer waits for a CPU.
SPINS = 256
_FIFO_BYTES = 4 << 20


def batch_count(size: int) -> int:
    """Packets per batch call: up to MAX_BATCH, at most a quarter of the ring."""
    return max(1, min(MAX_BATCH, RING_DATA_BYTES // 4 // (padded(size) + 24)))


def mp_queue(messages: int, size: int, timeout: float = TIMEOUT) -> float:
    queue = mp.get_context("fork").Queue()
    payload = bytes(size)

    def producer() -> Callable[[], int]:
        def loop() -> int:
            for _ in range(messages):
                queue.put(payload)
            return 0

        return loop

    def consumer() -> Callable[[], int]:
        return lambda: sum(len(queue.get()) for _ in range(messages))

    try:
        return run_pair(messages, size, producer, consumer, timeout)
    finally:
        queue.close()


def mp_pipe(messages: int, size: int, timeout: float = TIMEOUT) -> float:
    recv_end, send_end = mp.get_context("fork").Pipe(duplex=False)
    payload = bytes(size)

    def producer() -> Callable[[], int]:
        def loop() -> int:
            for _ in range(messages):
                send_end.send_bytes(payload)
            return 0

        return loop

    def consumer() -> Callable[[], int]:
        return lambda: sum(len(recv_end.recv_bytes()) for _ in range(messages))

    try:
        return run_pair(messages, size, producer, consumer, timeout)
    finally:
        recv_end.close()
        send_end.close()


def os_pipe(messages: int, size: int, timeout: float = TIMEOUT) -> float:
    """4-byte length, then the payload; the reader reads exactly each message."""
    read_fd, write_fd = os.pipe()

    def producer() -> Callable[[], int]:
        message = size.to_bytes(4, "little") + bytes(size)

        def loop() -> int:
            for _ in range(messages):
                if os.write(write_fd, message) != len(message):
                    raise RuntimeError("short write to a blocking pipe")
            return 0

        return loop

    def consumer() -> Callable[[], int]:
        header = bytearray(4)
        body = memoryview(bytearray(size))

        def loop() -> int:
            total = 0
            for _ in range(messages):
                _read_exactly(read_fd, memoryview(header))
                length = int.from_bytes(header, "little")
                _read_exactly(read_fd, body[:length])
                total += length
            return total

        return loop

    try:
        return run_pair(messages, size, producer, consumer, timeout)
    finally:
        os.close(read_fd)
        os.close(write_fd)


def _read_exactly(fd: int, view: memoryview) -> None:
    got = os.readv(fd, [view])
    while got < len(view):
        more = os.readv(fd, [view[got:]])
        if not more:
            raise EOFError("pipe closed mid-message")
        got += more


def faster_fifo_queue(messages: int, size: int, timeout: float = TIMEOUT) -> float:
    import faster_fifo

    queue = faster_fifo.Queue(max_size_bytes=_FIFO_BYTES)
    payload = bytes(size)

    def producer() -> Callable[[], int]:
        def loop() -> int:
            for _ in range(messages):
                queue.put(payload, timeout=60.0)
            return 0

        return loop

    def consumer() -> Callable[[], int]:
        return lambda: sum(len(queue.get(timeout=60.0)) for _ in range(messages))

    try:
        return run_pair(messages, size, producer, consumer, timeout)
    finally:
        queue.close()


def _shared_ring(impl: ModuleType) -> mmap.mmap:
    ring = mmap.mmap(-1, 4096 + RING_DATA_BYTES)  # MAP_SHARED | MAP_ANONYMOUS
    impl.init_ring(ring)
    return ring


def ring_single(impl: ModuleType, signalled: bool = False) -> Method:
    """write + publish / read_into + publish per packet, busy-polling (both
    ends poll, so neither needs commit's signalling decision and its full
    fence); with `signalled`, commit per packet instead, as an end that
    sleeps between packets must."""

    def run(messages: int, size: int, timeout: float = TIMEOUT) -> float:
        ring = _shared_ring(impl)

        def producer() -> Callable[[], int]:
            writer = impl.RingWriter(ring)
            write, commit = writer.write, writer.commit if signalled else writer.publish
            payload = page_buffer(size)

            def loop() -> int:
                spins = 0
                for _ in range(messages):
                    while not write(payload):
                        spins += 1
                        if spins % SPINS == 0:
                            os.sched_yield()
                    commit()
                return 0

            return loop

        def consumer() -> Callable[[], int]:
            reader = impl.RingReader(ring)
            read_into, commit = reader.read_into, reader.commit if signalled else reader.publish
            out = page_buffer(padded(size))

            def loop() -> int:
                total, left, spins = 0, messages, 0
                while left:
                    length = read_into(out)
                    if length >= 0:
                        commit()
                        total += length
                        left -= 1
                    else:
                        spins += 1
                        if spins % SPINS == 0:
                            os.sched_yield()
                return total

            return loop

        return run_pair(messages, size, producer, consumer, timeout)

    return run


def ring_batch(impl: ModuleType) -> Method:
    """write_packed / read_packed of up to batch_count(size) packets, commit per call."""

    def run(messages: int, size: int, timeout: float = TIMEOUT) -> float:
        ring, batch = _shared_ring(impl), batch_count(size)

        def producer() -> Callable[[], int]:
            writer = impl.RingWriter(ring)
            data = page_buffer(batch * size)
            lengths = np.full(batch, size, dtype=np.uint32)

            def loop() -> int:
                sent, spins = 0, 0
                while sent < messages:
                    # Every payload is alike, so a partial call restarts at data[0].
                    written = writer.write_packed(data, lengths[: min(batch, messages - sent)])
                    if written:
                        writer.commit()
                        sent += written
                    else:
                        spins += 1
                        if spins % SPINS == 0:
                            os.sched_yield()
                return 0

            return loop

        def consumer() -> Callable[[], int]:
            reader = impl.RingReader(ring)
            out = page_buffer(batch * padded(size))
            lengths = np.zeros(batch, dtype=np.uint32)

            def loop() -> int:
                total, got, spins = 0, 0, 0
                while got < messages:
                    count = reader.read_packed(out, lengths)
                    if count:
                        reader.commit()
                        got += count
                        total += count * int(lengths[count - 1])
                    else:
                        spins += 1
                        if spins % SPINS == 0:
                            os.sched_yield()
                return total

            return loop

        return run_pair(messages, size, producer, consumer, timeout)

    return run


def memcpy(messages: int, size: int, timeout: float = TIMEOUT) -> float:
    """In one process: np.copyto between two page-aligned buffers (a ceiling)."""
    src = np.frombuffer(page_buffer(size), dtype=np.uint8)
    dst = np.frombuffer(page_buffer(size), dtype=np.uint8)
    start = time.perf_counter()
    for _ in range(messages):
        np.copyto(dst, src)
    return messages / (time.perf_counter() - start)
