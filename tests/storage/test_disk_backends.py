"""Disk backends: data round trips through scattered buffers, sparse files,
discard, read-only, flush, short reads and writes, reopen, fault injection."""

from __future__ import annotations

import errno
import gc
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vsp.storage import DirectBackend
from vsp.storage import backends as disk_backends
from vsp.storage.backends import (
    BlockBackend,
    FaultyBackend,
    NullBackend,
    RamBackend,
    RawFileBackend,
    ReadOnlyBackend,
)

MIB = 1 << 20


def scatter(data: bytes, sizes: list[int]) -> list[memoryview]:
    """`data` cut into writable segments of the given sizes (the last takes the rest)."""
    views, position = [], 0
    for size in [*sizes, len(data) - sum(sizes)]:
        views.append(memoryview(bytearray(data[position : position + size])))
        position += size
    return views


def joined(views: list[memoryview]) -> bytes:
    return b"".join(bytes(v) for v in views)


def pattern(length: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(length))


@pytest.fixture(params=["file", "ram"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlockBackend]:
    if request.param == "ram":
        yield RamBackend(MIB)
    else:
        with RawFileBackend(tmp_path / "disk.img", size=MIB) as file_backend:
            yield file_backend


def test_scattered_round_trip(backend: BlockBackend) -> None:
    data = pattern(8192)
    backend.writev(4096, scatter(data, [1, 511, 3000, 7, 600]))
    out = scatter(bytes(8192), [4096, 13, 2048])
    backend.readv(4096, out)
    assert joined(out) == data
    head = [memoryview(bytearray(4096))]
    backend.readv(0, head)
    assert joined(head) == bytes(4096)  # untouched bytes read as zeros


def test_more_segments_than_iov_max(tmp_path: Path) -> None:
    count = disk_backends.IOV_MAX * 2 + 3
    with RawFileBackend(tmp_path / "disk.img", size=MIB) as disk:
        data = pattern(count * 3)
        disk.writev(512, scatter(data, [3] * (count - 1)))
        out = scatter(bytes(len(data)), [3] * (count - 1))
        disk.readv(512, out)
        assert joined(out) == data


def test_new_file_is_sparse(tmp_path: Path) -> None:
    path = tmp_path / "sparse.img"
    with RawFileBackend(path, size=256 * MIB, block_size=4096) as disk:
        assert (disk.block_size, disk.block_count) == (4096, 65536)
    stat = path.stat()
    assert stat.st_size == 256 * MIB
    assert stat.st_blocks * 512 < MIB  # nothing allocated yet


def test_missing_file_without_size_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        RawFileBackend(tmp_path / "missing.img")
    with pytest.raises(FileNotFoundError):
        RawFileBackend(tmp_path / "missing.img", size=MIB, create=False)


def test_bad_geometry_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="block size"):
        RamBackend(MIB, block_size=1024)
    with pytest.raises(ValueError, match="multiple"):
        RamBackend(1000)
    with pytest.raises(ValueError, match="multiple"):
        RawFileBackend(tmp_path / "odd.img", size=1000)
    assert not (tmp_path / "odd.img").exists()


