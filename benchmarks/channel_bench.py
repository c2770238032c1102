"""Channel benchmarks of the control-plane issue: 64 B request/response round
trips and streaming through a VMBus channel between two processes, against
multiprocessing.Pipe and eventfd in the same run.

    python -m benchmarks.channel_bench [--quick] [--repeats N] [--markdown FILE]

Every method runs once per round and rounds alternate (A B C … C B A …); the
tables give medians over rounds and ratios taken within each round, because
the host moves the two vCPUs (see /work/shared/BENCHMARKING.md). Each method
runs with its two threads on two CPUs ("split"), on one CPU ("same"), and
where the scheduler puts them ("any"). Peers are forked once and serve one
batch per command; they die with us (PR_SET_PDEATHSIG) and are killed by PID
on any error.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import multiprocessing as mp
import os
import platform
import signal
import socket
import statistics
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from time import perf_counter
from typing import Any, Protocol

from benchmarks.harness import CHILD_POLICY, render_table
from vmbus.channel import COMPLETION_REQUESTED, DEFAULT_SPIN_SECONDS, Channel
from vmbus.guest import Guest
from vmbus.memory import GuestMemory
from vmbus.partition import Host, ThreadPartition
from vmbus.protocols.echo import ECHO_CLASS_ID
from vmbus.ring import HEADER_SIZE, init_ring
from vmbus.testing import channel_pair
from vmbus.transport import Signal
from vsc.echo import EchoVsc
from vsp.echo import EchoVsp

PAYLOAD = bytes(64)
RING_DATA = 64 * 1024  # data bytes per direction; the ring adds a header page
POLL_SPIN = 50e-6
WARMUP = 20  # untimed round trips per batch (the peer wakes from its command)
TIMEOUT = 60.0
PARTITION_TARGET = "benchmarks.channel_bench:partition_echo"  # importable even as __main__
CPUS = sorted(os.sched_getaffinity(0))
PLACEMENTS = ("split", "same", "any") if len(CPUS) > 1 else ("any",)
EVENTFD, SIGNAL, PIPE = "eventfd ping-pong (no payload)", "Signal set/wait", "mp.Pipe"
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Settings:
    repeats: int
    round_trips: int
    packets: dict[int, int]  # payload size -> packets per streaming batch


QUICK = Settings(repeats=5, round_trips=1000, packets={64: 30_000, 1024: 15_000})
FULL = Settings(repeats=9, round_trips=5000, packets={64: 300_000, 1024: 150_000})


@dataclass
class Sample:
    """One batch: `count` timed operations in `seconds`, the median and 99th
    percentile of one operation. Doorbells rung by each side and the
    responder's awake time cover the whole batch, warm-up included (`ops`
    operations); the requester's sleep covers `count`."""

    seconds: float
    count: int
    ops: int
    p50: float | None = None
    p99: float | None = None
    peer_signals: int | None = None
    own_signals: int | None = None
    asleep: float | None = None
    peer_awake: float | None = None

    @property
    def doorbells(self) -> int | None:
        if self.peer_signals is None or self.own_signals is None:
            return None
        return self.peer_signals + self.own_signals


# --- plumbing: forked peers, pinning, clocks, rings -------------------------------


def _die_with_parent(parent: int) -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


@dataclass
class Peer:
    process: BaseProcess
    control: Connection

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def command(self, *args: int) -> None:
        self.control.send(args)

    def result(self) -> Any:
        if not self.control.poll(TIMEOUT):
            raise TimeoutError(f"peer {self.pid} sent no result in {TIMEOUT:.0f} s")
        return self.control.recv()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.control.send(None)
        self.process.join(2.0)
        if self.process.is_alive():
            self.process.kill()  # by its PID: only the process we forked
            self.process.join()
        self.control.close()


