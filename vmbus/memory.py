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
from collections.abc import Iterable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

from vmbus.errors import PeerError, UsageError, VmbusError
from vmbus.packet import GpaRange

__all__ = [
    "DEFAULT_MAX_MAPPINGS",
    "DEFAULT_MAX_RUNS",
    "PAGE_SIZE",
    "DoubleFree",
    "ForeignPage",
    "Gpadl",
    "GpadlTable",
    "GuestMemory",
    "GuestMemoryError",
    "MappedRegion",
    "MappingRefused",
    "OutOfBounds",
    "OutOfMemory",
    "PageAllocator",
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
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
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


def _check_pfns(memory: GuestMemory, pfns: Sequence[int]) -> PfnList:
    """The PFNs as a PfnList, each checked to lie inside `memory`."""
    checked = PfnList(pfns)
    if not checked:
        raise GuestMemoryError("empty PFN list")
    limit = memory.page_count
    if max(checked) >= limit:  # u64 already, so only the top can be wrong
        i, pfn = next((i, p) for i, p in enumerate(checked) if p >= limit)
        raise OutOfBounds(f"PFN {pfn} (entry {i}) is beyond guest memory of {limit} pages")
    return checked


@dataclass(frozen=True, slots=True)
class Gpadl:
    """A GPADL: the page list a guest granted, `byte_count` bytes starting
    `byte_offset` into the first page (offsets below are relative to that
    first byte). The one record of a grant, from the control messages that
    built it (the host's reassembly) to the views a VSP takes of it. The PFNs
    come from the untrusted child: `check` tests them against its memory;
    pages may repeat or be in any order (harmless aliasing). `pfns` may be
    given as any sequence of ints and is kept as a compact PfnList."""

    child_relid: int
    gpadl: int  # the handle
    byte_count: int
    byte_offset: int
    pfns: Sequence[int]

    def __post_init__(self) -> None:
        if not isinstance(self.pfns, PfnList):
            object.__setattr__(self, "pfns", PfnList(self.pfns))

    def __len__(self) -> int:
        return self.byte_count

    def offset_of(self, gpa: int, length: int, index: int | None = None) -> int | None:
        """The GPADL offset at which guest bytes [gpa, gpa + length) lie,
        contiguous and granted, or None. With `index`, only where the page of
        `gpa` is entry `index` (O(pages of the range)); else anywhere."""
        if length <= 0 or gpa < 0:
            return None
        first, pages = gpa // PAGE_SIZE, (gpa % PAGE_SIZE + length - 1) // PAGE_SIZE + 1
        want = array("Q", range(first, first + pages))
        pfns = self.pfns
        candidates = [index] if index is not None else _positions(pfns, first)
        for i in candidates:
            offset = i * PAGE_SIZE + gpa % PAGE_SIZE - self.byte_offset
            if offset < 0 or offset + length > self.byte_count:
                continue
            if pfns[i : i + pages] == PfnList.adopt(want):
                return offset
        return None

    @classmethod
    def grant(
        cls,
        memory: GuestMemory,
        pfns: Sequence[int],
        byte_count: int,
        byte_offset: int = 0,
        *,
        child_relid: int = 0,
        gpadl: int = 0,
    ) -> Gpadl:
        """A checked GPADL of `memory` (GuestMemoryError if it does not fit)."""
        record = cls(child_relid, gpadl, byte_count, byte_offset, PfnList(pfns))
        record.check(memory)
        return record

    def check(self, memory: GuestMemory) -> None:
        """Raise GuestMemoryError unless every page lies in `memory` and the
        byte range fits the pages."""
        _check_pfns(memory, self.pfns)
        if not 0 <= self.byte_offset < PAGE_SIZE:
            raise GuestMemoryError(
                f"GPADL byte_offset {self.byte_offset} is not inside the first page"
            )
        room = len(self.pfns) * PAGE_SIZE - self.byte_offset
        if not 0 <= self.byte_count <= room:
            raise GuestMemoryError(
                f"GPADL byte_count {self.byte_count} does not fit {len(self.pfns)} pages "
                f"from byte_offset {self.byte_offset} ({room} bytes)"
            )

    def segments(self, memory: GuestMemory, offset: int, n: int) -> list[memoryview]:
        """Views of GPADL bytes [offset, offset + n), in order: one per run of
        physically consecutive pages. No copy; the views hold the memory open."""
        if offset < 0 or n < 0 or offset + n > self.byte_count:
            raise OutOfBounds(
                f"range [{offset}, {offset} + {n}) is outside GPADL of {self.byte_count} bytes"
            )
        ranges: list[list[int]] = []  # [gpa, length], merged when adjacent
        pos, end = self.byte_offset + offset, self.byte_offset + offset + n
        while pos < end:
            chunk = min(end, (pos // PAGE_SIZE + 1) * PAGE_SIZE) - pos
            gpa = self.pfns[pos // PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE
            if ranges and ranges[-1][0] + ranges[-1][1] == gpa:
                ranges[-1][1] += chunk
            else:
                ranges.append([gpa, chunk])
            pos += chunk
        return [memory.view(gpa, length) for gpa, length in ranges]

    def read(self, memory: GuestMemory, offset: int, n: int) -> bytes:
        """A copy of GPADL bytes [offset, offset + n)."""
        parts = self.segments(memory, offset, n)
        try:
            return b"".join(parts)
        finally:
            for part in parts:
                part.release()

    def write(self, memory: GuestMemory, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Copy `data` into the GPADL at `offset` (all of it, or nothing)."""
        src = memoryview(data).cast("B")
        pos = 0
        for part in self.segments(memory, offset, len(src)):
            with part:
                part[:] = src[pos : pos + len(part)]
                pos += len(part)


def _positions(pfns: Sequence[int], pfn: int) -> Iterator[int]:
    """Every index of `pfn` in `pfns` (a page may be granted twice)."""
    i = -1
    while True:
        try:
            i = pfns.index(pfn, i + 1)
        except ValueError:
            return
        yield i


class GpadlTable(MutableMapping[int, Gpadl]):
    """One child's GPADLs by handle, with an index of their page runs so
    that `covering` costs O(log pages of memory + pages asked), whatever the
    number of GPADLs (a VRAM_LOCATION once walked every page of every one).

    The index is a max segment tree over the child's pages: leaf `s` holds
    the last page of the longest run (of consecutive PFNs, in any GPADL)
    that starts at page `s`, and which run it is. A range of pages lies in
    one run iff the leftmost leaf reaching its last page starts at or before
    its first. The tree costs 16 bytes a page of guest memory while the
    table holds a GPADL; each run 8 bytes more, 28 if it starts where
    another does (pages granted twice: it waits in a list of that page).
    Adding or removing a GPADL costs O(runs x log pages); only removing the
    longest run of a page also walks the runs waiting there, which the
    child's page quota bounds."""

    def __init__(self, page_count: int) -> None:
        self.page_count = page_count
        self.pages = 0  # pages held by all the GPADLs, counted once per entry
        self.work = 0  # tree nodes the lookups visited: their cost, for tests
        self._gpadls: dict[int, Gpadl] = {}
        # Per GPADL, per run: its first entry, then its pool slot (-1: a leaf).
        self._runs: dict[int, array[int]] = {}
        self._size = 1 << max(page_count - 1, 0).bit_length()
        self._tree: array[int] | None = None  # nodes 1 .. 2 size: max last page; -1: none
        self._clear_index()

    def _clear_index(self) -> None:
        self._tree = None
        self._leaf = array("Q")  # per page: its leaf's run, handle << 32 | run number
        self._head = array("i")  # per page: its first waiting run's slot, or -1
        # The pool of waiting runs: doubly linked lists, one per page.
        self._run = array("Q")
        self._last = array("i")
        self._next = array("i")
        self._prev = array("i")
        self._free = -1  # the pool's free slots, linked by _next

    # --- the mapping ---

    def __getitem__(self, handle: int) -> Gpadl:
        return self._gpadls[handle]

    def __iter__(self) -> Iterator[int]:
        return iter(self._gpadls)

    def __len__(self) -> int:
        return len(self._gpadls)

    def __contains__(self, handle: object) -> bool:
        return handle in self._gpadls

    def __setitem__(self, handle: int, gpadl: Gpadl) -> None:
        if handle != gpadl.gpadl or not 0 <= handle < 1 << 32:
            raise UsageError(f"GPADL {gpadl.gpadl:#x} filed under handle {handle:#x}")
        if gpadl.pfns and max(gpadl.pfns) >= self.page_count:
            raise UsageError(f"GPADL {handle:#x} names pages beyond {self.page_count}")
        if handle in self._gpadls:
            del self[handle]
        if self._tree is None:
            self._tree = array("i", [-1]) * (2 * self._size)
            self._leaf = array("Q", [0]) * self._size
            self._head = array("i", [-1]) * self._size
        runs = list(PfnList(gpadl.pfns).runs())
        self._gpadls[handle] = gpadl
        self._runs[handle] = table = array("i", [0, -1]) * len(runs)
        self.pages += len(gpadl.pfns)
        for number, (index, start, count) in enumerate(runs):
            table[2 * number] = index
            self._add_run(start, start + count - 1, handle << 32 | number)

    def __delitem__(self, handle: int) -> None:
        gpadl = self._gpadls.pop(handle)
        self.pages -= len(gpadl.pfns)
        for number, (_index, start, _count) in enumerate(PfnList(gpadl.pfns).runs()):
            self._remove_run(start, handle << 32 | number)
        del self._runs[handle]
        if not self._gpadls:
            self.clear()

    def clear(self) -> None:
        """Forget every GPADL and free the index."""
        self._gpadls.clear()
        self._runs.clear()
        self.pages = 0
        self._clear_index()

    # --- the index ---

    def covering(self, gpa: int, length: int) -> Gpadl | None:
        """A GPADL whose granted bytes include guest bytes [gpa, gpa + length)
        contiguously, or None. Where pages are granted more than once, only
        the longest run through them is tried."""
        tree = self._tree
        if tree is None or length <= 0 or gpa < 0:
            return None
        first, last = gpa // PAGE_SIZE, (gpa + length - 1) // PAGE_SIZE
        self.work += 1
        if last >= self.page_count or tree[1] < last:
            return None
        node = 1
        while node < self._size:  # down to the leftmost leaf reaching `last`
            self.work += 1
            node = 2 * node if tree[2 * node] >= last else 2 * node + 1
        start = node - self._size
        if start > first:
            return None
        run = self._leaf[start]
        handle, number = run >> 32, run & 0xFFFFFFFF
        gpadl = self._gpadls[handle]
        index = self._runs[handle][2 * number] + first - start
        return gpadl if gpadl.offset_of(gpa, length, index) is not None else None

    def _set_leaf(self, start: int, last: int, run: int) -> None:
        assert self._tree is not None
        tree = self._tree
        self._leaf[start] = run
        if last >= 0:
            self._runs[run >> 32][2 * (run & 0xFFFFFFFF) + 1] = -1
        node = start + self._size
        tree[node] = last
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2

    def _add_run(self, start: int, last: int, run: int) -> None:
        assert self._tree is not None
        held = self._tree[start + self._size]
        if held >= last:
            self._wait(start, run, last)
            return
        if held >= 0:  # the leaf's shorter run waits beside the new one
            self._wait(start, self._leaf[start], held)
        self._set_leaf(start, last, run)

    def _wait(self, start: int, run: int, last: int) -> None:
        slot = self._free
        if slot < 0:
            slot = len(self._run)
            for pool in (self._run, self._last, self._next, self._prev):
                pool.append(0)
        else:
            self._free = self._next[slot]
        head = self._head[start]
        self._run[slot], self._last[slot] = run, last
        self._next[slot], self._prev[slot] = head, -1
        if head >= 0:
            self._prev[head] = slot
        self._head[start] = slot
        self._runs[run >> 32][2 * (run & 0xFFFFFFFF) + 1] = slot

    def _unlink(self, start: int, slot: int) -> None:
        after, before = self._next[slot], self._prev[slot]
        if before < 0:
            self._head[start] = after
        else:
            self._next[before] = after
        if after >= 0:
            self._prev[after] = before
        self._next[slot], self._free = self._free, slot

    def _remove_run(self, start: int, run: int) -> None:
        slot = self._runs[run >> 32][2 * (run & 0xFFFFFFFF) + 1]
        if slot >= 0:  # a waiting run: unlinked where it is
            self._unlink(start, slot)
            return
        # The leaf's run: the longest waiting one takes its place (one as
        # long as the leaf's, if any, ends the search at once).
        held = self._tree[start + self._size] if self._tree is not None else -1
        pick, slot = -1, self._head[start]
        while slot >= 0:
            if pick < 0 or self._last[slot] > self._last[pick]:
                pick = slot
                if self._last[slot] == held:
                    break
            slot = self._next[slot]
        if pick < 0:
            self._set_leaf(start, -1, 0)
            return
        run, last = self._run[pick], self._last[pick]
        self._unlink(start, pick)
        self._set_leaf(start, last, run)


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
    return MappedRegion(memory, _check_pfns(memory, pfns), max_runs)


def map_ring(
    memory: GuestMemory, pfns: Sequence[int], *, max_runs: int = DEFAULT_MAX_RUNS
) -> MappedRegion:
    """Map one ring's pages (header page, then data pages) with the data pages
    twice back to back: 4096 + 2 * data_size bytes, for a ring attached with
    mirrored=True, so a packet that wraps reads as one buffer. `max_runs`
    counts the runs of the mapping, the data pages' twice."""
    pages = _check_pfns(memory, pfns)
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
    pages = _check_pfns(memory, gpadl_pfns)
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
