"""The management service's API: how long a status, a start and a stop
take, and how long `vmbus ctl start` takes until the guest has opened its
devices, with 1 and with 16 VMs running beside the one measured.

The service runs as its users run it (`python -m vmbus serve`, a process of
its own) and is asked through its unix socket on a kept-alive connection;
each row's floor is the API's cheapest request (GET /, no VM touched)
measured in the same rounds, so the ratios say what a VM's work adds to an
HTTP round trip. The VMs run the default guest program (the integration
services answering, their heartbeat every second) with a RAM disk.

    python -m benchmarks.vmms_bench [--quick] [--markdown FILE] [--counts 1,16]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import render_table
from vmbus.vmms.client import Client

COUNTS = (1, 16)
DEVICES = [{"kind": "ramdisk", "size_mb": 4}, {"kind": "integration"}]


def timed(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def start_service(workdir: Path) -> tuple[subprocess.Popen[bytes], Path]:
    path = workdir / "vmms.sock"
    process = subprocess.Popen(
        [sys.executable, "-m", "vmbus", "serve", "--socket", str(path)], stdout=subprocess.PIPE
    )
    assert process.stdout is not None
    if b"API on" not in process.stdout.readline():
        process.kill()
        raise RuntimeError("the service did not start")
    return process, path


def ctl_start(path: Path, name: str) -> float:
    """`vmbus ctl start NAME` as a person runs it: a new process, its
    interpreter's start included, returning once the guest's devices are open."""
    command = [sys.executable, "-m", "vmbus", "ctl", "--socket", str(path), "start", name]
    command += ["--wait-devices", "30"]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def measure(path: Path, running: int, rounds: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {}

    def add(key: str, seconds: float) -> None:
        samples.setdefault(key, []).append(seconds)

    with Client(path) as client:
        for index in range(running):
            client.create({"name": f"bg{index}", "devices": DEVICES})
            client.start(f"bg{index}", wait_devices=30)
        client.create({"name": "probe", "devices": DEVICES})
        for _ in range(rounds):
            for _ in range(20):  # interleaved: the floor and the status alike
                add("floor", timed(lambda: client.request("GET", "/")))
                add("status", timed(lambda: client.status("bg0")))
                add("list", timed(client.list))
            add("start", timed(lambda: client.start("probe")))
            add("stop", timed(lambda: client.stop("probe")))
            add("start, devices open", timed(lambda: client.start("probe", wait_devices=30)))
            client.stop("probe")
            add("ctl start, devices open", ctl_start(path, "probe"))
            client.stop("probe")
        for index in range(running):
            client.stop(f"bg{index}")
    return samples


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 8")
    parser.add_argument("--markdown", type=Path, help="write the tables here")
    parser.add_argument("--counts", default=",".join(map(str, COUNTS)), help="VMs running beside")
    options = parser.parse_args(argv)
    rounds = 3 if options.quick else 8
    counts = [int(c) for c in options.counts.split(",")]
    rows = []
    for running in counts:
        with tempfile.TemporaryDirectory(prefix="vmbus-vmms-bench-") as workdir:
            process, path = start_service(Path(workdir))
            try:
                samples = measure(path, running, rounds)
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(120)
        floor = statistics.median(samples["floor"])
        for key in (
            "floor",
            "status",
            "list",
            "start",
            "stop",
            "start, devices open",
            "ctl start, devices open",
        ):
            values = sorted(samples[key])
            median = statistics.median(values)
            p90 = values[min(len(values) - 1, int(len(values) * 0.9))]
            rows.append(
                [
                    key if key != "floor" else "GET / (the floor)",
                    str(running),
                    f"{median * 1e3:,.2f}",
                    f"{p90 * 1e3:,.2f}",
                    f"{median / floor:,.1f}",
                    str(len(values)),
                ]
            )
    load = os.getloadavg()
    head = (
        f"`python -m benchmarks.vmms_bench{' --quick' if options.quick else ''}`: "
        f"{os.cpu_count()} CPUs, load average {load[0]:.1f}; the service in a process of its "
        f"own, a kept-alive connection on its unix socket; medians of {rounds} rounds (20 "
        "requests a round for status, list and the floor). VMs running: beside the one measured, "
        "each with a RAM disk and the integration services (heartbeat every second)."
    )
    headers = ["request", "VMs running", "median ms", "p90 ms", "× floor", "samples"]
    document = "\n\n".join([head, render_table(headers, rows, True)]) + "\n"
    print(render_table(headers, rows, False))
    if options.markdown:
        options.markdown.write_text(document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
