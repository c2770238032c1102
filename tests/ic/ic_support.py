"""An IC VSP on real rings in this process, with a clock the test moves:
`IcHarness` plays the worker (its timers run when `advance` passes their
due time, never by sleeping) and the test plays the guest with the
sans-I/O `IcClient`, or by hand."""

from __future__ import annotations

import contextlib
import heapq
import itertools
from collections.abc import Callable
from typing import Any

from vmbus.channel import VM_PKT_DATA_INBAND
from vmbus.device import OpenContext, Vsp
from vmbus.memory import GuestMemory
from vmbus.protocols.ic import IcClient, IcRequest, MessageType
from vmbus.protocols.ic.wire import RING_SIZE
from vmbus.testing.rings import channel_pair
from vmbus.timers import Timer
from vsp.ic import IcHandler, IcVsp

Packet = tuple[int, bytes]  # (trans_id, payload)


class IcHarness:
    def __init__(self, vsp: IcVsp) -> None:
        self.vsp = vsp
        self.now = 0.0
        self._timers: list[Timer] = []
        self._order = itertools.count()
        self.memory = GuestMemory.create(1 << 20, name="vmbus-ic-harness")
        self.guest, self.host = channel_pair(RING_SIZE, spin_seconds=0.0)
        self.context = OpenContext(
            vsp.offers()[0], self.memory, partition="ic-harness", call_later=self._call_later
        )
        self.failure: str | None = None  # why the worker would have failed the channel
        self.handler: IcHandler = vsp.open(self.host, self.context)
        self.closed = False

    def _call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(self.now + max(0.0, delay), next(self._order), callback)
        heapq.heappush(self._timers, timer)
        return timer

    def _run(self, step: Callable[[], Any]) -> None:
        """A step of the worker: an exception fails the channel (closed)."""
        if self.closed:
            return
        try:
            step()
        except Exception as error:
            self.failure = f"{type(error).__name__}: {error}"
            self.close()

    def advance(self, seconds: float = 0.0) -> None:
        """Move the clock; run the timers now due, in order, then serve."""
        self.now += seconds
        while self._timers and self._timers[0].due <= self.now:
            timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                self._run(timer.callback)
        self.serve()

    def serve(self) -> None:
        """What the guest sent reaches the handler."""
        self._run(lambda: self.host.service(self.handler.on_packet, self.handler.admission))

    def sent(self) -> list[Packet]:
        """What the host sent the guest so far."""
        packets = []
        while (packet := self.guest.poll()) is not None:
            assert packet.type == VM_PKT_DATA_INBAND
            packets.append((packet.trans_id, bytes(packet.payload)))
        return packets

    def answer(self, trans_id: int, payload: bytes) -> None:
        self.guest.send(payload, type=VM_PKT_DATA_INBAND, trans_id=trans_id)
        self.serve()

    def negotiate(self, client: IcClient | None = None) -> IcClient:
        """The guest answers the negotiation as Linux would."""
        client = client or IcClient(self.vsp.msgtype, self.vsp.versions)
        self.advance()
        ((trans_id, payload),) = self.sent()
        reply, _ = client.receive(payload)
        assert reply is not None
        self.answer(trans_id, reply)
        return client

    def request(self, client: IcClient) -> tuple[int, IcRequest]:
        """The one request the host sent."""
        ((trans_id, payload),) = self.sent()
        _, request = client.receive(payload)
        assert request is not None
        return trans_id, request

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Exception):
                self.handler.close()

    def __enter__(self) -> IcHarness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        for end in (self.guest, self.host):
            end.notify_peer.close()
        with contextlib.suppress(BufferError):
            self.memory.close()


def control(vsp: Vsp, request: dict[str, Any]) -> list[dict[str, Any]]:
    """Start a control request; the list its replies land in."""
    replies: list[dict[str, Any]] = []
    vsp.control(request, replies.append)
    return replies


__all__ = ["IcHarness", "MessageType", "control"]
