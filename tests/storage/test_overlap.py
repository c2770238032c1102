"""Requests that overlap in storvsp: READ/WRITE for a `concurrent` backend
run in the channel's I/O pool, their completions written by the worker as
they finish (by transaction id, in any order), the reply reserve covering
each request in flight, and close releasing every thread and descriptor
with no completion written after it. VSTOR allows out-of-order completions;
Linux's storvsc looks each one up by its transaction id (rqst_id)."""

from __future__ import annotations

import gc
import os
import select
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from scsi_support import negotiate

from vmbus.channel import COMPLETION_REQUESTED
from vmbus.errors import UsageError
from vmbus.memory import PAGE_SIZE
from vmbus.packet import PacketType
from vmbus.protocols import storage as vstor
from vmbus.testing import VspHarness
from vsp.storage import DirectBackend, RamBackend, StorVsp
from vsp.storage.device import MAX_IN_FLIGHT, StorvspChannel

DISK = 1 << 20
READ_10, WRITE_10 = 0x28, 0x2A
DATA_OUT, DATA_IN = 0, 1


class SlowBackend(RamBackend):
    """A RAM disk whose reads wait (up to `hold` seconds) until `wanted`
    reads are in flight at once, or `gate` opens; it records the most it
    saw at once."""

    concurrent = True

    def __init__(self, wanted: int = 8, hold: float = 2.0) -> None:
        super().__init__(DISK)
        self.wanted, self.hold = wanted, hold
        self.gate = threading.Event()
        self.lock = threading.Condition()
        self.current = self.most = self.reads = 0

    def readv(self, offset: int, buffers: object) -> None:  # type: ignore[override]
        with self.lock:
            self.current += 1
            self.reads += 1
            self.most = max(self.most, self.current)
            self.lock.notify_all()
            self.lock.wait_for(lambda: self.current >= self.wanted or self.gate.is_set(), self.hold)
        try:
            super().readv(offset, buffers)  # type: ignore[arg-type]
        finally:
            with self.lock:
                self.current -= 1


def srb(opcode: int, lba: int, blocks: int, direction: int) -> bytes:
    """A vstor_packet with a READ(10)/WRITE(10) vmscsi_request, by hand."""
    cdb = struct.pack(">BBIBHB", opcode, 0, lba, 0, blocks, 0)
    request = struct.pack(
        "<HBBBBBBBBBBI20s", 52, 0, 0, 0, 0, 0, 0, 10, 20, direction, 0, blocks * 512, cdb
    )
    return struct.pack("<III", 3, 1, 0) + request + bytes(16)


def gpa_header(pfn: int, length: int) -> bytes:
    return struct.pack("<IIIIQ", 0, 1, length, 0, pfn)


def pattern(lba: int) -> bytes:
    return bytes((lba * 7 + i) % 253 for i in range(PAGE_SIZE))


@pytest.fixture
def harness_of() -> Iterator[list[VspHarness]]:
    opened: list[VspHarness] = []
    yield opened
    for harness in opened:
        harness.close()


def ready(backend: object, harness_of: list[VspHarness]) -> VspHarness:
    """A storvsp on `backend`, its protocol negotiated."""
    harness = VspHarness(StorVsp([backend], fast_path=False))  # type: ignore[list-item]
    harness_of.append(harness)
    negotiate(harness)
    return harness


