"""Disk backends for the storage VSP: the `BlockBackend` protocol a ScsiDisk
drives, and a raw image file, RAM, null, and read-only and fault-injecting
wrappers, and an O_DIRECT pass-through disk (`DirectBackend`, in
vsp.storage.direct).

Offsets and lengths are bytes. A request outside the disk is our own misuse
(the SCSI target checks LBAs first) and raises UsageError; I/O failures are
OSError, which the target turns into MEDIUM ERROR for that command only.

FUA: the backend has a single cache, so a FUA write is a write followed by
`flush()`; the target makes that call.

Every backend pickles for the VM's worker process (`vmbus.handoff`): a file
backend hands over its open descriptor (`SharedFd`), never its path, and a
RAM disk keeps its bytes in a memfd, so the parent's object and the
worker's copy read and write the same disk.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import weakref
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from vmbus.errors import UsageError
from vmbus.handoff import SharedFd
from vsp.storage.changes import changed

__all__ = [
    "BlockBackend",
    "FaultyBackend",
    "NullBackend",
    "RamBackend",
    "RawFileBackend",
    "ReadOnlyBackend",
]

BLOCK_SIZES = (512, 4096)
# One preadv/pwritev call takes at most IOV_MAX segments (EINVAL beyond).
IOV_MAX = max(os.sysconf("SC_IOV_MAX"), 16)
# The write-zeros fallback writes this much of one shared zero buffer a call.
ZERO_CHUNK = 1 << 20
_ZEROS = memoryview(bytes(ZERO_CHUNK))

# fallocate(2) modes (linux/falloc.h).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
# errno values meaning "this file system or kernel cannot do that mode".
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)

_fallocate: Any = None  # os has no fallocate(2) with modes: call libc's
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate.restype = ctypes.c_int
except (OSError, AttributeError):  # no such libc call: the fallbacks write zeros
    _fallocate = None


class BlockBackend(Protocol):
    """The storage behind a ScsiDisk. Offsets and lengths are in bytes and
    within `block_size * block_count`; the I/O methods raise OSError.

    `concurrent`: the backend takes several READ/WRITE requests at once,
    from other threads (storvsp then overlaps them in an I/O pool); the
    other calls always come from the worker's thread."""

    concurrent: ClassVar[bool] = False

    @property
    def block_size(self) -> int:
        """512 or 4096."""

    @property
    def block_count(self) -> int:
        """May change at run time; then call ScsiDisk.notify_capacity_changed."""

    @property
    def read_only(self) -> bool: ...

    def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        """Fill `buffers`, in order, from `offset`."""

    def writev(self, offset: int, buffers: Sequence[memoryview]) -> None:
        """Write `buffers`, in order, at `offset`."""

    def flush(self) -> None:
        """Make every completed write stable."""

    def discard(self, offset: int, length: int) -> None:
        """Deallocate; the range reads back as zeros afterwards."""

    def write_zeroes(self, offset: int, length: int) -> None:
        """Write zeros over the range."""


def fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate(2); False if the mode is not supported here."""
    if _fallocate is None:
        return False
    if _fallocate(fd, mode, offset, length) == 0:
        return True
    error = ctypes.get_errno()
    if error in _UNSUPPORTED:
        return False
    raise OSError(error, os.strerror(error))


def _advance(buffers: list[memoryview], done: int) -> list[memoryview]:
    """The part of `buffers` after the first `done` bytes."""
    for index, buffer in enumerate(buffers):
        if done < len(buffer):
            return [buffer[done:], *buffers[index + 1 :]]
        done -= len(buffer)
    return []


def _byte_views(buffers: Sequence[memoryview]) -> list[memoryview]:
    return [v for v in (memoryview(b).cast("B") for b in buffers) if len(v)]


class _Backend:
    """Size, block size and the range and write checks every backend shares."""

    concurrent: ClassVar[bool] = False

    def __init__(self, size: int, block_size: int, read_only: bool) -> None:
        if block_size not in BLOCK_SIZES:
            raise UsageError(f"block size {block_size} is not one of {BLOCK_SIZES}")
        if size < block_size or size % block_size:
            raise UsageError(f"size {size} is not a positive multiple of {block_size}")
        self.block_size = block_size
        self.block_count = size // block_size
        self.read_only = read_only

    @property
    def size(self) -> int:
        return self.block_size * self.block_count

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise UsageError(f"bytes {offset}+{length} are outside the {self.size}-byte disk")

    def _check_write(self, offset: int, length: int) -> None:
        self._check(offset, length)
        if self.read_only:
            raise PermissionError(errno.EROFS, "the disk is read-only")


class _FileBackend(_Backend):
    """A backend over a file descriptor (`fd`), closed with it or by `with`."""

    fd = -1

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        self._check_write(offset, length)
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        if length and not fallocate(self.fd, mode, offset, length):
            self.write_zeroes(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self.fd >= 0:
            changed()  # the compiled path stops using the descriptor
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __del__(self) -> None:
        # The descriptor lives as long as the backend: a disk dropped unclosed
        # (a management service's VM that ended) must not leak its file.
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)

    def __getstate__(self) -> dict[str, Any]:
        """The open file crosses as itself: the worker's copy gets its own
        descriptor of it (a path could name another file by then)."""
        state = self.__dict__.copy()
        if self.fd >= 0:
            state["fd"] = SharedFd(self.fd)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        fd = state.get("fd", -1)
        state["fd"] = fd.take() if isinstance(fd, SharedFd) else -1
        self.__dict__.update(state)

    def __enter__(self: _F) -> _F:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


_F = TypeVar("_F", bound=_FileBackend)


class RawFileBackend(_FileBackend):
    """A raw image file. A missing file is created, sparse, when `size` is
    given (else FileNotFoundError); a shorter file is extended to `size`
    (sparse); without `size` the disk is the file's whole blocks. Reads
    past the end of the file return zeros.

    Data moves with preadv/pwritev straight between the file and the given
    buffers (the GIL is released during the syscalls).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        size: int | None = None,
        block_size: int = 512,
        create: bool = True,
        read_only: bool = False,
    ) -> None:
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        if create and size is not None and not read_only:
            flags |= os.O_CREAT
        if size is not None:  # check before creating a file
            super().__init__(size, block_size, read_only)
        self.path = os.fspath(path)
        self.fd = os.open(self.path, flags, 0o644)
        try:
            file_size = os.fstat(self.fd).st_size
            if size is None:
                size = file_size - file_size % block_size
                super().__init__(size, block_size, read_only)
            if file_size < size and not read_only:
                os.ftruncate(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise

    def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        views = _byte_views(buffers)
        self._check(offset, sum(len(v) for v in views))
        while views:
            done = os.preadv(self.fd, views[:IOV_MAX], offset)
            if done == 0:  # end of file inside the disk: sparse, so zeros
                for view in views:
                    view[:] = bytes(len(view))
                return
            offset += done
            views = _advance(views, done)

    def writev(self, offset: int, buffers: Sequence[memoryview]) -> None:
        views = _byte_views(buffers)
        self._check_write(offset, sum(len(v) for v in views))
        while views:
            done = os.pwritev(self.fd, views[:IOV_MAX], offset)
            if done == 0:
                raise OSError(errno.EIO, "pwritev wrote nothing")
            offset += done
            views = _advance(views, done)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check_write(offset, length)
        mode = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
        if not length or fallocate(self.fd, mode, offset, length):
            return
        for start in range(offset, offset + length, ZERO_CHUNK):
            self.writev(start, [_ZEROS[: min(ZERO_CHUNK, offset + length - start)]])

    def resize(self, size: int) -> None:
        """Grow or shrink the disk (and the file); tell the target after."""
        changed()  # the compiled path reads the new size
        _Backend.__init__(self, size, self.block_size, self.read_only)
        os.ftruncate(self.fd, size)


class SharedBytes(mmap.mmap):
    """A RAM disk's bytes: a shared mapping of a memfd that compares and
    counts like bytes (slices are bytes already)."""

    def __eq__(self, other: object) -> bool:
        try:
            with memoryview(self) as mine, memoryview(other) as theirs:  # type: ignore[arg-type]
                return mine == theirs
        except TypeError:
            return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable

    def count(self, value: int) -> int:
        return self[:].count(value)


class RamBackend(_Backend):
    """A disk in memory, for tests and benchmarks. Its bytes (`data`) live
    in a memfd mapped shared, so a copy unpickled in the worker process and
    this object see one disk. The memfd is sealed against shrinking: a
    worker cannot make the parent's mapping fault (SIGBUS) by truncating it."""

    def __init__(self, size: int, block_size: int = 512) -> None:
        super().__init__(size, block_size, read_only=False)
        fd = os.memfd_create("vmbus-ram-disk", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
            self._own(fd)
        except BaseException:
            os.close(fd)
            raise

    def _own(self, fd: int) -> None:
        """Map `fd` and own it (closed with the last reference to us)."""
        self._fd = fd
        self.data = self._map(self.size)
        self._closer = weakref.finalize(self, os.close, fd)

    def _map(self, size: int) -> SharedBytes:
        available = os.fstat(self._fd).st_size
        if available < size:  # a worker's copy cannot shrink it, only grow it
            raise UsageError(f"the RAM disk's memfd holds {available} bytes, not {size}")
        return SharedBytes(self._fd, size)

    def __getstate__(self) -> dict[str, Any]:
        """The memfd crosses (the mapping and its closer are remade there);
        the rest, a subclass's too, as it is."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("data", "_closer", "_fd")}
        state["_fd"] = SharedFd(self._fd)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        fd = state.pop("_fd").take()
        try:
            self.__dict__.update(state)
            _Backend.__init__(self, self.block_size * self.block_count, self.block_size, False)
            self._own(fd)
        except BaseException:
            os.close(fd)
            raise

    def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        views = _byte_views(buffers)
        self._check(offset, sum(len(v) for v in views))
        with memoryview(self.data) as data:
            for view in views:
                view[:] = data[offset : offset + len(view)]
                offset += len(view)

    def writev(self, offset: int, buffers: Sequence[memoryview]) -> None:
        views = _byte_views(buffers)
        self._check_write(offset, sum(len(v) for v in views))
        with memoryview(self.data) as data:
            for view in views:
                data[offset : offset + len(view)] = view
                offset += len(view)

    def flush(self) -> None:
        pass

    def discard(self, offset: int, length: int) -> None:
        self._zero(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._zero(offset, length)

    def _zero(self, offset: int, length: int) -> None:
        self._check_write(offset, length)
        self.data[offset : offset + length] = bytes(length)

    def resize(self, size: int) -> None:
        """Grow (with zeros) or shrink the disk; tell the target after. The
        memfd never shrinks (it is sealed): the blocks cut off are zeroed,
        so growing again reads zeros there."""
        old = self.size
        _Backend.__init__(self, size, self.block_size, self.read_only)
        if size < old:
            self.data[size:old] = bytes(old - size)
        elif os.fstat(self._fd).st_size < size:
            os.ftruncate(self._fd, size)
        self.data = self._map(size)


class NullBackend(_Backend):
    """Reads zeros, drops writes: measures everything but the storage."""

    def __init__(self, size: int, block_size: int = 512) -> None:
        super().__init__(size, block_size, read_only=False)

    def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        views = _byte_views(buffers)
        self._check(offset, sum(len(v) for v in views))
        for view in views:
            view[:] = bytes(len(view))

    def writev(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self._check_write(offset, sum(len(v) for v in _byte_views(buffers)))

    def flush(self) -> None:
        pass

    def discard(self, offset: int, length: int) -> None:
        self._check_write(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check_write(offset, length)


class _Wrapper:
    """Forwards everything to `inner`; subclasses override what they change.
    Not `concurrent`: a wrapper's own state (fault counts) is not shared."""

    concurrent: ClassVar[bool] = False

    def __init__(self, inner: BlockBackend) -> None:
        self.inner = inner

    @property
    def block_size(self) -> int:
        return self.inner.block_size

    @property
    def block_count(self) -> int:
        return self.inner.block_count

    @property
    def read_only(self) -> bool:
        return self.inner.read_only

    def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self.inner.readv(offset, buffers)

    def writev(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self.inner.writev(offset, buffers)

    def flush(self) -> None:
        self.inner.flush()

    def discard(self, offset: int, length: int) -> None:
        self.inner.discard(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        self.inner.write_zeroes(offset, length)


class ReadOnlyBackend(_Wrapper):
    """`inner`, read-only: writes raise PermissionError; flush is allowed."""

    @property
    def read_only(self) -> bool:
        return True

    def writev(self, offset: int, buffers: Sequence[memoryview]) -> None:
        raise PermissionError(errno.EROFS, "the disk is read-only")

    def discard(self, offset: int, length: int) -> None:
        raise PermissionError(errno.EROFS, "the disk is read-only")

    def write_zeroes(self, offset: int, length: int) -> None:
        raise PermissionError(errno.EROFS, "the disk is read-only")


class FaultyBackend(_Wrapper):
    """`inner`, failing with EIO (or `errno_value`) for requests that touch
    the byte ranges [start, end) in `fail_reads` / `fail_writes` (writes,
    discards, write-zeroes), and every flush if `fail_flush`. For tests."""

    def __init__(
        self,
        inner: BlockBackend,
        fail_reads: Sequence[tuple[int, int]] = (),
        fail_writes: Sequence[tuple[int, int]] = (),
        fail_flush: bool = False,
        errno_value: int = errno.EIO,
    ) -> None:
        super().__init__(inner)
        self.fail_reads = list(fail_reads)
        self.fail_writes = list(fail_writes)
        self.fail_flush = fail_flush
        self.errno_value = errno_value
        self.faults = 0

    def _maybe_fail(self, ranges: list[tuple[int, int]], offset: int, length: int) -> None:
        if any(start < offset + length and offset < end for start, end in ranges):
            self._fail()

    def _fail(self) -> None:
        self.faults += 1
        raise OSError(self.errno_value, os.strerror(self.errno_value))

    def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self._maybe_fail(self.fail_reads, offset, sum(len(b) for b in _byte_views(buffers)))
        self.inner.readv(offset, buffers)

    def writev(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self._maybe_fail(self.fail_writes, offset, sum(len(b) for b in _byte_views(buffers)))
        self.inner.writev(offset, buffers)

    def flush(self) -> None:
        if self.fail_flush:
            self._fail()
        self.inner.flush()

    def discard(self, offset: int, length: int) -> None:
        self._maybe_fail(self.fail_writes, offset, length)
        self.inner.discard(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._maybe_fail(self.fail_writes, offset, length)
        self.inner.write_zeroes(offset, length)


if TYPE_CHECKING:  # mypy proves every backend satisfies the interface
    _BACKENDS: tuple[type[BlockBackend], ...] = (
        RawFileBackend,
        RamBackend,
        NullBackend,
        ReadOnlyBackend,
        FaultyBackend,
    )
