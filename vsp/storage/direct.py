"""The pass-through disk: `DirectBackend`, an image file or a block device
opened with O_DIRECT (see its doc), one of the backends of
vsp.storage.backends."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import struct
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from vmbus.errors import UsageError
from vsp.storage.backends import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_ZERO_RANGE,
    IOV_MAX,
    ZERO_CHUNK,
    BlockBackend,
    _advance,
    _byte_views,
    _FileBackend,
    fallocate,
)

__all__ = ["DirectBackend"]

BLKGETSIZE64 = 0x80081272  # linux/fs.h: a block device's size in bytes
DIRECT_ALIGNMENTS = (512, 1024, 2048, 4096)  # what O_DIRECT may ask of offsets and buffers


def _aligned_buffer(size: int) -> mmap.mmap:
    """Anonymous memory: page-aligned, so aligned for any O_DIRECT request."""
    return mmap.mmap(-1, max(size, 1))


class DirectBackend(_FileBackend):
    """A pass-through disk: an image file or a block device opened with
    O_DIRECT, so data moves by DMA straight between the device and the
    guest's pages (no page cache in the parent). flush is fdatasync (the
    device's write cache), discard is fallocate(PUNCH_HOLE) where the file
    system or device supports it (else zeros are written).

    O_DIRECT wants offsets, lengths and buffer addresses aligned to the
    device's logical block size (`alignment`, found when opening). Guest
    pages are page-aligned, so storvsp's requests normally go straight
    through; a request that is not aligned (a buffer in the middle of a page,
    a 512-byte disk on a 4 KiB-sector device) falls back to an aligned
    bounce buffer, a read-modify-write for a write that covers part of a
    device block. While that can happen (blocks smaller than `alignment`),
    writes are serialized so no two read-modify-writes of one device block
    interleave; reads always overlap.

    `concurrent`: reads and writes may run from several threads at once
    (storvsp's I/O pool). A file is created, or extended, to `size` as
    RawFileBackend does; a block device's size is its own. OSError
    (EINVAL) if the file system refuses O_DIRECT (some tmpfs kernels).
    `alignment` raises the probed one (a power of two up to 4096: as a
    4 KiB-sector device would ask).
    """

    concurrent: ClassVar[bool] = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        size: int | None = None,
        block_size: int = 512,
        create: bool = True,
        read_only: bool = False,
        alignment: int = 0,
    ) -> None:
        if alignment & (alignment - 1) or alignment > DIRECT_ALIGNMENTS[-1]:
            raise UsageError(f"alignment {alignment} is not a power of two up to 4096")
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_DIRECT
        if create and size is not None and not read_only:
            flags |= os.O_CREAT
        if size is not None:
            super().__init__(size, block_size, read_only)
        self.path = os.fspath(path)
        self.fd = os.open(self.path, flags, 0o644)
        try:
            info = os.fstat(self.fd)
            device = stat.S_ISBLK(info.st_mode)
            file_size = _device_size(self.fd) if device else info.st_size
            if size is None:
                size = file_size - file_size % block_size
                super().__init__(size, block_size, read_only)
            elif device and size > file_size:
                raise UsageError(f"{self.path} holds {file_size} bytes, not {size}")
            if not device and file_size < size and not read_only:
                os.ftruncate(self.fd, size)
            self.alignment = max(self._probe_alignment(), alignment)
        except BaseException:
            os.close(self.fd)
            raise
        self._write_lock = threading.Lock() if self.alignment > self.block_size else None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_write_lock"] = self._write_lock is not None  # a lock does not pickle
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["_write_lock"] = threading.Lock() if state["_write_lock"] else None
        super().__setstate__(state)

    def _probe_alignment(self) -> int:
        """The smallest alignment O_DIRECT accepts here: the first size of
        read that is not refused (EINVAL) at an address aligned to it alone."""
        buffer = _aligned_buffer(2 * DIRECT_ALIGNMENTS[-1])
        try:
            with memoryview(buffer) as view:
                for size in DIRECT_ALIGNMENTS:
                    try:
                        os.preadv(self.fd, [view[size : 2 * size]], 0)
                    except OSError as error:
                        if error.errno != errno.EINVAL:
                            raise
                        continue
                    return size
        finally:
            buffer.close()
        raise OSError(errno.EINVAL, f"{self.path}: O_DIRECT refuses every alignment")

    def _aligned(self, offset: int, views: Sequence[memoryview]) -> bool:
        mask = self.alignment - 1
        return not offset & mask and not any(len(v) & mask for v in views)

    def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        views = _byte_views(buffers)
        length = sum(len(v) for v in views)
        self._check(offset, length)
        if self._aligned(offset, views) and self._direct(os.preadv, offset, views):
            return
        self._bounce_read(offset, length, views)

    def writev(self, offset: int, buffers: Sequence[memoryview]) -> None:
        views = _byte_views(buffers)
        length = sum(len(v) for v in views)
        self._check_write(offset, length)
        if self._write_lock is None:
            self._write(offset, length, views)
        else:
            with self._write_lock:
                self._write(offset, length, views)

    def _write(self, offset: int, length: int, views: list[memoryview]) -> None:
        if self._aligned(offset, views) and self._direct(os.pwritev, offset, views):
            return
        self._bounce_write(offset, length, views)

    def _direct(self, call: Any, offset: int, views: list[memoryview]) -> bool:
        """The request straight on the guest's buffers; False, with nothing
        moved, if O_DIRECT refuses their addresses (EINVAL)."""
        first = True
        while views:
            try:
                done = call(self.fd, views[:IOV_MAX], offset)
            except OSError as error:
                if error.errno == errno.EINVAL and first:
                    return False  # checked before any I/O: the bounce path redoes it all
                raise
            first = False
            if done == 0:
                if call is os.pwritev:
                    raise OSError(errno.EIO, "pwritev wrote nothing")
                for view in views:  # past the end of a sparse image: zeros
                    view[:] = bytes(len(view))
                return True
            offset += done
            views = _advance(views, done)
        return True

    def _bounced(self, call: Any, offset: int, bounce: memoryview) -> None:
        if not self._direct(call, offset, [bounce]):  # aligned in every way: a real error
            raise OSError(errno.EINVAL, f"{self.path}: O_DIRECT refused an aligned request")

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        """The device blocks that cover [offset, offset + length)."""
        mask = self.alignment - 1
        start = offset & ~mask
        return start, ((offset + length + mask) & ~mask) - start

    def _bounce_read(self, offset: int, length: int, views: list[memoryview]) -> None:
        start, span = self._span(offset, length)
        buffer = _aligned_buffer(span)
        try:
            with memoryview(buffer) as bounce:
                self._bounced(os.preadv, start, bounce[:span])
                position = offset - start
                for view in views:
                    view[:] = bounce[position : position + len(view)]
                    position += len(view)
        finally:
            buffer.close()

    def _bounce_write(self, offset: int, length: int, views: list[memoryview]) -> None:
        start, span = self._span(offset, length)
        buffer = _aligned_buffer(span)
        try:
            with memoryview(buffer) as bounce:
                if start != offset or span != length:  # part of a device block: keep the rest
                    self._bounced(os.preadv, start, bounce[:span])
                position = offset - start
                for view in views:
                    bounce[position : position + len(view)] = view
                    position += len(view)
                self._bounced(os.pwritev, start, bounce[:span])
        finally:
            buffer.close()

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check_write(offset, length)
        mode = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
        if not length or fallocate(self.fd, mode, offset, length):
            return
        zeros = _aligned_buffer(min(ZERO_CHUNK, length))
        try:
            with memoryview(zeros) as view:
                for start in range(offset, offset + length, ZERO_CHUNK):
                    self.writev(start, [view[: min(ZERO_CHUNK, offset + length - start)]])
        finally:
            zeros.close()


def _device_size(fd: int) -> int:
    """A block device's size in bytes (BLKGETSIZE64)."""
    size: int = struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, bytes(8)))[0]
    return size


if TYPE_CHECKING:  # mypy proves it satisfies the backend interface
    _BACKEND: type[BlockBackend] = DirectBackend
