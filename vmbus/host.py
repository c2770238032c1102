"""The host side of the VMBus control protocol for one child, sans-I/O.

`VmbusServer.receive(payload)` takes one message from the child and returns
what to do: replies to post and channel events for the I/O layer (which
maps rings and starts VSPs). It never raises for anything the child sends:
a malformed or unexpected message is answered with the protocol's error
status where it has one, otherwise logged, counted and dropped.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from vmbus import messages as m

log = logging.getLogger(__name__)

FAILURE = 0xC0000001  # STATUS_UNSUCCESSFUL, the NTSTATUS Hyper-V answers with
MIN_RING_PAGES = 2  # a ring is a header page plus at least one data page


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
    """Control-protocol state for one child partition."""

    offers: list[OfferSpec]
    memory_pages: int
    version: int | None = None
    offers_requested: bool = False
    channels: dict[int, ChannelRecord] = field(default_factory=dict)
    gpadls: dict[int, m.Gpadl] = field(default_factory=dict)
    assembler: m.GpadlAssembler = field(default_factory=m.GpadlAssembler)
    protocol_errors: int = 0

    def __post_init__(self) -> None:
        specs, self.offers = self.offers, []
        for spec in specs:
            self.add_offer(spec)

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
        gpadl = self.assembler.feed(message)
        if gpadl is None:
            return []
        bad = [pfn for pfn in gpadl.pfns if pfn >= self.memory_pages]
        if bad:
            raise m.GpadlError(
                f"PFN {bad[0]} beyond the child's {self.memory_pages} pages",
                gpadl.gpadl,
                gpadl.child_relid,
            )
        if gpadl.gpadl in self.gpadls:  # another header completed first
            raise m.GpadlError("handle already in use", gpadl.gpadl, gpadl.child_relid)
        self.gpadls[gpadl.gpadl] = gpadl
        return [Reply(m.GpadlCreated(child_relid=gpadl.child_relid, gpadl=gpadl.gpadl))]

    def _gpadl_failed(self, error: m.GpadlError) -> list[Event]:
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
        gpadl = self.gpadls.get(message.ringbuffer_gpadlhandle)
        if gpadl is None or gpadl.child_relid != record.relid:
            return refuse(f"no GPADL {message.ringbuffer_gpadlhandle:#x} on this channel")
        offset = message.downstream_ringbuffer_pageoffset
        if gpadl.byte_offset or not (MIN_RING_PAGES <= offset <= len(gpadl.pfns) - MIN_RING_PAGES):
            return refuse(f"ring GPADL of {len(gpadl.pfns)} pages cannot split at page {offset}")
        record.state = ChannelState.OPENING
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
        record.state = ChannelState.OPEN if ok else ChannelState.OFFERED
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
            record.state = ChannelState.OFFERED
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
        del self.channels[record.relid]
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
        """Offer a channel (a sub-channel too); sent now if offers were asked."""
        relid = max(self.channels, default=0) + 1
        record = ChannelRecord(relid, spec)
        self.channels[relid] = record
        self.offers.append(spec)
        return [Reply(self._offer_message(record))] if self.offers_requested else []

    def rescind(self, relid: int) -> list[Event]:
        record = self.channels[relid]
        events: list[Event] = []
        if record.state in (ChannelState.OPEN, ChannelState.OPENING):
            events += self._close(record)
        if not self.offers_requested:  # the child never saw it, so cannot release it
            del self.channels[relid]
            return events
        record.state = ChannelState.RESCINDED
        return [*events, Reply(m.RescindChannelOffer(child_relid=relid))]

    def disconnect(self) -> list[Event]:
        """Close every channel and drop every GPADL (unload, or the child died)."""
        events: list[Event] = []
        for record in self.channels.values():
            if record.state in (ChannelState.OPEN, ChannelState.OPENING):
                events += self._close(record)
        events += [GpadlRemoved(gpadl) for gpadl in self.gpadls.values()]
        self.gpadls.clear()
        self.assembler = m.GpadlAssembler()
        for relid in [r for r, c in self.channels.items() if c.state is ChannelState.RESCINDED]:
            del self.channels[relid]  # no child will release these now
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
