"""Storage devices cross to a VM's worker process (`vmbus.handoff`): every
backend and StorVsp pickles, file backends by their open descriptor, the RAM
disk by its memfd, so the parent's object and the worker's copy share one
disk; StorVsp.stats() is JSON."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, TypeVar

import pytest
from test_block_device import scsi_loopback

from vmbus import guid, handoff
from vmbus.errors import UsageError
from vmbus.guest import Guest, GuestDevice
from vmbus.partition import Host
from vsc.storage import BlockDevice, StorageController
from vsp.storage import (
    DirectBackend,
    FaultyBackend,
    NullBackend,
    RamBackend,
    RawFileBackend,
    ReadOnlyBackend,
    StorVsp,
)

MIB = 1 << 20
T = TypeVar("T")


def crossed(obj: T) -> T:
    """`obj` as the worker gets it: its descriptors duplicated, as SCM_RIGHTS does."""
    data, fds = handoff.dumps(obj)
    copy: T = handoff.loads(data, [os.dup(fd) for fd in fds])
    return copy


def read(backend: Any, offset: int, length: int) -> bytes:
    buffer = bytearray(length)
    backend.readv(offset, [memoryview(buffer)])
    return bytes(buffer)


def write(backend: Any, offset: int, data: bytes) -> None:
    backend.writev(offset, [memoryview(data)])


def shares_contents(parent: Any, copy: Any) -> None:
    write(parent, 0, b"\x11" * 512)
    assert read(copy, 0, 512) == b"\x11" * 512
    write(copy, 4096, b"\x22" * 4096)
    assert read(parent, 4096, 4096) == b"\x22" * 4096


def test_ram_disk_copy_shares_the_parents_bytes() -> None:
    parent = RamBackend(MIB)
    copy = crossed(parent)
    assert (copy.size, copy.block_size) == (MIB, 512)
    shares_contents(parent, copy)
    copy.discard(4096, 512)
    assert parent.data[4096:4608] == bytes(512)


class LabelledRam(RamBackend):
    def __init__(self, size: int, label: str) -> None:
        super().__init__(size, block_size=4096)
        self.label = label


def test_a_ram_disk_subclass_crosses_with_its_own_attributes() -> None:
    copy = crossed(LabelledRam(MIB, "scratch"))
    assert (copy.label, copy.block_size, copy.block_count) == ("scratch", 4096, MIB // 4096)
    assert len(copy.data) == MIB


def test_ram_disk_memfd_cannot_be_shrunk_under_the_parent() -> None:
    parent = RamBackend(MIB)
    copy = crossed(parent)
    with pytest.raises(PermissionError):
        os.ftruncate(copy._fd, 4096)  # what a hostile worker would try: SIGBUS in the parent
    copy.resize(4096)
    assert parent.data[MIB - 512 :] == bytes(512)  # the parent's mapping is still whole


def test_ram_disk_resize_zeroes_the_cut_blocks() -> None:
    disk = RamBackend(8192)
    disk.data[:] = b"\x55" * 8192
    disk.resize(4096)
    disk.resize(8192)
    assert disk.data[:4096] == b"\x55" * 4096 and disk.data[4096:] == bytes(4096)


def test_raw_file_copy_holds_the_open_file_not_its_path(tmp_path: Path) -> None:
    with RawFileBackend(tmp_path / "disk.img", size=MIB) as parent:
        copy = crossed(parent)
        try:
            assert copy.fd not in (-1, parent.fd) and copy.size == MIB
            shares_contents(parent, copy)
            os.replace(tmp_path / "disk.img", tmp_path / "moved.img")
            (tmp_path / "disk.img").write_bytes(bytes(MIB))  # another file at the path
            assert read(copy, 0, 512) == b"\x11" * 512
        finally:
            copy.close()


def test_closed_file_backend_crosses_closed(tmp_path: Path) -> None:
    parent = RawFileBackend(tmp_path / "disk.img", size=MIB)
    parent.close()
    assert crossed(parent).fd == -1


def test_direct_backend_copy_shares_the_device(tmp_path: Path) -> None:
    try:
        parent = DirectBackend(tmp_path / "direct.img", size=MIB, alignment=4096)
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise
        pytest.skip(f"{tmp_path} refuses O_DIRECT")
    with parent, crossed(parent) as copy:
        assert copy.alignment == parent.alignment and copy.concurrent
        assert copy._write_lock is not None  # 4 KiB device blocks under 512-byte ones
        shares_contents(parent, copy)


def test_wrappers_cross_with_their_inner_backend(tmp_path: Path) -> None:
    ram = RamBackend(MIB)
    read_only = crossed(ReadOnlyBackend(ram))
    write(ram, 0, b"\x33" * 512)
    assert read_only.read_only and read(read_only, 0, 512) == b"\x33" * 512
    with pytest.raises(PermissionError):
        write(read_only, 0, bytes(512))
    with RawFileBackend(tmp_path / "disk.img", size=MIB) as raw:
        faulty = crossed(FaultyBackend(raw, fail_reads=[(0, 512)]))
        with pytest.raises(OSError):
            read(faulty, 0, 512)
        shares_contents(raw, faulty.inner)
        faulty.inner.close()
    null = crossed(NullBackend(MIB))
    assert null.block_count == MIB // 512 and read(null, 0, 512) == bytes(512)


def test_storvsp_crosses_with_its_disks_and_configuration(tmp_path: Path) -> None:
    ram = RamBackend(MIB)
    with RawFileBackend(tmp_path / "disk.img", size=MIB) as raw:
        vsp = StorVsp({0: raw, 3: ram}, channels=4, max_transfer_bytes=256 << 10)
        copy = crossed(vsp)
        assert (copy.instance_id, copy.channels, copy.max_transfer_bytes) == (
            vsp.instance_id,
            4,
            256 << 10,
        )
        assert sorted(copy.target.disks) == [0, 3] and copy.targets[(0, 0)] is copy.target
        shares_contents(ram, copy.target.disks[3].backend)
        shares_contents(raw, copy.target.disks[0].backend)
        copy.target.disks[0].backend.close()
        assert copy.stats() == vsp.stats()


def test_storvsp_with_open_channels_refuses_to_cross() -> None:
    vsp = StorVsp([RamBackend(MIB)])
    with scsi_loopback(vsp) as (device, _, _):
        disk = BlockDevice(device)  # opens the primary channel
        with pytest.raises(UsageError):
            handoff.dumps(vsp)
        disk.close()


def test_stats_count_requests_fast_path_and_errors_as_json(tmp_path: Path) -> None:
    with RawFileBackend(tmp_path / "disk.img", size=4 * MIB) as raw:
        vsp = StorVsp([raw])
        with scsi_loopback(vsp) as (device, _, _):
            disk = BlockDevice(device, queue_depth=4)
            for lba in range(16):
                disk.write(lba * 4096, bytes([lba]) * 4096)
                assert disk.read(lba * 4096, 4096) == bytes([lba]) * 4096
            stats = json.loads(json.dumps(vsp.stats()))
            assert stats["open_channels"] == 1
            disk.close()
        closed = json.loads(json.dumps(vsp.stats()))
    assert stats["requests"] >= 32 and stats["errors"] == 0
    assert 0 < stats["fast_path_requests"] <= stats["requests"] or not vsp.fast_path
    assert closed["open_channels"] == 0 and closed["requests"] >= stats["requests"]
    assert closed["fast_path_requests"] >= stats["fast_path_requests"]  # kept once closed
    assert closed["check_conditions"] == {"0": 0} and closed["requests_by_channel"].keys() == {"0"}


_CHILD = """
import os, sys
from vmbus import handoff
fds = [int(fd) for fd in sys.argv[1:]]
storvsp = handoff.loads(sys.stdin.buffer.read(), fds)
for lun, disk in sorted(storvsp.target.disks.items()):
    disk.backend.writev(512 * lun, [memoryview(bytes([0x40 + lun]) * 512)])
