"""The host side of the VMBus control protocol for one child, sans-I/O.

`VmbusServer.receive(payload)` takes one message from the child and returns
what to do: replies to post and channel events for the I/O layer (which
maps rings and starts VSPs). It never raises for anything the child sends:
a malformed or unexpected message is answered with the protocol's error
status where it has one, otherwise logged, counted and dropped.

Quotas bound what one child can make the parent hold, whatever it sends:
GPADLs (count and pages, those in reassembly included), open channels and
sub-channels a VSP adds. Each refusal answers with the protocol's failure
status and is counted in `refusals`, by quota. Per-message work is bounded
too: the GPADLs sit in a `GpadlTable`, indexed by page.
"""

from __future__ import annotations

import enum
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from vmbus import messages as m
from vmbus.errors import PeerError
from vmbus.gpadl import GpadlTable
from vmbus.memory import DEFAULT_MAX_MAPPINGS, DEFAULT_MAX_RUNS

log = logging.getLogger(__name__)

FAILURE = 0xC0000001  # STATUS_UNSUCCESSFUL, the NTSTATUS Hyper-V answers with
MIN_RING_PAGES = 2  # a ring is a header page plus at least one data page

# Default quotas per child. A Linux guest holds a ring GPADL per open channel
# plus netvsc's two buffers and synthvid's VRAM: tens of GPADLs. PFNs cost
# the parent 8 bytes a page, so the page quota bounds that memory.
DEFAULT_MAX_GPADLS = 1024
DEFAULT_MAX_GPADL_PAGES = 1 << 16  # 256 MiB of grants, or twice the memory if more
DEFAULT_MAX_OPEN_CHANNELS = 64  # each holds 2 eventfds and 4 mappings in the parent
DEFAULT_MAX_ADDED_OFFERS = 64  # sub-channels VSPs add (netvsc asks for up to 64)


@dataclass(frozen=True)
class Quotas:
    """Everything one child may make the parent hold, in one value for the
    process layer to pass through: the server's quotas (see VmbusServer)
    and the memory layer's (`max_mappings` of the child's memory at once,
    `max_runs` in one ring or buffer mapping)."""

    max_gpadls: int = DEFAULT_MAX_GPADLS
    max_gpadl_pages: int | None = None
    max_pending_gpadls: int = m.MAX_PENDING_GPADLS
    max_pending_pfns: int = m.MAX_PENDING_PFNS
    max_open_channels: int = DEFAULT_MAX_OPEN_CHANNELS
    max_added_offers: int = DEFAULT_MAX_ADDED_OFFERS
    max_mappings: int = DEFAULT_MAX_MAPPINGS
    max_runs: int = DEFAULT_MAX_RUNS

    def server(self, offers: list[OfferSpec], memory_pages: int) -> VmbusServer:
        """A server for one child within these quotas."""
        return VmbusServer(
            offers,
            memory_pages,
            max_gpadls=self.max_gpadls,
            max_gpadl_pages=self.max_gpadl_pages,
            max_pending_gpadls=self.max_pending_gpadls,
            max_pending_pfns=self.max_pending_pfns,
            max_open_channels=self.max_open_channels,
            max_added_offers=self.max_added_offers,
        )


class QuotaExceeded(PeerError):
    """The child asked for more than its quota (`quota` names which)."""

    def __init__(self, quota: str, reason: str) -> None:
        self.quota = quota
        super().__init__(reason)


@dataclass(frozen=True)
class OfferSpec:
    """What a VSP offers: one channel of a device."""

    class_id: UUID
    instance_id: UUID
    sub_channel_index: int = 0
    mmio_megabytes: int = 0
    user_def: bytes = b""


class ChannelState(enum.Enum):
    OFFERED = "offered"
    OPENING = "opening"
    OPEN = "open"
    RESCINDED = "rescinded"


