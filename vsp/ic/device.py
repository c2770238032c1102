"""The integration components' VSPs: heartbeat, shutdown, time sync, KVP.

The host initiates: when the guest opens a channel, its handler sends the
version negotiation, then the service's requests, one at a time, each with
a timeout run by the worker's loop (`OpenContext.call_later`). The guest
answers in place, inband, with the request's transaction id. Periodic work
(a beat, a time sample) is a timer too; the channel's close cancels them.

Parent requests (`Vsp.control`, JSON) start a request and reply once, when
the guest answers, with the guest's answer; {"error": reason} when it does
not answer in time or the channel closes first. A request the device cannot
take now (no guest service open, one already outstanding, a bad argument)
raises UsageError at once. A guest's bad answer is counted (`bad_answers`)
and fails its channel, alone.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, ClassVar

from vmbus._ringpacket import Packet
from vmbus.channel import VM_PKT_DATA_INBAND, Channel
from vmbus.device import ChannelHandler, OpenContext, Vsp
from vmbus.errors import UsageError
from vmbus.host import OfferSpec
from vmbus.protocols.ic import (
    CLASS_IDS,
    HEARTBEAT_VERSIONS,
    SHUTDOWN_VERSIONS,
    TIMESYNC_VERSIONS,
    IcAnswer,
    IcProtocolError,
    IcServer,
    IcState,
    MessageType,
    ShutdownFlags,
    Status,
    TimeSyncFlags,
    Version,
)
from vmbus.protocols.ic.wire import (
    SHTDN_REASON_FLAG_PLANNED,
    TIMESYNC_REF_VERSION,
    WLTIMEDELTA,
    HeartbeatData,
    ShutdownData,
    TimeSyncData,
    TimeSyncRefData,
    encode_utf16,
)
from vmbus.timers import Timer
from vmbus.wire import WireError

__all__ = [
    "HeartbeatVsp",
    "IcHandler",
    "IcVsp",
    "ShutdownVsp",
    "TimeSyncVsp",
]

# Seconds a guest has to answer one request: under ChildPartition.control's
# default 10 s, so a caller hears the device's reason, not a bare timeout.
DEFAULT_TIMEOUT = 5.0
Done = Callable[[IcAnswer | None, str | None], None]  # (answer, or why there is none)


class IcHandler(ChannelHandler):
    """One open IC channel: the negotiation, then one request at a time."""

    max_reply = 0  # the host only asks: nothing it takes is answered

    def __init__(self, channel: Channel, context: OpenContext, vsp: IcVsp) -> None:
        super().__init__(channel, context)
        self.vsp = vsp
        self.server = IcServer(vsp.msgtype, vsp.versions)
        self.closed = False
        self._timer: Timer | None = None
        self._done: Done | None = None
        self._timers: list[Timer] = []
        context.call_later(0, self._negotiate)  # once the open is answered

    # --- requests ----------------------------------------------------------

    def _negotiate(self) -> None:
        self._send(*self.server.negotiate(), self._negotiated)

    def _negotiated(self, answer: IcAnswer | None, error: str | None) -> None:
        if self.server.ready:
            self.vsp.on_ready(self)

    def ask(self, body: bytes, done: Done) -> None:
        """Send one request of the service; `done` gets the answer or why
        there is none. UsageError when the service cannot take one now."""
        if self.closed:
            raise UsageError(f"the guest's {self.vsp.name} service is closed")
        if self.server.pending is not None:
            raise UsageError(f"a {self.vsp.name} request is outstanding; one at a time")
        self._send(*self.server.request(body), done)

    def _send(self, trans_id: int, payload: bytes, done: Done) -> None:
        self._done = done
        self.vsp.requests += 1
        self.post(payload, type=VM_PKT_DATA_INBAND, trans_id=trans_id)
        self._timer = self.context.call_later(self.vsp.timeout, self._expired)

    def later(self, delay: float, callback: Callable[[], None]) -> None:
        """Periodic work of the service, cancelled with the channel."""
        self._timers = [timer for timer in self._timers if not timer.cancelled]
        timer = self.context.call_later(delay, lambda: None if self.closed else callback())
        self._timers.append(timer)

    def _expired(self) -> None:
        if self.server.expire() is not None:
            self.vsp.timeouts += 1
            self._finish(None, f"the guest did not answer within {self.vsp.timeout:g} s")

    def _finish(self, answer: IcAnswer | None, error: str | None) -> None:
        """The outstanding request is over: its `done` is told, once."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        done, self._done = self._done, None
        if done is None:
            return
        try:
            done(answer, error)
        except (WireError, IcProtocolError) as failure:  # the service could not read it
            if answer is None:
                raise
            self._bad(str(failure))
            done(None, f"the guest answered badly: {failure}")
            raise

    # --- the guest's answers -------------------------------------------------

    def on_packet(self, packet: Packet) -> None:
        waiting = self.server.pending
        try:
            if packet.type != VM_PKT_DATA_INBAND:
                raise IcProtocolError(f"packet type {packet.type} is not an inband answer")
            answer = self.server.receive(packet.payload, packet.trans_id)
        except IcProtocolError as error:
            self._bad(str(error))
            raise
        if waiting is None or self.server.pending is not None:
            return  # a late answer: counted by the server
        self.vsp.answers += 1
        self._finish(answer, None)

    def _bad(self, reason: str) -> None:
        self.vsp.bad_answers += 1
        self.context.protocol_error("%s: %s", self.vsp.name, reason)
        self._finish(None, f"the guest answered badly: {reason}")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for timer in self._timers:
            timer.cancel()
        try:
            self._finish(None, f"the guest's {self.vsp.name} channel closed")
        finally:
            super().close()
            self.vsp.on_close(self)


