"""VmbusServer, the host side of the VMBus control protocol (sans-I/O).

Scripted: the connection sequence of docs/protocol.md §3.7 message by message,
then one test per misbehaviour of the child, each checking the exact answer
(or that the message was dropped and counted) and that the server still
serves a valid request afterwards. Last, a Hypothesis state machine sends
valid and invalid messages against a model of the control protocol.
"""

from __future__ import annotations

import gc
import re
import struct
import tracemalloc
from dataclasses import dataclass, field
from uuid import UUID

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from vmbus import guid
from vmbus import messages as m
from vmbus.host import (
    FAILURE,
    ChannelClosed,
    ChannelState,
    Event,
    GpadlRemoved,
    OfferSpec,
    OpenRequested,
    Reply,
    VmbusServer,
)

V5_3 = m.VmbusVersion.WIN10_V5_3
MEMORY_PAGES = 256
FIRST_HANDLE = 0xE1E10  # where Linux starts its GPADL handles
RING_PAGES = 40  # a header page and 19 data pages per direction
RING_PFNS = tuple(range(100, 100 + RING_PAGES))
RING_OFFSET = RING_PAGES // 2

SCSI = OfferSpec(guid.SCSI, UUID("00000000-0000-0000-0000-00000000005c"))
NET = OfferSpec(guid.NETWORK, UUID("00000000-0000-0000-0000-0000000000e7"))
KVP = OfferSpec(guid.KVP, UUID("00000000-0000-0000-0000-00000000004b"), user_def=b"kvp")
OFFERS = (SCSI, NET, KVP)  # relids 1, 2, 3


# --- helpers ---------------------------------------------------------------


def send(server: VmbusServer, message: m.Message) -> list[Event]:
    return server.receive(m.encode(message))


def accepted() -> Reply:
    return Reply(m.VersionResponse(version_supported=1, msg_conn_id=m.MESSAGE_CONNECTION_ID))


def new_server(version: int | None = V5_3, request: bool = True) -> VmbusServer:
    """A server for OFFERS, connected at `version` (None: not connected) and
    with the offers requested unless told otherwise."""
    server = VmbusServer(list(OFFERS), memory_pages=MEMORY_PAGES)
    if version is not None:
        assert send(server, m.InitiateContact.for_version(version)) == [accepted()]
        if request:
            send(server, m.RequestOffers())
    assert server.protocol_errors == 0
    return server


def create_gpadl(
    server: VmbusServer, relid: int, handle: int, pfns: tuple[int, ...] = RING_PFNS
) -> list[Event]:
    """Send the GPADL_HEADER and GPADL_BODYs of `pfns`; the events of all."""
    events: list[Event] = []
    for message in m.gpadl_messages(relid, handle, len(pfns) * m.HV_PAGE_SIZE, pfns):
        events += send(server, message)
    return events


def created(relid: int, handle: int, status: int = 0) -> Reply:
    return Reply(m.GpadlCreated(child_relid=relid, gpadl=handle, creation_status=status))


def open_result(relid: int, openid: int, status: int = 0) -> Reply:
    return Reply(m.OpenChannelResult(child_relid=relid, openid=openid, status=status))


def open_message(
    relid: int, handle: int, offset: int = RING_OFFSET, openid: int = 0
) -> m.OpenChannel:
    return m.OpenChannel(
        child_relid=relid,
        openid=openid or relid,  # Linux sets openid = child_relid
        ringbuffer_gpadlhandle=handle,
        downstream_ringbuffer_pageoffset=offset,
        userdata=b"props",
    )


def ring_gpadl(relid: int, handle: int, pfns: tuple[int, ...] = RING_PFNS) -> m.Gpadl:
    return m.Gpadl(relid, handle, len(pfns) * m.HV_PAGE_SIZE, 0, pfns)


def open_channel(server: VmbusServer, relid: int, handle: int) -> None:
    """GPADL, OPENCHANNEL, open_done(ok): the channel ends up open."""
    assert create_gpadl(server, relid, handle) == [created(relid, handle)]
    events = send(server, open_message(relid, handle))
    assert [type(event) for event in events] == [OpenRequested]
    assert server.open_done(relid, relid, ok=True) == [open_result(relid, relid)]
    assert server.channels[relid].state is ChannelState.OPEN


def channel_state(server: VmbusServer, relid: int) -> ChannelState:
    return server.channels[relid].state


def offered_relids(events: list[Event]) -> list[int]:
    """The relids of the OFFERCHANNELs in `events`; checks ALLOFFERS_DELIVERED ends them."""
    assert events[-1] == Reply(m.AllOffersDelivered())
    relids = []
    for event in events[:-1]:
        assert isinstance(event, Reply) and isinstance(event.message, m.OfferChannel)
        relids.append(event.message.child_relid)
    return relids


def state_of(server: VmbusServer) -> tuple[object, ...]:
    """Everything the child can change, to check that a dropped message did not."""
    channels = {r: (c.state, c.ring_gpadl, c.offer) for r, c in server.channels.items()}
    return server.version, server.offers_requested, channels, dict(server.gpadls)


def assert_dropped(server: VmbusServer, payload: bytes) -> None:
    """`payload` gets no answer, changes nothing and counts one protocol error."""
    before = state_of(server)
    errors = server.protocol_errors
    pending = server.assembler.pending
    assert server.receive(payload) == []
    assert server.protocol_errors == errors + 1
    assert state_of(server) == before
    assert server.assembler.pending == pending


def assert_serves(server: VmbusServer) -> None:
    """The server still answers a full valid exchange correctly."""
    errors = server.protocol_errors
    if server.version is None:
        assert send(server, m.InitiateContact.for_version(V5_3)) == [accepted()]
        assert send(server, m.RequestOffers())[-1] == Reply(m.AllOffersDelivered())
    relid = next(r for r, c in server.channels.items() if c.state is ChannelState.OFFERED)
    handle = max([*server.gpadls, *server.assembler.pending, FIRST_HANDLE]) + 1
    assert create_gpadl(server, relid, handle) == [created(relid, handle)]
    offer = server.channels[relid].offer
    events = send(server, open_message(relid, handle, openid=7))
    assert events == [
        OpenRequested(
            relid, 7, offer, ring_gpadl(relid, handle), RING_OFFSET, b"props".ljust(120, b"\0")
        )
    ]
    assert server.open_done(relid, 7, ok=True) == [open_result(relid, 7)]
    assert send(server, m.CloseChannel(child_relid=relid)) == [ChannelClosed(relid)]
    assert send(server, m.GpadlTeardown(child_relid=relid, gpadl=handle)) == [
        GpadlRemoved(ring_gpadl(relid, handle)),
        Reply(m.GpadlTorndown(gpadl=handle)),
    ]
    assert server.protocol_errors == errors


# --- the happy path, scripted ------------------------------------------------


def test_version_negotiation_accepts_5_3() -> None:
    server = VmbusServer(list(OFFERS), memory_pages=MEMORY_PAGES)
    events = send(server, m.InitiateContact.for_version(V5_3))
    assert events == [accepted()]
    assert server.version == V5_3
    assert server.protocol_errors == 0


@pytest.mark.parametrize(
    "refused", [m.VmbusVersion.WIN10_V6_0, m.VmbusVersion.WIN7, m.VmbusVersion.WS2008, 0x00050004]
)
def test_unsupported_version_refused_then_lower_accepted(refused: int) -> None:
    server = VmbusServer(list(OFFERS), memory_pages=MEMORY_PAGES)
    [reply] = send(server, m.InitiateContact.for_version(refused))
    assert isinstance(reply, Reply) and isinstance(reply.message, m.VersionResponse)
    assert reply.message.version_supported == 0
    assert server.version is None
    # Like Linux, the child retries with a lower version.
    assert send(server, m.InitiateContact.for_version(m.VmbusVersion.WIN10_V5_2)) == [accepted()]
    assert server.version == m.VmbusVersion.WIN10_V5_2
    assert server.protocol_errors == 0


@pytest.mark.parametrize("version", m.HOST_SUPPORTED_VERSIONS)
def test_every_supported_version_accepted(version: int) -> None:
    server = VmbusServer([], memory_pages=MEMORY_PAGES)
    assert send(server, m.InitiateContact.for_version(version)) == [accepted()]
    assert server.version == version


