"""Resource figures of a process, for the bounds hostile tests assert: what
a child could make the parent or its worker hold."""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path
from typing import Any

# A sibling keeps at least this fraction of the rate it had alone while a
# hostile child attacks (generous: two cores, shared with the attack itself).
SIBLING_FLOOR = 0.1


def resources(pid: int | str = "self") -> dict[str, int]:
    """Resident memory, open descriptors, mappings and threads of `pid`."""
    proc = Path(f"/proc/{pid}")
    if pid == "self":
        gc.collect()
    status = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines())
    return {
        "rss": int(status["VmRSS"].split()[0]) * 1024,
        "fds": len(os.listdir(proc / "fd")),
        "maps": (proc / "maps").read_text().count("\n"),
        "threads": int(status["Threads"]),
    }


def within(measured: dict[str, int], baseline: dict[str, int], slack: dict[str, int]) -> None:
    for key, allowed in slack.items():
        assert measured[key] - baseline[key] <= allowed, (key, baseline, measured)


def gone(pid: int) -> bool:
    """True once `pid` is no process (or a zombie nobody reaps)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def echoed(child: Any) -> int:
    """Echoes the child's first echo channel has served so far."""
    packets: list[int] = child.device_stats()[0]["packets"]
    return packets[0] if packets else 0


def rate_while(child: Any, busy: Any) -> float:
    """The child's echo rate (per second) while `busy()` is true, sampled
    from its worker's counters."""
    start, count = time.monotonic(), echoed(child)
    while busy():
        time.sleep(0.05)
    elapsed = max(time.monotonic() - start, 1e-3)
    return (echoed(child) - count) / elapsed


def rate_for(child: Any, seconds: float) -> float:
    deadline = time.monotonic() + seconds
    return rate_while(child, lambda: time.monotonic() < deadline)


# --- siblings with verified disk and network traffic -------------------------

SIBLING_MACS = (bytes.fromhex("025a00000001"), bytes.fromhex("025a00000002"))
BLOCK = 4096


def verified_traffic(guest: Any, peer: bytes) -> None:
    """Child, forever: write a block stamped with its count, read it back and
    compare; send the peer a frame stamped the same way and check every
    frame that arrives. Any mismatch ends the child with an error."""
    from vmbus import guid
    from vsc.net import NetAdapter
    from vsc.storage import BlockDevice

    devices: dict[object, Any] = {}
    for class_id in (guid.SCSI, guid.NETWORK):
        guest.register(class_id, lambda device: devices.__setitem__(device.class_id, device))
    disk = BlockDevice(devices[guid.SCSI], queue_depth=2)
    nic = NetAdapter(devices[guid.NETWORK])
    blocks = disk.capacity // BLOCK
    count = 0
    while True:
        stamp = count.to_bytes(8, "little") * (BLOCK // 8)
        disk.write(count % blocks * BLOCK, stamp)
        if disk.read(count % blocks * BLOCK, BLOCK) != stamp:
            raise AssertionError(f"block {count} read back wrong")
        nic.send(peer + nic.mac + b"\x88\xb5" + stamp[:200])
        while (frame := nic.poll()) is not None:
            body = frame[14:214]
            if body != body[:8] * 25:
                raise AssertionError("a frame arrived corrupted")
        count += 1


class Siblings:
    """Two VMs exchanging verified traffic: disk I/O and frames through one
    learning switch. `rate()` is their requests and frames per second."""

    def __init__(self, host: Any) -> None:
        from vsp.net import LearningSwitch, NetVsp
        from vsp.storage import RamBackend, StorVsp

        self.switch = LearningSwitch()
        self.children = []
        for mine, peer in (SIBLING_MACS, SIBLING_MACS[::-1]):
            devices = [StorVsp([RamBackend(4 << 20)]), NetVsp(self.switch.port(mine), mac=mine)]
            self.children.append(
                host.start("bounds:verified_traffic", devices=devices, args=(peer,))
            )
        deadline = time.monotonic() + 30
        while self.done() < 200:
            assert time.monotonic() < deadline, "the siblings did not get going"
            time.sleep(0.05)

    def done(self) -> int:
        total = 0
        for child in self.children:
            storage, net = child.device_stats()
            total += storage["requests"] + net["frames_to_guest"]
        return total

    def rate_while(self, busy: Any) -> float:
        start, count = time.monotonic(), self.done()
        while busy():
            time.sleep(0.05)
        return (self.done() - count) / max(time.monotonic() - start, 1e-3)

    def rate_for(self, seconds: float) -> float:
        deadline = time.monotonic() + seconds
        return self.rate_while(lambda: time.monotonic() < deadline)

    def check(self) -> None:
        """Both still running (every block and frame verified), then stopped."""
        for child in self.children:
            assert child.state == "running", f"{child.name} is {child.state}"
            assert child.status()["protocol_errors"] == 0
        for child in self.children:
            child.stop()
        self.switch.close()
