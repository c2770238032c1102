"""Guest memory (vmbus.memory): bounds checks, sharing across fds and
processes, scattered and mirrored mappings, the page allocator, and the
parent's checks of what a child grants."""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Iterator
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    rule,
)

from vmbus.errors import PeerError, UsageError
from vmbus.gpadl import Gpadl, GpadlTable
from vmbus.memory import (
    PAGE_SIZE,
    DoubleFree,
    ForeignPage,
    GuestMemory,
    GuestMemoryError,
    MappingRefused,
    OutOfBounds,
    OutOfMemory,
    PageAllocator,
    PfnList,
    map_channel_rings,
    map_contiguous,
    map_ring,
)

PAGES = 16
SIZE = PAGES * PAGE_SIZE
NAME = "vmbus-test-memory"
PATTERN = random.Random(1).randbytes(SIZE)  # every byte of every page differs in practice


def _our_mappings() -> int:
    with open("/proc/self/maps") as maps:
        return sum(f"memfd:{NAME}" in line for line in maps)


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Every test closes every fd and mapping it made."""
    fds, maps = len(os.listdir("/proc/self/fd")), _our_mappings()
    yield
    assert len(os.listdir("/proc/self/fd")) == fds
    assert _our_mappings() == maps


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory.create(SIZE, name=NAME) as mem:
        yield mem


@pytest.fixture(scope="module")
def patterned() -> Iterator[GuestMemory]:
    """Memory holding PATTERN, shared by the property tests (they restore it)."""
    with GuestMemory.create(SIZE, name=NAME) as mem:
        _fill(mem, PATTERN)
        yield mem


def _fill(mem: GuestMemory, data: bytes) -> None:
    with mem.view(0, len(data)) as view:
        view[:] = data


def _page(mem: GuestMemory, pfn: int) -> bytes:
    with mem.view(pfn * PAGE_SIZE, PAGE_SIZE) as view:
        return bytes(view)


def _any_int(near: int) -> st.SearchStrategy[int]:
    """Ints around [0, near], plus negatives and huge values of either sign."""
    return st.one_of(
        st.integers(-8, near + 8),
        st.integers(),
        st.sampled_from([-(2**63), 2**31, 2**63 - 1, 2**63, 2**64, 2**64 + near]),
    )


@st.composite
def ranges(draw: st.DrawFn, limit: int) -> tuple[int, int]:
    """(start, length) for a space of `limit` bytes: anything, often ending
    right at its edge or just past it."""
    start = draw(_any_int(limit))
    near_end = st.integers(-2, 2).map(lambda d: limit - start + d)
    return start, draw(st.one_of(_any_int(limit), near_end))


# GuestMemory


@pytest.mark.parametrize("size", [0, -PAGE_SIZE, 100, PAGE_SIZE + 1])
def test_create_rejects_size_not_a_positive_page_multiple(size: int) -> None:
    with pytest.raises(GuestMemoryError, match="multiple of 4096"):
        GuestMemory.create(size, name=NAME)


def test_memory_size_and_fresh_contents(memory: GuestMemory) -> None:
    assert (memory.size, memory.page_count) == (SIZE, PAGES)
    with memory.view(0, SIZE) as view:
        assert not view.readonly
        assert view.tobytes() == bytes(SIZE)


@given(span=ranges(SIZE))
def test_view_is_exact_or_out_of_bounds(patterned: GuestMemory, span: tuple[int, int]) -> None:
    gpa, length = span
    inside = gpa >= 0 and length >= 0 and gpa + length <= SIZE
    try:
        view = patterned.view(gpa, length)
    except GuestMemoryError:
        assert not inside
        return
    with view:
        assert inside
        assert len(view) == length
        assert view.tobytes() == PATTERN[gpa : gpa + length]


def test_two_mappings_of_one_memfd_see_each_others_writes(memory: GuestMemory) -> None:
    with GuestMemory.from_fd(os.dup(memory.fileno()), SIZE) as other:
        with memory.view(3 * PAGE_SIZE + 5, 4) as view:
            view[:] = b"abcd"
        with other.view(3 * PAGE_SIZE + 5, 4) as view:
            assert bytes(view) == b"abcd"
            view[:] = b"wxyz"
        with memory.view(3 * PAGE_SIZE + 5, 4) as view:
            assert bytes(view) == b"wxyz"


def test_from_fd_rejects_a_memfd_of_another_size(memory: GuestMemory) -> None:
    fd = os.dup(memory.fileno())
    try:
        with pytest.raises(GuestMemoryError, match=f"is {SIZE} bytes, expected {2 * SIZE}"):
            GuestMemory.from_fd(fd, 2 * SIZE)
    finally:
        os.close(fd)  # still ours: from_fd takes the fd only on success


def test_from_fd_rejects_a_memfd_a_peer_could_shrink() -> None:
    fd = os.memfd_create(NAME)
    try:
        os.ftruncate(fd, SIZE)
        with pytest.raises(GuestMemoryError, match="not sealed|not a sealable"):
            GuestMemory.from_fd(fd, SIZE)
    finally:
        os.close(fd)


def test_created_memory_cannot_be_resized_by_a_peer(memory: GuestMemory) -> None:
    for size in (PAGE_SIZE, 2 * SIZE):
        with pytest.raises(PermissionError):
            os.ftruncate(memory.fileno(), size)
    assert os.fstat(memory.fileno()).st_size == SIZE


def test_child_process_and_parent_share_memory(memory: GuestMemory) -> None:
    go_read, go_write = os.pipe()
    fd = memory.fileno()
    pid = os.fork()
    if pid == 0:  # the child: map the inherited fd afresh, as a child partition would
        status = 1
        try:
            os.close(go_write)
            os.read(go_read, 1)
            with GuestMemory.from_fd(os.dup(fd), SIZE) as mem:
                with mem.view(PAGE_SIZE, 5) as view:
                    saw_parent = bytes(view) == b"hello"
                with mem.view(2 * PAGE_SIZE - 2, 5) as view:
                    view[:] = b"world"
            status = 0 if saw_parent else 2
        finally:
            os._exit(status)
    os.close(go_read)
    with memory.view(PAGE_SIZE, 5) as view:
        view[:] = b"hello"  # written after the fork: only shared memory carries it
    os.write(go_write, b"!")
    os.close(go_write)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with memory.view(2 * PAGE_SIZE - 2, 5) as view:
        assert bytes(view) == b"world"


def test_memory_close_refuses_while_views_exist_then_is_final() -> None:
    mem = GuestMemory.create(SIZE, name=NAME)
    view = mem.view(10, 4)
    with pytest.raises(BufferError, match="release them first"):
        mem.close()
    view[:] = b"live"  # still mapped and usable
    gpadl = Gpadl.grant(mem, [0], 100)
    view.release()
    mem.close()
    mem.close()  # idempotent
    assert mem.closed
    with pytest.raises(GuestMemoryError, match="closed"):
        mem.view(0, 1)
    with pytest.raises(GuestMemoryError, match="closed"):
        gpadl.read(mem, 0, 1)
    with pytest.raises(GuestMemoryError, match="closed"):
        map_contiguous(mem, [0])


# map_contiguous and map_ring

SCATTERED = [7, 3, 12, 13, 1]


def test_map_contiguous_lays_scattered_pages_back_to_back(memory: GuestMemory) -> None:
    _fill(memory, PATTERN)
    with map_contiguous(memory, SCATTERED) as region, region.view() as view:
        assert region.size == len(view) == len(SCATTERED) * PAGE_SIZE
        for k, pfn in enumerate(SCATTERED):
            assert view[k * PAGE_SIZE : (k + 1) * PAGE_SIZE] == _page(memory, pfn)
        # Region -> guest: the last byte of slot 2 is the last byte of page 12.
        view[3 * PAGE_SIZE - 1] = PATTERN[12 * PAGE_SIZE + 4095] ^ 0xFF
        assert _page(memory, 12)[4095] == PATTERN[12 * PAGE_SIZE + 4095] ^ 0xFF
        # Guest -> region: page 1 is slot 4.
        with memory.view(1 * PAGE_SIZE + 17, 3) as guest:
            guest[:] = b"xyz"
        assert bytes(view[4 * PAGE_SIZE + 17 : 4 * PAGE_SIZE + 20]) == b"xyz"


@pytest.mark.parametrize("pfns", [[], [PAGES], [2, -1], [0, PAGES + 10**6], [2**64]])
def test_map_contiguous_rejects_pages_outside_memory(memory: GuestMemory, pfns: list[int]) -> None:
    with pytest.raises(GuestMemoryError):
        map_contiguous(memory, pfns)


def test_region_close_refuses_while_views_exist_and_outlives_memory() -> None:
    mem = GuestMemory.create(SIZE, name=NAME)
    region = map_contiguous(mem, [5, 2])
    mem.close()  # the region keeps its own reference to the memfd
    view = region.view()
    view[PAGE_SIZE] = 42
    with pytest.raises(BufferError, match="release them first"):
        region.close()
    assert view[PAGE_SIZE] == 42
    view.release()
    region.close()
    region.close()  # idempotent
    assert region.closed
    with pytest.raises(GuestMemoryError, match="closed"):
        region.view()


def test_with_block_left_by_an_error_detaches_instead_of_masking_it() -> None:
    views = []
    with (
        pytest.raises(RuntimeError, match="the real error"),  # not BufferError
        GuestMemory.create(SIZE, name=NAME) as mem,
        map_contiguous(mem, [4]) as region,
    ):
        views += [mem.view(4 * PAGE_SIZE, 8), region.view()]
        raise RuntimeError("the real error")
    assert mem.closed and region.closed
    views[0][:2] = b"ok"  # still mapped: the views keep the mappings alive
    assert bytes(views[1][:2]) == b"ok"  # the same guest page 4, mapped twice
    assert _our_mappings() > 0
    views.clear()  # the last views go: CPython unmaps


RING_PFNS = [9, 4, 11, 2]  # header page 9, data pages 4, 11, 2


def test_map_ring_maps_the_data_pages_twice(memory: GuestMemory) -> None:
    data_pages = len(RING_PFNS) - 1
    with map_ring(memory, RING_PFNS) as region, region.view() as view:
        assert len(view) == PAGE_SIZE + 2 * data_pages * PAGE_SIZE
        view[:4] = b"HDR!"
        assert _page(memory, 9)[:4] == b"HDR!"
        for i, pfn in enumerate(RING_PFNS[1:]):
            first = PAGE_SIZE + i * PAGE_SIZE
            mirror = first + data_pages * PAGE_SIZE
            view[first + 100] = i + 1  # through the first copy
            assert view[mirror + 100] == i + 1
            view[mirror + 4095] = i + 50  # through the mirror
            assert view[first + 4095] == i + 50
            assert _page(memory, pfn)[100] == i + 1
            assert _page(memory, pfn)[4095] == i + 50


def test_map_ring_needs_a_header_and_a_data_page(memory: GuestMemory) -> None:
    with pytest.raises(GuestMemoryError, match="header page and a data page"):
        map_ring(memory, [3])


def test_wrapped_packet_reads_as_one_buffer_through_the_mirror(
    memory: GuestMemory, ring_impl: ModuleType
) -> None:
    dsize = (len(RING_PFNS) - 1) * PAGE_SIZE
    payloads = [random.Random(i).randbytes(5001) for i in range(3)]
    packet_size = 5024 + 8  # descriptor 16 + 5001 padded to 5024, plus the trailer
    with map_contiguous(memory, RING_PFNS) as plain, map_ring(memory, RING_PFNS) as mirrored:
        plain_view, mirrored_view = plain.view(), mirrored.view()
        ring_impl.init_ring(plain_view)
        writer = ring_impl.RingWriter(plain_view)
        reader = ring_impl.RingReader(mirrored_view, mirrored=True)
        for i, payload in enumerate(payloads):
            assert writer.write(payload, trans_id=i)
            writer.commit()
            packet = reader.read()
            assert packet is not None
            assert packet.trans_id == i
            assert bytes(packet.payload) == payload + bytes(7)  # padded to 8
            del packet
            reader.commit()
        # The third packet started at 2 * packet_size and ran past the end.
        assert 2 * packet_size < dsize < 3 * packet_size
        wrapped_end = 3 * packet_size - dsize
        assert struct.unpack_from("<II", plain_view, 0) == (wrapped_end, wrapped_end)
        del writer, reader, plain_view, mirrored_view  # the rings hold buffers too


def test_map_channel_rings_splits_at_the_inbound_offset(memory: GuestMemory) -> None:
    gpadl = [5, 6, 7, 10, 1, 2, 14]  # outbound: 5 + 6, 7; inbound: 10 + 1, 2, 14
    outbound, inbound = map_channel_rings(memory, gpadl, 3)
    with outbound, inbound, outbound.view() as out_view, inbound.view() as in_view:
        assert outbound.pages == (5, 6, 7, 6, 7)
        assert inbound.pages == (10, 1, 2, 14, 1, 2, 14)
        assert len(out_view) == PAGE_SIZE + 2 * 2 * PAGE_SIZE
        assert len(in_view) == PAGE_SIZE + 2 * 3 * PAGE_SIZE
        out_view[0] = 0xAA
        in_view[0] = 0xBB
        in_view[PAGE_SIZE + 3 * PAGE_SIZE] = 0xCC  # mirror of inbound data page 1
        assert (_page(memory, 5)[0], _page(memory, 10)[0], _page(memory, 1)[0]) == (
            0xAA,
            0xBB,
            0xCC,
        )


# PageAllocator


class AllocatorMachine(RuleBasedStateMachine):
    """The allocator against a model: the set of pages handed out."""

    allocations = Bundle("allocations")

    def __init__(self) -> None:
        super().__init__()
        self.memory = GuestMemory.create(SIZE, name=NAME)
        self.allocator = PageAllocator(self.memory)
        self.owned: set[int] = set()
        self.freed: list[list[int]] = []

    def teardown(self) -> None:
        self.memory.close()

    @rule(target=allocations, npages=st.integers(1, 6), contiguous=st.booleans())
    def alloc(self, npages: int, contiguous: bool) -> object:
        free = set(range(PAGES)) - self.owned
        if contiguous:
            possible = any(set(range(s, s + npages)) <= free for s in range(PAGES - npages + 1))
        else:
            possible = len(free) >= npages
        if not possible:
            with pytest.raises(OutOfMemory):
                self.allocator.alloc(npages, contiguous)
            return multiple()
        pfns = self.allocator.alloc(npages, contiguous)
        assert len(set(pfns)) == len(pfns) == npages
        assert set(pfns) <= free  # in range, and never overlapping a live allocation
        if contiguous:
            assert pfns == list(range(pfns[0], pfns[0] + npages))
        self.owned |= set(pfns)
        return pfns

    @rule(pfns=consumes(allocations))
    def free(self, pfns: list[int]) -> None:
        self.allocator.free(pfns)
        self.owned -= set(pfns)
        self.freed.append(pfns)

    @rule(data=st.data())
    def double_free(self, data: st.DataObject) -> None:
        # Only lists none of whose pages was handed out again since.
        stale = [pfns for pfns in self.freed if not set(pfns) & self.owned]
        if stale:
            with pytest.raises(DoubleFree):
                self.allocator.free(data.draw(st.sampled_from(stale)))

    @rule(pfns=allocations)
    def free_twice_in_one_call_frees_nothing(self, pfns: list[int]) -> None:
        with pytest.raises(DoubleFree):
            self.allocator.free([*pfns, pfns[0]])

    @rule(pfns=allocations, bad=st.sampled_from([-1, PAGES, PAGES + 7, 2**64]))
    def free_with_a_foreign_page_frees_nothing(self, pfns: list[int], bad: int) -> None:
        with pytest.raises(ForeignPage):
            self.allocator.free([*pfns, bad])

    @invariant()
    def free_count_matches_the_model(self) -> None:
        assert self.allocator.free_count == PAGES - len(self.owned)


TestPageAllocator = AllocatorMachine.TestCase
TestPageAllocator.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


def test_allocator_runs_out_then_reuses_freed_pages(memory: GuestMemory) -> None:
    allocator = PageAllocator(memory)
    everything = allocator.alloc(PAGES)
    assert everything == list(range(PAGES))
    with pytest.raises(OutOfMemory, match="no run of 1 free pages"):
        allocator.alloc(1)
    allocator.free([3, 4, 9])
    with pytest.raises(OutOfMemory, match="no run of 3"):
        allocator.alloc(3)  # fragmented: no three in a row
    assert allocator.alloc(3, contiguous=False) == [3, 4, 9]
    with pytest.raises(DoubleFree):
        allocator.free([5, 5])
    allocator.free(everything)
    with pytest.raises(DoubleFree, match="PFN 0 is not allocated"):
        allocator.free([0])
    with pytest.raises(ForeignPage, match=f"PFN {PAGES} is not in this memory"):
        allocator.free([PAGES])
    with pytest.raises(ValueError):
        allocator.alloc(0)


# Gpadl: what the parent accepts from an untrusted child


def test_child_grants_pfn_beyond_its_memory(memory: GuestMemory) -> None:
    for pfns in ([0, PAGES], [PAGES + 1000], [3, -1], [2**64]):
        with pytest.raises(OutOfBounds, match="beyond guest memory"):
            Gpadl.grant(memory, pfns, PAGE_SIZE)
    assert Gpadl.grant(memory, [0, PAGES - 1], PAGE_SIZE).pfns == (0, PAGES - 1)


def test_child_grants_byte_offset_past_first_page(memory: GuestMemory) -> None:
    for offset in (PAGE_SIZE, PAGE_SIZE + 1, -1, 2**64):
        with pytest.raises(GuestMemoryError, match="byte_offset"):
            Gpadl.grant(memory, [1, 2], 100, byte_offset=offset)
    assert Gpadl.grant(memory, [1, 2], 100, byte_offset=PAGE_SIZE - 1).byte_offset == PAGE_SIZE - 1


def test_child_grants_byte_count_larger_than_pages(memory: GuestMemory) -> None:
    for count, offset in ((2 * PAGE_SIZE + 1, 0), (2 * PAGE_SIZE - 199, 200), (-1, 0)):
        with pytest.raises(GuestMemoryError, match="byte_count"):
            Gpadl.grant(memory, [1, 2], count, byte_offset=offset)
    assert (
        len(Gpadl.grant(memory, [1, 2], 2 * PAGE_SIZE - 200, byte_offset=200))
        == 2 * PAGE_SIZE - 200
    )


@pytest.mark.parametrize(
    ("npages", "offset"), [(6, 0), (6, 1), (6, 5), (6, 6), (6, -1), (6, 2**64), (3, 2)]
)
def test_child_ring_gpadl_too_small_for_inbound_offset(
    memory: GuestMemory, npages: int, offset: int
) -> None:
    with pytest.raises(GuestMemoryError, match="inbound ring page offset"):
        map_channel_rings(memory, list(range(npages)), offset)


def test_gpadl_segments_follow_physical_runs(memory: GuestMemory) -> None:
    _fill(memory, PATTERN)
    gpadl = Gpadl.grant(memory, [5, 2, 3, 9], 4 * PAGE_SIZE - 150, byte_offset=100)
    segments = gpadl.segments(memory, 0, len(gpadl))
    try:
        assert [len(s) for s in segments] == [PAGE_SIZE - 100, 2 * PAGE_SIZE, PAGE_SIZE - 50]
        assert segments[0] == _page(memory, 5)[100:]
        assert segments[1] == _page(memory, 2) + _page(memory, 3)  # 2, 3: one run
        assert segments[2] == _page(memory, 9)[: PAGE_SIZE - 50]
    finally:
        for segment in segments:
            segment.release()
    with pytest.raises(OutOfBounds):
        gpadl.write(memory, len(gpadl) - 1, b"ab")
    with pytest.raises(OutOfBounds):
        gpadl.write(memory, -1, b"a")
    with memory.view(0, SIZE) as view:
        assert view == PATTERN  # a refused write writes nothing


@st.composite
def gpadls(draw: st.DrawFn, unique: bool) -> tuple[list[int], int, int]:
    pfns = draw(st.lists(st.integers(0, PAGES - 1), min_size=1, max_size=5, unique=unique))
    byte_offset = draw(st.integers(0, PAGE_SIZE - 1))
    byte_count = draw(st.integers(0, len(pfns) * PAGE_SIZE - byte_offset))
    return pfns, byte_count, byte_offset


def _granted(pfns: list[int], byte_count: int, byte_offset: int) -> bytes:
    pages = b"".join(PATTERN[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] for p in pfns)
    return pages[byte_offset : byte_offset + byte_count]


@given(grant=gpadls(unique=False), data=st.data())
def test_gpadl_read_is_exact_or_out_of_bounds(
    patterned: GuestMemory, grant: tuple[list[int], int, int], data: st.DataObject
) -> None:
    gpadl = Gpadl.grant(patterned, *grant)
    offset, n = data.draw(ranges(gpadl.byte_count))
    if offset >= 0 and n >= 0 and offset + n <= gpadl.byte_count:
        assert gpadl.read(patterned, offset, n) == _granted(*grant)[offset : offset + n]
    else:
        with pytest.raises(OutOfBounds):
            gpadl.read(patterned, offset, n)


@given(grant=gpadls(unique=True), data=st.data())
def test_gpadl_write_lands_only_in_the_granted_bytes(
    patterned: GuestMemory, grant: tuple[list[int], int, int], data: st.DataObject
) -> None:
    pfns, byte_count, byte_offset = grant
    gpadl = Gpadl.grant(patterned, pfns, byte_count, byte_offset)
    offset = data.draw(st.integers(0, byte_count))
    payload = random.Random(offset).randbytes(data.draw(st.integers(0, byte_count - offset)))
    expected = bytearray(PATTERN)
    for i, byte in enumerate(payload):
        pos = byte_offset + offset + i
        expected[pfns[pos // PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE] = byte
    try:
        gpadl.write(patterned, offset, payload)
        assert gpadl.read(patterned, offset, len(payload)) == payload
        with patterned.view(0, SIZE) as view:
            assert view == expected
    finally:
        _fill(patterned, PATTERN)


# PfnList: the compact form of a child's page list


def test_pfn_list_is_a_sequence_of_ints_equal_to_the_tuple() -> None:
    pfns = PfnList([7, 8, 9, 3])
    assert pfns == (7, 8, 9, 3) and pfns == [7, 8, 9, 3]
    assert Gpadl(0, 1, 1, 0, (7, 8, 9, 3)) == Gpadl(0, 1, 1, 0, pfns)
    assert hash(pfns) == hash((7, 8, 9, 3)) and pfns != (7, 8, 9) and pfns != b"\x07"
    assert pfns[1] == 8 and pfns[-1] == 3 and pfns[1:3] == (8, 9)
    assert isinstance(pfns[1:3], PfnList) and list(pfns) == [7, 8, 9, 3]
    assert 9 in pfns and pfns.index(9) == 2 and pfns + (4,) == (7, 8, 9, 3, 4)
    assert list(pfns.runs()) == [(0, 7, 3), (3, 3, 1)]
    assert list(PfnList(range(5, 5000)).runs()) == [(0, 5, 4995)]
    assert pfns.__sizeof__() < 8 * 4 + 120  # 8 bytes a page, not a Python int each


def test_child_names_pfns_that_are_no_page_numbers() -> None:
    for bad in ([-1], [2**64], [1, "2"]):
        with pytest.raises(OutOfBounds, match="beyond guest memory"):
            PfnList(bad)  # type: ignore[arg-type]


# GpadlTable: the host's GPADLs of one child, indexed by page


def test_gpadl_table_is_a_mapping_that_finds_gpadls_by_page() -> None:
    table = GpadlTable(100)
    table[5] = Gpadl(1, 5, 3 * PAGE_SIZE - 10, 10, (40, 41, 42))
    table[6] = Gpadl(1, 6, 2 * PAGE_SIZE, 0, (41, 42))
    assert table == {5: table[5], 6: table[6]} and table.pages == 5
    assert table.covering(40 * PAGE_SIZE + 10, 2 * PAGE_SIZE) is table[5]
    assert table.covering(40 * PAGE_SIZE, 100) is None  # before byte_offset: not granted
    assert table.covering(41 * PAGE_SIZE, 2 * PAGE_SIZE) in (table[5], table[6])
    assert table.covering(42 * PAGE_SIZE, 2 * PAGE_SIZE) is None  # page 43 granted by none
    del table[5]
    assert table.covering(41 * PAGE_SIZE, 2 * PAGE_SIZE) is table[6]
    assert table.covering(40 * PAGE_SIZE + 10, 100) is None
    with pytest.raises(UsageError):
        table[7] = Gpadl(1, 8, PAGE_SIZE, 0, (1,))  # filed under another handle
    with pytest.raises(UsageError):
        table[7] = Gpadl(1, 7, PAGE_SIZE, 0, (100,))  # beyond the memory
    table.clear()
    assert not table and table.pages == 0 and table.covering(41 * PAGE_SIZE, 1) is None


# Mappings: counted per child, capped


def test_regions_count_their_mappings_until_they_are_gone(memory: GuestMemory) -> None:
    assert memory.mappings == 0
    region = map_contiguous(memory, [1, 2, 5, 9, 10])  # three runs
    assert memory.mappings == 3
    view = region.view()
    with pytest.raises(BufferError):
        region.close()
    assert memory.mappings == 3
    view.release()
    region.close()
    assert memory.mappings == 0


def test_child_scatters_a_buffer_past_the_runs_a_region_may_have(memory: GuestMemory) -> None:
    scattered = list(range(0, PAGES, 2))  # 8 runs of one page
    with pytest.raises(MappingRefused, match="8 runs") as refused:
        map_contiguous(memory, scattered, max_runs=7)
    assert isinstance(refused.value, PeerError)  # the child's doing: the open fails
    assert memory.mappings == 0 and memory.mapping_refusals == 1
    with map_contiguous(memory, scattered, max_runs=8):
        assert memory.mappings == 8
