"""A channel, from one side: the ring we write, the ring we read, and a
signal each way. It acts on the rings' commit answers (interrupt
suppression), masks its inbound ring while draining and re-checks after
unmasking, spins briefly before sleeping (poll mode), and matches
completions to requests by transaction id.

A `Channel` is driven by one thread at a time; `AsyncChannel` puts one on an
asyncio loop. Both are symmetric: the host and the guest use the same class
with the rings swapped.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import select
import time
from collections.abc import Callable, Sequence
from typing import Any

from vmbus._ringdefs import ALIGNMENT, DESCRIPTOR_SIZE, TRAILER_SIZE
from vmbus._ringpacket import Packet
from vmbus.errors import VmbusError
from vmbus.ring import RingReader, RingWriter
from vmbus.transport import Signal

VM_PKT_DATA_INBAND = 0x6
VM_PKT_COMP = 0xB
COMPLETION_REQUESTED = 0x1
DEFAULT_SPIN_SECONDS = 20e-6  # a cross-core wake-up costs ~70 µs here
SPIN_MISSES = 4  # fruitless spins in a row before poll mode backs off
SPIN_PROBE = 32  # then spin on one wait in this many
PAUSED = 1 << 32  # a reserve no ring meets: its handler takes no request now


def packet_space(payload_size: int, header_size: int = 0) -> int:
    """Ring bytes one packet of this size takes, trailer included."""
    size = DESCRIPTOR_SIZE + header_size + payload_size
    return -(-size // ALIGNMENT) * ALIGNMENT + TRAILER_SIZE


class DeviceRemoved(VmbusError, ConnectionError):
    """The host removed the device (rescinded its channel) while in use:
    what a wait on its channel raises, instead of waiting for ever."""


class ChannelTimeout(VmbusError, TimeoutError):
    """No space, packet or completion arrived in time."""


class Channel:
    """One side of an open channel. Not thread-safe: one driver at a time."""

    def __init__(
        self,
        send_ring: Any,
        receive_ring: Any,
        notify_peer: Signal,
        wake_me: Signal,
        *,
        mirrored: bool = False,
        spin_seconds: float = DEFAULT_SPIN_SECONDS,
    ) -> None:
        self.writer = RingWriter(send_ring, mirrored=mirrored)
        self.reader = RingReader(receive_ring, mirrored=mirrored)
        self.notify_peer = notify_peer
        self.wake_me = wake_me
        self.spin_seconds = spin_seconds
        self.spin_misses = 0  # spins in a row that found nothing
        self.waits = 0
        self.ids = itertools.count(1)  # 0 is for unsolicited packets (§2.6)
        self.backlog: collections.deque[Packet] = collections.deque()
        self.completions: dict[int, Packet] = {}
        self.packets_sent = 0
        self.removed = False  # the host rescinded it: every wait raises DeviceRemoved
        self.reader.begin_drain()  # masked except while we sleep

    # --- sending -------------------------------------------------------

    def send(
        self,
        payload: Any,
        *,
        type: int = VM_PKT_DATA_INBAND,
        flags: int = 0,
        trans_id: int = 0,
        header: Any = b"",
        timeout: float | None = None,
    ) -> None:
        """Write one packet, waiting for space if the ring is full."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.try_send(payload, type, flags, trans_id, header):
            self._sleep(deadline, "ring space")

    def try_send(
        self,
        payload: Any,
        type: int = VM_PKT_DATA_INBAND,
        flags: int = 0,
        trans_id: int = 0,
        header: Any = b"",
    ) -> bool:
        """Write and publish one packet. False if the ring is full: the peer
        has then been asked (pending_send_sz) to signal when it has room."""
        while not self.writer.write(payload, type, flags, trans_id, header):
            self.flush()
            size = packet_space(memoryview(payload).nbytes, memoryview(header).nbytes)
            if not self.writer.request_space(size):
                return False
        self.packets_sent += 1
        self.flush()
        return True

    def send_completion(self, trans_id: int, payload: Any = b"") -> None:
        self.send(payload, type=VM_PKT_COMP, trans_id=trans_id)

    def flush(self) -> None:
        """Publish written packets; signal the peer if the ring says so."""
        if self.writer.commit():
            self.notify_peer.set()

    # --- receiving -----------------------------------------------------

    def poll(self) -> Packet | None:
        """The next packet (copied out of the ring), or None if empty."""
        if self.backlog:
            return self.backlog.popleft()
        packet = self.reader.read()
        if packet is None:
            return None
        copy = copied(packet)
        if self.reader.commit():
            self.notify_peer.set()
        return copy

    def drain(
        self,
        handle: Callable[[Packet], None],
        limit: int = 1 << 30,
        reserve: int | Callable[[], int] = 0,
    ) -> int:
        """Hand up to `limit` packets to `handle` as zero-copy views (valid
        during the call only), then commit once. Returns the count. With
        `reserve`, take a packet only while more than `reserve` bytes are
        free in the ring we send on, so each request's reply is sure to fit
        and a flood of requests cannot wedge the channel. A callable reserve
        is asked again before each packet (a handler that pauses raises it)."""
        count = 0
        while self.backlog and count < limit:
            handle(self.backlog.popleft())
            count += 1
        while count < limit:
            room = reserve() if callable(reserve) else reserve
            if room and self.writer.free_bytes <= room:
                break
            packet = self.reader.read()
            if packet is None:
                break
            handle(packet)
            count += 1
        if self.reader.commit():
            self.notify_peer.set()
        return count

    def service(
        self, handle: Callable[[Packet], None], reserve: int | Callable[[], int] = 0
    ) -> int:
        """Event-driven draining: clear the signal, drain while masked, and
        leave the ring unmasked (re-checked) so the next packet signals us.
        When replies would not fit (`reserve`), stop and ask the peer to
        signal once it has read enough of them; that signal resumes us."""
        self.wake_me.clear()
        count = 0
        while True:
            self.reader.begin_drain()
            count += self.drain(handle, reserve=reserve)
            room = reserve() if callable(reserve) else reserve
            if room >= PAUSED:
                return count  # the handler paused; it wakes us when it resumes
            if room and self.writer.free_bytes <= room:
                if not self.writer.request_space(room):
                    return count  # masked: the peer's reading wakes us, not its writing
                continue
            if not self.reader.end_drain():
                return count

    def receive(self, timeout: float | None = None) -> Packet:
        """The next packet, waiting for one: spin, then sleep."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            packet = self.poll()
            if packet is not None:
                return packet
            self.wait(deadline)

    def wait(self, deadline: float | None) -> None:
        """Wait until the peer may have written: spin on the ring for the
        poll budget, then unmask, re-check, and sleep on the signal."""
        self._check_removed()
        spin_end = time.perf_counter() + self._spin_budget()
        while time.perf_counter() < spin_end:
            if self.reader.bytes_available:
                self.spin_misses = 0
                return
        self.spin_misses += 1
        if self.reader.end_drain():  # arrived while masked: no signal is coming
            self.reader.begin_drain()
            return
        try:
            self._sleep(deadline, "a packet")
        finally:
            self.reader.begin_drain()

    def _spin_budget(self) -> float:
        """Adaptive poll mode: spin while spinning pays. After SPIN_MISSES
        spins in a row that ended asleep anyway (a slow peer, or a peer that
        shares our CPU and cannot run while we spin), spin only every
        SPIN_PROBE-th wait, to notice when it pays again."""
        self.waits += 1
        if self.spin_misses < SPIN_MISSES or self.waits % SPIN_PROBE == 0:
            return self.spin_seconds
        return 0.0

    def _sleep(self, deadline: float | None, what: str) -> None:
        self._check_removed()
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        woken = self.wake_me.wait(timeout)
        self._check_removed()
        if not woken:
            raise ChannelTimeout(f"timed out waiting for {what}")

    def remove(self) -> None:
        """The host rescinded the channel: wake whoever waits on it (from
        another thread), and make every wait raise DeviceRemoved."""
        self.removed = True
        self.wake_me.set()

    def _check_removed(self) -> None:
        if self.removed:
            raise DeviceRemoved("the host removed this device")

    # --- requests and completions --------------------------------------

    def request(
        self,
        payload: Any,
        *,
        header: Any = b"",
        type: int = VM_PKT_DATA_INBAND,
        timeout: float | None = None,
    ) -> Packet:
        """Send a packet that asks for a completion and wait for it. Other
        packets that arrive meanwhile are kept for `receive`."""
        trans_id = next(self.ids)
        self.send(
            payload,
            type=type,
            flags=COMPLETION_REQUESTED,
            trans_id=trans_id,
            header=header,
            timeout=timeout,
        )
        return self.wait_completion(trans_id, timeout)

    def wait_completion(self, trans_id: int, timeout: float | None = None) -> Packet:
        deadline = None if timeout is None else time.monotonic() + timeout
        while trans_id not in self.completions:
            packet = self.reader.read()
            if packet is None:
                self.wait(deadline)
                continue
            copy = copied(packet)
            if self.reader.commit():
                self.notify_peer.set()
            if copy.type == VM_PKT_COMP:
                self.completions[copy.trans_id] = copy
            else:
                self.backlog.append(copy)
        return self.completions.pop(trans_id)

    @property
    def signals_sent(self) -> int:
        return self.notify_peer.sent


def wait_any(channels: Sequence[Channel], timeout: float | None) -> None:
    """Channel.wait over several channels (a device with sub-channels): spin,
    then unmask all, re-check, and sleep until any of them is signalled."""
    for channel in channels:
        channel._check_removed()
    spin_end = time.perf_counter() + min(c.spin_seconds for c in channels)
    while time.perf_counter() < spin_end:
        if any(c.reader.bytes_available for c in channels):
            return
    try:
        if any([c.reader.end_drain() for c in channels]):  # list: unmask every one
            return
        ready = select.select([c.wake_me.fileno() for c in channels], [], [], timeout)[0]
        for channel in channels:
            channel.wake_me.clear()
            channel._check_removed()
        if not ready:
            raise ChannelTimeout("timed out waiting for a packet")
    finally:
        for channel in channels:
            channel.reader.begin_drain()


def copied(packet: Packet) -> Packet:
    """A packet that outlives the reader's commit."""
    return Packet(
        packet.type, packet.flags, packet.trans_id, packet.offset8, memoryview(bytes(packet.data))
    )


