"""Handing devices to a VM's worker process: pickling with descriptors.

A `Vsp` given to `Host.start` is built in the parent and served in the VM's
worker process (VMWP). It crosses as a pickle that may carry open
descriptors: an object puts `SharedFd(fd)` in the state it pickles for each
descriptor the worker must share with the parent (a disk file, a TAP
device, a memfd of shared state, the worker's end of a socket pair), and
finds a `SharedFd` with the worker's own copy of that descriptor in its
`__setstate__`. The descriptors travel beside the bytes, over a unix socket
(SCM_RIGHTS); the pickle only holds their positions.

Only the parent pickles (its devices, for its own workers). A worker's
answers to the parent are JSON, never pickles: the parent does not trust a
process that parses a guest's bytes with code execution.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

__all__ = ["SharedFd", "dumps", "loads"]


class SharedFd:
    """An open descriptor inside a pickled object. In the parent it borrows
    `fd` (the pickling does not close it); in the worker, `fd` is a fresh
    descriptor that belongs to the object that unpickled it."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def take(self) -> int:
        """The descriptor, once: the caller now owns it."""
        fd, self.fd = self.fd, -1
        return fd

    def __repr__(self) -> str:
        return f"SharedFd({self.fd})"


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.fds: list[int] = []

    def persistent_id(self, obj: Any) -> int | None:
        if isinstance(obj, SharedFd):
            if obj.fd < 0:
                raise ValueError("a SharedFd that was already taken cannot be handed on")
            self.fds.append(obj.fd)
            return len(self.fds) - 1
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, fds: list[int]) -> None:
        super().__init__(file)
        self.fds = fds
        self.used: set[int] = set()

    def persistent_load(self, pid: Any) -> SharedFd:
        if not isinstance(pid, int) or not 0 <= pid < len(self.fds) or pid in self.used:
            raise pickle.UnpicklingError(f"no descriptor {pid!r} came with the pickle")
        self.used.add(pid)
        return SharedFd(self.fds[pid])


def dumps(obj: object) -> tuple[bytes, list[int]]:
    """`obj` pickled, and the descriptors its `SharedFd`s name, in order."""
    buffer = io.BytesIO()
    pickler = _Pickler(buffer)
    pickler.dump(obj)
    return buffer.getvalue(), pickler.fds


def loads(data: bytes, fds: list[int]) -> Any:
    """The object `dumps` pickled, with `fds` (received beside it) in place
    of its descriptors. A descriptor no `SharedFd` claimed is closed, and
    all of them are if the pickle is bad."""
    unpickler = _Unpickler(io.BytesIO(data), fds)
    try:
        obj = unpickler.load()
    except BaseException:
        unpickler.used.clear()  # nothing was handed over whole: close them all
        raise
    finally:
        for index, fd in enumerate(fds):
            if index not in unpickler.used:
                os.close(fd)
    return obj
