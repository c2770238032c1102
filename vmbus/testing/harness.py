"""In-process harnesses: drive any VSP, or a VSP and its VSC together, in
one process, over real guest memory (a memfd) and real rings.

- `VspHarness` opens one of a VSP's offers on an in-process channel pair
  with a working `OpenContext` and plays the worker: `pump()` serves the
  handler as the parent's worker would (its reserve, `on_signal`, the
  descriptors it watches). The test speaks the device protocol by hand on
  `guest`, the guest's channel end, and grants GPADLs with `grant`.
- `loopback` runs a VSP's real VSC against it: the VMBus control plane
  served by `Host.attach` over an in-process port, and a `Guest` in this
  process, so a VSC test needs no child process.
- `PumpedDevice` stands in for a guest device in ONE thread: when the VSC's
  channel would wait, it serves the VSP instead, so nothing ever sleeps;
  the in-process floor of a VSC and its VSP, for benchmarks.
"""

from __future__ import annotations

import contextlib
import itertools
import select
import uuid
from collections.abc import Callable, Iterator, Sequence

from vmbus.channel import Channel
from vmbus.device import ChannelHandler, OpenContext, Vsp
from vmbus.gpadl import Gpadl, GpadlTable
from vmbus.guest import Guest
from vmbus.host import OfferSpec
from vmbus.memory import PAGE_SIZE, GuestMemory, PageAllocator
from vmbus.partition import ChildPartition, Host
from vmbus.testing.rings import channel_pair, ring_buffer
from vmbus.transport import LocalPort, Signal

__all__ = ["PumpedDevice", "VspHarness", "loopback"]

RING_PFNS = frozenset({0, 1})  # pages the harness reserves as "the channel's rings"


class VspHarness:
    """One open channel of `vsp`, served in this process.

    `memory` is the child's memory; pages 0 and 1 stand for the channel's
    rings (a VSP must refuse data there); `allocate` hands out the rest."""

    def __init__(
        self,
        vsp: Vsp,
        *,
        memory_size: int = 8 << 20,
        ring_size: int = 64 << 10,
        offer: OfferSpec | None = None,
        userdata: bytes = bytes(120),
        spin_seconds: float = 0.0,
    ) -> None:
        self.vsp = vsp
        self.memory = GuestMemory.create(memory_size, name="vmbus-harness")
        self.allocator = PageAllocator(self.memory)
        self.allocator.alloc(len(RING_PFNS))  # pages 0 and 1: the pretend rings
        self.gpadls = GpadlTable(self.memory.page_count)  # indexed, as the host's
        self._handles = itertools.count(0xE1E10)
        self.offers: list[OfferSpec] = []
        self.watched: dict[int, Callable[[], None]] = {}
        self.guest, self.host = channel_pair(ring_size, spin_seconds=spin_seconds)
        self.context = OpenContext(
            offer or vsp.offers()[0],
            self.memory,
            userdata=userdata,
            ring_pfns=RING_PFNS,
            partition="harness",
            gpadls=self.gpadls,
            add_offer=self.offers.append,
            watch=self.watched.__setitem__,
            unwatch=self._unwatch,
        )
        self.handler: ChannelHandler = vsp.open(self.host, self.context)

    def _unwatch(self, fd: int) -> None:
        del self.watched[fd]

    def allocate(self, pages: int) -> list[int]:
        """Fresh guest pages (PFNs)."""
        return self.allocator.alloc(pages)

    def grant(self, pages: int | Sequence[int], byte_count: int | None = None) -> Gpadl:
        """Establish a GPADL of `pages` (fresh ones if a count), as the host's
        control plane would; the VSP sees it in `context.gpadls`."""
        pfns = self.allocate(pages) if isinstance(pages, int) else list(pages)
        size = len(pfns) * PAGE_SIZE if byte_count is None else byte_count
        gpadl = Gpadl.grant(self.memory, pfns, size, gpadl=next(self._handles))
        self.gpadls[gpadl.gpadl] = gpadl
        return gpadl

    def pump(self, rounds: int = 8) -> None:
        """Serve the handler as the worker does: drain the ring (within the
        reserve), call `on_signal`, and run the callbacks of watched
        descriptors that are readable; repeat while anything was ready."""
        for _ in range(rounds):
            self.host.service(self.handler.on_packet, self.handler.admission)
            self.handler.on_signal()
            ready = select.select(list(self.watched), [], [], 0)[0] if self.watched else []
            for fd in ready:
                callback = self.watched.get(fd)
                if callback is not None:
                    callback()
            if not ready and not self.host.reader.bytes_available:
                return

    def close(self) -> None:
        self.handler.close()
        for end in (self.guest, self.host):
            end.notify_peer.close()
        del self.guest, self.host
        with contextlib.suppress(BufferError):  # a test still holding a view
            self.memory.close()

    def __enter__(self) -> VspHarness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def loopback(
    devices: Sequence[Vsp],
    register: Callable[[Guest], None],
    *,
    memory_size: int = 32 << 20,
) -> Iterator[tuple[Guest, ChildPartition]]:
    """A guest in this process, with `register(guest)` binding its drivers
    (VSCs) before it connects, served by `Host.attach` with `devices`.
    Yields the connected guest and the parent's partition record."""
    memory = GuestMemory.create(memory_size, name="vmbus-loopback")
    host_port, guest_port = LocalPort.pair()
    with Host() as host:
        partition = host.attach(memory, host_port, devices=devices, name=f"lo-{uuid.uuid4()}")
        guest = Guest(guest_port, memory)  # one mapping serves both sides here
        try:
            register(guest)
            guest.connect()
            yield guest, partition
        finally:
            with contextlib.suppress(Exception):
                guest.unload()
            partition.stop()
            guest.close()