class IcVsp(Vsp):
    """One integration service: its offer, its open channel (the last one
    opened) and its counters, which outlive the channel."""

    msgtype: ClassVar[MessageType]
    versions: ClassVar[tuple[Version, ...]]
    name: ClassVar[str]

    def __init__(self, instance_id: uuid.UUID | None = None, *, timeout: float = DEFAULT_TIMEOUT):
        if timeout <= 0:
            raise UsageError("an IC's timeout is a positive number of seconds")
        self.instance_id = instance_id or uuid.uuid4()
        self.timeout = timeout
        self.handler: IcHandler | None = None
        self.requests = self.answers = self.timeouts = self.bad_answers = 0

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["handler"] = None  # a worker's copy starts without a channel
        return state

    def offers(self) -> list[OfferSpec]:
        return [OfferSpec(CLASS_IDS[self.msgtype], self.instance_id)]

    def open(self, channel: Channel, context: OpenContext) -> IcHandler:
        self.handler = IcHandler(channel, context, self)
        return self.handler

    def on_ready(self, handler: IcHandler) -> None:
        """The guest chose versions: the service may start."""

    def on_close(self, handler: IcHandler) -> None:
        """The channel closed."""

    def ready_handler(self) -> IcHandler:
        """The open, negotiated channel; UsageError (the caller's) otherwise."""
        handler = self.handler
        if handler is None or handler.closed:
            raise UsageError(f"the guest has no {self.name} service open")
        if handler.server.state != IcState.READY:
            raise UsageError(f"the guest's {self.name} service is {handler.server.state.value}")
        return handler

    def stats(self) -> dict[str, Any]:
        handler = self.handler
        server = handler.server if handler is not None else None
        version = server.message if server is not None else None
        return {
            "open": handler is not None and not handler.closed,
            "negotiation": server.state.value if server is not None else "not open",
            "version": None if version is None else f"{version[0]}.{version[1]}",
            "requests": self.requests,
            "answers": self.answers,
            "timeouts": self.timeouts,
            "bad_answers": self.bad_answers,
            "late": server.late if server is not None else 0,
        }


class HeartbeatVsp(IcVsp):
    """Beats every `interval` seconds: a sequence number the guest answers
    plus one. `stats()["state"]`: "ok" (the last beat was answered), "lost"
    (it was not, or the channel closed after contact) or "no contact"."""

    msgtype = MessageType.HEARTBEAT
    versions = HEARTBEAT_VERSIONS
    name = "heartbeat"

    def __init__(
        self,
        instance_id: uuid.UUID | None = None,
        *,
        interval: float = 1.0,
        timeout: float | None = None,
    ) -> None:
        if interval <= 0:
            raise UsageError("a heartbeat's interval is a positive number of seconds")
        super().__init__(instance_id, timeout=timeout or max(2 * interval, 1.0))
        self.interval = interval
        self.seq = 0
        self.beats = self.misses = 0
        self.contact = False
        self.state = "no contact"
        self.last_beat: float | None = None  # time.monotonic() of the last answered beat

    def on_ready(self, handler: IcHandler) -> None:
        self._beat(handler)

    def _beat(self, handler: IcHandler) -> None:
        seq = self.seq
        handler.ask(HeartbeatData(seq).pack(), lambda a, e: self._answered(handler, seq, a, e))

    def _answered(
        self, handler: IcHandler, seq: int, answer: IcAnswer | None, error: str | None
    ) -> None:
        if answer is None:
            if handler.closed:
                return
            self.misses += 1
            self.state = "lost"
        else:
            answered = HeartbeatData.unpack_from(answer.body).seq_num
            if answer.status != Status.S_OK or answered != (seq + 1) & (1 << 64) - 1:
                raise IcProtocolError(f"beat {seq} answered {answered}, status {answer.status:#x}")
            self.seq = answered
            self.beats += 1
            self.contact, self.state, self.last_beat = True, "ok", time.monotonic()
        handler.later(self.interval, lambda: self._beat(handler))

    def on_close(self, handler: IcHandler) -> None:
        self.state = "lost" if self.contact else "no contact"

    def stats(self) -> dict[str, Any]:
        since = None if self.last_beat is None else round(time.monotonic() - self.last_beat, 3)
        return {
            **super().stats(),
            "state": self.state,
            "seq": self.seq,
            "beats": self.beats,
            "misses": self.misses,
            "since_last_beat": since,
        }


