"""Network benchmarks: a child partition's NetAdapter sending IPv4/UDP frames
through the parent's netvsp into a TAP device in a network namespace, and to
another child through the in-memory LearningSwitch, against a raw Python loop
writing the same frames to the same TAP device, in one interleaved run.

    python -m benchmarks.net_bench [--quick] [--repeats N] [--seconds S]
        [--sizes 64,1500] [--paths tap,switch,raw,backend] [--spin S] [--markdown FILE]

Child → TAP: the child sends as fast as it can, waits for the completions of
everything it sent (each completion means netvsp handed the frame to the TAP
device, which the kernel processed before the write returned), and times
that; the TAP's `frames_out`/`drops` say how many the kernel accepted.
Child → child: one child sends, the other counts what arrives (first to last
frame); what the sender sent and the receiver never got are the drops. The
raw loop is `os.write` on the TAP's descriptor, 256 frames per clock check.
Every measurement runs in every round, the order reversed in odd rounds;
medians, and ratios within a round (see /work/shared/BENCHMARKING.md).

The TAP device lives in a namespace created for the run (test addresses in
10.202.0.0/24; the frames go to a UDP port nothing listens on) and is removed
on any exit, SIGTERM included; without root the TAP paths are skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from time import perf_counter, process_time
from typing import NamedTuple

from benchmarks.harness import CHILD_POLICY, on_sigterm, render_table
from vmbus import guid
from vmbus.channel import ChannelTimeout
from vmbus.guest import Guest, GuestDevice
from vmbus.partition import ChildPartition, Host
from vmbus.testing import ethernet as eth
from vsc.net import NetAdapter
from vsp.net import LearningSwitch, NetVsp, TapBackend

CHILD_TARGET = "benchmarks.net_bench:net_child"  # importable even as __main__
TIMEOUT = 60.0
WARMUP_BATCHES = 4
BATCH = 64  # frames per send_batch / clock check in the child
RAW_BATCH = 256  # frames per clock check in the raw loop
IDLE = 0.3  # the receiver stops counting after this long without a frame
NS_IP, TAP_NIC_IP = "10.202.0.1", "10.202.0.2"
NS2_IP, TAP_NIC2_IP = "10.202.2.1", "10.202.2.2"
A_IP, B_IP = "10.202.1.1", "10.202.1.2"
SINK_PORT = 40999  # nothing listens on it in the fresh namespace
TAP_NIC = bytes.fromhex("020000ca0001")
TAP_NIC2 = bytes.fromhex("020000ca0002")  # the same TAP, over two channels (vRSS)
MAC_A, MAC_B = bytes.fromhex("020000ca0a01"), bytes.fromhex("020000ca0b02")
TAP, TAP2, SWITCH, RAW, BACKEND = "tap", "tap2", "switch", "raw", "backend"
LABELS = {
    TAP: "child → TAP (NetVsp)",
    TAP2: "child → TAP, 2 channels (vRSS)",
    SWITCH: "child → child (switch)",
    RAW: "raw os.write → TAP",
    BACKEND: "TapBackend.send → TAP",
}


@dataclass(frozen=True)
class Settings:
    repeats: int
    seconds: float  # per measurement
    sizes: tuple[int, ...]
    paths: tuple[str, ...]
    spin: float | None = None  # the children's poll budget before they sleep (None: default)


QUICK = Settings(3, 0.5, (64, 1500), (TAP, TAP2, SWITCH, RAW, BACKEND))
FULL = Settings(7, 1.0, (64, 1500), (TAP, TAP2, SWITCH, RAW, BACKEND))


@dataclass(frozen=True)
class Sample:
    """Frames per second (None: failed); the fraction of frames lost; CPU
    seconds per frame of the sending child, its VSP worker thread, and for the
    switch the receiver's worker thread and child."""

    rate: float | None
    drops: float | None = None
    cpu: tuple[float, ...] = ()
    doorbells: tuple[float, ...] = ()  # signals per frame: child → VSP, VSP → child, each side


def udp_frame(dst_mac: bytes, src_mac: bytes, src_ip: str, dst_ip: str, size: int) -> bytes:
    """An Ethernet/IPv4/UDP frame of exactly `size` bytes (no FCS)."""
    data = bytes(range(256)) * 8
    datagram = eth.udp(src_ip, dst_ip, 40000, SINK_PORT, data[: size - 42])
    frame = eth.ethernet(dst_mac, src_mac, eth.ETH_IPV4, eth.ipv4(src_ip, dst_ip, 17, datagram))
    if len(frame) != size:
        raise ValueError(f"no {size}-byte IPv4/UDP frame (got {len(frame)})")
    return frame


