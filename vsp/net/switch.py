"""The learning switch: an Ethernet switch in memory between children, each
port a `NetBackend`.

- Learning, pinned: a port's address is the MAC it was made with, or else
  the first unicast source address it sends from. Frames to a pinned address
  go to its port alone; broadcast, multicast and unknown unicast are flooded.
  A frame whose source is another port's address is dropped and counted
  (`spoofed`): no port can claim another's traffic.
- Flow control: each port queues a bounded number of frames. A unicast
  frame `transmit`ted to a full port is not taken: the sender holds it (its
  netvsp stops taking the guest's requests) until the port drains to half,
  when the switch signals the sender's `space_fileno()`. A port that does
  not drain for `stall_seconds` while senders wait is stalled: frames to it
  are dropped (counted) until it drains, so a child that never reads holds
  nobody up for long. Flooded frames and `send` never wait: a full port
  drops them (counted), as a real switch's full port does.
- Counters per port (`stats()`): frames in and out, `dropped` (lost at this
  port: full, stalled, link down), `refused` (from this port: malformed,
  oversize, link down), `spoofed`, `held` (times a frame waited).

One lock covers the table and every queue: the ports are served by the
workers of different children.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import NamedTuple

from vmbus.errors import UsageError
from vsp.net.backends import DEFAULT_MTU, ETH_HLEN, Frame, Sent, _Backend, _eventfd, max_frame

__all__ = ["LearningSwitch", "PortStats", "SwitchPort"]

# Frames waiting at one port: ~1.5 MB of 1500-byte frames.
SWITCH_QUEUE_FRAMES = 1024
# Pinned MACs: one per port at most, so this caps the ports that can learn.
SWITCH_TABLE_ENTRIES = 4096
# How long senders wait for a port that drains nothing before it is stalled.
SWITCH_STALL_SECONDS = 1.0


class PortStats(NamedTuple):
    mac: bytes | None
    frames_in: int  # handed to this port's receiver
    frames_out: int  # taken from this port's sender
    queued: int  # waiting now
    dropped: int  # lost at this port: full queue, stalled, link down
    refused: int  # from this port, refused at the door: malformed, oversize, link down
    spoofed: int  # from this port with another port's source address
    held: int  # times a frame from this port waited for a full port


class LearningSwitch:
    """An Ethernet switch in memory between ports (`port()`); see the module doc."""

    def __init__(
        self,
        mtu: int = DEFAULT_MTU,
        queue_frames: int = SWITCH_QUEUE_FRAMES,
        table_entries: int = SWITCH_TABLE_ENTRIES,
        stall_seconds: float | None = SWITCH_STALL_SECONDS,
    ) -> None:
        if queue_frames < 1:
            raise UsageError(f"a port queues at least one frame, not {queue_frames}")
        self.mtu = mtu
        self._max_frame = max_frame(mtu)
        self.queue_frames = queue_frames
        self.low_water = queue_frames // 2  # held senders resume once a port drains to this
        self.table_entries = table_entries
        self.stall_seconds = stall_seconds
        self._lock = threading.Lock()
        self._ports: list[SwitchPort] = []
        self._table: dict[bytes, SwitchPort] = {}  # pinned address -> its port
        self._timer: threading.Timer | None = None

    def port(self, mac: bytes | None = None) -> SwitchPort:
        """A new port. Its `mac`, if given, is pinned at once, so frames to
        it arrive before the guest has sent anything."""
        with self._lock:
            if mac is not None and mac in self._table:
                raise UsageError(f"{mac.hex(':')} is already another port's address")
            port = SwitchPort(self, mac)
            self._ports.append(port)
            if mac is not None:
                self._table[mac] = port
        return port

    def stats(self) -> list[PortStats]:
        """Every port's counters, in the order the ports were made."""
        with self._lock:
            return [port._stats() for port in self._ports]

    def check_stalls(self, now: float | None = None) -> None:
        """Declare stalled each port that senders have waited on for
        `stall_seconds` (the watchdog calls this; tests may too)."""
        with self._lock:
            self._check_stalls(time.monotonic() if now is None else now)

    # --- under the lock ----------------------------------------------------

    def _admit(self, source: SwitchPort, mac: bytes) -> bool:
        """Whether a frame from `source` may use source address `mac`; pins
        the first unicast address of a port made without one."""
        if mac[0] & 1:
            return True  # a multicast source address is bogus: forwarded, never learned
        owner = self._table.get(mac)
        if owner is source:
            return True
        if owner is not None:
            source.spoofed += 1
            source.drops += 1
            return False
        if source.mac is None and len(self._table) < self.table_entries:
            source.mac = mac
            self._table[mac] = source
        return True  # an address nobody owns: forwarded, not learned

    def _forward(self, source: SwitchPort, frames: Sequence[Frame], hold: bool) -> Sent:
        refused = 0
        with self._lock:
            if not source.link_up or source._fd < 0:
                source.refused += len(frames)
                source.drops += len(frames)
                return Sent(len(frames), len(frames))
            if source._signalled:  # a port we waited on drained: the wake-up is consumed
                source._signalled = False
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(source._space)
            for index, frame in enumerate(frames):
                if not ETH_HLEN <= len(frame) <= self._max_frame:
                    source.refused += 1
                    source.drops += 1
                    refused += 1
                    continue
                data = bytes(frame)  # the caller's view is valid during the call only
                if not self._admit(source, data[6:12]):
                    refused += 1
                    continue
                target = None if data[0] & 1 else self._table.get(data[:6])
                if target is None:
                    others = [port for port in self._ports if port is not source]
                    delivered = sum(port._enqueue(data) for port in others)
                    refused += bool(others) and not delivered
                elif target is not source:
                    if hold and target._must_wait():
                        self._wait(source, target)
                        source.frames_out += index - refused
                        return Sent(index, refused)
                    refused += not target._enqueue(data)
            source.frames_out += len(frames) - refused
        return Sent(len(frames), refused)

    def _wait(self, source: SwitchPort, target: SwitchPort) -> None:
        source.held += 1
        target._waiters.add(source)
        if target._held_since is None:
            target._held_since = time.monotonic()
        if self.stall_seconds is not None and self._timer is None:
            self._timer = threading.Timer(self.stall_seconds, self._watchdog)
            self._timer.daemon = True
            self._timer.start()

    def _watchdog(self) -> None:
        with self._lock:
            self._timer = None
            self._check_stalls(time.monotonic())
            waiting = [port for port in self._ports if port._waiters]
            if waiting and self.stall_seconds is not None:
                self._timer = threading.Timer(self.stall_seconds / 2, self._watchdog)
                self._timer.daemon = True
                self._timer.start()

    def _check_stalls(self, now: float) -> None:
        limit = self.stall_seconds
        for port in self._ports:
            since = port._held_since
            if limit is not None and since is not None and now - since >= limit:
                port.stalled = True
                port._release()

    def _remove(self, port: SwitchPort) -> None:
        with self._lock:
            self._ports.remove(port)
            if port.mac is not None and self._table.get(port.mac) is port:
                del self._table[port.mac]
            for other in self._ports:
                other._waiters.discard(port)
            port._flush()
            port._release()
            os.close(port._space)
            port._space = -1
            _Backend.close(port)