class ShutdownVsp(IcVsp):
    """Asks the guest to shut down or reboot (`control`)."""

    msgtype = MessageType.SHUTDOWN
    versions = SHUTDOWN_VERSIONS
    name = "shutdown"

    def __init__(self, instance_id: uuid.UUID | None = None, *, timeout: float = DEFAULT_TIMEOUT):
        super().__init__(instance_id, timeout=timeout)
        self.accepted = self.refused = 0

    def control(self, request: dict[str, Any], reply: Callable[[dict[str, Any]], None]) -> None:
        """{"op": "shutdown", "reboot": false, "force": false, "reason": "",
        "timeout_seconds": 0} -> {"accepted": bool, "status": int}."""
        if request.get("op") != "shutdown":
            raise UsageError(f"the shutdown device takes op 'shutdown', not {request.get('op')!r}")
        reboot, force = request.get("reboot", False), request.get("force", False)
        reason, seconds = request.get("reason", ""), request.get("timeout_seconds", 0)
        if not isinstance(reboot, bool) or not isinstance(force, bool):
            raise UsageError("'reboot' and 'force' are true or false")
        if not isinstance(reason, str):
            raise UsageError("'reason' is a string")
        if not isinstance(seconds, int) or isinstance(seconds, bool) or not 0 <= seconds < 1 << 32:
            raise UsageError("'timeout_seconds' is a whole number of seconds")
        text, _ = encode_utf16(reason, ShutdownData.SIZE - 12, "reason")
        flags = (ShutdownFlags.REBOOT if reboot else 0) | (ShutdownFlags.FORCE if force else 0)
        body = ShutdownData(SHTDN_REASON_FLAG_PLANNED, seconds, flags, text).pack()

        def done(answer: IcAnswer | None, error: str | None) -> None:
            if answer is None:
                reply({"error": error})
                return
            accepted = answer.status == Status.S_OK
            if accepted:
                self.accepted += 1
            else:
                self.refused += 1
            reply({"accepted": accepted, "status": answer.status})

        self.ready_handler().ask(body, done)

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "accepted": self.accepted, "refused": self.refused}


def host_time(offset: float = 0.0) -> int:
    """The host's UTC (plus `offset` seconds) in 100 ns units since 1601."""
    return time.time_ns() // 100 + WLTIMEDELTA + round(offset * 10_000_000)


class TimeSyncVsp(IcVsp):
    """Sends a time sample every `interval` seconds, the first with SYNC (set
    the clock), the others with SAMPLE. `offset` (seconds) is added to the
    host's clock: a VM may be given another time. With message version 4.0
    the sample is ictimesync_ref_data, its reference time the host's
    monotonic clock (we have no partition reference counter)."""

    msgtype = MessageType.TIMESYNC
    versions = TIMESYNC_VERSIONS
    name = "time sync"

    def __init__(
        self,
        instance_id: uuid.UUID | None = None,
        *,
        interval: float = 5.0,
        offset: float = 0.0,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if interval <= 0:
            raise UsageError("a time sync interval is a positive number of seconds")
        super().__init__(instance_id, timeout=timeout)
        self.interval, self.offset = interval, offset
        self.samples = self.answered = 0
        self.last_offset: float | None = None  # the last sample against the host's clock, s
        self.last_rtt: float | None = None  # its round trip, seconds

    def on_ready(self, handler: IcHandler) -> None:
        self._sample(handler, TimeSyncFlags.SYNC)

    def _sample(self, handler: IcHandler, flags: int) -> None:
        now, sent = time.time(), time.monotonic()
        parent = host_time(self.offset)
        if handler.server.message is not None and handler.server.message >= TIMESYNC_REF_VERSION:
            body = TimeSyncRefData(parent, time.monotonic_ns() // 100, flags).pack()
        else:
            body = TimeSyncData(parent, 0, 0, flags).pack()
        self.samples += 1
        self.last_offset = (parent - WLTIMEDELTA) / 10_000_000 - now

        def done(answer: IcAnswer | None, error: str | None) -> None:
            if answer is not None:
                self.answered += 1
                self.last_rtt = time.monotonic() - sent
            if not handler.closed:
                handler.later(self.interval, lambda: self._sample(handler, TimeSyncFlags.SAMPLE))

        handler.ask(body, done)

    def stats(self) -> dict[str, Any]:
        return {
            **super().stats(),
            "samples": self.samples,
            "answered": self.answered,
            "last_offset": self.last_offset,
            "last_rtt": self.last_rtt,
        }
