"""The parent's handle on one child partition (`ChildPartition`), and the
one for a VM served by a thread of this process (`ThreadPartition`); the
one for a worker process is vmbus.worker_process's."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from vmbus.device import Vsp
from vmbus.errors import VmbusError
from vmbus.worker import VmWorker

__all__ = ["ChildPartition", "ControlError", "ThreadPartition", "WorkerFailed"]


class ControlError(VmbusError, RuntimeError):
    """A device or the worker refused a request of the parent (the reason)."""


class WorkerFailed(VmbusError, RuntimeError):
    """A VM's worker process could not start its child, or died doing so."""


class ChildPartition:
    """The parent's handle on one child partition, wherever its worker runs.
    `state` is starting, running, exited, crashed or stopped; `pid` the
    child's process (0 when embedded); `worker_pid` its worker's."""

    name: str
    pid: int
    worker_pid: int
    confinement: tuple[str, ...]  # the sandbox layers the child runs under

    @property
    def state(self) -> str:
        raise NotImplementedError

    @property
    def exitcode(self) -> int | None:
        raise NotImplementedError

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code once the child is gone and cleaned up, else None."""
        raise NotImplementedError

    def stop(self, timeout: float = 5.0) -> int | None:
        """Ask the child to end (SIGTERM), then kill it if it does not."""
        raise NotImplementedError

    def kill(self) -> None:
        """End the child at once (SIGKILL); it is then `stopped`, not crashed."""
        raise NotImplementedError

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        """The VM as its worker sees it (vmbus.worker.VmWorker.status)."""
        raise NotImplementedError

    def device_stats(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Each device's counters (`Vsp.stats`), in the order given."""
        devices: list[dict[str, Any]] = self.status(timeout)["devices"]
        return devices

    def worker_cpu(self) -> float:
        """CPU seconds the VM's worker has used (its thread, or its process
        with every thread it ran)."""
        raise NotImplementedError

    # --- the management service's requests (vmbus.vmms) ---

    def control(
        self, device: int, request: dict[str, Any], timeout: float = 10.0
    ) -> dict[str, Any]:
        """Ask device `device` (its index: the order given, hot-added ones
        after) something (`Vsp.control`), JSON in and out. ControlError
        with the device's reason if it refuses; TimeoutError if no answer."""
        result: dict[str, Any] = _result(
            self._ask("control", {"device": device, "request": request}, timeout)
        )
        return result

    def add_device(self, vsp: Vsp, timeout: float = 10.0) -> int:
        """Hot add: offer `vsp`'s channels to the running child; its index."""
        raise NotImplementedError

    def remove_device(self, device: int, timeout: float = 10.0) -> None:
        """Hot remove: rescind device `device`'s channels; the child's
        driver is told (a wait on them raises DeviceRemoved)."""
        _result(self._ask("remove", {"device": device}, timeout))

    def _ask(self, op: str, fields: dict[str, Any], timeout: float) -> dict[str, Any]:
        """One request to the worker's loop: {"result": ...} or {"error": ...}."""
        raise NotImplementedError


def _result(answer: dict[str, Any]) -> Any:
    if "error" in answer:
        raise ControlError(str(answer["error"]))
    return answer.get("result")


class ThreadPartition(ChildPartition):
    """A VM served by a thread of this process: its `VmWorker` is `vm`, its
    thread `worker`, and its objects are the caller's to inspect."""

    def __init__(self, vm: VmWorker) -> None:
        self.vm = vm
        self.name = vm.name
        self.process = vm.process
        self.pid = vm.pid if vm.process else 0
        self.worker_pid = os.getpid()
        self.confinement = getattr(vm.process, "confinement", ())
        self.worker = threading.Thread(target=vm.serve, name=f"vmwp-{vm.name}", daemon=True)
        self._cpu = 0.0

    # The worker's objects, for tests and embedding.
    server = property(lambda self: self.vm.server)
    channels = property(lambda self: self.vm.channels)
    memory = property(lambda self: self.vm.memory)
    port = property(lambda self: self.vm.port)
    quotas = property(lambda self: self.vm.quotas)

    @property
    def state(self) -> str:
        return self.vm.state

    @property
    def exitcode(self) -> int | None:
        return self.vm.exitcode

    def wait(self, timeout: float | None = None) -> int | None:
        self.vm.exited.wait(timeout)
        return self.vm.exitcode

    def stop(self, timeout: float = 5.0) -> int | None:
        self.vm.stop(timeout)
        self.wait(timeout + 5.0)
        return self.vm.exitcode

    def kill(self) -> None:
        self.vm.kill()

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        return self.vm.status()

    def add_device(self, vsp: Vsp, timeout: float = 10.0) -> int:
        index: int = _result(self._run(lambda: {"result": self.vm.add_device(vsp)}, timeout))
        return index

    def _ask(self, op: str, fields: dict[str, Any], timeout: float) -> dict[str, Any]:
        if op == "control":
            return self._run_later(
                lambda answer: self.vm.control(fields["device"], fields["request"], answer),
                timeout,
            )

        def remove() -> dict[str, Any]:
            self.vm.remove_device(fields["device"])
            return {"result": None}

        return self._run(remove, timeout)

    def _run(self, step: Callable[[], dict[str, Any]], timeout: float) -> dict[str, Any]:
        def run(answer: Callable[[dict[str, Any]], None]) -> None:
            try:
                answer(step())
            except (VmbusError, ValueError, KeyError, TypeError) as error:
                answer({"error": str(error) or type(error).__name__})

        return self._run_later(run, timeout)

    def _run_later(
        self, step: Callable[[Callable[[dict[str, Any]], None]], None], timeout: float
    ) -> dict[str, Any]:
        """Run `step(answer)` in the worker's loop and wait for its answer."""
        answers: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        if not self.vm.call_soon(lambda: step(answers.put)):
            raise WorkerFailed(f"{self.name} has ended")
        try:
            return answers.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"{self.name}: no answer from its worker in {timeout} s") from None

    def worker_cpu(self) -> float:
        ident = self.worker.ident
        if ident is not None and self.worker.is_alive():
            with contextlib.suppress(OSError):  # it ended meanwhile: keep the last reading
                self._cpu = time.clock_gettime(time.pthread_getcpuclockid(ident))
        return self._cpu