def test_request_offers_sends_one_offer_per_spec_then_all_delivered() -> None:
    server = new_server(request=False)
    events = send(server, m.RequestOffers())
    assert len(events) == len(OFFERS) + 1
    assert all(isinstance(event, Reply) for event in events)
    offers = [event.message for event in events[:-1] if isinstance(event, Reply)]
    assert events[-1] == Reply(m.AllOffersDelivered())
    assert [type(offer) for offer in offers] == [m.OfferChannel] * len(OFFERS)
    assert [(o.if_type, o.if_instance) for o in offers if isinstance(o, m.OfferChannel)] == [
        (spec.class_id, spec.instance_id) for spec in OFFERS
    ]
    relids = [o.child_relid for o in offers if isinstance(o, m.OfferChannel)]
    assert relids == [1, 2, 3]
    assert all(o.sub_channel_index == 0 for o in offers if isinstance(o, m.OfferChannel))
    kvp = offers[2]
    assert isinstance(kvp, m.OfferChannel)
    assert kvp.user_def == b"kvp".ljust(m.USER_DEFINED_BYTES, b"\0")
    assert kvp.connection_id == 3
    assert server.offers_requested
    assert set(server.channels) == {1, 2, 3}


def test_gpadl_of_40_pages_header_and_body_created_once() -> None:
    server = new_server()
    messages = m.gpadl_messages(1, FIRST_HANDLE, RING_PAGES * m.HV_PAGE_SIZE, RING_PFNS)
    assert [type(message) for message in messages] == [m.GpadlHeader, m.GpadlBody]
    assert send(server, messages[0]) == []  # waits for the body
    assert server.assembler.pending == {FIRST_HANDLE}
    assert send(server, messages[1]) == [created(1, FIRST_HANDLE)]
    assert server.gpadls == {FIRST_HANDLE: ring_gpadl(1, FIRST_HANDLE)}
    assert server.assembler.pending == frozenset()


def test_open_requested_with_the_rings_pfns_and_offset_then_result() -> None:
    server = new_server()
    assert create_gpadl(server, 2, FIRST_HANDLE) == [created(2, FIRST_HANDLE)]
    events = send(server, open_message(2, FIRST_HANDLE, offset=8, openid=0x1234))
    assert len(events) == 1
    [request] = events
    assert isinstance(request, OpenRequested)
    assert request.relid == 2
    assert request.openid == 0x1234
    assert request.offer == NET
    assert request.gpadl.pfns == RING_PFNS
    assert request.gpadl.gpadl == FIRST_HANDLE
    assert request.inbound_page_offset == 8
    assert request.userdata == b"props".ljust(m.USER_DEFINED_BYTES, b"\0")
    assert channel_state(server, 2) is ChannelState.OPENING
    assert server.open_done(2, 0x1234, ok=True) == [open_result(2, 0x1234)]
    assert channel_state(server, 2) is ChannelState.OPEN
    assert server.channels[2].ring_gpadl == FIRST_HANDLE


def test_open_refused_by_io_layer_fails_and_can_be_retried() -> None:
    server = new_server()
    assert create_gpadl(server, 1, FIRST_HANDLE) == [created(1, FIRST_HANDLE)]
    assert len(send(server, open_message(1, FIRST_HANDLE))) == 1
    assert server.open_done(1, 1, ok=False) == [open_result(1, 1, FAILURE)]
    assert server.channels[1].state is ChannelState.OFFERED
    assert server.channels[1].ring_gpadl is None
    assert len(send(server, open_message(1, FIRST_HANDLE))) == 1
    assert server.open_done(1, 1, ok=True) == [open_result(1, 1)]


def test_close_then_teardown() -> None:
    server = new_server()
    open_channel(server, 1, FIRST_HANDLE)
    assert send(server, m.CloseChannel(child_relid=1)) == [ChannelClosed(1)]
    assert server.channels[1].state is ChannelState.OFFERED
    assert server.gpadls.keys() == {FIRST_HANDLE}  # the ring stays until torn down
    events = send(server, m.GpadlTeardown(child_relid=1, gpadl=FIRST_HANDLE))
    assert events == [
        GpadlRemoved(ring_gpadl(1, FIRST_HANDLE)),
        Reply(m.GpadlTorndown(gpadl=FIRST_HANDLE)),
    ]
    assert server.gpadls == {}
    assert server.protocol_errors == 0
    assert_serves(server)


def test_rescind_then_relid_released_frees_the_relid() -> None:
    server = new_server()
    open_channel(server, 3, FIRST_HANDLE)
    assert server.rescind(3) == [ChannelClosed(3), Reply(m.RescindChannelOffer(child_relid=3))]
    assert server.channels[3].state is ChannelState.RESCINDED
    # A rescinded channel is not offered again, and its relid is not reused yet.
    assert offered_relids(send(server, m.RequestOffers())) == [1, 2]
    assert server.add_offer(SCSI)[0] == Reply(
        m.OfferChannel(
            if_type=SCSI.class_id, if_instance=SCSI.instance_id, child_relid=4, connection_id=4
        )
    )
    # The child tears the ring down and releases the relid.
    events = send(server, m.GpadlTeardown(child_relid=3, gpadl=FIRST_HANDLE))
    assert events == [
        GpadlRemoved(ring_gpadl(3, FIRST_HANDLE)),
        Reply(m.GpadlTorndown(gpadl=FIRST_HANDLE)),
    ]
    assert send(server, m.RelidReleased(child_relid=3)) == []
    assert 3 not in server.channels
    assert server.protocol_errors == 0


def test_released_relid_is_reused_by_the_next_offer() -> None:
    server = new_server()
    server.rescind(3)
    send(server, m.RelidReleased(child_relid=3))
    [offer] = server.add_offer(KVP)
    assert isinstance(offer, Reply) and isinstance(offer.message, m.OfferChannel)
    assert offer.message.child_relid == 3
    assert server.channels[3].state is ChannelState.OFFERED


def test_gpadls_survive_rescind_and_are_torn_down_after_release() -> None:
    """vmbus.guest releases the relid first and tears the ring down after."""
    server = new_server()
    open_channel(server, 2, FIRST_HANDLE)
    server.rescind(2)
    assert send(server, m.RelidReleased(child_relid=2)) == []
    events = send(server, m.GpadlTeardown(child_relid=2, gpadl=FIRST_HANDLE))
    assert events[-1] == Reply(m.GpadlTorndown(gpadl=FIRST_HANDLE))
    assert server.protocol_errors == 0


def test_unload_closes_channels_removes_gpadls_then_responds() -> None:
    server = new_server()
    open_channel(server, 1, FIRST_HANDLE)
    other = tuple(range(10, 14))
    assert create_gpadl(server, 2, FIRST_HANDLE + 1, other) == [created(2, FIRST_HANDLE + 1)]
    events = send(server, m.Unload())
    assert events == [
        ChannelClosed(1),
        GpadlRemoved(ring_gpadl(1, FIRST_HANDLE)),
        GpadlRemoved(ring_gpadl(2, FIRST_HANDLE + 1, other)),
        Reply(m.UnloadResponse()),
    ]
    assert server.gpadls == {}
    assert all(c.state is ChannelState.OFFERED for c in server.channels.values())
    assert server.version is None
    assert not server.offers_requested
    # The next child connects afresh and is offered the same channels.
    assert_serves(server)


def test_unload_forgets_unfinished_gpadls() -> None:
    server = new_server()
    header = m.gpadl_messages(1, FIRST_HANDLE, RING_PAGES * m.HV_PAGE_SIZE, RING_PFNS)
    send(server, header[0])
    assert server.assembler.pending == {FIRST_HANDLE}
    send(server, m.Unload())
    assert server.assembler.pending == frozenset()


def test_unload_forgets_rescinded_channels() -> None:
    """After UNLOAD no child will ever release a rescinded relid."""
    server = new_server()
    server.rescind(2)
    send(server, m.Unload())
    assert set(server.channels) == {1, 3}
    assert_serves(server)


def test_modify_channel_answered_only_from_5_3() -> None:
    server = new_server()
    events = send(server, m.ModifyChannel(child_relid=2, target_vp=3))
    assert events == [Reply(m.ModifyChannelResponse(child_relid=2, status=0))]
    older = new_server(version=m.VmbusVersion.WIN10_V5_2)
    assert send(older, m.ModifyChannel(child_relid=2, target_vp=3)) == []
    assert older.protocol_errors == 0
    assert_serves(older)


