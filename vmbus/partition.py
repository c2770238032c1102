"""Child partitions as real processes, and the parent's `Host` that runs them.

Each child is a fresh interpreter (fork and exec, never a bare fork) that
gets its own guest memory (a sealed memfd), a SOCK_SEQPACKET message port,
and nothing else of the parent's: no descriptor and no mapping of a
sibling's memory. In the parent, one worker thread per child (Hyper-V's
VMWP) runs the VMBus server, maps ring GPADLs, and drives the VSPs' open
channels. A child that misbehaves loses the offending channel; a child that
dies loses everything it had, and no one else notices.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import pickle
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vmbus import host as h
from vmbus import messages as m
from vmbus import sandbox
from vmbus.channel import DEFAULT_SPIN_SECONDS, Channel
from vmbus.device import ChannelHandler, OpenContext, Vsp
from vmbus.errors import PeerError, PeerLog, UsageError
from vmbus.memory import GuestMemory, GuestMemoryError, MappedRegion, map_channel_rings
from vmbus.ring import RingCorrupt
from vmbus.transport import MalformedMessage, MessagePort, PortClosed, Signal, SocketPort

log = logging.getLogger(__name__)

DEFAULT_MEMORY = 32 * 1024 * 1024
POLL_SECONDS = 0.5  # how often a worker notices a stop request


Target = Callable[..., Any] | str  # a function, or "module:function"


@dataclass
class _OpenChannel:
    channel: Channel
    handler: ChannelHandler
    regions: tuple[MappedRegion, MappedRegion]
    views: tuple[memoryview, memoryview]


@dataclass
class ChildPartition:
    """One child partition and the parent's state for it: a child process
    (`Host.start`), or a guest an emulator runs itself (`Host.attach`, with
    no process: the emulator supplies the memory and the message port)."""

    name: str
    process: subprocess.Popen[bytes] | None
    memory: GuestMemory
    port: MessagePort
    devices: Sequence[Vsp]
    state: str = "starting"  # running, exited, crashed, stopped
    exitcode: int | None = None
    channels: dict[int, _OpenChannel] = field(default_factory=dict)
    server: h.VmbusServer = field(init=False)
    spin_seconds: float = 0.0  # poll mode; see _poll (it holds the GIL while it spins)
    quotas: h.Quotas = field(default_factory=h.Quotas)  # what the child may make us hold
    _stopping: bool = False
    _exited: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.vsp_of: dict[h.OfferSpec, Vsp] = {}
        for vsp in self.devices:
            for offer in vsp.offers():
                self.vsp_of[offer] = vsp
        self.server = self.quotas.server(list(self.vsp_of), self.memory.page_count)
        self.memory.max_mappings = self.quotas.max_mappings
        self.peer_log = PeerLog(log, self.name)  # the child's protocol errors, rate-limited
        # Readable when the child is gone: its pidfd, or an eventfd stop() rings.
        self.pid = self.process.pid if self.process else os.getpid()
        self.pidfd = os.pidfd_open(self.pid) if self.process else os.eventfd(0)
        self.worker = threading.Thread(target=self._serve, name=f"vmwp-{self.name}", daemon=True)

    @property
    def confinement(self) -> tuple[str, ...]:
        """The sandbox layers the child runs under (none when embedded)."""
        if isinstance(self.process, sandbox.ConfinedProcess):
            return self.process.confinement
        return ()

    # --- lifecycle ---

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code once the child is gone and cleaned up, else None."""
        self._exited.wait(timeout)
        return self.exitcode

    def stop(self, timeout: float = 5.0) -> int | None:
        """Ask the child to end (SIGTERM), then kill it if it does not."""
        self._stopping = True
        self._signal(signal.SIGTERM)
        if self.wait(timeout) is None and self.state not in ("exited", "crashed", "stopped"):
            self.kill()
            self.wait(timeout)
        return self.exitcode

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, signo: int) -> None:
        if self.process is None:  # embedded: there is only our worker to stop
            os.eventfd_write(self.pidfd, 1)
            return
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(self.pidfd, signo)

    # --- the worker ---

    def _serve(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.port.fileno(), selectors.EVENT_READ, None)
        self.selector.register(self.pidfd, selectors.EVENT_READ, "exit")
        try:
            while True:
                for key, _ in self.selector.select(POLL_SECONDS):
                    if key.data is None:
                        self._message()
                    elif key.data == "exit":
                        raise PortClosed("child exited")
                    elif callable(key.data):
                        key.data()
                    else:
                        self._service(key.data)
                while self._poll():
                    pass
        except PortClosed:
            pass
        except Exception:  # a bug of ours: never take the parent down with it
            log.exception("worker of %s failed", self.name)
        finally:
            self._cleanup()

    def _poll(self) -> bool:
        """Poll mode: before sleeping, spin on the open channels for
        `spin_seconds` with their signals masked (the guest skips its
        doorbell), since waking a sleeping thread costs far more than a
        short spin. True only if a channel's packets were consumed, so a
        peer that leaves packets we cannot take (no room for replies) sends
        the worker back to its select, not into a busy loop. A channel whose
        ring is corrupt fails alone, here as in `_service`."""
        channels = [(relid, c.channel) for relid, c in self.channels.items()]
        if not self.spin_seconds or not channels:
            return False
        failed: dict[int, str] = {}

        def check(relid: int, step: Callable[[], object]) -> object:
            try:
                return step()
            except Exception as error:  # a corrupt ring: that channel only
                failed.setdefault(relid, str(error))
                return None

        for relid, channel in channels:
            check(relid, channel.reader.begin_drain)
        end = time.perf_counter() + self.spin_seconds
        ready = None
        while ready is None and not failed and time.perf_counter() < end:
            for relid, channel in channels:  # no allocation in the spin
                try:
                    available = channel.reader.bytes_available
                except Exception as error:  # a corrupt ring: that channel only
                    failed.setdefault(relid, str(error))
                    break
                if available:
                    ready = relid
                    break
        for relid, channel in channels:  # unmask; anything that slipped in is served
            if check(relid, channel.reader.end_drain) and ready is None:
                ready = relid
        for relid, reason in failed.items():
            self._fail(relid, reason)
        if ready is None or ready in failed:
            return False
        return self._service(ready) > 0

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
                watch=self._watch,
                unwatch=self._unwatch,
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
        self.channels[event.relid] = _OpenChannel(channel, handler, regions, views)
        self.selector.register(to_host.fileno(), selectors.EVENT_READ, event.relid)
        (reply,) = self.server.open_done(event.relid, event.openid, ok=True)
        assert isinstance(reply, h.Reply)
        self.port.post(m.encode(reply.message), [to_guest.fileno(), to_host.fileno()])
        self._service(event.relid)  # a packet sent before the open's signal is not lost

    def _watch(self, fd: int, callback: Callable[[], None]) -> None:
        """A VSP's own descriptor (a TAP device, a switch port) served by this
        worker, so its channels are only ever touched by one thread."""
        self.selector.register(fd, selectors.EVENT_READ, callback)

    def _unwatch(self, fd: int) -> None:
        self.selector.unregister(fd)

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
        failure = None
        try:
            handler = open_channel.handler
            count = open_channel.channel.service(handler.on_packet, handler.admission)
            handler.on_signal()
            return count
        except Exception as error:
            failure = str(error)  # not the exception: its traceback pins views of the ring
        self._fail(relid, failure)
        return 0

    def _fail(self, relid: int, reason: str) -> None:
        """Rescind a channel that failed; the child's others go on."""
        if relid in self.channels:
            log.warning("%s: relid %d failed, rescinding: %s", self.name, relid, reason)
            self._act(self.server.rescind(relid))

    def _close(self, relid: int) -> None:
        """Release one channel: every step is tried, whatever failed before."""
        open_channel = self.channels.pop(relid, None)
        if open_channel is None:
            return
        channel = open_channel.channel
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
            self._attempt("drop the GPADLs, after", -1, self.server.disconnect)
            for step in (self.selector.close, self.port.close):
                self._attempt("release, after", -1, step)
            self.exitcode = self.process.wait() if self.process else 0
            self._attempt("close the pidfd, after", -1, os.close, self.pidfd)
            try:
                self.memory.close()
            except BufferError:  # a VSP still holds a view: unmapped when it lets go
                log.warning("%s: guest memory still viewed after cleanup", self.name)
                self.memory.detach()
        finally:
            if self._stopping:
                self.state = "stopped"
            else:
                self.state = "exited" if self.exitcode == 0 else "crashed"
            # The record outlives the child (Host.finished); the devices it
            # served are the caller's, and must not be pinned by it.
            self.devices, self.vsp_of = (), {}
            self._exited.set()