# --- the child partition -------------------------------------------------------------


class Run(NamedTuple):
    """What a child measured: frames in the timed part and its seconds, the
    frames sent or received in all, CPU seconds of the timed part, and the
    doorbells the child rang (signals to its VSP) per frame."""

    frames: int
    seconds: float
    total: int
    cpu: float
    doorbells: float


def settle(nic: NetAdapter) -> None:
    """Wait for the completion of every frame sent: the VSP has handed it on."""
    while nic.sending:
        nic._pump(TIMEOUT)  # the adapter's own wait for completions


def send_for(nic: NetAdapter, frame: bytes, seconds: float) -> Run:
    """Send `frame` as fast as possible for ~`seconds`, after a warm-up."""
    batch = [frame] * BATCH
    for _ in range(WARMUP_BATCHES):
        nic.send_batch(batch)
    settle(nic)
    rung, count, cpu, start = nic.channel.signals_sent, 0, process_time(), perf_counter()
    deadline = start + seconds
    while perf_counter() < deadline:
        nic.send_batch(batch)
        count += BATCH
    settle(nic)
    elapsed, cpu = perf_counter() - start, process_time() - cpu
    nic.frames.clear()  # the kernel's ARP requests and ICMP errors
    rung = nic.channel.signals_sent - rung
    return Run(count, elapsed, count + WARMUP_BATCHES * BATCH, cpu, rung / count)


def count_frames(nic: NetAdapter, idle: float) -> Run:
    """Count frames from the first until none came for `idle` seconds; the
    timed part runs from the first frame to the last."""
    nic.receive(TIMEOUT)
    rung, count, cpu, start = nic.channel.signals_sent, 0, process_time(), perf_counter()
    last = start
    while True:
        try:
            nic.receive(idle)
        except ChannelTimeout:
            break
        count += 1
        last = perf_counter()
    rung = nic.channel.signals_sent - rung
    return Run(count, last - start, count + 1, process_time() - cpu, rung / max(1, count))


def net_child(guest: Guest, address: str, spin: float | None) -> None:
    """Child partition: bind every network adapter (spinning `spin` seconds
    before it sleeps, if given), then run the parent's commands ("send", mac,
    frame, seconds) and ("count", mac, idle) on the adapter with that MAC,
    answering with their results."""
    devices: list[GuestDevice] = []
    guest.register(guid.NETWORK, devices.append)
    nics = {nic.mac: nic for nic in map(NetAdapter, list(devices))}
    for nic in nics.values():
        nic.channel.spin_seconds = nic.channel.spin_seconds if spin is None else spin
        nic.open_sub_channels(1)  # where the VSP offers vRSS (TAP_NIC2)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(address)
    control = Connection(sock.detach())
    try:
        for kind, mac, *args in iter(control.recv, None):
            run = send_for if kind == "send" else count_frames
            control.send(tuple(run(nics[mac], *args)))
    except (EOFError, ConnectionError):
        return  # the parent went away: so does the bus
    for nic in nics.values():
        nic.close()
    guest.unload()


class ChildRunner:
    """The parent's end of one child partition: its control socket, its
    NetVsps by MAC, and the CPU clock of its worker thread (which runs them)."""

    def __init__(
        self, host: Host, vsps: Sequence[NetVsp], address: str, spin: float | None
    ) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(address)
        listener.listen(1)
        listener.settimeout(TIMEOUT)
        self.index = {vsp.mac: index for index, vsp in enumerate(vsps)}
        self.child: ChildPartition = host.start(
            CHILD_TARGET, devices=vsps, args=(address, spin), policy=CHILD_POLICY
        )
        try:
            sock, _ = listener.accept()
        finally:
            listener.close()
        sock.settimeout(None)
        self.control = Connection(sock.detach())

    def post(self, *command: object) -> None:
        self.control.send(command)

    def result(self, seconds: float) -> Run:
        if not self.control.poll(TIMEOUT + seconds):
            raise TimeoutError(f"child partition {self.child.pid} sent no result")
        return Run(*self.control.recv())

    def counters(self, mac: bytes) -> Counters:
        """The worker's CPU seconds, and the doorbells the VSP of `mac` rang
        and its backend's frames out and drops (its `stats`, from the worker)."""
        stats = self.child.device_stats()[self.index[mac]]
        return Counters(
            self.child.worker_cpu(),
            stats["signals_to_guest"],
            stats["backend_frames_out"],
            stats["backend_drops"],
        )

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.control.send(None)
        self.control.close()
        if self.child.wait(10) is None:
            self.child.stop()


