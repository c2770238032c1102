"""Real child processes: the control plane end to end, two children at once,
large GPADLs, and a child killed in the middle of traffic."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from vmbus._ringpacket import Packet
from vmbus.channel import COMPLETION_REQUESTED, Channel
from vmbus.device import OpenContext
from vmbus.guest import Guest
from vmbus.host import OfferSpec
from vmbus.memory import PAGE_SIZE
from vmbus.partition import ChildPartition, Host, WorkerKind, wait_until
from vmbus.protocols.echo import ECHO_CLASS_ID
from vsc.echo import EchoVsc
from vsp.echo import EchoHandler, EchoVsp


def echo_many(guest: Guest, count: int, ring_size: int = 64 * 1024) -> None:
    """Child: open every echo channel, check `count` echoes on each."""
    drivers: list[EchoVsc] = []
    guest.register(ECHO_CLASS_ID, lambda device: drivers.append(EchoVsc(device)))
    assert drivers, "no echo offer was bound"
    for driver in drivers:
        driver.open(ring_size)
    for i in range(count):
        for driver in drivers:
            payload = os.urandom(i % 200 + 1)
            reply = driver.echo(payload)
            if reply[: len(payload)] != payload:
                raise AssertionError(f"echo {i} came back wrong")
    for driver in drivers:
        assert driver.channel is not None
        driver.channel.close()
    guest.unload()


def echo_forever(guest: Guest) -> None:
    drivers: list[EchoVsc] = []
    guest.register(ECHO_CLASS_ID, lambda device: drivers.append(EchoVsc(device)))
    while True:
        drivers[0].echo(b"x" * 64)


def grant_big_gpadl(guest: Guest, pages: int) -> None:
    """Child: a GPADL of many scattered pages, filled with a pattern."""
    device = next(iter(guest.devices.values()))
    pfns = guest.allocator.alloc(pages, contiguous=False)
    for pfn in pfns:
        guest.memory.view(pfn * PAGE_SIZE, 8)[:] = pfn.to_bytes(8, "little")
    guest.create_gpadl(device.relid, pfns)
    time.sleep(30)  # the parent inspects, then stops us


def test_child_echoes_through_open_channels() -> None:
    with Host() as host:
        vsp = EchoVsp(count=2)
        child = host.start(echo_many, devices=[vsp], args=(300,), memory_size=8 << 20)
        assert child.wait(timeout=60) == 0
        assert child.state == "exited"
        assert child.device_stats() == [{"device": "EchoVsp", "packets": [300, 300], "refused": 0}]
        assert child.status()["protocol_errors"] == 0
        assert child.worker_pid != os.getpid()  # served by a worker process of its own


def test_two_children_at_once_each_with_its_channels() -> None:
    with Host() as host:
        vsps = [EchoVsp(count=1), EchoVsp(count=3)]
        children = [
            host.start(echo_many, devices=[vsp], args=(200,), memory_size=4 << 20) for vsp in vsps
        ]
        assert [c.wait(timeout=60) for c in children] == [0, 0]
        assert [c.device_stats()[0]["packets"] for c in children] == [[200], [200] * 3]
        assert len({c.worker_pid for c in children}) == 2


def test_gpadl_of_more_than_a_hundred_pages() -> None:
    with Host() as host:
        # In a worker thread: the test reads the worker's GPADL table itself.
        child = host.start(grant_big_gpadl, devices=[EchoVsp()], args=(300,), worker="thread")
        assert wait_until(lambda: len(child.server.gpadls) == 1, 30)
        gpadl = next(iter(child.server.gpadls.values()))
        assert len(gpadl.pfns) == 300
        assert gpadl.byte_count == 300 * PAGE_SIZE
        for pfn in gpadl.pfns:  # the parent sees the child's pages
            assert int.from_bytes(child.memory.view(pfn * PAGE_SIZE, 8), "little") == pfn
        child.stop()
        assert child.state == "stopped"


def test_child_killed_mid_traffic_leaves_sibling_healthy() -> None:
    with Host() as host:
        victim = host.start(echo_forever, devices=[EchoVsp()])
        assert wait_until(lambda: _echoed(victim) > 100, 30)
        sibling = host.start(echo_many, devices=[EchoVsp()], args=(2000,))
        assert wait_until(lambda: _echoed(sibling) > 10, 30)
        os.kill(victim.pid, signal.SIGKILL)
        assert victim.wait(timeout=10) == -signal.SIGKILL
        assert victim.state == "crashed"
        final = victim.status()  # what its worker held at the end: nothing
        assert final["channels"] == 0 and final["mappings"] == 0 and final["gpadls"] == 0
        assert sibling.wait(timeout=60) == 0
        assert sibling.device_stats()[0]["packets"] == [2000]


def _echoed(child: ChildPartition) -> int:
    """Echoes the child's first channel has served so far."""
    packets: list[int] = child.device_stats()[0]["packets"]
    return packets[0] if packets else 0