class Host:
    """The root partition: starts child partitions and serves their VMBus.

    `children` holds the children that may still run, by name. A finished
    child (its worker has cleaned up) is forgotten there at the next
    `start` or `attach` and kept only in `finished`, the last
    `FINISHED_KEPT` of them, newest last: a long-lived host that starts and
    stops children forever holds a bounded record of them. The caller's own
    reference to a ChildPartition stays valid after it is forgotten."""

    FINISHED_KEPT = 16

    def __init__(self) -> None:
        self.children: dict[str, ChildPartition] = {}
        self.finished: collections.deque[ChildPartition] = collections.deque(
            maxlen=self.FINISHED_KEPT
        )
        self._names = iter(range(1, 1 << 30))

    def _admit(self, name: str) -> None:
        """Forget finished children; refuse a name a running child has."""
        for done in [c for c in self.children.values() if c._exited.is_set()]:
            del self.children[done.name]
            self.finished.append(done)
        if name in self.children:
            raise UsageError(f"a child named {name!r} is running")

    def start(
        self,
        target: Target,
        *,
        devices: Sequence[Vsp] = (),
        memory_size: int = DEFAULT_MEMORY,
        name: str | None = None,
        args: Sequence[Any] = (),
        spin_seconds: float = DEFAULT_SPIN_SECONDS,
        quotas: h.Quotas | None = None,
        policy: sandbox.Policy | None = None,
    ) -> ChildPartition:
        """Start a child partition that runs `target(guest, *args)` once its
        VMBus is connected; its exit code is 0 if that returns. The parent's
        worker polls its channels for `spin_seconds` before sleeping. The
        child is confined by `policy` (default: `vmbus.sandbox.policy`) and
        may make the parent hold no more than `quotas`."""
        name = name or f"child-{next(self._names)}"
        self._admit(name)
        memory = GuestMemory.create(memory_size, name=f"vmbus-{name}")
        parent_port, child_port = SocketPort.pair()
        fds = (child_port.fileno(), memory.fileno())
        boot = pickle.dumps((sys.path, _target_name(target), tuple(args)))
        process = sandbox.spawn(  # confined: see vmbus.sandbox
            [sys.executable, "-m", "vmbus._child", *map(str, fds), str(memory_size)],
            pass_fds=fds,
            name=name,
            policy=policy,
        )
        assert process.stdin is not None
        process.stdin.write(boot)
        process.stdin.close()
        child_port.close()
        child = ChildPartition(
            name,
            process,
            memory,
            parent_port,
            devices,
            spin_seconds=spin_seconds,
            quotas=quotas or h.Quotas(),
        )
        self.children[name] = child
        child.worker.start()
        return child

    def attach(
        self,
        memory: GuestMemory,
        port: MessagePort,
        *,
        devices: Sequence[Vsp] = (),
        name: str,
        quotas: h.Quotas | None = None,
    ) -> ChildPartition:
        """Serve the VMBus of a guest the caller runs itself (an emulator's):
        its memory (a memfd, see GuestMemory.from_fd) and the port its
        messages arrive on. The server takes over both and closes them."""
        self._admit(name)
        child = ChildPartition(name, None, memory, port, devices, quotas=quotas or h.Quotas())
        self.children[name] = child
        child.worker.start()
        return child

    def stop_all(self, timeout: float = 5.0) -> None:
        for child in self.children.values():
            if child.exitcode is None:
                child.stop(timeout)

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def _target_name(target: Target) -> str:
    """ "module:function" for a target; the child imports it by that name."""
    if isinstance(target, str):
        return target
    if "<" in target.__qualname__:
        raise UsageError(f"{target.__qualname__} is not importable; use a top-level function")
    module = target.__module__
    if module == "__main__":  # a script: the child loads it by path
        module = os.path.abspath(sys.modules["__main__"].__file__ or "")
    return f"{module}:{target.__qualname__}"


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll `predicate` until true or timeout: for tests and the CLI."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True
