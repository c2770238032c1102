"""The learning switch across processes: a port handed to another process
(vmbus.handoff) works the same rings as the parent's switch thread; two
children in real worker processes exchange verified frames through it; a
hostile peer process that corrupts its port or floods it fails alone, and
the parent's descriptors and threads stay within bounds."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import select
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmbus import guid, handoff
from vmbus.guest import Guest, GuestDevice
from vmbus.partition import Host, wait_until
from vsc.net import NetAdapter
from vsp.net import LearningSwitch, NetVsp, SwitchPort

MAC_A, MAC_B, MAC_H = (bytes([2, 0, 0, 0, 0x5D, n]) for n in (0xA, 0xB, 0xE))
BROADCAST = b"\xff" * 6
ROOT = Path(__file__).resolve().parents[2]


def frame(dst: bytes, src: bytes, n: int) -> bytes:
    """A numbered frame whose payload is a digest of its number: verifiable."""
    body = struct.pack("!I", n) + hashlib.sha256(b"%d" % n).digest()
    return dst + src + struct.pack("!H", 0x88B5) + body + bytes(14)


def verified(data: bytes) -> int:
    (n,) = struct.unpack_from("!I", data, 14)
    assert data[18:50] == hashlib.sha256(b"%d" % n).digest(), "a frame arrived altered"
    return int(n)


def open_fds() -> int:
    gc.collect()  # what earlier tests left to the collector goes first
    return len(os.listdir("/proc/self/fd"))


def receive_all(
    port: SwitchPort, count: int, source: bytes = MAC_A, timeout: float = 20.0
) -> list[int]:
    """The numbers of the next `count` frames from `source` (others are noise)."""
    got: list[int] = []
    while len(got) < count:
        if not select.select([port.fileno()], [], [], timeout)[0]:
            raise AssertionError(f"only {len(got)} of {count} frames arrived")
        got += [verified(f) for f in port.receive(64) if f[6:12] == source]
    return got


def send_all(port: SwitchPort, frames: list[bytes], timeout: float = 20.0) -> None:
    """transmit as a netvsp does: offer the rest again once there is room."""
    while frames:
        frames = frames[port.transmit(frames).taken :]
        if frames and not select.select([port.space_fileno()], [], [], timeout)[0]:
            raise AssertionError("the switch never made room")


def handed(port: SwitchPort) -> SwitchPort:
    """The port as a worker receives it: pickled, its descriptors passed on
    (duplicated here, as SCM_RIGHTS would)."""
    data, fds = handoff.dumps(port)
    copy = handoff.loads(data, [os.dup(fd) for fd in fds])
    assert isinstance(copy, SwitchPort)
    return copy


@pytest.fixture
def switch() -> Iterator[LearningSwitch]:
    # No stall timer: a reader slowed by a loaded machine must not turn into drops here.
    with LearningSwitch(queue_frames=64, stall_seconds=None) as switch:
        yield switch


def test_handed_port_exchanges_frames_through_the_switch_thread(switch: LearningSwitch) -> None:
    a, b = switch.port(MAC_A), switch.port(MAC_B)
    worker_a, worker_b = handed(a), handed(b)
    count = 3000  # far more than a port queues: back-pressure through both rings
    sender = threading.Thread(
        target=send_all, args=(worker_a, [frame(MAC_B, MAC_A, n) for n in range(count)])
    )
    sender.start()
    assert wait_until(lambda: a.held > 0, 20)  # B reads nothing yet: A is held, not lost
    assert receive_all(worker_b, count) == list(range(count))
    sender.join()
    worker_b.send([frame(MAC_A, MAC_B, 7)])
    assert receive_all(worker_a, 1, source=MAC_B) == [7]
    port_a, port_b = switch.stats()
    assert (port_a.frames_out, port_b.frames_in, port_b.dropped, port_a.refused) == (
        count,
        count,
        0,
        0,
    )
    # The parent's copies share the state: stats through them, and the link.
    assert a.held == port_a.held
    b.set_link(False)
    worker_b.poll_link()
    assert not worker_b.link_up
    for port in (worker_a, worker_b, a, b):
        port.close()


def test_worker_that_hangs_up_is_removed_alone_and_logged_once(
    switch: LearningSwitch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vsp.net.switch")  # a hang-up is no fault
    a, b, c = switch.port(MAC_A), switch.port(MAC_B), switch.port()
    worker_c = handed(c)
    worker_c.close()  # as a dying worker's descriptors close
    assert wait_until(lambda: switch.removals["its worker hung up"] == 1, 10)
    assert len(switch.stats()) == 2
    a.send([frame(BROADCAST, MAC_A, 1)])
    assert receive_all(b, 1) == [1]
    assert [r.message for r in caplog.records if "removed" in r.message] == [
        "switch: port (no address) removed: its worker hung up"
    ]
    for port in (a, b, c):
        port.close()


HOSTILE = """
import os, sys, time
from vmbus import handoff
from vsp.net import switch_port as sp
fds = [int(fd) for fd in sys.argv[2].split(",")]
port = handoff.loads(sys.stdin.buffer.read(), fds)
mode = sys.argv[1]
if mode == "corrupt-ring":
    port._memory.up[0:4] = (12345).to_bytes(4, "little")  # write_index: not 8-aligned
