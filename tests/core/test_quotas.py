"""Quotas per child: what a child can make the parent hold, and what one
message can cost it, whatever the child sends.

Each attack on the sans-I/O VmbusServer (fast) is refused with the protocol's
failure status at its quota, counted in `refusals`, costs the parent nothing
more, and leaves room again once the child frees what it holds. Then a
Hypothesis machine sends any sequence of control messages against small
quotas and checks the bookkeeping never passes them, and the GPADL index
always agrees with a search of every GPADL.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any
from uuid import UUID

import pytest
from bounds import resources, within
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vmbus import guid
from vmbus import messages as m
from vmbus.device import OpenContext
from vmbus.gpadl import Gpadl, GpadlTable
from vmbus.guest import Guest, GuestError
from vmbus.host import (
    DEFAULT_MAX_GPADL_PAGES,
    DEFAULT_MAX_GPADLS,
    FAILURE,
    ChannelClosed,
    ChannelState,
    Event,
    OfferSpec,
    OpenRequested,
    QuotaExceeded,
    Quotas,
    Reply,
    VmbusServer,
)
from vmbus.memory import (
    PAGE_SIZE,
    GuestMemory,
    MappingRefused,
    map_channel_rings,
    map_contiguous,
)
from vmbus.partition import Host, wait_until
from vmbus.testing.strategies import control_messages
from vsc.echo import EchoVsc
from vsp.echo import EchoVsp

V5_3 = m.VmbusVersion.WIN10_V5_3
FIRST_HANDLE = 0xE1E10
ECHO = OfferSpec(guid.KVP, UUID(int=1))
OFFERS = [OfferSpec(guid.KVP, UUID(int=i)) for i in range(1, 5)]  # relids 1..4


def send(server: VmbusServer, message: m.Message) -> list[Event]:
    return server.receive(m.encode(message))


def connected(memory_pages: int = 4096, **quotas: Any) -> VmbusServer:
    server = VmbusServer(list(OFFERS), memory_pages, **quotas)
    send(server, m.InitiateContact.for_version(V5_3))
    send(server, m.RequestOffers())
    return server


def grant(server: VmbusServer, handle: int, pfns: list[int] | range, relid: int = 1) -> list[Event]:
    events: list[Event] = []
    for message in m.gpadl_messages(relid, handle, len(pfns) * PAGE_SIZE, list(pfns)):
        events += send(server, message)
    return events


def created(handle: int, status: int = 0, relid: int = 1) -> Reply:
    return Reply(m.GpadlCreated(child_relid=relid, gpadl=handle, creation_status=status))


def teardown(server: VmbusServer, handle: int, relid: int = 1) -> list[Event]:
    return send(server, m.GpadlTeardown(child_relid=relid, gpadl=handle))


# --- GPADLs -------------------------------------------------------------------


def test_child_floods_gpadls_is_refused_at_its_quota() -> None:
    server = connected(max_gpadls=8)
    for handle in range(FIRST_HANDLE, FIRST_HANDLE + 8):
        assert grant(server, handle, [1, 2]) == [created(handle)]
    flood = range(FIRST_HANDLE + 8, FIRST_HANDLE + 1000)
    for handle in flood:
        assert grant(server, handle, [1, 2]) == [created(handle, FAILURE)]
    assert len(server.gpadls) == 8 and server.gpadls.pages == 16
    assert server.refusals == {"gpadls": len(flood)}
    assert server.protocol_errors == 0  # a quota is not a protocol error
    # Unfinished GPADLs count too: a header waiting for bodies holds a place.
    teardown(server, FIRST_HANDLE)
    unfinished = m.gpadl_messages(1, FIRST_HANDLE, 100 * PAGE_SIZE, range(100))[0]
    assert send(server, unfinished) == []  # its bodies would follow
    header = m.gpadl_messages(1, FIRST_HANDLE + 5000, PAGE_SIZE, [1])[0]
    assert send(server, header) == [created(FIRST_HANDLE + 5000, FAILURE)]
    # Freeing one makes room for one.
    teardown(server, FIRST_HANDLE + 1)
    assert grant(server, FIRST_HANDLE + 1, [3]) == [created(FIRST_HANDLE + 1)]


def test_child_grants_gpadls_too_large_in_total() -> None:
    server = connected(max_gpadl_pages=100)
    assert grant(server, FIRST_HANDLE, range(60)) == [created(FIRST_HANDLE)]
    # Refused at its header, before any body is held; the bodies are strays.
    assert grant(server, FIRST_HANDLE + 1, range(41)) == [created(FIRST_HANDLE + 1, FAILURE)]
    assert server.refusals == {"gpadl_pages": 1}
    assert server.assembler.pending_count == 0
    assert grant(server, FIRST_HANDLE + 2, range(40)) == [created(FIRST_HANDLE + 2)]
    assert server.gpadls.pages == 100
    teardown(server, FIRST_HANDLE)
    assert server.gpadls.pages == 40
    assert grant(server, FIRST_HANDLE + 1, range(41)) == [created(FIRST_HANDLE + 1)]


def test_quotas_pass_through_to_the_server_in_one_value() -> None:
    server = Quotas(max_gpadls=3, max_open_channels=1).server(list(OFFERS), 64)
    assert (server.max_gpadls, server.max_open_channels, server.max_gpadl_pages) == (3, 1, 1 << 16)
    assert server.assembler.max_pending == m.MAX_PENDING_GPADLS


def test_default_page_quota_follows_the_childs_memory() -> None:
    assert connected(memory_pages=256).max_gpadl_pages == 1 << 16
    assert connected(memory_pages=1 << 20).max_gpadl_pages == 2 << 20


def test_child_starts_many_gpadl_reassemblies() -> None:
    server = connected(max_pending_gpadls=4, max_pending_pfns=1000)
    headers = [
        m.gpadl_messages(1, FIRST_HANDLE + i, 100 * PAGE_SIZE, range(100))[0] for i in range(5)
    ]
    for header in headers[:4]:
        assert send(server, header) == []  # each waits for its bodies
    assert send(server, headers[4]) == [created(FIRST_HANDLE + 4, FAILURE)]
    assert server.refusals == {"pending_gpadls": 1}
    assert server.assembler.pending_count == 4 and server.assembler.pending_pfns == 400
    # One header may not announce more PFNs than all reassemblies may hold.
    send(server, m.GpadlTeardown(child_relid=1, gpadl=FIRST_HANDLE))  # drops one: 300 left
    [big, *_] = m.gpadl_messages(2, FIRST_HANDLE + 9, 701 * PAGE_SIZE, range(701))
    assert send(server, big) == [created(FIRST_HANDLE + 9, FAILURE, relid=2)]
    assert server.refusals == {"pending_gpadls": 1, "pending_pfns": 1}
    # The child's death (or UNLOAD) forgets them all.
    server.disconnect()
    assert server.assembler.pending_count == 0 and server.assembler.pending_pfns == 0


def test_child_dies_holding_gpadls_and_the_server_keeps_nothing() -> None:
    server = connected()
    for i in range(50):
        grant(server, FIRST_HANDLE + i, range(i, i + 30))
    send(server, m.gpadl_messages(1, FIRST_HANDLE + 99, 100 * PAGE_SIZE, range(100))[0])
    open_ring(server, 2, FIRST_HANDLE + 98)
    events = server.disconnect()
    assert len([e for e in events if isinstance(e, ChannelClosed)]) == 1
    assert len(server.gpadls) == 0 and server.gpadls.pages == 0
    assert server.gpadls.covering(0, PAGE_SIZE) is None
    assert server.assembler.pending_count == 0 and server.open_channels == 0


# --- channels and offers ----------------------------------------------------------


def open_ring(server: VmbusServer, relid: int, handle: int, ok: bool = True) -> list[Event]:
    assert grant(server, handle, range(8), relid) == [created(handle, relid=relid)]
    message = m.OpenChannel(
        child_relid=relid,
        openid=relid,
        ringbuffer_gpadlhandle=handle,
        downstream_ringbuffer_pageoffset=4,
    )
    events = send(server, message)
    if events and isinstance(events[0], OpenRequested):
        return server.open_done(relid, relid, ok)
    return events


def open_result(relid: int, status: int = 0) -> list[Event]:
    return [Reply(m.OpenChannelResult(child_relid=relid, openid=relid, status=status))]


def test_child_opens_more_channels_than_allowed() -> None:
    server = connected(max_open_channels=2)
    assert open_ring(server, 1, FIRST_HANDLE + 1) == open_result(1)
    assert open_ring(server, 2, FIRST_HANDLE + 2) == open_result(2)
    assert open_ring(server, 3, FIRST_HANDLE + 3) == open_result(3, FAILURE)
    assert server.refusals == {"open_channels": 1}
    assert server.channels[3].state is ChannelState.OFFERED
    assert server.open_channels == 2
    # A failed open (the I/O layer's refusal) and a close each give a place back.
    send(server, m.CloseChannel(child_relid=1))
    assert open_ring(server, 3, FIRST_HANDLE + 4, ok=False) == open_result(3, FAILURE)
    assert open_ring(server, 4, FIRST_HANDLE + 5) == open_result(4)
    server.rescind(4)
    assert server.open_channels == 1


def test_vsp_adds_more_sub_channels_than_allowed() -> None:
    server = connected(max_added_offers=3)
    for index in range(1, 4):
        server.add_offer(OfferSpec(guid.KVP, UUID(int=1), sub_channel_index=index))
    with pytest.raises(QuotaExceeded, match="3 offers"):
        server.add_offer(OfferSpec(guid.KVP, UUID(int=1), sub_channel_index=4))
    assert server.refusals == {"added_offers": 1}
    # A rescinded sub-channel, once released, gives its place back.
    added = max(server.channels)
    server.rescind(added)
    send(server, m.RelidReleased(child_relid=added))
    server.add_offer(OfferSpec(guid.KVP, UUID(int=1), sub_channel_index=4))
    assert server.added_offers == 3


# --- mappings -------------------------------------------------------------------


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory.create(1024 * PAGE_SIZE, name="quota-test") as mem:
        yield mem


def maps_lines() -> int:
    with open("/proc/self/maps") as maps:
        return sum(1 for _ in maps)


def test_child_scatters_ring_pages_one_per_mapping(memory: GuestMemory) -> None:
    scattered = list(range(0, 2 * 400, 2))  # 400 pages, none next to another
    before = maps_lines()
    with pytest.raises(MappingRefused, match="more than the 256 a region may have"):
        map_channel_rings(memory, scattered, 200)
    assert memory.mappings == 0 and memory.mapping_refusals == 1
    assert maps_lines() == before  # nothing was mapped, not even for a moment
    # The same pages in runs of two map, one mapping per run.
    paired = [pfn + k for pfn in range(0, 256, 4) for k in (0, 1)]
    with map_contiguous(memory, paired):
        assert memory.mappings == 64
        assert 64 <= maps_lines() - before <= 64 + 2  # +2: neighbours split
    assert memory.mappings == 0
    assert maps_lines() == before


def test_child_fills_its_quota_of_mappings(memory: GuestMemory) -> None:
    memory.max_mappings = 10
    rings = [map_channel_rings(memory, range(8 * i, 8 * i + 8), 4) for i in range(2)]
    assert memory.mappings == 8  # a mirrored ring is two runs
    with pytest.raises(MappingRefused, match="pass the child's 10"):
        map_channel_rings(memory, range(100, 108), 4)
    assert memory.mappings == 8 and memory.mapping_refusals == 1
    # A mapping counts until it is really gone: a view in use keeps it.
    view = rings[0][0].view()
    for region in (*rings[0], *rings[1]):
        region._close(detach=True)
    assert memory.mappings == 2
    view.release()
    assert memory.mappings == 0
    outbound, inbound = map_channel_rings(memory, range(100, 108), 4)
    outbound.close()
    inbound.close()


# --- the cost of one message --------------------------------------------------------


def vram_lookup_work(table: GpadlTable, gpa: int, length: int) -> tuple[Gpadl | None, int]:
    before = table.work
    found = table.covering(gpa, length)
    return found, table.work - before


def test_gpadl_lookup_cost_does_not_grow_with_gpadl_count() -> None:
    """A VRAM_LOCATION-style lookup visits one path of the page index: the
    same nodes with 10 GPADLs as with 10,000 (it walked every page of every
    GPADL, and took 1.8 s with 50,000)."""
    pages = 1 << 15
    few, many = (connected(pages, max_gpadls=20_000, max_gpadl_pages=1 << 20) for _ in "ab")
    for server, count in ((few, 10), (many, 10_000)):
        for i in range(count):
            [event] = grant(server, FIRST_HANDLE + i, range(3 * i, 3 * i + 2))
            assert event == created(FIRST_HANDLE + i)
    vram = 9 * PAGE_SIZE + 100  # inside the fourth GPADL of each
    costs = []
    memory = GuestMemory.create(pages * PAGE_SIZE, name="quota-test")  # never touched
    for server in (few, many):
        context = OpenContext(ECHO, memory, gpadls=server.gpadls)
        before = server.gpadls.work
        found = context.gpadl_covering(vram, PAGE_SIZE - 200)
        assert found is server.gpadls[FIRST_HANDLE + 3]
        costs.append(server.gpadls.work - before)
        # Across two GPADLs' pages (not contiguous in either): none covers it.
        assert context.gpadl_covering(10 * PAGE_SIZE, 2 * PAGE_SIZE) is None
    assert costs[0] == costs[1] <= math.log2(pages) + 1
    memory.close()
    # The worst case for the old walk: every GPADL grants the same pages.
    table = GpadlTable(pages)
    for i in range(10_000):
        table[i] = Gpadl(1, i, 2 * PAGE_SIZE, 0, (5, 6))
    assert vram_lookup_work(table, 5 * PAGE_SIZE, 2 * PAGE_SIZE)[1] <= math.log2(pages) + 1
    for i in range(9_999):  # and tearing them down keeps the last one found
        del table[i]
    assert vram_lookup_work(table, 5 * PAGE_SIZE, 2 * PAGE_SIZE)[0] is table[9_999]


# --- any sequence of messages ---------------------------------------------------------

QUOTAS = {
    "max_gpadls": 8,
    "max_gpadl_pages": 100,
    "max_pending_gpadls": 2,
    "max_pending_pfns": 70,
    "max_open_channels": 2,
}
SMALL_MEMORY = 64


def gpadl_messages() -> st.SearchStrategy[list[m.GpadlHeader | m.GpadlBody]]:
    @st.composite
    def build(draw: st.DrawFn) -> list[m.GpadlHeader | m.GpadlBody]:
        size = draw(st.integers(1, 3) | st.integers(1, 60))
        pfns = draw(st.lists(st.integers(0, SMALL_MEMORY - 1), min_size=size, max_size=size))
        if draw(st.integers(0, 9)) == 0:  # now and then a page the child does not have
            pfns[draw(st.integers(0, len(pfns) - 1))] = SMALL_MEMORY
        handle = FIRST_HANDLE + draw(st.integers(0, 12))
        relid = draw(st.integers(1, 5))
        messages = m.gpadl_messages(relid, handle, len(pfns) * PAGE_SIZE, pfns)
        keep = draw(st.integers(1, len(messages)))  # sometimes unfinished
        return messages[:keep]

    return build()


class QuotaMachine(RuleBasedStateMachine):
    """Whatever the child sends, the server holds within its quotas, and its
    page index agrees with a search of every GPADL."""

    def __init__(self) -> None:
        super().__init__()
        self.server = connected(SMALL_MEMORY, **QUOTAS)

    @rule(messages=gpadl_messages())
    def gpadls(self, messages: list[m.GpadlHeader | m.GpadlBody]) -> None:
        for message in messages:
            self.server.receive(m.encode(message))

    @rule(messages=gpadl_messages())
    def more_gpadls(self, messages: list[m.GpadlHeader | m.GpadlBody]) -> None:
        self.gpadls(messages)

    @rule(message=control_messages())
    def any_message(self, message: m.Message) -> None:
        self.server.receive(m.encode(message))

    @precondition(lambda self: self.server.version is None)
    @rule()
    def reconnect(self) -> None:
        """After an UNLOAD (or a refused version), the child connects again."""
        send(self.server, m.InitiateContact.for_version(V5_3))
        send(self.server, m.RequestOffers())

    @rule(handle=st.integers(0, 12), relid=st.integers(1, 5))
    def tear_down(self, handle: int, relid: int) -> None:
        teardown(self.server, FIRST_HANDLE + handle, relid)

    @precondition(lambda self: self.server.gpadls)
    @rule(data=st.data(), ok=st.booleans())
    def open(self, data: st.DataObject, ok: bool) -> None:
        gpadl = data.draw(
            st.sampled_from(sorted(self.server.gpadls.values(), key=lambda g: g.gpadl))
        )
        message = m.OpenChannel(
            child_relid=gpadl.child_relid,
            openid=7,
            ringbuffer_gpadlhandle=gpadl.gpadl,
            downstream_ringbuffer_pageoffset=data.draw(st.integers(0, len(gpadl.pfns))),
        )
        events = send(self.server, message)
        if events and isinstance(events[0], OpenRequested):
            self.server.open_done(gpadl.child_relid, 7, ok)

    @rule(relid=st.integers(1, 5))
    def rescind(self, relid: int) -> None:
        if relid in self.server.channels:
            self.server.rescind(relid)

    @invariant()
    def within_quotas(self) -> None:
        server, assembler = self.server, self.server.assembler
        assert len(server.gpadls) + assembler.pending_count <= QUOTAS["max_gpadls"]
        assert server.gpadls.pages + assembler.pending_pfns <= QUOTAS["max_gpadl_pages"]
        assert server.gpadls.pages == sum(len(g.pfns) for g in server.gpadls.values())
        assert assembler.pending_count <= QUOTAS["max_pending_gpadls"]
        assert assembler.pending_pfns <= QUOTAS["max_pending_pfns"]
        opened = [
            c
            for c in server.channels.values()
            if c.state in (ChannelState.OPEN, ChannelState.OPENING)
        ]
        assert server.open_channels == len(opened) <= QUOTAS["max_open_channels"]

    @invariant()
    def index_agrees_with_a_search(self) -> None:
        table = self.server.gpadls
        for first in range(0, SMALL_MEMORY, 5):
            for pages in (1, 2, 7):
                found = table.covering(first * PAGE_SIZE, pages * PAGE_SIZE)
                anywhere = [
                    g
                    for g in table.values()
                    if g.offset_of(first * PAGE_SIZE, pages * PAGE_SIZE) is not None
                ]
                assert (found is None) == (not anywhere)
                assert found is None or found in anywhere


QuotaMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestQuotas = QuotaMachine.TestCase


@given(
    ops=st.lists(
        st.tuples(st.integers(0, 15), st.lists(st.integers(0, 40), min_size=1, max_size=12)),
        max_size=60,
    ),
    probes=st.lists(st.tuples(st.integers(0, 45 * PAGE_SIZE), st.integers(1, 5 * PAGE_SIZE))),
)
def test_gpadl_index_agrees_with_a_search_of_every_gpadl(
    ops: list[tuple[int, list[int]]], probes: list[tuple[int, int]]
) -> None:
    """Adds, replaces and removes (a GPADL given twice is removed) in any
    order, pages granted any number of times: the index finds a covering
    GPADL exactly when one exists (GPADLs of whole pages)."""
    table = GpadlTable(41)
    for handle, pfns in ops:
        if handle in table and handle % 2:
            del table[handle]
        else:
            table[handle] = Gpadl(0, handle, len(pfns) * PAGE_SIZE, 0, pfns)
        for gpa, length in probes:
            found = table.covering(gpa, length)
            anywhere = [g for g in table.values() if g.offset_of(gpa, length) is not None]
            assert (found is None) == (not anywhere), (gpa, length)
            assert found is None or found in anywhere
    for handle in list(table):
        del table[handle]
    assert table.pages == 0 and table.covering(0, 1) is None


# --- a real child ----------------------------------------------------------------

BIG = 4096  # pages in one of the flood's large GPADLs: 16 of them fill the page quota


def flood_gpadls(guest: Guest) -> None:
    """Child: a ring scattered one page per run, then large GPADLs past the
    page quota, then small ones past the count quota; each is refused with
    the protocol's status. Then it dies holding all it could get."""
    device = next(iter(guest.devices.values()))
    scattered = guest.allocator.alloc(2 * 600)[::2]  # 600 pages, none next to another
    ring = guest.create_gpadl(device.relid, scattered)
    guest.post(
        m.OpenChannel(
            child_relid=device.relid,
            openid=device.relid,
            ringbuffer_gpadlhandle=ring,
            downstream_ringbuffer_pageoffset=300,
        )
    )
    result, _ = guest._wait((m.OpenChannelResult, device.relid), 10)
    assert isinstance(result, m.OpenChannelResult) and result.status == FAILURE
    guest.teardown_gpadl(device.relid, ring)
    pages = guest.allocator.alloc(BIG)
    big: list[int] = []
    with pytest.raises(GuestError, match="refused GPADL"):
        while len(big) < 100:  # the page quota stops it long before
            big.append(guest.create_gpadl(device.relid, pages))
    assert len(big) == DEFAULT_MAX_GPADL_PAGES // BIG
    for handle in big:
        guest.teardown_gpadl(device.relid, handle)
    refused = 0
    for _ in range(DEFAULT_MAX_GPADLS + 500):
        try:
            guest.create_gpadl(device.relid, pages[:1])
        except GuestError:
            refused += 1
    assert refused == 500


