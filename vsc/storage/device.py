"""storvsc: a block device for child programs, over enlightened SCSI.

`BlockDevice` opens a storage channel, runs the VSTOR initialization, reads
the capacity and the block limits (VPD 0xB0), and then turns reads, writes,
flushes and discards into SCSI CDBs, built and read through the declared
structs of scsi_wire and scsi_data, whose data moves by GPA-direct page
ranges. Data goes through bounce
slots in guest memory (the host can only reach guest memory), one slot per
request in flight, up to `queue_depth`.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from vmbus.channel import COMPLETION_REQUESTED, AsyncChannel, wait_any
from vmbus.errors import UsageError, VmbusError
from vmbus.guest import GuestChannel, GuestDevice
from vmbus.memory import PAGE_SIZE
from vmbus.packet import GpaRange, PacketType, encode_gpa_direct_header
from vmbus.protocols import storage as vstor
from vmbus.protocols.storage import scsi_data as d
from vmbus.protocols.storage import scsi_wire as w
from vmbus.protocols.storage.scsi_wire import Opcode

__all__ = [
    "AsyncBlockDevice",
    "BlockDevice",
    "DiscardLimits",
    "ScsiError",
    "StorageController",
]

DataDirection = vstor.DataDirection
DEFAULT_QUEUE_DEPTH = 32
DEFAULT_MAX_IO = 256 * 1024  # bytes per request; larger transfers are split
DEFAULT_RING_SIZE = 128 * 1024  # what Linux's storvsc asks for
TIMEOUT = 30.0
MAX_UNMAP_BLOCKS = 0xFFFF_FFFF  # one UNMAP descriptor's NUMBER OF LOGICAL BLOCKS


class ScsiError(VmbusError, OSError):
    """A SCSI command failed; carries the sense key and codes (0 when the
    controller refused the request before the disk saw it, or sent no sense)."""

    def __init__(self, what: str, completion: vstor.SrbCompletion) -> None:
        size = w.FixedSense.SIZE  # what is missing reads as zero: no sense
        sense = w.FixedSense.unpack(completion.sense[:size].ljust(size, b"\0"))
        self.sense_key = sense.sense_key & 0x0F
        self.asc, self.ascq = sense.asc, sense.ascq
        self.srb_status = completion.srb_status
        self.scsi_status = completion.scsi_status
        super().__init__(
            f"{what} failed: srb_status {self.srb_status:#04x}, scsi_status "
            f"{self.scsi_status:#04x}, sense {self.sense_key:#x}/{self.asc:#04x}/{self.ascq:#04x}"
        )


@dataclass
class _Slot:
    """A bounce buffer in guest memory: contiguous pages, granted per request."""

    pfns: tuple[int, ...]
    view: memoryview
    headers: dict[int, bytes] = field(default_factory=dict)  # by length: the pages never change

    def ranges(self, length: int) -> bytes:
        header = self.headers.get(length)
        if header is None:
            pages = -(-length // PAGE_SIZE)
            header = encode_gpa_direct_header([GpaRange(length, 0, self.pfns[:pages])])
            if len(self.headers) < 64:
                self.headers[length] = header
        return header


@dataclass(frozen=True)
class DiscardLimits:
    """What one UNMAP may carry (VPD 0xB0): blocks in all, and descriptors."""

    max_blocks: int = MAX_UNMAP_BLOCKS
    max_descriptors: int = 1


@dataclass(frozen=True)
class _Command:
    """One SRB: its LUN, the CDB, its data phase, and where its data lives."""

    lun: int
    cdb: bytes
    direction: DataDirection
    length: int = 0
    out: Any = None  # data to send (length bytes)
    into: Any = None  # where received data goes (length bytes)


class StorageController:
    """The guest's storvsc for one SCSI controller: its channels (the primary
    and any sub-channels), the VSTOR initialization, and the bounce slots
    that requests to any of its LUNs share."""

    def __init__(
        self,
        device: GuestDevice,
        *,
        queue_depth: int = DEFAULT_QUEUE_DEPTH,
        max_io_bytes: int = DEFAULT_MAX_IO,
        ring_size: int = DEFAULT_RING_SIZE,
        spin_seconds: float | None = None,
    ) -> None:
        if queue_depth < 1:
            raise UsageError(f"queue_depth must be at least 1, got {queue_depth}")
        self.device, self.ring_size = device, ring_size
        self.spin = {} if spin_seconds is None else {"spin_seconds": spin_seconds}
        self.channels: list[GuestChannel] = [self._open(device)]
        self.protocol = vstor.StorvscProtocol()
        self._initialize()
        assert self.protocol.properties is not None
        limit = self.protocol.properties.max_transfer_bytes // PAGE_SIZE * PAGE_SIZE
        self.max_io_bytes = min(max_io_bytes, limit)
        memory, allocator = device.guest.memory, device.guest.allocator
        self.slots: list[_Slot] = []
        for _ in range(queue_depth):
            pfns = allocator.alloc(self.max_io_bytes // PAGE_SIZE)
            view = memory.view(pfns[0] * PAGE_SIZE, self.max_io_bytes)
            self.slots.append(_Slot(tuple(pfns), view))
        self._next_channel = 0

    @property
    def channel(self) -> GuestChannel:
        return self.channels[0]

    def _open(self, device: GuestDevice) -> GuestChannel:
        userdata = bytes(vstor.STORAGE_CHANNEL_PROPERTIES_BYTES)
        return device.open(self.ring_size, self.ring_size, userdata, **self.spin)

    def _initialize(self) -> None:
        packet: bytes | None = self.protocol.start()
        while packet is not None:
            packet = self.protocol.receive(self._init_request(packet))

    def _init_request(self, packet: bytes) -> memoryview:
        self.channel.send(
            packet, flags=COMPLETION_REQUESTED, trans_id=vstor.VMBUS_RQST_INIT, timeout=TIMEOUT
        )
        return self.channel.wait_completion(vstor.VMBUS_RQST_INIT, TIMEOUT).payload

    def create_sub_channels(self, count: int | None = None, timeout: float = TIMEOUT) -> int:
        """Ask for sub-channels (at most what the VSP allows), wait for their
        offers and open them; requests then spread over all channels."""
        count = min(self.protocol.max_sub_channels, count or self.protocol.max_sub_channels)
        if count < 1:
            return 0
        self.protocol.receive(self._init_request(self.protocol.create_sub_channels(count)))
        guest, primary = self.device.guest, self.device
        deadline = time.monotonic() + timeout
        while True:
            subs = [
                d
                for d in guest.devices.values()
                if d.instance_id == primary.instance_id and d.sub_channel_index
            ]
            if len(subs) >= count:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(subs)} of {count} sub-channel offers arrived")
            time.sleep(0.001)
        self.channels += [self._open(sub) for sub in subs[:count]]
        return count

    def disk(self, lun: int = 0) -> BlockDevice:
        return BlockDevice(self, lun=lun)

    # --- queueing ---

    def run(self, commands: Iterable[_Command]) -> None:
        """Run commands with up to queue_depth in flight over the channels;
        raise the first failure once all that were sent have completed."""
        free = collections.deque(self.slots)
        in_flight: dict[tuple[int, int], tuple[_Command, _Slot]] = {}
        failure: ScsiError | None = None
        pending = iter(commands)
        more = True
        while more or in_flight:
            while more and free:
                command = next(pending, None)
                if command is None:
                    more = False
                    break
                slot = free.popleft()
                in_flight[self._submit(command, slot)] = (command, slot)
            if not in_flight:
                break
            key, completion = self._next_completion(in_flight)
            command, slot = in_flight.pop(key)
            free.append(slot)
            failure = failure or self._finish(command, slot, completion)
        if failure is not None:
            raise failure

    def _submit(self, command: _Command, slot: _Slot) -> tuple[int, int]:
        index = self._next_channel
        self._next_channel = (index + 1) % len(self.channels)
        channel = self.channels[index]
        trans_id = next(channel.ids)
        packet, header, packet_type = self._packet(command, slot)
        channel.send(
            packet,
            type=packet_type,
            flags=COMPLETION_REQUESTED,
            trans_id=trans_id,
            header=header,
            timeout=TIMEOUT,
        )
        return index, trans_id

    def _packet(self, command: _Command, slot: _Slot) -> tuple[bytes, bytes, int]:
        """The SRB packet, its GPA-direct header (the slot's pages) and its
        VMBus packet type; data to write is copied into the slot first."""
        packet = vstor.build_srb(
            command.cdb,
            command.lun,
            command.direction,
            command.length,
            version=self.protocol.version or vstor.VSTOR_VERSION_WIN10,
        )
        if not command.length:
            return packet, b"", PacketType.DATA_INBAND
        if command.out is not None:
            slot.view[: command.length] = command.out
        return packet, slot.ranges(command.length), PacketType.DATA_USING_GPA_DIRECT

    def _next_completion(
        self, in_flight: dict[tuple[int, int], Any]
    ) -> tuple[tuple[int, int], vstor.SrbCompletion]:
        deadline = time.monotonic() + TIMEOUT
        while True:
            for index, channel in enumerate(self.channels):
                while (packet := channel.poll()) is not None:
                    if packet.type == PacketType.COMP:
                        channel.completions[packet.trans_id] = packet
                    # else unsolicited (ENUMERATE_BUS...): nothing to do for a fixed disk
                for trans_id in list(channel.completions):
                    if (index, trans_id) in in_flight:
                        payload = channel.completions.pop(trans_id).payload
                        return (index, trans_id), vstor.parse_completion(payload)
            wait_any(self.channels, max(0.0, deadline - time.monotonic()))

    def _finish(
        self, command: _Command, slot: _Slot, completion: vstor.SrbCompletion
    ) -> ScsiError | None:
        if not completion.succeeded:
            return ScsiError(f"SCSI command {command.cdb[0]:#04x}", completion)
        if command.into is not None:
            command.into[: completion.transferred] = slot.view[: completion.transferred]
        return None

    def close(self) -> None:
        allocator = self.device.guest.allocator
        for slot in self.slots:
            slot.view.release()
            allocator.free(slot.pfns)
        self.slots = []
        for channel in self.channels:
            channel.close()


class BlockDevice:
    """One SCSI disk (a LUN) of the parent's storvsp, seen from a child.
    Give it the GuestDevice (it opens a controller of its own) or a
    StorageController shared with the controller's other LUNs."""

    def __init__(
        self, device: GuestDevice | StorageController, *, lun: int = 0, **controller: Any
    ) -> None:
        self._owns_controller = not isinstance(device, StorageController)
        if isinstance(device, StorageController):
            self.controller = device
        else:
            self.controller = StorageController(device, **controller)
        self.lun = lun
        self.block_size, self.block_count = self._read_capacity()
        self.discard_limits = self._read_discard_limits()

    @property
    def queue_depth(self) -> int:
        return len(self.controller.slots)

    @property
    def capacity(self) -> int:
        """Size of the disk in bytes."""
        return self.block_size * self.block_count

    def _command(
        self,
        cdb: bytes,
        direction: DataDirection,
        length: int = 0,
        out: Any = None,
        into: Any = None,
    ) -> _Command:
        return _Command(self.lun, cdb, direction, length, out, into)

    def _read_capacity(self) -> tuple[int, int]:
        size = d.ReadCapacity16Data.SIZE
        data = bytearray(size)
        cdb = w.ServiceActionIn16Cdb(
            Opcode.SERVICE_ACTION_IN_16, w.SA_READ_CAPACITY_16, 0, size, 0, 0
        ).pack()
        self.controller.run([self._command(cdb, DataDirection.READ_TYPE, size, into=data)])
        capacity = d.ReadCapacity16Data.unpack(data)
        return capacity.block_size, capacity.last_lba + 1

    def _read_discard_limits(self) -> DiscardLimits:
        """The UNMAP limits of VPD 0xB0; none known if the disk has no such page."""
        size = d.BlockLimitsPage.SIZE
        data = bytearray(size)
        cdb = w.InquiryCdb(Opcode.INQUIRY, w.INQUIRY_EVPD, d.VPD_BLOCK_LIMITS, size, 0).pack()
        try:
            self.controller.run([self._command(cdb, DataDirection.READ_TYPE, size, into=data)])
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

    # --- the I/O calls ---

    def read_into(self, offset: int, buffer: Any) -> None:
        """Fill `buffer` from byte `offset` (both block-aligned)."""
        view = memoryview(buffer).cast("B")
        self.controller.run(self._rw(Opcode.READ_16, offset, view, fua=False))

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        self.read_into(offset, out)
        return bytes(out)

    def write(self, offset: int, data: Any, *, fua: bool = False) -> None:
        """Write `data` at byte `offset` (both block-aligned). With `fua`,
        the disk acknowledges only once the data is on stable storage."""
        view = memoryview(data).cast("B")
        self.controller.run(self._rw(Opcode.WRITE_16, offset, view, fua=fua))

    def read_many(self, requests: Iterable[tuple[int, Any]]) -> None:
        """Several reads of (offset, buffer) at once, up to the queue depth."""
        self.controller.run(
            command
            for offset, buffer in requests
            for command in self._rw(Opcode.READ_16, offset, memoryview(buffer).cast("B"), False)
        )

    def write_many(self, requests: Iterable[tuple[int, Any]], *, fua: bool = False) -> None:
        """Several writes of (offset, data) at once, up to the queue depth;
        their ranges should not overlap (the disk may run them in any order)."""
        self.controller.run(
            command
            for offset, data in requests
            for command in self._rw(Opcode.WRITE_16, offset, memoryview(data).cast("B"), fua)
        )

    def flush(self) -> None:
        """Make every acknowledged write durable (SYNCHRONIZE CACHE)."""
        self.controller.run([self._flush_command()])

    def _flush_command(self) -> _Command:
        cdb = w.Rw16Cdb(Opcode.SYNCHRONIZE_CACHE_16, 0, 0, 0, 0, 0).pack()  # all blocks
        return self._command(cdb, DataDirection.UNKNOWN_TYPE)

    def discard(self, offset: int, length: int) -> None:
        """Let the disk drop a block-aligned range; it reads back as zeros.
        Split into UNMAP commands within the limits the disk advertises."""
        lba, blocks = self._blocks(offset, length)
        self.controller.run(self._unmap_commands(lba, blocks))

    def _unmap_commands(self, lba: int, blocks: int) -> Iterator[_Command]:
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
            yield self._command(cdb, DataDirection.WRITE_TYPE, len(params), out=params)

    def _blocks(self, offset: int, length: int) -> tuple[int, int]:
        if offset % self.block_size or length % self.block_size or offset < 0:
            raise UsageError(
                f"offset {offset} and length {length} must be multiples of {self.block_size}"
            )
        if offset + length > self.capacity:
            raise UsageError(f"{length} bytes at {offset} run past the disk's {self.capacity}")
        return offset // self.block_size, length // self.block_size

    def _rw(self, opcode: int, offset: int, view: memoryview, fua: bool) -> Iterator[_Command]:
        lba, _ = self._blocks(offset, len(view))
        reading = opcode == Opcode.READ_16
        direction = DataDirection.READ_TYPE if reading else DataDirection.WRITE_TYPE
        step = self.controller.max_io_bytes
        for start in range(0, len(view), step):
            chunk = view[start : start + step]
            blocks = len(chunk) // self.block_size
            cdb = w.Rw16Cdb(opcode, w.FUA if fua else 0, lba, blocks, 0, 0).pack()
            lba += blocks
            if reading:
                yield self._command(cdb, direction, len(chunk), into=chunk)
            else:
                yield self._command(cdb, direction, len(chunk), out=chunk)

    def close(self) -> None:
        """Close the controller, if this device opened it."""
        if self._owns_controller:
            self.controller.close()


class AsyncBlockDevice:
    """The asyncio form of a BlockDevice on an unshared controller with one
    channel: each call awaits its SRBs, so many calls run at once (up to the
    queue depth)."""

    def __init__(self, disk: BlockDevice) -> None:
        self.disk = disk
        self.controller = disk.controller
        if len(self.controller.channels) != 1:
            raise UsageError("the asyncio form drives a controller with one channel")
        self.channel = AsyncChannel(self.controller.channel)
        self.slots: asyncio.Queue[_Slot] = asyncio.Queue()
        for slot in self.controller.slots:
            self.slots.put_nowait(slot)

    async def _run(self, command: _Command) -> None:
        slot = await self.slots.get()
        try:
            packet, header, packet_type = self.controller._packet(command, slot)
            reply = await self.channel.request(packet, header=header, type=packet_type)
            completion = vstor.parse_completion(reply.payload)
            failure = self.controller._finish(command, slot, completion)
            if failure is not None:
                raise failure
        finally:
            self.slots.put_nowait(slot)

    async def read_into(self, offset: int, buffer: Any) -> None:
        view = memoryview(buffer).cast("B")
        commands = self.disk._rw(Opcode.READ_16, offset, view, fua=False)
        await asyncio.gather(*(self._run(c) for c in commands))

    async def write(self, offset: int, data: Any, *, fua: bool = False) -> None:
        view = memoryview(data).cast("B")
        commands = self.disk._rw(Opcode.WRITE_16, offset, view, fua=fua)
        await asyncio.gather(*(self._run(c) for c in commands))

    async def flush(self) -> None:
        await self._run(self.disk._flush_command())

    def close(self) -> None:
        self.channel.close()
