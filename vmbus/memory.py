"""Guest memory, the child's page allocator, GPADL views and ring mappings
(DESIGN.md §4; PROTOCOL-FACTS.md §1.2 and §3.7). Sans-protocol: no messages.

A child's guest memory is one memfd mapped MAP_SHARED by the child and the
parent; a guest physical address (GPA) is an offset into it and a PFN is
GPA // 4096. Everything a child names (PFNs, offsets, lengths) is untrusted
and checked here before any byte is touched.

Use after close: every buffer this module hands out is a memoryview of a
CPython `mmap.mmap` object (for MappedRegion too: its address range is
reserved by one), which counts its exported views and refuses to unmap
while any exists. So `close()` raises BufferError, and stays open, until
the views are released and rings attached to them dropped; a `with` block
left by an exception detaches instead, and CPython unmaps when the last
view goes. No view can outlive its mapping. Once closed, requests raise
GuestMemoryError.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import sys
import threading
import weakref
from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, overload

from vmbus.errors import PeerError, UsageError, VmbusError
from vmbus.packet import GpaRange

__all__ = [
    "DEFAULT_MAX_MAPPINGS",
    "DEFAULT_MAX_RUNS",
    "PAGE_SIZE",
    "DoubleFree",
    "ForeignPage",
    "GuestMemory",
    "GuestMemoryError",
    "MappedRegion",
    "MappingRefused",
    "OutOfBounds",
    "OutOfMemory",
    "PageAllocator",
    "sealed_memfd",
    "PfnList",
    "map_channel_rings",
    "map_contiguous",
    "guest_segments",
    "map_ring",
]

PAGE_SIZE = 4096
_U64 = 1 << 64

# Each run of consecutive pages of a MappedRegion is one mapping of this
# process, and Linux allows vm.max_map_count (65530 by default) in all:
# a child that scatters its ring pages one per run must not use them up.
DEFAULT_MAX_RUNS = 256  # runs (so mappings) in one region: a ring, a buffer
DEFAULT_MAX_MAPPINGS = 1024  # mappings of one child's memory at once

# A peer holding the memfd could truncate it, turning our accesses into
# SIGBUS; these seals fix its size for good (F_SEAL_SEAL: no further seals,
# e.g. none that would forbid our later writable mappings).
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_MAP_NORESERVE = 0x4000  # Linux; not exported by Python's mmap module
_MAP_FIXED = 0x10


def sealed_memfd(name: str, size: int) -> int:
    """A new close-on-exec memfd of `size` zeroed bytes, sealed at that size:
    for memory a peer holds too (guest memory, a switch port, a Screen)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


class GuestMemoryError(VmbusError, ValueError):
    """A request names memory it may not: out of bounds, bad GPADL, closed."""


class OutOfBounds(GuestMemoryError, PeerError):
    """A GPA, PFN or byte range is not fully inside the memory or GPADL."""


class OutOfMemory(GuestMemoryError, UsageError):
    """The page allocator has no free pages (or no free run) for a request."""


class DoubleFree(GuestMemoryError, UsageError):
    """A PFN being freed is not allocated: freed twice or never allocated."""


class ForeignPage(GuestMemoryError, UsageError):
    """A PFN being freed does not belong to this allocator's memory."""


class MappingRefused(GuestMemoryError, PeerError):
    """Pages in too many runs to map: more than a region may have, or more
    than the child's memory may have mapped at once (`max_mappings`)."""


def _check_size(size: int) -> None:
    if size <= 0 or size % PAGE_SIZE:
        raise GuestMemoryError(f"guest memory size {size} is not a positive multiple of 4096")


