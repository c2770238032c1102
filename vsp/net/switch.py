"""The learning switch: an Ethernet switch in the parent between children,
each port a `SwitchPort` (a `NetBackend`) that may live in a VM's worker
process (`vsp.net.switch_port`: two rings in a memfd, doorbells).

- Forwarding runs in the parent, in one thread that serves every port
  (`serve=False` leaves it to `pump()`, for tests): it selects on the ports'
  doorbells, reads at most BATCH frames of a port per pass (so a flooding
  port gets its share, not more) and never spins: a port with nothing to
  read, or waiting for room, costs nothing until its doorbell rings.
- Learning, pinned: a port's address is the MAC it was made with, or else
  the first unicast source address it sends from. Frames to a pinned address
  go to its port alone; broadcast, multicast and unknown unicast are flooded.
  A frame whose source is another port's address is dropped and counted
  (`spoofed`). A port made with a MAC also refuses, on its own side, frames
  from any other unicast address (so its netvsp reports them failed).
- Flow control: each port queues at most `queue_frames` frames in its ring.
  A unicast frame for a full port is held in the switch, and the sender's
  frames behind it stay in its ring, which fills, so its netvsp stops
  taking the guest's requests: back-pressure, no loss. Held senders resume
  once the port drains to half. A port that drains nothing for
  `stall_seconds` while senders wait is stalled: frames to it are dropped
  (counted) until it drains. Flooded frames never wait: a full port drops
  them, counted.
- A hostile worker fails alone: everything read from its memory is checked
  (the rings' own index and descriptor checks, each frame's length against
  the MTU, its receive counter against what was written). A port whose
  ring is corrupt, or whose worker hung up (died, or closed the port), is
  removed, counted in `removals` and logged once.

One lock covers the table and the switch's ends of the ports.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import NamedTuple

from vmbus.errors import UsageError
from vmbus.ring import RingCorrupt, RingReader, RingWriter
from vsp.net.backends import DEFAULT_MTU, ETH_HLEN, max_frame
from vsp.net.switch_port import (
    P_LINK,
    P_WANT,
    SCRATCH_CAP,
    W_DROPPED,
    W_RECEIVED,
    W_REFUSED,
    W_SENT,
    W_SPOOFED,
    PortMemory,
    SwitchPort,
    _eventfd,
    clear_eventfd,
    full_fence,
    ring_data_size,
    ring_eventfd,
)

__all__ = ["LearningSwitch", "PortStats", "SwitchPort"]

log = logging.getLogger(__name__)
HUNG_UP = "its worker hung up"  # the usual end of a port: its VM ended

# Frames waiting at one port.
SWITCH_QUEUE_FRAMES = 1024
# Pinned MACs: one per port at most, so this caps the ports that can learn.
SWITCH_TABLE_ENTRIES = 4096
# How long senders wait for a port that drains nothing before it is stalled.
SWITCH_STALL_SECONDS = 1.0
BATCH = 64  # frames read from one port per pass
_COUNTER_LIMIT = 1 << 62  # a worker's counter above this is garbage: read as 0


class PortStats(NamedTuple):
    mac: bytes | None
    frames_in: int  # written to this port's ring for its receiver
    frames_out: int  # taken from this port's sender and forwarded
    queued: int  # waiting in its ring now
    dropped: int  # lost at this port: full queue, stalled, link down
    refused: int  # from this port, refused at the door: malformed, oversize, link down
    spoofed: int  # from this port with another port's source address
    held: int  # times a frame from this port waited for a full port
    waiting: int = 0  # from this port, not yet forwarded: in its ring or held in the switch


class _Corrupt(Exception):
    """A worker's shared state is inconsistent: its port goes."""