@dataclass
class ChannelRecord:
    relid: int
    offer: OfferSpec
    state: ChannelState = ChannelState.OFFERED
    ring_gpadl: int | None = None
    added: bool = False  # by a VSP after the start (a sub-channel): quota'd


# --- what the server asks of the I/O layer -------------------------------


@dataclass(frozen=True)
class Reply:
    message: m.Message


@dataclass(frozen=True)
class OpenRequested:
    """Map the ring GPADL and start the VSP, then call `open_done`."""

    relid: int
    openid: int
    offer: OfferSpec
    gpadl: m.Gpadl
    inbound_page_offset: int  # where the host->guest ring starts, in pages
    userdata: bytes


@dataclass(frozen=True)
class ChannelClosed:
    relid: int


@dataclass(frozen=True)
class GpadlRemoved:
    gpadl: m.Gpadl


Event = Reply | OpenRequested | ChannelClosed | GpadlRemoved


@dataclass
class VmbusServer:
    """Control-protocol state for one child partition, within its quotas:
    `max_gpadls` GPADLs and `max_gpadl_pages` pages in them (default: the
    larger of 64 Ki and twice the child's memory), those still in
    reassembly counted; at most `max_pending_gpadls` in reassembly at once,
    announcing `max_pending_pfns` PFNs; `max_open_channels` channels open or
    opening; `max_added_offers` channels added by VSPs after the start."""

    offers: list[OfferSpec]
    memory_pages: int
    version: int | None = None
    offers_requested: bool = False
    channels: dict[int, ChannelRecord] = field(default_factory=dict)
    protocol_errors: int = 0
    max_gpadls: int = DEFAULT_MAX_GPADLS
    max_gpadl_pages: int | None = None
    max_pending_gpadls: int = m.MAX_PENDING_GPADLS
    max_pending_pfns: int = m.MAX_PENDING_PFNS
    max_open_channels: int = DEFAULT_MAX_OPEN_CHANNELS
    max_added_offers: int = DEFAULT_MAX_ADDED_OFFERS
    refusals: Counter[str] = field(default_factory=Counter)  # by quota, ever
    gpadls: GpadlTable = field(init=False)
    assembler: m.GpadlAssembler = field(init=False)

    def __post_init__(self) -> None:
        if self.max_gpadl_pages is None:
            self.max_gpadl_pages = max(DEFAULT_MAX_GPADL_PAGES, 2 * self.memory_pages)
        self.gpadls = GpadlTable(self.memory_pages)
        self.assembler = self._new_assembler()
        self.open_channels = 0  # channels OPENING or OPEN
        self.added_offers = 0  # live channels a VSP added
        specs, self.offers = self.offers, []
        for spec in specs:
            self._offer(spec, added=False)

    def _new_assembler(self) -> m.GpadlAssembler:
        return m.GpadlAssembler(self.max_pending_gpadls, self.max_pending_pfns)

    def _set_state(self, record: ChannelRecord, state: ChannelState) -> None:
        """Every change of a channel's state goes here, to count the open ones."""
        opened = (ChannelState.OPENING, ChannelState.OPEN)
        self.open_channels += (state in opened) - (record.state in opened)
        record.state = state

    # --- the child's messages ---

    def receive(self, payload: bytes) -> list[Event]:
        try:
            message = m.decode(payload)
        except m.MessageError as error:
            if isinstance(error, m.GpadlError) and self.version is not None:
                return self._gpadl_failed(error)
            return self._error(f"dropped: {error}")
        handler = _HANDLERS.get(type(message))
        if handler is None:
            return self._error(f"{type(message).__name__} goes host to guest; dropped")
        if self.version is None and not isinstance(message, m.InitiateContact):
            return self._error(f"{type(message).__name__} before version negotiation")
        try:
            return handler(self, message)
        except m.GpadlError as error:
            return self._gpadl_failed(error)

    def _refused(self, quota: str, text: str) -> None:
        self.refusals[quota] += 1
        log.info("child refused: %s", text)  # counted; rate-limited by the caller's PeerLog

    def _error(self, text: str) -> list[Event]:
        self.protocol_errors += 1
        log.info("child protocol error: %s", text)  # counted; a hostile child must not flood logs
        return []

    def _initiate_contact(self, message: m.InitiateContact) -> list[Event]:
        if self.version is not None:
            return self._error("INITIATE_CONTACT while connected")
        version = message.vmbus_version_requested
        accepted = version in m.HOST_SUPPORTED_VERSIONS
        if accepted:
            self.version = version
        # From 5.0 the guest sends later messages on msg_conn_id; one port here.
        return [Reply(m.VersionResponse(version_supported=int(accepted), msg_conn_id=1))]

    def _request_offers(self, message: m.RequestOffers) -> list[Event]:
        self.offers_requested = True
        events: list[Event] = [
            Reply(self._offer_message(record))
            for record in self.channels.values()
            if record.state is not ChannelState.RESCINDED
        ]
        return [*events, Reply(m.AllOffersDelivered())]

    def _gpadl_message(self, message: m.GpadlHeader | m.GpadlBody) -> list[Event]:
        if isinstance(message, m.GpadlHeader):
            record = self.channels.get(message.child_relid)
            if record is None or record.state is ChannelState.RESCINDED:
                raise m.GpadlError("unknown channel", message.gpadl, message.child_relid)
            if message.gpadl in self.gpadls:
                raise m.GpadlError("handle already in use", message.gpadl, message.child_relid)
            if not self.assembler.in_progress(message.gpadl):  # else the assembler drops both
                message.check()
                self._check_gpadl_quotas(message)
        gpadl = self.assembler.feed(message)
        if gpadl is None:
            return []
        if max(gpadl.pfns) >= self.memory_pages:
            bad = next(pfn for pfn in gpadl.pfns if pfn >= self.memory_pages)
            raise m.GpadlError(
                f"PFN {bad} beyond the child's {self.memory_pages} pages",
                gpadl.gpadl,
                gpadl.child_relid,
            )
        if gpadl.gpadl in self.gpadls:  # another header completed first
            raise m.GpadlError("handle already in use", gpadl.gpadl, gpadl.child_relid)
        self.gpadls[gpadl.gpadl] = gpadl
        return [Reply(m.GpadlCreated(child_relid=gpadl.child_relid, gpadl=gpadl.gpadl))]

    def _check_gpadl_quotas(self, header: m.GpadlHeader) -> None:
        """GPADLs in reassembly count as if established: their PFNs are
        announced up front, so a completed GPADL always fits."""
        held = len(self.gpadls) + self.assembler.pending_count
        pages = self.gpadls.pages + self.assembler.pending_pfns + header.total_pfns
        assert self.max_gpadl_pages is not None
        if held >= self.max_gpadls:
            quota, reason = "gpadls", f"the child holds its {self.max_gpadls} GPADLs"
        elif pages > self.max_gpadl_pages:
            quota = "gpadl_pages"
            reason = f"{pages} pages would pass the child's {self.max_gpadl_pages} in GPADLs"
        else:
            return
        raise m.GpadlQuotaExceeded(quota, reason, header.gpadl, header.child_relid)

    def _gpadl_failed(self, error: m.GpadlError) -> list[Event]:
        if isinstance(error, m.GpadlQuotaExceeded):
            self._refused(error.quota, str(error))
        else:
            self._error(str(error))
        if error.child_relid is None:
            return []  # a body: the protocol has no answer for it
        return [
            Reply(
                m.GpadlCreated(
                    child_relid=error.child_relid, gpadl=error.gpadl, creation_status=FAILURE
                )
            )
        ]

    def _open_channel(self, message: m.OpenChannel) -> list[Event]:
        def refuse(reason: str) -> list[Event]:
            self._error(f"OPENCHANNEL relid {message.child_relid}: {reason}")
            result = m.OpenChannelResult(
                child_relid=message.child_relid, openid=message.openid, status=FAILURE
            )
            return [Reply(result)]

        record = self.channels.get(message.child_relid)
        if record is None or record.state is ChannelState.RESCINDED:
            return refuse("unknown channel")
        if record.state is not ChannelState.OFFERED:
            return refuse(f"channel is {record.state.value}")
        if self.open_channels >= self.max_open_channels:
            self._refused("open_channels", f"relid {record.relid}: {self.open_channels} open")
            result = m.OpenChannelResult(
                child_relid=message.child_relid, openid=message.openid, status=FAILURE
            )
            return [Reply(result)]
        gpadl = self.gpadls.get(message.ringbuffer_gpadlhandle)
        if gpadl is None or gpadl.child_relid != record.relid:
            return refuse(f"no GPADL {message.ringbuffer_gpadlhandle:#x} on this channel")
        offset = message.downstream_ringbuffer_pageoffset
        if gpadl.byte_offset or not (MIN_RING_PAGES <= offset <= len(gpadl.pfns) - MIN_RING_PAGES):
            return refuse(f"ring GPADL of {len(gpadl.pfns)} pages cannot split at page {offset}")
        self._set_state(record, ChannelState.OPENING)
        record.ring_gpadl = gpadl.gpadl
        return [
            OpenRequested(
                record.relid, message.openid, record.offer, gpadl, offset, message.userdata
            )
        ]

    def open_done(self, relid: int, openid: int, ok: bool) -> list[Event]:
        """The I/O layer's answer to OpenRequested."""
        record = self.channels.get(relid)
        if record is None or record.state is not ChannelState.OPENING:
            # Closed, torn down, rescinded or unloaded meanwhile: ChannelClosed
            # went out then, and the child waits for no answer.
            log.info("relid %d: open finished after the channel closed; ignored", relid)
            return []
        self._set_state(record, ChannelState.OPEN if ok else ChannelState.OFFERED)
        if not ok:
            record.ring_gpadl = None
        status = 0 if ok else FAILURE
        return [Reply(m.OpenChannelResult(child_relid=relid, openid=openid, status=status))]

    def _close_channel(self, message: m.CloseChannel) -> list[Event]:
        record = self.channels.get(message.child_relid)
        if record is None or record.state not in (ChannelState.OPEN, ChannelState.OPENING):
            return self._error(f"CLOSECHANNEL of relid {message.child_relid}, which is not open")
        return self._close(record)

    def _close(self, record: ChannelRecord) -> list[Event]:
        if record.state is not ChannelState.RESCINDED:
            self._set_state(record, ChannelState.OFFERED)
        record.ring_gpadl = None
        return [ChannelClosed(record.relid)]

    def _gpadl_teardown(self, message: m.GpadlTeardown) -> list[Event]:
        gpadl = self.gpadls.get(message.gpadl)
        if gpadl is None or gpadl.child_relid != message.child_relid:
            self.assembler.discard(message.gpadl)
            return self._error(f"GPADL_TEARDOWN of unknown handle {message.gpadl:#x}")
        events: list[Event] = []
        record = self.channels.get(gpadl.child_relid)
        if record is not None and record.ring_gpadl == gpadl.gpadl:
            # The guest takes its ring away: stop the VSP before the memory goes.
            events += self._close(record)
        del self.gpadls[gpadl.gpadl]
        return [*events, GpadlRemoved(gpadl), Reply(m.GpadlTorndown(gpadl=gpadl.gpadl))]

    def _relid_released(self, message: m.RelidReleased) -> list[Event]:
        record = self.channels.get(message.child_relid)
        if record is None or record.state is not ChannelState.RESCINDED:
            return self._error(f"RELID_RELEASED of relid {message.child_relid}, not rescinded")
        self._forget(record)
        return []

    def _unload(self, message: m.Unload) -> list[Event]:
        events = self.disconnect()
        return [*events, Reply(m.UnloadResponse())]

    def _modify_channel(self, message: m.ModifyChannel) -> list[Event]:
        if message.child_relid not in self.channels:
            return self._error(f"MODIFYCHANNEL of unknown relid {message.child_relid}")
        if (self.version or 0) < m.VmbusVersion.WIN10_V5_3:
            return []  # before 5.3 the host sends no response
        return [Reply(m.ModifyChannelResponse(child_relid=message.child_relid))]

    # --- the host's own actions ---

    def add_offer(self, spec: OfferSpec) -> list[Event]:
        """Offer a channel (a sub-channel) for a VSP; sent now if offers were
        asked. QuotaExceeded (counted) past `max_added_offers`."""
        if self.added_offers >= self.max_added_offers:
            reason = f"a VSP adds more than the child's {self.max_added_offers} offers"
            self._refused("added_offers", reason)
            raise QuotaExceeded("added_offers", reason)
        return self._offer(spec, added=True)

    def hot_add(self, spec: OfferSpec) -> list[Event]:
        """Offer a device's channel while the child runs (the management
        service adds a device): a host action, outside the VSPs' quota."""
        return self._offer(spec, added=False)

    def _offer(self, spec: OfferSpec, added: bool) -> list[Event]:
        # A host action over channels that quotas bound, not a child's message.
        relid = max(self.channels, default=0) + 1
        record = ChannelRecord(relid, spec, added=added)
        self.channels[relid] = record
        self.added_offers += added
        self.offers.append(spec)
        return [Reply(self._offer_message(record))] if self.offers_requested else []

    def _forget(self, record: ChannelRecord) -> None:
        del self.channels[record.relid]
        self.offers.remove(record.offer)
        self.added_offers -= record.added

    def rescind(self, relid: int) -> list[Event]:
        record = self.channels[relid]
        events: list[Event] = []
        if record.state in (ChannelState.OPEN, ChannelState.OPENING):
            events += self._close(record)
        if not self.offers_requested:  # the child never saw it, so cannot release it
            self._forget(record)
            return events
        self._set_state(record, ChannelState.RESCINDED)
        return [*events, Reply(m.RescindChannelOffer(child_relid=relid))]

    def disconnect(self) -> list[Event]:
        """Close every channel and drop every GPADL and unfinished one
        (unload, or the child died): the child holds nothing after this but
        its offers; `refusals` keeps its history."""
        events: list[Event] = []
        for record in self.channels.values():
            if record.state in (ChannelState.OPEN, ChannelState.OPENING):
                events += self._close(record)
        events += [GpadlRemoved(gpadl) for gpadl in self.gpadls.values()]
        self.gpadls.clear()  # frees the index too
        self.assembler = self._new_assembler()
        for record in [c for c in self.channels.values() if c.state is ChannelState.RESCINDED]:
            self._forget(record)  # no child will release these now
        self.version = None
        self.offers_requested = False
        return events

    @staticmethod
    def _offer_message(record: ChannelRecord) -> m.OfferChannel:
        spec = record.offer
        return m.OfferChannel(
            if_type=spec.class_id,
            if_instance=spec.instance_id,
            mmio_megabytes=spec.mmio_megabytes,
            user_def=spec.user_def,
            sub_channel_index=spec.sub_channel_index,
            child_relid=record.relid,
            connection_id=record.relid,
        )


_HANDLERS: dict[type[m.Message], Callable[[VmbusServer, Any], list[Event]]] = {
    m.InitiateContact: VmbusServer._initiate_contact,
    m.RequestOffers: VmbusServer._request_offers,
    m.GpadlHeader: VmbusServer._gpadl_message,
    m.GpadlBody: VmbusServer._gpadl_message,
    m.OpenChannel: VmbusServer._open_channel,
    m.CloseChannel: VmbusServer._close_channel,
    m.GpadlTeardown: VmbusServer._gpadl_teardown,
    m.RelidReleased: VmbusServer._relid_released,
    m.Unload: VmbusServer._unload,
    m.ModifyChannel: VmbusServer._modify_channel,
}