def fork_peer(setup: Callable[[], Callable[..., Any]]) -> Peer:
    """Fork a child that runs `setup()` once, then answers each command
    tuple with handler(*command) until it receives None."""
    ctx = mp.get_context("fork")
    mine, theirs = ctx.Pipe()
    parent = os.getpid()

    def main() -> None:
        _die_with_parent(parent)
        mine.close()
        handler = setup()
        with contextlib.suppress(EOFError):
            for command in iter(theirs.recv, None):
                theirs.send(handler(*command))

    process = ctx.Process(target=main, name="channel-bench-peer", daemon=True)
    process.start()
    theirs.close()
    return Peer(process, mine)


class Forked:
    """A benchmark whose other side is a forked peer."""

    peer: Peer

    def threads(self) -> tuple[int, int]:
        """(our thread, the peer's): the requester or receiver first."""
        return threading.get_native_id(), self.peer.pid

    def close(self) -> None:
        self.peer.close()


class Pinnable(Protocol):
    """A benchmark of two threads: `run(*args)` times one batch."""

    @property
    def run(self) -> Callable[..., Sample]: ...

    def threads(self) -> tuple[int, int]: ...


class Placed:
    """Runs a benchmark with its two threads pinned: "split" puts them on two
    CPUs, "same" on one, "any" leaves them to the scheduler."""

    def __init__(self, inner: Pinnable, placement: str) -> None:
        self.inner, self.placement = inner, placement

    def run(self, *args: int) -> Sample:
        if self.placement == "any":
            return self.inner.run(*args)
        threads = self.inner.threads()
        saved = [os.sched_getaffinity(tid) for tid in threads]
        cpus = CPUS[:2] if self.placement == "split" else CPUS[:1] * 2
        for tid, cpu in zip(threads, cpus, strict=True):
            os.sched_setaffinity(tid, {cpu})
        try:
            return self.inner.run(*args)
        finally:
            for tid, mask in zip(threads, saved, strict=True):
                os.sched_setaffinity(tid, mask)


Timing = tuple[float, float, float]  # seconds in all, median and 99th percentile of one