"""


def test_a_worker_process_writes_the_parents_ram_and_file_disks(tmp_path: Path) -> None:
    ram = RamBackend(MIB)
    with RawFileBackend(tmp_path / "disk.img", size=MIB) as raw:
        data, fds = handoff.dumps(StorVsp({1: ram, 2: raw}))
        subprocess.run(
            [sys.executable, "-c", _CHILD, *map(str, fds)],
            input=data,
            pass_fds=fds,
            check=True,
            timeout=60,
        )
        assert read(raw, 1024, 512) == b"\x42" * 512
    assert ram.data[512:1024] == b"\x41" * 512 and ram.data[:512] == bytes(512)


def write_a_pattern(guest: Guest) -> None:
    """Child: one write to each LUN, through the worker process's StorVsp."""
    devices: list[GuestDevice] = []
    guest.register(guid.SCSI, devices.append)
    controller = StorageController(devices[0])
    for lun in (0, 1):
        controller.disk(lun).write(4096 * lun, bytes([0x60 + lun]) * 4096)
    controller.close()


def test_a_child_writes_the_parents_ram_and_file_disks_through_the_worker_process(
    tmp_path: Path,
) -> None:
    ram = RamBackend(MIB)
    with RawFileBackend(tmp_path / "disk.img", size=MIB) as raw, Host() as host:
        child = host.start(write_a_pattern, devices=[StorVsp([ram, raw])])
        assert child.worker_pid != os.getpid()  # served by a worker process
        assert child.wait(timeout=60) == 0
        (stats,) = child.device_stats()
        assert read(raw, 4096, 4096) == b"\x61" * 4096
    assert ram.data[:4096] == b"\x60" * 4096 and ram.data[4096:8192] == bytes(4096)
    assert stats["errors"] == 0 and stats["requests"] >= 2
