"""BlockDevice against StorVsp in one process (vmbus.testing.loopback): the
calls a child program makes, the UNMAP limits it must honour, and the
offers a controller's sub-channels cost across reopens."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from vmbus import guid
from vmbus.guest import Guest, GuestDevice
from vmbus.partition import ChildPartition
from vmbus.testing import loopback
from vsc.storage import BlockDevice, ScsiError, StorageController
from vsp.storage import NullBackend, RamBackend, ReadOnlyBackend, StorVsp

MiB, GiB = 1 << 20, 1 << 30


@contextmanager
def scsi_loopback(vsp: StorVsp) -> Iterator[tuple[GuestDevice, Guest, ChildPartition]]:
    devices: list[GuestDevice] = []

    def bind(device: GuestDevice) -> GuestDevice:
        devices.append(device)
        return device  # bound: not offered to the driver again

    def register(guest: Guest) -> None:
        guest.register(guid.SCSI, bind)

    with loopback([vsp], register) as (guest, partition):
        (primary,) = [d for d in devices if d.sub_channel_index == 0]
        yield primary, guest, partition


class CountingNull(NullBackend):
    """A disk of any size that records what it is asked to discard."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.discards: list[tuple[int, int]] = []

    def discard(self, offset: int, length: int) -> None:
        self.discards.append((offset, length))


def test_capacity_read_write_flush_discard() -> None:
    with scsi_loopback(StorVsp([RamBackend(4 * MiB)])) as (device, _, _):
        disk = BlockDevice(device, queue_depth=4)
        assert (disk.block_size, disk.block_count, disk.capacity) == (512, 8192, 4 * MiB)
        model = bytearray(disk.capacity)
        data = bytes(i % 251 for i in range(80 << 10))
        disk.write(4096, data)
        model[4096 : 4096 + len(data)] = data
        disk.write(0, b"\x11" * 512, fua=True)
        model[:512] = b"\x11" * 512
        disk.flush()
        disk.discard(8192, 16384)
        model[8192 : 8192 + 16384] = bytes(16384)
        assert disk.read(0, 128 << 10) == model[: 128 << 10]
        buffers = [bytearray(4096) for _ in range(8)]
        disk.read_many((i * 4096, b) for i, b in enumerate(buffers))
        assert b"".join(buffers) == model[: 8 * 4096]
        with pytest.raises(ValueError, match="multiples of 512"):
            disk.read(1, 512)
        with pytest.raises(ValueError, match="run past"):
            disk.write(disk.capacity, bytes(512))
        disk.close()


def test_large_io_is_split_into_requests_the_vsp_accepts() -> None:
    vsp = StorVsp([RamBackend(8 * MiB)], max_transfer_bytes=64 << 10)
    with scsi_loopback(vsp) as (device, _, _):
        disk = BlockDevice(device, max_io_bytes=1 << 20)
        assert disk.controller.max_io_bytes == 64 << 10  # the VSP's limit wins
        data = bytes(i % 251 for i in range(3 * MiB))
        disk.write(MiB, data)
        assert disk.read(MiB, len(data)) == data
        assert vsp.errors == 0
        disk.close()


def test_discard_of_more_than_1gib_is_split_within_the_advertised_unmap_limits() -> None:
    backend = CountingNull(3 * GiB)
    vsp = StorVsp([backend])
    with scsi_loopback(vsp) as (device, _, _):
        disk = BlockDevice(device)
        limit = disk.discard_limits.max_blocks * disk.block_size
        assert limit == GiB  # what VPD 0xB0 advertises
        disk.discard(512, 3 * GiB - 1024)
        assert backend.discards[0] == (512, GiB)
        assert all(length <= limit for _, length in backend.discards)
        assert sum(length for _, length in backend.discards) == 3 * GiB - 1024
        assert vsp.errors == 0
        disk.close()


def test_discard_on_a_disk_that_does_not_unmap_reports_the_disks_refusal() -> None:
    with scsi_loopback(StorVsp([ReadOnlyBackend(RamBackend(MiB))])) as (device, _, _):
        disk = BlockDevice(device)
        with pytest.raises(ScsiError) as error:
            disk.discard(0, 4096)
        assert (error.value.sense_key, error.value.asc) == (0x7, 0x27)  # DATA PROTECT
        assert isinstance(error.value, OSError)
        disk.close()


def test_reopening_the_primary_does_not_offer_its_sub_channels_again() -> None:
    vsp = StorVsp([RamBackend(MiB)], channels=3)
    with scsi_loopback(vsp) as (device, guest, partition):
        counts = []
        for cycle in range(4):
            controller = StorageController(device, queue_depth=4)
            assert controller.create_sub_channels(2) == 2
            disk = controller.disk(0)
            disk.write(0, bytes([cycle]) * 4096)
            assert disk.read(0, 4096) == bytes([cycle]) * 4096
            controller.close()
            counts.append(len(partition.server.offers))
        assert counts == [3] * 4  # the primary and its two sub-channels, once
        assert sum(1 for d in guest.devices.values() if d.sub_channel_index) == 2
        assert vsp.handlers == [] and vsp.errors == 0
