"""`vmbus demo`: the whole stack on one machine. A parent process hosts child
partitions with every device — a SCSI disk on a sparse image file, a NIC on
the in-memory switch (or a TAP device), synthetic video shown on a VNC
console and in a PNG snapshot, a keyboard and a mouse that the parent types
and points into — and shows each child's figures live.

An application module: it may import the device packages (vsp, and vsc by
name for the children), which the bus core never does.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from demo import ring as ring_demo
from vmbus.device import Vsp
from vmbus.partition import ChildPartition, Host
from vmbus.sandbox import Policy
from vsp.input import KeyboardVsp, MouseVsp
from vsp.net import LearningSwitch, NetBackend, NetVsp, TapBackend
from vsp.storage import RawFileBackend, StorVsp
from vsp.video import Screen, VideoVsp, VncServer
from vsp.video.web import find_novnc

CHILD_TARGET = "demo.child:run"
KEYSYMS = [ord(c) for c in "vmbus"]  # what the parent types, in turn
WEB_PORT = 6080  # the browser console's, as noVNC's own proxy uses
MEMORY = 96 << 20  # guest memory per child: VRAM, buffers, bounce slots


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    path = base / "vmbus-demo"
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class Options:
    seconds: float = 5.0
    children: int = 2
    disk_mb: int = 64
    net: str = "switch"  # or "tap" (root)
    vnc_port: int = 5900
    vnc_password: str | None = None  # None: the console makes one for this run
    ring: bool = True  # start with the ring throughput figures


@dataclass
class Child:
    partition: ChildPartition
    stats_path: Path
    keyboard: KeyboardVsp
    mouse: MouseVsp
    video: VideoVsp

    def stats(self) -> dict[str, Any]:
        try:
            loaded: dict[str, Any] = json.loads(self.stats_path.read_text())
            return loaded
        except (OSError, ValueError):
            return {}


def main(options: Options, out: TextIO = sys.stdout) -> int:
    if options.net == "tap" and os.geteuid() != 0:
        print("vmbus demo: --net tap needs root (it creates a TAP device)", file=sys.stderr)
        return 2
    if options.ring:
        ring_demo.main(seconds=0.2, out=out)
        print(file=out)
    workdir = cache_dir()
    switch = LearningSwitch()
    screen = Screen(640, 480)
    children: list[Child] = []
    with Host() as host:
        for index in range(options.children):
            children.append(_start(host, index, options, workdir, switch, screen))
        vnc = _console(screen, children[0], options.vnc_port, options.vnc_password)
        try:
            print(
                f"VNC console of child-1: {_address(vnc)} (any VNC client), "
                f"password {vnc.password}",
                file=out,
            )
            if vnc.web is not None:
                print(f"in a browser: {vnc.url}", file=out)
            _watch(children, options.seconds, out)
            snapshot = workdir / "screen.png"
            screen.snapshot_png(snapshot)
            failed = [c for c in children if c.partition.wait(timeout=60) != 0]
        finally:
            vnc.stop()
        _summary(children, out)
        print(f"\nscreen of child-1 saved as {snapshot}", file=out)
    if failed:
        names = ", ".join(c.partition.name for c in failed)
        print(f"vmbus demo: {names} failed (see the output above)", file=sys.stderr)
        return 1
    return 0


def _start(
    host: Host, index: int, options: Options, workdir: Path, switch: LearningSwitch, screen: Screen
) -> Child:
    image = workdir / f"disk-{index + 1}.img"
    disk = RawFileBackend(image, size=options.disk_mb << 20)  # sparse: created on first use
    # With a TAP device (root), the child hands its NIC to a Linux stack of
    # its own (vsc.net.stack), with checksum and segmentation offloads.
    tap = options.net == "tap"
    backend: NetBackend = (
        TapBackend(f"vmbusdemo{index}", address=f"10.203.{index}.1/24", vnet_hdr=True)
        if tap
        else switch.port()
    )
    keyboard, mouse = KeyboardVsp(), MouseVsp()
    video = VideoVsp(screen if index == 0 else Screen(640, 480))
    stats_dir = workdir / "stats"  # the one place the confined child may write
    stats_dir.mkdir(exist_ok=True)
    stats_path = stats_dir / f"child-{index + 1}.json"
    stats_path.unlink(missing_ok=True)
    devices: list[Vsp] = [StorVsp([disk]), NetVsp(backend), video, keyboard, mouse]
    partition = host.start(
        CHILD_TARGET,
        devices=devices,
        memory_size=MEMORY,
        name=f"child-{index + 1}",
        args=(options.seconds, str(stats_path), index + 1, tap),
        policy=Policy(writable=(str(stats_dir),), net_admin=tap),
    )
    return Child(partition, stats_path, keyboard, mouse, video)


def _console(screen: Screen, child: Child, port: int, password: str | None) -> VncServer:
    """The console of `child`, behind VNC authentication: `password`, or one
    made for this run (any local process could otherwise watch and type)."""

    def pointer(x: int, y: int, buttons: int) -> None:
        child.mouse.pointer(x, y, buttons, screen.width, screen.height)

    def key(keysym: int, down: bool) -> None:
        child.keyboard.key(keysym, down)

    # The browser console (noVNC over WebSocket) where Debian's novnc is installed.
    web = find_novnc() is not None
    for candidate in (port, 0):  # the usual display ports, or any free ones
        try:
            server = VncServer(
                screen,
                port=candidate,
                password=password,
                on_key=key,
                on_pointer=pointer,
                web_port=(WEB_PORT if candidate else 0) if web else None,
            )
            server.start()
            return server
        except OSError:
            continue
    raise OSError("no port for the VNC console")


def _address(vnc: VncServer) -> str:
    host, port = vnc.address
    return f"{host}::{port}"


def _watch(children: list[Child], seconds: float, out: TextIO) -> None:
    """Type and point into every child, and show their figures, until done."""
    started, tick = time.monotonic(), 0
    live = out.isatty()
    while True:
        tick += 1
        for child in children:
            keysym = KEYSYMS[tick % len(KEYSYMS)]
            child.keyboard.key(keysym, True)
            child.keyboard.key(keysym, False)
            child.mouse.move(tick * 997 % 32768, tick * 577 % 32768)
        elapsed = time.monotonic() - started
        line = "  ".join(_progress(c) for c in children)
        prefix, end = ("\r", "") if live else ("", "\n")
        print(f"{prefix}[{elapsed:5.1f}s] {line}", end=end, file=out)
        out.flush()
        if all(c.stats().get("done") or c.partition.exitcode is not None for c in children):
            break
        time.sleep(0.25 if live else 1.0)
    if live:
        print(file=out)


def _progress(child: Child) -> str:
    stats = child.stats()
    if not stats:
        return f"{child.partition.name}: starting"
    disk, net = stats["disk"], stats["net"]
    return (
        f"{child.partition.name}: disk {disk['bytes'] / 1e6:7.1f} MB "
        f"net {net['sent']}/{net['received']} video {stats['video']['frames']} "
        f"keys {stats['input']['keys']}"
    )


def _summary(children: list[Child], out: TextIO) -> None:
    print(
        "\n| child | disk I/Os | verified | mismatches | frames sent | frames received |"
        " video updates | keys | pointer |",
        file=out,
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|", file=out)
    for child in children:
        s = child.stats()
        if not s:
            print(f"| {child.partition.name} | (no figures) |", file=out)
            continue
        d, n, i = s["disk"], s["net"], s["input"]
        print(
            f"| {child.partition.name} | {d['ios']} | {d['verified']} | {d['mismatches']} | "
            f"{n['sent']} | {n['received']} | {s['video']['frames']} | {i['keys']} | "
            f"{i['pointer']} |",
            file=out,
        )
