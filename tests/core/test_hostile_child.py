"""A hostile child, in a real process: whatever it writes into its rings or
sends as messages, the parent keeps serving it where the protocol allows,
fails only the offending channel, and its siblings never notice."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import bounds
import pytest

from vmbus import messages as m
from vmbus.channel import COMPLETION_REQUESTED, Channel
from vmbus.device import OpenContext
from vmbus.guest import Guest, GuestError
from vmbus.host import DEFAULT_MAX_GPADLS
from vmbus.partition import Host, WorkerKind, wait_until
from vmbus.protocols.echo import ECHO_CLASS_ID
from vmbus.transport import SYNIC_HEADER
from vsc.echo import EchoVsc
from vsp.echo import EchoHandler, EchoVsp


def bind_echo(guest: Guest) -> list[EchoVsc]:
    drivers: list[EchoVsc] = []
    guest.register(ECHO_CLASS_ID, lambda device: drivers.append(EchoVsc(device)))
    return drivers


def corrupt_one_ring(guest: Guest) -> None:
    """Child: of two echo channels, corrupt the first one's outbound ring;
    the host must rescind it and keep serving the second."""
    bad, good = bind_echo(guest)
    bad_channel, good_channel = bad.open(), good.open()
    assert bad.echo(b"fine").startswith(b"fine")
    struct.pack_into("<I", bad_channel.views[0], 0, 12)  # misaligned write_index
    bad_channel.notify_peer.set()
    deadline = time.monotonic() + 10
    while not bad.device.rescinded:
        assert time.monotonic() < deadline, "the host did not rescind the corrupt channel"
        time.sleep(0.01)
    for i in range(100):
        assert good.echo(b"%d" % i).startswith(b"%d" % i)
    good_channel.close()


def corrupt_one_ring_while_polled(guest: Guest) -> None:
    """Child: corrupt a ring without signalling, so only the worker's poll
    loop can notice (while traffic on the other channel keeps it spinning);
    it must rescind that channel alone, not let the error end its worker
    (which took every channel of the child down)."""
    bad, good = bind_echo(guest)
    bad_channel, good_channel = bad.open(), good.open()
    assert bad.echo(b"fine").startswith(b"fine")
    struct.pack_into("<I", bad_channel.views[0], 0, 12)  # misaligned write_index, no doorbell
    deadline = time.monotonic() + 10
    while not bad.device.rescinded:  # traffic on the other keeps the poll loop spinning
        assert time.monotonic() < deadline, "the poll loop did not rescind the corrupt channel"
        assert good.echo(b"meanwhile").startswith(b"meanwhile")
    for i in range(100):
        assert good.echo(b"%d" % i).startswith(b"%d" % i)
    good_channel.close()


def fill_the_eventfd_the_parent_signals(guest: Guest) -> None:
    """Child: keep the counter of the eventfd the parent rings at its maximum
    (a second thread refills it), so the parent's doorbells would fail;
    service must go on."""
    driver, _ = bind_echo(guest)
    # No spinning: every reply needs the parent's doorbell.
    channel = driver.channel = driver.device.open(64 << 10, 64 << 10, spin_seconds=0)
    done = threading.Event()

    def refill() -> None:
        while not done.is_set():
            with contextlib.suppress(BlockingIOError):  # already full
                os.eventfd_write(channel.wake_me.fileno(), 0xFFFF_FFFF_FFFF_FFFE)

    filler = threading.Thread(target=refill)
    filler.start()
    try:
        for i in range(300):
            assert driver.echo(b"%d" % i).startswith(b"%d" % i)
    finally:
        done.set()
        filler.join()
    channel.close()


def send_garbage_messages(guest: Guest) -> None:
    """Child: bad frames and bad messages, then normal service."""
    sock = guest.port.sock  # type: ignore[attr-defined]
    sock.send(b"\x01")  # shorter than a SynIC header
    sock.send(SYNIC_HEADER.pack(1, 200, 0, 0, 0) + bytes(8))  # lies about its size
    sock.send(SYNIC_HEADER.pack(1, 240, 0, 0, 0) + bytes(400))  # oversized
    guest.port.post(struct.pack("<II", 99, 0))  # unknown message type
    guest.port.post(b"\x05\x00")  # OPENCHANNEL cut short
    guest.post(m.OfferChannel())  # host-to-guest direction
    guest.post(m.CloseChannel(child_relid=77))  # nothing open
    guest.post(m.RelidReleased(child_relid=1))  # nothing rescinded
    guest.post(m.InitiateContact(vmbus_version_requested=m.VmbusVersion.WIN10_V5_3))
    drivers = bind_echo(guest)
    assert drivers[0].echo(b"still served").startswith(b"still served")


def misuse_gpadls_and_opens(guest: Guest) -> None:
    """Child: a GPADL beyond its memory, a reused handle, an open of an
    unknown relid; each refused with the protocol's status."""
    device = next(iter(guest.devices.values()))
    beyond = guest.memory.page_count + 5
    with pytest.raises(GuestError, match="refused GPADL"):
        guest.create_gpadl(device.relid, [1, 2, beyond])
    handle = guest.create_gpadl(device.relid, guest.allocator.alloc(4))
    for message in m.gpadl_messages(device.relid, handle, 4096, [3]):
        guest.post(message)  # the same handle again
    created, _ = guest._wait((m.GpadlCreated, handle), 10)
    assert isinstance(created, m.GpadlCreated) and created.creation_status != 0
    guest.post(m.OpenChannel(child_relid=4242, openid=4242, ringbuffer_gpadlhandle=handle))
    result, _ = guest._wait((m.OpenChannelResult, 4242), 10)
    assert isinstance(result, m.OpenChannelResult) and result.status != 0
    guest.post(
        m.OpenChannel(
            child_relid=device.relid,
            openid=1,
            ringbuffer_gpadlhandle=handle,
            downstream_ringbuffer_pageoffset=3,
        )
    )  # leaves a 1-page ring
    result, _ = guest._wait((m.OpenChannelResult, device.relid), 10)
    assert isinstance(result, m.OpenChannelResult) and result.status != 0
    assert EchoVsc(device).echo(b"ok").startswith(b"ok")


