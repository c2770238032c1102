"""storvsc's zero-copy buffers and batches, in one process: BlockDevice
against StorVsp over vmbus.testing.loopback (the real control plane, the
VSP on its worker) and over PumpedDevice (one thread)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy
import pytest

import vsc.storage.controller
from vmbus import guid
from vmbus.errors import UsageError
from vmbus.guest import Guest, GuestDevice
from vmbus.memory import PAGE_SIZE
from vmbus.testing import PumpedDevice, loopback
from vsc.storage import (
    AsyncBlockDevice,
    BlockDevice,
    Flush,
    GuestBuffer,
    Read,
    ScsiError,
    StorageController,
    Write,
)
from vsp.storage import RamBackend, ReadOnlyBackend, StorVsp

MiB = 1 << 20
DISK = 4 * MiB


@contextmanager
def scsi_device(vsp: StorVsp) -> Iterator[tuple[GuestDevice, Guest]]:
    devices: list[GuestDevice] = []

    def bind(device: GuestDevice) -> GuestDevice:
        devices.append(device)
        return device  # bound: not offered to the driver again

    def register(guest: Guest) -> None:
        guest.register(guid.SCSI, bind)

    with loopback([vsp], register) as (guest, _):
        (primary,) = [d for d in devices if d.sub_channel_index == 0]
        yield primary, guest


@contextmanager
def ram_disk(**controller: Any) -> Iterator[tuple[BlockDevice, Guest]]:
    with scsi_device(StorVsp([RamBackend(DISK)], max_transfer_bytes=256 << 10)) as (device, guest):
        disk = BlockDevice(device, **controller)
        try:
            yield disk, guest
        finally:
            disk.close()


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def fill_slots(controller: StorageController, byte: int) -> None:
    for slot in controller.slots:
        slot.view[:] = bytes([byte]) * len(slot.view)


def slots_hold_only(controller: StorageController, byte: int) -> bool:
    return all(slot.view.tobytes().count(byte) == len(slot.view) for slot in controller.slots)


def test_a_buffer_is_zeroed_writable_guest_memory_of_its_own() -> None:
    with ram_disk(queue_depth=2) as (disk, guest):
        free = guest.allocator.free_count
        buffer = disk.buffer(3 * PAGE_SIZE + 100)
        assert isinstance(buffer, GuestBuffer)
        assert len(buffer) == buffer.nbytes == 3 * PAGE_SIZE + 100
        assert guest.allocator.free_count == free - 4  # whole pages
        assert buffer.pfns == tuple(range(buffer.pfns[0], buffer.pfns[0] + 4))
        assert buffer.gpa == buffer.pfns[0] * PAGE_SIZE
        assert buffer.gpa + len(buffer) <= guest.memory.size
        assert bytes(buffer) == bytes(len(buffer))
        numpy.frombuffer(buffer, dtype=numpy.uint32)[:2] = [0x11223344, 7]
        with guest.memory.view(buffer.gpa, 8) as seen:  # the guest's own bytes
            assert seen.tobytes() == bytes.fromhex("4433221107000000")
        buffer[8:12] = b"abcd"
        assert buffer[8:12].tobytes() == b"abcd"


def test_zero_copy_reads_and_writes_move_no_bounce_copy() -> None:
    """The slots keep their sentinel through a write from and a read into
    guest buffers (one of them split over several SRBs, one of them a slice
    at an odd address): the VSP moved the data straight to and from them."""
    with ram_disk(queue_depth=4, max_io_bytes=64 << 10) as (disk, _):
        fill_slots(disk.controller, 0xEE)
        source, back = disk.buffer(200 << 10), disk.buffer(200 << 10)
        data = pattern(1, 200 << 10)
        source[:] = data
        disk.write(MiB, source)
        disk.read_into(MiB, back)
        assert bytes(back) == data
        odd = memoryview(back)[1000 : 1000 + 8192]  # not page-aligned: a byte_offset
        disk.read_into(4096, odd)
        disk.write(2 * MiB, numpy.frombuffer(source, dtype=numpy.uint8)[:8192])
        assert slots_hold_only(disk.controller, 0xEE)
        odd.release()
        assert disk.read(4096, 8192) == bytes(back)[1000 : 1000 + 8192]
        assert disk.read(2 * MiB, 8192) == data[:8192]


def test_ordinary_bytes_still_go_through_the_bounce_slots() -> None:
    with ram_disk(queue_depth=2) as (disk, _):
        data = pattern(2, 64 << 10)
        disk.write(0, data)
        out = bytearray(64 << 10)
        disk.read_into(0, out)
        assert out == data
        assert disk.read(0, 4096) == data[:4096]


def test_released_buffers_give_their_pages_back_when_their_last_view_goes() -> None:
    with ram_disk(queue_depth=2) as (disk, guest):
        free = guest.allocator.free_count
        with disk.buffer(PAGE_SIZE) as first:
            pass
        assert first.released and guest.allocator.free_count == free
        with pytest.raises(ValueError):
            memoryview(first)  # a released buffer exports nothing
        second = disk.buffer(2 * PAGE_SIZE)
        view = memoryview(second)
        second.release()
        second.release()  # idempotent
        assert guest.allocator.free_count == free - 2  # the view still holds them
        view.release()
        assert guest.allocator.free_count == free


def test_close_releases_every_buffer_the_device_handed_out() -> None:
    with scsi_device(StorVsp([RamBackend(DISK)])) as (device, guest):
        free = guest.allocator.free_count
        disk = BlockDevice(device, queue_depth=2)
        buffers = [disk.buffer(PAGE_SIZE) for _ in range(3)]
        disk.close()
        assert all(b.released for b in buffers)
        assert guest.allocator.free_count == free


def test_a_buffer_read_is_refused_for_read_only_memory() -> None:
    with ram_disk(queue_depth=2) as (disk, _), pytest.raises(BufferError):
        disk.read_into(0, b"\0" * 512)


def test_submit_many_answers_each_request_in_order() -> None:
    """More requests than the queue depth, bounce and zero-copy mixed: every
    read gets its own block's data and every result is None."""
    with ram_disk(queue_depth=4) as (disk, _):
        blocks = 40
        writes = [Write(i * 8192, pattern(i, 4096)) for i in range(blocks)]
        assert disk.submit_many([*writes, Flush()]) == [None] * (blocks + 1)
        into = [disk.buffer(4096) if i % 2 else bytearray(4096) for i in range(blocks)]
        reads = [Read(i * 8192, buffer) for i, buffer in enumerate(into)]
        assert disk.submit_many(reads) == [None] * blocks
        assert [bytes(b) for b in into] == [pattern(i, 4096) for i in range(blocks)]


