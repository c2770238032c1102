"""The hypercall transport between a child partition and the parent:
SynIC-style messages (a 16-byte header and at most 240 bytes of payload)
and signals (eventfds).

`SocketPort` carries messages over a SOCK_SEQPACKET socket and hands over
eventfds with them (SCM_RIGHTS); `LocalPort.pair()` is the in-process
transport for tests and for emulators that embed the library. Anything with
the `MessagePort` shape works: the VMBus server needs nothing else.
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import socket
import struct
import threading
from collections.abc import Sequence
from typing import Protocol

from vmbus.errors import PeerError, VmbusError

# struct hv_message_header (docs/protocol.md §3.1)
SYNIC_HEADER = struct.Struct("<IBBHQ")  # message_type, payload_size, flags, reserved, port
MAX_PAYLOAD = 240
HVMSG_VMBUS = 1  # message type the VMBus control protocol posts under
MAX_FDS = 4  # eventfds handed over with one message; more is a protocol error


class PortClosed(VmbusError):
    """The other side of the port is gone."""


class MalformedMessage(PeerError, ValueError):
    """A transport frame that is not a SynIC message; the receiver drops it."""


class MessagePort(Protocol):
    """What a VMBus endpoint needs to talk to its peer."""

    def post(self, payload: bytes, fds: Sequence[int] = ()) -> None: ...

    def receive(self, timeout: float | None = None) -> tuple[bytes, list[int]] | None: ...

    def fileno(self) -> int: ...

    def close(self) -> None: ...


def frame(payload: bytes) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"message payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return SYNIC_HEADER.pack(HVMSG_VMBUS, len(payload), 0, 0, 0) + payload


def unframe(data: bytes) -> bytes:
    """The payload of one SynIC message, checked against its header."""
    if len(data) < SYNIC_HEADER.size:
        raise MalformedMessage(f"message of {len(data)} bytes is shorter than its header")
    kind, size, _, _, _ = SYNIC_HEADER.unpack_from(data)
    if kind != HVMSG_VMBUS:
        raise MalformedMessage(f"message type {kind} is not a VMBus message")
    if size > MAX_PAYLOAD or size != len(data) - SYNIC_HEADER.size:
        raise MalformedMessage(
            f"header claims {size} payload bytes, frame has {len(data) - SYNIC_HEADER.size}"
        )
    return data[SYNIC_HEADER.size :]


class SocketPort:
    """A MessagePort over a SOCK_SEQPACKET socket (one message per datagram).

    `accept_fds=False` (the parent's side) closes any descriptor the peer
    sends, so a hostile child cannot fill the parent's descriptor table."""

    def __init__(self, sock: socket.socket, *, accept_fds: bool) -> None:
        self.sock = sock
        self.accept_fds = accept_fds

    @classmethod
    def pair(cls) -> tuple[SocketPort, SocketPort]:
        """(parent side, child side)."""
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(a, accept_fds=False), cls(b, accept_fds=True)

    def post(self, payload: bytes, fds: Sequence[int] = ()) -> None:
        try:
            socket.send_fds(self.sock, [frame(payload)], list(fds))
        except (BrokenPipeError, ConnectionResetError) as error:
            raise PortClosed(str(error)) from None

    def receive(self, timeout: float | None = None) -> tuple[bytes, list[int]] | None:
        """One payload and its descriptors; None on timeout. Raises
        PortClosed at EOF and MalformedMessage for a bad frame (dropped)."""
        if timeout is not None and not select.select([self.sock], [], [], timeout)[0]:
            return None
        try:
            data, fds, flags, _ = socket.recv_fds(
                self.sock, SYNIC_HEADER.size + MAX_PAYLOAD + 1, MAX_FDS
            )
        except (ConnectionResetError, OSError) as error:
            raise PortClosed(str(error)) from None
        if not self.accept_fds or flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            for fd in fds:
                os.close(fd)
            fds = []
        if not data and not fds:
            raise PortClosed("peer closed the port")
        if flags & socket.MSG_TRUNC:
            raise MalformedMessage("message longer than a SynIC message")
        try:
            return unframe(data), fds
        except MalformedMessage:
            for fd in fds:
                os.close(fd)
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


class LocalPort:
    """An in-process MessagePort: a queue in each direction and an eventfd
    that is readable while messages wait (for select and asyncio)."""

    def __init__(self) -> None:
        self.inbox: collections.deque[tuple[bytes, list[int]]] = collections.deque()
        self.ready = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_SEMAPHORE)
        self.lock = threading.Lock()
        self.peer: LocalPort | None = None
        self.closed = False

    @classmethod
    def pair(cls) -> tuple[LocalPort, LocalPort]:
        a, b = cls(), cls()
        a.peer, b.peer = b, a
        return a, b

    def post(self, payload: bytes, fds: Sequence[int] = ()) -> None:
        peer = self.peer
        if peer is None or peer.closed or self.closed:
            raise PortClosed("peer closed the port")
        data = frame(payload)  # same limits as the real transport
        with peer.lock:
            peer.inbox.append((unframe(data), [os.dup(fd) for fd in fds]))
        os.eventfd_write(peer.ready, 1)

    def receive(self, timeout: float | None = None) -> tuple[bytes, list[int]] | None:
        try:
            if not select.select([self.ready], [], [], timeout)[0]:
                return None
            os.eventfd_read(self.ready)
        except (OSError, ValueError):  # closed by another thread while we waited
            if self.closed:
                raise PortClosed("port closed") from None
            raise
        with self.lock:
            if self.closed:
                raise PortClosed("port closed")
            if not self.inbox:
                raise PortClosed("peer closed the port")
            return self.inbox.popleft()

    def fileno(self) -> int:
        return self.ready

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.peer is not None and not self.peer.closed:
            os.eventfd_write(self.peer.ready, 1)  # wakes the peer to see EOF
        os.eventfd_write(self.ready, 1)  # and our own receiver, to see the close
        with self.lock:
            for _, fds in self.inbox:
                for fd in fds:
                    os.close(fd)
            self.inbox.clear()
        os.close(self.ready)


class Signal:
    """One direction of a channel's doorbell: an eventfd. Counts what it
    sends, so benchmarks can report signals per packet."""

    def __init__(self, fd: int | None = None) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK) if fd is None else fd
        self.sent = 0

    def set(self) -> None:
        self.sent += 1
        # A full counter (the peer, sharing the eventfd, filled it) still
        # reads as signalled: the doorbell is rung either way.
        with contextlib.suppress(BlockingIOError):
            os.eventfd_write(self.fd, 1)

    def wait(self, timeout: float | None) -> bool:
        """Sleep until signalled (True) or timeout (False); consumes it."""
        if not select.select([self.fd], [], [], timeout)[0]:
            return False
        self.clear()
        return True

    def clear(self) -> None:
        with contextlib.suppress(BlockingIOError):  # not signalled: nothing to clear
            os.eventfd_read(self.fd)

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
