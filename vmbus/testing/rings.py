"""Flat in-process ring pairs and channel pairs: the other side of a ring or
channel under test."""

from __future__ import annotations

from vmbus.channel import DEFAULT_SPIN_SECONDS, Channel
from vmbus.ring import HEADER_SIZE, init_ring
from vmbus.transport import Signal

__all__ = ["channel_pair", "ring_buffer"]


def ring_buffer(data_size: int = 64 * 1024) -> bytearray:
    """A fresh ring in ordinary memory."""
    buffer = bytearray(HEADER_SIZE + data_size)
    init_ring(buffer)
    return buffer


def channel_pair(
    data_size: int = 64 * 1024, spin_seconds: float = DEFAULT_SPIN_SECONDS
) -> tuple[Channel, Channel]:
    """Two connected channel ends in one process: (guest side, host side)."""
    outbound, inbound = ring_buffer(data_size), ring_buffer(data_size)
    to_host, to_guest = Signal(), Signal()
    guest = Channel(outbound, inbound, to_host, to_guest, spin_seconds=spin_seconds)
    host = Channel(inbound, outbound, to_guest, to_host, spin_seconds=spin_seconds)
    return guest, host
