"""The device contract between a VSP and the worker that serves it.

A `Vsp` says what it offers and opens a `ChannelHandler` for each channel
the guest opens. The worker drives the handler: `on_packet` for each
request, `on_signal` after each wake-up, `close` once. The defaults are the
safe ones, so no VSP can wedge its worker or lose its channel by forgetting
something:

- a handler takes a request only when the ring back to the guest has room
  for its largest reply (`max_reply`), so `reply` never waits;
- unsolicited packets (`post`: input events, video acks) wait in a bounded
  backlog while the guest is slow to read, and go out on `on_signal` once
  it has made room; past `backlog_limit` they are dropped and counted;
- `close` does nothing unless the VSP has something to release.

`OpenContext` is everything a VSP may touch of the child: its memory only
through the checked intake of GPA-direct ranges and bounds-checked GPADL
views, its control plane only through `add_offer`. VSPs never import the
process layer (`vmbus.partition`).
"""

from __future__ import annotations

import collections
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from vmbus._ringpacket import Packet
from vmbus.channel import PAUSED, VM_PKT_COMP, VM_PKT_DATA_INBAND, Channel, packet_space
from vmbus.errors import PeerError, PeerLog, UsageError
from vmbus.gpadl import Gpadl, GpadlTable
from vmbus.guid import class_name
from vmbus.host import OfferSpec
from vmbus.memory import GuestMemory, MappedRegion, map_contiguous
from vmbus.packet import GpaRange, PacketError, decode_gpa_direct_header
from vmbus.timers import Timer

