"""The guest program a VM definition runs unless it names another
(`program = "vmbus.vmms.agent:run"`): Hyper-V's integration components on
the guest's side. It answers the heartbeat, time sync and KVP, shuts down
cleanly (exit 0) when the host asks, and, with `args = ["traffic"]`, keeps
verified traffic on every disk: each write read back and compared, a
mismatch ending the guest with an error, so a test or a person sees that
the VM's devices work, not only that it runs. Disks and services added
while it runs are taken up as they come."""

from __future__ import annotations

import contextlib
import importlib
import queue
import random
import threading
from collections.abc import Callable
from typing import Any
from uuid import UUID

from vmbus import guid
from vmbus.channel import DeviceRemoved
from vmbus.guest import Guest, GuestDevice, GuestError
from vsc.ic import IntegrationServices
from vsc.storage import BlockDevice

__all__ = ["run"]

IO_SIZE = 4096
IDLE_SECONDS = 0.05


class DiskMismatch(AssertionError):
    """A disk gave back other bytes than were written."""


def run(guest: Guest, *modes: Any) -> None:
    shutdown = threading.Event()
    services = IntegrationServices(guest, on_shutdown=lambda reboot, reason: _ask(shutdown))
    # Drivers bind in the bus's reader thread, which must not wait on the
    # host: they note the device, and the loop below opens it.
    offered: queue.SimpleQueue[GuestDevice] = queue.SimpleQueue()
    for class_id in DRIVERS:
        guest.register(class_id, offered.put)
    failures: list[BaseException] = []
    opened: list[object] = []  # the drivers in use, kept open
    while not shutdown.is_set():
        if failures:
            raise failures[0]
        try:  # a device offered is opened at once; the shutdown is seen within IDLE_SECONDS
            device = offered.get(timeout=IDLE_SECONDS)
        except queue.Empty:
            continue
        if device.class_id == guid.SCSI and "traffic" in modes:
            threading.Thread(
                target=_traffic, args=(device, shutdown, failures), daemon=True
            ).start()
        else:
            driver = _driver(device.class_id)
            with contextlib.suppress(DeviceRemoved, GuestError):  # gone meanwhile
                opened.append(driver(device))
    services.close()


def _ask(shutdown: threading.Event) -> bool:
    shutdown.set()
    return True  # accepted: the host hears S_OK, then we end


def _traffic(device: GuestDevice, stop: threading.Event, failures: list[BaseException]) -> None:
    """Write, read back and compare, until told to stop or the disk is removed."""
    try:
        disk = BlockDevice(device, queue_depth=4)
    except (DeviceRemoved, GuestError):
        return  # removed before it opened: nothing to verify
    except BaseException as error:
        failures.append(error)
        return
    rng = random.Random(device.relid)
    blocks = disk.capacity // IO_SIZE
    try:
        while not stop.is_set():
            offset = rng.randrange(blocks) * IO_SIZE
            data = rng.randbytes(IO_SIZE)
            disk.write(offset, data)
            if disk.read(offset, IO_SIZE) != data:
                failures.append(DiskMismatch(f"disk relid {device.relid}: offset {offset}"))
                return
    except DeviceRemoved:
        pass
    except BaseException as error:
        failures.append(error)
    finally:
        disk.close()


# Each class's driver, imported when such a device is offered: a guest
# with a disk only does not pay for numpy (video) or the NIC's engine.
DRIVERS = {
    guid.SCSI: "vsc.storage:BlockDevice",
    guid.NETWORK: "vsc.net:NetAdapter",
    guid.KEYBOARD: "vsc.input:Keyboard",
    guid.MOUSE: "vsc.input:Mouse",
    guid.SYNTHVID: "vsc.video:Framebuffer",
}


def _driver(class_id: UUID) -> Callable[[GuestDevice], object]:
    module, name = DRIVERS[class_id].split(":")
    driver: Callable[[GuestDevice], object] = getattr(importlib.import_module(module), name)
    return driver