class GuestMemory:
    """One memfd of `size` bytes, mapped shared. Owns its fd: close() closes it."""

    def __init__(self, fd: int, size: int) -> None:
        # Use create() or from_fd(); this maps an fd already checked by them.
        self._fd = fd
        self._size = size
        self._mm: mmap.mmap | None = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        self.max_mappings = DEFAULT_MAX_MAPPINGS  # the child's quota of mappings
        self.mapping_refusals = 0  # regions refused for their runs, ever
        self._mappings = 0
        self._mappings_lock = threading.Lock()  # a region may die in any thread

    @classmethod
    def create(cls, size: int, name: str = "vmbus-guest") -> GuestMemory:
        """Fresh zeroed memory, sealed against resizing. The fd is close-on-exec:
        hand it to a child by fork, or by spawn with pass_fds / SCM_RIGHTS."""
        _check_size(size)
        fd = sealed_memfd(name, size)
        try:
            return cls(fd, size)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def from_fd(cls, fd: int, size: int) -> GuestMemory:
        """Map an inherited or received memfd. Takes ownership of `fd` on
        success only. The memfd must be exactly `size` bytes and sealed
        against shrinking, so that no holder can make our accesses fault."""
        _check_size(size)
        actual = os.fstat(fd).st_size
        if actual != size:
            raise GuestMemoryError(f"memfd is {actual} bytes, expected {size}")
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError as error:
            raise GuestMemoryError(f"fd {fd} is not a sealable memfd: {error}") from None
        if not seals & fcntl.F_SEAL_SHRINK:
            raise GuestMemoryError(f"memfd {fd} is not sealed against shrinking")
        return cls(fd, size)

    @property
    def size(self) -> int:
        return self._size

    @property
    def page_count(self) -> int:
        return self._size // PAGE_SIZE

    @property
    def closed(self) -> bool:
        return self._mm is None

    def fileno(self) -> int:
        self._open()
        return self._fd

    @property
    def mappings(self) -> int:
        """Mappings of this memory that MappedRegions hold now (one per run)."""
        return self._mappings

    def _reserve_mappings(self, runs: int, max_runs: int) -> None:
        with self._mappings_lock:
            if runs > max_runs:
                reason = f"{runs} runs of pages, more than the {max_runs} a region may have"
            elif self._mappings + runs > self.max_mappings:
                reason = (
                    f"{runs} more mappings would pass the child's {self.max_mappings} "
                    f"({self._mappings} in use)"
                )
            else:
                self._mappings += runs
                return
            self.mapping_refusals += 1
        raise MappingRefused(f"cannot map: {reason}")

    def _release_mappings(self, runs: int) -> None:
        with self._mappings_lock:
            self._mappings -= runs

    def _open(self) -> mmap.mmap:
        if self._mm is None:
            raise GuestMemoryError("guest memory is closed")
        return self._mm

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest bytes [gpa, gpa + length). While it (or a
        slice of it) lives, close() refuses; release it with `with` or del."""
        mm = self._open()
        if gpa < 0 or length < 0 or gpa + length > self._size:
            raise OutOfBounds(
                f"guest range [{gpa}, {gpa} + {length}) is outside memory of {self._size} bytes"
            )
        return memoryview(mm)[gpa : gpa + length]

    def close(self) -> None:
        """Unmap and close the fd. Idempotent. Raises BufferError (and stays
        open) while views of this memory exist. Regions mapped from it stay
        valid: their mappings hold their own reference to the memfd."""
        self._close(detach=False)

    def detach(self) -> None:
        """Close now, leaving the mapping to the views that still exist: it
        is unmapped when the last of them goes (none can dangle)."""
        self._close(detach=True)

    def _close(self, detach: bool) -> None:
        if self._mm is not None:
            _unmap(self._mm, "guest memory", detach)
            self._mm = None
            os.close(self._fd)

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        # Leaving on an error, views may still be alive (say, in its traceback):
        # detach rather than mask that error with a BufferError.
        self._close(detach=exc_type is not None)


def _unmap(mm: mmap.mmap, what: str, detach: bool) -> None:
    """Unmap `mm`, or raise BufferError while views of it exist. With `detach`,
    leave it to them instead: each view holds a reference to `mm`, which
    CPython unmaps when the last one is gone, so no view ever dangles."""
    try:
        mm.close()
    except BufferError:
        if not detach:
            raise BufferError(f"{what} still has views exported; release them first") from None


class PageAllocator:
    """The child's allocator for pages it grants: a bitmap, lowest pages first."""

    def __init__(self, memory: GuestMemory) -> None:
        self._used = bytearray(memory.page_count)  # 0 free, 1 allocated
        self._free = memory.page_count

    @property
    def free_count(self) -> int:
        return self._free

    def alloc(self, npages: int, contiguous: bool = True) -> list[int]:
        """`npages` free PFNs, consecutive if `contiguous`, else the lowest
        free ones wherever they are. OutOfMemory (nothing allocated) if none."""
        if npages <= 0:
            raise ValueError(f"cannot allocate {npages} pages")
        if contiguous:
            start = self._used.find(bytes(npages))
            if start < 0:
                raise OutOfMemory(f"no run of {npages} free pages ({self._free} free in all)")
            pfns = list(range(start, start + npages))
        else:
            if npages > self._free:
                raise OutOfMemory(f"{npages} pages requested, {self._free} free")
            pfns, pos = [], 0
            while len(pfns) < npages:
                pos = self._used.find(0, pos)
                pfns.append(pos)
                pos += 1
        for pfn in pfns:
            self._used[pfn] = 1
        self._free -= npages
        return pfns

    def free(self, pfns: Sequence[int]) -> None:
        """Return pages. All or nothing: every PFN is checked before any is freed."""
        seen = set()
        for pfn in pfns:
            if not 0 <= pfn < len(self._used):
                raise ForeignPage(f"PFN {pfn} is not in this memory of {len(self._used)} pages")
            if not self._used[pfn] or pfn in seen:
                raise DoubleFree(f"PFN {pfn} is not allocated (double free?)")
            seen.add(pfn)
        for pfn in seen:
            self._used[pfn] = 0
        self._free += len(seen)


