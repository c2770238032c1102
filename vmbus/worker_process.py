"""The parent's handle on a VM served by a worker process of its own
(`ProcessPartition`), and how that worker starts: forked ready-made by the
zygote (vmbus._zygote), or exec'd (`python -m vmbus._worker`)."""

from __future__ import annotations

import base64
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
from collections.abc import Sequence
from typing import IO, Any

from vmbus import _zygote, handoff, sandbox
from vmbus.child_partition import ChildPartition, WorkerFailed, _result
from vmbus.device import Vsp
from vmbus.errors import UsageError

__all__ = ["ProcessPartition", "start_worker"]

log = logging.getLogger("vmbus.partition")

START_SECONDS = 60.0  # for a worker to report its child started, on a loaded machine
CONTROL_MESSAGE_MAX = 1 << 20  # bytes of one worker's JSON message

Worker = subprocess.Popen[bytes] | _zygote.ForkedWorker  # a VM's worker process


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
        self._stopping = True
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
        status: dict[str, Any] = self._request({"op": "status"}, timeout)["status"]
        return status

    def add_device(self, vsp: Vsp, timeout: float = 10.0) -> int:
        try:
            data, fds = handoff.dumps(vsp)
        except Exception as error:
            name = type(vsp).__name__
            raise UsageError(f"{name} must pickle to reach a worker: {error}") from error
        message = {"op": "add", "pickle": base64.b64encode(data).decode()}
        index: int = _result(self._request(message, timeout, fds))
        return index

    def _ask(self, op: str, fields: dict[str, Any], timeout: float) -> dict[str, Any]:
        return self._request({"op": op, **fields}, timeout)

    def _request(
        self, message: dict[str, Any], timeout: float, fds: Sequence[int] = ()
    ) -> dict[str, Any]:
        """Send one request to the worker and wait for its answer."""
        request = next(self._ids)
        with self._answered:
            self._answers[request] = []
        try:
            if not self._send({**message, "id": request}, fds):
                raise WorkerFailed(f"{self.name}: its worker is gone")
            with self._answered:
                if not self._answered.wait_for(
                    lambda: bool(self._answers[request]) or self._exited.is_set(), timeout
                ):
                    raise TimeoutError(f"{self.name}: no answer from its worker in {timeout} s")
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

    def _send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> bool:
        try:
            with self._send_lock:
                socket.send_fds(self._control, [json.dumps(message).encode()], list(fds))
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
            elif event in ("status", "answer"):  # status: {"status"}; answer: result or error
                if event == "status":
                    dict(message["status"])  # a worker that sends no dict makes no sense
                with self._answered:
                    if int(message["id"]) in self._answers:
                        self._answers[int(message["id"])].append(dict(message))
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


def start_worker(name: str, boot: dict[str, Any]) -> ProcessPartition:
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