def echo_steadily(guest: Guest, count: int) -> None:
    (driver,) = bind_echo(guest)
    for i in range(count):
        assert driver.echo(b"%d" % i).startswith(b"%d" % i)


def echo_forever(guest: Guest) -> None:
    (driver,) = bind_echo(guest)
    i = 0
    while True:
        assert driver.echo(b"%d" % i).startswith(b"%d" % i)
        i += 1


# What a hostile child may make its own worker hold while it attacks, over
# the worker's figures when the attack started.
WORKER_SLACK = {"rss": 64 << 20, "fds": 16, "maps": 64, "threads": 2}


@pytest.mark.parametrize(
    ("target", "expected_errors", "channels_left"),  # of its two
    [
        (corrupt_one_ring, 0, 1),
        (corrupt_one_ring_while_polled, 0, 1),
        (fill_the_eventfd_the_parent_signals, 0, 2),
        (send_garbage_messages, 8, 2),
        (misuse_gpadls_and_opens, 4, 2),
    ],
)
def test_hostile_child_fails_alone(
    target: object, expected_errors: int, channels_left: int
) -> None:
    """Each in a worker process of its own: the hostile child loses at most
    the channel it broke, its worker stays within bounds and lets go of
    everything at the end, and the siblings keep their verified disk and
    network traffic at a stated fraction of its rate."""
    with Host() as host:
        siblings = bounds.Siblings(host)
        alone = siblings.rate_for(1.0)
        parent = bounds.resources()
        hostile = host.start(target, devices=[EchoVsp(count=2)])  # type: ignore[arg-type]
        worker = bounds.resources(hostile.worker_pid)
        peak = dict(worker)

        def attacking() -> bool:
            with contextlib.suppress(FileNotFoundError, KeyError):
                for key, value in bounds.resources(hostile.worker_pid).items():
                    peak[key] = max(peak[key], value)
            return hostile.wait(0) is None

        during = siblings.rate_while(attacking)
        assert hostile.wait(timeout=60) == 0, "the hostile child's own checks failed"
        final = hostile.status()
        assert final["protocol_errors"] >= expected_errors
        # A corrupt ring costs that channel (rescinded, then released) only.
        assert final["rescinded"] == 2 - channels_left
        assert final["channels"] == 0 and final["mappings"] == 0 and final["gpadls"] == 0
        bounds.within(peak, worker, WORKER_SLACK)
        assert wait_until(lambda: bounds.gone(hostile.worker_pid), 10)
        assert during >= bounds.SIBLING_FLOOR * alone, (during, alone)
        siblings.check()
    bounds.within(bounds.resources(), parent, {"fds": 0, "threads": 0, "rss": 8 << 20})


def linger(guest: Guest) -> None:
    time.sleep(30)


