"""Nothing acknowledged as flushed is lost: not when the child is killed,
not when the parent is killed right after acknowledging the flush."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from vmbus import guid
from vmbus.guest import Guest, GuestDevice
from vmbus.partition import Host, wait_until
from vsc.storage import StorageController
from vsp.storage import StorVsp
from vsp.storage.backends import RawFileBackend

DISK_SIZE = 4 << 20
BLOCK = 4096


def open_disk(guest: Guest) -> StorageController:
    devices: list[GuestDevice] = []
    guest.register(guid.SCSI, devices.append)
    return StorageController(devices[0], queue_depth=8)


def pattern(block: int, generation: int) -> bytes:
    return (b"%08d:%08d;" % (block, generation)) * (BLOCK // 18) + bytes(BLOCK % 18)


def write_flush_then_scribble(guest: Guest, journal: str) -> None:
    """Child: write and flush generations of blocks, recording each flushed
    generation in the journal only after the flush returned; then keep
    writing without flushing until killed."""
    disk = open_disk(guest).disk(0)
    for generation in range(1, 4):
        blocks = range(generation, DISK_SIZE // BLOCK, 7)
        disk.write_many([(b * BLOCK, pattern(b, generation)) for b in blocks])
        disk.flush()
        with open(journal, "a") as out:
            out.write(json.dumps({"generation": generation}) + "\n")
    while True:  # unflushed traffic, killed mid-way
        disk.write(0, os.urandom(BLOCK))


def verify_flushed(guest: Guest, journal: str) -> None:
    """Child: every block of every flushed generation reads back."""
    disk = open_disk(guest).disk(0)
    latest: dict[int, int] = {}
    for line in Path(journal).read_text().splitlines():
        generation = json.loads(line)["generation"]
        for block in range(generation, DISK_SIZE // BLOCK, 7):
            latest[block] = generation
    assert len(latest) > 100
    for block, generation in latest.items():
        assert disk.read(block * BLOCK, BLOCK) == pattern(block, generation), block


def flushed_generations(journal: Path) -> int:
    if not journal.exists():
        return 0
    return len(journal.read_text().splitlines())


def test_flushed_blocks_survive_a_killed_child(tmp_path: Path) -> None:
    image, journal = tmp_path / "disk.img", tmp_path / "journal"
    with Host() as host:
        vsp = StorVsp([RawFileBackend(image, size=DISK_SIZE)])
        child = host.start(write_flush_then_scribble, devices=[vsp], args=(str(journal),))
        assert wait_until(lambda: flushed_generations(journal) == 3, 60)
        time.sleep(0.05)  # in the middle of unflushed writes
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(10) == -signal.SIGKILL
        reader = host.start(
            verify_flushed, devices=[StorVsp([RawFileBackend(image)])], args=(str(journal),)
        )
        assert reader.wait(60) == 0


def serve_disk(image: str, journal: str) -> None:
    """A parent process of its own, for the test below to kill."""
    with Host() as host:
        vsp = StorVsp([RawFileBackend(image, size=DISK_SIZE)])
        child = host.start(write_flush_then_scribble, devices=[vsp], args=(journal,))
        Path(journal + ".pid").write_text(str(child.pid))  # as this process sees it
        child.wait()


def test_flushed_blocks_survive_a_killed_parent(tmp_path: Path) -> None:
    image, journal = tmp_path / "disk.img", tmp_path / "journal"
    parent = subprocess.Popen(
        [sys.executable, __file__, str(image), str(journal)], start_new_session=True
    )
    try:
        assert wait_until(lambda: flushed_generations(journal) == 3, 60)
        os.kill(parent.pid, signal.SIGKILL)  # right after it acknowledged the flush
        parent.wait(10)
    finally:
        if parent.poll() is None:
            parent.kill()
        # Confined, the child dies with its parent; unconfined, it is orphaned.
        pid_file = Path(f"{journal}.pid")
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
    with Host() as host:
        reader = host.start(
            verify_flushed, devices=[StorVsp([RawFileBackend(image)])], args=(str(journal),)
        )
        assert reader.wait(60) == 0


if __name__ == "__main__":
    serve_disk(sys.argv[1], sys.argv[2])
