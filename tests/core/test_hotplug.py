"""Devices added to and removed from a running child (the management
service's hot-plug), the parent's requests to a device (`control`), and
the timers a VSP runs in its worker's loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from vmbus.channel import AsyncChannel, Channel, DeviceRemoved
from vmbus.device import OpenContext
from vmbus.errors import UsageError
from vmbus.guest import Guest, GuestDevice
from vmbus.guid import SCSI
from vmbus.partition import ControlError, Host, ThreadPartition, WorkerKind, wait_until
from vmbus.protocols.echo import ECHO_CLASS_ID
from vsc.echo import EchoVsc
from vsc.storage import BlockDevice
from vsp.echo import EchoHandler, EchoVsp
from vsp.storage import RamBackend, StorVsp

WORKERS: list[WorkerKind] = ["process", "thread"]
CYCLES = 4


def echo_until_removed(guest: Guest) -> None:
    """Child: echo on the first device the host adds until it is removed;
    the removal must surface as DeviceRemoved, not a hang."""
    drivers: list[EchoVsc] = []
    guest.register(ECHO_CLASS_ID, lambda device: drivers.append(EchoVsc(device)))
    deadline = time.monotonic() + 60
    while not drivers:
        if time.monotonic() > deadline:
            raise AssertionError("no device was added")
        time.sleep(0.005)
    driver = drivers[0]
    try:
        while True:
            assert driver.echo(b"ping", timeout=30)[:4] == b"ping"
    except DeviceRemoved:
        pass
    assert driver.channel is not None
    driver.channel.close()  # then the guest releases the relid
    time.sleep(30)  # the parent checks the release, then stops us


@pytest.mark.parametrize("worker", WORKERS)
def test_a_device_in_use_removed_raises_device_removed_in_the_guest(worker: WorkerKind) -> None:
    with Host() as host:
        child = host.start(echo_until_removed, worker=worker)
        assert wait_until(lambda: child.state == "running", 30)
        index = child.add_device(EchoVsp())
        assert index == 0
        assert wait_until(lambda: _packets(child.device_stats()[0]) > 20, 30)
        child.remove_device(index)
        # The guest's driver closed its channel and released the relid.
        assert wait_until(lambda: child.status()["offered"] == 0, 30), child.status()
        status = child.status()
        assert status["channels"] == 0 and status["devices"] == [{"removed": True}]
        assert child.state == "running"  # the child outlived its device


def churn_beside_traffic(guest: Guest, cycles: int) -> None:
    """Child: verified echoes on the first device all along, while the host
    adds and removes a second one `cycles` times; each added one is used
    until its removal."""
    drivers: list[EchoVsc] = []
    guest.register(ECHO_CLASS_ID, lambda device: drivers.append(EchoVsc(device)))
    steady = drivers[0]
    removed: list[int] = []
    failures: list[BaseException] = []

    def use(driver: EchoVsc) -> None:
        try:
            while True:
                assert driver.echo(b"hot", timeout=30)[:3] == b"hot"
        except DeviceRemoved:
            assert driver.channel is not None
            driver.channel.close()
            removed.append(1)
        except BaseException as error:
            failures.append(error)

    served = 1
    count = 0
    while len(removed) < cycles:
        if failures:
            raise failures[0]
        while served < len(drivers):
            threading.Thread(target=use, args=(drivers[served],), daemon=True).start()
            served += 1
        payload = count.to_bytes(8, "little")
        assert steady.echo(payload, timeout=30)[:8] == payload
        count += 1
    assert steady.channel is not None
    steady.channel.close()


@pytest.mark.parametrize("worker", WORKERS)
def test_hot_add_and_remove_under_traffic(worker: WorkerKind) -> None:
    with Host() as host:
        child = host.start(churn_beside_traffic, args=(CYCLES,), devices=[EchoVsp()], worker=worker)
        for cycle in range(CYCLES):
            index = child.add_device(EchoVsp())
            assert index == cycle + 1
            before = _packets(child.device_stats()[0])
            assert wait_until(lambda i=index: _packets(child.device_stats()[i]) > 5, 30)
            child.remove_device(index)
            assert wait_until(lambda: child.status()["offered"] == 1, 30), child.status()
            assert _packets(child.device_stats()[0]) > before  # the steady device kept going
        assert child.wait(60) == 0
        assert child.status()["rescinded"] == 0  # removals are not failures


def _packets(stats: dict[str, Any]) -> int:
    return sum(stats.get("packets", [0]))


def test_removing_a_device_twice_or_one_that_does_not_exist_is_a_clear_error() -> None:
    with Host() as host:
        child = host.start(echo_until_removed)
        index = child.add_device(EchoVsp())
        child.remove_device(index)
        with pytest.raises(ControlError, match="has no device 0"):
            child.remove_device(index)
        with pytest.raises(ControlError, match="has no device 7"):
            child.remove_device(7)
        child.kill()


class Unpicklable(EchoVsp):
    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()


def test_a_device_that_cannot_reach_the_worker_is_refused_at_the_call() -> None:
    with Host() as host:
        child = host.start(echo_until_removed)
        with pytest.raises(UsageError, match="must pickle"):
            child.add_device(Unpicklable())
        assert child.add_device(EchoVsp()) == 0  # the VM is unharmed
        child.kill()


class CountingEcho(EchoVsp):
    """A device that answers the parent's requests: `count` at once, and
    `later` only after its next timer fires in the worker's loop."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = 0
        self.context: OpenContext | None = None

    def open(self, channel: Channel, context: OpenContext) -> EchoHandler:
        self.context = context
        return super().open(channel, context)

    def control(self, request: dict[str, Any], reply: Callable[[dict[str, Any]], None]) -> None:
        self.requests += 1
        if request.get("op") == "count":
            reply({"requests": self.requests})
        elif request.get("op") == "later":
            if self.context is None:
                raise UsageError("no channel is open")
            self.context.call_later(0.01, lambda: reply({"later": True}))
        elif request.get("op") == "unjson":
            reply({"value": object()})
        else:
            raise UsageError(f"no op {request.get('op')!r}")