def test_sub_channel_offer_after_request_is_sent_at_once() -> None:
    server = new_server()
    sub = OfferSpec(NET.class_id, NET.instance_id, sub_channel_index=1)
    events = server.add_offer(sub)
    assert events == [
        Reply(
            m.OfferChannel(
                if_type=NET.class_id,
                if_instance=NET.instance_id,
                sub_channel_index=1,
                child_relid=4,
                connection_id=4,
            )
        )
    ]
    assert server.channels[4].offer == sub
    assert_serves(server)


def test_offer_added_before_request_waits_for_request_offers() -> None:
    server = new_server(request=False)
    sub = OfferSpec(NET.class_id, NET.instance_id, sub_channel_index=1)
    assert server.add_offer(sub) == []
    events = send(server, m.RequestOffers())
    offers = [e.message for e in events if isinstance(e, Reply)]
    assert [o.sub_channel_index for o in offers if isinstance(o, m.OfferChannel)] == [0, 0, 0, 1]


def test_rescind_before_offers_requested_sends_nothing() -> None:
    """The child never saw the offer, so it cannot release the relid."""
    server = new_server(request=False)
    assert server.rescind(2) == []
    assert 2 not in server.channels
    assert offered_relids(send(server, m.RequestOffers())) == [1, 3]


def test_longer_message_of_a_newer_version_accepted() -> None:
    """OPENCHANNEL with the 8 bytes MI appends is read as the 148-byte struct."""
    server = new_server()
    create_gpadl(server, 1, FIRST_HANDLE)
    payload = m.encode(open_message(1, FIRST_HANDLE)) + bytes(8)
    assert [type(event) for event in server.receive(payload)] == [OpenRequested]
    assert server.protocol_errors == 0


# --- the child misbehaves ------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        m.RequestOffers(),
        m.ModifyChannel(child_relid=1),
        m.OpenChannel(child_relid=1),
        m.Unload(),
        m.RelidReleased(child_relid=1),
    ],
    ids=lambda message: type(message).__name__,
)
def test_child_sends_message_before_version_negotiation(message: m.Message) -> None:
    server = new_server(version=None)
    assert_dropped(server, m.encode(message))
    assert server.version is None
    assert_serves(server)


def test_child_sends_gpadl_before_version_negotiation() -> None:
    server = new_server(version=None)
    for message in m.gpadl_messages(1, FIRST_HANDLE, 4096, [5]):
        assert_dropped(server, m.encode(message))
    assert server.gpadls == {}
    assert_serves(server)


def test_child_sends_malformed_gpadl_header_before_version_negotiation() -> None:
    """No GPADL_CREATED to a child that has not connected."""
    server = new_server(version=None)
    header = m.GpadlHeader(child_relid=1, gpadl=FIRST_HANDLE, range_buflen=16, rangecount=2)
    assert_dropped(server, header.pack())
    assert_serves(server)


def test_child_sends_initiate_contact_while_connected() -> None:
    server = new_server()
    assert_dropped(server, m.encode(m.InitiateContact.for_version(V5_3)))
    assert server.version == V5_3
    assert_serves(server)


@pytest.mark.parametrize(
    "message",
    [
        m.OfferChannel(if_type=guid.SCSI, child_relid=9),
        m.RescindChannelOffer(child_relid=1),
        m.AllOffersDelivered(),
        m.OpenChannelResult(child_relid=1),
        m.GpadlCreated(child_relid=1, gpadl=FIRST_HANDLE),
        m.GpadlTorndown(gpadl=FIRST_HANDLE),
        m.VersionResponse(version_supported=1),
        m.UnloadResponse(),
        m.ModifyChannelResponse(child_relid=1),
    ],
    ids=lambda message: type(message).__name__,
)
def test_child_sends_host_to_guest_message(message: m.Message) -> None:
    server = new_server()
    assert_dropped(server, m.encode(message))
    assert 9 not in server.channels
    assert_serves(server)


@pytest.mark.parametrize("msgtype", [0, 18, 19, 20, 21, 23, 25, 26, 27, 0xFFFFFFFF])
def test_child_sends_unknown_message_type(msgtype: int) -> None:
    server = new_server()
    assert_dropped(server, struct.pack("<II", msgtype, 0) + bytes(32))
    assert_serves(server)


@pytest.mark.parametrize(
    "message",
    [
        m.InitiateContact.for_version(V5_3),
        m.OpenChannel(child_relid=1),
        m.CloseChannel(child_relid=1),
        m.GpadlHeader(child_relid=1, gpadl=1, range_buflen=16, byte_count=4096, pfns=(1,)),
        m.GpadlTeardown(child_relid=1, gpadl=1),
        m.ModifyChannel(child_relid=1),
    ],
    ids=lambda message: type(message).__name__,
)
@pytest.mark.parametrize("cut", ["empty", "half_header", "header_less_one", "struct_less_one"])
def test_child_sends_short_message(message: m.Message, cut: str) -> None:
    server = new_server(version=None if isinstance(message, m.InitiateContact) else V5_3)
    payload = m.encode(message)
    size = {"empty": 0, "half_header": 4, "header_less_one": 7}.get(cut, len(payload) - 1)
    payload = payload[:size]
    assert_dropped(server, payload)
    assert_serves(server)


def test_child_sends_gpadl_header_with_partial_pfn() -> None:
    server = new_server()
    header = m.GpadlHeader(child_relid=1, gpadl=FIRST_HANDLE, range_buflen=16, byte_count=4096)
    assert_dropped(server, header.pack() + bytes(5))
    assert_serves(server)


@pytest.mark.parametrize("size", [m.MAX_MESSAGE_PAYLOAD + 1, 256, 4096])
def test_child_sends_oversized_message(size: int) -> None:
    server = new_server()
    payload = m.encode(m.CloseChannel(child_relid=1))
    assert_dropped(server, payload.ljust(size, b"\0"))
    body = m.GpadlBody(gpadl=FIRST_HANDLE, pfns=tuple(range(29)))  # one PFN over the limit
    assert_dropped(server, body.pack())
    assert_serves(server)


def test_child_grants_pfn_beyond_its_memory() -> None:
    server = new_server()
    pfns = (*RING_PFNS[:-1], MEMORY_PAGES)  # the last one is past the end
    assert create_gpadl(server, 1, FIRST_HANDLE, pfns) == [created(1, FIRST_HANDLE, FAILURE)]
    assert server.gpadls == {}
    assert server.assembler.pending == frozenset()
    assert server.protocol_errors == 1
    huge = (2**64 - 1,)
    assert create_gpadl(server, 1, FIRST_HANDLE, huge) == [created(1, FIRST_HANDLE, FAILURE)]
    assert server.protocol_errors == 2
    # The refused handle may be used again, correctly this time.
    assert create_gpadl(server, 1, FIRST_HANDLE) == [created(1, FIRST_HANDLE)]
    assert_serves(server)


def test_child_reuses_gpadl_handle() -> None:
    server = new_server()
    assert create_gpadl(server, 1, FIRST_HANDLE) == [created(1, FIRST_HANDLE)]
    original = server.gpadls[FIRST_HANDLE]
    other = (1, 2, 3, 4)
    events = create_gpadl(server, 2, FIRST_HANDLE, other)
    assert events == [created(2, FIRST_HANDLE, FAILURE)]
    assert server.gpadls == {FIRST_HANDLE: original}
    assert server.protocol_errors == 1
    # A reused handle is refused at its header; its body then belongs to nothing.
    header, body = m.gpadl_messages(2, FIRST_HANDLE, RING_PAGES * m.HV_PAGE_SIZE, RING_PFNS)
    assert send(server, header) == [created(2, FIRST_HANDLE, FAILURE)]
    assert_dropped(server, m.encode(body))
    assert server.gpadls == {FIRST_HANDLE: original}
    # The first GPADL is intact and still opens its channel.
    assert len(send(server, open_message(1, FIRST_HANDLE))) == 1
    assert server.open_done(1, 1, ok=True) == [open_result(1, 1)]
    assert_serves(server)


def test_child_sends_second_header_while_first_in_progress() -> None:
    server = new_server()
    first = m.gpadl_messages(1, FIRST_HANDLE, RING_PAGES * m.HV_PAGE_SIZE, RING_PFNS)
    send(server, first[0])
    assert send(server, first[0]) == [created(1, FIRST_HANDLE, FAILURE)]
    assert server.assembler.pending == frozenset()
    assert_dropped(server, m.encode(first[1]))  # its body now belongs to nothing
    assert server.gpadls == {}
    assert_serves(server)


