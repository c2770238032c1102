"""A child partition's process: `python -m vmbus._child PORT_FD MEMORY_FD
MEMORY_SIZE`, with (sys.path, "module:function", args) pickled on stdin.
Connects to the parent's VMBus, then runs function(guest, *args)."""

from __future__ import annotations

import importlib
import importlib.util
import pickle
import socket
import sys
from types import ModuleType
from typing import Any

from vmbus.guest import Guest
from vmbus.memory import GuestMemory
from vmbus.transport import SocketPort


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


def main() -> None:
    port_fd, memory_fd, memory_size = map(int, sys.argv[1:4])
    path, target, args = pickle.loads(sys.stdin.buffer.read())
    sys.path[:0] = [entry for entry in path if entry not in sys.path]
    module, _, name = target.rpartition(":")
    function: Any = load_module(module)
    for part in name.split("."):
        function = getattr(function, part)
    port = SocketPort(socket.socket(fileno=port_fd), accept_fds=True)
    memory = GuestMemory.from_fd(memory_fd, memory_size)
    guest = Guest(port, memory)
    guest.connect()
    function(guest, *args)


if __name__ == "__main__":
    main()