class _PumpedChannel(Channel):
    """A guest channel whose waiting serves its VSP instead."""

    device: PumpedDevice

    def wait(self, deadline: float | None) -> None:
        self.device.serve()


class PumpedDevice:
    """Enough of a `GuestDevice` (and its `Guest`: memory, allocator, GPADLs)
    for a VSC to open one channel of `vsp`, served in the caller's thread.
    `serve()` is the worker's step: the channel within the handler's
    admission, `on_signal`, then the descriptors the VSP watches."""

    relid = 1

    def __init__(self, vsp: Vsp, *, memory_size: int = 8 << 20, offer: OfferSpec | None = None):
        self.vsp = vsp
        self.offer = offer or vsp.offers()[0]
        self.instance_id = self.offer.instance_id
        self.memory = GuestMemory.create(memory_size, name="vmbus-pumped")
        self.allocator = PageAllocator(self.memory)
        self.guest = self
        self.gpadls = GpadlTable(self.memory.page_count)
        self.watched: dict[int, Callable[[], None]] = {}
        self._handles = itertools.count(1)
        self.handler: ChannelHandler | None = None

    def create_gpadl(self, relid: int, pfns: list[int], timeout: float = 0) -> int:
        gpadl = Gpadl.grant(
            self.memory, pfns, len(pfns) * PAGE_SIZE, child_relid=relid, gpadl=next(self._handles)
        )
        self.gpadls[gpadl.gpadl] = gpadl
        return gpadl.gpadl

    def open(
        self, send_size: int, receive_size: int, userdata: bytes = b"", **_: object
    ) -> Channel:
        outbound, inbound = ring_buffer(send_size), ring_buffer(receive_size)
        to_host, to_guest = Signal(), Signal()
        guest = _PumpedChannel(outbound, inbound, to_host, to_guest, spin_seconds=0.0)
        host = Channel(inbound, outbound, to_guest, to_host, spin_seconds=0.0)
        context = OpenContext(
            self.offer,
            self.memory,
            userdata=userdata.ljust(120, b"\0"),
            partition="pumped",  # the rings are not in guest memory here
            gpadls=self.gpadls,
            watch=self.watched.__setitem__,
            unwatch=self._unwatch,
        )
        self.handler = self.vsp.open(host, context)
        guest.device = self
        return guest

    def _unwatch(self, fd: int) -> None:
        del self.watched[fd]

    def serve(self) -> None:
        handler = self.handler
        assert handler is not None, "open the channel first"
        handler.channel.service(handler.on_packet, handler.admission)
        handler.on_signal()
        for callback in list(self.watched.values()):
            callback()