# --- the measurements ------------------------------------------------------------------


class Counters(NamedTuple):
    cpu: float  # the worker's CPU seconds
    signals: int  # doorbells the VSP rang
    frames_out: int  # its backend's
    drops: int


def per_frame(before: Counters, after: Counters, frames: int) -> list[float]:
    return [
        (after.cpu - before.cpu) / max(1, frames),
        (after.signals - before.signals) / max(1, frames),
    ]


def via_tap(a: ChildRunner, mac: bytes, frame: bytes, seconds: float) -> Sample:
    """Child → netvsp → TAP: frames the TAP accepted per second."""
    vsp = a.counters(mac)
    a.post("send", mac, frame, seconds)
    run = a.result(seconds)
    after = a.counters(mac)
    out, dropped = after.frames_out - vsp.frames_out, after.drops - vsp.drops
    if out + dropped != run.total:
        raise RuntimeError(f"the TAP saw {out + dropped} frames, the child sent {run.total}")
    vsp_cpu, vsp_rung = per_frame(vsp, after, run.total)
    rate = run.frames / run.seconds * out / run.total
    return Sample(
        rate, dropped / run.total, (run.cpu / run.frames, vsp_cpu), (run.doorbells, vsp_rung)
    )


def via_switch(a: ChildRunner, b: ChildRunner, frame: bytes, seconds: float) -> Sample:
    """Child A → its netvsp → switch → B's netvsp → child B: frames B got per second."""
    vsp_a, vsp_b = a.counters(MAC_A), b.counters(MAC_B)
    b.post("count", MAC_B, IDLE)
    a.post("send", MAC_A, frame, seconds)
    sent = a.result(seconds)
    got = b.result(seconds + IDLE)
    a_cpu, a_rung = per_frame(vsp_a, a.counters(MAC_A), sent.total)
    b_cpu, b_rung = per_frame(vsp_b, b.counters(MAC_B), got.total)
    return Sample(
        got.frames / got.seconds if got.seconds > 0 else None,
        (sent.total - got.total) / sent.total,
        (sent.cpu / sent.frames, a_cpu, b_cpu, got.cpu / max(1, got.frames)),
        (sent.doorbells, a_rung, b_rung, got.doorbells),
    )


def raw_loop(fd: int, frame: bytes, seconds: float) -> Sample:
    """os.write of the same frame to the TAP descriptor, as fast as possible."""
    write, batch = os.write, range(RAW_BATCH)
    sent = failed = 0
    for _ in batch:
        write(fd, frame)
    start = perf_counter()
    deadline = start + seconds
    while perf_counter() < deadline:
        for _ in batch:
            try:
                write(fd, frame)
            except OSError:
                failed += 1
        sent += RAW_BATCH
    elapsed = perf_counter() - start
    return Sample((sent - failed) / elapsed, failed / sent, ())


def backend_loop(tap: TapBackend, frame: bytes, seconds: float) -> Sample:
    """TapBackend.send of 64-frame batches: the backend netvsp calls, alone."""
    batch = [frame] * BATCH
    out, dropped = tap.frames_out, tap.drops
    count, start = 0, perf_counter()
    deadline = start + seconds
    while perf_counter() < deadline:
        tap.send(batch)
        count += BATCH
    elapsed = perf_counter() - start
    return Sample((tap.frames_out - out) / elapsed, (tap.drops - dropped) / count, ())


# --- the setup and the rounds ----------------------------------------------------------------

Key = tuple[int, str]  # (frame size, path)
Results = dict[Key, list[Sample]]


def interface_mac(netns: str, name: str) -> bytes:
    shown = subprocess.run(
        ["ip", "-n", netns, "-j", "link", "show", "dev", name],
        capture_output=True,
        text=True,
        check=True,
    )
    return bytes.fromhex(json.loads(shown.stdout)[0]["address"].replace(":", ""))


def tap_usable() -> str | None:
    """Why the TAP paths cannot run, or None."""
    if os.geteuid() != 0:
        return "not root: the TAP paths (child → TAP, raw loop, TapBackend) are skipped"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun: the TAP paths are skipped"
    return None