class _PortEnd:
    """The switch's end of one port: the rings' other ends, the counters,
    the flow-control state. Lives in the parent, under the switch's lock."""

    def __init__(self, port: SwitchPort, memory: PortMemory, sock: socket.socket) -> None:
        self.port = port  # the worker's end, as made here (a husk once handed over)
        self.memory = memory
        self.cells = memory.cells
        self.sock = sock
        self.bell, self.space = port.fileno(), port.space_fileno()
        self.reader: RingReader | None = RingReader(memory.up)
        self.writer: RingWriter | None = RingWriter(memory.down)
        self.mac = port.mac
        self.link_up = True
        self.handed = False  # pickled for a worker: close our copy of its socket once it speaks
        self.closing: str | None = None  # hung up (why): forward what it sent, then remove it
        self.owns_memory = False  # its owner closed the port here: the memory is ours to close
        self.heard = False
        self.removed = False
        self.written = 0  # frames written to ring "down"
        self.taken = 0  # frames read from ring "up"
        self.received = 0  # the worker's W_RECEIVED, as last checked
        self.dirty = False  # written, not yet committed
        self.more = False  # its ring had frames after our last read
        self.frames_in = self.frames_out = 0
        self.dropped = self.refused = self.spoofed = self.held = 0
        self.pending: deque[bytes] = deque()  # read from its ring, not yet forwarded
        self.waiting_on: _PortEnd | None = None  # the full port pending[0] waits for
        self.waiters: set[_PortEnd] = set()  # ports holding a frame for this one
        self.held_since: float | None = None  # senders wait since, or since it last read
        self.progress = 0  # its read count at held_since
        self.stalled = False

    def worker_count(self, cell: int) -> int:
        if self.removed:
            return 0  # added to our own counters on removal
        value = int(self.cells[cell])
        return value if value < _COUNTER_LIMIT else 0

    def queued(self) -> int:
        received = int(self.cells[W_RECEIVED])
        if not self.received <= received <= self.written:
            raise _Corrupt(
                f"its receive count {received} is not in {self.received}..{self.written}"
            )
        self.received = received
        return self.written - received