__all__ = [
    "BadGpaRanges",
    "ChannelHandler",
    "OpenContext",
    "UnknownGpadl",
    "Vsp",
    "packet_space",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_REPLY = 512  # bytes; a handler whose replies are larger says so
DEFAULT_BACKLOG_LIMIT = 1024  # unsolicited packets held for a slow guest


class BadGpaRanges(PeerError, ValueError):
    """A GPA-direct header that is malformed, names pages outside the child's
    memory, or names the channel's own ring pages."""


class UnknownGpadl(PeerError, KeyError):
    """The guest named a GPADL handle it never established."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def _no_watch(fd: int, callback: Callable[[], None]) -> None:
    raise UsageError("this context has no worker to watch descriptors")


def _no_unwatch(fd: int) -> None:
    raise UsageError("this context has no worker to watch descriptors")


def _no_offer(offer: OfferSpec) -> None:
    raise UsageError("this context cannot offer channels")


def _no_timer(delay: float, callback: Callable[[], None]) -> Timer:
    raise UsageError("this context has no worker to run timers")


class OpenContext:
    """What a VSP learns, and may use, when the guest opens one of its channels."""

    def __init__(
        self,
        offer: OfferSpec,
        memory: GuestMemory,
        *,
        userdata: bytes = bytes(120),
        ring_pfns: frozenset[int] = frozenset(),
        partition: str = "guest",
        gpadls: Mapping[int, Gpadl] | None = None,
        add_offer: Callable[[OfferSpec], None] = _no_offer,
        watch: Callable[[int, Callable[[], None]], None] = _no_watch,
        unwatch: Callable[[int], None] = _no_unwatch,
        call_later: Callable[[float, Callable[[], None]], Timer] = _no_timer,
        peer_log: PeerLog | None = None,
    ) -> None:
        self.offer = offer
        self.memory = memory  # the child's memory; prefer the checked calls below
        self.userdata = userdata  # the 120 bytes of the guest's OPENCHANNEL
        self.ring_pfns = ring_pfns  # the channel's ring pages: never a target of device data
        self.partition = partition  # the child's name, for logs
        self.gpadls: Mapping[int, Gpadl] = {} if gpadls is None else gpadls  # live
        self.add_offer = add_offer  # offer another channel (a sub-channel)
        self.watch = watch  # call back, in the worker, when fd is readable
        self.unwatch = unwatch  # stop watching fd (before closing it)
        # Run a callback in the worker's loop after `delay` seconds (a
        # heartbeat): a Timer to cancel; the channel's close cancels it too.
        self.call_later = call_later
        self.peer_log = peer_log or PeerLog(log, partition)
        self.bad_ranges = 0

    def protocol_error(self, reason: str, *args: object) -> None:
        """Count and log (rate-limited) one protocol error of the child."""
        self.peer_log(reason, *args)

    # --- GPA-direct data -------------------------------------------------

    def gpa_ranges(self, header: Any) -> list[GpaRange]:
        """The checked GPA ranges of a GPA-direct packet, decoded from a
        private copy of its header: every PFN inside the child's memory, none
        on this channel's rings. BadGpaRanges (counted, logged) otherwise."""
        private = bytes(header)  # the guest cannot change it between check and use
        try:
            ranges = decode_gpa_direct_header(private, max_pfn=self.memory.page_count)
        except PacketError as error:
            raise self._bad_ranges(str(error)) from None
        if self.ring_pfns and any(not self.ring_pfns.isdisjoint(r.pfns) for r in ranges):
            raise self._bad_ranges("GPA ranges overlap the channel's rings")
        return ranges

    def _bad_ranges(self, reason: str) -> BadGpaRanges:
        self.bad_ranges += 1
        self.protocol_error("%s channel: %s", class_name(self.offer.class_id), reason)
        return BadGpaRanges(reason)

    # --- GPADLs ------------------------------------------------------------

    def gpadl(self, handle: int) -> Gpadl:
        """The child's established GPADL `handle`; UnknownGpadl if there is none."""
        gpadl = self.gpadls.get(handle)
        if gpadl is None:
            raise UnknownGpadl(f"no GPADL {handle:#x}")
        return gpadl

    def gpadl_segments(self, handle: int, offset: int, length: int) -> list[memoryview]:
        """Views of bytes [offset, offset + length) of GPADL `handle`, bounds-checked
        against the GPADL (OutOfBounds otherwise); one view per run of pages."""
        return self.gpadl(handle).segments(self.memory, offset, length)

    def map_gpadl(self, handle: int) -> tuple[Gpadl, MappedRegion]:
        """GPADL `handle` mapped virtually contiguous (a netvsc buffer). The
        region's view spans whole pages; the GPADL's `byte_count` bounds what
        the guest granted."""
        gpadl = self.gpadl(handle)
        return gpadl, map_contiguous(self.memory, gpadl.pfns)

    def gpadl_covering(self, gpa: int, length: int) -> Gpadl | None:
        """A GPADL whose granted bytes include [gpa, gpa + length) contiguously
        (synthvid's VRAM), or None. O(log pages + pages asked) through the
        host's GpadlTable, whatever the number of GPADLs; another mapping
        (a test's dict) is searched GPADL by GPADL."""
        if isinstance(self.gpadls, GpadlTable):
            return self.gpadls.covering(gpa, length)
        for gpadl in self.gpadls.values():
            if gpadl.offset_of(gpa, length) is not None:
                return gpadl
        return None


class ChannelHandler:
    """A VSP's service of one open channel. Subclasses implement `on_packet`
    and may raise `max_reply` (their largest completion, in bytes) and
    override `on_signal` and `close`, calling the base's."""

    max_reply: ClassVar[int] = DEFAULT_MAX_REPLY
    backlog_limit: ClassVar[int] = DEFAULT_BACKLOG_LIMIT
    # True: the worker serves this channel from a thread of its own, which
    # waits on its doorbell, so the GIL-free paths of several channels (a
    # device's sub-channels) run at once. Its `on_packet`, `admission` and
    # `on_signal` then run on that thread, while descriptors it `watch`es
    # are still served by the worker's main loop: the handler guards what
    # the two share.
    own_thread: ClassVar[bool] = False

    def __init__(self, channel: Channel, context: OpenContext) -> None:
        self.channel = channel
        self.context = context
        self.backlog: collections.deque[tuple[bytes, int, int, int]] = collections.deque()
        self.dropped = 0  # unsolicited packets lost to a full backlog
        # Ring bytes that must be free toward the guest before a request is
        # taken: room for its reply, so `reply` never waits. Asked per packet,
        # so computed once.
        self.reserve = packet_space(self.max_reply)
        self.paused = False
        # Packets a compiled path took in `admission()`, which the drain does
        # not count: the worker counts them as progress (poll mode goes on).
        self.fast_served = 0

    def admission(self) -> int:
        """What the worker asks before handing over each request: the free
        ring bytes it needs (the reserve), or, while `paused`, more than any
        ring holds, so no request is taken until `resume`. It is the one
        point before each packet, so a handler with a compiled fast path
        serves the head of the ring here first (storvsp) and leaves the
        packet it declines for `on_packet`."""
        return PAUSED if self.paused else self.reserve

    def pause(self) -> None:
        """Take no request until `resume` (e.g. a backend has no room)."""
        self.paused = True

    def resume(self) -> None:
        """Take requests again: the worker serves the ring once more."""
        if self.paused:
            self.paused = False
            self.channel.wake_me.set()

    def on_packet(self, packet: Packet) -> None:
        """One packet from the guest; a view valid during the call only."""
        raise NotImplementedError

    def on_signal(self) -> None:
        """After each wake-up of the channel: send what waited for room."""
        self.flush_backlog()

    def close(self) -> None:
        """The channel closed (guest request, rescind, or the child died)."""
        self.backlog.clear()

    # --- sending -------------------------------------------------------------

    def reply(
        self, trans_id: int, payload: Any, header: Any = b"", *, type: int = VM_PKT_COMP
    ) -> None:
        """Complete request `trans_id`. The reserve guarantees the room.
        `type`: protocols that answer inband (synthvid, synthhid) say so."""
        if memoryview(payload).nbytes + memoryview(header).nbytes > self.max_reply:
            raise UsageError(f"a reply of {memoryview(payload).nbytes} bytes exceeds max_reply")
        self.channel.send(payload, type=type, trans_id=trans_id, header=header, timeout=0)

    def post(
        self, payload: Any, *, type: int = VM_PKT_DATA_INBAND, flags: int = 0, trans_id: int = 0
    ) -> bool:
        """Send an unsolicited packet without waiting and without eating into
        the reserve. False if it had to wait in the backlog, or was dropped."""
        data = bytes(payload)
        if not self.backlog and self._try_post(data, type, flags, trans_id):
            return True
        if len(self.backlog) >= self.backlog_limit:
            self.dropped += 1
            return False
        self.backlog.append((data, type, flags, trans_id))
        return False

    def flush_backlog(self) -> None:
        while self.backlog:
            data, type, flags, trans_id = self.backlog[0]
            if not self._try_post(data, type, flags, trans_id):
                return
            self.backlog.popleft()

    def _try_post(self, data: bytes, type: int, flags: int, trans_id: int) -> bool:
        need = packet_space(len(data)) + self.reserve
        writer = self.channel.writer
        # When short, the guest is asked to signal once it has read enough.
        if writer.free_bytes <= need and not writer.request_space(need):
            return False
        return self.channel.try_send(data, type, flags, trans_id)


class Vsp(ABC):
    """A device back end: the channels it offers, and how it serves one.

    A Vsp given to `Host.start` is built in the parent and served in the
    VM's worker process: it is pickled there (`vmbus.handoff`), before any
    channel opens, and its parent-side API (injection, a console, a switch
    port) must reach the worker's copy through descriptors it shares:
    shared memory, a socket pair, an eventfd."""

    @abstractmethod
    def offers(self) -> list[OfferSpec]:
        """The channels to offer the guest when it connects."""

    @abstractmethod
    def open(self, channel: Channel, context: OpenContext) -> ChannelHandler:
        """Serve a channel the guest opened; raise PeerError to refuse it."""

    def stats(self) -> dict[str, Any]:
        """The device's counters, JSON-able: what `ChildPartition.device_stats`
        reports from the VM's worker, wherever the device runs."""
        return {}

    def control(self, request: dict[str, Any], reply: Callable[[dict[str, Any]], None]) -> None:
        """A request of the parent (`ChildPartition.control`, the management
        service's API), JSON in and out, run in the worker's loop: call
        `reply` once, now or later (when the guest has answered), with
        {"error": reason} for a failure found later (the guest never
        answered). Raise UsageError for a request the device does not take.
        Either reaches the caller as a ControlError with the reason."""
        raise UsageError(f"{type(self).__name__} takes no requests")
