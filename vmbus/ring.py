"""The VMBus ring buffer (Hyper-V layout, docs/protocol.md §1-§2).

Two implementations with one API and one exception class: the Cython ring
(`vmbus._cring`, the default) and the pure-Python reference
(`vmbus._pyring`). Set VMBUS_RING=python to choose the reference, or
VMBUS_RING=cython to insist on the extension.

A ring attaches to any writable buffer of 4096 + data_size bytes (or
4096 + 2 * data_size with `mirrored=True`, when the data area is mapped twice
back to back). One process writes (`RingWriter`), one reads (`RingReader`);
`init_ring` prepares a fresh control page once. Both sides work in two
phases: write or read, then `commit()`, which answers whether the peer must
be signalled; the ring itself never signals.
"""

from __future__ import annotations

import os
from types import ModuleType

from vmbus._ringdefs import (
    DESCRIPTOR_SIZE,
    HEADER_SIZE,
    TRAILER_SIZE,
    RingCorrupt,
    ring_buffer_size,
)
from vmbus._ringpacket import Packet


def _load() -> tuple[ModuleType, str]:
    choice = os.environ.get("VMBUS_RING", "").lower()
    if choice not in ("", "cython", "python"):
        raise ImportError(f"VMBUS_RING must be 'cython' or 'python', not {choice!r}")
    if choice != "python":
        try:
            from vmbus import _cring

            return _cring, "cython"
        except ImportError:
            if choice == "cython":
                raise
    from vmbus import _pyring

    return _pyring, "python"


_impl, IMPLEMENTATION = _load()
RingWriter = _impl.RingWriter
RingReader = _impl.RingReader
init_ring = _impl.init_ring

__all__ = [
    "DESCRIPTOR_SIZE",
    "HEADER_SIZE",
    "IMPLEMENTATION",
    "TRAILER_SIZE",
    "Packet",
    "RingCorrupt",
    "RingReader",
    "RingWriter",
    "init_ring",
    "ring_buffer_size",
]
