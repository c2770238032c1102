"""The device contract (vmbus.device): what every VSP inherits."""

from __future__ import annotations

import uuid

import pytest

from vmbus._ringpacket import Packet
from vmbus.channel import COMPLETION_REQUESTED, Channel
from vmbus.device import BadGpaRanges, ChannelHandler, OpenContext, UnknownGpadl, Vsp
from vmbus.errors import PeerError, UsageError
from vmbus.host import OfferSpec
from vmbus.memory import PAGE_SIZE
from vmbus.packet import GpaRange, encode_gpa_direct_header
from vmbus.testing import VspHarness

CLASS_ID = uuid.UUID("0e3e6a43-6d2b-4d3b-9a8e-0c6f4c1d2e3f")


class PausingHandler(ChannelHandler):
    """Completes each request; pauses after the first until resumed."""

    max_reply = 64

    def __init__(self, channel: Channel, context: OpenContext) -> None:
        super().__init__(channel, context)
        self.seen: list[int] = []

    def on_packet(self, packet: Packet) -> None:
        self.seen.append(packet.trans_id)
        self.reply(packet.trans_id, b"ok------")
        self.pause()


class OneChannel(Vsp):
    def __init__(self) -> None:
        self.handler: PausingHandler | None = None

    def offers(self) -> list[OfferSpec]:
        return [OfferSpec(CLASS_ID, uuid.UUID(int=1))]

    def open(self, channel: Channel, context: OpenContext) -> PausingHandler:
        self.handler = PausingHandler(channel, context)
        return self.handler


def test_a_paused_handler_is_handed_no_more_requests_of_the_same_drain() -> None:
    with VspHarness(OneChannel()) as harness:
        for trans_id in (1, 2, 3):
            harness.guest.send(b"request-", flags=COMPLETION_REQUESTED, trans_id=trans_id)
        harness.pump()
        handler = harness.handler
        assert isinstance(handler, PausingHandler)
        assert handler.seen == [1] and handler.paused
        handler.resume()
        harness.pump()
        assert handler.seen == [1, 2]  # it paused again after the second
        handler.resume()
        harness.pump()
        assert handler.seen == [1, 2, 3]


def test_a_reply_larger_than_max_reply_is_a_usage_error() -> None:
    with VspHarness(OneChannel()) as harness, pytest.raises(UsageError, match="max_reply"):
        harness.handler.reply(1, bytes(PausingHandler.max_reply + 8))


def test_guest_names_pages_outside_its_memory_or_on_its_rings() -> None:
    with VspHarness(OneChannel()) as harness:
        context = harness.context
        beyond = context.memory.page_count
        for pfns in ([beyond], [0]):  # past the end; page 0 is a ring page here
            header = encode_gpa_direct_header([GpaRange(PAGE_SIZE, 0, tuple(pfns))])
            with pytest.raises(BadGpaRanges):
                context.gpa_ranges(header)
        assert context.bad_ranges == 2 and context.peer_log.count == 2
        good = harness.allocate(2)
        header = encode_gpa_direct_header([GpaRange(2 * PAGE_SIZE, 0, tuple(good))])
        assert context.gpa_ranges(bytearray(header))[0].pfns == tuple(good)


def test_guest_names_a_gpadl_it_never_granted_or_reads_past_one() -> None:
    with VspHarness(OneChannel()) as harness:
        gpadl = harness.grant(2, byte_count=PAGE_SIZE + 100)
        with pytest.raises(UnknownGpadl) as error:
            harness.context.gpadl(gpadl.gpadl + 1)
        assert isinstance(error.value, PeerError)
        views = harness.context.gpadl_segments(gpadl.gpadl, 0, PAGE_SIZE + 100)
        assert sum(len(v) for v in views) == PAGE_SIZE + 100
        for view in views:
            view.release()
        with pytest.raises(PeerError):
            harness.context.gpadl_segments(gpadl.gpadl, PAGE_SIZE, 101)
        covering = harness.context.gpadl_covering(gpadl.pfns[0] * PAGE_SIZE, PAGE_SIZE)
        assert covering == gpadl
