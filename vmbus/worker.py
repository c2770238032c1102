"""One VM's worker (Hyper-V's VMWP): the loop that serves a child partition's
VMBus and drives its VSPs' channels.

A `VmWorker` runs either as the main thread of a worker process of its own
(`vmbus._worker`, what `Host.start` does by default) or as a thread of the
parent (`Host.attach`, `Host.start(worker="thread")`). It maps ring GPADLs,
opens and closes channels, and serves them: by select on their doorbells,
and in poll mode by a short spin before each select. A child that misbehaves
loses the offending channel; when the child dies (or `stop` is rung) the
worker releases everything it had, each step whatever failed before.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import selectors
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vmbus import host as h
from vmbus import messages as m
from vmbus.channel import Channel
from vmbus.channel_thread import POLL_SECONDS, ChannelThread, serve_channel
from vmbus.device import ChannelHandler, OpenContext, Vsp
from vmbus.errors import PeerError, PeerLog, UsageError
from vmbus.memory import GuestMemory, GuestMemoryError, MappedRegion, map_channel_rings
from vmbus.poll_mode import PollMode
from vmbus.ring import RingCorrupt
from vmbus.timers import Timer, TimerQueue
from vmbus.transport import MalformedMessage, MessagePort, PortClosed, Signal

__all__ = ["POLL_SECONDS", "POLL_TURN", "VmWorker"]

POLL_TURN = 0.005  # seconds of serving busy channels before the loop's other work

log = logging.getLogger("vmbus.partition")

Answer = Callable[[dict[str, Any]], None]  # {"result": ...} or {"error": reason}


@dataclass
class _OpenChannel:
    channel: Channel
    handler: ChannelHandler
    regions: tuple[MappedRegion, MappedRegion]
    views: tuple[memoryview, memoryview]
    thread: ChannelThread | None = None  # for a handler that wants a thread of its own


@dataclass(frozen=True)
class _Watch:
    callback: Callable[[], None]
    relid: int | None = None  # the channel whose VSP watches it


class VmWorker:
    """Serves one child partition: its memory, its message port, its devices.
    `process` is the child's process, whose exit ends the serving; None for a
    guest an emulator runs (then `stop` ends it)."""

    def __init__(
        self,
        name: str,
        process: subprocess.Popen[bytes] | None,
        memory: GuestMemory,
        port: MessagePort,
        devices: Sequence[Vsp],
        *,
        spin_seconds: float = 0.0,
        quotas: h.Quotas | None = None,
        on_state: Callable[[str], None] = lambda state: None,
    ) -> None:
        self.name = name
        self.process = process
        self.memory = memory
        self.port = port
        self.devices: list[Vsp | None] = list(devices)  # by index; a removed one is None
        self.poll_mode = PollMode(spin_seconds)
        self.quotas = quotas or h.Quotas()  # what the child may make us hold
        self.on_state = on_state
        self.state = "starting"  # running, exited, crashed, stopped
        self.exitcode: int | None = None
        self.channels: dict[int, _OpenChannel] = {}
        self.vsp_of: dict[h.OfferSpec, Vsp] = {}
        for vsp in devices:
            for offer in vsp.offers():
                self.vsp_of[offer] = vsp
        self.server = self.quotas.server(list(self.vsp_of), memory.page_count)
        memory.max_mappings = self.quotas.max_mappings
        self.peer_log = PeerLog(log, name)  # the child's protocol errors, rate-limited
        # Readable when the child is gone: its pidfd, or an eventfd stop() rings.
        self.pid = process.pid if process else os.getpid()
        self.pidfd = os.pidfd_open(self.pid) if process else os.eventfd(0)
        self.stopping = False
        self.rescinded = 0  # channels failed alone (a corrupt ring, a VSP's error)
        self.exited = threading.Event()
        self._kill_at: float | None = None
        self._final_stats: list[dict[str, Any]] = []  # the devices' counters at the end
        self._failures: list[tuple[int, str]] = []  # from channel threads, for the main loop
        self._failed = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.timers = TimerQueue()
        self._calls: deque[Callable[[], None]] = deque()  # from other threads (call_soon)
        self._called = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._calls_lock = threading.Lock()
        self.selector = selectors.DefaultSelector()

    # --- stopping ---

    def stop(self, timeout: float) -> None:
        """Ask the child to end (SIGTERM) and kill it if it has not within
        `timeout`; the loop notices its exit and cleans up. Thread-safe."""
        self.stopping = True
        self._kill_at = time.monotonic() + timeout
        # A child that has not connected yet runs none of its program, and as
        # pid 1 of its PID namespace it drops a SIGTERM that comes before its
        # handler is set (which would cost the whole timeout): it is killed.
        self.signal(signal.SIGKILL if self.state == "starting" else signal.SIGTERM)

    def kill(self) -> None:
        """End the child at once (SIGKILL): a stop asked for, not a crash.
        Thread-safe."""
        self.stopping = True
        self.signal(signal.SIGKILL)

    def signal(self, signo: int) -> None:
        if self.exited.is_set():  # its pidfd is closed, and the number may be another's
            return
        if self.process is None:  # embedded: there is only our loop to stop
            os.eventfd_write(self.pidfd, 1)
            return
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(self.pidfd, signo)

    # --- the loop ---

    def serve(self) -> None:
        """Serve until the child is gone; then release everything."""
        self.selector.register(self.port.fileno(), selectors.EVENT_READ, None)
        self.selector.register(self.pidfd, selectors.EVENT_READ, "exit")
        self.selector.register(self._failed, selectors.EVENT_READ, _Watch(self._take_failures))
        self.selector.register(self._called, selectors.EVENT_READ, _Watch(self._take_calls))
        busy = False
        try:
            while True:
                timeout = 0.0 if busy else self.timers.timeout(POLL_SECONDS)
                for key, _ in self.selector.select(timeout):
                    if key.data is None:
                        self._message()
                    elif key.data == "exit":
                        raise PortClosed("child exited")
                    elif isinstance(key.data, _Watch):
                        self._run_watch(key.data)
                    else:
                        self._service(key.data)
                self._run_timers()
                busy = self._poll_a_while()
                if self._kill_at is not None and time.monotonic() > self._kill_at:
                    self._kill_at = None
                    self.signal(signal.SIGKILL)
        except PortClosed:
            pass
        except Exception:  # a bug of ours: never take the parent down with it
            log.exception("worker of %s failed", self.name)
        finally:
            self._cleanup()

    def watch(self, fd: int, callback: Callable[[], None], relid: int | None = None) -> None:
        """A descriptor served by this loop (a VSP's TAP device, a switch
        port, the worker process's control socket), so the channels are only
        ever touched by this one thread. If the callback raises, the channel
        `relid` that watches it fails alone."""
        self.selector.register(fd, selectors.EVENT_READ, _Watch(callback, relid))

    def _run_watch(self, watch: _Watch) -> None:
        try:
            watch.callback()
        except Exception as error:
            if watch.relid is None:
                raise  # ours: the loop's own handler reports it
            self._fail(watch.relid, f"{type(error).__name__}: {error}")

    def unwatch(self, fd: int) -> None:
        self.selector.unregister(fd)

    def call_later(
        self, delay: float, callback: Callable[[], None], relid: int | None = None
    ) -> Timer:
        """Run `callback` in this loop after `delay` seconds; if it raises,
        the channel `relid` whose VSP set it fails alone. Call it from this
        loop's thread (a VSP's handler, a watch, a timer)."""
        return self.timers.add(delay, callback, relid)

    def _run_timers(self) -> None:
        for timer in self.timers.due():
            self._run_watch(_Watch(timer.callback, timer.owner))

    def call_soon(self, callback: Callable[[], None]) -> bool:
        """Run `callback` in this loop: from any thread (the parent's API
        on a worker thread). False if the loop has ended. A callback that
        raises is logged."""
        with self._calls_lock:  # the eventfd is not closed under us
            if self._called < 0:
                return False
            self._calls.append(callback)
            os.eventfd_write(self._called, 1)
        return True

    def _take_calls(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._called)
        while self._calls:
            callback = self._calls.popleft()
            try:
                callback()
            except Exception:
                log.exception("%s: a request of the parent failed", self.name)

    def _poll_a_while(self) -> bool:
        """Poll mode until the channels are quiet, or for at most POLL_TURN
        seconds: then True, and the loop looks at its other descriptors and
        timers without sleeping before it polls again, so a child that keeps
        its ring busy delays neither the parent's requests (a status, a stop)
        nor a device's timers."""
        turn_ends = time.monotonic() + POLL_TURN
        while self._poll():
            if time.monotonic() > turn_ends:
                return True
        return False

    def _poll(self) -> bool:
        """Poll mode (vmbus.poll_mode), then serve the channel it found. True
        only if packets were consumed, so a peer that leaves packets we
        cannot take (no room for replies) sends the worker back to its
        select, not into a busy loop; a corrupt ring fails its channel alone,
        here as in `_service`."""
        channels = [(r, c.channel) for r, c in self.channels.items() if c.thread is None]
        ready, failed = self.poll_mode.spin(channels)
        for relid, reason in failed.items():
            self._fail(relid, reason)
        return ready is not None and self._service(ready) > 0

    def _message(self) -> None:
        try:
            received = self.port.receive(0)
        except MalformedMessage as error:
            self.server.protocol_errors += 1
            self.peer_log("%s", str(error))
            return
        if received is not None:
            self._act(self.server.receive(received[0]))
            if self.server.version is not None and self.state == "starting":
                self.state = "running"
                self.on_state("running")

    def _act(self, events: list[h.Event]) -> None:
        for event in events:
            if isinstance(event, h.Reply):
                self.port.post(m.encode(event.message))
            elif isinstance(event, h.OpenRequested):
                self._open(event)
            elif isinstance(event, h.ChannelClosed):
                self._close(event.relid)

    def _open(self, event: h.OpenRequested) -> None:
        try:
            regions = map_channel_rings(
                self.memory,
                event.gpadl.pfns,
                event.inbound_page_offset,
                max_runs=self.quotas.max_runs,
            )
        except GuestMemoryError as error:
            log.warning("%s: relid %d: %s", self.name, event.relid, str(error))
            self._act(self.server.open_done(event.relid, event.openid, ok=False))
            return
        views = (regions[0].view(), regions[1].view())
        to_guest, to_host = Signal(), Signal()
        failure = None
        try:
            # The guest's outbound ring is the one the host reads.
            channel = Channel(views[1], views[0], to_guest, to_host, mirrored=True)
            context = OpenContext(
                event.offer,
                self.memory,
                userdata=event.userdata,
                ring_pfns=frozenset(event.gpadl.pfns),
                partition=self.name,
                gpadls=self.server.gpadls,
                add_offer=functools.partial(self._add_offer, self.vsp_of[event.offer]),
                watch=functools.partial(self.watch, relid=event.relid),
                unwatch=self.unwatch,
                call_later=functools.partial(self.call_later, relid=event.relid),
                peer_log=self.peer_log,
            )
            handler = self.vsp_of[event.offer].open(channel, context)
        except (RingCorrupt, PeerError, ValueError) as error:
            failure = str(error)  # not the exception: its traceback pins the views
        if failure is not None:
            log.warning("%s: relid %d cannot open: %s", self.name, event.relid, failure)
            channel = None  # type: ignore[assignment]  # drop its hold on the rings
            for view in views:
                view.release()
            for region in regions:
                region.close()
            to_guest.close()
            to_host.close()
            self._act(self.server.open_done(event.relid, event.openid, ok=False))
            return
        # Recorded and watched before the reply goes out: if the child is
        # gone by then, cleanup finds the channel whole.
        opened = _OpenChannel(channel, handler, regions, views)
        self.channels[event.relid] = opened
        if not handler.own_thread:
            self.selector.register(to_host.fileno(), selectors.EVENT_READ, event.relid)
        (reply,) = self.server.open_done(event.relid, event.openid, ok=True)
        assert isinstance(reply, h.Reply)
        self.port.post(m.encode(reply.message), [to_guest.fileno(), to_host.fileno()])
        if handler.own_thread:  # it serves a packet sent before the open's signal, too
            opened.thread = ChannelThread(self, event.relid, opened)
        else:
            self._service(event.relid)  # a packet sent before the open's signal is not lost

    def _add_offer(self, vsp: Vsp, offer: h.OfferSpec) -> None:
        events = self.server.add_offer(offer)  # QuotaExceeded goes back to the VSP
        self.vsp_of[offer] = vsp
        self._act(events)

    def _service(self, relid: int) -> int:
        """Serve one channel's packets; the count consumed. Any error (a
        corrupt ring, a request the VSP chokes on) fails that channel only."""
        open_channel = self.channels.get(relid)
        if open_channel is None:
            return 0
        failure = serve_channel(open_channel)
        if isinstance(failure, int):
            return failure
        self._fail(relid, failure)
        return 0

    def _take_failures(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._failed)
        failures, self._failures = self._failures, []
        for relid, reason in failures:
            self._fail(relid, reason)

    def _fail(self, relid: int, reason: str) -> None:
        """Rescind a channel that failed; the child's others go on."""
        if relid in self.channels:
            log.warning("%s: relid %d failed, rescinding: %s", self.name, relid, reason)
            self.rescinded += 1
            self._act(self.server.rescind(relid))

    def _close(self, relid: int) -> None:
        """Release one channel: every step is tried, whatever failed before."""
        open_channel = self.channels.pop(relid, None)
        if open_channel is None:
            return
        channel = open_channel.channel
        self.timers.cancel_owned(relid)
        if open_channel.thread is not None:
            self._attempt("stop the thread of", relid, open_channel.thread.stop)
        else:
            self._attempt("unwatch", relid, self.selector.unregister, channel.wake_me.fileno())
        self._attempt("close the VSP of", relid, open_channel.handler.close)
        self._attempt("close the signals of", relid, channel.notify_peer.close)
        self._attempt("close the signals of", relid, channel.wake_me.close)
        del channel.writer, channel.reader  # drop the ring buffers before unmapping
        for view in open_channel.views:
            view.release()
        for region in open_channel.regions:
            self._attempt("unmap the rings of", relid, region.close)

    def _attempt(self, what: str, relid: int, step: Callable[..., object], *args: object) -> None:
        try:
            step(*args)
        except Exception:
            log.exception("%s: failed to %s relid %d", self.name, what, relid)

    def _cleanup(self) -> None:
        """Release everything of the child; a failing step does not stop the
        others, and the exit is always reported."""
        try:
            for relid in list(self.channels):
                self._close(relid)
            self._final_stats = self._device_stats()
            self._attempt("drop the GPADLs, after", -1, self.server.disconnect)
            for step in (self.selector.close, self.port.close):
                self._attempt("release, after", -1, step)
            with self._calls_lock:
                self._attempt("close the call signal, after", -1, os.close, self._called)
                self._called = -1
            self.exitcode = self.process.wait() if self.process else 0
            self._attempt("close the pidfd, after", -1, os.close, self.pidfd)
            self._attempt("close the failure signal, after", -1, os.close, self._failed)
            try:
                self.memory.close()
            except BufferError:  # a VSP still holds a view: unmapped when it lets go
                log.warning("%s: guest memory still viewed after cleanup", self.name)
                self.memory.detach()
        finally:
            if self.stopping:
                self.state = "stopped"
            else:
                self.state = "exited" if self.exitcode == 0 else "crashed"
            # The record outlives the child (Host.finished); the devices it
            # served are the caller's, and must not be pinned by it.
            self.devices, self.vsp_of = [], {}
            self.timers = TimerQueue()
            self.exited.set()

    # --- what the parent asks ---

    def status(self) -> dict[str, Any]:
        """The VM's state and what the child makes us hold, JSON-able."""
        gpadls = self.server.gpadls
        return {
            "name": self.name,
            "state": self.state,
            "exitcode": self.exitcode,
            "channels": len(self.channels),
            "offered": len(self.server.channels),  # rescinded ones until the child releases them
            "rescinded": self.rescinded,
            "gpadls": len(gpadls),
            "gpadl_pages": gpadls.pages,
            "mappings": self.memory.mappings,
            "mapping_refusals": self.memory.mapping_refusals,
            "protocol_errors": self.server.protocol_errors,
            "refusals": dict(self.server.refusals),
            "devices": self._final_stats or self._device_stats(),
        }

    def _device_stats(self) -> list[dict[str, Any]]:
        return [{"removed": True} if vsp is None else _device_stats(vsp) for vsp in self.devices]

    def control(self, device: int, request: dict[str, Any], answer: Answer) -> None:
        """A request of the parent for device `device` (its index): `answer`
        gets {"result": ...} once, when the device replies, or {"error":
        reason} for a request it does not take. Run in this loop."""
        answered = False

        def reply(result: dict[str, Any]) -> None:
            nonlocal answered
            if not answered:
                answered = True
                failed = isinstance(result, dict) and set(result) == {"error"}
                answer({"error": str(result["error"])} if failed else {"result": result})

        try:
            self._device(device).control(request, reply)
        except (UsageError, ValueError, KeyError, TypeError) as error:
            if not answered:
                answered = True
                answer({"error": str(error) or type(error).__name__})

    def add_device(self, vsp: Vsp) -> int:
        """Hot add: offer `vsp`'s channels to the running child; its index."""
        offers = vsp.offers()
        if any(offer in self.vsp_of for offer in offers):
            raise UsageError(f"{type(vsp).__name__}: an offer of it is offered already")
        self.devices.append(vsp)
        for offer in offers:
            self.vsp_of[offer] = vsp
            self._act(self.server.hot_add(offer))
        return len(self.devices) - 1

    def remove_device(self, device: int) -> None:
        """Hot remove: rescind every channel of device `device` (its
        sub-channels too); the child's driver answers RELID_RELEASED."""
        vsp = self._device(device)
        self.devices[device] = None
        for relid, record in list(self.server.channels.items()):
            live = record.state is not h.ChannelState.RESCINDED
            if live and self.vsp_of.get(record.offer) is vsp:
                self._act(self.server.rescind(relid))
        self.vsp_of = {offer: v for offer, v in self.vsp_of.items() if v is not vsp}

    def _device(self, device: int) -> Vsp:
        vsp = self.devices[device] if 0 <= device < len(self.devices) else None
        if vsp is None:
            raise UsageError(f"{self.name} has no device {device}")
        return vsp

    def fail(self, relid: int, reason: str) -> None:
        """From a channel's own thread: the main loop rescinds it."""
        self._failures.append((relid, reason))
        os.eventfd_write(self._failed, 1)


def _device_stats(vsp: Vsp) -> dict[str, Any]:
    try:
        return {"device": type(vsp).__name__, **vsp.stats()}
    except Exception as error:  # a VSP's bug must not hide the others' counters
        return {"device": type(vsp).__name__, "error": str(error)}
