"""The management service's state (Hyper-V's VMMS): the VMs it knows, by
name, each with its definition and, while it runs, its partition. Every
call is synchronous and thread-safe (the API runs them on a thread pool);
one VM's start, stop and device changes are serialized by its lock, and
nothing one VM does waits on another's."""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vmbus.child_partition import ChildPartition
from vmbus.device import Vsp
from vmbus.partition import Host, WorkerKind, wait_until
from vmbus.vmms import devices as built
from vmbus.vmms.config import DeviceSpec, VmDefinition, parse_device, parse_vm
from vsp.input import KeyboardVsp, MouseVsp
from vsp.net import LearningSwitch
from vsp.video import VideoVsp, VncServer

__all__ = ["Conflict", "NotFound", "Vm", "Vmms"]

log = logging.getLogger(__name__)

MiB = 1 << 20
ENDED = ("exited", "crashed", "stopped")


class NotFound(LookupError):
    """No such VM, or no such device of it."""


class Conflict(RuntimeError):
    """The VM is not in a state that allows the request."""


@dataclass
class Vm:
    definition: VmDefinition
    lock: threading.Lock = field(default_factory=threading.Lock)
    partition: ChildPartition | None = None
    indexes: dict[str, int] = field(default_factory=dict)  # device name: index in the partition
    console: VncServer | None = None
    password: str | None = None
    starts: int = 0
    started_at: float = 0.0

    @property
    def state(self) -> str:
        return "defined" if self.partition is None else self.partition.state

    @property
    def running(self) -> bool:
        return self.partition is not None and self.partition.state not in ENDED