def test_child_that_raises_is_reported_crashed() -> None:
    with Host() as host:
        child = host.start("builtins:print", args=(1, 2), memory_size=1 << 20)
        # print(guest, 1, 2) succeeds: exit 0; a missing function fails.
        assert child.wait(timeout=30) == 0
        bad = host.start("builtins:no_such_function", memory_size=1 << 20)
        assert bad.wait(timeout=30) == 1
        assert bad.state == "crashed"


def test_unimportable_target_is_refused_in_the_parent() -> None:
    def local() -> None:
        pass

    with Host() as host, pytest.raises(ValueError, match="top-level"):
        host.start(local)


class SubChannelEchoVsp(EchoVsp):
    """One echo device with a primary channel and two sub-channels."""

    def offers(self) -> list[OfferSpec]:
        instance = self.instances[0]
        return [OfferSpec(ECHO_CLASS_ID, instance, sub_channel_index=i) for i in range(3)]


def echo_on_sub_channels(guest: Guest) -> None:
    drivers = bind_all(guest)
    indices = sorted(d.device.sub_channel_index for d in drivers)
    assert indices == [0, 1, 2], indices
    assert len({d.device.instance_id for d in drivers}) == 1
    for driver in drivers:
        assert driver.echo(b"sub %d" % driver.device.sub_channel_index).startswith(b"sub")


def bind_all(guest: Guest) -> list[EchoVsc]:
    drivers: list[EchoVsc] = []
    guest.register(ECHO_CLASS_ID, lambda device: drivers.append(EchoVsc(device)))
    return drivers


def test_sub_channels_share_class_and_instance() -> None:
    with Host() as host:
        child = host.start(echo_on_sub_channels, devices=[SubChannelEchoVsp()])
        assert child.wait(timeout=30) == 0
        assert sorted(child.device_stats()[0]["packets"]) == [1, 1, 1]


def exit_at_once(guest: Guest) -> None:
    """Child: connect, then end."""


def test_host_that_starts_and_stops_children_forever_forgets_finished_ones() -> None:
    with Host() as host:
        for _ in range(Host.FINISHED_KEPT + 4):
            child = host.start(exit_at_once, devices=[EchoVsp()], memory_size=1 << 20)
            child.stop()
            assert child.state in ("exited", "stopped")
        assert list(host.children.values()) in ([], [child])  # the last, until the next start
        assert len(host.finished) == Host.FINISHED_KEPT
        assert len({c.name for c in host.finished}) == Host.FINISHED_KEPT  # each one once
        host.start(exit_at_once, memory_size=1 << 20).wait(30)
        assert host.finished[-1] is child and child.name not in host.children


class FaultyWatchEcho(EchoVsp):
    """An echo VSP whose own descriptor's callback raises (a VSP bug)."""

    broke = False

    def open(self, channel: Channel, context: OpenContext) -> EchoHandler:
        handler = super().open(channel, context)
        if not self.broke:  # the first channel's callback is broken
            self.broke = True
            wake = os.eventfd(1)  # readable at once
            handler.wake = wake  # type: ignore[attr-defined]
            context.watch(wake, self._broken)
        return handler

    def _broken(self) -> None:
        raise RuntimeError("a VSP's callback failed")


def echo_on_the_second(guest: Guest) -> None:
    first, second = bind_all(guest)
    first.open()
    second.open()
    deadline = time.monotonic() + 10
    while not first.device.rescinded:
        assert time.monotonic() < deadline, "the broken channel was not rescinded"
        time.sleep(0.01)
    assert second.echo(b"still").startswith(b"still")


def test_vsp_callback_that_raises_fails_only_its_channel() -> None:
    with Host() as host:
        child = host.start(echo_on_the_second, devices=[FaultyWatchEcho(count=2)])
        assert child.wait(timeout=30) == 0
        assert child.status()["rescinded"] == 1


