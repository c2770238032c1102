"""Children started and stopped over and over, with every device, each VM
in a worker process of its own: the parent returns to its baseline
(descriptors, mappings, threads, memory)."""

from __future__ import annotations

import functools
import gc
import os
import threading
from pathlib import Path

from vmbus import guid
from vmbus.guest import Guest, GuestDevice
from vmbus.partition import Host
from vsc.input import Keyboard, Mouse
from vsc.net import NetAdapter
from vsc.storage import BlockDevice
from vsc.video import Framebuffer
from vsp.input import KeyboardVsp, MouseVsp
from vsp.net import NetVsp, NullBackend
from vsp.storage import RamBackend, StorVsp
from vsp.video import Screen, VideoVsp

CYCLES = 200
AT_ONCE = 4  # children alive together: the cycles go faster, the bound is the same
MiB = 1 << 20


def use_every_device(guest: Guest) -> None:
    """Child: open every device, use each once, and end."""
    devices: dict[object, GuestDevice] = {}
    for class_id in (guid.SCSI, guid.NETWORK, guid.SYNTHVID, guid.KEYBOARD, guid.MOUSE):
        guest.register(class_id, functools.partial(devices.__setitem__, class_id))
    disk = BlockDevice(devices[guid.SCSI], queue_depth=2)
    disk.write(0, b"\x5a" * 4096)
    assert disk.read(0, 4096) == b"\x5a" * 4096
    nic = NetAdapter(devices[guid.NETWORK])
    nic.send(b"\xff" * 6 + nic.mac + b"\x88\xb5" + bytes(46))
    screen = Framebuffer(devices[guid.SYNTHVID], 640, 480)
    screen.wait_ready()
    screen.pixels[:16, :16] = 0xFF
    screen.update((0, 0, 16, 16))
    Keyboard(devices[guid.KEYBOARD]).poll()
    Mouse(devices[guid.MOUSE]).poll()


def parent_resources() -> dict[str, int]:
    with open("/proc/self/statm") as statm:
        rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {
        "rss": rss,
        "fds": len(os.listdir("/proc/self/fd")),
        "maps": Path("/proc/self/maps").read_text().count("\n"),
        "threads": threading.active_count(),
    }


def run_children(host: Host, count: int) -> None:
    started = []
    for _ in range(count):
        net = NullBackend()
        devices = [
            StorVsp([RamBackend(4 * MiB)]),
            NetVsp(net),
            VideoVsp(Screen(640, 480), vram_megabytes=2, resolutions=[(640, 480)]),
            KeyboardVsp(),
            MouseVsp(),
        ]
        started.append((host.start(use_every_device, devices=devices, memory_size=16 * MiB), net))
    for child, net in started:
        assert child.wait(60) == 0, f"{child.name} failed"
        assert child.worker_pid != os.getpid()  # each in a worker process of its own
        net.close()  # the caller's backend: the caller closes it


# What 200 cycles may leave behind, beyond the warm-up's baseline.
AFTER = {"rss": 24 * MiB, "fds": 2, "maps": 16, "threads": 1}


def test_200_start_stop_cycles_with_every_device_return_the_parent_to_its_baseline() -> None:
    with Host() as host:
        run_children(host, AT_ONCE)  # warm-up: imports, first-use caches, helper threads
        gc.collect()
        baseline = parent_resources()
        for _ in range(CYCLES // AT_ONCE):
            run_children(host, AT_ONCE)
            gc.collect()  # what cycles hold goes at the next collection: bounded, not leaked
        after = parent_resources()
        assert len(host.children) <= AT_ONCE and len(host.finished) <= 16
    for key, bound in AFTER.items():
        assert after[key] - baseline[key] <= bound, (key, baseline[key], after[key])