class PfnList(Sequence[int]):
    """An immutable, compact sequence of u64 PFNs: 8 bytes a page (a tuple
    of Python ints costs about 40, which made a 32 MiB GPADL hold ~300 KiB
    of the parent). Compares equal to any sequence of the same ints."""

    __slots__ = ("_array",)
    _array: array[int]

    def __init__(self, pfns: Iterable[int] = ()) -> None:
        if isinstance(pfns, PfnList):
            self._array = pfns._array
            return
        try:
            self._array = array("Q", pfns)
        except (OverflowError, TypeError):
            raise OutOfBounds(_bad_pfn(pfns)) from None

    @classmethod
    def adopt(cls, pfns: array[int]) -> PfnList:
        """Wrap an array('Q') without copying; the caller must not change it."""
        if pfns.typecode != "Q":
            raise UsageError(f"a PfnList holds u64 PFNs, not array({pfns.typecode!r})")
        adopted = cls.__new__(cls)
        adopted._array = pfns
        return adopted

    def __len__(self) -> int:
        return len(self._array)

    @overload
    def __getitem__(self, index: int) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> PfnList: ...
    def __getitem__(self, index: int | slice) -> int | PfnList:
        if isinstance(index, slice):
            return PfnList.adopt(self._array[index])
        return self._array[index]

    def __iter__(self) -> Iterator[int]:
        return iter(self._array)

    def __contains__(self, pfn: object) -> bool:
        return pfn in self._array

    def index(self, pfn: Any, start: int = 0, stop: int = sys.maxsize) -> int:
        return self._array.index(pfn, start, stop)

    def __add__(self, other: Sequence[int]) -> PfnList:
        return PfnList.adopt(self._array + PfnList(other)._array)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PfnList):
            return self._array == other._array
        if isinstance(other, Sequence | array) and not isinstance(other, str | bytes | bytearray):
            return len(other) == len(self._array) and tuple(self._array) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self._array))  # as the equal tuple's

    def __repr__(self) -> str:
        return f"PfnList({list(self._array)!r})"

    def __sizeof__(self) -> int:
        return object.__sizeof__(self) + self._array.__sizeof__()

    def runs(self) -> Iterator[tuple[int, int, int]]:
        """(index, first PFN, page count) of each run of consecutive PFNs."""
        pfns = self._array
        n = len(pfns)
        if not n:
            return
        first = pfns[0]
        if (
            pfns[-1] - first == n - 1
            and first + n <= _U64
            and pfns == array("Q", range(first, first + n))
        ):
            yield 0, first, n  # the common case, compared at C speed
            return
        start = 0
        for i in range(1, n + 1):
            if i == n or pfns[i] != pfns[i - 1] + 1:
                yield start, pfns[start], i - start
                start = i


