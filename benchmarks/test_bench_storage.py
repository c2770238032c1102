"""pytest-benchmark tests of the storage path in one process and one thread:
the SCSI disk alone, storvsp serving SRBs from an in-process channel pair,
and the whole BlockDevice → storvsp → backend path over a loopback channel
that serves the VSP whenever the guest would wait. No process wakes another:
these are the CPU costs per request, the floor of the cross-process figures.

    .venv/bin/pytest benchmarks/test_bench_storage.py --benchmark-enable -p no:cacheprovider

The cross-process figures are `python -m benchmarks.storage_bench`.
"""

from __future__ import annotations

import itertools
import random
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import vsc.storage.controller
from benchmarks.storage_bench import page_buffer
from vmbus.channel import COMPLETION_REQUESTED, Channel
from vmbus.memory import PAGE_SIZE, GuestMemory, guest_segments
from vmbus.packet import (
    GpaRange,
    PacketType,
    decode_gpa_direct_header,
    encode_gpa_direct_header,
)
from vmbus.protocols import storage as vstor
from vmbus.protocols.storage.scsi_wire import DataDirection, Opcode
from vmbus.testing import PumpedDevice, VspHarness
from vsc.storage import BlockDevice, StorageController
from vsp.storage import (
    BlockBackend,
    RamBackend,
    RawFileBackend,
    ScsiDisk,
    StorVsp,
)

KiB, MiB = 1 << 10, 1 << 20
DISK = 64 * MiB
RING = 128 * KiB
QUEUE_DEPTH = 32


def read16(offset: int, length: int, block_size: int = 512) -> bytes:
    return struct.pack(
        ">BBQIBB", Opcode.READ_16, 0, offset // block_size, length // block_size, 0, 0
    )