def test_submit_many_reports_each_failure_at_its_request() -> None:
    vsp = StorVsp([ReadOnlyBackend(RamBackend(DISK))])
    with scsi_device(vsp) as (device, _):
        disk = BlockDevice(device, queue_depth=3)
        buffer = disk.buffer(4096)
        requests = [Read(0, buffer), Write(0, bytes(4096)), Read(4096, bytearray(4096))]
        requests += [Write(8192, disk.buffer(8192)), Flush()]
        results = disk.submit_many(requests)
        assert [r is None for r in results] == [True, False, True, False, True]
        assert all(isinstance(r, ScsiError) and r.sense_key == 0x7 for r in results if r)
        with pytest.raises(ScsiError):
            disk.write_many([(0, bytes(512)), (512, bytes(512))])
        disk.close()


def test_submit_many_checks_every_request_before_sending_any() -> None:
    with ram_disk(queue_depth=2) as (disk, _):
        disk.write(0, b"\x01" * 512)
        with pytest.raises(UsageError):
            disk.submit_many([Write(0, b"\x02" * 512), Write(DISK, bytes(512))])
        with pytest.raises(UsageError):
            disk.submit_many([Write(0, b"\x02" * 512), "flush"])  # type: ignore[list-item]
        assert disk.read(0, 512) == b"\x01" * 512


