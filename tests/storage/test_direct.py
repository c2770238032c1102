"""DirectBackend, the O_DIRECT pass-through disk, against RamBackend as the
model: random reads, writes, flushes, discards and write-zeroes leave the
same contents, whether the buffers are aligned (straight to the device) or
not (the bounce path), and on a 4 KiB-sector device under a 512-byte disk
(read-modify-write). On a file of this machine's real file system: tmp_path
if it takes O_DIRECT, else a directory beside the venv."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmbus.errors import UsageError
from vsp.storage import DirectBackend, RamBackend

DISK = 64 << 10


def takes_o_direct(directory: Path) -> bool:
    """Whether the file system of `directory` opens and reads with O_DIRECT."""
    probe = directory / "o_direct_probe"
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError as error:
        if error.errno == errno.EINVAL:
            return False
        raise
    try:
        os.ftruncate(fd, 4096)
        buffer = mmap.mmap(-1, 4096)
        try:
            os.preadv(fd, [buffer], 0)
        except OSError as error:
            if error.errno == errno.EINVAL:
                return False
            raise
        finally:
            buffer.close()
        return True
    finally:
        os.close(fd)
        probe.unlink()


@pytest.fixture(scope="module")
def direct_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory whose file system takes O_DIRECT."""
    first = tmp_path_factory.mktemp("direct")
    if takes_o_direct(first):
        yield first
        return
    # tmpfs (older kernels) refuses O_DIRECT: try the checkout's file system.
    with tempfile.TemporaryDirectory(dir=Path(sys.prefix), prefix="direct-") as other:
        if not takes_o_direct(Path(other)):
            pytest.skip(f"neither {first} nor {sys.prefix} takes O_DIRECT (tmpfs?)")
        yield Path(other)


def aligned(size: int) -> memoryview:
    return memoryview(mmap.mmap(-1, size))


def split(data: memoryview, cuts: list[int]) -> list[memoryview]:
    points = sorted({c % len(data) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


def buffers(size: int, cuts: list[int], misaligned: bool) -> list[memoryview]:
    """`size` bytes as scattered views: page-aligned pieces of mapped memory
    (the guest's pages), or pieces of a bytearray at an odd address."""
    if misaligned:
        return split(memoryview(bytearray(size + 3))[3:], cuts)
    return split(aligned(size), [c - c % 512 for c in cuts])


operation = st.one_of(
    st.tuples(
        st.sampled_from(["read", "write"]),
        st.integers(0, DISK // 512 - 1),  # first block (of 512; scaled to the block size)
        st.integers(1, 24),  # blocks
        st.lists(st.integers(0, DISK), max_size=3),  # where the buffer is cut
        st.booleans(),  # misaligned memory
        st.binary(min_size=1, max_size=16),  # data seed
    ),
    st.tuples(st.sampled_from(["discard", "zeroes"]), st.integers(0, 127), st.integers(0, 16)),
    st.just(("flush",)),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=st.lists(operation, max_size=20),
    block_size=st.sampled_from([512, 4096]),
    device_4k=st.booleans(),
)
def test_direct_backend_keeps_the_contents_a_ram_disk_keeps(
    direct_dir: Path, ops: list[tuple[Any, ...]], block_size: int, device_4k: bool
) -> None:
    model = RamBackend(DISK, block_size)
    with tempfile.NamedTemporaryFile(dir=direct_dir) as image:
        alignment = 4096 if device_4k else 0
        disk = DirectBackend(image.name, DISK, block_size, alignment=alignment)
        with disk:
            for op in ops:
                run(disk, model, op, block_size)
            whole, expected = aligned(DISK), bytearray(DISK)
            disk.readv(0, [whole])
            model.readv(0, [memoryview(expected)])
            assert bytes(whole) == bytes(expected)


def run(disk: DirectBackend, model: RamBackend, op: tuple[Any, ...], block_size: int) -> None:
    blocks = DISK // block_size
    if op[0] == "flush":
        disk.flush()
        return
    if op[0] in ("discard", "zeroes"):
        first, count = int(op[1]) % blocks, int(op[2])
        count = min(count, blocks - first)
        name = "discard" if op[0] == "discard" else "write_zeroes"
        getattr(disk, name)(first * block_size, count * block_size)
        getattr(model, name)(first * block_size, count * block_size)
        return
    kind, first_raw, count_raw, cuts, misaligned, seed = op
    first = int(first_raw) % blocks
    count = min(int(count_raw), blocks - first, 8 if block_size == 4096 else 24)
    offset, size = first * block_size, count * block_size
    views = buffers(size, list(cuts), bool(misaligned))
    if kind == "write":
        data = (bytes(seed) * (size // len(bytes(seed)) + 1))[:size]
        position = 0
        for view in views:
            view[:] = data[position : position + len(view)]
            position += len(view)
        disk.writev(offset, views)
        model.writev(offset, [memoryview(data)])
    else:
        expected = bytearray(size)
        model.readv(offset, [memoryview(expected)])
        disk.readv(offset, views)
        assert b"".join(bytes(v) for v in views) == bytes(expected)


def test_aligned_guest_pages_go_straight_to_the_device(
    direct_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Page-aligned buffers never take the bounce path; an odd address does."""
    with DirectBackend(direct_dir / "straight.img", DISK) as disk:
        bounced: list[int] = []
        original = disk._bounce_read

        def spy(offset: int, length: int, views: list[memoryview]) -> None:
            bounced.append(offset)
            original(offset, length, views)

        monkeypatch.setattr(disk, "_bounce_read", spy)
        page = aligned(8192)
        page[:] = bytes(range(256)) * 32
        disk.writev(4096, [page])
        disk.readv(4096, [page[:4096], aligned(4096)])
        assert bounced == []
        odd = memoryview(bytearray(4097))[1:]
        disk.readv(4096, [odd])
        assert bounced == [4096] and bytes(odd) == bytes(range(256)) * 16


def test_concurrent_partial_block_writes_all_land(direct_dir: Path) -> None:
    """512-byte writes from many threads into the same 4 KiB device blocks
    (read-modify-writes) lose none of each other's sectors."""
    with DirectBackend(direct_dir / "rmw.img", DISK, 512, alignment=4096) as disk:
        assert disk.alignment == 4096

        def writer(sector: int) -> None:
            buffer = aligned(512)
            buffer[:] = bytes([sector]) * 512
            disk.writev(sector * 512, [buffer])

        threads = [threading.Thread(target=writer, args=(s,)) for s in range(64)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        whole = aligned(64 * 512)
        disk.readv(0, [whole])
        assert bytes(whole) == b"".join(bytes([s]) * 512 for s in range(64))


def test_direct_backend_is_concurrent_and_checks_its_arguments(direct_dir: Path) -> None:
    with DirectBackend(direct_dir / "args.img", DISK) as disk:
        assert disk.concurrent and not RamBackend.concurrent
        assert os.fstat(disk.fd).st_size == DISK
        assert fcntl.fcntl(disk.fd, fcntl.F_GETFL) & os.O_DIRECT
        with pytest.raises(UsageError):
            disk.readv(DISK - 512, [aligned(4096)])
    with pytest.raises(UsageError):
        DirectBackend(direct_dir / "bad.img", DISK, alignment=3000)
    with DirectBackend(direct_dir / "args.img") as again:  # size from the file
        assert again.block_count == DISK // 512