def test_reopen_sees_data(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    data = pattern(4096, seed=9)
    with RawFileBackend(path, size=2 * MIB, block_size=4096) as disk:
        disk.writev(MIB, [memoryview(bytearray(data))])
    with RawFileBackend(path, block_size=4096) as disk:
        assert disk.block_count == 512
        out = [memoryview(bytearray(4096))]
        disk.readv(MIB, out)
        assert joined(out) == data


def test_existing_shorter_file_is_extended(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"\x11" * 1024)
    with RawFileBackend(path, size=MIB) as disk:
        assert disk.block_count == 2048
        out = [memoryview(bytearray(2048))]
        disk.readv(0, out)
        assert joined(out) == b"\x11" * 1024 + bytes(1024)
    assert path.stat().st_size == MIB


def test_read_past_end_of_file_reads_zeros(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    with RawFileBackend(path, size=MIB) as disk:
        disk.writev(0, [memoryview(bytearray(b"\x22" * 8192))])
        os.truncate(path, 4096)  # someone shrank the file under us
        out = scatter(bytes(8192), [100, 4000])
        disk.readv(0, out)
        assert joined(out) == b"\x22" * 4096 + bytes(4096)


def test_short_reads_and_writes_are_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_preadv, real_pwritev = os.preadv, os.pwritev
    calls = {"read": 0, "write": 0}

    def first_100_bytes(views: list[memoryview]) -> list[memoryview]:
        out, left = [], 100
        for view in views:
            if left == 0:
                break
            out.append(view[:left])
            left -= len(out[-1])
        return out

    def short_preadv(fd: int, views: list[memoryview], offset: int) -> int:
        calls["read"] += 1
        return real_preadv(fd, first_100_bytes(views), offset)

    def short_pwritev(fd: int, views: list[memoryview], offset: int) -> int:
        calls["write"] += 1
        return real_pwritev(fd, first_100_bytes(views), offset)

    monkeypatch.setattr(os, "preadv", short_preadv)
    monkeypatch.setattr(os, "pwritev", short_pwritev)
    data = pattern(1000, seed=3)
    with RawFileBackend(tmp_path / "disk.img", size=MIB) as disk:
        disk.writev(512, scatter(data, [50, 250, 1]))
        out = scatter(bytes(1000), [333, 333])
        disk.readv(512, out)
    assert joined(out) == data
    assert calls == {"read": 10, "write": 10}


def test_flush_is_fdatasync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    monkeypatch.setattr(os, "fdatasync", synced.append)
    with RawFileBackend(tmp_path / "disk.img", size=MIB) as disk:
        disk.flush()
        disk.flush()
        assert synced == [disk.fd, disk.fd]


@pytest.mark.parametrize("fallback", [False, True], ids=["fallocate", "write-zeros"])
def test_discard_and_write_zeroes_read_zeros(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fallback: bool
) -> None:
    if fallback:
        monkeypatch.setattr(disk_backends, "_fallocate", None)
    path = tmp_path / "disk.img"
    with RawFileBackend(path, size=4 * MIB) as disk:
        disk.writev(0, [memoryview(bytearray(b"\x33" * 4 * MIB))])
        disk.discard(4096, 2 * MIB)
        disk.write_zeroes(3 * MIB, 8192)
        out = [memoryview(bytearray(4 * MIB))]
        disk.readv(0, out)
    expected = bytearray(b"\x33" * 4 * MIB)
    expected[4096 : 4096 + 2 * MIB] = bytes(2 * MIB)
    expected[3 * MIB : 3 * MIB + 8192] = bytes(8192)
    assert joined(out) == bytes(expected)
    if not fallback and disk_backends._fallocate is not None:
        assert path.stat().st_blocks * 512 <= 2 * MIB + 64 * 1024  # the hole is freed


def test_ram_discard_and_resize() -> None:
    disk = RamBackend(8192)
    disk.writev(0, [memoryview(bytearray(b"\x44" * 8192))])
    disk.discard(512, 1024)
    assert disk.data[:512] == b"\x44" * 512 and disk.data[512:1536] == bytes(1024)
    disk.resize(16384)
    assert disk.block_count == 32 and disk.data[8192:] == bytes(8192)
    disk.resize(4096)
    assert disk.block_count == 8 and len(disk.data) == 4096


def test_file_resize(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    with RawFileBackend(path, size=MIB) as disk:
        disk.resize(2 * MIB)
        assert disk.block_count == 4096 and path.stat().st_size == 2 * MIB


def test_out_of_range_is_our_misuse(backend: BlockBackend) -> None:
    with pytest.raises(ValueError, match="outside"):
        backend.readv(MIB - 512, [memoryview(bytearray(1024))])
    with pytest.raises(ValueError, match="outside"):
        backend.writev(-1, [memoryview(bytearray(1))])
    with pytest.raises(ValueError, match="outside"):
        backend.discard(MIB, 512)


def test_read_only_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    with RawFileBackend(path, size=MIB) as disk:
        disk.writev(0, [memoryview(bytearray(b"\x55" * 512))])
    for disk in (ReadOnlyBackend(RamBackend(MIB)), RawFileBackend(path, read_only=True)):
        assert disk.read_only
        with pytest.raises(PermissionError):
            disk.writev(0, [memoryview(bytearray(512))])
        with pytest.raises(PermissionError):
            disk.discard(0, 512)
        with pytest.raises(PermissionError):
            disk.write_zeroes(0, 512)
        disk.flush()  # allowed: nothing to write back
        out = [memoryview(bytearray(512))]
        disk.readv(0, out)
    assert joined(out) == b"\x55" * 512  # reads still work, and nothing changed


def test_faulty_backend_fails_only_its_ranges() -> None:
    disk = FaultyBackend(RamBackend(MIB), fail_reads=[(4096, 8192)], fail_writes=[(0, 512)])
    buffer = [memoryview(bytearray(512))]
    disk.readv(3584, buffer)  # ends where the bad range starts
    with pytest.raises(OSError) as failure:
        disk.readv(3585, buffer)
    assert failure.value.errno == errno.EIO
    disk.writev(512, buffer)
    with pytest.raises(OSError):
        disk.writev(0, buffer)
    with pytest.raises(OSError):
        disk.discard(511, 2)
    disk.flush()
    assert disk.faults == 3
    flaky = FaultyBackend(RamBackend(MIB), fail_flush=True, errno_value=errno.ENOSPC)
    with pytest.raises(OSError) as failure:
        flaky.flush()
    assert failure.value.errno == errno.ENOSPC


def test_null_backend_reads_zeros() -> None:
    disk = NullBackend(1 << 40)
    assert disk.block_count == (1 << 40) // 512
    disk.writev(4096, [memoryview(bytearray(b"\x66" * 512))])
    out = [memoryview(bytearray(b"\x77" * 512))]
    disk.readv(4096, out)
    assert joined(out) == bytes(512)


@pytest.mark.parametrize("backend", [RawFileBackend, DirectBackend])
def test_a_file_disk_dropped_unclosed_releases_its_descriptor(
    tmp_path: Path, backend: type[RawFileBackend] | type[DirectBackend]
) -> None:
    """A management service builds fresh disks for every start of a VM and
    drops them when it ends: each leaked its open file (one fd a start)."""
    gc.collect()  # earlier tests' garbage, so the count below is ours
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(10):
        disk = backend(tmp_path / "d.img", size=1 << 20)
        del disk  # the last reference: no collector needed
    assert len(os.listdir("/proc/self/fd")) == fds


def test_a_dropped_storvsp_releases_its_disks_without_the_collector(tmp_path: Path) -> None:
    """The SCSI target and its own unit referred to each other: a dropped
    StorVsp kept its disks' open files until a collection ran."""
    from vsp.storage import StorVsp

    gc.collect()
    fds = len(os.listdir("/proc/self/fd"))
    gc.disable()
    try:
        for _ in range(5):
            vsp = StorVsp([RawFileBackend(tmp_path / "d.img", size=1 << 20)])
            del vsp
        assert len(os.listdir("/proc/self/fd")) == fds
    finally:
        gc.enable()
