"""A VM's worker process (VMWP): `python -m vmbus._worker CONTROL_FD PARENT_PID`,
or forked by the zygote (vmbus._zygote), which calls `run`.

The parent writes the VM (vmbus.handoff pickle: its devices, quotas,
policy, the child's program) on our stdin (or a pipe the zygote passes) and sends the descriptors it
carries over the control socket. We make the child's memory, spawn and
confine the child, tell the parent its pid, and serve its VMBus
(vmbus.worker) on our main thread until it ends. Then we report how it
ended and exit.

The control socket carries JSON both ways: from the parent `status`, `stop`
and `kill`; to it `started` (or `failed`), `state`, `status` and `exited`.
We die with the parent (parent-death signal), and a hang-up of the control
socket kills the child, which ends the serving.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import pickle
import resource
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any, BinaryIO

from vmbus import _seccomp as sc
from vmbus import handoff, sandbox
from vmbus._child import spawn_child
from vmbus.errors import UsageError
from vmbus.memory import GuestMemory
from vmbus.worker import VmWorker

EXIT_PARENT_GONE = 3
MAX_FDS = 250  # a VM's descriptors in one handoff (SCM_MAX_FD is 253)
REQUEST_MAX = 1 << 20  # bytes of one request of the parent (a hot-added device's pickle)
LOG_FORMAT = "vmbus worker: %(name)s: %(message)s"


class _Control:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()

    def send(self, **message: Any) -> None:
        try:
            with self._lock:
                self.sock.send(json.dumps(message).encode())
        except OSError:  # the parent is gone: the hang-up ends us
            pass


def _resources() -> dict[str, Any]:
    """What this worker holds, for the parent's bounds."""
    status: dict[str, str] = {}
    with open("/proc/self/status") as lines:
        for line in lines:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    with open("/proc/self/maps") as maps:
        mapped = sum(1 for _ in maps)
    return {
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": int(status.get("Threads", "0")),
        "rss_bytes": int(status.get("VmRSS", "0 kB").split()[0]) * 1024,
        "maps": mapped,
        "cpu_seconds": time.process_time(),
    }


def _serve_requests(vm: VmWorker, control: _Control) -> None:
    """One request of the parent (the worker's loop watches the socket)."""
    try:
        data, fds, _, _ = socket.recv_fds(control.sock, REQUEST_MAX, MAX_FDS)
    except BlockingIOError:
        return
    except OSError:
        data, fds = b"", []
    if not data:  # the parent is gone or dropped us: end the VM
        vm.unwatch(control.sock.fileno())
        vm.stopping = True
        vm.signal(signal.SIGKILL)
        return
    try:
        request = json.loads(data)
        op = request["op"]
        if op == "status":
            control.send(
                event="status", id=int(request["id"]), status={**vm.status(), **_resources()}
            )
        elif op == "stop":
            vm.stop(float(request["timeout"]))
        elif op == "kill":
            vm.kill()
        elif op in ("control", "add", "remove"):
            _answer(vm, control, request, fds)
            fds = []
        else:
            raise ValueError(f"unknown op {op!r}")
    except (ValueError, KeyError, TypeError) as error:
        logging.getLogger("vmbus.partition").warning("bad request of the parent: %s", error)
    finally:
        for fd in fds:  # descriptors nothing took
            os.close(fd)


def _answer(vm: VmWorker, control: _Control, request: dict[str, Any], fds: list[int]) -> None:
    """A management request (vmbus.vmms), answered {"result"} or {"error"}."""
    request_id = int(request["id"])

    def answer(result: dict[str, Any]) -> None:
        try:
            control.send(event="answer", id=request_id, **result)
        except (TypeError, ValueError) as error:  # a device's result that is not JSON
            control.send(event="answer", id=request_id, error=f"not JSON: {error}")

    op = request["op"]
    if op == "control":
        vm.control(int(request["device"]), dict(request["request"]), answer)
        return
    if op == "remove":
        try:
            vm.remove_device(int(request["device"]))
        except UsageError as error:
            answer({"error": str(error)})
        else:
            answer({"result": None})
        return
    try:
        vsp = handoff.loads(base64.b64decode(request["pickle"]), fds)
    except Exception as error:  # nothing took the descriptors
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        answer({"error": f"the device does not unpickle here: {type(error).__name__}: {error}"})
        return
    try:  # from here the device owns its descriptors
        answer({"result": vm.add_device(vsp)})
    except Exception as error:
        answer({"error": f"{type(error).__name__}: {error}"})


def main() -> int:
    control_fd, parent_pid = int(sys.argv[1]), int(sys.argv[2])
    logging.basicConfig(format=LOG_FORMAT, level=logging.WARNING)
    return run(control_fd, sys.stdin.buffer, parent_pid)


def run(control_fd: int, boot: BinaryIO, parent_pid: int) -> int:
    """Serve the VM the parent hands over on `boot` and the control socket;
    the exit code. The parent is `parent_pid` (the Host, or the zygote that
    forked us): we die with it."""
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # it died before the signal was set
        return EXIT_PARENT_GONE
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when the VM ends
    control = _Control(socket.socket(fileno=control_fd))
    path, data = pickle.loads(boot.read())
    boot.close()
    sys.path[:0] = [entry for entry in path if entry not in sys.path]
    try:
        _, fds, _, _ = socket.recv_fds(control.sock, 16, MAX_FDS)
        vm_boot = handoff.loads(data, fds)
        if vm_boot["engine"] is not None:
            sandbox.use_engine(vm_boot["engine"])
        memory = GuestMemory.create(vm_boot["memory_size"], name=f"vmbus-{vm_boot['name']}")
        process, port = spawn_child(
            vm_boot["name"],
            vm_boot["target"],
            vm_boot["args"],
            memory,
            vm_boot["policy"],
            vm_boot["path"],
        )
    except Exception as error:
        traceback.print_exc()
        control.send(event="failed", error=f"{type(error).__name__}: {error}")
        return 1
    vm = VmWorker(
        vm_boot["name"],
        process,
        memory,
        port,
        vm_boot["devices"],
        spin_seconds=vm_boot["spin_seconds"],
        quotas=vm_boot["quotas"],
        on_state=lambda state: control.send(event="state", state=state),
    )
    del vm_boot  # the worker holds what it serves; nothing else pins the devices
    confinement = getattr(process, "confinement", ())
    control.send(event="started", pid=vm.pid, confinement=list(confinement))
    control.sock.setblocking(False)
    vm.watch(control.sock.fileno(), lambda: _serve_requests(vm, control))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # guest bytes never land in a core file
    vm.serve()
    control.send(event="exited", state=vm.state, exitcode=vm.exitcode, status=vm.status())
    return 0


if __name__ == "__main__":
    sys.exit(main())
