"""Support for the management service's tests: the service as its users
run it, `python -m vmbus serve` in a process of its own, talked to through
its real socket."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmbus.partition import wait_until
from vmbus.vmms.client import Client

START_SECONDS = 60.0


@dataclass
class Service:
    process: subprocess.Popen[bytes]
    socket: Path
    state_dir: Path
    client: Client

    def resources(self) -> dict[str, int]:
        """What the service process holds: descriptors, threads, memory."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return {
            "fds": len(os.listdir(f"/proc/{self.process.pid}/fd")),
            "threads": int(fields["Threads"]),
            "rss_kib": int(fields["VmRSS"].split()[0]),
        }


def start_service(tmp_path: Path) -> Service:
    path = tmp_path / "vmms.sock"
    state_dir = tmp_path / "state"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vmbus",
            "serve",
            "--socket",
            str(path),
            "--state-dir",
            str(state_dir),
        ],
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    line = process.stdout.readline()  # "vmbus serve: API on ..." once it listens
    if b"API on" not in line:
        process.kill()
        raise AssertionError(f"the service did not start: {line!r}")
    return Service(process, path, state_dir, Client(path))


def stop_service(service: Service) -> int:
    service.client.close()
    service.process.send_signal(signal.SIGTERM)
    try:
        return service.process.wait(60)
    finally:
        if service.process.returncode is None:
            service.process.kill()
            service.process.wait()


def define(client: Client, name: str, **fields: Any) -> None:
    """A VM with a RAM disk under verified traffic and the integration services."""
    definition = {
        "name": name,
        "memory_mb": 32,
        "args": ["traffic"],
        "devices": [{"kind": "ramdisk", "size_mb": 4}, {"kind": "integration"}],
        **fields,
    }
    client.create(definition)


def requests_of(client: Client, name: str, device: str = "ramdisk") -> int:
    """The requests a VM's disk has served (its storvsp's counter)."""
    status = client.status(name)
    counters = next(d for d in status["devices"] if d["name"] == device).get("counters", {})
    return int(counters.get("requests", 0))


def wait_for(predicate: Any, timeout: float = START_SECONDS) -> bool:
    return wait_until(predicate, timeout)
