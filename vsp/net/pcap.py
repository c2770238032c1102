"""A backend wrapper that captures what passes to a pcap file."""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Sequence
from typing import Any, BinaryIO

from vmbus.handoff import SharedFd
from vsp.net.backends import Frame, LinkCallback, NetBackend, Sent, _Closing

__all__ = ["PCAP_MAGIC", "PcapCapture"]

PCAP_MAGIC = 0xA1B2C3D4  # classic libpcap, microsecond timestamps
LINKTYPE_ETHERNET = 1
PCAP_SNAPLEN = 65535  # a whole frame at any MTU up to MAX_MTU
_PCAP_HEADER = struct.Struct("<IHHiIII")  # magic, version 2.4, zone, sigfigs, snaplen, linktype
_PCAP_RECORD = struct.Struct("<IIII")  # seconds, microseconds, captured length, frame length


def _delegated(name: str) -> Any:
    """A property for the wrapped backend's attribute."""

    def get(self: PcapCapture) -> Any:
        return getattr(self.inner, name)

    def put(self: PcapCapture, value: Any) -> None:
        setattr(self.inner, name, value)

    return property(get, put)


class PcapCapture(_Closing):
    """Wraps a backend and writes each frame offered to `send` (including any
    the medium then drops) and each frame `receive` returns to a pcap file.
    Owns the inner backend: `close()` flushes the file and closes both."""

    def __init__(self, inner: NetBackend, path: str | os.PathLike[str]) -> None:
        self.inner = inner
        self._file: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._file.write(_PCAP_HEADER.pack(PCAP_MAGIC, 2, 4, 0, 0, PCAP_SNAPLEN, LINKTYPE_ETHERNET))

    def _record(self, frame: Frame) -> None:
        seconds, microseconds = divmod(time.time_ns() // 1000, 1_000_000)
        data = bytes(frame[:PCAP_SNAPLEN])
        self._file.write(_PCAP_RECORD.pack(seconds, microseconds, len(data), len(frame)))
        self._file.write(data)

    on_link_change: LinkCallback | None = _delegated("on_link_change")
    mac: bytes | None = _delegated("mac")
    mtu: int = _delegated("mtu")
    link_up: bool = _delegated("link_up")
    frames_in: int = _delegated("frames_in")
    frames_out: int = _delegated("frames_out")
    drops: int = _delegated("drops")

    def __getstate__(self) -> dict[str, Any]:
        """The capture file crosses open (a SharedFd), flushed first: the
        worker's copy writes on at the same offset."""
        self._file.flush()
        return {"inner": self.inner, "file": SharedFd(self._file.fileno())}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.inner = state["inner"]
        self._file = os.fdopen(state["file"].take(), "wb")

    def fileno(self) -> int:
        return self.inner.fileno()

    def link_fileno(self) -> int:
        return self.inner.link_fileno()

    def poll_link(self) -> None:
        self.inner.poll_link()

    def fast_fd(self) -> int:
        return -1  # every frame passes through the capture

    def receive(self, max_frames: int) -> list[bytes]:
        frames = self.inner.receive(max_frames)
        for frame in frames:
            self._record(frame)
        return frames

    def send(self, frames: Sequence[Frame]) -> int:
        for frame in frames:
            self._record(frame)
        return self.inner.send(frames)

    def transmit(self, frames: Sequence[Frame]) -> Sent:
        sent = self.inner.transmit(frames)
        for frame in frames[: sent.taken]:  # the rest is offered again later
            self._record(frame)
        return sent

    def space_fileno(self) -> int:
        return self.inner.space_fileno()

    def set_link(self, up: bool) -> None:
        self.inner.set_link(up)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.inner.close()