elif mode == "corrupt-counter":
    port._memory.cells[sp.W_RECEIVED] = 1 << 40  # more frames read than were ever written
    port.transmit([b"\\xff" * 6 + bytes.fromhex("02000000") + os.urandom(2) + bytes(50)])
elif mode == "oversize":
    port._writer.write(bytes(60000), trans_id=60000)
    port._writer.commit()
elif mode == "flood":
    frames = [b"\\xff" * 6 + bytes.fromhex("020000005d0e") + bytes(50)] * 64
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        port.send(frames)
        for _ in range(64):
            port._ring_switch()
port._ring_switch()
print("done", flush=True)
time.sleep(float(sys.argv[3]))
"""


def hostile(port: SwitchPort, mode: str, linger: float = 30.0) -> subprocess.Popen[bytes]:
    data, fds = handoff.dumps(port)
    process = subprocess.Popen(
        [sys.executable, "-c", HOSTILE, mode, ",".join(map(str, fds)), str(linger)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        pass_fds=fds,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(data)
    process.stdin.close()
    assert process.stdout.readline() == b"done\n"
    return process


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("corrupt-ring", "its ring is corrupt"),
        ("corrupt-counter", "its ring is corrupt"),
        ("oversize", None),  # a packet no frame can be: refused and counted, nothing more
        ("flood", "its worker hung up"),
    ],
)
def test_hostile_port_fails_alone_within_bounds(mode: str, reason: str | None) -> None:
    """A peer process that corrupts its port's ring or counters, writes a
    packet no frame can be, or floods frames and doorbells: its port alone
    is removed (the flood's when it dies), the siblings' verified traffic
    goes on, and the parent's descriptors and threads come back."""
    threads, fds = threading.active_count(), open_fds()
    switch = LearningSwitch(queue_frames=64, stall_seconds=None)
    a, b, h = switch.port(MAC_A), switch.port(MAC_B), switch.port(MAC_H)
    peer = hostile(h, mode, linger=0 if mode == "flood" else 30)
    try:
        count = 2000
        sender = threading.Thread(
            target=send_all, args=(a, [frame(MAC_B, MAC_A, n) for n in range(count)])
        )
        sender.start()
        assert receive_all(b, count) == list(range(count))  # none lost, none altered
        sender.join()
        assert threading.active_count() == threads + 1  # the switch's one thread
        if mode == "flood":
            peer.wait(10)
        a.send([frame(BROADCAST, MAC_A, 0)])  # to every port, the hostile one too
        assert receive_all(b, 1) == [0]
        if reason is None:
            assert wait_until(lambda: h.refused == 1, 10) and not switch.removals
        else:
            assert wait_until(lambda: switch.removals[reason] == 1, 10)
            assert sum(switch.removals.values()) == 1 and len(switch.stats()) == 2
    finally:
        peer.kill()
        peer.wait()
        assert peer.stdout is not None
        peer.stdout.close()
        switch.close()
        for port in (a, b, h):
            port.close()
    assert threading.active_count() == threads and open_fds() == fds


def test_sender_held_by_a_port_that_never_reads_costs_the_switch_nothing() -> None:
    """The switch thread sleeps while the only traffic waits for a full
    port: no pass without a doorbell (it spun at 100 % before)."""
    with LearningSwitch(queue_frames=8, stall_seconds=None) as switch:
        a, b = switch.port(MAC_A), switch.port(MAC_B)
        a.transmit([frame(MAC_B, MAC_A, n) for n in range(64)])
        assert wait_until(lambda: switch.stats()[0].waiting > 0 and b.held == 0, 10)
        before = switch.passes
        assert not select.select([a.space_fileno()], [], [], 0.3)[0]  # nothing moves
        assert switch.passes - before <= 2  # a wake-up still on its way, at most
        assert switch.stats()[1].queued == 8 and switch.stats()[1].dropped == 0
        for port in (a, b):
            port.close()


def test_each_port_costs_the_parent_a_bounded_number_of_descriptors() -> None:
    fds = open_fds()
    with LearningSwitch() as switch:
        base = open_fds()
        ports = [switch.port() for _ in range(16)]
        # Each: its memfd and the copy each of its 3 mappings keeps, 3 eventfds,
        # and both ends of the doorbell (the worker's, until it is handed over).
        assert open_fds() - base == 16 * 9
        for port in ports:
            port.close()
        assert open_fds() == base
    assert open_fds() == fds


# --- two children in real worker processes ---

COUNT = 2000


def adapter(guest: Guest) -> NetAdapter:
    devices: list[GuestDevice] = []
    guest.register(guid.NETWORK, devices.append)
    return NetAdapter(devices[0])


def numbered_sender(guest: Guest) -> None:
    nic = adapter(guest)
    for start in range(0, COUNT, 50):
        nic.send_batch([frame(MAC_B, MAC_A, n) for n in range(start, start + 50)])
    assert nic.send_failures == 0


def numbered_receiver(guest: Guest, workdir: str) -> None:
    nic = adapter(guest)
    (Path(workdir) / "ready").write_text("1")
    got = []
    while len(got) < COUNT:
        data = nic.receive(30)
        if data[6:12] == MAC_A:
            got.append(verified(data))
    (Path(workdir) / "got.json").write_text(json.dumps(got))


def test_two_children_in_worker_processes_exchange_verified_frames(tmp_path: Path) -> None:
    switch = LearningSwitch(queue_frames=64)
    with Host() as host:
        b = host.start(
            numbered_receiver,
            devices=[NetVsp(switch.port(MAC_B), mac=MAC_B)],
            args=(str(tmp_path),),
        )
        assert wait_until(lambda: (tmp_path / "ready").exists(), 30)
        a = host.start(numbered_sender, devices=[NetVsp(switch.port(MAC_A), mac=MAC_A)])
        assert a.wait(timeout=60) == 0 and b.wait(timeout=60) == 0
    assert json.loads((tmp_path / "got.json").read_text()) == list(range(COUNT))
    # Their workers are gone: so are their ports, each noticed by its hang-up.
    assert wait_until(lambda: switch.removals["its worker hung up"] == 2, 10)
    switch.close()


logging.getLogger("vsp.net.switch").setLevel(logging.WARNING)


class _RacingReader:
    """The switch's reader of a port's ring, with the worker writing (and
    committing) more frames right after each of the switch's reads."""

    def __init__(self, reader: Any, worker: SwitchPort, frames: list[bytes]) -> None:
        self.reader, self.worker, self.frames = reader, worker, frames

    def read_packed(self, *args: Any) -> int:
        count = int(self.reader.read_packed(*args))
        if self.frames:
            self.worker.send([self.frames.pop(0)])  # its commit sees our old read index
        return count

    def __getattr__(self, name: str) -> Any:
        return getattr(self.reader, name)


def test_frames_written_while_the_switch_reads_are_not_stranded() -> None:
    """The worker's commit during the switch's read rings no doorbell (the
    ring was not empty then): the switch looks again after its own commit
    (frames sat in a full ring, and the child timed out)."""
    switch = LearningSwitch(serve=False)
    a, b = switch.port(MAC_A), switch.port(MAC_B)
    worker_a = handed(a)  # not in the switch's process: its sends kick no pass
    end = a._end
    assert end is not None and end.reader is not None
    end.reader = _RacingReader(end.reader, worker_a, [frame(MAC_B, MAC_A, 1)])
    worker_a.send([frame(MAC_B, MAC_A, 0)])
    switch.pump()  # reads frame 0; frame 1 arrives meanwhile
    assert switch._timeout() == 0.0  # the thread would pass again at once
    switch.pump()
    assert [verified(f) for f in b.receive(8)] == [0, 1]
    switch.close()
    for port in (worker_a, a, b):
        port.close()