class SwitchPort(_Backend):
    """One port of a LearningSwitch. Its eventfd counts 1 exactly while its
    queue holds frames (both change under the switch's lock)."""

    def __init__(self, switch: LearningSwitch, mac: bytes | None) -> None:
        super().__init__(mac, switch.mtu, _eventfd())
        self.switch = switch
        self._queue: deque[bytes] = deque()
        self._space = _eventfd()  # readable once a port this one waited on drained
        self._signalled = False
        self._waiters: set[SwitchPort] = set()  # ports holding frames for this one
        self._held_since: float | None = None
        self.stalled = False
        self.dropped = 0
        self.refused = 0
        self.spoofed = 0
        self.held = 0

    # --- under the switch's lock ---

    def _must_wait(self) -> bool:
        """A frame for this port must wait: full, but alive and connected."""
        return len(self._queue) >= self.switch.queue_frames and self.link_up and not self.stalled

    def _enqueue(self, frame: bytes) -> bool:
        if not self.link_up or len(self._queue) >= self.switch.queue_frames:
            self.dropped += 1
            self.drops += 1
            return False
        if not self._queue:
            os.eventfd_write(self._fd, 1)
        self._queue.append(frame)
        return True

    def _release(self) -> None:
        """Wake the ports holding frames for this one."""
        for waiter in self._waiters:
            if not waiter._signalled and waiter._space >= 0:
                waiter._signalled = True
                os.eventfd_write(waiter._space, 1)
        self._waiters.clear()
        self._held_since = None

    def _flush(self) -> None:  # the lost frames are drops
        if self._queue:
            self.dropped += len(self._queue)
            self.drops += len(self._queue)
            self._queue.clear()
            os.eventfd_read(self._fd)

    def _stats(self) -> PortStats:
        return PortStats(
            self.mac,
            self.frames_in,
            self.frames_out,
            len(self._queue),
            self.dropped,
            self.refused,
            self.spoofed,
            self.held,
        )

    # --- the NetBackend interface ---

    def space_fileno(self) -> int:
        return self._space

    def receive(self, max_frames: int) -> list[bytes]:
        with self.switch._lock:
            queue = self._queue
            count = min(max_frames, len(queue))
            if count == 0:
                return []
            frames = [queue.popleft() for _ in range(count)]
            if not queue:
                os.eventfd_read(self._fd)
            if len(queue) <= self.switch.low_water:
                self.stalled = False
                self._release()
            self.frames_in += count
        return frames

    def send(self, frames: Sequence[Frame]) -> int:
        """Frames accepted (delivered to at least one port); never waits."""
        sent = self.switch._forward(self, frames, hold=False)
        return sent.taken - sent.refused

    def transmit(self, frames: Sequence[Frame]) -> Sent:
        return self.switch._forward(self, frames, hold=True)

    def set_link(self, up: bool) -> None:
        """Down is a pulled cable: frames waiting here are lost, and frames to
        and from this port are dropped until it is up again."""
        with self.switch._lock:
            changed = up != self.link_up
            self.link_up = up
            if not up:
                self._flush()
                self._release()  # senders held for this port now drop instead
        if changed:
            self._link_changed(up)

    def close(self) -> None:
        if self._fd >= 0:
            self.switch._remove(self)
