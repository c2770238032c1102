"""The child program of `vmbus demo`: exercises every device it is given —
disk I/O with verification, frames through the network, drawing on the
framebuffer, reading injected input — and reports its figures to a JSON
file the parent shows live.

With `net_stack` (the parent's NIC backend a TAP device with 10.203.N.1/24,
and the child allowed `Policy(net_admin=True)`, as root), the child hands
its NIC to a Linux stack of its own (vsc.net.stack) as 10.203.N.2/24 and
its network traffic is real: an ICMP echo request to the host side per
round (a raw socket: the child has CAP_NET_RAW in its own namespaces),
answered by the host's kernel."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import socket
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np

from vmbus import guid
from vmbus.guest import Guest, GuestDevice
from vsc.input import Keyboard, Mouse
from vsc.net import NetAdapter
from vsc.storage import BlockDevice
from vsc.video import Framebuffer

IO_SIZE = 64 * 1024
WIDTH, HEIGHT = 640, 480
REPORT_EVERY = 0.25  # seconds


def run(guest: Guest, seconds: float, stats_path: str, index: int, net_stack: bool = False) -> None:
    devices: dict[object, GuestDevice] = {}
    for class_id in (guid.SCSI, guid.NETWORK, guid.SYNTHVID, guid.KEYBOARD, guid.MOUSE):
        guest.register(class_id, functools.partial(_keep, devices, class_id))
    disk = BlockDevice(devices[guid.SCSI], queue_depth=8)
    nic = NetAdapter(devices[guid.NETWORK])
    # follow_host: a browser console's window size becomes this screen's mode
    screen = Framebuffer(devices[guid.SYNTHVID], WIDTH, HEIGHT, follow_host=True)
    keyboard, mouse = Keyboard(devices[guid.KEYBOARD]), Mouse(devices[guid.MOUSE])
    screen.wait_ready()
    network = _Network(nic, index, net_stack)
    stats: dict[str, Any] = {
        "disk": {"ios": 0, "bytes": 0, "verified": 0, "mismatches": 0, "capacity": disk.capacity},
        "net": {"sent": 0, "received": 0, "mac": nic.mac.hex(":"), "stack": network.address},
        "video": {"frames": 0},
        "input": {"keys": 0, "pointer": 0, "last_key": None},
    }
    rng = random.Random(index)
    deadline, next_report, seq = time.monotonic() + seconds, 0.0, 0
    while time.monotonic() < deadline:
        seq += 1
        _disk_round(disk, rng, stats["disk"])
        network.round(seq, stats["net"])
        if screen.poll():  # the viewer asked for another size: a new mode, redrawn
            seq = 1
        _draw(screen, seq, index)
        stats["video"]["frames"] += 1
        while (key := keyboard.poll()) is not None:
            stats["input"]["keys"] += 1
            stats["input"]["last_key"] = key.scan_code
        while mouse.poll() is not None:
            stats["input"]["pointer"] += 1
        if time.monotonic() >= next_report:
            _report(stats_path, stats)
            next_report = time.monotonic() + REPORT_EVERY
    disk.flush()
    network.close()
    stats["done"] = True
    _report(stats_path, stats)


class _Network:
    """The child's network traffic: raw frames through the NIC, or with
    `net_stack` UDP datagrams through a Linux stack of its own."""

    def __init__(self, nic: NetAdapter, index: int, net_stack: bool) -> None:
        self.nic, self.index = nic, index
        self.stack: Any = None
        self.address: str | None = None
        if net_stack:
            from vsc.net.stack import LinuxStack

            self.address = f"10.203.{index - 1}.2/24"  # the parent's TAP is 10.203.N.1
            self.stack = LinuxStack(nic, address=self.address).start()
            self.socket = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            self.socket.setblocking(False)
            self.socket.connect((f"10.203.{index - 1}.1", 0))

    def round(self, seq: int, stats: dict[str, Any]) -> None:
        payload = struct.pack("!II", self.index, seq)
        if self.stack is None:
            nic = self.nic
            nic.send(b"\xff" * 6 + nic.mac + b"\x88\xb5" + payload.ljust(46))
            stats["sent"] += 1
            while nic.poll() is not None:
                stats["received"] += 1
            return
        with contextlib.suppress(OSError):  # no route yet, a full buffer: not sent
            self.socket.send(_echo_request(self.index, seq & 0xFFFF, payload))
            stats["sent"] += 1
        while True:
            try:
                packet = self.socket.recv(256)  # IPv4 header, then the ICMP message
            except OSError:
                break
            icmp = packet[(packet[0] & 0xF) * 4 :]
            if icmp[:1] == b"\0" and icmp[4:6] == struct.pack("!H", self.index):  # our echo reply
                stats["received"] += 1

    def close(self) -> None:
        if self.stack is not None:
            self.socket.close()
            self.stack.stop()


def _echo_request(ident: int, seq: int, payload: bytes) -> bytes:
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    data = header + payload
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return header[:2] + struct.pack("!H", ~total & 0xFFFF) + header[4:] + payload


def _keep(devices: dict[object, GuestDevice], class_id: object, device: GuestDevice) -> None:
    devices.setdefault(class_id, device)


def _disk_round(disk: BlockDevice, rng: random.Random, stats: dict[str, Any]) -> None:
    offset = rng.randrange(0, disk.capacity - IO_SIZE, 4096)
    data = rng.randbytes(IO_SIZE)
    disk.write(offset, data)
    back = disk.read(offset, IO_SIZE)
    stats["ios"] += 2
    stats["bytes"] += 2 * IO_SIZE
    stats["verified" if back == data else "mismatches"] += 1


def colour(index: int) -> int:
    """The red level of child `index` (from 1): 97 is odd, so up to 256
    children all differ, and every one is a byte (8 children once overflowed)."""
    return index * 97 % 256


def _draw(screen: Framebuffer, seq: int, index: int) -> None:
    """A bar sweeping across a gradient, in the child's own colour."""
    width, height = screen.width, screen.height
    if seq == 1:
        screen.pixels[..., 0] = np.arange(width, dtype=np.uint8)[None, :]
        screen.pixels[..., 1] = np.arange(height, dtype=np.uint8)[:, None]
        screen.pixels[..., 2] = colour(index)
        screen.update()
        return
    column = (seq * 8) % width
    screen.pixels[:, column : column + 8, 2] = 255 - screen.pixels[:, column : column + 8, 2]
    screen.update((column, 0, min(width, column + 8), height))


def _report(path: str, stats: dict[str, Any]) -> None:
    temporary = Path(f"{path}.{os.getpid()}")
    temporary.write_text(json.dumps(stats))
    temporary.replace(path)  # the parent never reads a half-written file