class LearningSwitch:
    """An Ethernet switch between ports (`port()`); see the module doc."""

    def __init__(
        self,
        mtu: int = DEFAULT_MTU,
        queue_frames: int = SWITCH_QUEUE_FRAMES,
        table_entries: int = SWITCH_TABLE_ENTRIES,
        stall_seconds: float | None = SWITCH_STALL_SECONDS,
        *,
        serve: bool = True,
    ) -> None:
        if queue_frames < 1:
            raise UsageError(f"a port queues at least one frame, not {queue_frames}")
        self.mtu = mtu
        self._max_frame = max_frame(mtu)
        self.queue_frames = queue_frames
        self.low_water = queue_frames // 2  # held senders resume once a port drains to this
        self.table_entries = table_entries
        self.stall_seconds = stall_seconds
        self._ring_size = ring_data_size(queue_frames, mtu)
        self._lock = threading.RLock()
        self._ports: list[_PortEnd] = []
        self._table: dict[bytes, _PortEnd] = {}  # pinned address -> its port
        self.removals: Counter[str] = Counter()  # ports removed, by reason
        slot = -(-self._max_frame // 8) * 8
        self._scratch = bytearray(max(slot, min(SCRATCH_CAP, BATCH * slot)))
        self._lengths = memoryview(bytearray(4 * BATCH)).cast("I")
        self._ids = memoryview(bytearray(8 * BATCH)).cast("Q")
        self._selector = selectors.DefaultSelector()
        self._wake = _eventfd()
        self._selector.register(self._wake, selectors.EVENT_READ, None)
        self._serve = serve
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._busy = False  # a port left frames unread: pass again without waiting
        self.passes = 0  # the thread's wake-ups: a stuck or dead port must not add to them

    # --- the public side ---

    def port(self, mac: bytes | None = None) -> SwitchPort:
        """A new port. Its `mac`, if given, is pinned at once, so frames to
        it arrive before the guest has sent anything."""
        if mac is not None and len(mac) != 6:
            raise UsageError(f"a MAC is 6 bytes, not {len(mac)}")
        with self._lock:
            if self._stopping:
                raise UsageError("the switch is closed")
            if mac is not None and mac in self._table:
                raise UsageError(f"{mac.hex(':')} is already another port's address")
            memory = PortMemory.create(self._ring_size)
            bells = (_eventfd(), _eventfd(), _eventfd())
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            ours.setblocking(False)
            theirs.setblocking(False)
            port = SwitchPort(self, mac, memory, bells, theirs)
            end = _PortEnd(port, memory, ours)
            port._end = end
            self._ports.append(end)
            if mac is not None:
                self._table[mac] = end
            self._selector.register(ours, selectors.EVENT_READ, end)
            if self._serve and self._thread is None:
                self._thread = threading.Thread(target=self._run, name="vmbus-switch", daemon=True)
                self._thread.start()
        return port

    def stats(self) -> list[PortStats]:
        """Every live port's counters, in the order the ports were made."""
        with self._lock:
            return [self._stats(end) for end in self._ports]

    def port_stats(self, end: _PortEnd) -> PortStats:
        with self._lock:
            return self._stats(end)

    def pump(self) -> int:
        """What the thread does after each wake-up, without waiting: take the
        doorbells that rang, then one forwarding pass over every port; frames
        moved. For a switch made with serve=False (tests)."""
        with self._lock:
            if self._wake < 0:
                return 0  # closed: its ports were removed
            self._doorbells(self._selector.select(0))
            return self._pump()

    def check_stalls(self, now: float | None = None) -> None:
        """Declare stalled each port that senders have waited on for
        `stall_seconds` (the thread calls this; tests may too)."""
        with self._lock:
            self._check_stalls(time.monotonic() if now is None else now)

    def close(self) -> None:
        """Stop forwarding and remove every port (their workers see a hang-up)."""
        with self._lock:
            self._stopping = True
            thread, self._thread = self._thread, None
            ring_eventfd(self._wake)
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._lock:
            for end in list(self._ports):
                self._remove(end, None)
            if self._wake >= 0:
                self._selector.close()
                os.close(self._wake)
                self._wake = -1

    def __enter__(self) -> LearningSwitch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- the thread ---

    def _run(self) -> None:
        while not self._stopping:
            events = self._selector.select(self._timeout())
            with self._lock:
                if self._stopping:
                    return
                self.passes += 1
                self._doorbells(events)
                self._pump()
                if self.stall_seconds is not None:
                    self._check_stalls(time.monotonic())

    def _timeout(self) -> float | None:
        if self._busy or any(end.pending and end.waiting_on is None for end in self._ports):
            return 0.0  # frames to read, or released by a stall (and no doorbell will ring)
        if self.stall_seconds is not None and any(end.waiters for end in self._ports):
            return self.stall_seconds / 4
        return None

    def _doorbells(self, events: list[tuple[selectors.SelectorKey, int]]) -> None:
        for key, _ in events:
            end = key.data
            if end is None:
                clear_eventfd(self._wake)
            elif not end.removed:
                self._heard(end)

    def _heard(self, end: _PortEnd) -> None:
        """The worker rang (or hung up): empty the doorbell; a hang-up removes the port."""
        try:
            data = end.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError as error:
            self._retire(end, f"its worker's doorbell failed ({error.strerror})")
            return
        if not data:
            self._retire(end, HUNG_UP)
            return
        if end.handed and not end.heard:  # the worker has its own socket now
            end.heard = True
            end.port._sock.close()

    # --- forwarding, under the lock ---

    def _pump(self) -> int:
        moved, busy = 0, False
        for end in list(self._ports):  # room first: held senders then go on in this pass
            if (end.waiters or end.stalled) and not end.removed:
                self._guard(end, self._room)
        for end in list(self._ports):
            if not end.removed and end.waiting_on is None:
                end.more = False
                count = self._guard(end, self._serve_sender)
                moved += count
                busy |= count >= BATCH or end.more  # more in its ring: pass again at once
        for end in list(self._ports):
            if end.dirty and not end.removed:
                end.dirty = False
                self._guard(end, self._commit)
            if end.closing is not None and not end.removed:
                self._guard(end, self._finish)
        self._busy = busy
        kicked = self._thread is not None and threading.current_thread() is not self._thread
        if kicked and (busy or any(end.waiters for end in self._ports)):
            ring_eventfd(self._wake)  # the thread may sleep with no timeout: it goes on
        return moved

    def _guard(self, end: _PortEnd, step: Callable[[_PortEnd], int]) -> int:
        """Run one port's step; a port whose memory proves corrupt is removed."""
        try:
            return step(end)
        except (RingCorrupt, _Corrupt, ValueError) as error:
            reason = f"its ring is corrupt ({error})"
        self._remove(end, reason)  # outside the handler: its traceback holds the rings
        return 0

    def _retire(self, end: _PortEnd, reason: str) -> None:
        """The worker is gone (or its owner closed the port): nothing more
        reaches it, and what it sent still goes on; then it is removed."""
        if end.removed or end.closing is not None:
            return
        end.closing = reason
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(end.sock)
        self._release(end)  # frames held for it are dropped instead
        self._guard(end, self._finish)

    def _finish(self, end: _PortEnd) -> int:
        """Remove a retiring port once all it sent has been forwarded."""
        if end.waiting_on is None and not end.pending:
            self._serve_sender(end)
        drained = end.reader is None or not end.reader.bytes_available
        if end.waiting_on is None and not end.pending and drained:
            self._remove(end, end.closing or None)
        return 0

    def _commit(self, end: _PortEnd) -> int:
        if end.writer is None:
            return 0
        if end.writer.commit():
            ring_eventfd(end.bell)
        return 0

    def _room(self, end: _PortEnd) -> int:
        """A port that senders wait on (or stalled): resume them once it drained to half."""
        if end.queued() > self.low_water:
            end.cells[P_WANT] = 1  # ring once you have read
            full_fence()  # P_WANT stored before W_RECEIVED is loaded (the worker: the reverse)
            if end.queued() > self.low_water:
                return 0  # its next read rings us
        end.stalled = False
        self._release(end)
        return 0

    def _want(self, end: _PortEnd) -> bool:
        """Ask the worker to ring once it reads; whether it already has (room now)."""
        end.cells[P_WANT] = 1
        full_fence()  # P_WANT stored before W_RECEIVED is loaded (the worker: the reverse)
        return end.queued() < self.queue_frames

    def _release(self, end: _PortEnd) -> None:
        for waiter in end.waiters:
            waiter.waiting_on = None
        end.waiters.clear()
        end.held_since = None

    def _serve_sender(self, end: _PortEnd) -> int:
        """Forward the frames waiting in the switch, then up to BATCH from the ring."""
        moved = 0
        while end.pending:
            if not self._forward(end, end.pending[0]):
                return moved
            end.pending.popleft()
            moved += 1
        reader = end.reader
        if reader is None:
            return 0
        count = reader.read_packed(self._scratch, self._lengths, self._ids)
        if count == 0:
            return moved
        end.taken += count
        scratch, pos, largest = self._scratch, 0, self._max_frame
        for index in range(count):
            size, length = self._lengths[index], self._ids[index]
            if ETH_HLEN <= length <= largest and size - 8 < length <= size:
                end.pending.append(bytes(scratch[pos : pos + length]))
            else:
                end.refused += 1
            pos += size
        if reader.commit():
            ring_eventfd(end.space)
        # What the worker wrote while we read: its commit saw our old read
        # index (not empty), so it rang no doorbell. Look again next pass.
        end.more = reader.bytes_available > 0
        while end.pending:
            if not self._forward(end, end.pending[0]):
                break
            end.pending.popleft()
        return moved + int(count)

    def _admit(self, source: _PortEnd, mac: bytes) -> bool:
        """Whether a frame from `source` may use source address `mac`; pins
        the first unicast address of a port made without one."""
        if mac[0] & 1:
            return True  # a multicast source address is bogus: forwarded, never learned
        owner = self._table.get(mac)
        if owner is source:
            return True
        if owner is not None:
            source.spoofed += 1
            return False
        if source.mac is None and len(self._table) < self.table_entries:
            source.mac = mac
            self._table[mac] = source
        return True  # an address nobody owns: forwarded, not learned

    def _forward(self, source: _PortEnd, data: bytes) -> bool:
        """Send one frame on; False when it must wait for a full port."""
        if not source.link_up:
            source.refused += 1
            return True
        if not self._admit(source, data[6:12]):
            return True
        target = None if data[0] & 1 else self._table.get(data[:6])
        if target is None:
            for port in self._ports:
                if port is not source and not port.removed:
                    self._deliver(port, data, False)
        elif target is not source and not self._deliver(target, data, True):
            source.held += 1
            source.waiting_on = target
            target.waiters.add(source)
            if target.held_since is None:
                target.held_since, target.progress = time.monotonic(), target.received
            return False
        source.frames_out += 1
        return True

    def _deliver(self, target: _PortEnd, data: bytes, hold: bool) -> bool:
        """Write one frame to a port's ring; False: it must wait (hold, and full)."""
        if not target.link_up or target.writer is None or target.closing is not None:
            target.dropped += 1
            return True
        try:
            room = target.queued() < self.queue_frames
            if room and target.writer.write(data, trans_id=len(data)):
                target.written += 1
                target.frames_in += 1
                target.dirty = True
                return True
            if hold and not target.stalled:
                if target.dirty:  # what is written must be readable, or it never drains
                    target.dirty = False
                    self._commit(target)
                if not self._want(target):
                    return False
                if target.writer.write(data, trans_id=len(data)):  # it read meanwhile
                    target.written += 1
                    target.frames_in += 1
                    target.dirty = True
                    return True
                return False
        except (RingCorrupt, _Corrupt) as error:
            reason = f"its ring is corrupt ({error})"
        else:
            target.dropped += 1
            return True
        self._remove(target, reason)  # outside the handler: its traceback holds the rings
        return True

    def _check_stalls(self, now: float) -> None:
        """A port that senders wait on and that read nothing for stall_seconds
        is stalled (one that reads, however slowly, is not: it drains)."""
        limit = self.stall_seconds
        for end in list(self._ports):
            since = end.held_since
            if limit is None or since is None:
                continue
            try:
                end.queued()  # refreshes what it has read
            except _Corrupt as error:
                reason = f"its ring is corrupt ({error})"
            else:
                if end.received != end.progress:
                    end.progress, end.held_since = end.received, now
                elif now - since >= limit:
                    end.stalled = True
                    end.cells[P_WANT] = 1  # its next read says whether it drains again
                    self._release(end)
                continue
            self._remove(end, reason)

    def _closed_here(self, end: _PortEnd) -> bool:
        """The port's owner, in this process, closed it: its descriptors go
        now, the memory with the end (a handed port's husk, all of it), once
        what it sent has been forwarded. False: the end is gone already."""
        with self._lock:
            if end.removed:
                return False
            if not end.handed:  # its eventfds close now: never ring them again
                end.bell = end.space = -1
                end.owns_memory = True
            self._retire(end, "")
            if not end.removed:
                ring_eventfd(self._wake)
            return True

    def _set_link(self, end: _PortEnd, up: bool) -> None:
        with self._lock:
            end.link_up = up
            if not up:
                self._release(end)  # senders held for this port now drop instead
            ring_eventfd(self._wake)

    def _stats(self, end: _PortEnd) -> PortStats:
        queued = 0
        with contextlib.suppress(_Corrupt):
            queued = 0 if end.removed else end.queued()
        return PortStats(
            end.mac,
            end.frames_in,
            end.frames_out,
            queued,
            end.dropped + end.worker_count(W_DROPPED),
            end.refused + end.worker_count(W_REFUSED),
            end.spoofed + end.worker_count(W_SPOOFED),
            end.held,
            len(end.pending) + max(0, end.worker_count(W_SENT) - end.taken),
        )

    def _remove(self, end: _PortEnd, reason: str | None) -> None:
        """Forget a port; `reason` (None: closed by its owner) is counted and logged."""
        with self._lock:
            if end.removed:
                return
            end.dropped += end.worker_count(W_DROPPED) + len(end.pending)
            end.refused += end.worker_count(W_REFUSED)
            end.spoofed += end.worker_count(W_SPOOFED)
            end.removed = True
            self._ports.remove(end)
            if end.mac is not None and self._table.get(end.mac) is end:
                del self._table[end.mac]
            for other in self._ports:
                other.waiters.discard(end)
                if other.waiting_on is end:
                    other.waiting_on = None  # its frame goes wherever the table says now
            self._release(end)
            end.pending.clear()
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(end.sock)
            end.sock.close()
            end.reader = end.writer = None
            end.cells[P_LINK] = 0  # a worker still there reads nothing more
            if end.owns_memory:
                end.memory.close()
            if reason:
                self.removals[reason.split(" (")[0]] += 1
                mac = end.mac.hex(":") if end.mac else "(no address)"
                # A hang-up is how every VM's port ends; anything else is a fault.
                level = logging.INFO if reason == HUNG_UP else logging.WARNING
                log.log(level, "switch: port %s removed: %s", mac, reason)
            if end.handed:  # the parent's copy is a husk: release it with the port
                end.port._close_here()
            ring_eventfd(self._wake)