def test_child_cannot_see_a_siblings_memory() -> None:
    with Host() as host:
        first = host.start(linger, devices=[EchoVsp()])
        second = host.start(linger, devices=[EchoVsp()])
        assert wait_until(lambda: first.state == "running" and second.state == "running", 30)
        for pid, own, other in ((second.pid, second, first), (second.worker_pid, second, first)):
            maps = Path(f"/proc/{pid}/maps").read_text()
            assert f"vmbus-{own.name}" in maps  # its own guest memory is mapped
            assert f"vmbus-{other.name}" not in maps
            fd_dir = f"/proc/{pid}/fd"
            targets = [os.readlink(f"{fd_dir}/{fd}") for fd in os.listdir(fd_dir)]
            assert any(f"vmbus-{own.name}" in t for t in targets)
            assert not any(f"vmbus-{other.name}" in t for t in targets), targets
        # The parent holds no guest memory at all: only the workers do.
        assert "vmbus-child" not in Path("/proc/self/maps").read_text()


def die_right_after_asking_to_open(guest: Guest) -> None:
    """Child: grant a ring, ask to open the channel, and die before the answer."""
    device = next(iter(guest.devices.values()))
    pfns = guest.allocator.alloc(8, contiguous=False)
    gpadl = guest.create_gpadl(device.relid, pfns)
    guest.post(
        m.OpenChannel(
            child_relid=device.relid,
            openid=device.relid,
            ringbuffer_gpadlhandle=gpadl,
            downstream_ringbuffer_pageoffset=4,
        )
    )
    os._exit(0)


class SlowToOpenEcho(EchoVsp):
    """Takes its time to open, so the child is surely gone before the reply."""

    def open(self, channel: Channel, context: OpenContext) -> EchoHandler:
        time.sleep(0.2)
        return super().open(channel, context)


@pytest.mark.parametrize("worker", ["process", "thread"])
def test_child_that_dies_right_after_asking_to_open_leaks_nothing(worker: WorkerKind) -> None:
    """The open's reply finds the child gone; cleanup must still release the
    channel's rings, signals and the whole partition (it raised KeyError)."""
    with Host() as host:
        warm = host.start(die_right_after_asking_to_open, devices=[SlowToOpenEcho()], worker=worker)
        warm.wait(timeout=30)
        baseline = bounds.resources()
        for _ in range(5):
            child = host.start(
                die_right_after_asking_to_open, devices=[SlowToOpenEcho()], worker=worker
            )
            assert child.wait(timeout=30) == 0
            final = child.status()
            assert child.state == "exited" and final["channels"] == final["mappings"] == 0
            assert wait_until(functools.partial(bounds.gone, child.pid), 10)
        bounds.within(bounds.resources(), baseline, {"fds": 2, "maps": 8})


def flood_and_never_read(guest: Guest) -> None:
    """Child: fill both rings (requests it sends, replies it never reads),
    then sit still; the parent must not spin on the requests it cannot take."""
    driver, _ = bind_echo(guest)
    channel = driver.channel = driver.device.open(16 << 10, 16 << 10)
    sent = 0
    while channel.try_send(bytes(256), flags=COMPLETION_REQUESTED, trans_id=sent + 1):
        sent += 1
    assert sent > 10
    time.sleep(0.3)  # the parent takes what fits its reserve, then waits
    while channel.try_send(bytes(256), flags=COMPLETION_REQUESTED, trans_id=sent + 1):
        sent += 1
    print("flooded", flush=True)
    time.sleep(2.0)


def test_child_that_floods_and_never_reads_costs_the_worker_no_cpu() -> None:
    """Back-pressure (no room for replies) sends the worker to sleep on the
    guest's signal; in poll mode it used to spin at 100 %."""
    with Host() as host:
        child = host.start(flood_and_never_read, devices=[EchoVsp(count=2)], spin_seconds=50e-6)
        assert wait_until(lambda: child.status()["channels"] == 1, 30)
        time.sleep(0.8)  # the flood is in; both rings are full
        before = child.worker_cpu()
        time.sleep(1.0)
        used = child.worker_cpu() - before
        assert used < 0.2, f"the worker used {used:.2f} s of CPU in 1 s on a stuck peer"
        assert child.wait(timeout=30) == 0


def stream_without_pause(guest: Guest, seconds: float) -> None:
    """Child: keep a packet in the ring at every moment, reading the replies."""
    (driver,) = bind_echo(guest)
    channel = driver.open()
    deadline, sent = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        if channel.try_send(bytes(64), flags=COMPLETION_REQUESTED, trans_id=sent + 1):
            sent += 1
        while channel.poll() is not None:
            pass


def test_child_that_keeps_its_ring_busy_does_not_hold_up_the_parents_requests() -> None:
    """A child whose next packet always arrives within the worker's poll
    spin kept the worker's loop from its control socket (a status, a stop)
    and its timers until it paused: each turn of poll mode is bounded."""
    with Host() as host:
        child = host.start(
            stream_without_pause, args=(8.0,), devices=[EchoVsp()], spin_seconds=500e-6
        )
        assert wait_until(lambda: child.status()["channels"] == 1, 30)
        time.sleep(0.3)  # streaming
        waits = []
        for _ in range(10):
            asked = time.monotonic()
            child.status(timeout=5.0)
            waits.append(time.monotonic() - asked)
        # Unbounded, each answer waited for the child's pause (here 8 s); a
        # loaded machine has delayed a bounded one by 0.8 s.
        assert max(waits) < 2.5, f"status answers took up to {max(waits):.2f} s"
        child.stop()