def test_child_sends_gpadl_for_unknown_relid() -> None:
    server = new_server()
    events = create_gpadl(server, 77, FIRST_HANDLE, (1, 2))
    assert events == [created(77, FIRST_HANDLE, FAILURE)]
    assert server.gpadls == {}
    assert server.assembler.pending == frozenset()
    assert server.protocol_errors == 1
    assert_serves(server)


def test_child_sends_gpadl_for_rescinded_relid() -> None:
    server = new_server()
    server.rescind(1)
    assert create_gpadl(server, 1, FIRST_HANDLE, (1, 2)) == [created(1, FIRST_HANDLE, FAILURE)]
    assert server.gpadls == {}
    assert_serves(server)


def test_child_sends_inconsistent_gpadl_header() -> None:
    server = new_server()
    # range_buflen says two pages, byte_count says one
    header = m.GpadlHeader(
        child_relid=1, gpadl=FIRST_HANDLE, range_buflen=24, byte_count=4096, pfns=(1, 2)
    )
    assert server.receive(header.pack()) == [created(1, FIRST_HANDLE, FAILURE)]
    assert server.protocol_errors == 1
    assert server.gpadls == {}
    assert_serves(server)


def test_child_sends_gpadl_body_without_header() -> None:
    server = new_server()
    assert_dropped(server, m.encode(m.GpadlBody(gpadl=FIRST_HANDLE, pfns=(1, 2, 3))))
    assert server.gpadls == {}
    assert_serves(server)


def test_child_sends_gpadl_body_with_too_many_pfns() -> None:
    server = new_server()
    header, body = m.gpadl_messages(1, FIRST_HANDLE, RING_PAGES * m.HV_PAGE_SIZE, RING_PFNS)
    send(server, header)
    longer = m.GpadlBody(gpadl=FIRST_HANDLE, pfns=(*body.pfns, 7))
    assert send(server, longer) == [created(1, FIRST_HANDLE, FAILURE)]
    assert server.assembler.pending == frozenset()
    assert server.gpadls == {}
    assert_serves(server)


def test_child_opens_unknown_relid() -> None:
    server = new_server()
    create_gpadl(server, 1, FIRST_HANDLE)
    before = state_of(server)
    events = send(server, open_message(42, FIRST_HANDLE, openid=9))
    assert events == [open_result(42, 9, FAILURE)]
    assert server.protocol_errors == 1
    assert state_of(server) == before
    assert_serves(server)


def test_child_opens_rescinded_relid() -> None:
    server = new_server()
    create_gpadl(server, 1, FIRST_HANDLE)
    server.rescind(1)
    assert send(server, open_message(1, FIRST_HANDLE)) == [open_result(1, 1, FAILURE)]
    assert server.channels[1].state is ChannelState.RESCINDED
    assert_serves(server)


def test_child_opens_channel_twice() -> None:
    server = new_server()
    open_channel(server, 1, FIRST_HANDLE)
    create_gpadl(server, 1, FIRST_HANDLE + 1)
    events = send(server, open_message(1, FIRST_HANDLE + 1, openid=5))
    assert events == [open_result(1, 5, FAILURE)]
    assert server.channels[1].state is ChannelState.OPEN
    assert server.channels[1].ring_gpadl == FIRST_HANDLE  # the first ring stays
    assert server.protocol_errors == 1
    assert_serves(server)


def test_child_opens_channel_while_it_is_opening() -> None:
    server = new_server()
    create_gpadl(server, 1, FIRST_HANDLE)
    assert len(send(server, open_message(1, FIRST_HANDLE))) == 1
    assert send(server, open_message(1, FIRST_HANDLE, openid=6)) == [open_result(1, 6, FAILURE)]
    assert server.channels[1].state is ChannelState.OPENING
    assert server.open_done(1, 1, ok=True) == [open_result(1, 1)]
    assert_serves(server)


@pytest.mark.parametrize(
    ("pages", "offset"),
    [(40, 39), (40, 40), (40, 1), (40, 0), (3, 2), (1, 1), (4, 3), (40, 0xFFFFFFFF)],
)
def test_child_ring_gpadl_too_small_for_offset(pages: int, offset: int) -> None:
    server = new_server()
    pfns = tuple(range(pages))
    assert create_gpadl(server, 1, FIRST_HANDLE, pfns) == [created(1, FIRST_HANDLE)]
    events = send(server, open_message(1, FIRST_HANDLE, offset=offset))
    assert events == [open_result(1, 1, FAILURE)]
    assert server.channels[1].state is ChannelState.OFFERED
    assert server.channels[1].ring_gpadl is None
    assert server.protocol_errors == 1
    assert_serves(server)


@pytest.mark.parametrize(("pages", "offset"), [(4, 2), (40, 2), (40, 38)])
def test_ring_split_at_the_limits_accepted(pages: int, offset: int) -> None:
    server = new_server()
    pfns = tuple(range(pages))
    create_gpadl(server, 1, FIRST_HANDLE, pfns)
    [request] = send(server, open_message(1, FIRST_HANDLE, offset=offset))
    assert isinstance(request, OpenRequested)
    assert request.inbound_page_offset == offset


def test_child_opens_with_gpadl_not_starting_at_a_page() -> None:
    server = new_server()
    pfns = tuple(range(10, 15))
    for message in m.gpadl_messages(1, FIRST_HANDLE, 4 * 4096, pfns, byte_offset=16):
        events = send(server, message)
    assert events == [created(1, FIRST_HANDLE)]
    # Five pages would split at page 2, were the rings not 16 bytes off the pages.
    assert send(server, open_message(1, FIRST_HANDLE, offset=2)) == [open_result(1, 1, FAILURE)]
    assert_serves(server)


def test_child_opens_with_gpadl_of_another_channel() -> None:
    server = new_server()
    assert create_gpadl(server, 2, FIRST_HANDLE) == [created(2, FIRST_HANDLE)]
    assert send(server, open_message(1, FIRST_HANDLE)) == [open_result(1, 1, FAILURE)]
    assert server.channels[1].state is ChannelState.OFFERED
    assert server.protocol_errors == 1
    assert_serves(server)


def test_child_opens_with_unknown_gpadl() -> None:
    server = new_server()
    assert send(server, open_message(1, 0xBAD)) == [open_result(1, 1, FAILURE)]
    assert_serves(server)


def test_child_opens_with_gpadl_it_tore_down() -> None:
    server = new_server()
    create_gpadl(server, 1, FIRST_HANDLE)
    assert send(server, m.GpadlTeardown(child_relid=1, gpadl=FIRST_HANDLE))[-1] == Reply(
        m.GpadlTorndown(gpadl=FIRST_HANDLE)
    )
    assert send(server, open_message(1, FIRST_HANDLE)) == [open_result(1, 1, FAILURE)]
    assert_serves(server)


def test_child_closes_channel_not_open() -> None:
    server = new_server()
    assert_dropped(server, m.encode(m.CloseChannel(child_relid=1)))  # offered, never opened
    assert_dropped(server, m.encode(m.CloseChannel(child_relid=99)))  # no such channel
    assert_serves(server)


def test_child_closes_channel_twice() -> None:
    server = new_server()
    open_channel(server, 1, FIRST_HANDLE)
    assert send(server, m.CloseChannel(child_relid=1)) == [ChannelClosed(1)]
    assert_dropped(server, m.encode(m.CloseChannel(child_relid=1)))
    assert_serves(server)


def test_child_tears_down_ring_of_open_channel() -> None:
    """The host stops the channel before the ring memory goes."""
    server = new_server()
    open_channel(server, 1, FIRST_HANDLE)
    events = send(server, m.GpadlTeardown(child_relid=1, gpadl=FIRST_HANDLE))
    assert events == [
        ChannelClosed(1),
        GpadlRemoved(ring_gpadl(1, FIRST_HANDLE)),
        Reply(m.GpadlTorndown(gpadl=FIRST_HANDLE)),
    ]
    assert server.channels[1].state is ChannelState.OFFERED
    assert server.channels[1].ring_gpadl is None
    assert_dropped(server, m.encode(m.CloseChannel(child_relid=1)))  # already closed
    assert_serves(server)


def test_child_tears_down_gpadl_of_wrong_relid() -> None:
    server = new_server()
    create_gpadl(server, 1, FIRST_HANDLE)
    assert_dropped(server, m.encode(m.GpadlTeardown(child_relid=2, gpadl=FIRST_HANDLE)))
    assert_dropped(server, m.encode(m.GpadlTeardown(child_relid=1, gpadl=FIRST_HANDLE + 1)))
    assert FIRST_HANDLE in server.gpadls
    assert_serves(server)