def test_each_vm_gets_a_scheduling_group_of_its_own() -> None:
    """Fairness: the kernel shares the CPU between autogroups (sessions), so
    a worker with many busy threads takes one VM's share, not more."""
    autogroups = Path("/proc/sys/kernel/sched_autogroup_enabled")
    if not autogroups.exists() or autogroups.read_text().strip() != "1":
        pytest.skip("this kernel does not group sessions for scheduling (autogroup)")
    with Host() as host:
        children = [host.start(linger, devices=[EchoVsp()]) for _ in range(2)]
        groups = {autogroup(c.worker_pid) for c in children}
        groups.add(autogroup("self"))
        assert len(groups) == 3, groups
        assert {os.getsid(c.worker_pid) for c in children} == {c.worker_pid for c in children}


def autogroup(pid: int | str) -> str:
    """A process's autogroup; the kernel prints nothing for one in the
    default group (as a process that never made a session of its own is)."""
    fields = Path(f"/proc/{pid}/autogroup").read_text().split()
    return fields[0] if fields else "default"


def linger(guest: Guest) -> None:
    time.sleep(30)


class ThreadedEchoHandler(EchoHandler):
    own_thread = True

    def on_packet(self, packet: Packet) -> None:
        if bytes(packet.payload).startswith(b"crash"):
            raise RuntimeError("the handler choked")
        super().on_packet(packet)


class ThreadedEcho(EchoVsp):
    """Echo channels each served by a thread of their own."""

    def open(self, channel: Channel, context: OpenContext) -> EchoHandler:
        handler = ThreadedEchoHandler(channel, context, self)
        self.handlers.append(handler)
        return handler


def crash_one_threaded_channel(guest: Guest) -> None:
    first, second = bind_all(guest)
    assert first.echo(b"one").startswith(b"one") and second.echo(b"two").startswith(b"two")
    assert first.channel is not None
    first.channel.send(b"crash", flags=COMPLETION_REQUESTED, trans_id=99)
    deadline = time.monotonic() + 10
    while not first.device.rescinded:
        assert time.monotonic() < deadline, "the failed channel thread's channel lives on"
        time.sleep(0.01)
    for i in range(100):
        assert second.echo(b"%d" % i).startswith(b"%d" % i)


@pytest.mark.parametrize("worker", ["process", "thread"])
def test_channel_served_by_its_own_thread_fails_alone(worker: WorkerKind) -> None:
    with Host() as host:
        child = host.start(
            crash_one_threaded_channel, devices=[ThreadedEcho(count=2)], worker=worker
        )
        assert child.wait(timeout=30) == 0
        final = child.status()
        assert final["rescinded"] == 1 and final["channels"] == 0
        assert sorted(final["devices"][0]["packets"]) == [1, 101]  # the crash is not counted


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


@pytest.mark.parametrize("zygote", ["1", "0"])
def test_worker_forked_by_the_zygote_or_execd_serves_alike(
    zygote: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMBUS_WORKER_ZYGOTE", zygote)
    with Host() as host:
        child = host.start(echo_many, devices=[EchoVsp()], args=(50,), memory_size=4 << 20)
        forker = parent_of(child.worker_pid)
        assert (forker == os.getpid()) == (zygote == "0")
        assert parent_of(child.pid) in (child.worker_pid, *children_of(child.worker_pid))
        assert child.wait(timeout=30) == 0 and child.device_stats()[0]["packets"] == [50]


def children_of(pid: int) -> list[int]:
    """Direct children of `pid` (bwrap sits between a worker and its child)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if parent_of(int(entry.name)) == pid:
                    found.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
    return found


def test_zygote_that_dies_takes_its_vms_and_the_next_start_makes_another() -> None:
    with Host() as host:
        child = host.start(linger, devices=[EchoVsp()])
        zygote = parent_of(child.worker_pid)
        assert zygote != os.getpid()
        os.kill(zygote, signal.SIGKILL)
        assert child.wait(timeout=30) is not None and child.state == "crashed"
        again = host.start(echo_many, devices=[EchoVsp()], args=(10,), memory_size=4 << 20)
        assert parent_of(again.worker_pid) not in (zygote, os.getpid())
        assert again.wait(timeout=30) == 0


@pytest.mark.parametrize("worker", ["process", "thread"])
def test_a_child_stopped_before_it_connected_is_killed_at_once_not_at_the_timeout(
    worker: WorkerKind,
) -> None:
    """As pid 1 of its PID namespace, a child drops a SIGTERM that comes
    before its handler is set: one stopped that early used to live out the
    whole timeout. It has run none of its program, so it is killed."""
    with Host() as host:
        child = host.start(linger, devices=[EchoVsp()], worker=worker)
        stopping = threading.Thread(target=child.stop, args=(600,), daemon=True)
        stopping.start()
        assert child.wait(60) == -signal.SIGKILL  # long before the 600 s
        assert child.state == "stopped"