def timed(one: Callable[[], object], count: int) -> Timing:
    """Call `one` `count` times, timing each call (~0.1 µs of overhead)."""
    stamps = [perf_counter()] * (count + 1)
    for index in range(1, count + 1):
        one()
        stamps[index] = perf_counter()
    laps = sorted(b - a for a, b in itertools.pairwise(stamps))
    return stamps[-1] - stamps[0], laps[count // 2], laps[count * 99 // 100]


def warm(one: Callable[[], object]) -> None:
    for _ in range(WARMUP):
        one()


class WaitClock:
    """Adds up the time a Signal's wait() spends asleep on its eventfd."""

    def __init__(self, doorbell: Signal) -> None:
        self.seconds = 0.0
        inner = doorbell.wait

        def wait(timeout: float | None) -> bool:
            start = perf_counter()
            try:
                return inner(timeout)
            finally:
                self.seconds += perf_counter() - start

        doorbell.wait = wait  # type: ignore[method-assign]


class RingPair:
    """Two rings in one memfd and a doorbell each way, shared by fork."""

    def __init__(self) -> None:
        size = HEADER_SIZE + RING_DATA
        self.memory = GuestMemory.create(2 * size, name="channel-bench")
        self.rings = (self.memory.view(0, size), self.memory.view(size, size))
        for ring in self.rings:
            init_ring(ring)
        self.to_peer, self.to_us = Signal(), Signal()

    def ours(self, spin: float) -> Channel:
        return Channel(self.rings[0], self.rings[1], self.to_peer, self.to_us, spin_seconds=spin)

    def theirs(self, spin: float) -> Channel:
        """The peer's end (call it in the peer): its own counting Signals."""
        to_us, to_peer = Signal(self.to_us.fd), Signal(self.to_peer.fd)
        return Channel(self.rings[1], self.rings[0], to_us, to_peer, spin_seconds=spin)

    def close(self) -> None:
        for ring in self.rings:
            ring.release()
        with contextlib.suppress(BufferError):
            self.memory.close()
        self.to_peer.close()
        self.to_us.close()


# --- round trips between two processes ----------------------------------------------


class ForkedRoundTrip(Forked):
    """Times `one()` against a peer that answers each batch of requests."""

    def one(self) -> None:
        raise NotImplementedError

    def run(self, count: int) -> Sample:
        self.peer.command(WARMUP + count)
        warm(self.one)
        seconds, p50, p99 = timed(self.one, count)
        self.peer.result()
        return Sample(seconds, count, WARMUP + count, p50, p99)


class EventfdRoundTrip(ForkedRoundTrip):
    """Two blocking eventfds: write the peer's, block reading ours."""

    def __init__(self) -> None:
        self.ping, self.pong = os.eventfd(0), os.eventfd(0)

        def setup() -> Callable[[int], None]:
            def answer(count: int) -> None:
                for _ in range(count):
                    os.eventfd_read(self.ping)
                    os.eventfd_write(self.pong, 1)

            return answer

        self.peer = fork_peer(setup)

    def one(self) -> None:
        os.eventfd_write(self.ping, 1)
        os.eventfd_read(self.pong)


class SignalRoundTrip(ForkedRoundTrip):
    """The channel's doorbells alone: Signal.set(), then Signal.wait()
    (select on a non-blocking eventfd, then read it)."""

    def __init__(self) -> None:
        self.to_peer, self.to_us = Signal(), Signal()

        def setup() -> Callable[[int], None]:
            to_us, to_peer = Signal(self.to_us.fd), Signal(self.to_peer.fd)

            def answer(count: int) -> None:
                for _ in range(count):
                    to_peer.wait(TIMEOUT)
                    to_us.set()

            return answer

        self.peer = fork_peer(setup)

    def one(self) -> None:
        self.to_peer.set()
        self.to_us.wait(TIMEOUT)


class PipeRoundTrip(ForkedRoundTrip):
    """multiprocessing.Pipe: send_bytes, then block in recv_bytes."""

    def __init__(self) -> None:
        self.end, theirs = mp.get_context("fork").Pipe()

        def setup() -> Callable[[int], None]:
            def answer(count: int) -> None:
                for _ in range(count):
                    theirs.send_bytes(theirs.recv_bytes())

            return answer

        self.peer = fork_peer(setup)
        theirs.close()

    def one(self) -> None:
        self.end.send_bytes(PAYLOAD)
        self.end.recv_bytes()


class ChannelRoundTrip(ForkedRoundTrip):
    """Channel.request in us against receive + send_completion in the peer,
    both sides with the same poll budget."""

    def __init__(self, spin: float) -> None:
        self.rings = RingPair()

        def setup() -> Callable[[int], tuple[int, float, float]]:
            channel = self.rings.theirs(spin)
            clock = WaitClock(channel.wake_me)

            def answer(count: int) -> tuple[int, float, float]:
                signals, asleep, start = channel.signals_sent, clock.seconds, perf_counter()
                for _ in range(count):
                    packet = channel.receive(timeout=TIMEOUT)
                    channel.send_completion(packet.trans_id, packet.payload)
                elapsed = perf_counter() - start
                return channel.signals_sent - signals, clock.seconds - asleep, elapsed

            return answer

        self.peer = fork_peer(setup)
        self.channel = self.rings.ours(spin)
        self.clock = WaitClock(self.channel.wake_me)

    def one(self) -> None:
        self.channel.request(PAYLOAD, timeout=TIMEOUT)

    def run(self, count: int) -> Sample:
        signals = self.channel.signals_sent
        self.peer.command(WARMUP + count)
        warm(self.one)
        asleep = self.clock.seconds
        seconds, p50, p99 = timed(self.one, count)
        asleep = self.clock.seconds - asleep
        own = self.channel.signals_sent - signals
        peer_signals, peer_asleep, peer_elapsed = self.peer.result()
        return Sample(
            seconds,
            count,
            WARMUP + count,
            p50,
            p99,
            peer_signals=peer_signals,
            own_signals=own,
            asleep=asleep,
            peer_awake=peer_elapsed - peer_asleep,
        )

    def close(self) -> None:
        self.peer.close()
        del self.channel  # it holds the ring buffers
        self.rings.close()


class FloorRoundTrip:
    """Both sides of a round trip in one thread: the CPU cost, no wake-up."""

    def __init__(self, kind: str) -> None:
        self.one = {EVENTFD: self._eventfd, PIPE: self._pipe, "channel": self._channel}[kind]
        self.fds = (os.eventfd(0), os.eventfd(0))
        self.pipe = mp.Pipe()
        self.guest, self.host = channel_pair(RING_DATA, spin_seconds=0.0)

    def _eventfd(self) -> None:
        for fd in self.fds:
            os.eventfd_write(fd, 1)
            os.eventfd_read(fd)

    def _pipe(self) -> None:
        a, b = self.pipe
        a.send_bytes(PAYLOAD)
        b.send_bytes(b.recv_bytes())
        a.recv_bytes()

    def _channel(self) -> None:
        trans_id = next(self.guest.ids)
        self.guest.send(PAYLOAD, flags=COMPLETION_REQUESTED, trans_id=trans_id)
        packet = self.host.poll()
        assert packet is not None
        self.host.send_completion(packet.trans_id, packet.payload)
        self.guest.wait_completion(trans_id)

    def run(self, count: int) -> Sample:
        warm(self.one)
        signals = self.guest.signals_sent + self.host.signals_sent
        seconds, p50, p99 = timed(self.one, count)
        own = self.guest.signals_sent + self.host.signals_sent - signals
        return Sample(seconds, count, count, p50, p99, peer_signals=0, own_signals=own)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        for end in self.pipe:
            end.close()


# --- the full stack: a child partition against the parent's VSP ----------------------


def partition_echo(guest: Guest, address: str, spin: float) -> None:
    """Child partition: open the echo channel with poll budget `spin`, then
    time batches of EchoVsc.echo() as the parent asks over `address`."""
    _die_with_parent(os.getppid())
    drivers: list[EchoVsc] = []
    guest.register(ECHO_CLASS_ID, lambda device: drivers.append(EchoVsc(device)))
    vsc = drivers[0]
    size = HEADER_SIZE + RING_DATA
    vsc.channel = channel = vsc.device.open(size, size, spin_seconds=spin)
    clock = WaitClock(channel.wake_me)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(address)
    control = Connection(sock.detach())
    with contextlib.suppress(EOFError):
        for warmup, count in iter(control.recv, None):
            signals = channel.signals_sent
            timed(lambda: vsc.echo(PAYLOAD), warmup)
            asleep = clock.seconds
            timing = timed(lambda: vsc.echo(PAYLOAD), count)
            asleep = clock.seconds - asleep
            control.send((timing, channel.signals_sent - signals, asleep))
    channel.close()
    guest.unload()


class FullStackRoundTrip:
    """A child partition's EchoVsc.echo() against the parent's EchoVsp, whose
    worker thread is select()-driven (no spin on the parent's side). The VM
    is served by a thread of this process (worker="thread"), not a worker
    process: that thread is the one to pin, and the EchoVsp the one whose
    channel counts its doorbells."""

    def __init__(self, host: Host, spin: float, workdir: str) -> None:
        address = os.path.join(workdir, f"control-{len(os.listdir(workdir))}")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(address)
        listener.listen(1)
        listener.settimeout(TIMEOUT)
        self.vsp = EchoVsp()
        child = host.start(
            PARTITION_TARGET,
            devices=[self.vsp],
            args=(address, spin),
            memory_size=8 << 20,
            policy=CHILD_POLICY,
            worker="thread",
        )
        assert isinstance(child, ThreadPartition)
        self.child = child
        try:
            sock, _ = listener.accept()
        finally:
            listener.close()
        sock.settimeout(None)
        self.control = Connection(sock.detach())

    def threads(self) -> tuple[int, int]:
        """(the child's main thread, the parent's worker thread)."""
        assert self.child.worker.native_id is not None
        return self.child.pid, self.child.worker.native_id

    def run(self, count: int) -> Sample:
        vsp_channel = self.vsp.handlers[0].channel
        before = vsp_channel.signals_sent
        self.control.send((WARMUP, count))
        if not self.control.poll(TIMEOUT):
            raise TimeoutError(f"child partition {self.child.pid} sent no result")
        (seconds, p50, p99), child_signals, asleep = self.control.recv()
        own = vsp_channel.signals_sent - before
        return Sample(
            seconds,
            count,
            WARMUP + count,
            p50,
            p99,
            peer_signals=child_signals,
            own_signals=own,
            asleep=asleep,
        )

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.control.send(None)
        self.control.close()
        if self.child.wait(10) is None:
            self.child.stop()


# --- streaming ---------------------------------------------------------------------


class PipeStream(Forked):
    def __init__(self) -> None:
        self.end, theirs = mp.get_context("fork").Pipe(duplex=False)

        def setup() -> Callable[[int, int], None]:
            def send(count: int, size: int) -> None:
                payload = bytes(size)
                for _ in range(count):
                    theirs.send_bytes(payload)

            return send

        self.peer = fork_peer(setup)
        theirs.close()

    def run(self, count: int, size: int) -> Sample:
        start = perf_counter()
        self.peer.command(count, size)
        for _ in range(count):
            self.end.recv_bytes()
        seconds = perf_counter() - start
        self.peer.result()
        return Sample(seconds, count, count)


class ChannelStream(Forked):
    """The peer send()s; we drain. Event-driven: service(), then sleep on the
    doorbell (the Host worker's pattern). Poll mode: drain(), and when the
    ring is empty Channel.wait() (spin POLL_SPIN, then sleep)."""

    def __init__(self, poll: bool) -> None:
        self.poll = poll
        self.rings = RingPair()
        self.received = 0

        def setup() -> Callable[[int, int], int]:
            channel = self.rings.theirs(0.0)

            def send(count: int, size: int) -> int:
                payload, before = bytes(size), channel.signals_sent
                for _ in range(count):
                    channel.send(payload, timeout=TIMEOUT)
                return channel.signals_sent - before

            return send

        self.peer = fork_peer(setup)
        self.channel = self.rings.ours(POLL_SPIN if poll else 0.0)

    def count(self, packet: object) -> None:
        self.received += 1

    def run(self, count: int, size: int) -> Sample:
        channel, self.received = self.channel, 0
        before = channel.signals_sent
        start = perf_counter()
        self.peer.command(count, size)
        if self.poll:
            channel.reader.begin_drain()
            while self.received < count:
                if not channel.drain(self.count):
                    channel.wait(None)
        else:
            while True:
                channel.service(self.count)
                if self.received >= count:
                    break
                if not channel.wake_me.wait(TIMEOUT):
                    raise TimeoutError("no packet in time")
        seconds = perf_counter() - start
        own = channel.signals_sent - before
        return Sample(seconds, count, count, peer_signals=self.peer.result(), own_signals=own)

    def close(self) -> None:
        self.peer.close()
        del self.channel
        self.rings.close()


# --- the runner ----------------------------------------------------------------------

Key = tuple[str, str]  # (placement, method)


@contextlib.contextmanager
def watchdog(seconds: float = 2 * TIMEOUT) -> Iterator[None]:
    """SIGALRM if a batch hangs (a peer that died leaves us blocked)."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"batch took over {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(int(seconds))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def rounds(
    jobs: Sequence[tuple[Key, Callable[[], Sample]]], repeats: int
) -> dict[Key, list[Sample]]:
    """Each job once per round, alternating the order; samples by key."""
    results: dict[Key, list[Sample]] = {key: [] for key, _ in jobs}
    for index in range(repeats):
        for key, job in jobs if index % 2 == 0 else reversed(jobs):
            with watchdog():
                results[key].append(job())
    return results


def bind(bench: Any, *args: int) -> Callable[[], Sample]:
    return lambda: bench.run(*args)


def measure(
    settings: Settings,
) -> tuple[dict[Key, list[Sample]], dict[int, dict[Key, list[Sample]]]]:
    """Start every peer, run the interleaved rounds: round-trip samples, and
    streaming samples by payload size."""
    closers: list[Callable[[], None]] = []

    def keep(bench: Any) -> Any:
        closers.append(bench.close)
        return bench

    default = f"channel, spin {DEFAULT_SPIN_SECONDS * 1e6:.0f} µs (default)"
    try:
        trips = {EVENTFD: keep(EventfdRoundTrip()), SIGNAL: keep(SignalRoundTrip())}
        trips[PIPE] = keep(PipeRoundTrip())
        trips["channel, spin 0"] = keep(ChannelRoundTrip(0.0))
        trips[default] = keep(ChannelRoundTrip(DEFAULT_SPIN_SECONDS))
        trips["channel, spin 50 µs"] = keep(ChannelRoundTrip(POLL_SPIN))
        floors = {name: keep(FloorRoundTrip(name)) for name in (EVENTFD, PIPE, "channel")}
        streams = {PIPE: keep(PipeStream())}
        streams["channel, event-driven"] = keep(ChannelStream(poll=False))
        streams["channel, poll 50 µs"] = keep(ChannelStream(poll=True))
        with Host() as host, tempfile.TemporaryDirectory() as workdir:  # threads after forks
            partitions: list[FullStackRoundTrip] = []
            try:
                for spin in (0.0, POLL_SPIN):
                    partitions.append(FullStackRoundTrip(host, spin, workdir))
                    trips[f"full stack echo, child spin {spin * 1e6:.0f} µs"] = partitions[-1]
                jobs = [
                    ((placement, name), bind(Placed(trip, placement), settings.round_trips))
                    for placement in PLACEMENTS
                    for name, trip in trips.items()
                ]
                jobs += [
                    (("one thread", name), bind(floor, settings.round_trips))
                    for name, floor in floors.items()
                ]
                round_trips = rounds(jobs, settings.repeats)
            finally:  # let the children unload before the Host stops them
                for partition in partitions:
                    with contextlib.suppress(Exception):
                        partition.close()
        streaming = {}
        for size, packets in settings.packets.items():
            jobs = [
                ((placement, name), bind(Placed(stream, placement), packets, size))
                for placement in PLACEMENTS
                if placement != "same"
                for name, stream in streams.items()
            ]
            streaming[size] = rounds(jobs, settings.repeats)
        return round_trips, streaming
    finally:
        for close in reversed(closers):
            with contextlib.suppress(Exception):
                close()


# --- tables --------------------------------------------------------------------------


def speedup(samples: list[Sample], baseline: list[Sample], of: str = "mean") -> float:
    """Median over rounds of the baseline's time per operation (its mean or
    its median, `of`) divided by ours in the same round."""

    def time(sample: Sample) -> float:
        value = sample.seconds / sample.count if of == "mean" else sample.p50
        assert value is not None
        return value

    return statistics.median(time(b) / time(s) for s, b in zip(samples, baseline, strict=True))


def per(total: float | None, count: int) -> float | None:
    return None if total is None else total / count


def median_of(values: list[float | None], scale: float = 1.0) -> float | None:
    """The median, or None if any value is unknown."""
    known = [value for value in values if value is not None]
    return statistics.median(known) * scale if known and len(known) == len(values) else None


def fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


ROUND_TRIP_HEADERS = [
    "64 B round trip, one outstanding",
    "cores",
    "p50 µs",
    "p99 µs",
    "mean µs",
    "K RT/s",
    "× Pipe (p50)",
    "× eventfd (p50)",
    "doorbells/RT",
    "requester asleep µs/RT",
    "responder awake µs/RT",
]


def round_trip_table(results: dict[Key, list[Sample]]) -> list[list[str]]:
    rows = []
    for (placement, name), samples in results.items():
        mean = statistics.median(s.seconds / s.count for s in samples)
        rows.append(
            [
                name,
                placement,
                fmt(median_of([s.p50 for s in samples], 1e6)),
                fmt(median_of([s.p99 for s in samples], 1e6)),
                fmt(mean * 1e6),
                fmt(1e-3 / mean),
                fmt(speedup(samples, results[placement, PIPE], "p50"), 2),
                fmt(speedup(samples, results[placement, EVENTFD], "p50"), 2),
                fmt(median_of([per(s.doorbells, s.ops) for s in samples]), 2),
                fmt(median_of([per(s.asleep, s.count) for s in samples], 1e6)),
                fmt(median_of([per(s.peer_awake, s.ops) for s in samples], 1e6)),
            ]
        )
    return rows


STREAM_HEADERS = [
    "streaming, one sender → one receiver",
    "cores",
    "payload",
    "K packets/s",
    "MB/s",
    "rate × Pipe",
    "data doorbells / M packets",
    "space doorbells / M packets",
]


def stream_table(results: dict[Key, list[Sample]], size: int) -> list[list[str]]:
    rows = []
    for (placement, name), samples in results.items():
        rate = statistics.median(s.count / s.seconds for s in samples)
        data = [per(s.peer_signals, s.count) for s in samples]
        space = [per(s.own_signals, s.count) for s in samples]
        rows.append(
            [
                name,
                placement,
                f"{size:,} B",
                fmt(rate / 1e3),
                fmt(rate * size / 1e6),
                fmt(speedup(samples, results[placement, PIPE]), 2),
                fmt(median_of(data, 1e6), 0),
                fmt(median_of(space, 1e6), 0),
            ]
        )
    return rows


def render(headers: list[str], rows: list[list[str]], markdown: bool) -> str:
    return render_table(headers, rows, markdown)


def report(settings: Settings, command: str) -> tuple[str, str]:
    """Measure; the result as plain text and as Markdown."""
    load = os.getloadavg()[0]
    round_trips, streaming = measure(settings)
    trip_rows = round_trip_table(round_trips)
    stream_rows = [
        row for size, results in streaming.items() for row in stream_table(results, size)
    ]
    batches = ", ".join(f"{n:,} × {size} B" for size, n in settings.packets.items())
    header = (
        f"`{command}`: {len(CPUS)} CPUs, Linux {platform.release()}, "
        f"Python {platform.python_version()}; {settings.repeats} interleaved rounds of "
        f"{settings.round_trips:,} round trips and {batches} packets; medians, ratios "
        f"within each round; load average {load:.1f} before, {os.getloadavg()[0]:.1f} after."
    )
    texts = []
    for markdown in (False, True):
        tables = [render(ROUND_TRIP_HEADERS, trip_rows, markdown)]
        tables.append(render(STREAM_HEADERS, stream_rows, markdown))
        texts.append("\n\n".join([header, *tables]))
    return texts[0], texts[1]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, smaller rounds (~15 s)")
    parser.add_argument("--repeats", type=int, help="rounds (default 5 quick, 9 full)")
    parser.add_argument("--markdown", metavar="FILE", help="also write the tables as Markdown")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.repeats:
        settings = Settings(args.repeats, settings.round_trips, settings.packets)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanups on SIGTERM
    words = sys.argv[1:] if argv is None else list(argv)
    text, markdown = report(settings, " ".join(["python -m benchmarks.channel_bench", *words]))
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as out:
            out.write(markdown + "\n")


if __name__ == "__main__":
    main()