def test_child_tears_down_gpadl_in_progress() -> None:
    """Dropped without an answer; the unfinished GPADL is forgotten."""
    server = new_server()
    header = m.gpadl_messages(1, FIRST_HANDLE, RING_PAGES * m.HV_PAGE_SIZE, RING_PFNS)[0]
    send(server, header)
    assert server.receive(m.encode(m.GpadlTeardown(child_relid=1, gpadl=FIRST_HANDLE))) == []
    assert server.protocol_errors == 1
    assert server.assembler.pending == frozenset()
    assert_serves(server)


def test_child_releases_relid_not_rescinded() -> None:
    server = new_server()
    assert_dropped(server, m.encode(m.RelidReleased(child_relid=1)))
    assert_dropped(server, m.encode(m.RelidReleased(child_relid=55)))
    assert 1 in server.channels
    assert_serves(server)


def test_child_releases_relid_twice() -> None:
    server = new_server()
    server.rescind(1)
    assert send(server, m.RelidReleased(child_relid=1)) == []
    assert_dropped(server, m.encode(m.RelidReleased(child_relid=1)))
    assert_serves(server)


def test_child_modifies_unknown_channel() -> None:
    server = new_server()
    assert_dropped(server, m.encode(m.ModifyChannel(child_relid=99, target_vp=1)))
    assert_serves(server)


# --- the channel goes away while the I/O layer opens it ------------------------


def opening(server: VmbusServer, relid: int = 1) -> None:
    create_gpadl(server, relid, FIRST_HANDLE)
    assert len(send(server, open_message(relid, FIRST_HANDLE))) == 1
    assert server.channels[relid].state is ChannelState.OPENING


@pytest.mark.parametrize("ok", [True, False])
def test_child_closes_channel_while_io_layer_opens_it(ok: bool) -> None:
    server = new_server()
    opening(server)
    assert send(server, m.CloseChannel(child_relid=1)) == [ChannelClosed(1)]
    # The late answer must not bring the closed channel back.
    assert server.open_done(1, 1, ok=ok) == []
    assert server.channels[1].state is ChannelState.OFFERED
    assert server.channels[1].ring_gpadl is None
    assert_serves(server)


@pytest.mark.parametrize("ok", [True, False])
def test_child_tears_down_ring_while_io_layer_opens_it(ok: bool) -> None:
    server = new_server()
    opening(server)
    events = send(server, m.GpadlTeardown(child_relid=1, gpadl=FIRST_HANDLE))
    assert events[0] == ChannelClosed(1)
    assert server.open_done(1, 1, ok=ok) == []
    assert server.channels[1].state is ChannelState.OFFERED
    assert server.channels[1].ring_gpadl is None  # no open channel on a freed ring
    assert_serves(server)


@pytest.mark.parametrize("ok", [True, False])
def test_host_rescinds_channel_while_io_layer_opens_it(ok: bool) -> None:
    server = new_server()
    opening(server)
    assert server.rescind(1) == [ChannelClosed(1), Reply(m.RescindChannelOffer(child_relid=1))]
    assert server.open_done(1, 1, ok=ok) == []
    assert server.channels[1].state is ChannelState.RESCINDED
    assert send(server, m.RelidReleased(child_relid=1)) == []  # still releasable
    assert 1 not in server.channels
    assert server.open_done(1, 1, ok=ok) == []  # and a later answer is harmless
    assert server.protocol_errors == 0
    assert_serves(server)


@pytest.mark.parametrize("ok", [True, False])
def test_child_unloads_while_io_layer_opens_it(ok: bool) -> None:
    server = new_server()
    opening(server)
    events = send(server, m.Unload())
    assert events[0] == ChannelClosed(1)
    assert events[-1] == Reply(m.UnloadResponse())
    assert server.open_done(1, 1, ok=ok) == []  # nothing goes to a disconnected child
    assert server.channels[1].state is ChannelState.OFFERED
    assert_serves(server)


# --- the state machine -------------------------------------------------------------

GUEST_TO_HOST = (
    m.InitiateContact,
    m.RequestOffers,
    m.GpadlHeader,
    m.GpadlBody,
    m.OpenChannel,
    m.CloseChannel,
    m.GpadlTeardown,
    m.RelidReleased,
    m.Unload,
    m.ModifyChannel,
)


@dataclass
class ModelChannel:
    offer: OfferSpec
    state: ChannelState = ChannelState.OFFERED
    ring: int | None = None


@dataclass
class ModelPending:
    relid: int
    total: int
    byte_count: int
    byte_offset: int
    pfns: list[int]


