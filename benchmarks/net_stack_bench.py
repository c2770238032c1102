"""TCP through a child's Linux network stack: iperf3 in both directions
between a child's own network namespace (its NetAdapter handed to the
kernel as a TAP device, vsc.net.stack) and a host-side TAP device behind
its netvsp, against the same iperf3 over a veth pair and over a plain
Python TAP-to-TAP forwarder, in one run.

    python -m benchmarks.net_stack_bench [--quick] [--seconds S] [--repeats N] [--markdown FILE]

Each path joins two network namespaces made for the run (10.213.0.0/16);
iperf3's server runs in one, its client in the other, for `seconds` per
direction ("→" client to server, "←" with -R). Rounds interleave the
paths, the order reversed in odd rounds; medians, and ratios to veth within
each round. Needs root (namespaces, TAP devices) and iperf3 (Debian's
package): without them the rows are skipped with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import io
import json
import os
import platform
import pstats
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import on_sigterm, render_table
from vmbus import guid, sandbox
from vmbus.guest import Guest, GuestDevice
from vmbus.partition import Host, wait_until
from vsc.net import NetAdapter
from vsp.net import NetVsp, TapBackend

CHILD_TARGET = "benchmarks.net_stack_bench:stack_child"  # importable even as __main__
VETH, FORWARDER, STACK = "veth", "forwarder", "stack"
LABELS = {
    VETH: "veth pair (kernel)",
    FORWARDER: "Python TAP-to-TAP forwarder",
    STACK: "child's Linux stack over netvsc/netvsp",
}
DIRECTIONS: tuple[tuple[str, list[str]], ...] = (("→", []), ("←", ["-R"]))  # iperf3 extra args
HEADERS = ["path", "direction", "Mbit/s", "× veth"]
TARGET = 0.25  # the stack against veth (issue 13)
MAC = bytes.fromhex("02000000ad01")


def run(argv: Sequence[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)


def iperf(client: Sequence[str], server_ip: str, seconds: float, extra: list[str]) -> float:
    """One iperf3 client run (argv prefix `client` puts it in its namespace): Mbit/s received."""
    argv = [*client, "iperf3", "-c", server_ip, "-t", f"{seconds:g}", "-J", *extra]
    result = run(argv, timeout=seconds + 60)
    try:
        return float(json.loads(result.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e6
    except (ValueError, KeyError, TypeError):
        raise RuntimeError(f"iperf3 failed: {result.stdout[-400:]}{result.stderr[-400:]}") from None


@contextlib.contextmanager
def iperf_server(netns: str, address: str) -> Iterator[None]:
    server = subprocess.Popen(
        ["ip", "netns", "exec", netns, "iperf3", "-s", "-B", address],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Ready once it listens: a connection attempt that is not refused.
        probe = ["ip", "netns", "exec", netns, "sh", "-c", f"exec 3<>/dev/tcp/{address}/5201"]
        wait_until(lambda: run(["bash", "-c", " ".join(probe)]).returncode == 0, 10)
        yield
    finally:
        server.kill()
        server.wait()


@contextlib.contextmanager
def namespaces(*names: str) -> Iterator[None]:
    try:
        for name in names:
            run(["ip", "netns", "add", name])
        yield
    finally:
        for name in names:
            run(["ip", "netns", "del", name])


def in_ns(name: str) -> list[str]:
    return ["ip", "netns", "exec", name]


# --- the three paths: each yields (client argv prefix, server namespace, server ip) ---


@contextlib.contextmanager
def veth_path(tag: str) -> Iterator[Callable[[float, list[str]], float]]:
    a, b = f"nsb-va-{tag}", f"nsb-vb-{tag}"
    with namespaces(a, b):
        run(["ip", "link", "add", f"va{tag}", "netns", a, "type", "veth", "peer", f"vb{tag}",
             "netns", b])  # fmt: skip
        for ns, dev, ip in ((a, f"va{tag}", "10.213.1.1"), (b, f"vb{tag}", "10.213.1.2")):
            run([*in_ns(ns), "ip", "addr", "add", f"{ip}/24", "dev", dev])
            run([*in_ns(ns), "ip", "link", "set", dev, "up"])
            run([*in_ns(ns), "ip", "link", "set", "lo", "up"])
        with iperf_server(b, "10.213.1.2"):
            yield lambda seconds, extra: iperf(in_ns(a), "10.213.1.2", seconds, extra)


def forward(left: TapBackend, right: TapBackend, stop: int) -> None:
    """The plain forwarder: frames from each TAP written to the other."""
    fds = {left.fileno(): right, right.fileno(): left}
    sources = {left.fileno(): left, right.fileno(): right}
    while True:
        ready = select.select([*fds, stop], [], [])[0]
        if stop in ready:
            return
        for fd in ready:
            frames = sources[fd].receive(64)
            while frames:
                fds[fd].send(frames)
                frames = sources[fd].receive(64)


@contextlib.contextmanager
def forwarder_path(tag: str) -> Iterator[Callable[[float, list[str]], float]]:
    a, b = f"nsb-fa-{tag}", f"nsb-fb-{tag}"
    left = TapBackend(netns=a, address="10.213.2.1/24", create_netns=True)
    right = TapBackend(netns=b, address="10.213.2.2/24", create_netns=True)
    stop_r, stop_w = os.pipe()
    thread = threading.Thread(target=forward, args=(left, right, stop_r), daemon=True)
    thread.start()
    try:
        with iperf_server(b, "10.213.2.2"):
            yield lambda seconds, extra: iperf(in_ns(a), "10.213.2.2", seconds, extra)
    finally:
        os.write(stop_w, b"\0")
        thread.join()
        for fd in (stop_r, stop_w):
            os.close(fd)
        left.close()
        right.close()


def adapter(guest: Guest) -> NetAdapter:
    devices: list[GuestDevice] = []
    guest.register(guid.NETWORK, devices.append)
    return NetAdapter(devices[0])


def stack_child(guest: Guest, workdir: str, profile: bool = False) -> None:
    """The child: its stack up, then iperf3 runs as the parent asks (a file
    per request in `workdir`, answered by a file), until asked to stop.
    With `profile`, the bridge thread runs under cProfile, its table in
    workdir/profile.txt."""
    from vsc.net.stack import LinuxStack

    work = Path(workdir)
    profiler = cProfile.Profile()
    stack = LinuxStack(adapter(guest), address="10.213.3.2/24")
    if profile:  # the next thread started is the bridge's: profile what it runs

        def first_call(*_: object) -> None:
            profiler.enable()  # replaces this hook in the bridge thread
            threading.setprofile(None)  # threads started later are not profiled

        threading.setprofile(first_call)

    def asked(request: Path) -> bool:
        return request.exists() or (work / "stop").exists()

    with stack:
        (work / "up").write_text("1")
        for number in range(1_000_000):
            request = work / f"request-{number}"
            if not wait_until(functools.partial(asked, request), 600):
                return
            if not request.exists():
                break
            seconds, extra = json.loads(request.read_text())
            try:
                answer: Any = iperf([], "10.213.3.1", seconds, extra)
            except RuntimeError as error:
                answer = str(error)
            (work / f"answer-{number}.tmp").write_text(json.dumps(answer))
            os.rename(work / f"answer-{number}.tmp", work / f"answer-{number}")
        (work / "stats.json").write_text(json.dumps(stack.stats()))
    if profile:
        table = io.StringIO()
        pstats.Stats(profiler, stream=table).sort_stats("tottime").print_stats(25)
        (work / "profile.txt").write_text(table.getvalue())


@contextlib.contextmanager
def stack_path(
    tag: str, workdir: str, notes: list[str] | None = None, profile: str | None = None
) -> Iterator[Callable[[float, list[str]], float]]:
    host_ns = f"nsb-sh-{tag}"
    # With IFF_VNET_HDR the host offers checksum offload and LSOv2; the child's stack takes them.
    backend = TapBackend(netns=host_ns, address="10.213.3.1/24", create_netns=True, vnet_hdr=True)
    work = Path(workdir) / "stack"
    work.mkdir()
    policy = sandbox.Policy(net_admin=True, writable=(str(work),))
    asked = iter(range(1_000_000))
    try:
        with Host() as host, iperf_server(host_ns, "10.213.3.1"):
            child = host.start(
                CHILD_TARGET,
                devices=[NetVsp(backend, mac=MAC)],
                args=(str(work), profile is not None),
                policy=policy,
            )
            if not wait_until(
                lambda: (work / "up").exists() or child.state not in ("starting", "running"), 60
            ):
                raise RuntimeError("the child's stack did not come up")

            def measure(seconds: float, extra: list[str]) -> float:
                number = next(asked)
                (work / f"request-{number}").write_text(json.dumps([seconds, extra]))
                answer = work / f"answer-{number}"
                if not wait_until(
                    lambda: answer.exists() or child.state not in ("starting", "running"),
                    seconds + 90,
                ):
                    raise RuntimeError("the child did not answer")
                if not answer.exists():
                    raise RuntimeError(f"the child ended: {child.state}")
                result = json.loads(answer.read_text())
                if isinstance(result, str):
                    raise RuntimeError(result)
                return float(result)

            yield measure
            (work / "stop").write_text("1")
            child.wait(timeout=30)
            if profile is not None and (work / "profile.txt").exists():
                Path(profile).write_text((work / "profile.txt").read_text())
            stats = work / "stats.json"
            if notes is not None and stats.exists():
                got = json.loads(stats.read_text())
                notes.append(
                    "the child's stack: {large_sends:,} large sends (LSOv2), {coalesced:,} "
                    "coalesced receives (RSC) among {frames_to_kernel:,} frames to its kernel, "
                    "{drops} drops".format(**got)
                )
    finally:
        backend.close()


# --- the run ---


def unusable() -> str | None:
    if os.geteuid() != 0:
        return "not root: the namespaces and TAP devices need it; all rows skipped"
    if shutil.which("iperf3") is None:
        return "iperf3 is missing (Debian: apt-get install iperf3); all rows skipped"
    if shutil.which("bwrap") is None:
        return "bwrap is missing (apt-get install bubblewrap): no child stack; its rows skipped"
    return None


Figures = dict[tuple[str, str], list[float]]  # (path, direction) -> [Mbit/s, × veth]


def measure(
    seconds: float, repeats: int, workdir: str, profile: str | None = None
) -> tuple[Figures, list[str]]:
    tag = str(os.getpid() % 100000)
    results: dict[tuple[str, str], list[float]] = {}
    ratios: dict[tuple[str, str], list[float]] = {}
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        paths = {
            VETH: stack.enter_context(veth_path(tag)),
            FORWARDER: stack.enter_context(forwarder_path(tag)),
        }
        try:
            paths[STACK] = stack.enter_context(stack_path(tag, workdir, notes, profile))
        except (RuntimeError, OSError) as error:
            notes.append(f"the child's stack could not start: {error}; its rows skipped")
        for round_number in range(repeats):
            order = list(paths) if round_number % 2 == 0 else list(reversed(paths))
            this_round: dict[tuple[str, str], float] = {}
            for name in order:
                for arrow, extra in DIRECTIONS:
                    try:
                        this_round[name, arrow] = paths[name](seconds, extra)
                    except RuntimeError as error:
                        notes.append(f"{name} {arrow}: {error}")
            for (name, arrow), value in this_round.items():
                results.setdefault((name, arrow), []).append(value)
                veth = this_round.get((VETH, arrow))
                if veth:
                    ratios.setdefault((name, arrow), []).append(value / veth)
    return {key: [statistics.median(v), statistics.median(ratios.get(key, [0.0]))]
            for key, v in results.items()}, notes  # fmt: skip


def report(
    seconds: float, repeats: int, command: str, profile: str | None = None
) -> tuple[str, str]:
    load = os.getloadavg()[0]
    reason = unusable()
    rows: list[list[str]] = []
    notes: list[str] = []
    if reason is not None and "bwrap" not in reason:
        notes.append(reason)
    else:
        with tempfile.TemporaryDirectory(prefix="net-stack-bench-") as workdir:
            figures, notes = measure(seconds, repeats, workdir, profile)
        for name in (VETH, FORWARDER, STACK):
            for arrow, _ in DIRECTIONS:
                if (name, arrow) in figures:
                    mbps, ratio = figures[name, arrow]
                    rows.append([LABELS[name], arrow, f"{mbps:,.0f}", f"{ratio:.3f}"])
        stack_ratios = [
            figures[STACK, arrow][1] for arrow, _ in DIRECTIONS if (STACK, arrow) in figures
        ]
        if stack_ratios:
            worst = min(stack_ratios)
            met = "met" if worst >= TARGET else "not met"
            notes.append(
                f"target: the stack ≥ {TARGET}× veth both ways: {met} (worst {worst:.3f}×)"
            )
    header = (
        f"`{command}`: {os.cpu_count()} CPUs, Linux {platform.release()}, Python "
        f"{platform.python_version()}, load average {load:.1f} → {os.getloadavg()[0]:.1f}; "
        f"iperf3 TCP, {seconds:g} s per direction, {repeats} interleaved rounds; medians, "
        "ratios to veth within each round. → client to server (the child sends, for the "
        "stack), ← with -R. MTU 1500 on every path."
    )
    text, markdown = (
        "\n\n".join([header, render_table(HEADERS, rows, md), "\n".join(notes)])
        for md in (False, True)
    )
    return text, markdown


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (about a minute)")
    parser.add_argument("--seconds", type=float, help="seconds per iperf3 run (3 quick, 10)")
    parser.add_argument("--repeats", type=int, help="rounds (1 quick, 3)")
    parser.add_argument("--markdown", metavar="FILE", help="also write the result as Markdown")
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="the child's bridge thread under cProfile, its table to FILE",
    )
    args = parser.parse_args(argv)
    seconds = args.seconds or (3.0 if args.quick else 10.0)
    repeats = args.repeats or (1 if args.quick else 3)
    signal.signal(signal.SIGTERM, on_sigterm(os.getpid()))
    words = sys.argv[1:] if argv is None else list(argv)
    text, markdown = report(
        seconds, repeats, " ".join(["python -m benchmarks.net_stack_bench", *words]), args.profile
    )
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(markdown + "\n")


if __name__ == "__main__":
    main()