def test_a_batch_larger_than_the_ring_waits_for_room() -> None:
    """A ring with room for a few SRBs and a queue depth of 32: the batch
    stops when the ring is full, reaps, and goes on."""
    with scsi_device(StorVsp([RamBackend(DISK)])) as (device, _):
        disk = BlockDevice(device, queue_depth=32, ring_size=2 * PAGE_SIZE)
        data = [pattern(i, 512) for i in range(200)]
        disk.write_many([(i * 512, d) for i, d in enumerate(data)])
        assert disk.read(0, 200 * 512) == b"".join(data)
        disk.close()


def test_pumped_device_zero_copy_batches() -> None:
    """The same through PumpedDevice: the VSP runs whenever the VSC waits.
    (Its channels cannot close: the disk shares a controller it keeps.)"""
    device: Any = PumpedDevice(StorVsp([RamBackend(DISK)]), memory_size=16 * MiB)
    free = device.allocator.free_count
    disk = BlockDevice(StorageController(device, queue_depth=8))
    slots = device.allocator.free_count
    buffers = [disk.buffer(4096) for _ in range(16)]
    for i, buffer in enumerate(buffers):
        buffer[:] = pattern(i, 4096)
    disk.write_many([(i * 4096, b) for i, b in enumerate(buffers)])
    backs = [disk.buffer(4096) for _ in range(16)]
    disk.read_many([(i * 4096, b) for i, b in enumerate(reversed(backs))])
    assert [bytes(b) for b in reversed(backs)] == [pattern(i, 4096) for i in range(16)]
    disk.close()
    assert device.allocator.free_count == slots < free


def test_the_asyncio_form_moves_guest_buffers_zero_copy() -> None:
    async def main(disk: BlockDevice) -> None:
        adisk = AsyncBlockDevice(disk)
        try:
            sources = [adisk.buffer(4096) for _ in range(6)]
            for i, source in enumerate(sources):
                source[:] = pattern(i, 4096)
            await asyncio.gather(*(adisk.write(i * 4096, s) for i, s in enumerate(sources)))
            await adisk.flush()
            backs = [adisk.buffer(4096) for _ in range(6)]
            await asyncio.gather(*(adisk.read_into(i * 4096, b) for i, b in enumerate(backs)))
            assert [bytes(b) for b in backs] == [pattern(i, 4096) for i in range(6)]
            results = await adisk.submit_many(
                [Read(0, bytearray(4096)), Write(DISK - 512, bytes(512)), Flush()]
            )
            assert results == [None, None, None]
        finally:
            adisk.close()

    with ram_disk(queue_depth=4) as (disk, _):
        fill_slots(disk.controller, 0xEE)
        asyncio.run(main(disk))


def test_depth_caps_the_requests_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    """submit_many(depth=2) on a controller of 8 slots: never more than two
    SRBs out at once, each refilled as one completes; all answered."""
    seen: list[int] = []
    reap = StorageController._reap

    def counting(self: StorageController, failures: Any) -> int:
        seen.append(sum(len(flight) for flight in self._in_flight))
        return reap(self, failures)

    monkeypatch.setattr(StorageController, "_reap", counting)
    with ram_disk(queue_depth=8) as (disk, _):
        data = [pattern(i, 512) for i in range(12)]
        results = disk.submit_many([Write(i * 512, d) for i, d in enumerate(data)], depth=2)
        assert results == [None] * 12
        assert max(seen) == 2
        disk.read_many([(0, out := bytearray(12 * 512))], depth=1)
        assert out == b"".join(data)
        with pytest.raises(UsageError):
            disk.submit_many([Flush()], depth=0)


def test_the_python_loops_serve_a_ring_that_is_not_the_compiled_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the pure-Python ring (VMBUS_RING=python), SRBs are written and
    completions reaped by the Python loops: the same answers, failures at
    their requests."""
    for name in ("CompiledReader", "CompiledWriter"):
        monkeypatch.setattr(vsc.storage.controller, name, type("NotThisRing", (), {}))
    test_submit_many_answers_each_request_in_order()
    test_submit_many_reports_each_failure_at_its_request()