@dataclass
class Model:
    """What the server must answer, written from docs/protocol.md §3 and the
    server's contract (error answers where the protocol has one)."""

    memory_pages: int
    channels: dict[int, ModelChannel] = field(default_factory=dict)
    version: int | None = None
    offers_requested: bool = False
    gpadls: dict[int, m.Gpadl] = field(default_factory=dict)
    pending: dict[int, ModelPending] = field(default_factory=dict)
    errors: int = 0
    opening: dict[int, int] = field(default_factory=dict)  # relid -> openid
    stale_opens: list[tuple[int, int]] = field(default_factory=list)

    def receive(self, payload: bytes) -> list[Event]:
        try:
            message = m.decode(payload)
        except m.GpadlError as error:  # a GPADL_HEADER that contradicts itself
            if self.version is None:
                return self.error()
            assert error.child_relid is not None
            return self.gpadl_refused(error.child_relid, error.gpadl)
        except m.MessageError:
            return self.error()
        if not isinstance(message, GUEST_TO_HOST):
            return self.error()
        if self.version is None and not isinstance(message, m.InitiateContact):
            return self.error()
        snake = re.sub(r"(?<!^)(?=[A-Z])", "_", type(message).__name__).lower()
        events: list[Event] = getattr(self, f"on_{snake}")(message)
        return events

    def error(self) -> list[Event]:
        self.errors += 1
        return []

    def live(self, relid: int) -> ModelChannel | None:
        channel = self.channels.get(relid)
        return None if channel is None or channel.state is ChannelState.RESCINDED else channel

    def offer(self, relid: int) -> Reply:
        spec = self.channels[relid].offer
        return Reply(
            m.OfferChannel(
                if_type=spec.class_id,
                if_instance=spec.instance_id,
                mmio_megabytes=spec.mmio_megabytes,
                user_def=spec.user_def,
                sub_channel_index=spec.sub_channel_index,
                child_relid=relid,
                connection_id=relid,
            )
        )

    def on_initiate_contact(self, message: m.InitiateContact) -> list[Event]:
        if self.version is not None:
            return self.error()
        ok = message.vmbus_version_requested in m.HOST_SUPPORTED_VERSIONS
        if ok:
            self.version = message.vmbus_version_requested
        return [Reply(m.VersionResponse(version_supported=int(ok), msg_conn_id=1))]

    def on_request_offers(self, message: m.RequestOffers) -> list[Event]:
        self.offers_requested = True
        relids = [r for r in self.channels if self.live(r)]
        return [*(self.offer(r) for r in relids), Reply(m.AllOffersDelivered())]

    def gpadl_refused(self, relid: int, handle: int) -> list[Event]:
        self.errors += 1
        return [created(relid, handle, FAILURE)]

    def on_gpadl_header(self, header: m.GpadlHeader) -> list[Event]:
        if self.live(header.child_relid) is None or header.gpadl in self.gpadls:
            return self.gpadl_refused(header.child_relid, header.gpadl)
        if header.gpadl in self.pending:
            del self.pending[header.gpadl]
            return self.gpadl_refused(header.child_relid, header.gpadl)
        if len(self.pending) >= m.MAX_PENDING_GPADLS:
            return self.gpadl_refused(header.child_relid, header.gpadl)
        self.pending[header.gpadl] = ModelPending(
            header.child_relid,
            header.total_pfns,
            header.byte_count,
            header.byte_offset,
            list(header.pfns),
        )
        return self.gpadl_progress(header.gpadl)

    def on_gpadl_body(self, body: m.GpadlBody) -> list[Event]:
        partial = self.pending.get(body.gpadl)
        if partial is None:
            return self.error()
        if not body.pfns or len(partial.pfns) + len(body.pfns) > partial.total:
            del self.pending[body.gpadl]
            return self.gpadl_refused(partial.relid, body.gpadl)
        partial.pfns += body.pfns
        return self.gpadl_progress(body.gpadl)

    def gpadl_progress(self, handle: int) -> list[Event]:
        partial = self.pending[handle]
        if len(partial.pfns) < partial.total:
            return []
        del self.pending[handle]
        if max(partial.pfns) >= self.memory_pages:
            return self.gpadl_refused(partial.relid, handle)
        self.gpadls[handle] = m.Gpadl(
            partial.relid, handle, partial.byte_count, partial.byte_offset, tuple(partial.pfns)
        )
        return [created(partial.relid, handle)]

    def on_open_channel(self, message: m.OpenChannel) -> list[Event]:
        relid, offset = message.child_relid, message.downstream_ringbuffer_pageoffset
        channel = self.live(relid)
        ring = self.gpadls.get(message.ringbuffer_gpadlhandle)
        if (
            channel is None
            or channel.state is not ChannelState.OFFERED
            or ring is None
            or ring.child_relid != relid
            or ring.byte_offset != 0
            or not 2 <= offset <= len(ring.pfns) - 2
        ):
            self.errors += 1
            return [open_result(relid, message.openid, FAILURE)]
        channel.state, channel.ring = ChannelState.OPENING, ring.gpadl
        self.opening[relid] = message.openid
        return [OpenRequested(relid, message.openid, channel.offer, ring, offset, message.userdata)]

    def open_done(self, relid: int, openid: int, ok: bool) -> list[Event]:
        assert self.opening.pop(relid) == openid
        channel = self.channels[relid]
        channel.state = ChannelState.OPEN if ok else ChannelState.OFFERED
        if not ok:
            channel.ring = None
        return [open_result(relid, openid, 0 if ok else FAILURE)]

    def close(self, relid: int) -> list[Event]:
        channel = self.channels[relid]
        if relid in self.opening:  # the I/O layer's answer comes too late
            self.stale_opens.append((relid, self.opening.pop(relid)))
        if channel.state is not ChannelState.RESCINDED:
            channel.state = ChannelState.OFFERED
        channel.ring = None
        return [ChannelClosed(relid)]

    def is_open(self, relid: int) -> bool:
        channel = self.channels.get(relid)
        return channel is not None and channel.state in (ChannelState.OPEN, ChannelState.OPENING)

    def on_close_channel(self, message: m.CloseChannel) -> list[Event]:
        if not self.is_open(message.child_relid):
            return self.error()
        return self.close(message.child_relid)

    def on_gpadl_teardown(self, message: m.GpadlTeardown) -> list[Event]:
        gpadl = self.gpadls.get(message.gpadl)
        if gpadl is None or gpadl.child_relid != message.child_relid:
            self.pending.pop(message.gpadl, None)
            return self.error()
        channel = self.channels.get(gpadl.child_relid)
        events: list[Event] = []
        if channel is not None and channel.ring == gpadl.gpadl:
            events += self.close(gpadl.child_relid)
        del self.gpadls[gpadl.gpadl]
        return [*events, GpadlRemoved(gpadl), Reply(m.GpadlTorndown(gpadl=gpadl.gpadl))]

    def on_relid_released(self, message: m.RelidReleased) -> list[Event]:
        channel = self.channels.get(message.child_relid)
        if channel is None or channel.state is not ChannelState.RESCINDED:
            return self.error()
        del self.channels[message.child_relid]
        return []

    def on_unload(self, message: m.Unload) -> list[Event]:
        events: list[Event] = []
        for relid in list(self.channels):
            if self.is_open(relid):
                events += self.close(relid)
        events += [GpadlRemoved(gpadl) for gpadl in self.gpadls.values()]
        self.gpadls.clear()
        self.pending.clear()
        self.version, self.offers_requested = None, False
        for relid in [r for r, c in self.channels.items() if c.state is ChannelState.RESCINDED]:
            del self.channels[relid]
        return [*events, Reply(m.UnloadResponse())]

    def on_modify_channel(self, message: m.ModifyChannel) -> list[Event]:
        if message.child_relid not in self.channels:
            return self.error()
        if self.version is not None and self.version >= V5_3:
            return [Reply(m.ModifyChannelResponse(child_relid=message.child_relid))]
        return []

    def rescind(self, relid: int) -> list[Event]:
        events = self.close(relid) if self.is_open(relid) else []
        if not self.offers_requested:
            del self.channels[relid]
            return events
        self.channels[relid].state = ChannelState.RESCINDED
        return [*events, Reply(m.RescindChannelOffer(child_relid=relid))]


TO_CUT = [
    m.InitiateContact.for_version(V5_3),
    m.OpenChannel(child_relid=1),
    m.Unload(),
    m.CloseChannel(child_relid=1),
    m.GpadlTeardown(child_relid=1, gpadl=FIRST_HANDLE + 1),
    m.RelidReleased(child_relid=1),
    m.ModifyChannel(child_relid=2),
    m.RequestOffers(),
    *m.gpadl_messages(1, FIRST_HANDLE + 1, RING_PAGES * m.HV_PAGE_SIZE, RING_PFNS),
]
ids = st.integers(0, 8) | st.integers(0, 2**32 - 1)
versions = (
    st.sampled_from(m.HOST_SUPPORTED_VERSIONS)
    | st.sampled_from([*m.VmbusVersion])
    | st.integers(0, 2**32 - 1)
)
specs = st.builds(
    OfferSpec,
    st.sampled_from([guid.SCSI, guid.NETWORK, guid.KVP, guid.HEARTBEAT]),
    st.uuids(),
    sub_channel_index=st.integers(0, 3),
    mmio_megabytes=st.integers(0, 256),
    user_def=st.binary(max_size=m.USER_DEFINED_BYTES),
)


