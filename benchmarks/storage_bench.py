"""Storage benchmarks: a child partition's BlockDevice against the parent's
storvsp on a raw image file, against fio and a Python os.preadv/pwritev loop
on the same file, and the bus round trip (the echo device) in the same run.
The O_DIRECT rows read the same image through a second LUN, a DirectBackend
(the pass-through disk: no page cache, requests overlapped in storvsp's I/O
pool), against `fio --direct=1` on the image.

    python -m benchmarks.storage_bench [--quick] [--repeats N] [--seconds S]
        [--spin SECONDS] [--dir DIR] [--markdown FILE]

One image (filled with data, read once so the page cache is warm) serves
every method. Every measurement is time-bounded and each round runs them all,
alternating the order (A B … B A …); the table gives medians over rounds and
ratios taken within each round, because the host moves the two vCPUs (see
/work/shared/BENCHMARKING.md). The child partition times its own loops and
answers over a Unix socket, with its doorbells and CPU time per request (the
parent adds those of the VM's worker process, read from its stats). The Host stops the child (by
its pidfd) and the image's temporary directory goes on any exit, SIGTERM
included. Missing fio is reported and skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import json
import mmap
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from time import clock_gettime, perf_counter, process_time

from benchmarks.harness import CHILD_POLICY, render_table
from vmbus import guid
from vmbus.channel import DEFAULT_SPIN_SECONDS, Channel
from vmbus.guest import Guest, GuestDevice
from vmbus.partition import ChildPartition, Host, ProcessPartition
from vmbus.protocols.echo import ECHO_CLASS_ID
from vsc.echo import EchoVsc
from vsc.storage import BlockDevice, GuestBuffer, StorageController
from vsp.echo import EchoVsp
from vsp.storage import DirectBackend, RawFileBackend, StorVsp
from vsp.storage import device as storvsp

KiB, MiB = 1 << 10, 1 << 20
QUEUE_DEPTH = 32
MAX_IO = MiB  # one SRB per 1 MiB request, as fio does one syscall
CHILD_MEMORY = 2 * QUEUE_DEPTH * MAX_IO + 48 * MiB  # two controllers' bounce slots, buffers, rings
# A QDn step keeps n requests in flight over PIPELINE * n of them (each
# refilled as one completes), as fio's iodepth does: not n, then none.
PIPELINE = 4
CHILD_TARGET = "benchmarks.storage_bench:storage_child"  # importable even as __main__
TIMEOUT = 60.0
WARMUP_STEPS = 4
ECHO_PAYLOAD = bytes(64)
ECHO_RING = 64 * KiB
STACK, FIO, URING, PYTHON, ECHO = "stack", "fio psync", "fio io_uring", "Python loop", "bus echo"


@dataclass(frozen=True)
class Workload:
    name: str
    write: bool
    random: bool
    size: int  # bytes per request
    depth: int  # requests in flight
    direct: bool = False  # O_DIRECT: the stack's LUN 1 (DirectBackend), fio --direct=1
    channels: int = 1  # >1: the second controller, whose sub-channels have threads of their own

    @property
    def fio_rw(self) -> str:
        return ("rand" if self.random else "") + ("write" if self.write else "read")


WORKLOADS = [
    Workload("4 KiB random read, QD1", False, True, 4 * KiB, 1),
    Workload("4 KiB random read, QD32", False, True, 4 * KiB, QUEUE_DEPTH),
    Workload("4 KiB random write, QD1", True, True, 4 * KiB, 1),
    Workload("4 KiB random write, QD32", True, True, 4 * KiB, QUEUE_DEPTH),
    Workload("1 MiB sequential read, QD1", False, False, MiB, 1),
    Workload("1 MiB sequential read, QD4", False, False, MiB, 4),
    Workload("1 MiB sequential write, QD1", True, False, MiB, 1),
    Workload("1 MiB sequential write, QD4", True, False, MiB, 4),
]
DIRECT_LUN = 1
DIRECT_WORKLOADS = [
    Workload("4 KiB random read, QD1, O_DIRECT", False, True, 4 * KiB, 1, True),
    Workload("4 KiB random read, QD32, O_DIRECT", False, True, 4 * KiB, QUEUE_DEPTH, True),
    Workload("1 MiB sequential read, QD1, O_DIRECT", False, False, MiB, 1, True),
]
SUB_CHANNELS = 2
CHANNELS = 1 + SUB_CHANNELS
MULTI_WORKLOADS = [
    Workload(
        f"4 KiB random read, QD32, {CHANNELS} channels", False, True, 4 * KiB, 32, False, CHANNELS
    ),
    Workload(
        f"4 KiB random write, QD32, {CHANNELS} channels", True, True, 4 * KiB, 32, False, CHANNELS
    ),
    Workload(
        f"1 MiB sequential read, QD4, {CHANNELS} channels", False, False, MiB, 4, False, CHANNELS
    ),
]
ALL_WORKLOADS = WORKLOADS + DIRECT_WORKLOADS + MULTI_WORKLOADS
# Rows measured again with poll mode off everywhere: CPU is then the work and
# the wake-ups alone, not the spin (with it, CPU per request ~ its latency).
NO_SPIN = ", no spin"
INTERRUPT_ROWS = ["64 B bus round trip", "4 KiB random read, QD1", "4 KiB random write, QD1"]
BY_NAME = {w.name: w for w in ALL_WORKLOADS}
ROUND_TRIP = "64 B bus round trip"


@dataclass(frozen=True)
class Settings:
    repeats: int
    seconds: float  # per measurement
    image: int  # bytes
    spin: float = DEFAULT_SPIN_SECONDS  # the child's poll budget before it sleeps


@dataclass(frozen=True)
class Sample:
    """One measurement: operations per second (None: the tool failed); for the
    stack also the doorbells rung per packet each way (the peer had gone to
    sleep) and the CPU time per request on each side."""

    rate: float | None
    to_host: float | None = None
    to_child: float | None = None
    child_cpu: float | None = None  # seconds per request
    host_cpu: float | None = None  # the VM's worker process, seconds per request


QUICK = Settings(repeats=3, seconds=0.25, image=256 * MiB)
FULL = Settings(repeats=7, seconds=1.0, image=256 * MiB)


# --- shared by the child and the parent's Python loop ----------------------------


def page_buffer(size: int) -> mmap.mmap:
    """A page-aligned, pre-faulted buffer (no 4 KiB aliasing against the page cache)."""
    buffer = mmap.mmap(-1, size)
    buffer.write(bytes(size))
    return buffer


def offsets(workload: Workload, image: int, seed: int) -> Iterator[int]:
    """Endless request offsets: random size-aligned ones, or the file in order."""
    slots = image // workload.size
    if not workload.random:
        return itertools.cycle(range(0, slots * workload.size, workload.size))
    rng = random.Random(seed)
    return itertools.cycle([rng.randrange(slots) * workload.size for _ in range(1 << 16)])


def timed(step: Callable[[], int], seconds: float) -> tuple[int, float]:
    """Run `step` (it returns the operations it did) for about `seconds`:
    (operations, elapsed), after a few untimed steps."""
    for _ in range(WARMUP_STEPS):
        step()
    ops, start = 0, perf_counter()
    deadline = start + seconds
    while True:
        ops += step()
        now = perf_counter()
        if now >= deadline:
            return ops, now - start


# --- the child partition -------------------------------------------------------


_GUEST_BUFFERS: dict[tuple[int, int, int], list[GuestBuffer]] = {}


def guest_buffers(disk: BlockDevice, workload: Workload) -> list[GuestBuffer]:
    """The workload's buffers in guest memory (zero copy), made once per
    shape: twice the queue depth, so no two requests in flight share one."""
    key = (id(disk), workload.size, workload.depth)
    count = 1 if workload.depth == 1 else 2 * workload.depth
    if key not in _GUEST_BUFFERS:
        _GUEST_BUFFERS[key] = [disk.buffer(workload.size) for _ in range(count)]
    return _GUEST_BUFFERS[key]


def disk_step(disk: BlockDevice, workload: Workload, image: int, seed: int) -> Callable[[], int]:
    """One call of the BlockDevice API: a request, or PIPELINE * depth with
    `depth` in flight, on buffers from BlockDevice.buffer (the zero-copy path)."""
    where = offsets(workload, image, seed)
    buffers = guest_buffers(disk, workload)
    if workload.depth == 1:
        one = disk.write if workload.write else disk.read_into
        buffer = buffers[0]

        def single() -> int:
            one(next(where), buffer)
            return 1

        return single
    many = disk.write_many if workload.write else disk.read_many

    count = PIPELINE * workload.depth

    def batch() -> int:
        many([(next(where), buffers[i % len(buffers)]) for i in range(count)], depth=workload.depth)
        return count

    return batch


Counters = tuple[int, int, float]  # signals sent, packets sent, CPU seconds
WorkerCounters = tuple[int | None, int, float]  # the same, of the worker (signals if it counts)


def process_cpu_clock(pid: int) -> int:
    """The clock id of another process's CPU time, all its threads
    (clock_getcpuclockid: Linux's MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED))."""
    return (~pid << 3) | 2


def counters(channel: Channel, cpu_seconds: float) -> Counters:
    return channel.signals_sent, channel.packets_sent, cpu_seconds


def per_packet(before: Counters, after: Counters) -> tuple[float, float]:
    """(doorbells, CPU seconds) per packet sent between two readings."""
    packets = max(1, after[1] - before[1])
    return (after[0] - before[0]) / packets, (after[2] - before[2]) / packets


def storage_child(guest: Guest, address: str, image: int, spin: float, multi: str) -> None:
    """Child partition: bind the SCSI and echo devices, then run each
    (workload name, seconds, seed) the parent sends and answer (ops, seconds,
    (doorbells, CPU seconds) per request it sent). Every channel spins `spin`
    seconds before it sleeps. The controller `multi` (an instance id) gets
    its sub-channels."""
    scsi: list[GuestDevice] = []
    echoes: list[EchoVsc] = []
    guest.register(guid.SCSI, scsi.append)
    guest.register(ECHO_CLASS_ID, lambda device: echoes.append(EchoVsc(device)))
    primaries = [d for d in scsi if d.sub_channel_index == 0]
    (single,) = [d for d in primaries if str(d.instance_id) != multi]
    (several,) = [d for d in primaries if str(d.instance_id) == multi]
    controller, spread = (
        StorageController(d, queue_depth=QUEUE_DEPTH, max_io_bytes=MAX_IO, spin_seconds=spin)
        for d in (single, several)
    )
    assert spread.create_sub_channels(SUB_CHANNELS) == SUB_CHANNELS
    disk, direct = controller.disk(0), controller.disk(DIRECT_LUN)
    spread_disk = spread.disk(0)
    echo = echoes[0]
    echo.channel = echo.device.open(ECHO_RING, ECHO_RING, spin_seconds=spin)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(address)
    control = Connection(sock.detach())

    def round_trip() -> int:
        echo.echo(ECHO_PAYLOAD)
        return 1

    with contextlib.suppress(EOFError):
        for name, seconds, seed in iter(control.recv, None):
            if name == ROUND_TRIP:
                step = round_trip
            else:
                workload = BY_NAME[name]
                target = direct if workload.direct else disk
                step = disk_step(
                    spread_disk if workload.channels > 1 else target, workload, image, seed
                )
            if name == ROUND_TRIP:
                channel = echo.channel
            else:
                channel = (spread if BY_NAME[name].channels > 1 else controller).channel
            assert channel is not None
            before = counters(channel, process_time())
            ops, elapsed = timed(step, seconds)
            after = counters(channel, process_time())
            control.send((ops, elapsed, per_packet(before, after)))
    controller.close()
    spread.close()
    guest.unload()


class StackRunner:
    """The parent's end of the child partition: a StorVsp on the image and an
    echo device, and the control socket to the child."""

    def __init__(
        self, host: Host, path: str, settings: Settings, workdir: str, spin: bool = True
    ) -> None:
        """`spin`: poll mode on every side (the child's channels, the worker,
        storvsp's channels); off, everything sleeps until signalled."""
        address = os.path.join(workdir, "control" if spin else "control-no-spin")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(address)
        listener.listen(1)
        listener.settimeout(TIMEOUT)
        self.backend = RawFileBackend(path)
        self.direct = DirectBackend(path)  # the same image, O_DIRECT: LUN 1
        poll_seconds = storvsp.POLL_SECONDS if spin else 0.0
        self.vsp = StorVsp(
            [self.backend, self.direct], max_transfer_bytes=MAX_IO, poll_seconds=poll_seconds
        )
        # The same image behind a second controller, with sub-channels.
        self.multi = StorVsp(
            [self.backend], max_transfer_bytes=MAX_IO, channels=CHANNELS, poll_seconds=poll_seconds
        )
        self.echo = EchoVsp()
        self.child: ChildPartition = host.start(
            CHILD_TARGET,
            devices=[self.vsp, self.echo, self.multi],
            args=(
                address,
                settings.image,
                settings.spin if spin else 0.0,
                str(self.multi.instance_id),
            ),
            memory_size=CHILD_MEMORY,
            policy=CHILD_POLICY,
            spin_seconds=DEFAULT_SPIN_SECONDS if spin else 0.0,
        )
        try:
            sock, _ = listener.accept()
        finally:
            listener.close()
        sock.settimeout(None)
        self.control = Connection(sock.detach())

    def worker_counters(self, name: str) -> WorkerCounters:
        """The VSP side's doorbells and packets toward the child (its
        stats, read from the worker process), and the worker's CPU time:
        its whole process, every thread (I/O pool, channel threads) included."""
        storvsp, echo, multi = self.child.device_stats()
        if name != ROUND_TRIP and BY_NAME[name].channels > 1:
            storvsp = multi
        if name == ROUND_TRIP:
            signals, packets = echo.get("signals_sent"), sum(echo.get("packets", [0]))
        else:
            signals, packets = storvsp["signals_sent"], storvsp["packets_sent"]
        return signals, packets, self.worker_cpu()

    def worker_cpu(self) -> float:
        """ChildPartition.worker_cpu, read from the worker process's CPU
        clock (nanoseconds, every thread) rather than /proc ticks (10 ms)."""
        if isinstance(self.child, ProcessPartition) and self.child.process.returncode is None:
            with contextlib.suppress(OSError):
                return clock_gettime(process_cpu_clock(self.child.worker_pid))
        return self.child.worker_cpu()

    def run(self, name: str, seconds: float, seed: int) -> Sample:
        """Operations per second as the child timed them; the doorbells and
        CPU time per request of the child and of the VSP's worker."""
        before = self.worker_counters(name)
        self.control.send((name, seconds, seed))
        if not self.control.poll(TIMEOUT + seconds):
            raise TimeoutError(f"child partition {self.child.pid} sent no result")
        ops, elapsed, (to_host, child_cpu) = self.control.recv()
        after = self.worker_counters(name)
        packets = max(1, after[1] - before[1])
        to_child = (
            None if after[0] is None or before[0] is None else (after[0] - before[0]) / packets
        )
        host_cpu = (after[2] - before[2]) / packets
        return Sample(ops / elapsed, to_host, to_child, child_cpu, host_cpu)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.control.send(None)
        self.control.close()
        if self.child.wait(10) is None:
            self.child.stop()
        self.backend.close()
        self.direct.close()


# --- the baselines in the parent -------------------------------------------------


def python_loop(path: str, workload: Workload, image: int, seconds: float, seed: int) -> Sample:
    """os.preadv / os.pwritev, one request at a time, into a page-aligned buffer."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        where = offsets(workload, image, seed)
        buffers = [page_buffer(workload.size)]
        call = os.pwritev if workload.write else os.preadv
        batch = 64 if workload.size <= 64 * KiB else 1  # keep the clock out of the loop

        def step() -> int:
            for _ in range(batch):
                call(fd, buffers, next(where))
            return batch

        ops, elapsed = timed(step, seconds)
        return Sample(ops / elapsed)
    finally:
        os.close(fd)


def fio(path: str, workload: Workload, image: int, seconds: float, engine: str) -> Sample:
    """fio's IOPS on the image, page cache kept (--invalidate=0), or with
    O_DIRECT (--direct=1) for a direct workload."""
    command = [
        "fio",
        "--name=storage-bench",
        f"--filename={path}",
        f"--size={image}",
        f"--ioengine={engine}",
        f"--direct={int(workload.direct)}",
        "--invalidate=0",
        f"--rw={workload.fio_rw}",
        f"--bs={workload.size}",
        f"--iodepth={workload.depth}",
        "--numjobs=1",
        "--iomem_align=4096",  # page-aligned buffers, as the stack's
        "--time_based",
        f"--runtime={max(1, round(seconds * 1000))}ms",
        "--output-format=json",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT + seconds)
    if done.returncode != 0:
        return Sample(None)
    job = json.loads(done.stdout)["jobs"][0]
    return Sample(float(job["write" if workload.write else "read"]["iops"]))


# --- the image -------------------------------------------------------------------


def make_image(path: str, size: int) -> None:
    """Fill the image with data (no holes), then read it once: a warm page cache."""
    chunk = random.Random(1).randbytes(MiB)
    with open(path, "wb") as out:
        for _ in range(size // MiB):
            out.write(chunk)
    fd = os.open(path, os.O_RDONLY)
    try:
        buffer = page_buffer(MiB)
        for offset in range(0, size, MiB):
            os.preadv(fd, [buffer], offset)
    finally:
        os.close(fd)


# --- the runner ------------------------------------------------------------------

Key = tuple[str, str]  # (workload, method)
Results = dict[Key, list[Sample]]  # by round
Job = Callable[[int], Sample]  # run(seed)


def jobs(
    settings: Settings, stack: StackRunner, quiet: StackRunner, path: str, have_fio: bool
) -> list[tuple[Key, Job]]:
    """Every measurement of one round. fio runs psync at QD1 and io_uring at
    QD32; the Python loop one request at a time."""
    s, image = settings.seconds, settings.image

    def on_stack(name: str) -> Job:
        return lambda seed: stack.run(name, s, seed)

    def loop(w: Workload) -> Job:
        return lambda seed: python_loop(path, w, image, s, seed)

    def with_fio(w: Workload, engine: str) -> Job:
        return lambda seed: fio(path, w, image, s, engine)

    def interrupt_driven(name: str) -> Job:
        return lambda seed: quiet.run(name, s, seed)

    found = [((ROUND_TRIP, ECHO), on_stack(ROUND_TRIP))]
    for name in INTERRUPT_ROWS:
        found.append(
            ((name + NO_SPIN, ECHO if name == ROUND_TRIP else STACK), interrupt_driven(name))
        )
    for w in ALL_WORKLOADS:
        found.append(((w.name, STACK), on_stack(w.name)))
        if w.channels > 1:
            continue  # compared with the one-channel rows' baselines
        if w.depth == 1 and not w.direct:
            found.append(((w.name, PYTHON), loop(w)))
        if have_fio and w.depth == 1:
            found.append(((w.name, FIO), with_fio(w, "psync")))
        if have_fio and w.depth == QUEUE_DEPTH:
            found.append(((w.name, URING), with_fio(w, "io_uring")))
    return found


def measure(settings: Settings, workdir: str) -> tuple[Results, bool]:
    """The image, the child partition, then the interleaved rounds."""
    path = os.path.join(workdir, "disk.img")
    make_image(path, settings.image)
    have_fio = shutil.which("fio") is not None
    with Host() as host:
        stack = StackRunner(host, path, settings, workdir)
        quiet = StackRunner(host, path, settings, workdir, spin=False)
        try:
            round_jobs = jobs(settings, stack, quiet, path, have_fio)
            results: Results = {key: [] for key, _ in round_jobs}
            for index in range(settings.repeats):
                order = round_jobs if index % 2 == 0 else list(reversed(round_jobs))
                for key, run in order:
                    results[key].append(run(index))
        finally:
            stack.close()
            quiet.close()
    return results, have_fio


# --- the table -------------------------------------------------------------------


def baseline(workload: str, method: str) -> Key:
    """What a row is compared with: the same operation, one request at a time."""
    return re.sub(r"QD\d+", "QD1", re.sub(r", \d+ channels$", "", workload)), method


def ratio(results: Results, key: Key, base: Key, inverse: bool = False) -> float | None:
    """Median over rounds of rate / the baseline's rate in the same round
    (the baseline's over ours with `inverse`: a ratio of times)."""
    pairs = [
        (a.rate, b.rate)
        for a, b in zip(results.get(key, []), results.get(base, []), strict=False)
        if a.rate and b.rate
    ]
    if not pairs:
        return None
    return statistics.median(b / a if inverse else a / b for a, b in pairs)


def fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def median_of(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


HEADERS = [
    "workload",
    "method",
    "K IOPS",
    "MB/s",
    "min–max K IOPS",
    "µs/op",
    "× fio psync",
    "× Python loop",
    "doorbells/req →host, →child",
    "CPU µs/req child, VSP",
]


def table(results: Results) -> list[list[str]]:
    rows = []
    for (name, method), samples in results.items():
        known = [s.rate for s in samples if s.rate]
        if not known:
            rows.append([name, method, "failed", *[""] * (len(HEADERS) - 3)])
            continue
        rate = statistics.median(known)
        plain = name.removesuffix(NO_SPIN)
        size = BY_NAME[plain].size if plain in BY_NAME else len(ECHO_PAYLOAD)
        compare = name in BY_NAME and method != PYTHON
        to_host = median_of([s.to_host for s in samples])
        to_child = median_of([s.to_child for s in samples])
        child_cpu = median_of([s.child_cpu for s in samples])
        host_cpu = median_of([s.host_cpu for s in samples])
        rows.append(
            [
                name,
                method,
                fmt(rate / 1e3, 2),
                fmt(rate * size / 1e6, 0),
                f"{min(known) / 1e3:,.2f}–{max(known) / 1e3:,.2f}",
                fmt(1e6 / rate),
                fmt(ratio(results, (name, method), baseline(name, FIO)), 3) if compare else "",
                fmt(ratio(results, (name, method), baseline(name, PYTHON)), 3) if compare else "",
                "" if to_host is None else f"{to_host:.2f}, {fmt(to_child, 2)}",
                ""
                if child_cpu is None
                else f"{child_cpu * 1e6:.1f}, {fmt(host_cpu and host_cpu * 1e6)}",
            ]
        )
    return rows


@dataclass(frozen=True)
class Target:
    what: str
    key: Key
    base: Key
    threshold: float
    at_most: bool = False  # a ratio of times that must stay below the threshold

    def check(self, results: Results) -> tuple[float | None, bool]:
        value = ratio(results, self.key, self.base, inverse=self.at_most)
        if value is None:
            return None, False
        return value, value <= self.threshold if self.at_most else value >= self.threshold


SEQ_READ, RANDOM_READ = "1 MiB sequential read, QD", "4 KiB random read, QD"
TARGETS = [
    Target(
        "1 MiB sequential read (QD1) ≥ 60% of fio's bandwidth",
        (SEQ_READ + "1", STACK),
        (SEQ_READ + "1", FIO),
        0.60,
    ),
    Target(
        "  the same with 4 requests in flight (QD4)",
        (SEQ_READ + "4", STACK),
        (SEQ_READ + "1", FIO),
        0.60,
    ),
    Target(
        f"4 KiB random read at QD{QUEUE_DEPTH} ≥ 30% of fio's IOPS (psync, one job)",
        (f"{RANDOM_READ}{QUEUE_DEPTH}", STACK),
        (RANDOM_READ + "1", FIO),
        0.30,
    ),
    Target(
        "QD1 4 KiB read latency ≤ 3 × the bus round trip",
        (RANDOM_READ + "1", STACK),
        (ROUND_TRIP, ECHO),
        3.0,
        at_most=True,
    ),
]


def target_lines(results: Results) -> list[str]:
    lines = []
    for target in TARGETS:
        value, met = target.check(results)
        verdict = "not measured" if value is None else ("met" if met else "MISSED")
        shown = "—" if value is None else f"{value:.3f}"
        lines.append(f"- {target.what}: ratio {shown} — **{verdict}**")
    lines.append("O_DIRECT, the stack against fio --direct=1 at the same queue depth:")
    for w in DIRECT_WORKLOADS:
        engine = URING if w.depth == QUEUE_DEPTH else FIO
        value = ratio(results, (w.name, STACK), (w.name, engine))
        lines.append(f"- {w.name}: {fmt(value, 3)}× {engine} --direct=1")
    lines.append("CPU µs per 4 KiB read, child and worker (target ≤ 5 each):")
    for name in (RANDOM_READ + "1", RANDOM_READ + "1" + NO_SPIN, f"{RANDOM_READ}{QUEUE_DEPTH}"):
        samples = results.get((name, STACK), [])
        child = median_of([x.child_cpu for x in samples])
        worker = median_of([x.host_cpu for x in samples])
        cpu = [fmt(v and v * 1e6) for v in (child, worker)]
        met = child is not None and worker is not None and max(child, worker) <= 5e-6
        lines.append(f"- {name}: {cpu[0]}, {cpu[1]} — **{'met' if met else 'MISSED'}**")
    lines.append(
        f"Sub-channels ({SUB_CHANNELS}, each on a thread of its own), against the one-channel row:"
    )
    for w in MULTI_WORKLOADS:
        single = re.sub(r", \d+ channels$", "", w.name)
        value = ratio(results, (w.name, STACK), (single, STACK))
        versus_fio = ratio(results, (w.name, STACK), baseline(w.name, FIO))
        lines.append(f"- {w.name}: {fmt(value, 3)}× one channel, {fmt(versus_fio, 3)}× fio psync")
    return lines


def render(rows: list[list[str]], markdown: bool) -> str:
    return render_table(HEADERS, rows, markdown)


def fast_path_state() -> str:
    """Whether storvsp serves the steady state compiled (VMBUS_STORAGE_FAST=0: off, for A/B)."""
    try:  # as vsp.storage.device imports it
        importlib.import_module("vsp.storage._fast")
    except ImportError:
        return "not built"
    return "on" if storvsp.fast_path_default() else "off (VMBUS_STORAGE_FAST=0)"


def report(settings: Settings, command: str, workdir: str | None) -> tuple[str, str]:
    """Measure; the result as plain text and as Markdown."""
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="storage-bench-", dir=workdir) as tmp:
        results, have_fio = measure(settings, tmp)
    rows = table(results)
    header = (
        f"`{command}`: {os.cpu_count()} CPUs, Linux {platform.release()}, Python "
        f"{platform.python_version()}, load average {load:.1f} → {os.getloadavg()[0]:.1f}; "
        f"a {settings.image // MiB} MiB image, page cache warm; {settings.repeats} interleaved "
        f"rounds of {settings.seconds:g} s per measurement; the child spins "
        f"{settings.spin * 1e6:g} µs before it sleeps; medians, ratios within each round. "
        "Rows at QD>1 keep that many requests in flight (each refilled as one completes, "
        f"{PIPELINE}× the depth a call) and are compared with the QD1 baselines. "
        "Doorbells: signals per packet "
        "(the peer had gone to sleep); CPU: the child process's, and the VM's worker process's "
        "(every thread: its main loop, channel threads, I/O pools). "
        f"storvsp's compiled path: {fast_path_state()}. O_DIRECT rows: LUN {DIRECT_LUN}, a "
        "DirectBackend on the same image (requests overlapped in storvsp's I/O pool), "
        "against fio --direct=1."
    )
    notes = [] if have_fio else ["fio is not installed: its rows and ratios are skipped."]
    lines = ["Targets (ratios from this run):", *target_lines(results), *notes]
    text, markdown = (
        "\n\n".join([header, render(rows, md), "\n".join(lines)]) for md in (False, True)
    )
    return text, markdown


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short measurements (< 30 s)")
    parser.add_argument("--repeats", type=int, help="rounds (default 3 quick, 7 full)")
    parser.add_argument("--seconds", type=float, help="seconds per measurement")
    parser.add_argument(
        "--spin", type=float, default=DEFAULT_SPIN_SECONDS, help="the child's poll budget, s"
    )
    parser.add_argument("--dir", help="where the temporary image goes (default: $TMPDIR)")
    parser.add_argument("--markdown", metavar="FILE", help="also write the result as Markdown")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    settings = Settings(
        args.repeats or settings.repeats,
        args.seconds or settings.seconds,
        settings.image,
        args.spin,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanups on SIGTERM
    words = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python -m benchmarks.storage_bench", *words])
    text, markdown = report(settings, command, args.dir)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as out:
            out.write(markdown + "\n")


if __name__ == "__main__":
    main()