def submit(harness: VspHarness, opcode: int, lba: int, pfn: int) -> None:
    direction = DATA_IN if opcode == READ_10 else DATA_OUT
    assert harness.guest.try_send(
        srb(opcode, lba, PAGE_SIZE // 512, direction),
        PacketType.DATA_USING_GPA_DIRECT,
        COMPLETION_REQUESTED,
        1000 + lba,
        gpa_header(pfn, PAGE_SIZE),
    )


def collect(harness: VspHarness, count: int) -> dict[int, list[bytes]]:
    """Serve until `count` completions came; each by transaction id."""
    replies: dict[int, list[bytes]] = {}
    deadline = time.monotonic() + 30
    while sum(len(v) for v in replies.values()) < count and time.monotonic() < deadline:
        harness.pump()
        while (reply := harness.guest.poll()) is not None:
            replies.setdefault(reply.trans_id, []).append(bytes(reply.payload))
        if harness.watched:
            select.select(list(harness.watched), [], [], 0.05)
    return replies


def srb_status(reply: bytes) -> tuple[int, int]:
    """(srb_status, data_transfer_length) of a completion."""
    return reply[14], struct.unpack_from("<I", reply, 24)[0]


def handler(harness: VspHarness) -> StorvspChannel:
    assert isinstance(harness.handler, StorvspChannel)
    return harness.handler


def test_32_queued_reads_are_in_flight_together_and_each_answered_once(
    harness_of: list[VspHarness],
) -> None:
    backend = SlowBackend(wanted=8, hold=0.5)
    for lba in range(0, 256, 8):
        backend.data[lba * 512 : lba * 512 + PAGE_SIZE] = pattern(lba)
    harness = ready(backend, harness_of)
    pages = {lba: harness.allocate(1)[0] for lba in range(0, 256, 8)}
    for lba, pfn in pages.items():
        submit(harness, READ_10, lba, pfn)
    replies = collect(harness, len(pages))
    assert backend.most >= 8  # overlapped, not one after another
    assert sorted(replies) == sorted(1000 + lba for lba in pages)
    for lba, pfn in pages.items():
        (reply,) = replies[1000 + lba]
        assert srb_status(reply) == (vstor.SrbStatus.SUCCESS, PAGE_SIZE)
        assert bytes(harness.memory.view(pfn * PAGE_SIZE, PAGE_SIZE)) == pattern(lba)
    pool = handler(harness).pool
    assert pool is not None and pool.in_flight == 0


def test_in_flight_is_bounded_and_the_rest_wait_in_the_ring(harness_of: list[VspHarness]) -> None:
    backend = SlowBackend(wanted=10**6, hold=30)  # every read waits for the gate
    harness = ready(backend, harness_of)
    pfn = harness.allocate(1)[0]
    total = MAX_IN_FLIGHT + 16
    for lba in range(total):
        submit(harness, READ_10, lba, pfn)
    harness.pump()
    pool = handler(harness).pool
    assert pool is not None and pool.in_flight == MAX_IN_FLIGHT
    assert harness.host.reader.bytes_available  # the rest were not taken
    backend.gate.set()
    with backend.lock:
        backend.lock.notify_all()
    replies = collect(harness, total)
    assert sorted(replies) == [1000 + lba for lba in range(total)]
    assert all(len(v) == 1 for v in replies.values())


def open_fds() -> int:
    gc.collect()  # other tests' devices let go of their descriptors when collected
    return len(os.listdir("/proc/self/fd"))


def test_close_with_requests_in_flight_releases_threads_and_fds(
    harness_of: list[VspHarness],
) -> None:
    backend = SlowBackend(wanted=10**6, hold=0.2)  # running reads end by themselves
    harness = ready(backend, harness_of)
    threads, fds = threading.active_count(), open_fds()
    pfn = harness.allocate(1)[0]
    for lba in range(48):
        submit(harness, READ_10, lba, pfn)
    harness.pump()
    assert threading.active_count() > threads
    handler(harness).close()  # the worker closes the channel: the child went away
    assert harness.guest.poll() is None  # no completion written after close
    assert threading.active_count() == threads
    assert open_fds() == fds
    assert harness.watched == {}
    assert backend.reads < 48  # work no thread had started was dropped


def test_direct_backend_writes_then_reads_through_the_pool(
    harness_of: list[VspHarness], tmp_path: Path
) -> None:
    try:
        backend = DirectBackend(tmp_path / "disk.img", DISK)
    except OSError as error:
        pytest.skip(f"{tmp_path} refuses O_DIRECT: {error}")
    with backend:
        harness = ready(backend, harness_of)
        lbas = list(range(0, 512, 16))
        pages = {lba: harness.allocate(1)[0] for lba in lbas}
        for lba, pfn in pages.items():
            harness.memory.view(pfn * PAGE_SIZE, PAGE_SIZE)[:] = pattern(lba)
            submit(harness, WRITE_10, lba, pfn)
        writes = collect(harness, len(lbas))
        assert all(srb_status(v[0])[0] == vstor.SrbStatus.SUCCESS for v in writes.values())
        with open(backend.path, "rb") as image:  # on the device, not in a cache of ours
            for lba in lbas:
                image.seek(lba * 512)
                assert image.read(PAGE_SIZE) == pattern(lba)
        for pfn in pages.values():  # the reads must bring the data back
            harness.memory.view(pfn * PAGE_SIZE, PAGE_SIZE)[:] = bytes(PAGE_SIZE)
        for lba, pfn in pages.items():
            submit(harness, READ_10, lba, pfn)
        reads = collect(harness, len(lbas))
        assert sorted(reads) == sorted(1000 + lba for lba in lbas)
        for lba, pfn in pages.items():
            assert bytes(harness.memory.view(pfn * PAGE_SIZE, PAGE_SIZE)) == pattern(lba)


def test_a_lone_request_is_served_inline_without_the_pool(harness_of: list[VspHarness]) -> None:
    """Nothing in flight and nothing behind it in the ring (QD1): no thread
    hand-off, the reply written at once."""
    backend = SlowBackend(wanted=1)
    backend.data[:PAGE_SIZE] = pattern(0)
    harness = ready(backend, harness_of)
    pfn = harness.allocate(1)[0]
    submit(harness, READ_10, 0, pfn)
    harness.pump()
    reply = harness.guest.poll()
    assert reply is not None and srb_status(bytes(reply.payload))[0] == vstor.SrbStatus.SUCCESS
    assert handler(harness).pool is None
    assert bytes(harness.memory.view(pfn * PAGE_SIZE, PAGE_SIZE)) == pattern(0)


def test_a_context_without_a_worker_to_watch_serves_every_request_inline(
    harness_of: list[VspHarness],
) -> None:
    backend = SlowBackend(wanted=1)
    harness = ready(backend, harness_of)

    def no_worker(fd: int, callback: object) -> None:
        raise UsageError("this context has no worker to watch descriptors")

    harness.context.watch = no_worker
    threads, fds = threading.active_count(), open_fds()
    pfn = harness.allocate(1)[0]
    for lba in range(4):
        submit(harness, READ_10, lba, pfn)
    replies = collect(harness, 4)
    assert sorted(replies) == [1000 + lba for lba in range(4)]
    assert handler(harness).pool is None and backend.most == 1
    assert (threading.active_count(), open_fds()) == (threads, fds)