class ControlProtocolMachine(RuleBasedStateMachine):
    """The child sends valid and invalid messages, the host adds and rescinds
    offers, the I/O layer answers opens (sometimes late); the server must
    answer every message as the model says and never raise."""

    def __init__(self) -> None:
        super().__init__()
        self.server = VmbusServer(list(OFFERS), memory_pages=MEMORY_PAGES)
        self.model = Model(MEMORY_PAGES)
        for relid, spec in enumerate(OFFERS, 1):
            self.model.channels[relid] = ModelChannel(spec)
        self.next_handle = FIRST_HANDLE
        # GPADLs in progress: the bodies still to send, and the PFNs sent so far
        self.unsent: dict[int, tuple[list[m.GpadlHeader | m.GpadlBody], int]] = {}

    # --- plumbing ---

    def send(self, payload: bytes) -> list[Event]:
        events = self.server.receive(payload)  # must never raise
        expected = self.model.receive(payload)
        assert events == expected, (payload.hex(), events, expected)
        self.answer_stale_opens()
        return events

    def answer_stale_opens(self) -> None:
        """The I/O layer answers an open the server has since closed: ignored."""
        while self.model.stale_opens:
            relid, openid = self.model.stale_opens.pop()
            before = state_of(self.server)
            assert self.server.open_done(relid, openid, ok=openid % 2 == 0) == []
            assert state_of(self.server) == before

    def fresh_handle(self) -> int:
        self.next_handle += 1
        while self.next_handle in {*self.model.gpadls, *self.model.pending}:
            self.next_handle += 1
        return self.next_handle

    def relids(self, *states: ChannelState) -> list[int]:
        return sorted(r for r, c in self.model.channels.items() if c.state in states)

    def live(self) -> list[int]:
        return self.relids(ChannelState.OFFERED, ChannelState.OPENING, ChannelState.OPEN)

    def connected(self) -> bool:
        return self.model.version is not None

    @initialize(
        version=st.sampled_from([V5_3, m.VmbusVersion.WIN10_V5_2, m.VmbusVersion.WIN8, None]),
        request=st.booleans(),
        opened=st.integers(0, 3),
    )
    def start(self, version: int | None, request: bool, opened: int) -> None:
        """Most runs start connected, some with offers sent and channels open."""
        if version is None:
            return
        self.initiate_contact(version)
        if not request:
            return
        self.request_offers()
        for relid in range(1, opened + 1):
            handle = self.fresh_handle()
            for message in m.gpadl_messages(relid, handle, RING_PAGES * 4096, RING_PFNS):
                self.send(m.encode(message))
            self.send(m.encode(open_message(relid, handle)))
            assert self.server.open_done(relid, relid, True) == self.model.open_done(
                relid, relid, True
            )

    # --- the child's valid requests ---

    @rule(version=versions, again=st.integers(0, 3))
    def initiate_contact(self, version: int, again: int = 0) -> None:
        """Sent while connected only now and then."""
        connected = self.model.version is not None
        if connected and again:
            return
        events = self.send(m.encode(m.InitiateContact.for_version(version)))
        if not connected:
            ok = version in m.HOST_SUPPORTED_VERSIONS
            assert events == [Reply(m.VersionResponse(version_supported=ok, msg_conn_id=1))]
            assert self.server.version == (version if ok else None)

    @precondition(lambda self: self.connected())
    @rule(again=st.integers(0, 3))
    def request_offers(self, again: int = 0) -> None:
        """Sent again only now and then."""
        if self.model.offers_requested and again:
            return
        events = self.send(m.encode(m.RequestOffers()))
        assert sorted(offered_relids(events)) == self.live()

    @precondition(lambda self: self.connected() and self.live() and len(self.model.pending) < 60)
    @rule(
        data=st.data(),
        pages=st.integers(1, 60),
        now=st.integers(1, 4),
        start=st.sampled_from([0, 0, 0, 16, 4095]),
        short=st.sampled_from([0, 0, 1, 4095]),
    )
    def create_gpadl(
        self, data: st.DataObject, pages: int, now: int, start: int, short: int
    ) -> None:
        """A valid GPADL of `pages` pages, `start` bytes into the first one and
        ending `short` bytes before the end of the last; `now` of its messages
        are sent at once, the others by continue_gpadl."""
        relid = data.draw(st.sampled_from(self.live()))
        pfns = data.draw(st.lists(st.integers(0, MEMORY_PAGES - 1), min_size=pages, max_size=pages))
        byte_count = max(pages * m.HV_PAGE_SIZE - start - short, 1)
        handle = self.fresh_handle()
        header, *bodies = m.gpadl_messages(relid, handle, byte_count, pfns, byte_offset=start)
        events = self.send(m.encode(header))
        sent = len(header.pfns)
        while bodies and now > 1:
            sent += len(bodies[0].pfns)
            events = self.send(m.encode(bodies.pop(0)))
            now -= 1
        if bodies:
            self.unsent[handle] = bodies, sent
            assert events == []
        else:  # a valid GPADL is created
            assert events == [created(relid, handle)]

    @precondition(lambda self: self.unsent)
    @rule(data=st.data())
    def continue_gpadl(self, data: st.DataObject) -> None:
        handle = data.draw(st.sampled_from(sorted(self.unsent)))
        bodies, sent = self.unsent.pop(handle)
        partial = self.model.pending.get(handle)
        # Invalid messages of other rules may have dropped or extended it.
        intact = partial is not None and len(partial.pfns) == sent
        body = bodies.pop(0)
        events = self.send(m.encode(body))
        if bodies:
            self.unsent[handle] = bodies, sent + len(body.pfns)
        if partial is not None and intact:
            assert events == ([] if bodies else [created(partial.relid, handle)])

    def ring_choices(self) -> list[tuple[int, int]]:
        offered = self.relids(ChannelState.OFFERED)
        return [
            (g.child_relid, g.gpadl)
            for g in self.model.gpadls.values()
            if g.child_relid in offered and g.byte_offset == 0 and len(g.pfns) >= 4
        ]

    @precondition(lambda self: self.connected() and self.ring_choices())
    @rule(
        data=st.data(),
        openid=ids,
        userdata=st.binary(max_size=m.USER_DEFINED_BYTES),
        answer=st.sampled_from([True, False, None]),
    )
    def open_channel(
        self, data: st.DataObject, openid: int, userdata: bytes, answer: bool | None
    ) -> None:
        """`answer`: the I/O layer answers at once (as vmbus.partition does), or later."""
        relid, handle = data.draw(st.sampled_from(self.ring_choices()))
        ring = self.model.gpadls[handle]
        offset = data.draw(st.integers(2, len(ring.pfns) - 2))
        message = m.OpenChannel(
            child_relid=relid,
            openid=openid,
            ringbuffer_gpadlhandle=handle,
            downstream_ringbuffer_pageoffset=offset,
            userdata=userdata,
        )
        events = self.send(m.encode(message))
        offer = self.model.channels[relid].offer
        assert events == [OpenRequested(relid, openid, offer, ring, offset, message.userdata)]
        if answer is None and data.draw(st.booleans()):  # the child does not wait
            again = self.send(m.encode(message))
            assert again == [open_result(relid, openid, FAILURE)]
        if answer is not None:
            result = self.server.open_done(relid, openid, answer)
            assert result == [open_result(relid, openid, 0 if answer else FAILURE)]
            assert result == self.model.open_done(relid, openid, answer)

    @precondition(lambda self: self.model.opening)
    @rule(data=st.data(), ok=st.booleans())
    def io_layer_finishes_open(self, data: st.DataObject, ok: bool) -> None:
        relid = data.draw(st.sampled_from(sorted(self.model.opening)))
        openid = self.model.opening[relid]
        assert self.server.open_done(relid, openid, ok) == self.model.open_done(relid, openid, ok)

    @precondition(
        lambda self: self.connected() and self.relids(ChannelState.OPEN, ChannelState.OPENING)
    )
    @rule(data=st.data())
    def close_channel(self, data: st.DataObject) -> None:
        relid = data.draw(st.sampled_from(self.relids(ChannelState.OPEN, ChannelState.OPENING)))
        assert self.send(m.encode(m.CloseChannel(child_relid=relid))) == [ChannelClosed(relid)]

    @precondition(lambda self: self.connected() and self.model.gpadls)
    @rule(data=st.data())
    def teardown_gpadl(self, data: st.DataObject) -> None:
        gpadl = self.model.gpadls[data.draw(st.sampled_from(sorted(self.model.gpadls)))]
        events = self.send(
            m.encode(m.GpadlTeardown(child_relid=gpadl.child_relid, gpadl=gpadl.gpadl))
        )
        assert events[-2:] == [GpadlRemoved(gpadl), Reply(m.GpadlTorndown(gpadl=gpadl.gpadl))]

    @precondition(lambda self: self.connected() and self.relids(ChannelState.RESCINDED))
    @rule(data=st.data())
    def release_relid(self, data: st.DataObject) -> None:
        relid = data.draw(st.sampled_from(self.relids(ChannelState.RESCINDED)))
        assert self.send(m.encode(m.RelidReleased(child_relid=relid))) == []
        assert relid not in self.server.channels

    @precondition(lambda self: self.connected())
    @rule(now=st.integers(0, 3))
    def unload(self, now: int) -> None:
        """Rarer than the other requests: it ends the session."""
        if now:
            return
        events = self.send(m.encode(m.Unload()))
        assert events[-1] == Reply(m.UnloadResponse())
        assert self.server.gpadls == {} and self.server.version is None

    @precondition(lambda self: self.connected() and self.model.channels)
    @rule(data=st.data(), target_vp=st.integers(0, 63))
    def modify_channel(self, data: st.DataObject, target_vp: int) -> None:
        relid = data.draw(st.sampled_from(sorted(self.model.channels)))
        self.send(m.encode(m.ModifyChannel(child_relid=relid, target_vp=target_vp)))

    # --- the child's invalid messages ---

    @rule(payload=st.binary(max_size=260))
    def random_bytes(self, payload: bytes) -> None:
        self.send(payload)

    @rule(
        msgtype=st.integers(0, 30) | st.integers(0, 2**32 - 1),
        body=st.binary(max_size=250),
    )
    def random_body(self, msgtype: int, body: bytes) -> None:
        self.send(struct.pack("<II", msgtype, 0) + body)

    def known_relids(self) -> st.SearchStrategy[int]:
        return st.sampled_from(sorted({*self.model.channels, 1})) | ids

    def known_handles(self) -> st.SearchStrategy[int]:
        return st.sampled_from(sorted({*self.model.gpadls, *self.model.pending, FIRST_HANDLE}))

    @precondition(lambda self: self.connected() and self.model.gpadls)
    @rule(data=st.data(), openid=ids)
    def open_near_miss(self, data: st.DataObject, openid: int) -> None:
        """OPENCHANNEL with an established GPADL, on its own channel in
        whatever state that is or on another relid, split at, around and
        beyond the limits of the ring."""
        ring = self.model.gpadls[data.draw(st.sampled_from(sorted(self.model.gpadls)))]
        own = data.draw(st.integers(0, 3))
        relid = data.draw(self.known_relids()) if own == 0 else ring.child_relid
        pages = len(ring.pfns)
        limits = [
            n for n in (0, 1, 2, pages // 2, pages - 2, pages - 1, pages, pages + 1) if n >= 0
        ]
        anywhere = data.draw(st.integers(0, 4)) == 0
        offset = data.draw(st.integers(0, 2**32 - 1) if anywhere else st.sampled_from(limits))
        message = m.OpenChannel(
            child_relid=relid,
            openid=openid,
            ringbuffer_gpadlhandle=ring.gpadl,
            downstream_ringbuffer_pageoffset=offset,
        )
        self.send(m.encode(message))

    @precondition(lambda self: self.connected() and self.live())
    @rule(data=st.data(), pages=st.integers(1, 40))
    def gpadl_near_miss(self, data: st.DataObject, pages: int) -> None:
        """A GPADL on a live channel (or another relid) that grants one PFN at
        or past the end of the child's memory, or reuses a known handle."""
        relid = data.draw(st.sampled_from(self.live()) | self.known_relids())
        handle = data.draw(st.just(self.fresh_handle()) | self.known_handles())
        valid = st.integers(0, MEMORY_PAGES - 1)
        pfns = data.draw(st.lists(valid, min_size=pages - 1, max_size=pages - 1))
        edge = [MEMORY_PAGES - 1, MEMORY_PAGES, MEMORY_PAGES + 1, 2**64 - 1]
        pfns.insert(data.draw(st.integers(0, len(pfns))), data.draw(st.sampled_from(edge)))
        for message in m.gpadl_messages(relid, handle, len(pfns) * m.HV_PAGE_SIZE, pfns):
            self.send(m.encode(message))

    @rule(data=st.data())
    def wrong_ids(self, data: st.DataObject) -> None:
        """Well-formed requests with relids, handles and offsets drawn at random,
        or taken from the server's state where they do not fit."""
        handles = st.sampled_from(sorted({*self.model.gpadls, FIRST_HANDLE})) | ids
        relid, handle = data.draw(ids), data.draw(handles)
        kind = data.draw(st.integers(0, 8))
        message: m.Message
        if kind == 0:
            message = m.OpenChannel(
                child_relid=relid,
                openid=data.draw(ids),
                ringbuffer_gpadlhandle=handle,
                downstream_ringbuffer_pageoffset=data.draw(ids),
            )
        elif kind == 1:
            message = m.GpadlTeardown(child_relid=relid, gpadl=handle)
        elif kind == 2:
            message = m.CloseChannel(child_relid=relid)
        elif kind == 3:
            message = m.RelidReleased(child_relid=relid)
        elif kind == 4:
            message = m.ModifyChannel(child_relid=relid)
        elif kind == 5:  # a GPADL that grants pages the child does not have
            pfns = (data.draw(st.integers(0, MEMORY_PAGES - 1)), MEMORY_PAGES + data.draw(ids))
            [message] = m.gpadl_messages(relid, handle, 2 * m.HV_PAGE_SIZE, pfns)
        elif kind == 6:
            message = m.GpadlBody(gpadl=handle, pfns=(data.draw(ids),))
        elif kind == 8:  # a GPADL_HEADER that contradicts itself
            message = m.GpadlHeader(
                child_relid=data.draw(self.known_relids()),
                gpadl=handle,
                range_buflen=data.draw(st.sampled_from([0, 7, 16, 24]) | st.integers(0, 0xFFFF)),
                rangecount=data.draw(st.sampled_from([0, 1, 2])),
                byte_count=data.draw(st.sampled_from([0, 1, 4096, 8192])),
                byte_offset=data.draw(st.sampled_from([0, 4095, 4096])),
                pfns=(1,) * data.draw(st.integers(0, 3)),
            )
        else:  # a body for an unfinished GPADL: no PFNs, or too many perhaps
            pending = sorted(self.model.pending)
            target = data.draw(st.sampled_from(pending)) if pending else handle
            count = data.draw(st.integers(0, m.GPADL_BODY_MAX_PFNS))
            message = m.GpadlBody(gpadl=target, pfns=tuple(range(count)))
        self.send(m.encode(message))

    @rule(data=st.data(), message=st.sampled_from(TO_CUT))
    def cut_or_padded(self, data: st.DataObject, message: m.Message) -> None:
        payload = m.encode(message)
        size = data.draw(st.integers(0, len(payload) - 1) | st.integers(len(payload) + 1, 300))
        self.send(payload[:size].ljust(size, b"\0"))

    # --- the host ---

    @precondition(lambda self: len(self.model.channels) < 10)
    @rule(spec=specs, now=st.integers(0, 1))
    def add_offer(self, spec: OfferSpec, now: int) -> None:
        if now:
            return
        before = set(self.server.channels)
        events = self.server.add_offer(spec)
        [relid] = set(self.server.channels) - before
        assert relid not in self.model.channels and 1 <= relid <= 0xFFFFFFFE
        self.model.channels[relid] = ModelChannel(spec)
        assert events == ([self.model.offer(relid)] if self.model.offers_requested else [])

    @precondition(lambda self: len(self.model.channels) < 10)
    @rule(spec=specs, now=st.integers(0, 1))
    def hot_add(self, spec: OfferSpec, now: int) -> None:
        """The management service adds a device: an offer outside the VSPs' quota."""
        if now:
            return
        before = set(self.server.channels)
        added = self.server.added_offers
        events = self.server.hot_add(spec)
        [relid] = set(self.server.channels) - before
        assert relid not in self.model.channels and self.server.added_offers == added
        self.model.channels[relid] = ModelChannel(spec)
        assert events == ([self.model.offer(relid)] if self.model.offers_requested else [])

    @precondition(lambda self: self.live())
    @rule(data=st.data(), now=st.integers(0, 1))
    def rescind(self, data: st.DataObject, now: int) -> None:
        """Rarer than the child's requests: a rescinded channel is gone for good."""
        if now:
            return
        relid = data.draw(st.sampled_from(self.live()))
        assert self.server.rescind(relid) == self.model.rescind(relid)
        self.answer_stale_opens()

    # --- after every step ---

    @invariant()
    def server_agrees_with_model(self) -> None:
        server, model = self.server, self.model
        assert server.version == model.version
        assert server.offers_requested == model.offers_requested
        channels = {r: (c.offer, c.state, c.ring_gpadl) for r, c in server.channels.items()}
        assert channels == {r: (c.offer, c.state, c.ring) for r, c in model.channels.items()}
        assert server.gpadls == model.gpadls
        # What the server offers is exactly its channels: a released offer is forgotten.
        assert sorted(server.offers, key=repr) == sorted(
            (c.offer for c in model.channels.values()), key=repr
        )
        assert server.assembler.pending == frozenset(model.pending)
        assert server.protocol_errors == model.errors
        opening = {r for r, c in server.channels.items() if c.state is ChannelState.OPENING}
        assert opening == set(model.opening)
        assert not model.stale_opens

    def teardown(self) -> None:
        """The I/O layer answers every open still outstanding."""
        for relid, openid in list(self.model.opening.items()):
            expected = self.model.open_done(relid, openid, True)
            assert self.server.open_done(relid, openid, True) == expected


ControlProtocolMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=50, deadline=None
)
TestControlProtocol = ControlProtocolMachine.TestCase


def test_child_grants_large_gpadls_and_each_costs_8_bytes_a_page() -> None:
    """A 32 MiB GPADL held its PFNs as a tuple of Python ints: ~36 bytes a
    page, 295 KB of the parent each. Now 8 bytes a page (plus the page
    index, 20 bytes a page of the child's memory, paid once)."""
    pages = m.GPADL_MAX_PFNS
    server = VmbusServer(list(OFFERS), memory_pages=2 * pages, max_gpadl_pages=1 << 20)
    send(server, m.InitiateContact.for_version(V5_3))
    send(server, m.RequestOffers())
    messages = [
        [m.encode(x) for x in m.gpadl_messages(1, handle, pages * 4096, range(pages))]
        for handle in range(FIRST_HANDLE, FIRST_HANDLE + 11)
    ]
    for payload in messages[0]:  # the first GPADL allocates the index
        server.receive(payload)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for gpadl in messages[1:]:
            for payload in gpadl:
                server.receive(payload)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(server.gpadls) == 11
    assert held / 10 < 9 * pages  # bytes per GPADL