def echo_a_while(guest: Guest) -> None:
    drivers: list[EchoVsc] = []
    guest.register(ECHO_CLASS_ID, lambda device: drivers.append(EchoVsc(device)))
    drivers[0].open()
    time.sleep(30)


@pytest.mark.parametrize("worker", WORKERS)
def test_control_reaches_the_device_in_its_worker(worker: WorkerKind) -> None:
    with Host() as host:
        child = host.start(echo_a_while, devices=[CountingEcho(), EchoVsp()], worker=worker)
        assert wait_until(lambda: child.status()["channels"] == 1, 30)
        assert child.control(0, {"op": "count"}) == {"requests": 1}
        assert child.control(0, {"op": "later"}) == {"later": True}  # answered from a timer
        with pytest.raises(ControlError, match="no op 'nothing'"):
            child.control(0, {"op": "nothing"})
        with pytest.raises(ControlError, match="EchoVsp takes no requests"):
            child.control(1, {"op": "count"})
        with pytest.raises(ControlError, match="has no device 2"):
            child.control(2, {})
        if worker == "process":  # a result that is not JSON cannot cross
            with pytest.raises(ControlError, match="not JSON"):
                child.control(0, {"op": "unjson"})
        asked = 5 if worker == "process" else 4
        assert child.control(0, {"op": "count"}) == {"requests": asked}
        child.kill()
        child.wait(30)
        assert child.state == "stopped"  # a kill asked for is a stop, not a crash
        if isinstance(child, ThreadPartition):
            with pytest.raises(Exception, match="has ended"):
                child.control(0, {"op": "count"})


def read_until_removed(guest: Guest) -> None:
    """Child: reads on the compiled storage path (one request at a time,
    waited for in C) until the host removes the disk: DeviceRemoved, at once."""
    disks: list[GuestDevice] = []
    guest.register(SCSI, disks.append)
    deadline = time.monotonic() + 60
    while not disks:
        assert time.monotonic() < deadline, "no disk was added"
        time.sleep(0.005)
    disk = BlockDevice(disks[0], queue_depth=1)
    try:
        while True:
            disk.read(0, 4096)
    except DeviceRemoved:
        pass
    disk.close()


def test_a_disk_read_in_compiled_code_sees_its_removal() -> None:
    with Host() as host:
        child = host.start(read_until_removed)
        index = child.add_device(StorVsp([RamBackend(1 << 20)]))
        assert wait_until(lambda: child.device_stats()[index].get("requests", 0) > 50, 30)
        child.remove_device(index)
        assert child.wait(30) == 0  # not a ChannelTimeout a minute later


def await_until_removed(guest: Guest) -> None:
    """Child: an asyncio driver (AsyncChannel) awaiting echoes until the host
    removes the device; both a pending request and a receive hear it."""
    drivers: list[EchoVsc] = []
    guest.register(ECHO_CLASS_ID, lambda device: drivers.append(EchoVsc(device)))
    deadline = time.monotonic() + 60
    while not drivers:
        assert time.monotonic() < deadline, "no device was added"
        time.sleep(0.005)
    channel = drivers[0].open()

    async def run() -> None:
        async_channel = AsyncChannel(channel)
        receiving = asyncio.ensure_future(async_channel.receive())
        try:
            while True:
                reply = await async_channel.request(b"ping")
                assert bytes(reply.payload[:4]) == b"ping"
        except DeviceRemoved:
            pass
        try:
            await receiving
            raise AssertionError("a receive after the removal returned")
        except DeviceRemoved:
            pass
        async_channel.close()

    asyncio.run(run())
    channel.close()


def test_an_asyncio_driver_hears_its_devices_removal() -> None:
    with Host() as host:
        child = host.start(await_until_removed)
        index = child.add_device(EchoVsp())
        assert wait_until(lambda: _packets(child.device_stats()[index]) > 20, 30)
        child.remove_device(index)
        assert child.wait(30) == 0
        assert wait_until(lambda: child.status()["offered"] == 0, 10)
