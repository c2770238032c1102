"""The child program of `vmbus demo`: exercises every device it is given —
disk I/O with verification, frames through the network, drawing on the
framebuffer, reading injected input — and reports its figures to a JSON
file the parent shows live."""

from __future__ import annotations

import functools
import json
import os
import random
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


def run(guest: Guest, seconds: float, stats_path: str, index: int) -> None:
    devices: dict[object, GuestDevice] = {}
    for class_id in (guid.SCSI, guid.NETWORK, guid.SYNTHVID, guid.KEYBOARD, guid.MOUSE):
        guest.register(class_id, functools.partial(_keep, devices, class_id))
    disk = BlockDevice(devices[guid.SCSI], queue_depth=8)
    nic = NetAdapter(devices[guid.NETWORK])
    screen = Framebuffer(devices[guid.SYNTHVID], WIDTH, HEIGHT)
    keyboard, mouse = Keyboard(devices[guid.KEYBOARD]), Mouse(devices[guid.MOUSE])
    screen.wait_ready()
    stats: dict[str, Any] = {
        "disk": {"ios": 0, "bytes": 0, "verified": 0, "mismatches": 0, "capacity": disk.capacity},
        "net": {"sent": 0, "received": 0, "mac": nic.mac.hex(":")},
        "video": {"frames": 0},
        "input": {"keys": 0, "pointer": 0, "last_key": None},
    }
    rng = random.Random(index)
    deadline, next_report, seq = time.monotonic() + seconds, 0.0, 0
    while time.monotonic() < deadline:
        seq += 1
        _disk_round(disk, rng, stats["disk"])
        nic.send(b"\xff" * 6 + nic.mac + b"\x88\xb5" + struct.pack("!II", index, seq).ljust(46))
        stats["net"]["sent"] += 1
        while nic.poll() is not None:
            stats["net"]["received"] += 1
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
    stats["done"] = True
    _report(stats_path, stats)


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
    if seq == 1:
        x = np.arange(WIDTH, dtype=np.uint8)
        screen.pixels[..., 0] = x[None, :]
        screen.pixels[..., 1] = np.arange(HEIGHT, dtype=np.uint8)[:, None]
        screen.pixels[..., 2] = colour(index)
        screen.update()
        return
    column = (seq * 8) % WIDTH
    screen.pixels[:, column : column + 8, 2] = 255 - screen.pixels[:, column : column + 8, 2]
    screen.update((column, 0, min(WIDTH, column + 8), HEIGHT))


def _report(path: str, stats: dict[str, Any]) -> None:
    temporary = Path(f"{path}.{os.getpid()}")
    temporary.write_text(json.dumps(stats))
    temporary.replace(path)  # the parent never reads a half-written file
