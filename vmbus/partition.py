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
import contextlib
import itertools
import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO, Any, Literal

from vmbus import _zygote, handoff, sandbox
from vmbus import host as h
from vmbus.channel import DEFAULT_SPIN_SECONDS
from vmbus.device import Vsp
from vmbus.errors import UsageError, VmbusError
from vmbus.memory import GuestMemory
from vmbus.transport import MessagePort
from vmbus.worker import VmWorker, spawn_child

log = logging.getLogger(__name__)

DEFAULT_MEMORY = 32 * 1024 * 1024
START_SECONDS = 60.0  # for a worker to report its child started, on a loaded machine
CONTROL_MESSAGE_MAX = 1 << 20  # bytes of one worker's JSON message

Target = Callable[..., Any] | str  # a function, or "module:function"
Worker = subprocess.Popen[bytes] | _zygote.ForkedWorker  # a VM's worker process
WorkerKind = Literal["process", "thread"]


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
        self.vm.signal(signal.SIGKILL)

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        return self.vm.status()

    def worker_cpu(self) -> float:
        ident = self.worker.ident
        if ident is not None and self.worker.is_alive():
            with contextlib.suppress(OSError):  # it ended meanwhile: keep the last reading
                self._cpu = time.clock_gettime(time.pthread_getcpuclockid(ident))
        return self._cpu


class ProcessPartition(ChildPartition):
    """A VM served by a worker process of its own (`vmbus._worker`), which
    this handle talks to over a control socket, in JSON."""

    def __init__(self, name: str, process: Worker, control: socket.socket) -> None:
        self.name = name
        self.process = process  # the worker: the child is its child
        self.worker_pid = process.pid
        self.pid = 0
        self.confinement: tuple[str, ...] = ()
        self.failure: str | None = None  # why the worker could not start the child
        self._state = "starting"
        self._exitcode: int | None = None
        self._stopping = False
        self._control = control
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._answers: dict[int, list[dict[str, Any]]] = {}
        self._answered = threading.Condition()
        self._started = threading.Event()
        self._exited = threading.Event()
        self._final_status: dict[str, Any] | None = None
        self._cpu = 0.0
        self._supervisor = threading.Thread(
            target=self._supervise, name=f"vmms-{name}", daemon=True
        )
        self._supervisor.start()

    @property
    def state(self) -> str:
        return self._state

    @property
    def exitcode(self) -> int | None:
        return self._exitcode

    def wait(self, timeout: float | None = None) -> int | None:
        if self._exited.wait(timeout) and threading.current_thread() is not self._supervisor:
            self._supervisor.join(timeout)  # everything of the VM released, its thread too
        return self._exitcode

    def started(self, timeout: float) -> None:
        """Wait for the worker to start the child; WorkerFailed if it could not."""
        if not self._started.wait(timeout):
            self.kill_worker()
            raise WorkerFailed(f"{self.name}: its worker did not start the child in {timeout} s")
        if self.failure is not None or self.pid == 0:
            raise WorkerFailed(f"{self.name}: {self.failure or 'its worker died starting'}")

    def stop(self, timeout: float = 5.0) -> int | None:
        self._stopping = True
        if not self._send({"op": "stop", "timeout": timeout}) or self.wait(timeout + 5.0) is None:
            self.kill_worker()  # unresponsive: the child dies with it
            self.wait(timeout)
        return self._exitcode

    def kill(self) -> None:
        if not self._send({"op": "kill"}):
            self.kill_worker()

    def kill_worker(self) -> None:
        """SIGKILL the worker itself: the child dies with it."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError, OSError):
                self.process.send_signal(signal.SIGKILL)

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        if self._final_status is not None:  # it ended: how it was at the end
            return self._final_status
        request = next(self._ids)
        with self._answered:
            self._answers[request] = []
        try:
            if not self._send({"op": "status", "id": request}):
                raise WorkerFailed(f"{self.name}: its worker is gone")
            with self._answered:
                if not self._answered.wait_for(
                    lambda: bool(self._answers[request]) or self._exited.is_set(), timeout
                ):
                    raise TimeoutError(f"{self.name}: no status from its worker in {timeout} s")
                if not self._answers[request]:
                    raise WorkerFailed(f"{self.name}: its worker is gone")
                return self._answers[request][0]
        finally:
            with self._answered:
                self._answers.pop(request, None)

    def worker_cpu(self) -> float:
        # The worker's process CPU clock (Linux's clock_getcpuclockid: every
        # thread, ended ones too, in nanoseconds, not /proc's 10 ms ticks).
        clock = (~self.worker_pid << 3) | 2  # MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)
        with contextlib.suppress(OSError):  # gone: keep the last reading
            self._cpu = time.clock_gettime(clock)
        return self._cpu

    # --- the control socket ---

    def _send(self, message: dict[str, Any]) -> bool:
        try:
            with self._send_lock:
                self._control.send(json.dumps(message).encode())
            return True
        except OSError:
            return False

    def _supervise(self) -> None:
        """Follow the worker's reports until it ends; a worker that dies
        without reporting its child's end crashed, and its VM with it."""
        reported = False
        try:
            while True:
                data = self._control.recv(CONTROL_MESSAGE_MAX)
                if not data:
                    break
                reported = self._report(data) or reported
        except OSError:
            pass
        finally:
            code = self.process.wait()
            if not reported:
                self._exitcode = code if code else -signal.SIGKILL
                self._state = "stopped" if self._stopping and code == -signal.SIGKILL else "crashed"
                if self._state == "crashed":
                    log.warning("%s: its worker died (exit %d); the VM is down", self.name, code)
            self._control.close()
            self._started.set()
            with self._answered:
                self._exited.set()
                self._answered.notify_all()

    def _report(self, data: bytes) -> bool:
        """Take one message of the worker; True if it reported the end. A
        message that is not what a worker sends is logged and ignored."""
        try:
            message = json.loads(data)
            event = message["event"]
            if event == "started":
                self.pid = int(message["pid"])
                self.confinement = tuple(str(layer) for layer in message["confinement"])
                self._state = "starting"
                self._started.set()
            elif event == "failed":
                self.failure = str(message["error"])
                self._started.set()
            elif event == "state":
                self._state = str(message["state"])
            elif event == "status":
                with self._answered:
                    if int(message["id"]) in self._answers:
                        self._answers[int(message["id"])].append(dict(message["status"]))
                        self._answered.notify_all()
            elif event == "exited":
                self._final_status = dict(message["status"])
                self._exitcode = int(message["exitcode"])
                self._state = "stopped" if self._stopping else str(message["state"])
                return True
            else:
                raise ValueError(f"unknown event {event!r}")
        except (ValueError, KeyError, TypeError) as error:
            log.warning("%s: a message of its worker makes no sense: %s", self.name, error)
        return False


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
            child = _start_worker(name, boot)
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