class CrashingEcho(EchoVsp):
    """A VSP with a bug in compiled code: the open dereferences NULL."""

    def open(self, channel: Channel, context: OpenContext) -> EchoHandler:
        ctypes.string_at(0)
        raise AssertionError("unreachable")


def open_and_wait(guest: Guest) -> None:
    (driver,) = bind_echo(guest)
    driver.open()
    time.sleep(60)


@pytest.mark.parametrize("how", ["sigkill", "segfault"])
def test_worker_that_dies_takes_only_its_vm(how: str) -> None:
    """A VM's worker killed, or crashing in compiled code: that VM is
    reported crashed, its child dies with its worker, the sibling keeps its
    rate, and a VM of the same name starts again."""
    with Host() as host:
        siblings = bounds.Siblings(host)
        alone = siblings.rate_for(1.0)
        devices = [CrashingEcho()] if how == "segfault" else [EchoVsp()]
        victim = host.start(open_and_wait, devices=devices, name="victim")
        if how == "sigkill":
            assert wait_until(lambda: victim.status()["channels"] == 1, 30)
            os.kill(victim.worker_pid, signal.SIGKILL)
        during = siblings.rate_while(lambda: victim.wait(0) is None)
        expected = -signal.SIGKILL if how == "sigkill" else -signal.SIGSEGV
        assert victim.wait(30) == expected and victim.state == "crashed"
        assert wait_until(lambda: bounds.gone(victim.pid), 10), "the child outlived its worker"
        assert during >= bounds.SIBLING_FLOOR * alone, (during, alone)
        again = host.start(echo_steadily, devices=[EchoVsp()], args=(100,), name="victim")
        assert again.wait(30) == 0
        siblings.check()


PARENT_SCRIPT = """
import sys, time
sys.path[:0] = {path!r}
from vmbus.partition import Host
from vsp.echo import EchoVsp
host = Host()
child = host.start("test_hostile_child:open_and_wait", devices=[EchoVsp()])
print(child.worker_pid, child.pid, flush=True)
time.sleep(60)
"""


def test_parent_that_dies_takes_its_workers_and_children_with_it() -> None:
    script = PARENT_SCRIPT.format(path=sys.path)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None
        worker_pid, child_pid = map(int, parent.stdout.readline().split())
        parent.kill()
        parent.wait()
        assert wait_until(lambda: bounds.gone(worker_pid), 10), "the worker outlived the parent"
        assert wait_until(lambda: bounds.gone(child_pid), 10), "the child outlived the parent"
    finally:
        parent.kill()
        parent.wait()


def hold_every_gpadl_and_keep_asking(guest: Guest) -> None:
    """Child: hold as many GPADLs as the quota allows, scattered over its
    memory, then keep its worker busy with requests that look each one up
    (opens naming them, refused for their one-page rings) for two seconds."""
    device = next(iter(guest.devices.values()))
    handles = []
    for pfn in range(DEFAULT_MAX_GPADLS):
        handles.append(guest.create_gpadl(device.relid, [pfn % (guest.memory.page_count // 2)]))
    deadline = time.monotonic() + 2.0
    asked = 0
    while time.monotonic() < deadline:
        handle = handles[asked % len(handles)]
        guest.post(
            m.OpenChannel(child_relid=device.relid, openid=asked, ringbuffer_gpadlhandle=handle)
        )
        result, _ = guest._wait((m.OpenChannelResult, device.relid), 10)
        assert isinstance(result, m.OpenChannelResult) and result.status != 0
        asked += 1
    assert asked > 100


def test_child_holding_every_gpadl_it_may_starves_no_sibling() -> None:
    """Per-message work does not grow with the GPADLs a child holds, and its
    worker is not the siblings': they keep their rate."""
    with Host() as host:
        siblings = bounds.Siblings(host)
        alone = siblings.rate_for(1.0)
        hostile = host.start(hold_every_gpadl_and_keep_asking, devices=[EchoVsp()])
        during = siblings.rate_while(lambda: hostile.wait(0) is None)
        assert hostile.wait(timeout=60) == 0, "the hostile child's own checks failed"
        final = hostile.status()
        assert final["gpadls"] == 0 and final["protocol_errors"] > 100  # each refused open
        assert during >= bounds.SIBLING_FLOOR * alone, (during, alone)
        siblings.check()
