"""Child partitions as real processes, and the parent's `Host` that runs them.

Each child is a fresh interpreter (fork and exec, never a bare fork),
confined (vmbus.sandbox), with its own guest memory (a sealed memfd), a
SOCK_SEQPACKET message port, and nothing else of the parent's. Each VM's
VSPs are served by a `VmWorker` (Hyper-V's VMWP, vmbus.worker):

- by default in a worker process of its own (`vmbus._worker`, forked
  ready-made by the zygote, `vmbus._zygote`), which makes the child's
  memory, spawns the child and serves it, so VMs share no GIL,
  no memory budget, no table of mappings and no fault domain. A worker that
  dies, even by a crash in compiled code, takes only its VM: the child dies
  with it (parent-death signal, port hang-up) and the VM is reported
  `crashed`. The devices cross to the worker as pickles with descriptors
  (vmbus.handoff); the worker answers in JSON.
- or in a thread of this process: `Host.attach` (an emulator's guest) and
  `Host.start(worker="thread")`, where the caller reaches the worker's
  objects (`server`, `channels`, the VSPs themselves) directly.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from vmbus import host as h
from vmbus import sandbox
from vmbus._child import spawn_child
from vmbus.channel import DEFAULT_SPIN_SECONDS
from vmbus.child_partition import ChildPartition, ControlError, ThreadPartition, WorkerFailed
from vmbus.device import Vsp
from vmbus.errors import UsageError
from vmbus.memory import GuestMemory
from vmbus.transport import MessagePort
from vmbus.worker import VmWorker
from vmbus.worker_process import ProcessPartition, start_worker

__all__ = [
    "ChildPartition",
    "ControlError",
    "Host",
    "ProcessPartition",
    "ThreadPartition",
    "WorkerFailed",
    "WorkerKind",
    "wait_until",
]

log = logging.getLogger(__name__)

DEFAULT_MEMORY = 32 * 1024 * 1024

Target = Callable[..., Any] | str  # a function, or "module:function"
WorkerKind = Literal["process", "thread"]


class Host:
    """The root partition: starts child partitions and serves their VMBus.

    `children` holds the children that may still run, by name. A finished
    child (its worker has cleaned up) is forgotten there at the next
    `start` or `attach` and kept only in `finished`, the last
    `FINISHED_KEPT` of them, newest last: a long-lived host that starts and
    stops children forever holds a bounded record of them. The caller's own
    reference to a ChildPartition stays valid after it is forgotten."""

    FINISHED_KEPT = 16

    def __init__(self) -> None:
        self.children: dict[str, ChildPartition] = {}
        self.finished: collections.deque[ChildPartition] = collections.deque(
            maxlen=self.FINISHED_KEPT
        )
        self._names = iter(range(1, 1 << 30))

    def _admit(self, name: str) -> None:
        """Forget finished children; refuse a name a running child has."""
        for done in [c for c in self.children.values() if c.wait(0) is not None]:
            del self.children[done.name]
            self.finished.append(done)
        if name in self.children:
            raise UsageError(f"a child named {name!r} is running")

    def start(
        self,
        target: Target,
        *,
        devices: Sequence[Vsp] = (),
        memory_size: int = DEFAULT_MEMORY,
        name: str | None = None,
        args: Sequence[Any] = (),
        spin_seconds: float = DEFAULT_SPIN_SECONDS,
        quotas: h.Quotas | None = None,
        policy: sandbox.Policy | None = None,
        worker: WorkerKind = "process",
    ) -> ChildPartition:
        """Start a child partition that runs `target(guest, *args)` once its
        VMBus is connected; its exit code is 0 if that returns. Its devices
        are served by a worker process of its own, or with
        `worker="thread"` by a thread of this process (then the `devices`
        objects are the ones that run). The worker polls the channels for
        `spin_seconds` before sleeping. The child is confined by `policy`
        (default: `vmbus.sandbox.policy`) and may make its worker hold no
        more than `quotas`."""
        name = name or f"child-{next(self._names)}"
        self._admit(name)
        quotas = quotas or h.Quotas()
        policy = policy if policy is not None else sandbox.policy
        target_name = _target_name(target)
        child: ChildPartition
        if worker == "thread":
            memory = GuestMemory.create(memory_size, name=f"vmbus-{name}")
            try:
                process, port = spawn_child(name, target_name, args, memory, policy, sys.path)
            except BaseException:
                memory.close()
                raise
            vm = VmWorker(
                name, process, memory, port, devices, spin_seconds=spin_seconds, quotas=quotas
            )
            child = ThreadPartition(vm)
            child.worker.start()
        elif worker == "process":
            boot = {
                "name": name,
                "target": target_name,
                "args": tuple(args),
                "memory_size": memory_size,
                "devices": tuple(devices),
                "spin_seconds": spin_seconds,
                "quotas": quotas,
                "policy": policy,
                "engine": sandbox.engine() if policy.enabled else None,
                "path": list(sys.path),
            }
            child = start_worker(name, boot)
        else:
            raise UsageError(f"worker must be 'process' or 'thread', not {worker!r}")
        self.children[name] = child
        return child

    def attach(
        self,
        memory: GuestMemory,
        port: MessagePort,
        *,
        devices: Sequence[Vsp] = (),
        name: str,
        quotas: h.Quotas | None = None,
    ) -> ThreadPartition:
        """Serve the VMBus of a guest the caller runs itself (an emulator's):
        its memory (a memfd, see GuestMemory.from_fd) and the port its
        messages arrive on, in a worker thread of this process. The server
        takes over both and closes them."""
        self._admit(name)
        child = ThreadPartition(VmWorker(name, None, memory, port, devices, quotas=quotas))
        self.children[name] = child
        child.worker.start()
        return child

    def stop_all(self, timeout: float = 5.0) -> None:
        for child in self.children.values():
            if child.exitcode is None:
                child.stop(timeout)

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def _target_name(target: Target) -> str:
    """ "module:function" for a target; the child imports it by that name."""
    if isinstance(target, str):
        return target
    if "<" in target.__qualname__:
        raise UsageError(f"{target.__qualname__} is not importable; use a top-level function")
    module = target.__module__
    if module == "__main__":  # a script: the child loads it by path
        module = os.path.abspath(sys.modules["__main__"].__file__ or "")
    return f"{module}:{target.__qualname__}"


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll `predicate` until true or timeout: for tests and the CLI."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True