def _start_worker(name: str, boot: dict[str, Any]) -> ProcessPartition:
    """Start a VM's worker process and hand it the VM: the pickle on its
    stdin, the descriptors it carries over the control socket."""
    try:
        data, fds = handoff.dumps(boot)
    except Exception as error:
        raise UsageError(
            f"{name}: its devices must pickle to run in a worker process"
            f" (vmbus.handoff), or use worker='thread': {error}"
        ) from error
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        process, vm_pipe = _spawn_worker(theirs)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    partition = ProcessPartition(name, process, ours)
    try:
        # sys.path first, so the worker can import what the devices pickle names.
        with vm_pipe:
            vm_pipe.write(pickle.dumps((boot["path"], data)))
        socket.send_fds(ours, [b"fds"], fds)
    except OSError as error:  # it died at once: the supervisor reports why
        log.warning("%s: could not hand the VM to its worker: %s", name, error)
    partition.started(START_SECONDS)
    return partition


def _spawn_worker(control: socket.socket) -> tuple[Worker, IO[bytes]]:
    """A worker process on `control`, and the pipe to write its VM on: forked
    by the zygote (ready-made), or exec'd where there is none. Either way in
    a session of its own, which is a scheduling group of its own (the
    kernel's autogroup): a VM gets one share of the CPU however many threads
    its worker runs, and no terminal's signals."""
    zygote = _zygote.Zygote.shared()
    if zygote is not None:
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            worker = zygote.fork(control, read_end)
        except OSError as error:
            os.close(write_end)
            log.warning("the zygote failed (%s): this worker starts by exec", error)
        else:
            return worker, os.fdopen(write_end, "wb")
        finally:
            os.close(read_end)
    argv = [sys.executable, "-m", "vmbus._worker", str(control.fileno()), str(os.getpid())]
    process = sandbox.on_lasting_thread(  # its parent-death signal follows that thread
        lambda: subprocess.Popen(
            argv, stdin=subprocess.PIPE, pass_fds=(control.fileno(),), start_new_session=True
        )
    )
    assert process.stdin is not None
    return process, process.stdin


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