# How much a flooding child may add to its worker while it runs, and to the
# parent ever (the worker holds it all, and is gone after).
DURING = {"rss": 24 << 20, "fds": 8, "maps": 24, "threads": 1}
PARENT = {"rss": 8 << 20, "fds": 0, "maps": 4, "threads": 0}


def test_child_floods_gpadls_and_its_worker_stays_within_bounds() -> None:
    with Host() as host:
        warm = host.start(echo_once, devices=[EchoVsp()])  # imports, first-use caches
        assert warm.wait(60) == 0
        parent = resources()
        child = host.start(flood_gpadls, devices=[EchoVsp()])
        assert wait_until(lambda: child.state == "running" or child.wait(0) is not None, 30)
        baseline = resources(child.worker_pid)
        peak = dict(baseline)
        while child.wait(0.02) is None:
            with contextlib.suppress(FileNotFoundError, KeyError):
                for key, value in resources(child.worker_pid).items():
                    peak[key] = max(peak[key], value)
        # wait(0.02) may return before its supervisor thread is joined (a
        # loaded machine): the parent is measured once it is.
        assert child.wait(60) == 0, "the child's own checks failed"
        final = child.status()
        assert final["refusals"] == {"gpadl_pages": 1, "gpadls": 500}
        assert final["mapping_refusals"] == 1 and final["mappings"] == 0
        assert final["gpadls"] == 0 and final["gpadl_pages"] == 0
        within(peak, baseline, DURING)
    within(resources(), parent, PARENT)


def echo_once(guest: Guest) -> None:
    (driver,) = [EchoVsc(device) for device in guest.devices.values()]
    assert driver.echo(b"warm").startswith(b"warm")


def hold_gpadls(guest: Guest) -> None:
    """Child: grant 50 GPADLs and die holding them."""
    device = next(iter(guest.devices.values()))
    pages = guest.allocator.alloc(8)
    for _ in range(50):
        guest.create_gpadl(device.relid, pages)


def test_child_dies_holding_gpadls_and_the_worker_drops_them() -> None:
    with Host() as host:
        child = host.start(hold_gpadls, devices=[EchoVsp()])
        assert child.wait(60) == 0
        final = child.status()
        assert final["gpadls"] == 0 and final["gpadl_pages"] == 0
