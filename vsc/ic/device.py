"""The integration services for child programs, answering as Linux's
hv_utils does: each service opens its channel and answers the host from a
thread of its own, so the program need not poll. What the host asks
reaches the program as state and callbacks:

- `Heartbeat`: answers every beat (its sequence number plus one);
  `answering = False` stands for a hung guest;
- `Shutdown`: calls `on_shutdown(reboot, reason)` (True accepts); by
  default it accepts, and `requested` (an Event) and `request` tell the
  program, which may `wait()` for it;
- `TimeSync`: `offset` (seconds, host minus ours) from the last sample,
  `now()` the host's time;
- `Kvp`: five pools of string pairs the host reads and writes, which the
  program reads and writes too (thread-safe).

`IntegrationServices(guest)` binds all four to the guest's offers.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from vmbus.channel import VM_PKT_DATA_INBAND, ChannelTimeout, DeviceRemoved
from vmbus.errors import PeerError, VmbusError
from vmbus.guest import Guest, GuestChannel, GuestDevice
from vmbus.protocols.ic import (
    CLASS_IDS,
    HEARTBEAT_VERSIONS,
    KVP_VERSIONS,
    SHUTDOWN_VERSIONS,
    TIMESYNC_VERSIONS,
    IcClient,
    IcRequest,
    MessageType,
    ShutdownFlags,
    Status,
    TimeSyncFlags,
    Version,
)
from vmbus.protocols.ic.wire import (
    KVP_BODY,
    KVP_POOLS,
    KVP_RECEIVE_LIMIT,
    RING_SIZE,
    TIMESYNC_REF_VERSION,
    UTIL_RECEIVE_LIMIT,
    WLTIMEDELTA,
    HeartbeatData,
    KvpDelete,
    KvpHeader,
    KvpOp,
    ShutdownData,
    TimeSyncData,
    TimeSyncRefData,
    decode_utf16,
    kvp_index,
    kvp_value_at,
    kvp_value_text,
    make_kvp_value,
)
from vmbus.wire import WireError

__all__ = [
    "Heartbeat",
    "IcService",
    "IntegrationServices",
    "Kvp",
    "KvpStore",
    "Shutdown",
    "ShutdownRequest",
    "TimeSync",
]

log = logging.getLogger(__name__)
POLL_SECONDS = 0.5  # how often a service thread looks at its stop flag
MAX_PAIRS = 1024  # per pool: a host cannot grow a guest's store without bound


class IcService:
    """One integration service: its channel, opened and served by a thread."""

    msgtype: ClassVar[MessageType]
    versions: ClassVar[tuple[Version, ...]]
    receive_limit: ClassVar[int] = UTIL_RECEIVE_LIMIT

    def __init__(self, device: GuestDevice) -> None:
        self.device = device
        self.client = IcClient(self.msgtype, self.versions, receive_limit=self.receive_limit)
        self.channel: GuestChannel | None = None
        self.requests = 0
        self.errors = 0  # host messages we could not use (dropped, as Linux does)
        self.opened = threading.Event()
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, name=f"ic-{self.msgtype.name.lower()}", daemon=True
        )
        self._thread.start()

    def _serve(self) -> None:
        try:
            channel = self.device.open(RING_SIZE, RING_SIZE, spin_seconds=0.0)
        except BaseException as error:  # the program sees it in `failure`
            self.failure = error
            self.opened.set()
            return
        self.channel = channel
        self.opened.set()
        while not self._stop.is_set():
            try:
                packet = channel.poll()
                if packet is None:
                    channel.wait(time.monotonic() + POLL_SECONDS)  # `stop` wakes it
                    continue
            except ChannelTimeout:
                continue
            except DeviceRemoved:  # closed now, so the guest releases the relid
                with contextlib.suppress(VmbusError, OSError):
                    channel.close()
                return
            except (OSError, ValueError):
                return
            try:
                answer, request = self.client.receive(packet.payload)
                if request is not None:
                    self.requests += 1
                    answer = self.handle(request)
            except (PeerError, WireError) as error:  # dropped, as Linux does
                self.errors += 1
                log.warning("%s: %s", self.msgtype.name, error)
                continue
            except Exception:  # a bug, or a callback's: the service keeps answering
                self.errors += 1
                log.exception("%s: a request failed", self.msgtype.name)
                continue
            if answer is not None:
                channel.send(answer, type=VM_PKT_DATA_INBAND, trans_id=packet.trans_id)

    def handle(self, request: IcRequest) -> bytes | None:
        """The answer to one request (None: no answer)."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop answering (the serving thread ends at once)."""
        self._stop.set()
        channel = self.channel
        if channel is not None:
            channel.wake_me.set()  # out of its wait: it sees the stop

    def close(self) -> None:
        self.stop()
        if self._thread is not threading.current_thread():
            self._thread.join(2 * POLL_SECONDS + 1)
        if self.channel is not None and not self._thread.is_alive():
            self.channel.close()

    @property
    def version(self) -> Version | None:
        return self.client.message