class Vmms:
    """The VMs, and what runs them. `state_dir`, if given, keeps each
    definition (created or changed through the API) as NAME.json there,
    and the service finds them again when it starts."""

    def __init__(self, state_dir: Path | None = None, worker: WorkerKind = "process") -> None:
        self.host = Host()
        self.switch = LearningSwitch()  # the VMs' "net" devices with backend "switch"
        self.worker = worker
        self.state_dir = state_dir
        self.vms: dict[str, Vm] = {}
        self._lock = threading.Lock()  # the table of VMs
        if state_dir is not None:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            for path in sorted(state_dir.glob("*.json")):
                try:
                    definition = parse_vm(json.loads(path.read_text()), where=str(path))
                except (ValueError, OSError) as error:
                    log.warning("vmms: skipped %s: %s", path, error)
                    continue
                self.vms[definition.name] = Vm(definition)

    # --- the table of VMs ---

    def names(self) -> list[dict[str, Any]]:
        with self._lock:
            vms = list(self.vms.values())
        return [{"name": vm.definition.name, "state": vm.state} for vm in vms]

    def create(self, data: Any) -> dict[str, Any]:
        definition = parse_vm(data)
        with self._lock:
            if definition.name in self.vms:
                raise Conflict(f"a VM named {definition.name!r} exists")
            self.vms[definition.name] = Vm(definition)
        self._save(definition)
        return {"name": definition.name, "state": "defined"}

    def delete(self, name: str) -> None:
        vm = self.vm(name)
        with vm.lock:
            if vm.running:
                raise Conflict(f"{name} is {vm.state}: stop it first")
            with self._lock:
                del self.vms[name]
        if self.state_dir is not None:
            (self.state_dir / f"{name}.json").unlink(missing_ok=True)

    def vm(self, name: str) -> Vm:
        with self._lock:
            vm = self.vms.get(name)
        if vm is None:
            raise NotFound(f"no VM named {name!r}")
        return vm

    # --- running ---

    def start(self, name: str, wait_devices: float = 0.0) -> dict[str, Any]:
        """Start the VM; with `wait_devices` seconds, return once the guest
        has opened every channel offered to it and its integration services
        have negotiated (or the time is up)."""
        vm = self.vm(name)
        with vm.lock:
            if vm.running:
                raise Conflict(f"{name} is {vm.state}")
            self._release(vm)
            definition = vm.definition
            vsps = [built.build(spec, self.switch) for spec in definition.devices]
            vm.partition = self.host.start(
                definition.program,
                devices=vsps,
                memory_size=definition.memory_mb * MiB,
                name=name,
                args=definition.args,
                worker=self.worker,
            )
            vm.indexes = {spec.name: index for index, spec in enumerate(definition.devices)}
            vm.starts += 1
            vm.started_at = time.monotonic()
            if definition.console.vnc:
                self._open_console(vm, vsps)
            partition = vm.partition
        if wait_devices:
            wait_until(lambda: _devices_open(partition), wait_devices)
        return self.status(name)

    def stop(self, name: str, timeout: float = 5.0) -> dict[str, Any]:
        vm = self.vm(name)
        with vm.lock:
            if vm.partition is None or not vm.running:
                raise Conflict(f"{name} is {vm.state}")
            vm.partition.stop(timeout)
            self._release(vm)
        return self.status(name)

    def kill(self, name: str) -> dict[str, Any]:
        vm = self.vm(name)
        with vm.lock:
            if vm.partition is None or not vm.running:
                raise Conflict(f"{name} is {vm.state}")
            vm.partition.kill()
            vm.partition.wait(10.0)
            self._release(vm)
        return self.status(name)

    def close(self) -> None:
        """Stop every VM and the switch: the service ends."""
        with self._lock:
            vms = list(self.vms.values())
        for vm in vms:
            with vm.lock:
                if vm.partition is not None and vm.running:
                    vm.partition.stop(5.0)
                self._release(vm)
        self.switch.close()

    def _release(self, vm: Vm) -> None:
        """What the service held for the VM's last run: its console."""
        if vm.console is not None:
            vm.console.stop()
            vm.console = None

    def _open_console(self, vm: Vm, vsps: list[Vsp]) -> None:
        video = next((v for v in vsps if isinstance(v, VideoVsp)), None)
        if video is None:
            return
        keyboard = next((v for v in vsps if isinstance(v, KeyboardVsp)), None)
        mouse = next((v for v in vsps if isinstance(v, MouseVsp)), None)
        screen = video.screen
        vm.password = vm.definition.console.password or secrets.token_urlsafe(6)[:8]

        def pointer(x: int, y: int, buttons: int) -> None:
            if mouse is not None:
                mouse.pointer(x, y, buttons, screen.width, screen.height)

        console = VncServer(
            screen,
            port=vm.definition.console.port,
            password=vm.password,
            on_key=(lambda keysym, down: None if keyboard.key(keysym, down) else None)
            if keyboard
            else None,
            on_pointer=pointer,
            name=vm.definition.name,
        )
        console.start()
        vm.console = console

    # --- what a VM is doing ---

    def status(self, name: str) -> dict[str, Any]:
        vm = self.vm(name)
        definition, partition = vm.definition, vm.partition
        status: dict[str, Any] = {
            "name": name,
            "state": vm.state,
            "memory_mb": definition.memory_mb,
            "program": definition.program,
            "starts": vm.starts,
            "console": None,
            "devices": [{"name": s.name, "kind": s.kind} for s in definition.devices],
        }
        if vm.console is not None:
            host, port = vm.console.address
            status["console"] = {"vnc": f"{host}::{port}", "password": vm.password}
        if partition is None:
            return status
        status.update(
            pid=partition.pid, worker_pid=partition.worker_pid, exitcode=partition.exitcode
        )
        try:
            worker = partition.status(timeout=5.0)
        except (TimeoutError, OSError, RuntimeError) as error:
            status["worker"] = {"error": str(error)}
            return status
        counters = worker.get("devices", [])
        for device in status["devices"]:
            index = vm.indexes.get(device["name"])
            if index is not None and index < len(counters):
                device["counters"] = counters[index]
                if device["kind"] == "heartbeat":
                    status["heartbeat"] = counters[index].get("state")
        if vm.running:
            status["uptime_s"] = round(time.monotonic() - vm.started_at, 3)
        keys = ("channels", "offered", "gpadls", "rescinded", "protocol_errors")
        status["bus"] = {key: worker.get(key) for key in keys}
        keys = ("fds", "threads", "rss_bytes", "maps", "cpu_seconds")
        status["worker"] = {key: worker[key] for key in keys if key in worker}
        return status

    # --- devices while it runs ---

    def add_device(self, name: str, data: Any) -> dict[str, Any]:
        vm = self.vm(name)
        with vm.lock:
            spec = parse_device(data, vm.definition.devices, where=f"vm {name!r}: device")
            if vm.partition is not None and vm.running:
                vsp = built.build(spec, self.switch)
                vm.indexes[spec.name] = vm.partition.add_device(vsp)
            vm.definition = replace(vm.definition, devices=(*vm.definition.devices, spec))
        self._save(vm.definition)
        return spec.to_json()

    def remove_device(self, name: str, device: str) -> None:
        vm = self.vm(name)
        with vm.lock:
            spec = _spec(vm, device)
            if vm.partition is not None and vm.running and device in vm.indexes:
                vm.partition.remove_device(vm.indexes.pop(device))
            devices = tuple(s for s in vm.definition.devices if s is not spec)
            vm.definition = replace(vm.definition, devices=devices)
        self._save(vm.definition)

    # --- the integration services ---

    def shutdown(self, name: str, reboot: bool = False, reason: str = "", wait: float = 0.0) -> Any:
        """Ask the guest to shut down (the shutdown service); with `wait`
        seconds, return once it has (or the time is up)."""
        answer = self.ask(name, "shutdown", {"op": "shutdown", "reboot": reboot, "reason": reason})
        partition = self.vm(name).partition
        if wait and answer.get("accepted") and partition is not None:
            partition.wait(wait)
        return {**answer, "state": self.vm(name).state}

    def ask(self, name: str, kind: str, request: dict[str, Any]) -> Any:
        """A request to the VM's device of `kind` (its service)."""
        vm = self.vm(name)
        partition = vm.partition
        if partition is None or not vm.running:
            raise Conflict(f"{name} is {vm.state}")
        spec = next((s for s in vm.definition.devices if s.kind == kind), None)
        if spec is None or spec.name not in vm.indexes:
            raise NotFound(f"{name} has no {kind} device")
        return partition.control(vm.indexes[spec.name], request, timeout=15.0)

    def _save(self, definition: VmDefinition) -> None:
        if self.state_dir is None:
            return
        path = self.state_dir / f"{definition.name}.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(definition.to_json(), indent=2))
        os.replace(temporary, path)


def _spec(vm: Vm, device: str) -> DeviceSpec:
    for spec in vm.definition.devices:
        if spec.name == device:
            return spec
    raise NotFound(f"{vm.definition.name} has no device {device!r}")


def _devices_open(partition: ChildPartition) -> bool:
    if partition.state in ENDED:
        return True
    try:
        bus = partition.status(timeout=5.0)
    except (TimeoutError, OSError, RuntimeError):
        return True
    if not bus["offered"] or bus["channels"] < bus["offered"]:
        return False
    # An integration service is ready once it has negotiated its versions.
    return all(d.get("negotiation", "ready") == "ready" for d in bus["devices"])
