"""storvsc: a block device for child programs, over enlightened SCSI.

`BlockDevice` opens a storage channel (through a `StorageController`), runs
the VSTOR initialization, reads the capacity and the block limits (VPD
0xB0), and then turns reads, writes, flushes and discards into SCSI CDBs
whose data moves by GPA-direct page ranges. `AsyncBlockDevice` is its
asyncio form.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from vmbus.channel import AsyncChannel
from vmbus.errors import UsageError, VmbusError
from vmbus.guest import GuestDevice
from vmbus.protocols import storage as vstor
from vmbus.protocols.storage import scsi_data as d
from vmbus.protocols.storage import scsi_wire as w
from vmbus.protocols.storage.scsi_wire import Opcode
from vsc.storage import _fast
from vsc.storage._fast import GuestBuffer
from vsc.storage.controller import Command, ScsiError, StorageController, _Slot

__all__ = [
    "AsyncBlockDevice",
    "BlockDevice",
    "DiscardLimits",
    "Flush",
    "Read",
    "Request",
    "Write",
]

DataDirection = vstor.DataDirection
MAX_UNMAP_BLOCKS = 0xFFFF_FFFF  # one UNMAP descriptor's NUMBER OF LOGICAL BLOCKS


class Read(NamedTuple):
    """A request of submit_many: fill `buffer` from byte `offset`."""

    offset: int
    buffer: Any


class Write(NamedTuple):
    """A request of submit_many: write `data` at byte `offset`."""

    offset: int
    data: Any
    fua: bool = False


class Flush(NamedTuple):
    """A request of submit_many: SYNCHRONIZE CACHE (the writes acknowledged
    before it was sent are durable once it completes)."""


Request = Read | Write | Flush


@dataclass(frozen=True)
class DiscardLimits:
    """What one UNMAP may carry (VPD 0xB0): blocks in all, and descriptors."""

    max_blocks: int = MAX_UNMAP_BLOCKS
    max_descriptors: int = 1


class BlockDevice:
    """One SCSI disk (a LUN) of the parent's storvsp, seen from a child.
    Give it the GuestDevice (it opens a controller of its own) or a
    StorageController shared with the controller's other LUNs.

    Offsets and lengths are multiples of `block_size`. Data goes one of two
    ways, chosen per buffer:

    - zero copy: a buffer in guest memory, from `buffer(n)` (a GuestBuffer,
      or any slice, memoryview or numpy array of one): the SRB names its
      pages, so the VSP reads or writes it in place;
    - bounce: any other bytes-like object (bytes, bytearray, mmap...): copied
      through one of the controller's bounce slots.

    `read_into(offset, buffer)`, `read(offset, n)`, `write(offset, data)`,
    `flush()`, `discard(offset, n)` run one request (split at the
    controller's max_io_bytes). `submit_many([Read(...), Write(...),
    Flush()])` runs many: every SRB that fits goes out with one commit, the
    completions are reaped in batches, and the result is one entry per
    request, in order (None, or the error it met). `read_many`/`write_many`
    are the same for reads or writes only, raising the first error.
    Requests in one batch may run in any order on the disk. `close()`
    releases the buffers this device handed out."""

    def __init__(
        self, device: GuestDevice | StorageController, *, lun: int = 0, **controller: Any
    ) -> None:
        self._owns_controller = not isinstance(device, StorageController)
        if isinstance(device, StorageController):
            self.controller = device
        else:
            self.controller = StorageController(device, **controller)
        self.lun = lun
        self._buffers: list[GuestBuffer] = []
        self.block_size, self.block_count = self._read_capacity()
        self.discard_limits = self._read_discard_limits()

    @property
    def queue_depth(self) -> int:
        return len(self.controller.slots)

    @property
    def capacity(self) -> int:
        """Size of the disk in bytes."""
        return self.block_size * self.block_count

    def buffer(self, nbytes: int) -> GuestBuffer:
        """A zeroed buffer of `nbytes` in guest memory (whole pages of its
        own) that reads and writes use with no bounce copy. Release it
        (`release()`, `with`) or close this device to give its pages back."""
        buffer = self.controller.buffer(nbytes)
        self._buffers = [b for b in self._buffers if not b.released]
        self._buffers.append(buffer)
        return buffer

    # --- commands ---

    def _command(
        self, cdb: bytes, direction: DataDirection, length: int = 0, data: Any = None
    ) -> Command:
        """A control command through a bounce slot (capacity, VPD, UNMAP)."""
        packet = _fast.build_srb(cdb, self.lun, direction, length, version=self.controller.version)
        return packet, length, -1, data, direction == DataDirection.READ_TYPE, 0

    def _read_capacity(self) -> tuple[int, int]:
        size = d.ReadCapacity16Data.SIZE
        data = bytearray(size)
        cdb = w.ServiceActionIn16Cdb(
            Opcode.SERVICE_ACTION_IN_16, w.SA_READ_CAPACITY_16, 0, size, 0, 0
        ).pack()
        self.controller.run([self._command(cdb, DataDirection.READ_TYPE, size, data)])
        capacity = d.ReadCapacity16Data.unpack(data)
        return capacity.block_size, capacity.last_lba + 1

    def _read_discard_limits(self) -> DiscardLimits:
        """The UNMAP limits of VPD 0xB0; none known if the disk has no such page."""
        size = d.BlockLimitsPage.SIZE
        data = bytearray(size)
        cdb = w.InquiryCdb(Opcode.INQUIRY, w.INQUIRY_EVPD, d.VPD_BLOCK_LIMITS, size, 0).pack()
        try:
            self.controller.run([self._command(cdb, DataDirection.READ_TYPE, size, data)])
        except ScsiError:
            return DiscardLimits()
        page = d.BlockLimitsPage.unpack(data)
        if page.page_code != d.VPD_BLOCK_LIMITS:
            return DiscardLimits()
        # Zero: the disk does not UNMAP. Send it anyway, one descriptor a
        # command, so its own answer (DATA PROTECT...) reaches the caller.
        return DiscardLimits(
            page.max_unmap_lba_count or MAX_UNMAP_BLOCKS,
            page.max_unmap_descriptor_count or 1,
        )

    def _rw(
        self, write: bool, offset: int, buffer: Any, fua: bool, index: int = 0
    ) -> list[Command]:
        """The READ(16)/WRITE(16) SRBs of one request, split at max_io_bytes."""
        c = self.controller
        memory = c.memory_base, c.memory.size
        command = _fast.rw_command(
            buffer, write, fua, offset, self.lun, self.block_size, self.capacity,
            c.max_io_bytes, c.version, *memory, index,
        )  # fmt: skip
        if command is not None:  # the common case: one SRB
            return [command]
        view = memoryview(buffer).cast("B")
        self._blocks(offset, len(view))
        commands = []
        for start in range(0, len(view), c.max_io_bytes):
            chunk = view[start : start + c.max_io_bytes]
            command = _fast.rw_command(
                chunk, write, fua, offset + start, self.lun, self.block_size, self.capacity,
                c.max_io_bytes, c.version, *memory, index,
            )  # fmt: skip
            if command is not None:
                commands.append(command)
        return commands

    def _flush_command(self, index: int = 0) -> Command:
        cdb = w.Rw16Cdb(Opcode.SYNCHRONIZE_CACHE_16, 0, 0, 0, 0, 0).pack()  # all blocks
        packet, length, gpa, data, reading, _ = self._command(cdb, DataDirection.UNKNOWN_TYPE)
        return packet, length, gpa, data, reading, index

    def _blocks(self, offset: int, length: int) -> tuple[int, int]:
        if offset % self.block_size or length % self.block_size or offset < 0:
            raise UsageError(
                f"offset {offset} and length {length} must be multiples of {self.block_size}"
            )
        if offset + length > self.capacity:
            raise UsageError(f"{length} bytes at {offset} run past the disk's {self.capacity}")
        return offset // self.block_size, length // self.block_size

    def _commands(self, requests: Iterable[Request]) -> list[Command]:
        """Every SRB of a batch, checked before any is sent."""
        commands: list[Command] = []
        for index, request in enumerate(requests):
            if isinstance(request, Read):
                commands += self._rw(False, request.offset, request.buffer, False, index)
            elif isinstance(request, Write):
                commands += self._rw(True, request.offset, request.data, request.fua, index)
            elif isinstance(request, Flush):
                commands.append(self._flush_command(index))
            else:
                raise UsageError(f"not a Read, Write or Flush: {request!r}")
        return commands

    # --- the I/O calls ---

    def read_into(self, offset: int, buffer: Any) -> None:
        """Fill `buffer` from byte `offset`."""
        self._one(False, offset, buffer, False)

    def _one(self, write: bool, offset: int, buffer: Any, fua: bool) -> None:
        """One request: in one compiled call when it is one SRB on an idle
        controller (StorageController._run_one), else as `run` does."""
        c = self.controller
        command = _fast.rw_command(
            buffer, write, fua, offset, self.lun, self.block_size, self.capacity,
            c.max_io_bytes, c.version, c.memory_base, c.memory.size, 0,
        )  # fmt: skip
        if command is None or not c._run_one(command, None):
            c.run(self._rw(write, offset, buffer, fua))

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        self.read_into(offset, out)
        return bytes(out)

    def write(self, offset: int, data: Any, *, fua: bool = False) -> None:
        """Write `data` at byte `offset`. With `fua`, the disk acknowledges
        only once the data is on stable storage."""
        self._one(True, offset, data, fua)

    def submit_many(
        self, requests: Iterable[Request], *, depth: int | None = None
    ) -> list[VmbusError | None]:
        """Run a batch of requests, up to `depth` (default and at most the
        queue depth) SRBs in flight, each refilled as one completes; one
        result per request, in order: None, or the ScsiError (or the VSP's
        StorageProtocolError) it met. Misuse (a misaligned offset, a request
        past the end) raises UsageError before anything is sent."""
        requests = list(requests)
        results: list[VmbusError | None] = [None] * len(requests)
        self.controller.run(self._commands(requests), results, depth)
        return results

    def read_many(self, requests: Iterable[tuple[int, Any]], *, depth: int | None = None) -> None:
        """Several reads of (offset, buffer) as one batch (`depth` as for
        submit_many); raises the first error."""
        commands: list[Command] = []
        for offset, buffer in requests:
            commands += self._rw(False, offset, buffer, False)
        self.controller.run(commands, depth=depth)

    def write_many(
        self, requests: Iterable[tuple[int, Any]], *, fua: bool = False, depth: int | None = None
    ) -> None:
        """Several writes of (offset, data) as one batch (`depth` as for
        submit_many); raises the first error. Their ranges should not
        overlap (the disk may run them in any order)."""
        commands: list[Command] = []
        for offset, data in requests:
            commands += self._rw(True, offset, data, fua)
        self.controller.run(commands, depth=depth)

    def flush(self) -> None:
        """Make every acknowledged write durable (SYNCHRONIZE CACHE)."""
        self.controller.run([self._flush_command()])

    def discard(self, offset: int, length: int) -> None:
        """Let the disk drop a block-aligned range; it reads back as zeros.
        Split into UNMAP commands within the limits the disk advertises."""
        lba, blocks = self._blocks(offset, length)
        self.controller.run(self._unmap_commands(lba, blocks))

    def _unmap_commands(self, lba: int, blocks: int) -> Iterator[Command]:
        limits = self.discard_limits
        room = (self.controller.max_io_bytes - d.UnmapHeader.SIZE) // d.UnmapDescriptor.SIZE
        count = max(1, min(limits.max_descriptors, room))  # the list fits one slot
        per_command = min(limits.max_blocks, count * MAX_UNMAP_BLOCKS)
        end = lba + blocks
        for start in range(lba, end, per_command):
            stop = min(start + per_command, end)
            descriptors = b"".join(
                d.UnmapDescriptor(first, min(MAX_UNMAP_BLOCKS, stop - first)).pack()
                for first in range(start, stop, MAX_UNMAP_BLOCKS)
            )
            header = d.UnmapHeader(d.UnmapHeader.SIZE - 2 + len(descriptors), len(descriptors), 0)
            params = header.pack() + descriptors
            cdb = w.UnmapCdb(Opcode.UNMAP, 0, 0, 0, len(params), 0).pack()
            yield self._command(cdb, DataDirection.WRITE_TYPE, len(params), params)

    def close(self) -> None:
        """Release the buffers this device handed out; close the controller,
        if this device opened it."""
        for buffer in self._buffers:
            buffer.release()
        self._buffers = []
        if self._owns_controller:
            self.controller.close()


class AsyncBlockDevice:
    """The asyncio form of a BlockDevice on an unshared controller with one
    channel: each call awaits its SRBs, so many calls run at once (up to the
    queue depth). Buffers from `buffer(n)` move zero copy, as for the
    BlockDevice."""

    def __init__(self, disk: BlockDevice) -> None:
        self.disk = disk
        self.controller = disk.controller
        if len(self.controller.channels) != 1:
            raise UsageError("the asyncio form drives a controller with one channel")
        self.channel = AsyncChannel(self.controller.channel)
        self.slots: asyncio.Queue[_Slot] = asyncio.Queue()
        for slot in self.controller.slots:
            self.slots.put_nowait(slot)

    def buffer(self, nbytes: int) -> GuestBuffer:
        return self.disk.buffer(nbytes)

    async def _run(self, command: Command) -> None:
        slot = await self.slots.get()
        try:
            packet, header, packet_type = self.controller._prepare(command, slot)
            reply = await self.channel.request(packet, header=header, type=packet_type)
            failure = self.controller.finish(command, slot, reply.payload)
            if failure is not None:
                raise failure
        finally:
            self.slots.put_nowait(slot)

    async def _run_all(self, commands: list[Command]) -> None:
        await asyncio.gather(*(self._run(c) for c in commands))

    async def read_into(self, offset: int, buffer: Any) -> None:
        await self._run_all(self.disk._rw(False, offset, buffer, False))

    async def write(self, offset: int, data: Any, *, fua: bool = False) -> None:
        await self._run_all(self.disk._rw(True, offset, data, fua))

    async def flush(self) -> None:
        await self._run(self.disk._flush_command())

    async def submit_many(self, requests: Iterable[Request]) -> list[VmbusError | None]:
        """BlockDevice.submit_many, awaited: one result per request, in order."""
        requests = list(requests)
        commands = self.disk._commands(requests)
        results: list[VmbusError | None] = [None] * len(requests)
        outcomes = await asyncio.gather(*(self._run(c) for c in commands), return_exceptions=True)
        for command, outcome in zip(commands, outcomes, strict=True):
            if isinstance(outcome, VmbusError):
                results[command[5]] = results[command[5]] or outcome
            elif isinstance(outcome, BaseException):
                raise outcome
        return results

    def close(self) -> None:
        self.channel.close()
