"""A learning-switch port that crosses processes: the shared memory both
ends of one port work on, and the port's worker-side end (`SwitchPort`, a
`NetBackend`).

One memfd per port, sealed against resizing (a worker that could shrink it
would turn the parent's accesses into SIGBUS):

    page 0        cells: u64 counters and flags (below)
    ring "up"     the worker writes the frames its guest sends, the switch reads
    ring "down"   the switch writes the frames for this port, the worker reads

Each ring packet is one frame; its trans_id is the frame's length (ring
payloads are padded to 8 bytes). Doorbells: the worker rings the switch
through a socket pair (one byte; a hang-up, EOF, is how the switch learns
the worker died or closed the port); the switch rings the worker through
three eventfds: frames waiting (`fileno`), room again in ring "up"
(`space_fileno`, after the worker asked with pending_send_sz), and a link
change (`link_fileno`).

The worker trusts the parent's cells; the parent validates the worker's
(`SwitchPort` never runs in the parent once handed over, except to be
closed).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vmbus.channel import packet_space
from vmbus.errors import UsageError
from vmbus.handoff import SharedFd
from vmbus.memory import PAGE_SIZE, sealed_memfd
from vmbus.ring import HEADER_SIZE, RingReader, RingWriter, init_ring
from vsp.net.backends import ETH_HLEN, Frame, Sent, _Backend, max_frame

if TYPE_CHECKING:
    from vsp.net.switch import LearningSwitch, _PortEnd

__all__ = ["PortMemory", "SwitchPort", "ring_data_size"]

# Cells in page 0, u64 each. The parent writes these; the worker reads them:
P_LINK = 0  # 1 while the port's link is up
P_WANT = 1  # 1: the parent holds frames for this port; ring it once you have read
# The worker writes these; the parent reads them and checks each one:
W_RECEIVED = 8  # frames read from ring "down"
W_REFUSED = 9  # frames refused before ring "up": malformed, link down, spoofed
W_SPOOFED = 10  # of those, frames with a source address not the port's
W_DROPPED = 11  # frames read from ring "down" while the link was down
W_SENT = 12  # frames written to ring "up"
CELLS = 16
RING_BYTES_CAP = 16 << 20  # a ring's data area at most (jumbo frames: fewer fit)
SCRATCH_CAP = 1 << 20  # a batch read's copy buffer at most
_FENCE = threading.Lock()


def full_fence() -> None:
    """Store->load barrier (x86 TSO lets a load pass an earlier store): the
    lock's atomic instruction drains the store buffer. Each side stores its
    cell, fences, then loads the other's, so one of them sees the other."""
    _FENCE.acquire()
    _FENCE.release()