def random_offsets(size: int) -> Iterator[int]:
    rng = random.Random(1)
    return itertools.cycle([rng.randrange(DISK // size) * size for _ in range(4096)])


@pytest.fixture(params=["ram", "file"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlockBackend]:
    """A RAM disk, or a raw file with its page cache warm."""
    if request.param == "ram":
        yield RamBackend(DISK)
        return
    with RawFileBackend(tmp_path / "disk.img", size=DISK) as disk:
        chunk = random.Random(1).randbytes(MiB)
        for offset in range(0, DISK, MiB):
            disk.writev(offset, [memoryview(chunk)])
        yield disk


# --- the SCSI disk alone -----------------------------------------------------------


def test_scsi_disk_read16_4k(benchmark: Any, backend: BlockBackend) -> None:
    """ScsiDisk.execute of READ(16), 4 KiB into one segment."""
    disk = ScsiDisk(backend)
    buffer = memoryview(page_buffer(4 * KiB))
    where = random_offsets(4 * KiB)

    def one() -> None:
        result = disk.execute(read16(next(where), 4 * KiB), [buffer], DataDirection.IN)
        assert result.transferred == 4 * KiB

    benchmark(one)


# --- the data of a 1 MiB read: into guest memory, then out of the bounce slot -----------


@pytest.fixture
def guest_page_run() -> Iterator[memoryview]:
    """1 MiB of guest memory (a memfd mapping), as a bounce slot is."""
    memory = GuestMemory.create(2 * MiB, name="storage-bench")
    view = memory.view(0, MiB)
    view[:] = bytes(MiB)
    yield view
    view.release()
    memory.close()


def test_file_readv_1mib_into_guest_memory(
    benchmark: Any, tmp_path: Path, guest_page_run: memoryview
) -> None:
    """RawFileBackend.readv (one preadv) of 1 MiB from a warm page cache into
    guest memory: what storvsp does for a 1 MiB READ."""
    with RawFileBackend(tmp_path / "disk.img", size=DISK) as disk:
        chunk = random.Random(1).randbytes(MiB)
        for offset in range(0, DISK, MiB):
            disk.writev(offset, [memoryview(chunk)])
        where = itertools.cycle(range(0, DISK, MiB))
        benchmark(lambda: disk.readv(next(where), [guest_page_run]))


def test_bounce_copy_1mib(benchmark: Any, guest_page_run: memoryview) -> None:
    """The VSC's copy of a completed 1 MiB read out of its bounce slot into
    the caller's page-aligned buffer."""
    out = memoryview(page_buffer(MiB))

    def copy() -> None:
        out[:] = guest_page_run

    benchmark(copy)


# --- the per-request pieces of the VSTOR protocol, each side -------------------------


class Wire:
    """One READ(16) SRB of 4 KiB as both sides see it, on a protocol pair
    that has done its initialization."""

    def __init__(self) -> None:
        self.version = vstor.VSTOR_VERSION_WIN10
        self.cdb = read16(8 * PAGE_SIZE, 4 * KiB)
        self.ranges = [GpaRange(4 * KiB, 0, (100,))]
        self.header = encode_gpa_direct_header(self.ranges)
        self.srb = vstor.build_srb(self.cdb, 0, 1, 4 * KiB, version=self.version)
        self.vsp = vstor.StorvspProtocol(MiB)
        vsc, packet = vstor.StorvscProtocol(), None
        packet = vsc.start()
        while packet is not None:
            reply = self.vsp.receive(packet)
            assert isinstance(reply, vstor.Reply)
            packet = vsc.receive(reply.payload)
        event = self.vsp.receive(self.srb, self.ranges)
        assert isinstance(event, vstor.ExecuteSrb)
        self.request = event.request
        self.completion = self.complete()

    def complete(self) -> bytes:
        return self.vsp.complete_srb(self.request, vstor.SrbStatus.SUCCESS, 0, b"", 4 * KiB)


@pytest.fixture(scope="module")
def wire() -> Wire:
    return Wire()


def test_vsc_build_srb(benchmark: Any, wire: Wire) -> None:
    benchmark(lambda: vstor.build_srb(wire.cdb, 0, 1, 4 * KiB, version=wire.version))


PAGES = pytest.mark.parametrize("pages", [1, 256], ids=["4KiB", "1MiB"])


@PAGES
def test_vsc_encode_gpa_ranges(benchmark: Any, pages: int) -> None:
    """The GPA-direct header of one request (a bounce slot's PFNs)."""
    pfns = tuple(range(100, 100 + pages))
    benchmark(lambda: encode_gpa_direct_header([GpaRange(pages * PAGE_SIZE, 0, pfns)]))


def test_vsc_parse_completion(benchmark: Any, wire: Wire) -> None:
    benchmark(lambda: vstor.parse_completion(wire.completion))


@PAGES
def test_vsp_decode_gpa_ranges(benchmark: Any, pages: int) -> None:
    """Decoding and checking a request's GPA-direct header."""
    pfns = tuple(range(100, 100 + pages))
    header = encode_gpa_direct_header([GpaRange(pages * PAGE_SIZE, 0, pfns)])
    benchmark(lambda: decode_gpa_direct_header(header, max_pfn=1 << 20))


def test_vsp_guest_segments_1mib(benchmark: Any) -> None:
    """storvsp's views of a 1 MiB guest buffer (256 PFNs) for the backend."""
    memory = GuestMemory.create(4 * MiB, name="storage-bench")
    header = encode_gpa_direct_header([GpaRange(MiB, 0, tuple(range(100, 356)))])
    ranges = decode_gpa_direct_header(header, max_pfn=memory.page_count)

    def segments() -> None:
        for view in guest_segments(memory, ranges, MiB):
            view.release()

    benchmark(segments)
    memory.close()


def test_vsp_receive_srb(benchmark: Any, wire: Wire) -> None:
    """StorvspProtocol.receive: the VSTOR packet and its vm_srb, checked."""
    benchmark(lambda: wire.vsp.receive(wire.srb, wire.ranges))


def test_vsp_complete_srb(benchmark: Any, wire: Wire) -> None:
    benchmark(wire.complete)


# --- storvsp serving SRBs from an in-process channel pair -------------------------------


def pumped_wait_any(channels: list[Channel], timeout: float | None) -> None:
    for channel in channels:
        channel.wait(None)


@pytest.fixture
def controller(
    backend: BlockBackend, monkeypatch: pytest.MonkeyPatch
) -> Iterator[StorageController]:
    """A StorageController (QD32, 1 MiB requests) on a loopback to a StorVsp."""
    monkeypatch.setattr(vsc.storage.controller, "wait_any", pumped_wait_any)
    vsp = StorVsp([backend], max_transfer_bytes=MiB)
    device: Any = PumpedDevice(vsp, memory_size=QUEUE_DEPTH * MiB + 4 * MiB)
    yield StorageController(device, queue_depth=QUEUE_DEPTH, max_io_bytes=MiB, ring_size=RING)


def test_storvsp_srb_read_4k(benchmark: Any, controller: StorageController) -> None:
    """One prebuilt READ(16) SRB through the guest channel, served by storvsp
    (decode, GPA ranges, the disk, the completion), completion read back."""
    channel = controller.channel
    slot = controller.slots[0]
    header = encode_gpa_direct_header([GpaRange(4 * KiB, 0, slot.pfns[:1])])
    where = random_offsets(4 * KiB)
    version = controller.protocol.version or vstor.VSTOR_VERSION_WIN10
    packets = [
        vstor.build_srb(read16(next(where), 4 * KiB), 0, 1, 4 * KiB, version=version)
        for _ in range(256)
    ]
    cycle = itertools.cycle(packets)

    def one() -> None:
        trans_id = next(channel.ids)
        channel.send(
            next(cycle),
            type=PacketType.DATA_USING_GPA_DIRECT,
            flags=COMPLETION_REQUESTED,
            trans_id=trans_id,
            header=header,
        )
        completion = vstor.parse_completion(channel.wait_completion(trans_id).payload)
        assert completion.succeeded

    benchmark(one)
    assert 4 * KiB == PAGE_SIZE


# --- the whole BlockDevice path, in one thread ---------------------------------------------


@pytest.mark.parametrize("size", [4 * KiB, MiB], ids=["4KiB", "1MiB"])
def test_block_device_read_into(benchmark: Any, controller: StorageController, size: int) -> None:
    """BlockDevice.read_into at QD1: build, send, serve, complete, copy out."""
    disk = BlockDevice(controller)
    buffer = page_buffer(size)
    where = random_offsets(size)
    benchmark(lambda: disk.read_into(next(where), buffer))


def test_block_device_write_4k(benchmark: Any, controller: StorageController) -> None:
    disk = BlockDevice(controller)
    buffer = page_buffer(4 * KiB)
    where = random_offsets(4 * KiB)
    benchmark(lambda: disk.write(next(where), buffer))


def test_block_device_read_many_32x4k(benchmark: Any, controller: StorageController) -> None:
    """read_many of 32 × 4 KiB (one call: divide by 32 for a request)."""
    disk = BlockDevice(controller)
    buffers = [page_buffer(4 * KiB) for _ in range(QUEUE_DEPTH)]
    where = random_offsets(4 * KiB)
    benchmark(lambda: disk.read_many([(next(where), b) for b in buffers]))


# --- storvsp alone: the compiled path against the Python one ------------------------


@pytest.mark.parametrize("fast", [True, False], ids=["compiled", "python"])
def test_storvsp_drains_32_reads_4k(benchmark: Any, tmp_path: Path, fast: bool) -> None:
    """The VSP's share only: 32 READ(16) SRBs of 4 KiB (each on its own page)
    queued on the ring beforehand, then one pump of the handler, which
    serves them on the compiled path (`fast`) or in Python, from a raw file
    with its page cache warm. Divide by 32 for a request."""
    with RawFileBackend(tmp_path / "disk.img", size=DISK) as backend:
        backend.writev(0, [memoryview(random.Random(1).randbytes(DISK))])
        vsp = StorVsp([backend], max_transfer_bytes=MiB, fast_path=fast)
        with VspHarness(vsp, memory_size=8 * MiB, ring_size=RING) as harness:
            guest, protocol = harness.guest, vstor.StorvscProtocol()
            packet: bytes | None = protocol.start()
            while packet is not None:
                guest.send(packet, flags=COMPLETION_REQUESTED, trans_id=1)
                harness.pump()
                reply = guest.poll()
                assert reply is not None
                packet = protocol.receive(reply.payload)
            pfns = harness.allocate(QUEUE_DEPTH)
            headers = [encode_gpa_direct_header([GpaRange(4 * KiB, 0, (p,))]) for p in pfns]
            version = protocol.version or vstor.VSTOR_VERSION_WIN10
            where = random_offsets(4 * KiB)

            def queue() -> None:
                while guest.poll() is not None:  # the previous round's completions
                    pass
                for index, header in enumerate(headers):
                    srb = vstor.build_srb(
                        read16(next(where), 4 * KiB), 0, 1, 4 * KiB, version=version
                    )
                    guest.send(
                        srb,
                        type=PacketType.DATA_USING_GPA_DIRECT,
                        flags=COMPLETION_REQUESTED,
                        trans_id=index + 2,
                        header=header,
                    )

            benchmark.pedantic(harness.pump, setup=queue, rounds=300, iterations=1)
            assert guest.reader.bytes_available  # the completions came back