class Heartbeat(IcService):
    msgtype = MessageType.HEARTBEAT
    versions = HEARTBEAT_VERSIONS

    def __init__(self, device: GuestDevice) -> None:
        self.answering = True  # False: a hung guest, which answers nothing
        self.beats = 0
        super().__init__(device)

    def handle(self, request: IcRequest) -> bytes | None:
        if not self.answering:
            return None
        beat = HeartbeatData.unpack_from(request.body)
        self.beats += 1
        return request.answer(body=HeartbeatData(beat.seq_num + 1 & (1 << 64) - 1).pack()[:8])


@dataclass(frozen=True)
class ShutdownRequest:
    reboot: bool
    force: bool
    reason: str
    timeout_seconds: int


class Shutdown(IcService):
    msgtype = MessageType.SHUTDOWN
    versions = SHUTDOWN_VERSIONS

    def __init__(
        self, device: GuestDevice, on_shutdown: Callable[[bool, str], bool] | None = None
    ) -> None:
        self.on_shutdown = on_shutdown
        self.requested = threading.Event()
        self.request: ShutdownRequest | None = None
        super().__init__(device)

    def handle(self, request: IcRequest) -> bytes:
        data = ShutdownData.unpack_from(request.body)
        if data.flags & ~(ShutdownFlags.FORCE | ShutdownFlags.REBOOT):  # hibernate, unknown
            return request.answer(Status.E_FAIL)
        text = data.display_message
        end = next((i for i in range(0, len(text), 2) if text[i : i + 2] == b"\0\0"), len(text))
        reason = decode_utf16(text, end, "reason")
        reboot = bool(data.flags & ShutdownFlags.REBOOT)
        force = bool(data.flags & ShutdownFlags.FORCE)
        accept = True
        if self.on_shutdown is not None:
            try:
                accept = bool(self.on_shutdown(reboot, reason))
            except Exception:
                log.exception("on_shutdown failed")
                accept = False
        if accept:
            self.request = ShutdownRequest(reboot, force, reason, data.timeout_seconds)
            self.requested.set()
        return request.answer(Status.S_OK if accept else Status.E_FAIL)

    def wait(self, timeout: float | None = None) -> ShutdownRequest | None:
        """The host's shutdown request, once it came (None after `timeout`)."""
        return self.request if self.requested.wait(timeout) else None


class TimeSync(IcService):
    msgtype = MessageType.TIMESYNC
    versions = TIMESYNC_VERSIONS

    def __init__(self, device: GuestDevice) -> None:
        self.offset: float | None = None  # host's time minus ours, seconds
        self.samples = 0
        self.synced = threading.Event()  # a SYNC sample arrived
        super().__init__(device)

    def handle(self, request: IcRequest) -> bytes:
        version = self.client.message
        if version is not None and version >= TIMESYNC_REF_VERSION:
            ref = TimeSyncRefData.unpack_from(request.body)
            parent, flags = ref.parenttime, ref.flags
            # As Linux adds the reference time since the sample: the host's
            # reference is the monotonic clock, which this machine shares.
            transit = time.monotonic_ns() // 100 - ref.vmreferencetime
            if 0 <= transit < 10_000_000:
                parent += transit
        else:
            data = TimeSyncData.unpack_from(request.body)
            parent, flags = data.parenttime, data.flags
        self.offset = (parent - WLTIMEDELTA) / 10_000_000 - time.time()
        self.samples += 1
        if flags & TimeSyncFlags.SYNC:
            self.synced.set()
        return request.answer()

    def now(self) -> float:
        """The host's time (Unix seconds), by the last sample."""
        return time.time() + (self.offset or 0.0)