def measure(settings: Settings, workdir: str, with_tap: bool) -> Results:
    """Create the namespace and TAP, the switch and two children, run the
    rounds; on the way out (an exception, SIGTERM) the children stop, then
    the TAP device and its namespace go."""
    paths = [p for p in settings.paths if with_tap or p == SWITCH]
    switch = LearningSwitch()
    with contextlib.ExitStack() as stack:
        tap = tap2 = None
        if with_tap and {TAP, TAP2, RAW, BACKEND} & set(paths):
            name, ns = f"nb{os.getpid()}", f"netbench-{os.getpid()}"
            tap = stack.enter_context(
                TapBackend(name, netns=ns, create_netns=True, address=f"{NS_IP}/24")
            )
            # A second TAP device for the vRSS NIC (a descriptor is watched once).
            tap2 = stack.enter_context(TapBackend(f"{name}v", netns=ns, address=f"{NS2_IP}/24"))
        port_a = stack.enter_context(switch.port(MAC_A))
        port_b = stack.enter_context(switch.port(MAC_B))
        host = stack.enter_context(Host())
        a_nics = [NetVsp(port_a, mac=MAC_A)]
        if tap is not None:
            assert tap2 is not None
            a_nics += [NetVsp(tap, mac=TAP_NIC), NetVsp(tap2, mac=TAP_NIC2, channels=2)]
        runners = [ChildRunner(host, a_nics, f"{workdir}/a", settings.spin)]
        stack.callback(runners[0].close)
        if SWITCH in paths:
            runners.append(
                ChildRunner(host, [NetVsp(port_b, mac=MAC_B)], f"{workdir}/b", settings.spin)
            )
            stack.callback(runners[1].close)
        jobs = round_jobs(settings, paths, runners, tap, tap2)
        results: Results = {key: [] for key, _ in jobs}
        for index in range(settings.repeats):
            for key, run in jobs if index % 2 == 0 else reversed(jobs):
                results[key].append(run())
    return results


def round_jobs(
    settings: Settings,
    paths: list[str],
    runners: list[ChildRunner],
    tap: TapBackend | None,
    tap2: TapBackend | None,
) -> list[tuple[Key, Callable[[], Sample]]]:
    """Every measurement of one round, by (frame size, path)."""
    macs = [b"" if t is None else interface_mac(t.netns or "", t.name) for t in (tap, tap2)]
    return [
        ((size, path), job(path, runners, tap, macs, size, settings.seconds))
        for size in settings.sizes
        for path in paths
    ]


def job(
    path: str,
    runners: list[ChildRunner],
    tap: TapBackend | None,
    ns_macs: list[bytes],
    size: int,
    seconds: float,
) -> Callable[[], Sample]:
    if path == SWITCH:
        frame = udp_frame(MAC_B, MAC_A, A_IP, B_IP, size)
        return functools.partial(via_switch, runners[0], runners[1], frame, seconds)
    assert tap is not None
    if path == TAP2:
        frame = udp_frame(ns_macs[1], TAP_NIC2, TAP_NIC2_IP, NS2_IP, size)
        return functools.partial(via_tap, runners[0], TAP_NIC2, frame, seconds)
    frame = udp_frame(ns_macs[0], TAP_NIC, TAP_NIC_IP, NS_IP, size)
    if path == TAP:
        return functools.partial(via_tap, runners[0], TAP_NIC, frame, seconds)
    if path == RAW:
        return functools.partial(raw_loop, tap.fileno(), frame, seconds)
    return functools.partial(backend_loop, tap, frame, seconds)


# --- the table -------------------------------------------------------------------------------


def ratio(results: Results, key: Key, base: Key) -> float | None:
    """Median over rounds of the rate / the baseline's rate in the same round."""
    pairs = zip(results.get(key, []), results.get(base, []), strict=False)
    known = [a.rate / b.rate for a, b in pairs if a.rate and b.rate]
    return statistics.median(known) if known else None


def medians(rows: list[tuple[float, ...]], scale: float, digits: int) -> str:
    """Column medians of equally long tuples, comma-separated ("" if none)."""
    rows = [row for row in rows if row]
    if not rows:
        return ""
    return ", ".join(f"{statistics.median(c) * scale:.{digits}f}" for c in zip(*rows, strict=True))


HEADERS = [
    "frame",
    "path",
    "K frames/s",
    "Mbit/s",
    "min–max K frames/s",
    "× raw TAP loop",
    "drops",
    "CPU µs/frame: child, VSP[, VSP, child]",
    "doorbells/frame: →VSP, →child[, →child, →VSP]",
]


