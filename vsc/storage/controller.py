"""storvsc's controller: the channels of one SCSI controller (the primary
and any sub-channels), the VSTOR initialization, the bounce slots that
requests to any of its LUNs share, the zero-copy buffers it hands out, and
the queue that keeps up to `queue_depth` SRBs in flight.

The steady state is compiled (vsc.storage._fast): an SRB is packed into a
template, a bounce slot's GPA-direct header is built once per length (a
slot's pages never change), data already in guest memory moves with no
bounce copy, and a batch of SRBs is written with one commit (one doorbell
at most) and its completions reaped with one commit per pass. A lone
request on an idle one-channel controller (read_into, write: QD1) is sent,
waited for and reaped in one compiled call (vsc.storage._lone), with the
same spin the general loop's wait would choose.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from vmbus._cring import RingReader as CompiledReader
from vmbus._cring import RingWriter as CompiledWriter
from vmbus.channel import (
    COMPLETION_REQUESTED,
    SPIN_MISSES,
    SPIN_PROBE,
    Channel,
    wait_any,
)
from vmbus.errors import UsageError, VmbusError
from vmbus.guest import GuestChannel, GuestDevice
from vmbus.memory import PAGE_SIZE
from vmbus.packet import PacketType
from vmbus.protocols import storage as vstor
from vmbus.protocols.storage import scsi_wire as w
from vsc.storage import _fast, _lone
from vsc.storage._fast import GuestBuffer

if TYPE_CHECKING:
    from vsc.storage.device import BlockDevice

__all__ = ["ScsiError", "StorageController"]

DEFAULT_QUEUE_DEPTH = 32
DEFAULT_MAX_IO = 256 * 1024  # bytes per request; larger transfers are split
DEFAULT_RING_SIZE = 128 * 1024  # what Linux's storvsc asks for
TIMEOUT = 30.0
INBAND, GPA_DIRECT, COMP = PacketType.DATA_INBAND, PacketType.DATA_USING_GPA_DIRECT, PacketType.COMP
HEADER_CACHE = 64  # lengths of GPA-direct header kept per slot
# Poll mode for large requests: a request takes the VSP about its bytes at
# the backing store's speed, which for 1 MiB from the page cache (~40-70 us
# here) is longer than the channel's spin, and sleeping through it costs a
# cross-core wake-up (~70 us) on each side. So a wait for a large request
# spins for the time such requests take (learnt, in seconds per byte, from
# the spins that saw their completion; one that missed raises it), with a
# margin, up to LONG_SPIN_MAX. Past that (an O_DIRECT disk) sleeping is the
# cheaper: the wait sleeps at once, and spins once in LONG_SPIN_PROBE waits
# to notice when the requests get fast again.
LONG_REQUEST = 64 * 1024  # bytes: smaller ones are left to the channel's own spin
FIRST_SECONDS_PER_BYTE = 1 / 12e9  # the guess before any wait was seen
LONG_SPIN_MARGIN = 1.5
LONG_SPIN_MAX = 150e-6
LONG_SPIN_PROBE = 16
LEARNING_RATE = 0.25
LONG_SPIN_MISSED = 1.25  # a spin that missed: the estimate grows by this
_LONG_SPIN = (
    LONG_REQUEST,
    LONG_SPIN_MAX,
    LONG_SPIN_PROBE,
    LONG_SPIN_MARGIN,
    LEARNING_RATE,
    LONG_SPIN_MISSED,
    TIMEOUT,
)  # for the compiled lone request (vsc.storage._lone.run_lone)

# One SRB to run, a plain tuple (the hot path builds one per request):
# (packet, length, gpa, data, reading, index)
#   packet   the EXECUTE_SRB bytes;
#   length   its data bytes (0: no data phase);
#   gpa      where the data is in guest memory (zero copy), or -1: through a bounce slot;
#   data     bounce: the bytes to send, or the view a read fills;
#            zero copy: a view of the caller's buffer, held while the SRB is in flight;
#   reading  the data phase comes back;
#   index    which of the caller's requests it belongs to (submit_many's results).
Command = tuple[bytes, int, int, Any, bool, int]


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


class _Slot:
    """A bounce buffer in guest memory: contiguous pages, granted per request,
    with its GPA-direct header per transfer length, built once."""

    __slots__ = ("pfns", "view", "gpa", "headers")

    def __init__(self, pfns: Sequence[int], view: memoryview) -> None:
        self.pfns = tuple(pfns)
        self.view = view
        self.gpa = self.pfns[0] * PAGE_SIZE
        self.headers: dict[int, bytes] = {}

    def header(self, length: int) -> bytes:
        header = self.headers.get(length)
        if header is None:
            header = _fast.gpa_header(self.gpa, length)
            if len(self.headers) < HEADER_CACHE:
                self.headers[length] = header
        return header


class StorageController:
    """The guest's storvsc for one SCSI controller; see the module doc."""

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
        self.version = self.protocol.version or vstor.VSTOR_VERSION_WIN10
        limit = self.protocol.properties.max_transfer_bytes // PAGE_SIZE * PAGE_SIZE
        self.max_io_bytes = min(max_io_bytes, limit)
        self.memory, self.allocator = device.guest.memory, device.guest.allocator
        whole = self.memory.view(0, self.memory.size)
        self.memory_base = _fast.address_of(whole)  # the mapping never moves while open
        whole.release()
        self.slots: list[_Slot] = []
        for _ in range(queue_depth):
            pfns = self.allocator.alloc(self.max_io_bytes // PAGE_SIZE)
            self.slots.append(_Slot(pfns, self.memory.view(pfns[0] * PAGE_SIZE, self.max_io_bytes)))
        self._free = list(self.slots)
        self._in_flight: list[dict[int, tuple[Command, _Slot]]] = [{}]
        self._buffers: set[GuestBuffer] = set()
        self._next_channel = 0
        self._seconds_per_byte = FIRST_SECONDS_PER_BYTE  # how long large requests take
        self._long_waits = 0
        self._multi_misses = 0  # spins over several channels in a row that found nothing
        self._multi_waits = 0

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
        self._in_flight += [{} for _ in subs[:count]]
        return count

    def disk(self, lun: int = 0) -> BlockDevice:
        from vsc.storage.device import BlockDevice  # the device module builds on this one

        return BlockDevice(self, lun=lun)

    # --- zero-copy buffers ---

    def buffer(self, nbytes: int) -> GuestBuffer:
        """`nbytes` of zeroed guest memory of our own (whole pages), for I/O
        with no bounce copy; see GuestBuffer."""
        if nbytes < 1:
            raise UsageError(f"a buffer holds at least one byte, not {nbytes}")
        pages = -(-nbytes // PAGE_SIZE)
        pfns = self.allocator.alloc(pages)
        view = self.memory.view(pfns[0] * PAGE_SIZE, pages * PAGE_SIZE)
        view[:] = bytes(len(view))  # pages come back dirty from a released buffer
        buffer = GuestBuffer(view, pfns, pfns[0] * PAGE_SIZE, nbytes, self._buffer_freed)
        self._buffers.add(buffer)
        return buffer

    def _buffer_freed(self, buffer: GuestBuffer) -> None:
        self._buffers.discard(buffer)
        self.allocator.free(buffer.pfns)

    def span(self, buffer: Any, reading: bool) -> tuple[int, int]:
        """(gpa, nbytes) of a buffer inside our guest memory; gpa -1 if not."""
        return _fast.guest_span(buffer, self.memory_base, self.memory.size, reading)

    # --- queueing ---

    def run(
        self,
        commands: Iterable[Command],
        results: list[VmbusError | None] | None = None,
        depth: int | None = None,
    ) -> None:
        """Run commands with up to `depth` (at most queue_depth) in flight
        over the channels, each refilled as soon as its completion is read.
        Each pass writes all it can with one commit per channel, then reaps
        every completion there is. Without `results`, raise the first failure
        once all that were sent have completed; with it, record each one at
        its command's index (the first failure of that request)."""
        if depth is not None and depth < 1:
            raise UsageError(f"depth must be at least 1, got {depth}")
        if type(commands) is list and len(commands) == 1 and self._run_one(commands[0], results):
            return
        pending = iter(commands)
        spare = 0 if depth is None else max(0, len(self.slots) - depth)  # slots left idle
        failures: list[tuple[int, VmbusError]] = []
        flights, more = self._in_flight, True
        stalled: Command | None = None
        deadline: float | None = None  # set when a wait begins, cleared by progress
        while more or any(flights):
            if more and len(self._free) > spare:
                stalled, more = self._submit(pending, stalled, spare)
            if self._reap(failures):
                deadline = None
            elif any(flights):
                if deadline is None:
                    deadline = time.monotonic() + TIMEOUT
                self._wait(deadline)
        if results is None:
            if failures:
                raise failures[0][1]
            return
        for index, failure in failures:
            results[index] = results[index] or failure

    def _run_one(self, command: Command, results: list[VmbusError | None] | None) -> bool:
        """One command on an idle controller of one compiled channel: sent,
        waited for (with the waits `_wait` would do: the channel's adaptive
        spin, or the learnt long spin) and reaped in one compiled call
        (vsc.storage._lone.run_lone). False (nothing sent) where that does
        not apply: the general loop runs it."""
        if len(self.channels) != 1 or self._in_flight[0] or not self._free:
            return False
        channel = self.channels[0]
        if channel.backlog or type(channel).wait is not Channel.wait:
            return False  # a channel whose waiting does something else (a test's pump)
        writer, reader = channel.writer, channel.reader
        if not isinstance(writer, CompiledWriter) or not isinstance(reader, CompiledReader):
            return False
        try:
            return _lone.run_lone(self, channel, writer, reader, command, results, _LONG_SPIN)
        finally:
            del writer, reader  # a raised error's traceback must not pin the rings

    def _submit(
        self, pending: Iterator[Command], stalled: Command | None, spare: int = 0
    ) -> tuple[Command | None, bool]:
        """Write commands while more than `spare` slots are free; commit each
        channel once.
        Returns (a command the ring had no room for, whether more may follow)."""
        channels, free, flights = self.channels, self._free, self._in_flight
        if all(isinstance(c.writer, CompiledWriter) for c in channels):
            # Compiled: each channel in turn takes an even share of the free
            # slots, written in one call and committed once.
            count, written, more = len(channels), 0, True
            for turn in range(count):
                room = len(free) - spare
                if room <= 0:
                    break
                index = self._next_channel
                self._next_channel = (index + 1) % count
                channel = channels[index]
                share = -(-room // (count - turn))
                stalled, more, wrote = _fast.submit(
                    channel.writer, pending, stalled, flights[index], free, len(free) - share,
                    channel.ids,
                )  # fmt: skip
                channel.packets_sent += wrote
                written += wrote
                if wrote:
                    channel.flush()
                if stalled is not None or not more:
                    break
            if written or any(flights) or stalled is None:
                return stalled, more
            # A full ring and nothing in flight: the loop below waits for room.
        written = 0
        more = True
        while len(free) > spare:
            command = stalled if stalled is not None else next(pending, None)
            stalled = None
            if command is None:
                more = False
                break
            index = self._next_channel
            self._next_channel = (index + 1) % len(channels)
            channel, slot = channels[index], free.pop()
            packet, header, packet_type = self._prepare(command, slot)
            trans_id = next(channel.ids)
            if not channel.writer.write(
                packet, packet_type, COMPLETION_REQUESTED, trans_id, header
            ):
                if written or any(flights):
                    free.append(slot)  # room comes back as completions are read
                    stalled = command
                    break
                channel.send(  # nothing in flight: wait for the VSP to make room
                    packet,
                    type=packet_type,
                    flags=COMPLETION_REQUESTED,
                    trans_id=trans_id,
                    header=header,
                    timeout=TIMEOUT,
                )
            else:
                channel.packets_sent += 1
                written += 1
            flights[index][trans_id] = (command, slot)
        for channel in channels:
            channel.flush()
        return stalled, more

    def _prepare(self, command: Command, slot: _Slot) -> tuple[bytes, bytes, int]:
        """The SRB, its GPA-direct header and its VMBus packet type; data to
        write through a bounce slot is copied into it first."""
        packet, length, gpa, data, reading, _ = command
        if not length:
            return packet, b"", INBAND
        if gpa >= 0:
            return packet, _fast.gpa_header(gpa, length), GPA_DIRECT
        if not reading:
            _fast.copy(slot.view, data, length)
        return packet, slot.header(length), GPA_DIRECT

    def _reap(self, failures: list[tuple[int, VmbusError]]) -> int:
        """Handle every completion the channels hold; one commit each."""
        done = 0
        for channel, flight in zip(self.channels, self._in_flight, strict=True):
            if not flight:
                continue
            reader = channel.reader
            if isinstance(reader, CompiledReader):
                done += _fast.reap(reader, flight, self._free, failures, self.finish)
                reader = None
            while reader is not None and (packet := reader.read()) is not None:
                if packet.type != COMP:
                    continue  # unsolicited (ENUMERATE_BUS...): nothing to do for a fixed disk
                entry = flight.pop(packet.trans_id, None)
                if entry is None:
                    continue  # no request of ours
                command, slot = entry
                self._free.append(slot)
                done += 1
                failure = self.finish(command, slot, packet.data[packet.offset8 * 8 :])
                if failure is not None:
                    failures.append((command[5], failure))
            if channel.reader.commit():
                channel.notify_peer.set()
        return done

    def finish(self, command: Command, slot: _Slot, payload: Any) -> VmbusError | None:
        """Read a completion once; copy a bounce read out of its slot."""
        transferred = _fast.completed(payload)
        if transferred < 0:
            try:
                completion = _fast.parse_completion(payload)
            except vstor.StorageProtocolError as error:
                return error
            return ScsiError(f"SCSI command {command[0][28]:#04x}", completion)
        packet, length, gpa, data, reading, _ = command
        if gpa < 0 and reading:  # a VSP's claim past the buffer moves nothing more
            _fast.copy(data, slot.view, min(transferred, length))
        return None

    def _wait(self, deadline: float) -> None:
        channels = [c for c, flight in zip(self.channels, self._in_flight, strict=True) if flight]
        largest = self._largest_in_flight()
        if largest >= LONG_REQUEST and self._spin_long(channels, largest):
            return
        if len(channels) == 1:
            channels[0].wait(deadline)
        else:
            self._wait_any(channels, deadline)

    def _wait_any(self, channels: list[GuestChannel], deadline: float) -> None:
        """wait_any with the adaptive poll mode a lone channel's wait has:
        after SPIN_MISSES spins in a row that found nothing, spin on one
        wait in SPIN_PROBE (a spin that does not pay takes a core from the
        VSP's channel threads)."""
        self._multi_waits += 1
        if self._multi_misses < SPIN_MISSES or self._multi_waits % SPIN_PROBE == 0:
            readers = [c.reader for c in channels]
            end = time.perf_counter() + min(c.spin_seconds for c in channels)
            while time.perf_counter() < end:
                for reader in readers:
                    if reader.bytes_available:
                        self._multi_misses = 0
                        return
            self._multi_misses += 1
        spins = [c.spin_seconds for c in channels]
        try:
            for channel in channels:
                channel.spin_seconds = 0.0  # spun above, or not worth it: sleep at once
            wait_any(channels, max(0.0, deadline - time.monotonic()))
        finally:
            for channel, spin in zip(channels, spins, strict=True):
                channel.spin_seconds = spin

    def _largest_in_flight(self) -> int:
        """The bytes of the largest request in flight; 0 for a deep queue
        (completions come often then: the channel's own spin covers it)."""
        largest = 0
        for flight in self._in_flight:
            if len(flight) > 8:
                return 0
            for command, _ in flight.values():
                largest = max(largest, command[1])
        return largest

    def _spin_long(self, channels: list[GuestChannel], largest: int) -> bool:
        """Spin for the time a request of `largest` bytes takes (see
        LONG_REQUEST); True if a completion came meanwhile."""
        spin = max(c.spin_seconds for c in channels)
        expected = largest * self._seconds_per_byte
        self._long_waits += 1
        if not spin or (expected > LONG_SPIN_MAX and self._long_waits % LONG_SPIN_PROBE):
            return False  # interrupt-driven, or a slow disk: sleep
        start = time.perf_counter()
        end = start + min(max(expected * LONG_SPIN_MARGIN, spin), LONG_SPIN_MAX)
        readers = [c.reader for c in channels]
        now = start
        while now < end:
            for reader in readers:
                if reader.bytes_available:
                    observed = (now - start) / largest
                    self._seconds_per_byte += (observed - self._seconds_per_byte) * LEARNING_RATE
                    return True
            now = time.perf_counter()
        # It takes longer than that; past twice the cap the size of the
        # estimate no longer matters (only the probes spin), so it stops there.
        ceiling = 2 * LONG_SPIN_MAX / largest
        self._seconds_per_byte = min(self._seconds_per_byte * LONG_SPIN_MISSED, ceiling)
        return False

    def close(self) -> None:
        """Close the channels; give back the slots and every buffer (a
        buffer with views still alive goes when the last one does)."""
        for buffer in list(self._buffers):
            buffer.release()
        for slot in self.slots:
            slot.view.release()
            self.allocator.free(slot.pfns)
        self.slots, self._free = [], []
        for channel in self.channels:
            channel.close()
