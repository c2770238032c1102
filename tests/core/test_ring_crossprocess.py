"""A producer process and a consumer process on one memfd mapping move a
million packets of random sizes, each with a checksum, through one ring;
wake-ups go over eventfds exactly as the commit answers say, so a lost
signal shows up as a stall."""

from __future__ import annotations

import mmap
import multiprocessing
import os
import select
import struct
import zlib
from types import ModuleType

import numpy as np
import pytest

from vmbus._ringdefs import HEADER_SIZE

PACKETS = 1_000_000
DATA_SIZE = 64 * 1024
SPINS = 200  # empty polls before the consumer sleeps (adaptive poll)
STALL_SECONDS = 2  # a wait this long means a lost wake-up
HEAD = struct.Struct("<III")  # sequence number, body size, crc32 of the body
POOL = np.random.default_rng(7).integers(0, 256, 1 << 16, dtype=np.uint8).tobytes()


def body_sizes(count: int) -> np.ndarray:
    """Mostly small packets, some large enough to fill the ring quickly."""
    rng = np.random.default_rng(11)
    small = rng.integers(0, 256, count)
    large = rng.integers(256, 12 * 1024, count)
    return np.where(rng.random(count) < 0.05, large, small)


def wait(fd: int) -> None:
    if not select.select([fd], [], [], STALL_SECONDS)[0]:
        raise TimeoutError("no wake-up: a signal was lost")
    os.eventfd_read(fd)


def produce(impl: ModuleType, fd: int, count: int, data_ready: int, space_ready: int) -> None:
    ring = mmap.mmap(fd, HEADER_SIZE + DATA_SIZE)
    writer = impl.RingWriter(ring)
    for seq, size in enumerate(body_sizes(count).tolist()):
        start = seq * 31 % (len(POOL) - size)
        body = POOL[start : start + size]
        packet = HEAD.pack(seq, size, zlib.crc32(body)) + body
        while not writer.write(packet, trans_id=seq):
            if writer.commit():
                os.eventfd_write(data_ready, 1)
            needed = (16 + len(packet) + 7) // 8 * 8 + 8
            if not writer.request_space(needed):
                wait(space_ready)
        if seq % 8 == 7 and writer.commit():
            os.eventfd_write(data_ready, 1)
    if writer.commit():
        os.eventfd_write(data_ready, 1)


def consume(impl: ModuleType, fd: int, count: int, data_ready: int, space_ready: int) -> None:
    ring = mmap.mmap(fd, HEADER_SIZE + DATA_SIZE)
    reader = impl.RingReader(ring)
    out = bytearray(DATA_SIZE)
    view = memoryview(out)
    received, idle = 0, 0
    reader.begin_drain()
    while received < count:
        n = reader.read_into(out)
        if n < 0:
            if reader.commit():
                os.eventfd_write(space_ready, 1)
            idle += 1
            if idle >= SPINS and not reader.end_drain():
                wait(data_ready)  # unmasked and re-checked: safe to sleep
                reader.begin_drain()
                idle = 0
            elif idle >= SPINS:
                reader.begin_drain()
            continue
        idle = 0
        seq, size, crc = HEAD.unpack_from(out)
        if seq != received or reader.last_trans_id != seq:
            raise AssertionError(f"packet {received}: got sequence {seq}")
        if HEAD.size + size > n or zlib.crc32(view[HEAD.size : HEAD.size + size]) != crc:
            raise AssertionError(f"packet {seq}: torn or corrupt payload")
        received += 1
        if received % 16 == 0 and reader.commit():
            os.eventfd_write(space_ready, 1)
    reader.commit()


@pytest.mark.slow
def test_million_packets_between_processes(ring_impl: ModuleType) -> None:
    fd = os.memfd_create("ring-test")
    os.ftruncate(fd, HEADER_SIZE + DATA_SIZE)
    with mmap.mmap(fd, HEADER_SIZE + DATA_SIZE) as ring:
        ring_impl.init_ring(ring)
    data_ready, space_ready = os.eventfd(0), os.eventfd(0)
    args = (ring_impl, fd, PACKETS, data_ready, space_ready)
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=role, args=args) for role in (produce, consume)]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=240)
        assert [w.exitcode for w in workers] == [0, 0]
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join()
        for handle in (fd, data_ready, space_ready):
            os.close(handle)
