"""Storage end to end: a child's BlockDevice against the parent's storvsp,
across processes, checked against a model of the disk."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from vmbus import guid
from vmbus.guest import Guest, GuestDevice
from vmbus.partition import Host
from vsc.storage import BlockDevice, ScsiError, StorageController
from vsp.storage import StorVsp
from vsp.storage.backends import RamBackend, RawFileBackend, ReadOnlyBackend

MiB = 1 << 20


def scsi_devices(guest: Guest) -> list[GuestDevice]:
    devices: list[GuestDevice] = []
    guest.register(guid.SCSI, devices.append)
    return [d for d in devices if d.sub_channel_index == 0]


def random_io(guest: Guest, seed: int, steps: int, sub_channels: int) -> None:
    """Child: random batches of disjoint writes and reads at random queue
    depths, every read checked against a model of the disk."""
    rng = random.Random(seed)
    (device,) = scsi_devices(guest)
    controller = StorageController(
        device, queue_depth=rng.choice([1, 4, 32]), max_io_bytes=64 << 10
    )
    if sub_channels:
        assert controller.create_sub_channels(sub_channels) == sub_channels
    disk = controller.disk(0)
    assert (disk.block_size, disk.capacity) == (512, 4 * MiB)
    model = bytearray(disk.capacity)
    for _ in range(steps):
        starts = sorted(rng.sample(range(0, disk.capacity // 4096), rng.randint(1, 8)))
        writes = []
        for start, end in zip(starts, [*starts[1:], disk.capacity // 4096], strict=True):
            offset = start * 4096 + rng.randrange(8) * 512
            length = rng.randint(1, min(300, (end * 4096 - offset) // 512)) * 512
            writes.append((offset, rng.randbytes(length)))
        disk.write_many(writes)
        for offset, data in writes:
            model[offset : offset + len(data)] = data
        reads = [(offset, bytearray(len(data))) for offset, data in writes]
        reads.append((0, bytearray(disk.capacity)))
        disk.read_many(reads)
        for offset, buffer in reads:
            assert buffer == model[offset : offset + len(buffer)], f"read at {offset} differs"
    disk.flush()
    controller.close()


@pytest.mark.parametrize(("seed", "sub_channels"), [(1, 0), (2, 0), (3, 2)])
def test_random_io_matches_a_model(tmp_path: Path, seed: int, sub_channels: int) -> None:
    backend = RawFileBackend(tmp_path / "disk.img", size=4 * MiB)
    with Host() as host:
        vsp = StorVsp([backend], channels=1 + sub_channels)
        child = host.start(random_io, devices=[vsp], args=(seed, 6, sub_channels))
        assert child.wait(timeout=120) == 0
        (stats,) = child.device_stats()  # the worker process's StorVsp, at its end
        assert stats["errors"] == 0
        assert stats["open_channels"] == 0  # the child closed its channels: none is kept
        served = stats["requests_by_channel"]
        assert sorted(served) == [str(index) for index in range(1 + sub_channels)]
        assert all(served.values())  # requests spread over every channel


def two_luns_and_errors(guest: Guest) -> None:
    (device,) = scsi_devices(guest)
    controller = StorageController(device)
    first, second, readonly = controller.disk(0), controller.disk(5), controller.disk(7)
    assert (first.capacity, second.capacity) == (1 * MiB, 2 * MiB)
    first.write(0, b"A" * 4096)
    second.write(0, b"B" * 4096)
    assert first.read(0, 4096) == b"A" * 4096 and second.read(0, 4096) == b"B" * 4096
    with pytest.raises(ScsiError) as error:
        readonly.write(0, bytes(512))
    assert (error.value.sense_key, error.value.asc) == (0x7, 0x27)  # DATA PROTECT
    with pytest.raises(ValueError, match="run past"):
        first.read(MiB - 512, 1024)
    with pytest.raises(ScsiError) as error:
        BlockDevice(controller, lun=3)  # no such LUN
    assert error.value.srb_status & 0x3F == 0x20  # SRB_STATUS_INVALID_LUN
    first.discard(0, 4096)
    assert first.read(0, 4096) == bytes(4096)
    controller.close()


def test_several_luns_and_their_errors() -> None:
    with Host() as host:
        disks = {0: RamBackend(MiB), 5: RamBackend(2 * MiB), 7: ReadOnlyBackend(RamBackend(MiB))}
        child = host.start(two_luns_and_errors, devices=[StorVsp(disks)])
        assert child.wait(timeout=60) == 0


def async_io(guest: Guest) -> None:
    """Child: the asyncio form, many calls at once."""
    import asyncio

    from vsc.storage import AsyncBlockDevice

    (device,) = scsi_devices(guest)
    disk = BlockDevice(device, queue_depth=8)

    async def main() -> None:
        adisk = AsyncBlockDevice(disk)
        try:
            blocks = [bytes([i]) * 4096 for i in range(40)]
            await asyncio.gather(*(adisk.write(i * 4096, b) for i, b in enumerate(blocks)))
            await adisk.flush()
            outs = [bytearray(4096) for _ in blocks]
            await asyncio.gather(*(adisk.read_into(i * 4096, o) for i, o in enumerate(outs)))
            assert [bytes(o) for o in outs] == blocks
        finally:
            adisk.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_asyncio_block_device() -> None:
    with Host() as host:
        child = host.start(async_io, devices=[StorVsp([RamBackend(MiB)])])
        assert child.wait(timeout=60) == 0


def two_controllers(guest: Guest) -> None:
    """Child: two SCSI controllers (two offers of the SCSI class), one disk each."""
    devices = scsi_devices(guest)
    assert len(devices) == 2 and devices[0].instance_id != devices[1].instance_id
    disks = [BlockDevice(device) for device in devices]
    for i, disk in enumerate(disks):
        disk.write(0, bytes([i + 1]) * 4096)
    assert [disk.read(0, 512)[:1] for disk in disks] == [b"\x01", b"\x02"]
    assert sorted(disk.capacity for disk in disks) == [MiB, 2 * MiB]


def test_several_controllers_per_child() -> None:
    with Host() as host:
        vsps = [StorVsp([RamBackend(MiB)]), StorVsp([RamBackend(2 * MiB)])]
        child = host.start(two_controllers, devices=vsps)
        assert child.wait(timeout=60) == 0