class KvpStore:
    """The guest's five KVP pools, sans-I/O: `answer` takes one host request
    (as Linux's daemon answers it); the program reads and writes them too,
    from any thread. A host adds at most MAX_PAIRS pairs to a pool."""

    def __init__(self) -> None:
        self.pools: list[dict[str, str]] = [{} for _ in range(KVP_POOLS)]
        self.lock = threading.Lock()

    def get(self, pool: int, key: str) -> str | None:
        with self.lock:
            return self.pools[pool].get(key)

    def set(self, pool: int, key: str, value: str) -> None:
        make_kvp_value(key, value)  # UsageError when it could not cross
        with self.lock:
            self.pools[pool][key] = value

    def items(self, pool: int) -> list[tuple[str, str]]:
        with self.lock:
            return list(self.pools[pool].items())

    def answer(self, request: IcRequest) -> bytes:
        body = request.body
        header = KvpHeader.unpack_from(body)
        if header.pool >= KVP_POOLS:
            return request.answer(Status.E_FAIL)
        pool = self.pools[header.pool]
        with self.lock:
            if header.operation == KvpOp.SET:
                data = kvp_value_at(body, KvpOp.SET)
                key = decode_utf16(data.key, data.key_size, "key")
                if key not in pool and len(pool) >= MAX_PAIRS:
                    return request.answer(Status.E_FAIL)
                pool[key] = kvp_value_text(data)
                return request.answer()
            if header.operation == KvpOp.DELETE:
                delete = KvpDelete.unpack_from(body, KVP_BODY)
                key = decode_utf16(delete.key, delete.key_size, "key")
                found = pool.pop(key, None) is not None
                return request.answer(Status.S_OK if found else Status.S_CONT)
            if header.operation == KvpOp.GET:
                data = kvp_value_at(body, KvpOp.GET)
                key = decode_utf16(data.key, data.key_size, "key")
                if key not in pool:
                    return request.answer(Status.S_CONT)
                answer = make_kvp_value(key, pool[key]).pack()
                return request.answer(body=header.pack() + answer)
            if header.operation == KvpOp.ENUMERATE:
                index = kvp_index(body)
                pairs = list(pool.items())
                if index >= len(pairs):
                    return request.answer(Status.S_CONT)
                answer = make_kvp_value(*pairs[index]).pack()
                return request.answer(body=body[: KVP_BODY + 4] + answer)
        return request.answer(Status.NOT_SUPPORTED)


class Kvp(IcService):
    """The KVP exchange: its `store` answers the host."""

    msgtype = MessageType.KVP_EXCHANGE
    versions = KVP_VERSIONS
    receive_limit = KVP_RECEIVE_LIMIT

    def __init__(self, device: GuestDevice, store: KvpStore | None = None) -> None:
        self.store = store or KvpStore()
        super().__init__(device)

    def get(self, pool: int, key: str) -> str | None:
        return self.store.get(pool, key)

    def set(self, pool: int, key: str, value: str) -> None:
        self.store.set(pool, key, value)

    def items(self, pool: int) -> list[tuple[str, str]]:
        return self.store.items(pool)

    def handle(self, request: IcRequest) -> bytes:
        return self.store.answer(request)


class IntegrationServices:
    """The four services bound to a guest's offers, now and as they come;
    `on_shutdown` goes to Shutdown. A service not offered stays None."""

    def __init__(
        self, guest: Guest, *, on_shutdown: Callable[[bool, str], bool] | None = None
    ) -> None:
        self.heartbeat: Heartbeat | None = None
        self.shutdown: Shutdown | None = None
        self.timesync: TimeSync | None = None
        self.kvp: Kvp | None = None
        self._on_shutdown = on_shutdown
        self.kvp_store = KvpStore()  # the guest's pools: they outlive a channel removed and added
        for msgtype, class_id in CLASS_IDS.items():
            guest.register(class_id, functools.partial(self._bind, msgtype))

    def _bind(self, msgtype: MessageType, device: GuestDevice) -> IcService:
        service: IcService
        if msgtype == MessageType.SHUTDOWN:
            service = self.shutdown = Shutdown(device, self._on_shutdown)
        elif msgtype == MessageType.HEARTBEAT:
            service = self.heartbeat = Heartbeat(device)
        elif msgtype == MessageType.TIMESYNC:
            service = self.timesync = TimeSync(device)
        else:
            service = self.kvp = Kvp(device, self.kvp_store)
        return service

    @property
    def services(self) -> list[IcService]:
        found = (self.heartbeat, self.shutdown, self.timesync, self.kvp)
        return [service for service in found if service is not None]

    def wait_open(self, timeout: float = 10.0) -> None:
        """Until every bound service has opened its channel (or failed to)."""
        deadline = time.monotonic() + timeout
        for service in self.services:
            service.opened.wait(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        for service in self.services:
            service.stop()
        for service in self.services:
            service.close()