def ring_data_size(queue_frames: int, mtu: int) -> int:
    """A ring's data area: room for `queue_frames` frames of the largest size
    (and one more), in whole pages, at most RING_BYTES_CAP."""
    need = (queue_frames + 1) * packet_space(max_frame(mtu))
    size = -(-need // PAGE_SIZE) * PAGE_SIZE
    return max(PAGE_SIZE, min(size, RING_BYTES_CAP))


def _round8(n: int) -> int:
    return -(-n // 8) * 8


class PortMemory:
    """The port's memfd, mapped: the cells and the two rings' buffers."""

    def __init__(self, fd: int, data_size: int) -> None:
        self.fd = fd
        self.data_size = data_size
        self.size = PAGE_SIZE + 2 * (HEADER_SIZE + data_size)
        if os.fstat(fd).st_size != self.size:
            raise UsageError(f"a port's memfd is {os.fstat(fd).st_size} bytes, not {self.size}")
        # One mapping each, page-aligned: the rings hold the mmap objects
        # themselves, which the GC never clears under them (a memoryview's
        # buffer it may release while a ring still points into it).
        ring = HEADER_SIZE + data_size
        self.up = mmap.mmap(fd, ring, offset=PAGE_SIZE)
        self.down = mmap.mmap(fd, ring, offset=PAGE_SIZE + ring)
        self._cells_map = mmap.mmap(fd, PAGE_SIZE)
        self.cells = memoryview(self._cells_map).cast("Q")

    @classmethod
    def create(cls, data_size: int) -> PortMemory:
        fd = sealed_memfd("vmbus-switch-port", PAGE_SIZE + 2 * (HEADER_SIZE + data_size))
        try:
            memory = cls(fd, data_size)
        except BaseException:
            os.close(fd)
            raise
        init_ring(memory.up)
        init_ring(memory.down)
        memory.cells[P_LINK] = 1
        return memory

    def close(self) -> None:
        """Unmap (each mapping once no ring holds it) and close the fd."""
        self.cells.release()
        for mapping in (self._cells_map, self.up, self.down):
            with contextlib.suppress(BufferError):  # a ring still holds it: unmapped with it
                mapping.close()
        del self._cells_map, self.up, self.down  # (each mmap holds a dup of the fd till then)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def ring_eventfd(fd: int) -> None:
    if fd < 0:
        return
    # A full counter (a peer filled it) still reads as rung.
    with contextlib.suppress(BlockingIOError):
        os.eventfd_write(fd, 1)


def clear_eventfd(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        os.eventfd_read(fd)


class SwitchPort(_Backend):
    """One port of a `LearningSwitch`, the end a netvsp works: `NetBackend`.

    Made by `LearningSwitch.port()`; pickles (`vmbus.handoff`) into the
    worker process of the VM it serves, where it works the same rings. The
    counters of the switch's side (`held`, `dropped`, `refused`, `spoofed`,
    `stalled`) are read from the switch, in the process that has it."""

    def __init__(
        self,
        switch: LearningSwitch,
        mac: bytes | None,
        memory: PortMemory,
        bells: tuple[int, int, int],
        sock: socket.socket,
    ) -> None:
        super().__init__(mac, switch.mtu, bells[0])
        self.switch: LearningSwitch | None = switch
        self._end: _PortEnd | None = None  # set by the switch
        self._setup(memory, bells[1], bells[2], sock, mac is not None)

    def _setup(
        self, memory: PortMemory, space: int, link: int, sock: socket.socket, pinned: bool
    ) -> None:
        self._memory = memory
        self._space = space
        self._link_bell = link
        self._sock = sock
        self._pinned = (
            pinned  # the MAC was given: frames from any other unicast address are refused
        )
        self._writer = RingWriter(memory.up)
        self._reader = RingReader(memory.down)
        self._frame_space = packet_space(self._max_frame)
        slot = _round8(self._max_frame)
        self._scratch = bytearray(max(slot, min(SCRATCH_CAP, 64 * slot)))
        self._lengths = memoryview(bytearray(4 * 64)).cast("I")
        self._ids = memoryview(bytearray(8 * 64)).cast("Q")

    # --- handing over ---

    def __getstate__(self) -> dict[str, Any]:
        if self._fd < 0:
            raise UsageError("a closed switch port cannot be handed over")
        if self._end is not None:
            self._end.handed = True  # the first word from the worker closes our copy of its socket
        return {
            "mac": self.mac,
            "mtu": self.mtu,
            "pinned": self._pinned,
            "data_size": self._memory.data_size,
            "memory": SharedFd(self._memory.fd),
            "bells": [SharedFd(self._fd), SharedFd(self._space), SharedFd(self._link_bell)],
            "sock": SharedFd(self._sock.fileno()),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        fds = [state["memory"].take(), *(bell.take() for bell in state["bells"])]
        sock_fd = state["sock"].take()
        try:
            memory = PortMemory(fds[0], state["data_size"])
        except BaseException:
            for fd in (*fds, sock_fd):
                os.close(fd)
            raise
        _Backend.__init__(self, state["mac"], state["mtu"], fds[1])
        self.switch, self._end = None, None
        sock = socket.socket(fileno=sock_fd)
        sock.setblocking(False)
        self._setup(memory, fds[2], fds[3], sock, state["pinned"])
        self.link_up = bool(memory.cells[P_LINK])
        self._ring_switch()  # hello: the parent may now close its copy of our socket

    # --- the switch's counters ---

    def _switch_stat(self, name: str) -> Any:
        if self.switch is None or self._end is None:
            return 0
        return getattr(self.switch.port_stats(self._end), name)

    @property
    def drops(self) -> int:
        """Frames lost here, and (in the switch's process) at the switch's end of this port."""
        end = self._end
        return self._drops + (end.dropped if end is not None else 0)

    @drops.setter
    def drops(self, value: int) -> None:
        self._drops = value

    @property
    def held(self) -> int:
        return int(self._switch_stat("held"))

    @property
    def dropped(self) -> int:
        return int(self._switch_stat("dropped"))

    @property
    def refused(self) -> int:
        return int(self._switch_stat("refused"))

    @property
    def spoofed(self) -> int:
        return int(self._switch_stat("spoofed"))

    @property
    def stalled(self) -> bool:
        return self._end is not None and self._end.stalled

    # --- the NetBackend interface ---

    def space_fileno(self) -> int:
        return self._space

    def link_fileno(self) -> int:
        return self._link_bell

    def fast_fd(self) -> int:
        return -1

    def poll_link(self) -> None:
        if self._fd < 0:
            return
        clear_eventfd(self._link_bell)
        up = bool(self._memory.cells[P_LINK])
        if up != self.link_up:
            self.link_up = up
            if not up:
                self._discard()
            self._link_changed(up)

    def _discard(self) -> None:
        """The link went down: the frames waiting in ring "down" are lost (counted)."""
        while self._reader.bytes_available:
            self.receive(64)

    def _ring_switch(self) -> None:
        with contextlib.suppress(BlockingIOError, BrokenPipeError, ConnectionResetError):
            self._sock.send(b"\0")  # a full socket buffer: the switch has a wake-up pending

    def receive(self, max_frames: int) -> list[bytes]:
        if self._fd < 0 or max_frames <= 0:
            return []
        reader, cells = self._reader, self._memory.cells
        count = reader.read_packed(self._scratch, self._lengths[:max_frames], self._ids)
        frames: list[bytes] = []
        if count:
            scratch, pos = self._scratch, 0
            for index in range(count):
                size = self._lengths[index]
                length = min(self._ids[index], size)  # the parent is trusted; still, stay inside
                frames.append(bytes(scratch[pos : pos + length]))
                pos += size
            if reader.commit():
                self._ring_switch()
            cells[W_RECEIVED] += count
            full_fence()  # W_RECEIVED stored before P_WANT is loaded (the switch: the reverse)
            if cells[P_WANT]:
                cells[P_WANT] = 0
                self._ring_switch()
                if self.switch is not None:  # in the switch's process: held senders go on now
                    self.switch.pump()
        if not reader.bytes_available:  # drained: clear the bell, then look once more
            clear_eventfd(self._fd)
            if reader.bytes_available:
                ring_eventfd(self._fd)
        if not cells[P_LINK]:
            cells[W_DROPPED] += len(frames)
            self._drops += len(frames)
            return []
        self.frames_in += len(frames)
        return frames

    def send(self, frames: Sequence[Frame]) -> int:
        """Frames taken into the ring to the switch; never waits (a full ring drops)."""
        sent = self._put(frames, hold=False)
        return sent.taken - sent.refused

    def transmit(self, frames: Sequence[Frame]) -> Sent:
        return self._put(frames, hold=True)

    def _put(self, frames: Sequence[Frame], hold: bool) -> Sent:
        if self._fd < 0 or not self._memory.cells[P_LINK]:
            return self._refuse(len(frames), len(frames), 0)
        clear_eventfd(self._space)  # a wake-up for room is consumed by trying again
        writer, largest, refused, spoofed = self._writer, self._max_frame, 0, 0
        mac = self.mac if self._pinned else None
        taken = written = 0
        for frame in frames:
            size = len(frame)
            if not ETH_HLEN <= size <= largest:
                refused += 1
            elif mac is not None and not frame[6] & 1 and bytes(frame[6:12]) != mac:
                spoofed += 1
            elif not writer.write(frame, trans_id=size):
                if writer.commit():
                    self._ring_switch()
                if not writer.request_space(self._frame_space) or not writer.write(
                    frame, trans_id=size
                ):
                    break
                written += 1
            else:
                written += 1
            taken += 1
        self._memory.cells[W_SENT] += written  # before the commit: the switch never sees more
        if writer.commit():
            self._ring_switch()
        if self.switch is not None:  # in the switch's process: forwarded before we return
            self.switch.pump()
        if not hold and taken < len(frames):  # no waiting: the rest is lost here
            refused += len(frames) - taken
            taken = len(frames)
        self.frames_out += taken - refused - spoofed
        return self._refuse(taken, refused, spoofed)

    def _refuse(self, taken: int, refused: int, spoofed: int = 0) -> Sent:
        """Count `refused` and `spoofed` frames as lost here; both are refusals."""
        if (refused or spoofed) and self._fd >= 0:
            cells = self._memory.cells
            cells[W_REFUSED] += refused
            cells[W_SPOOFED] += spoofed
        self._drops += refused + spoofed
        return Sent(taken, refused + spoofed)

    def set_link(self, up: bool) -> None:
        """Down is a pulled cable: frames to and from this port are dropped
        (those waiting here too) until it is up again. Works from the parent
        after the port was handed to a worker (the worker's copy is told)."""
        if self._fd < 0 or up == self.link_up:
            return
        self._memory.cells[P_LINK] = int(up)
        if self.switch is not None and self._end is not None:
            self.switch._set_link(self._end, up)
        ring_eventfd(self._link_bell)
        self.link_up = up
        if not up and not (self._end is not None and self._end.handed):
            self._discard()  # this copy is the one that reads: drop what waits now
        self._link_changed(up)

    def close(self) -> None:
        if self._fd < 0:
            return
        end, switch = self._end, self.switch
        if switch is not None and end is not None and switch._closed_here(end):
            # In the switch's process: what it sent still goes on, and the
            # switch closes the memory (a husk's everything) once it is drained.
            if not end.handed:
                self._close_here(keep_memory=True)
            return
        self._close_here()

    def _close_here(self, keep_memory: bool = False) -> None:
        """Release this copy's descriptors and (unless kept) its mapping."""
        if self._fd < 0:
            return
        del self._writer, self._reader
        if not keep_memory:
            self._memory.close()
        self._sock.close()
        for fd in (self._fd, self._space, self._link_bell):
            os.close(fd)
        self._fd = self._space = self._link_bell = -1