def _bad_pfn(pfns: Iterable[int]) -> str:
    for i, pfn in enumerate(pfns):
        if not isinstance(pfn, int) or not 0 <= pfn < _U64:
            return f"PFN {pfn!r} (entry {i}) is no u64 page number, so beyond guest memory"
    return "PFNs are not u64 page numbers, so beyond guest memory"


def check_pfns(memory: GuestMemory, pfns: Sequence[int]) -> PfnList:
    """The PFNs as a PfnList, each checked to lie inside `memory`."""
    checked = PfnList(pfns)
    if not checked:
        raise GuestMemoryError("empty PFN list")
    limit = memory.page_count
    if max(checked) >= limit:  # u64 already, so only the top can be wrong
        i, pfn = next((i, p) for i, p in enumerate(checked) if p >= limit)
        raise OutOfBounds(f"PFN {pfn} (entry {i}) is beyond guest memory of {limit} pages")
    return checked


# ctypes, because Python's mmap module cannot map at a fixed address.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int64,
]


class MappedRegion:
    """Guest pages mapped virtually contiguous in this process (see
    map_contiguous). `view()` gives the writable buffer; `close()` unmaps,
    refusing with BufferError while any view of it exists.

    Each run of consecutive pages is one mapping, counted against the
    memory's `max_mappings` from here until the mapping is really gone
    (the last view released): MappingRefused if the pages come in more than
    `max_runs` runs, or the memory has no mappings left."""

    def __init__(
        self, memory: GuestMemory, pages: Sequence[int], max_runs: int = DEFAULT_MAX_RUNS
    ) -> None:
        self.pages = PfnList(pages)
        self.size = len(pages) * PAGE_SIZE
        runs = list(self.pages.runs())
        memory._reserve_mappings(len(runs), max_runs)
        try:
            fd = memory.fileno()
            # The reservation: an ordinary Python mmap, so CPython owns the range,
            # counts exported views and munmaps all of it on close. It is never
            # touched (MAP_NORESERVE: nothing committed) and is fully replaced
            # below, so its protection never matters.
            self._mm: mmap.mmap | None = mmap.mmap(
                -1, self.size, flags=mmap.MAP_PRIVATE | _MAP_NORESERVE
            )
        except BaseException:
            memory._release_mappings(len(runs))
            raise
        # Released when the mmap object dies, which a view in use delays.
        weakref.finalize(self._mm, memory._release_mappings, len(runs))
        try:
            base = ctypes.addressof(ctypes.c_char.from_buffer(self._mm))
            for index, pfn, count in runs:
                self._map_run(fd, base, index, pfn, count)
        except BaseException:
            self._mm.close()  # also unmaps the runs mapped so far
            self._mm = None
            raise

    @staticmethod
    def _map_run(fd: int, base: int, index: int, pfn: int, count: int) -> None:
        # MAP_FIXED silently replaces whatever is mapped at the target, which is
        # safe only because the target lies inside our own reservation: no other
        # mapping (heap, library, another region) can be there.
        target = base + index * PAGE_SIZE
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        flags = mmap.MAP_SHARED | _MAP_FIXED
        got = _libc.mmap(target, count * PAGE_SIZE, prot, flags, fd, pfn * PAGE_SIZE)
        if got != target:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap of PFNs {pfn}..{pfn + count - 1}: {os.strerror(err)}")

    @property
    def closed(self) -> bool:
        return self._mm is None

    def view(self) -> memoryview:
        """The whole region as a writable byte view (holds the region open)."""
        if self._mm is None:
            raise GuestMemoryError("mapped region is closed")
        return memoryview(self._mm)

    def close(self) -> None:
        """Unmap. Idempotent. BufferError (and still mapped) while views exist."""
        self._close(detach=False)

    def _close(self, detach: bool) -> None:
        if self._mm is not None:
            _unmap(self._mm, "mapped region", detach)
            self._mm = None

    def __enter__(self) -> MappedRegion:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self._close(detach=exc_type is not None)  # as GuestMemory.__exit__