class AsyncChannel:
    """A Channel on an asyncio loop: the inbound signal wakes a reader
    callback that drains the ring; completions resolve futures by
    transaction id, other packets go to a queue."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.loop = asyncio.get_running_loop()
        self.packets: asyncio.Queue[Packet | None] = asyncio.Queue()  # None: removed
        self.pending: dict[int, asyncio.Future[Packet]] = {}
        self.space = asyncio.Event()
        channel.reader.end_drain()  # unmasked: we sleep in the loop, not in the ring
        self.loop.add_reader(channel.wake_me.fileno(), self._on_signal)
        self._on_signal()  # a signal lost before we started cannot stall us

    def _on_signal(self) -> None:
        self.space.set()
        if self.channel.removed:
            self._removed()
            return
        self.channel.service(self._dispatch)

    def _removed(self) -> None:
        """The host removed the device: every waiter hears DeviceRemoved."""
        self.loop.remove_reader(self.channel.wake_me.fileno())
        for future in self.pending.values():
            if not future.done():
                future.set_exception(DeviceRemoved("the host removed this device"))
        self.pending.clear()
        self.packets.put_nowait(None)  # wakes a receive

    def _dispatch(self, packet: Packet) -> None:
        copy = copied(packet)
        future = self.pending.pop(copy.trans_id, None) if copy.type == VM_PKT_COMP else None
        if future is not None and not future.done():
            future.set_result(copy)
        else:
            self.packets.put_nowait(copy)

    async def send(self, payload: Any, **fields: Any) -> None:
        """Write one packet, awaiting space if the ring is full."""
        while True:
            self.channel._check_removed()
            self.space.clear()  # before asking, so a signal after it is kept
            if self.channel.try_send(payload, **fields):
                return
            await self.space.wait()

    async def request(
        self, payload: Any, *, header: Any = b"", type: int = VM_PKT_DATA_INBAND
    ) -> Packet:
        trans_id = next(self.channel.ids)
        future: asyncio.Future[Packet] = self.loop.create_future()
        self.pending[trans_id] = future
        await self.send(
            payload, type=type, flags=COMPLETION_REQUESTED, trans_id=trans_id, header=header
        )
        return await future

    async def receive(self) -> Packet:
        packet = await self.packets.get()
        if packet is None:
            self.packets.put_nowait(None)  # the next receive hears it too
            raise DeviceRemoved("the host removed this device")
        return packet

    def close(self) -> None:
        self.loop.remove_reader(self.channel.wake_me.fileno())
        for future in self.pending.values():
            future.cancel()