def table(results: Results) -> list[list[str]]:
    rows = []
    for (size, path), samples in results.items():
        known = [s.rate for s in samples if s.rate]
        if not known:
            rows.append([f"{size} B", LABELS[path], "failed", *[""] * (len(HEADERS) - 3)])
            continue
        rate = statistics.median(known)
        drops = statistics.median([s.drops or 0.0 for s in samples])
        versus = ratio(results, (size, path), (size, RAW)) if path != RAW else None
        rows.append(
            [
                f"{size} B",
                LABELS[path],
                f"{rate / 1e3:,.1f}",
                f"{rate * size * 8 / 1e6:,.0f}",
                f"{min(known) / 1e3:,.1f}–{max(known) / 1e3:,.1f}",
                "" if versus is None else f"{versus:.3f}",
                f"{drops:.2%}",
                medians([s.cpu for s in samples], 1e6, 1),
                medians([s.doorbells for s in samples], 1, 2),
            ]
        )
    return rows


TARGET = 0.70  # the issue: child → TAP at 1500 B reaches 70% of the raw TAP frame rate


def verdict(results: Results) -> str:
    value = ratio(results, (1500, TAP), (1500, RAW))
    if value is None:
        return f"- child → TAP at 1500 B ≥ {TARGET:.0%} of the raw TAP loop: **not measured**"
    met = "met" if value >= TARGET else "MISSED"
    return (
        f"- child → TAP at 1500 B ≥ {TARGET:.0%} of the raw TAP loop's frame rate: "
        f"ratio {value:.3f} — **{met}**"
    )


def render(rows: list[list[str]], markdown: bool) -> str:
    return render_table(HEADERS, rows, markdown)


def report(settings: Settings, command: str) -> tuple[str, str]:
    """Measure; the result as plain text and as Markdown."""
    skipped = tap_usable()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="net-bench-") as workdir:
        results = measure(settings, workdir, with_tap=skipped is None)
    spin = "the default" if settings.spin is None else f"{settings.spin * 1e6:g} µs"
    header = (
        f"`{command}`: {os.cpu_count()} CPUs, Linux {platform.release()}, Python "
        f"{platform.python_version()}, load average {load:.1f} → {os.getloadavg()[0]:.1f}; "
        f"{settings.repeats} interleaved rounds of {settings.seconds:g} s per measurement; "
        "medians, ratios within each round. Frames are Ethernet/IPv4/UDP of the size shown "
        "(no FCS), to a UDP port nothing listens on; Mbit/s counts those bytes. CPU per frame: "
        "the sending child process and its VSP's worker thread (for the switch, then the "
        "receiver's worker thread and child). Doorbells: signals per frame, the sending child "
        "to its VSP and back (for the switch, then the receiver's VSP to its child and back); "
        f"the children spin {spin} before they sleep."
    )
    notes = [verdict(results)] + ([skipped] if skipped else [])
    text, markdown = (
        "\n\n".join([header, render(table(results), md), "\n".join(notes)]) for md in (False, True)
    )
    return text, markdown


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short measurements (< 40 s)")
    parser.add_argument("--repeats", type=int, help="rounds (default 3 quick, 7 full)")
    parser.add_argument("--seconds", type=float, help="seconds per measurement")
    parser.add_argument("--sizes", help="frame sizes, e.g. 64,1500")
    parser.add_argument("--paths", help=f"some of {','.join(LABELS)}")
    parser.add_argument("--spin", type=float, help="the children's poll budget, s")
    parser.add_argument("--markdown", metavar="FILE", help="also write the result as Markdown")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    settings = Settings(
        args.repeats or base.repeats,
        args.seconds or base.seconds,
        tuple(int(v) for v in args.sizes.split(",")) if args.sizes else base.sizes,
        tuple(args.paths.split(",")) if args.paths else base.paths,
        args.spin,
    )
    if unknown := set(settings.paths) - set(LABELS):
        parser.error(f"unknown paths: {', '.join(sorted(unknown))}")
    signal.signal(signal.SIGTERM, on_sigterm(os.getpid()))
    words = sys.argv[1:] if argv is None else list(argv)
    text, markdown = report(settings, " ".join(["python -m benchmarks.net_bench", *words]))
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as out:
            out.write(markdown + "\n")


if __name__ == "__main__":
    main()
