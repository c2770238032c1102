"""The packet a ring reader hands out: a descriptor's fields plus a view."""

from __future__ import annotations

from vmbus._ringdefs import DESCRIPTOR_SIZE


class Packet:
    """One packet read off a ring. `data` is the whole packet from its
    descriptor to its padding (len8 * 8 bytes), usually a view into the
    ring itself: it is valid until the reader commits."""

    __slots__ = ("type", "flags", "trans_id", "offset8", "data")

    def __init__(self, type: int, flags: int, trans_id: int, offset8: int, data: memoryview):
        self.type = type
        self.flags = flags
        self.trans_id = trans_id
        self.offset8 = offset8
        self.data = data

    @property
    def header(self) -> memoryview:
        """The type-specific header between the descriptor and the payload."""
        return self.data[DESCRIPTOR_SIZE : self.offset8 * 8]

    @property
    def payload(self) -> memoryview:
        """The payload, with the zero padding that rounds it to 8 bytes."""
        return self.data[self.offset8 * 8 :]

    def __repr__(self) -> str:
        return (
            f"Packet(type={self.type:#x}, flags={self.flags:#x}, trans_id={self.trans_id:#x}, "
            f"offset8={self.offset8}, len={len(self.data)})"
        )
