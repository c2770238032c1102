"""A child partition's process: `python -m vmbus._child PORT_FD MEMORY_FD
MEMORY_SIZE`, with (sys.path, "module:function", args) pickled on stdin.
Confines itself (vmbus.sandbox.confine_self), connects to the parent's
VMBus, then runs function(guest, *args). If the parent goes away (its end
of the port hangs up), the child exits with EXIT_PARENT_GONE within a
second, whatever it was waiting for."""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from vmbus import sandbox
from vmbus.guest import Guest
from vmbus.memory import GuestMemory
from vmbus.sandbox import ParentGone, confine_self
from vmbus.transport import SocketPort

EXIT_PARENT_GONE = 3
GRACE_SECONDS = 0.5  # for the main thread to unwind before the process ends anyway
PARENT_GONE = "vmbus child: the parent closed our port (it died or dropped us); exiting"


def spawn_child(
    name: str,
    target: str,
    args: Sequence[Any],
    memory: GuestMemory,
    policy: sandbox.Policy,
    path: Sequence[str],
) -> tuple[subprocess.Popen[bytes], SocketPort]:
    """Start a child partition's interpreter (vmbus._child), confined, on
    `memory`: it runs `target(guest, *args)` with `path` as its sys.path.
    The process, and the parent's end of its message port."""
    parent_port, child_port = SocketPort.pair()
    fds = (child_port.fileno(), memory.fileno())
    boot = pickle.dumps((list(path), target, tuple(args)))
    try:
        process = sandbox.spawn(
            [sys.executable, "-m", "vmbus._child", *map(str, fds), str(memory.size)],
            pass_fds=fds,
            name=name,
            policy=policy,
        )
    except BaseException:
        parent_port.close()
        raise
    finally:
        child_port.close()
    assert process.stdin is not None
    process.stdin.write(boot)
    process.stdin.close()
    return process, parent_port


def load_module(name: str) -> ModuleType:
    """Import by module name, or load a script by path (not as __main__, so
    its `if __name__ == "__main__":` block does not run again)."""
    if not name.endswith(".py"):
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location("__vmbus_script__", name)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {name}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _raise_parent_gone(*_: object) -> None:
    raise ParentGone(EXIT_PARENT_GONE)


def _exit_when_the_parent_is_gone(guest: Guest) -> None:
    """Wakes the main thread out of whatever it waits on (an answer, a
    channel's signal) with ParentGone; ends the process if it does not."""
    guest.host_gone.wait()
    print(PARENT_GONE, file=sys.stderr, flush=True)
    signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)
    threading.Event().wait(GRACE_SECONDS)
    os._exit(EXIT_PARENT_GONE)


def main() -> None:
    port_fd, memory_fd, memory_size = map(int, sys.argv[1:4])
    sandbox.lower_priority()  # before any thread, which inherits it
    try:
        confine_self(port_fd)
    except ParentGone as gone:
        print(gone, file=sys.stderr, flush=True)
        sys.exit(EXIT_PARENT_GONE)
    path, target, args = pickle.loads(sys.stdin.buffer.read())
    sys.path[:0] = [entry for entry in path if entry not in sys.path]
    port = SocketPort(socket.socket(fileno=port_fd), accept_fds=True)
    memory = GuestMemory.from_fd(memory_fd, memory_size)
    guest = Guest(port, memory)
    signal.signal(signal.SIGUSR1, _raise_parent_gone)
    watcher = threading.Thread(
        target=_exit_when_the_parent_is_gone, args=(guest,), name="vmbus-parent", daemon=True
    )
    watcher.start()
    try:
        # Connect before importing the target: until the parent serves us,
        # it may not yet be watching for our exit.
        guest.connect()
        module, _, name = target.rpartition(":")
        function: Any = load_module(module)
        for part in name.split("."):
            function = getattr(function, part)
        function(guest, *args)
    except Exception:
        if guest.host_gone.is_set():  # a call that failed for want of a host
            sys.exit(EXIT_PARENT_GONE)
        raise


if __name__ == "__main__":
    main()
