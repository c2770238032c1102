"""Many VMs at once: aggregate disk and network throughput with 1 to 32
children, each VM served by a worker process of its own (the default) and
by a thread of the parent (what every VM shared before: one GIL, one
process), in one run, with what the split costs: start time and memory.

Disk: every child reads its own RAM disk (a memfd in the parent) in 64 KiB
requests, four in flight, into buffers in its guest memory. Network: the
children in pairs on one learning switch, each sending 1500-byte frames to
its partner while it receives the partner's. All children of a row start
together (one byte each on a Unix socket) and run for the same time.

    python -m benchmarks.scale_bench [--quick] [--markdown FILE] [--counts 1,2,4]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import CHILD_POLICY
from vmbus import guid
from vmbus.guest import Guest, GuestDevice
from vmbus.partition import ChildPartition, Host
from vsc.net import NetAdapter
from vsc.storage import BlockDevice
from vsp.net import LearningSwitch, NetVsp
from vsp.storage import RamBackend, StorVsp

COUNTS = (1, 2, 4, 8, 16, 32)
MODES = ("process", "thread")
MiB = 1 << 20
DISK = 16 * MiB
REQUEST = 64 << 10
DEPTH = 4
FRAME = 1500
MEMORY = 24 * MiB  # guest memory per child


def mac_of(index: int) -> bytes:
    return bytes((0x02, 0x5C, 0, 0, index >> 8, index & 0xFF))


# --- the child --------------------------------------------------------------


def run_child(guest: Guest, address: str, kind: str, seconds: float, partner: bytes) -> None:
    """Child: bind the device, report ready, wait for the start, run, report."""
    devices: dict[object, GuestDevice] = {}
    for class_id in (guid.SCSI, guid.NETWORK):
        guest.register(class_id, lambda device: devices.__setitem__(device.class_id, device))
    report = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    report.connect(address)
    result: dict[str, Any]
    if kind == "disk":
        disk = BlockDevice(devices[guid.SCSI], queue_depth=DEPTH)
        buffers = [disk.buffer(REQUEST) for _ in range(DEPTH)]
        report.sendall(b"r")
        report.recv(1)
        done, offset, deadline = 0, 0, time.monotonic() + seconds
        start = time.monotonic()
        while time.monotonic() < deadline:
            batch = []
            for buffer in buffers:
                batch.append((offset, buffer))
                offset = (offset + REQUEST) % disk.capacity
            disk.read_many(batch, depth=DEPTH)
            done += REQUEST * DEPTH
        result = {"bytes": done, "seconds": time.monotonic() - start}
    else:
        nic = NetAdapter(devices[guid.NETWORK])
        frame = partner + nic.mac + b"\x88\xb5" + bytes(FRAME - 14)
        report.sendall(b"r")
        report.recv(1)
        received, deadline = 0, time.monotonic() + seconds
        start = time.monotonic()
        while time.monotonic() < deadline:
            nic.send_batch([frame] * 16)
            while nic.poll() is not None:
                received += 1
        result = {"frames": received, "seconds": time.monotonic() - start}
    report.sendall(json.dumps(result).encode())
    report.close()


# --- the runner -------------------------------------------------------------


def _row(kind: str, count: int, mode: str, seconds: float) -> dict[str, float]:
    """Start `count` VMs, run them together, and measure."""
    with tempfile.TemporaryDirectory(prefix="vmbus-scale-") as scratch, Host() as host:
        address = str(Path(scratch) / "report")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(address)
        listener.listen(count)
        switch = LearningSwitch()
        children: list[ChildPartition] = []
        starts = []
        for index in range(count):
            partner = mac_of(index ^ 1)
            if kind == "disk":
                devices: list[Any] = [StorVsp([RamBackend(DISK)])]
            else:
                devices = [NetVsp(switch.port(mac_of(index)), mac=mac_of(index))]
            began = time.monotonic()
            children.append(
                host.start(
                    run_child,
                    devices=devices,
                    args=(address, kind, seconds, partner),
                    memory_size=MEMORY,
                    policy=CHILD_POLICY,
                    worker=mode,  # type: ignore[arg-type]
                )
            )
            starts.append(time.monotonic() - began)
        peers = [listener.accept()[0] for _ in range(count)]
        for peer in peers:
            peer.recv(1)  # ready
        memory = _memory(children, mode)
        for peer in peers:
            peer.sendall(b"g")
        results = [json.loads(_read_all(peer)) for peer in peers]
        for child in children:
            if child.wait(60) != 0:
                raise RuntimeError(f"{child.name} failed ({child.exitcode})")
        switch.close()
        listener.close()
    window = max(r["seconds"] for r in results)
    total = sum(r.get("bytes", r.get("frames", 0)) for r in results)
    return {
        "rate": total / window,
        "start": statistics.median(starts),
        "memory": memory / count,
    }


def _memory(children: Sequence[ChildPartition], mode: str) -> int:
    """Resident bytes the VMs' service holds: the worker processes', or the
    parent's own (where every worker thread lives)."""
    pids = [c.worker_pid for c in children] if mode == "process" else [os.getpid()]
    total = 0
    for pid in set(pids):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def _read_all(peer: socket.socket) -> bytes:
    chunks = []
    while chunk := peer.recv(4096):
        chunks.append(chunk)
    peer.close()
    return b"".join(chunks)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter rounds")
    parser.add_argument("--markdown", type=Path, help="write the tables here")
    parser.add_argument("--counts", help="children per row, e.g. 1,2,4 (default 1..32)")
    options = parser.parse_args(argv)
    counts = [int(c) for c in options.counts.split(",")] if options.counts else list(COUNTS)
    seconds = 1.0 if options.quick else 3.0
    lines = [
        f"Each row: N children at once for {seconds:.0f} s; VMs served by a worker process each,"
        " or by a thread each in the parent. Disk: RAM disks, 64 KiB reads at QD4. Network: 1500-B"
        " frames child to child in pairs through the learning switch (received frames).",
        "",
        "| children | disk MB/s, processes | disk MB/s, threads | ratio | net frames/s,"
        " processes | net frames/s, threads | ratio | start per VM, processes / threads |"
        " RSS per VM, processes / threads |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for count in counts:
        row: dict[tuple[str, str], dict[str, float]] = {}
        for kind in ("disk", "net"):
            if kind == "net" and count < 2:
                continue
            for mode in MODES:
                print(f"  {count} children, {kind}, {mode} ...", file=sys.stderr, flush=True)
                row[kind, mode] = _row(kind, count, mode, seconds)
        disk = [row["disk", m]["rate"] / 1e6 for m in MODES]
        net = [row["net", m]["rate"] for m in MODES] if ("net", "process") in row else None
        start = [row["disk", m]["start"] * 1e3 for m in MODES]
        memory = [row["disk", m]["memory"] / MiB for m in MODES]
        net_cells = f"{net[0]:,.0f} | {net[1]:,.0f} | {net[0] / net[1]:.2f}" if net else "— | — | —"
        lines.append(
            f"| {count} | {disk[0]:,.0f} | {disk[1]:,.0f} | {disk[0] / disk[1]:.2f} | {net_cells}"
            f" | {start[0]:.0f} / {start[1]:.0f} ms | {memory[0]:.0f} / {memory[1]:.0f} MiB |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    document = "\n".join(lines) + "\n"
    if options.markdown:
        options.markdown.write_text(document)
    print(document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
