"""What storvsp's compiled path must read afresh: a process-wide count of
changes to the disks it may serve (a LUN added or removed, a disk resized
or closed, a unit attention raised, a protocol started over).

The compiled loop (vsp.storage._fast) keeps what it read of the disks and
the protocol and compares this count, without the GIL, before each batch;
when it moved, it reads everything again. A change anywhere re-reads every
channel's view: changes are rare, a re-read costs a few microseconds.
"""

from __future__ import annotations

from array import array

__all__ = ["COUNT", "changed"]

COUNT = array("Q", [0])  # one u64, read by the compiled loop through its buffer


def changed() -> None:
    """Something the compiled path reads has changed, or is about to."""
    COUNT[0] += 1
