"""`vmbus demo` (its first part): a producer process streams packets through one VMBus ring in
shared memory to this process, for a few payload sizes, and prints the
throughput of the single-packet and batch APIs as it goes."""

from __future__ import annotations

import mmap
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from typing import TextIO

import numpy as np

from vmbus import ring

DATA_SIZE = 4 * 1024 * 1024
SIZES = (64, 1024, 16 * 1024, 64 * 1024)
BATCH_BYTES = 256 * 1024  # payload bytes moved per batch call


@dataclass(frozen=True)
class Result:
    api: str
    size: int
    packets: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.packets / self.seconds

    @property
    def mbytes(self) -> float:
        return self.rate * self.size / 1e6


STOP = 1  # trans_id of the packet that ends a run


def _produce(fd: int, size: int, batch: bool, seconds: float) -> None:
    """Child: write packets as fast as the ring takes them for `seconds`,
    then one STOP packet."""
    with mmap.mmap(fd, ring.HEADER_SIZE + DATA_SIZE) as buf:
        writer = ring.RingWriter(buf)
        count = max(1, BATCH_BYTES // size) if batch else 1
        data = bytes(size * count)
        lengths = np.full(count, size, dtype=np.uint32)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            for _ in range(64):
                if batch:
                    writer.write_packed(data, lengths)
                else:
                    writer.write(data)
                writer.commit()
        while not writer.write(b"", trans_id=STOP):
            writer.commit()
        writer.commit()
        del writer  # release the buffer before the mapping closes


def _consume(reader: ring.RingReader, size: int, batch: bool) -> tuple[int, float]:
    """Read until STOP; the packet count and the seconds from the first."""
    out = bytearray(max(BATCH_BYTES, size) + 8)
    lengths = np.zeros(max(1, BATCH_BYTES // size), dtype=np.uint32)
    ids = np.zeros(len(lengths), dtype=np.uint64)
    packets, started = 0, 0.0
    while True:
        if batch:
            n = reader.read_packed(out, lengths, ids)
            stopped = n > 0 and ids[n - 1] == STOP
        else:
            n = int(reader.read_into(out) >= 0)
            stopped = n > 0 and reader.last_trans_id == STOP
        if n == 0:
            continue
        started = started or time.perf_counter()
        reader.commit()
        packets += n - stopped
        if stopped:
            return packets, time.perf_counter() - started


def run_one(size: int, batch: bool, seconds: float) -> Result:
    """Stream `size`-byte packets from a child process for `seconds`."""
    fd = os.memfd_create("vmbus-demo")
    try:
        os.ftruncate(fd, ring.HEADER_SIZE + DATA_SIZE)
        with mmap.mmap(fd, ring.HEADER_SIZE + DATA_SIZE) as buf:
            ring.init_ring(buf)
            reader = ring.RingReader(buf)
            child = multiprocessing.get_context("fork").Process(
                target=_produce, args=(fd, size, batch, seconds)
            )
            child.start()
            try:
                packets, elapsed = _consume(reader, size, batch)
            finally:
                child.join(timeout=seconds + 10)
                if child.is_alive():
                    child.kill()
            del reader
    finally:
        os.close(fd)
    return Result("batch" if batch else "single", size, packets, elapsed)


def main(seconds: float = 0.5, out: TextIO = sys.stdout) -> list[Result]:
    """Run every size with both APIs and print a line per run as it ends."""
    print(
        f"VMBus ring demo ({ring.IMPLEMENTATION} ring, {DATA_SIZE >> 20} MiB data area): "
        "a child process streams packets to this one through shared memory",
        file=out,
    )
    print(f"{'api':>7} {'payload':>8} {'packets/s':>12} {'MB/s':>9}", file=out)
    results = []
    for size in SIZES:
        for batch in (False, True):
            result = run_one(size, batch, seconds)
            results.append(result)
            print(
                f"{result.api:>7} {size:>8} {result.rate:>12,.0f} {result.mbytes:>9,.0f}",
                file=out,
                flush=True,
            )
    return results