def map_contiguous(
    memory: GuestMemory, pfns: Sequence[int], *, max_runs: int = DEFAULT_MAX_RUNS
) -> MappedRegion:
    """Map guest pages `pfns` (any order, checked) back to back: byte
    k * 4096 + j of the region is byte j of guest page pfns[k]. Writes go
    both ways. The region outlives memory.close(). MappingRefused if the
    pages come in more than `max_runs` runs or the memory's quota of
    mappings would be passed."""
    return MappedRegion(memory, check_pfns(memory, pfns), max_runs)


def map_ring(
    memory: GuestMemory, pfns: Sequence[int], *, max_runs: int = DEFAULT_MAX_RUNS
) -> MappedRegion:
    """Map one ring's pages (header page, then data pages) with the data pages
    twice back to back: 4096 + 2 * data_size bytes, for a ring attached with
    mirrored=True, so a packet that wraps reads as one buffer. `max_runs`
    counts the runs of the mapping, the data pages' twice."""
    pages = check_pfns(memory, pfns)
    if len(pages) < 2:
        raise GuestMemoryError(f"a ring needs a header page and a data page, got {len(pages)}")
    return MappedRegion(memory, pages + pages[1:], max_runs)


def map_channel_rings(
    memory: GuestMemory,
    gpadl_pfns: Sequence[int],
    inbound_page_offset: int,
    *,
    max_runs: int = DEFAULT_MAX_RUNS,
) -> tuple[MappedRegion, MappedRegion]:
    """Split a channel's ring GPADL (outbound ring, then inbound ring from page
    `inbound_page_offset`, as the open message says) and map each with map_ring.
    Returns (outbound, inbound): in the parent, outbound is the ring it reads.
    MappingRefused (nothing mapped) if a ring's mapping would have more than
    `max_runs` runs or the memory's quota of mappings would be passed."""
    pages = check_pfns(memory, gpadl_pfns)
    if not 2 <= inbound_page_offset <= len(pages) - 2:
        raise GuestMemoryError(
            f"inbound ring page offset {inbound_page_offset} does not leave two rings of "
            f"at least 2 pages in a ring GPADL of {len(pages)} pages"
        )
    outbound = map_ring(memory, pages[:inbound_page_offset], max_runs=max_runs)
    try:
        inbound = map_ring(memory, pages[inbound_page_offset:], max_runs=max_runs)
    except BaseException:
        outbound.close()
        raise
    return outbound, inbound


def guest_segments(
    memory: GuestMemory, ranges: Sequence[GpaRange], length: int
) -> list[memoryview]:
    """Views of the guest's buffer, `length` bytes through the ranges, one
    view per run of consecutive pages (so a file backend does one iovec each)."""
    segments: list[memoryview] = []
    for gpa_range in ranges:
        if length <= 0:
            break
        start, end = gpa_range.byte_offset, gpa_range.byte_offset + gpa_range.byte_count
        pfns = gpa_range.pfns
        if pfns == tuple(range(pfns[0], pfns[0] + len(pfns))):  # one run: one view
            size = min(end - start, length)
            segments.append(memory.view(pfns[0] * PAGE_SIZE + start, size))
            length -= size
            continue
        i = 0
        while i < len(pfns) and start < end and length > 0:
            run = 1
            while i + run < len(pfns) and pfns[i + run] == pfns[i] + run:
                run += 1
            run_end = min(end, (i + run) * PAGE_SIZE)
            size = min(run_end - start, length)
            segments.append(memory.view(pfns[i] * PAGE_SIZE + start - i * PAGE_SIZE, size))
            length -= size
            start = run_end
            i += run
    return segments
