"""GPADLs: the one record of a page list a guest granted (`Gpadl`), its
checked views, and `GpadlTable`, one child's GPADLs by handle with an index
of their page runs, so a lookup costs the same whatever a child holds."""

from __future__ import annotations

from array import array
from collections.abc import Iterator, MutableMapping, Sequence
from dataclasses import dataclass

from vmbus.errors import UsageError
from vmbus.memory import (
    PAGE_SIZE,
    GuestMemory,
    GuestMemoryError,
    OutOfBounds,
    PfnList,
    check_pfns,
)

__all__ = ["Gpadl", "GpadlTable"]


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
        check_pfns(memory, self.pfns)
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
