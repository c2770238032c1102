"""storvsp: a synthetic SCSI controller on the VMBus (enlightened SCSI).

The guest's SCSI CDBs arrive in VSTOR packets; their data moves through
GPA-direct page ranges straight between guest memory and the backend (for a
raw file: one preadv/pwritev on the guest's pages). There is no device
emulation in between: each request is copied out of the ring once, parsed
once (`StorvspProtocol.receive`), and its CDB goes to the SCSI target as
that private copy.

One `StorVsp` is one controller of one child: one SCSI target (path 0,
target 0, as Hyper-V presents a controller) with its LUNs, its primary
channel and the sub-channels the guest creates for parallelism. Other
paths and targets hold no device: they answer SRB_STATUS_INVALID_LUN, the
status Linux's storvsc takes for "nothing here" (DID_NO_CONNECT). Because
Linux forces every INQUIRY completion to success and reads what was moved,
an INQUIRY there also returns the "no logical unit" INQUIRY data
(qualifier 3, type 1Fh) rather than nothing, which Linux would read as an
all-zero buffer: a direct-access disk.

The steady state (READ/WRITE/SYNCHRONIZE CACHE to a raw-file disk) is served
by a compiled path, `vsp.storage._fast`, from the head of the ring before the
Python drain takes a packet; it declines everything else to `on_packet`,
which stays the definition of behaviour. `StorVsp(fast_path=False)` or
VMBUS_STORAGE_FAST=0 turns it off (A/B runs); it is off by itself on the
Python ring (VMBUS_RING=python) or when the extension is not built.

A backend that is `concurrent` (DirectBackend) has its READs and WRITEs run
in the channel's I/O pool (`vsp.storage.pool`), up to MAX_IN_FLIGHT at once,
so a guest's queue depth reaches the device. Their completions come back to
the worker through the pool's eventfd and are written there, in the order
they finish (VSTOR completions carry the request's transaction id; Linux's
storvsc matches them by it). The reply reserve covers every request in
flight, so each completion still fits when it comes.

Channels are served by threads of their own (`ChannelHandler.own_thread`;
`StorVsp(channel_threads=False)` keeps them on the worker's loop), so the
compiled paths of several channels move data at once. The primary has one
too where the worker's loop watches a descriptor for it: CREATE_SUB_CHANNELS
is answered on the primary's thread, and the loop, which alone talks to the
control plane, makes the offers when that descriptor wakes it
(`SubChannelOffers`). What the channels share is guarded: the protocol's
state and counters by the controller's lock, a disk's unit attention and
counters by its own (vsp.storage._scsi_unit); backends move data with
positioned, thread-safe system calls. A channel on its own thread has its
pool's completions wake its own doorbell, and takes them on its thread.

On its thread a channel is served by a compiled loop (`FastPath.run`)
that drains, publishes, spins without the GIL for the next request (the
ring masked, so the guest rings no doorbell; for about three times the
guest's usual wait, learnt, at most `poll_seconds`), then unmasks and
sleeps on the doorbell, in C, and returns to Python only for a packet it
declines, a ring to report, a full ring, every RUN_TURN (the thread's loop
then sees a stop request) and after RUN_IDLE without a request. What it
read of the disks and the protocol it reads again when vsp.storage.changes
says they changed. On the worker's loop, poll mode is the Python
`_poll_mode`: after a wake-up that served requests the channel spins
(FastPath.poll) and serves the next at once, for up to POLL_TURN.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from vmbus import guid
from vmbus._ringpacket import Packet
from vmbus.channel import DEFAULT_SPIN_SECONDS, PAUSED, Channel
from vmbus.device import BadGpaRanges, ChannelHandler, OpenContext, Vsp
from vmbus.errors import UsageError
from vmbus.host import OfferSpec
from vmbus.memory import guest_segments
from vmbus.packet import GpaRange, PacketType
from vmbus.protocols import storage as vstor
from vmbus.protocols.storage.scsi_wire import GOOD, Opcode
from vsp.storage.backends import BlockBackend
from vsp.storage.changes import changed
from vsp.storage.offers import SubChannelOffers
from vsp.storage.pool import IoPool
from vsp.storage.scsi import LIMITS, MAX_TRANSFER_BYTES, ScsiDisk, ScsiTarget

try:
    from vsp.storage._fast import RUN_PYTHON, RUN_STUCK, FastPath
except ImportError:  # not built: every packet takes the Python path
    FastPath = None  # type: ignore[assignment,misc]
    RUN_PYTHON, RUN_STUCK = 1, 2

__all__ = [
    "DEFAULT_MAX_TRANSFER",
    "StorVsp",
    "StorvspChannel",
    "StorvspSubChannel",
    "StorvspThreadedPrimary",
]

DEFAULT_MAX_TRANSFER = MAX_TRANSFER_BYTES
# (path_id, target_id) of the one SCSI target a controller presents.
TARGET_ADDRESS = (0, 0)
# Commands a target answers for a LUN that holds no disk (SPC-4 §4.6.4);
# anything else there is SRB_STATUS_INVALID_LUN, which Linux takes as "LUN gone".
_TARGET_COMMANDS = frozenset(
    bytes((op,)) for op in (Opcode.INQUIRY, Opcode.REPORT_LUNS, Opcode.REQUEST_SENSE)
)
_INQUIRY = bytes((Opcode.INQUIRY,))
_NOBODY = ScsiTarget()  # answers INQUIRY at an address with no target: no logical unit
# What runs in the I/O pool for a concurrent backend: the data moves, nothing else.
_OVERLAPPED = frozenset(
    bytes((op,))
    for op in (Opcode.READ_6, Opcode.READ_10, Opcode.READ_12, Opcode.READ_16)
    + (Opcode.WRITE_6, Opcode.WRITE_10, Opcode.WRITE_12, Opcode.WRITE_16)
)
MAX_IN_FLIGHT = 64  # requests of one channel in the I/O pool at once
POLL_SECONDS = DEFAULT_SPIN_SECONDS  # a channel's GIL-free spin for its next request
POLL_MISSES = 4  # spins in a row that found nothing before poll mode backs off
POLL_PROBE = 32  # then spin after one wake-up in this many
POLL_TURN = 100e-6  # seconds a channel serves itself in poll mode before the loop's turn
# A channel on a thread of its own runs the compiled loop (FastPath.run) for
# up to RUN_TURN, then lets its thread's loop look at its stop request (a
# close waits for that); it sleeps on its doorbell in that loop for at most
# RUN_IDLE before it does. Each return costs a pass of the Python service,
# which may take a request the compiled loop would have (it comes as the
# drain looks), so the turn is long.
RUN_TURN = 20e-3
RUN_IDLE = 5e-3

log = logging.getLogger(__name__)


def fast_path_default() -> bool:
    """On unless VMBUS_STORAGE_FAST is 0 (or off/false/no)."""
    return os.environ.get("VMBUS_STORAGE_FAST", "1").lower() not in ("0", "off", "false", "no")


class StorVsp(Vsp):
    """A SCSI controller with `disks` by LUN, offered as one VMBus device.

    `max_transfer_bytes` is the one transfer limit: what QUERY_PROPERTIES
    offers, what each SRB is checked against, and what every disk
    advertises in VPD 0xB0 and enforces."""

    def __init__(
        self,
        disks: Mapping[int, BlockBackend] | Sequence[BlockBackend],
        *,
        instance_id: uuid.UUID | None = None,
        max_transfer_bytes: int = DEFAULT_MAX_TRANSFER,
        channels: int = 1,
        serial: str = "vmbus",
        fast_path: bool | None = None,
        channel_threads: bool = True,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        by_lun = dict(disks) if isinstance(disks, Mapping) else dict(enumerate(disks))
        self.instance_id = instance_id or uuid.uuid4()
        self.max_transfer_bytes = max_transfer_bytes
        self.channels = channels
        self.fast_path = fast_path_default() if fast_path is None else fast_path
        self.channel_threads = channel_threads  # sub-channels on threads of their own
        self.poll_seconds = poll_seconds  # poll mode's spin; 0: interrupt-driven
        self.lock = threading.Lock()  # the protocol, which every channel's requests go through
        self.protocol = self._new_protocol()  # checks the configuration first
        limits = replace(LIMITS, max_transfer_bytes=max_transfer_bytes)
        self.target = ScsiTarget(
            {
                lun: ScsiDisk(backend, serial=f"{serial}-{lun}", limits=limits)
                for lun, backend in by_lun.items()
            }
        )
        self.targets = {TARGET_ADDRESS: self.target}  # the addresses that answer
        self.handlers: list[StorvspChannel] = []  # the open channels
        self.offered: set[int] = set()  # sub-channel indexes offered: each once
        self.served: Counter[int] = Counter()  # requests by sub-channel index, all time
        self._retired_errors = 0  # errors of closed channels and replaced protocols
        self._retired = Counter[str]()  # fast-path and overlapped counts of closed channels

    def __getstate__(self) -> dict[str, object]:
        """What crosses to the worker process (before any channel opens):
        the configuration, the disks and their backends (which hand over
        their descriptors), the counters so far; never a channel."""
        if self.handlers:
            raise UsageError("a StorVsp with open channels cannot be handed to a worker")
        state = self.__dict__.copy()
        del state["lock"]  # a lock does not pickle: the worker's copy makes its own
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self.lock = threading.Lock()

    def stats(self) -> dict[str, Any]:
        """Requests served (all, by the compiled path, overlapped in the I/O
        pool, and by channel index), bad requests, and SCSI CHECK CONDITIONs
        by LUN, since the controller was built."""
        by_channel = self.served.copy()
        totals = self._retired.copy()
        for handler in self.handlers:
            by_channel[handler.context.offer.sub_channel_index] += handler.requests
            for name, value in handler.counters().items():
                totals[name] += value
        return {
            "requests": sum(by_channel.values()),
            "fast_path_requests": totals["fast_path_requests"],
            "overlapped_requests": totals["overlapped_requests"],
            # Toward the guest: packets written, and doorbells rung (it slept).
            "packets_sent": totals["packets_sent"],
            "signals_sent": totals["signals_sent"],
            "errors": self.errors,
            "protocol_errors": dict(self.protocol.errors),
            "check_conditions": {
                str(lun): disk.check_conditions for lun, disk in self.target.disks.items()
            },
            "requests_by_channel": {str(index): n for index, n in sorted(by_channel.items())},
            "open_channels": len(self.handlers),
            "fast_path": self.fast_path,
        }

    def _new_protocol(self) -> vstor.StorvspProtocol:
        return vstor.StorvspProtocol(self.max_transfer_bytes, self.channels)

    def offers(self) -> list[OfferSpec]:
        return [OfferSpec(guid.SCSI, self.instance_id)]

    def open(self, channel: Channel, context: OpenContext) -> StorvspChannel:
        changed()  # a new protocol, or a new channel: compiled paths read afresh
        if context.offer.sub_channel_index == 0:  # a (re)opened primary starts over
            with self.lock:
                self._retired_errors += sum(self.protocol.errors.values())
                self.protocol = self._new_protocol()
        handler = self._handler(channel, context)
        self.handlers.append(handler)
        return handler

    def _handler(self, channel: Channel, context: OpenContext) -> StorvspChannel:
        """Sub-channels on threads of their own; the primary too, when the
        compiled loop is there to serve it and the worker's loop can make
        its sub-channel offers (it watches a descriptor for them)."""
        if self.channel_threads and context.offer.sub_channel_index:
            return StorvspSubChannel(self, channel, context)
        if self.channel_threads and self.fast_path and FastPath is not None:
            offers = SubChannelOffers(
                functools.partial(self.offer_sub_channels, context=context), context
            )
            if offers.fd >= 0:
                return StorvspThreadedPrimary(self, channel, context, offers)
        return StorvspChannel(self, channel, context)

    def offer_sub_channels(self, count: int, context: OpenContext) -> None:
        """Offer sub-channels 1..count that were never offered: a sub-channel
        the guest creates again (after reopening the primary) reuses its offer."""
        for index in range(1, count + 1):
            if index not in self.offered:
                self.offered.add(index)
                context.add_offer(OfferSpec(guid.SCSI, self.instance_id, index))

    def closed(self, handler: StorvspChannel) -> None:
        """A channel closed: forget its handler, keep what it counted."""
        if handler in self.handlers:
            self.handlers.remove(handler)
            self._retired_errors += handler.bad_ranges
            self.served[handler.context.offer.sub_channel_index] += handler.requests
            self._retired.update(handler.counters())

    @property
    def errors(self) -> int:
        """Bad requests answered with an error status, on every channel, ever."""
        live = sum(self.protocol.errors.values()) + sum(h.bad_ranges for h in self.handlers)
        return self._retired_errors + live


class StorvspChannel(ChannelHandler):
    """The service of one open channel (primary or sub-channel)."""

    max_reply = vstor.VSTOR_PACKET_SIZE  # every completion is one vstor_packet

    def __init__(self, vsp: StorVsp, channel: Channel, context: OpenContext) -> None:
        super().__init__(channel, context)
        self.vsp = vsp
        self.handled = 0  # requests the Python path answered
        self.overlapped = 0  # of requests: run in the I/O pool
        self.bad_ranges = 0
        self.fast = self._fast_path() if vsp.fast_path else None
        self._fast_closed = 0  # what the compiled path served, once it is dropped
        self.pool: IoPool | None = None  # started by the first overlapped request
        self.pool_watched = False  # its completions come through the worker's loop
        self.overlap = True  # False once the context turned out to have no worker
        self.primary = context.offer.sub_channel_index == 0
        self._loop_thread = threading.get_ident()  # the worker's loop opens channels
        self._served_before = 0  # requests, at the last poll-mode decision
        self._poll_misses = 0
        self._polls = 0

    def _fast_path(self) -> FastPath | None:
        """The compiled path, when the channel runs on the Cython ring."""
        if FastPath is None:
            return None
        try:
            return FastPath(self.channel, self.context.memory, self.context.ring_pfns, self.reserve)
        except TypeError:  # the Python ring: no C-level access
            return None

    @property
    def requests(self) -> int:
        """Requests answered on this channel, by either path; live (another
        thread may read it while the compiled loop serves)."""
        return self.handled + self.compiled_requests

    @property
    def compiled_requests(self) -> int:
        fast = self.fast
        return self._fast_closed if fast is None else fast.served

    def counters(self) -> dict[str, int]:
        """What this channel adds to StorVsp.stats()."""
        return {
            "fast_path_requests": self.compiled_requests,
            "overlapped_requests": self.overlapped,
            "packets_sent": self.channel.packets_sent,
            "signals_sent": self.channel.signals_sent,
        }

    def admission(self) -> int:
        """Asked before each packet the drain takes: first the compiled path
        serves what it can from the head of the ring (stopping at the first
        packet it declines, which the drain then hands to on_packet)."""
        room = super().admission()
        if self.pool is not None and self.pool.in_flight and room < PAUSED:
            # Room for the reply of each request in flight, and this one's;
            # the compiled path (its reserve is one reply) waits meanwhile.
            if self.pool.in_flight >= MAX_IN_FLIGHT:
                return PAUSED  # a completion wakes the channel
            return room * (self.pool.in_flight + 1)
        if self.fast is not None and room < PAUSED and not self.channel.backlog:
            self.fast_served += self.fast.drain(self.vsp)
        return room

    def on_packet(self, packet: Packet) -> None:
        self.handled += 1
        ranges: Sequence[GpaRange] = ()
        if packet.type == PacketType.DATA_USING_GPA_DIRECT:
            try:
                ranges = self.context.gpa_ranges(packet.header)  # counted and logged there
            except BadGpaRanges:
                self.bad_ranges += 1  # no buffer: an SRB with data fails as INVALID_REQUEST
        with self.vsp.lock:
            protocol = self.vsp.protocol
            event = protocol.receive(packet.payload, ranges, primary=self.primary)
        if not isinstance(event, vstor.ExecuteSrb):
            changed()  # the protocol's state may move: compiled paths read it again
        if isinstance(event, vstor.ExecuteSrb):
            if self._overlap(packet.trans_id, event):
                return  # answered by _complete
            reply = self._execute(event)
        elif isinstance(event, vstor.CreateSubChannels):
            self._offer_sub_channels(event.count)
            reply = event.reply
        else:
            if event.error:
                self.context.protocol_error("storage request refused: %s", event.error)
            reply = event.payload
        self.reply(packet.trans_id, reply)

    def _offer_sub_channels(self, count: int) -> None:
        self.vsp.offer_sub_channels(count, self.context)

    def _execute(self, srb: vstor.ExecuteSrb) -> bytes:
        protocol = self.vsp.protocol
        path_id, target_id, lun = srb.address
        target = self.vsp.targets.get((path_id, target_id))
        if target is None:
            return self._absent(srb)
        if lun not in target.disks and srb.cdb[:1] not in _TARGET_COMMANDS:
            return protocol.complete_srb(srb.request, vstor.SrbStatus.INVALID_LUN)
        data = guest_segments(self.context.memory, srb.ranges, srb.transfer_length)
        result = target.execute(lun, srb.cdb, data, srb.direction)
        status = vstor.SrbStatus.SUCCESS if result.status == GOOD else vstor.SrbStatus.ERROR
        return protocol.complete_srb(
            srb.request, status, result.status, result.sense, result.transferred
        )

    def _overlap(self, trans_id: int, srb: vstor.ExecuteSrb) -> bool:
        """Hand a READ/WRITE for a concurrent backend to the I/O pool; False
        for every other request (and a pending unit attention, which the
        Python path reports), and for a request with nothing to overlap:
        none in flight and no other packet behind it in the ring."""
        if srb.cdb[:1] not in _OVERLAPPED or srb.address[:2] != TARGET_ADDRESS:
            return False
        disk = self.vsp.target.disks.get(srb.lun)
        if disk is None or not disk.backend.concurrent or disk.unit_attention is not None:
            return False
        idle = self.pool is None or not self.pool.in_flight
        if idle and not self.channel.reader.bytes_available:
            return False  # a lone request (QD1): inline, without two thread hand-offs
        if self.pool is None and not self._start_pool():
            return False
        assert self.pool is not None
        data = guest_segments(self.context.memory, srb.ranges, srb.transfer_length)
        work = functools.partial(disk.execute, srb.cdb, data, srb.direction)
        self.pool.submit((trans_id, srb.request, self.vsp.protocol), work)
        self.overlapped += 1
        return True

    def _start_pool(self) -> bool:
        """The I/O pool, its eventfd watched by the worker; False (and every
        request inline from then on) where the context has no worker to watch.
        On a thread of our own, the pool rings the channel's doorbell instead,
        and on_signal takes its completions here (the worker's loop must not
        write this channel's ring)."""
        if not self.overlap:
            return False
        if self._on_own_thread():
            self.pool = IoPool(notify=self.channel.wake_me.fileno())
            return True
        pool = IoPool()
        try:
            self.context.watch(pool.fd, self._complete)
        except UsageError:
            pool.close()
            self.overlap = False
            return False
        self.pool = pool
        self.pool_watched = True
        return True

    def _on_own_thread(self) -> bool:
        return threading.get_ident() != self._loop_thread

    def on_signal(self) -> None:
        super().on_signal()
        if self.pool is not None and not self.pool_watched:
            self._complete()
        if self.own_thread and self._on_own_thread():  # not a harness's one thread
            self._run_compiled()
        else:
            self._poll_mode()

    def _run_compiled(self) -> None:
        """On a thread of our own: serve from the compiled loop (it drains,
        spins for the next request, and sleeps on the doorbell, all without
        the GIL) until it hands a packet to Python, its turn ends, or the
        guest goes quiet; then ring our own doorbell if the ring needs our
        service again, so the thread's loop (which sees its stop request
        there) serves it at once."""
        fast = self.fast
        if fast is None or self.paused or self.channel.backlog or self.backlog:
            return
        if self.pool is not None and self.pool.in_flight:
            return  # completions come through the doorbell: on_signal writes them
        served, why = fast.run(self.vsp, self.vsp.poll_seconds, RUN_TURN, RUN_IDLE)
        self.fast_served += served
        if why == RUN_PYTHON or (why == RUN_STUCK and served):
            self.channel.wake_me.set()

    def _poll_mode(self) -> None:
        """After a wake-up that served requests: spin, without the GIL and
        with the ring masked, for the next one, and serve it here, for up
        to POLL_TURN; then ring our own doorbell, so the worker's loop (or
        our thread's) has its turn before it serves us again."""
        served, self._served_before = self.requests - self._served_before, self.requests
        if not served or self.fast is None or not self.vsp.poll_seconds:
            return
        if not self.own_thread and sum(not h.own_thread for h in self.vsp.handlers) > 1:
            return  # channels that share the loop: its own spin watches them all
        self._polls += 1
        if self._poll_misses >= POLL_MISSES and self._polls % POLL_PROBE:
            return
        reader, channel = self.channel.reader, self.channel
        turn_ends = time.perf_counter() + POLL_TURN
        while self.fast is not None and (self.pool is None or not self.pool.in_flight):
            reader.begin_drain()
            found = self.fast.poll(self.vsp.poll_seconds)
            if not reader.end_drain() and not found:  # unmasked again either way
                self._poll_misses += 1
                return
            self._poll_misses = 0
            if time.perf_counter() > turn_ends:
                break
            before = self.requests
            channel.service(self.on_packet, self.admission)
            super().on_signal()
            if self.pool is not None and not self.pool_watched:
                self._complete()
            if self.requests == before:
                break  # nothing taken (no room for replies): the loop's wake-up handles it
        self._served_before = self.requests
        channel.wake_me.set()

    def _complete(self) -> None:
        """The pool's eventfd is readable: write the completions that came."""
        if self.pool is None:
            return
        for (trans_id, request, protocol), result, error in self.pool.completions():
            if error is not None:  # a bug of ours, not the guest's: answer it anyway
                log.error("storvsp: overlapped request failed", exc_info=error)
                reply = protocol.complete_srb(request, vstor.SrbStatus.ERROR)
            else:
                status = vstor.SrbStatus.SUCCESS if result.status == GOOD else vstor.SrbStatus.ERROR
                reply = protocol.complete_srb(
                    request, status, result.status, result.sense, result.transferred
                )
            self.reply(trans_id, reply)
        if self.channel.reader.bytes_available:
            self.channel.wake_me.set()  # requests held back for room: take them now

    def _absent(self, srb: vstor.ExecuteSrb) -> bytes:
        """An address with no target: INVALID_LUN, with "no logical unit"
        INQUIRY data for an INQUIRY (see the module doc)."""
        moved = 0
        if srb.cdb[:1] == _INQUIRY:
            data = guest_segments(self.context.memory, srb.ranges, srb.transfer_length)
            result = _NOBODY.execute(srb.lun, srb.cdb, data, srb.direction)
            moved = result.transferred if result.status == GOOD else 0
        return self.vsp.protocol.complete_srb(
            srb.request, vstor.SrbStatus.INVALID_LUN, transferred=moved
        )

    def close(self) -> None:
        self._fast_closed = self.compiled_requests
        self.fast = None  # it holds the rings, which the worker unmaps next
        if self.pool is not None:  # running I/O finishes, nothing is answered after
            if self.pool_watched:
                self.context.unwatch(self.pool.fd)
            self.pool.close()
            self.pool = None
        super().close()
        self.vsp.closed(self)


class StorvspSubChannel(StorvspChannel):
    """A sub-channel, served by a thread of its own (see the module doc)."""

    own_thread = True


class StorvspThreadedPrimary(StorvspSubChannel):
    """The primary channel on a thread of its own: the sub-channels it is
    asked for are offered by the worker's loop (which alone talks to the
    control plane), woken through a descriptor it watches."""

    def __init__(
        self, vsp: StorVsp, channel: Channel, context: OpenContext, offers: SubChannelOffers
    ) -> None:
        super().__init__(vsp, channel, context)
        self.offers = offers

    def _offer_sub_channels(self, count: int) -> None:
        self.offers.request(count)

    def close(self) -> None:
        self.offers.close()
        super().close()
