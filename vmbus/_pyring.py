"""Pure-Python reference ring: the same API and exceptions as the Cython ring
(`vmbus._cring`), written for clarity. It is the differential oracle of the
ring tests and the fallback where the extension is not built.

Assumptions: x86-64 (TSO) shared memory. CPython has no fence primitive, so
release/acquire order comes from TSO: each index store follows the data
stores in program order, and struct/memoryview accesses are not reordered by
the interpreter. TSO does let a store pass a later load, which would lose
wake-ups; where the Cython ring has a full fence, this one takes and drops a
lock, whose locked instruction is a full barrier on x86.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Sequence
from typing import Any, Literal

from vmbus._ringdefs import (
    ALIGNMENT,
    DESCRIPTOR_SIZE,
    FEAT_PENDING_SEND_SZ,
    FEATURE_BITS_OFFSET,
    HEADER_SIZE,
    INTERRUPT_MASK_OFFSET,
    KNOWN_FLAGS,
    MAX_PACKET_TYPE,
    MIN_OFFSET8,
    MIN_PACKET_TYPE,
    PENDING_SEND_SZ_OFFSET,
    READ_INDEX_OFFSET,
    TRAILER_SIZE,
    VM_PKT_DATA_INBAND,
    WRITE_INDEX_OFFSET,
    RingCorrupt,
    data_size_of,
)
from vmbus._ringpacket import Packet

_U32 = struct.Struct("<I")
_DESC = struct.Struct("<HHHHQ")
_TRAILER = struct.Struct("<Q")
_U64_MASK = (1 << 64) - 1
_FENCE = threading.Lock()


def _full_fence() -> None:
    """Store->load barrier: the lock's atomic instruction drains the store buffer."""
    _FENCE.acquire()
    _FENCE.release()


def _as_array(buffer: Any, code: Literal["I", "Q"], name: str) -> memoryview:
    raw = memoryview(buffer).cast("B")
    item = struct.calcsize(code)
    if len(raw) % item:
        raise ValueError(
            f"{name} buffer of {len(raw)} bytes is not a whole number of {item}-byte items"
        )
    return raw.cast(code)


def init_ring(buffer: Any, *, pending_send_sz: bool = True) -> None:
    """Zero a ring's control page; advertise the pending_send_sz feature.
    Done once, by whoever allocates the ring, before either side attaches."""
    view = memoryview(buffer).cast("B")
    if len(view) < HEADER_SIZE:
        raise ValueError(f"ring buffer of {len(view)} bytes has no room for the header")
    view[: FEATURE_BITS_OFFSET + 4] = bytes(FEATURE_BITS_OFFSET + 4)
    _U32.pack_into(view, FEATURE_BITS_OFFSET, FEAT_PENDING_SEND_SZ if pending_send_sz else 0)


class _RingSide:
    """What the writer and the reader share: the buffer and index checks."""

    def __init__(self, buffer: Any, mirrored: bool) -> None:
        view = memoryview(buffer).cast("B")
        if view.readonly:
            raise ValueError("ring buffer must be writable")
        self._view = view
        self._dsize = data_size_of(len(view), mirrored)
        self._mirrored = mirrored
        self._data = view[HEADER_SIZE:]
        # The control fields through a u32 view: each access is one aligned
        # 4-byte load or store. struct.pack_into is not: it zeroes the
        # destination before writing, so a peer could read a 0 in between.
        self._control = view[:HEADER_SIZE].cast("I")

    @property
    def data_size(self) -> int:
        return self._dsize

    def _load_index(self, offset: int, name: str) -> int:
        value: int = self._control[offset // 4]
        if value >= self._dsize or value % ALIGNMENT:
            raise RingCorrupt(f"{name} {value} is not an 8-aligned offset below {self._dsize}")
        return value

    def _copy_out(self, pos: int, n: int) -> bytes | memoryview:
        """n bytes starting at data offset pos, following the wrap."""
        end = pos + n
        if end <= self._dsize or self._mirrored:
            return self._data[pos:end]
        return bytes(self._data[pos:]) + bytes(self._data[: end - self._dsize])

    def _copy_in(self, pos: int, src: bytes | memoryview) -> int:
        n = len(src)
        first = min(n, self._dsize - pos)
        self._data[pos : pos + first] = src[:first]
        if first < n:
            self._data[: n - first] = src[first:]
        return (pos + n) % self._dsize


class RingWriter(_RingSide):
    """The producer end of one ring. Write packets, then `commit()`."""

    def __init__(self, buffer: Any, *, mirrored: bool = False) -> None:
        super().__init__(buffer, mirrored)
        self._published = self._load_index(WRITE_INDEX_OFFSET, "write_index")
        self._load_index(READ_INDEX_OFFSET, "read_index")
        self._write = self._published

    @property
    def pending_bytes(self) -> int:
        """Bytes written but not yet committed."""
        return (self._write - self._published) % self._dsize

    @property
    def free_bytes(self) -> int:
        read = self._load_index(READ_INDEX_OFFSET, "read_index")
        return self._dsize - (self._write - read) % self._dsize

    def max_payload(self, header_len: int = 0) -> int:
        """Largest payload a packet with this header can ever carry here."""
        return self._dsize - ALIGNMENT - TRAILER_SIZE - DESCRIPTOR_SIZE - header_len

    def write(
        self,
        payload: Any,
        type: int = VM_PKT_DATA_INBAND,
        flags: int = 0,
        trans_id: int = 0,
        header: Any = b"",
    ) -> bool:
        """Append one packet; False (nothing written) if the ring is full."""
        return self._write_one(memoryview(payload).cast("B"), type, flags, trans_id, header)

    def write_batch(
        self,
        payloads: Sequence[Any],
        type: int = VM_PKT_DATA_INBAND,
        flags: int = 0,
        trans_id: int = 0,
    ) -> int:
        """Append packets in order until one does not fit; packet i carries
        trans_id + i. Returns how many were written."""
        for i, payload in enumerate(payloads):
            tid = (trans_id + i) & _U64_MASK
            if not self._write_one(memoryview(payload).cast("B"), type, flags, tid, b""):
                return i
        return len(payloads)

    def write_packed(
        self,
        data: Any,
        lengths: Any,
        type: int = VM_PKT_DATA_INBAND,
        flags: int = 0,
        trans_id: int = 0,
    ) -> int:
        """Like write_batch, with the payloads back to back in `data` and
        their sizes in `lengths` (a uint32 buffer)."""
        _check_packet_fields(type, flags, trans_id, 0)
        view = memoryview(data).cast("B")
        sizes = _as_array(lengths, "I", "lengths")
        for size in sizes:
            self._check_fits(size, 0)
        total = sum(sizes)
        if total > len(view):
            raise ValueError(f"lengths add up to {total} bytes, data has {len(view)}")
        pos = 0
        for i, size in enumerate(sizes):
            tid = (trans_id + i) & _U64_MASK
            if not self._write_one(view[pos : pos + size], type, flags, tid, b""):
                return i
            pos += size
        return len(sizes)

    def _check_fits(self, size: int, header_len: int) -> None:
        if size > self.max_payload(header_len):
            raise ValueError(f"payload of {size} bytes can never fit a ring of {self._dsize} bytes")

    def _write_one(
        self, payload: memoryview, type: int, flags: int, trans_id: int, header: Any
    ) -> bool:
        header = memoryview(header).cast("B")
        _check_packet_fields(type, flags, trans_id, len(header))
        offset = DESCRIPTOR_SIZE + len(header)
        length = offset + len(payload)
        padded = -(-length // ALIGNMENT) * ALIGNMENT
        total = padded + TRAILER_SIZE
        self._check_fits(len(payload), len(header))
        if self.free_bytes <= total:  # strictly more free space than the packet
            return False
        start = self._write
        pos = self._copy_in(start, _DESC.pack(type, offset // 8, padded // 8, flags, trans_id))
        pos = self._copy_in(pos, header)
        pos = self._copy_in(pos, payload)
        pos = self._copy_in(pos, bytes(padded - length))
        self._write = self._copy_in(pos, _TRAILER.pack(start << 32))
        return True

    def commit(self) -> bool:
        """Publish what was written. True if the reader must be signalled:
        it was not masked and the ring went from empty to non-empty."""
        if self._write == self._published:
            return False
        old = self._published
        self._control[WRITE_INDEX_OFFSET // 4] = self._write  # TSO: after the data
        self._published = self._write
        _full_fence()  # publish before reading interrupt_mask and read_index
        if self._control[INTERRUPT_MASK_OFFSET // 4]:
            return False
        return self._load_index(READ_INDEX_OFFSET, "read_index") == old

    def publish(self) -> None:
        """Publish what was written, without the signalling decision: for a
        reader that polls. Saves commit's full fence."""
        self._control[WRITE_INDEX_OFFSET // 4] = self._write  # TSO: after the data
        self._published = self._write

    def request_space(self, nbytes: int) -> bool:
        """For a writer that found the ring full: ask the reader to signal when
        more than `nbytes` are free. True if they already are (no wait)."""
        self._control[PENDING_SEND_SZ_OFFSET // 4] = nbytes
        _full_fence()  # the request is visible before we re-read read_index
        if self.free_bytes > nbytes:
            self._control[PENDING_SEND_SZ_OFFSET // 4] = 0
            return True
        return False


class RingReader(_RingSide):
    """The consumer end of one ring. Read packets, then `commit()` to hand
    their space back to the writer. Views stay valid until that commit."""

    def __init__(self, buffer: Any, *, mirrored: bool = False) -> None:
        super().__init__(buffer, mirrored)
        self._committed = self._load_index(READ_INDEX_OFFSET, "read_index")
        self._read = self._committed
        self._corrupt: str | None = None
        self.last_type = 0
        self.last_flags = 0
        self.last_trans_id = 0

    @property
    def bytes_available(self) -> int:
        """Bytes of unread packets (with trailers) published by the writer."""
        write = self._load_index(WRITE_INDEX_OFFSET, "write_index")
        return (write - self._read) % self._dsize

    def _next(self) -> tuple[int, int, int, int, int] | None:
        """Validated descriptor of the next packet, or None when empty."""
        if self._corrupt is not None:
            raise RingCorrupt(self._corrupt)
        try:
            available = self.bytes_available
            if available == 0:
                return None
            if available < DESCRIPTOR_SIZE + TRAILER_SIZE:
                raise RingCorrupt(f"{available} bytes published, less than one packet")
            fields = _DESC.unpack(self._copy_out(self._read, DESCRIPTOR_SIZE))
            _check_descriptor(fields[0], fields[1], fields[2], fields[3], available)
        except RingCorrupt as error:
            self._corrupt = str(error)
            raise
        return fields

    def _advance(self, fields: tuple[int, int, int, int, int]) -> None:
        self.last_type, _, len8, self.last_flags, self.last_trans_id = fields
        self._read = (self._read + len8 * 8 + TRAILER_SIZE) % self._dsize

    def read(self) -> Packet | None:
        """The next packet as a zero-copy view (a copy only when it wraps a
        ring that is not mirrored), or None when the ring is empty."""
        fields = self._next()
        if fields is None:
            return None
        data = self._copy_out(self._read, fields[2] * 8)
        self._advance(fields)
        return Packet(fields[0], fields[3], fields[4], fields[1], memoryview(data))

    def read_into(self, out: Any) -> int:
        """Copy the next payload (with its padding) into `out`; its length,
        or -1 when the ring is empty. last_type, last_flags and last_trans_id
        describe the packet."""
        fields = self._next()
        if fields is None:
            return -1
        target = memoryview(out).cast("B")
        start, size = fields[1] * 8, (fields[2] - fields[1]) * 8
        if size > len(target):
            raise ValueError(f"payload of {size} bytes does not fit a {len(target)}-byte buffer")
        target[:size] = self._copy_out((self._read + start) % self._dsize, size)
        self._advance(fields)
        return size

    def read_packed(self, out: Any, lengths: Any, trans_ids: Any = None) -> int:
        """Copy payloads back to back into `out`, their sizes into `lengths`
        (uint32) and optionally their ids into `trans_ids` (uint64), until
        the ring is empty or a buffer is full. Returns the packet count."""
        target = memoryview(out).cast("B")
        sizes = _as_array(lengths, "I", "lengths")
        ids = None if trans_ids is None else _as_array(trans_ids, "Q", "trans_ids")
        count, pos = 0, 0
        limit = len(sizes) if ids is None else min(len(sizes), len(ids))
        while count < limit:
            fields = self._next()
            if fields is None:
                break
            start, size = fields[1] * 8, (fields[2] - fields[1]) * 8
            if pos + size > len(target):
                if count == 0:
                    raise ValueError(f"payload of {size} bytes does not fit {len(target)} bytes")
                break
            target[pos : pos + size] = self._copy_out((self._read + start) % self._dsize, size)
            sizes[count] = size
            if ids is not None:
                ids[count] = fields[4]
            self._advance(fields)
            pos += size
            count += 1
        return count

    def commit(self) -> bool:
        """Hand the space of the packets read back to the writer. True if the
        writer must be signalled: it asked for space (pending_send_sz) and
        this commit is what made enough of it free."""
        if self._read == self._committed:
            return False
        old = self._committed
        self._control[READ_INDEX_OFFSET // 4] = self._read  # TSO: after the reads
        self._committed = self._read
        if not self._control[FEATURE_BITS_OFFSET // 4] & FEAT_PENDING_SEND_SZ:
            return False
        _full_fence()  # publish read_index before reading pending_send_sz
        pending: int = self._control[PENDING_SEND_SZ_OFFSET // 4]
        if not pending:
            return False
        write = self._load_index(WRITE_INDEX_OFFSET, "write_index")
        free = self._dsize - (write - self._read) % self._dsize
        freed = (self._read - old) % self._dsize
        return free - freed <= pending < free

    def publish(self) -> None:
        """Hand the space back without the wake-the-writer decision: for a
        writer that polls rather than waits on pending_send_sz."""
        self._control[READ_INDEX_OFFSET // 4] = self._read  # TSO: after the reads
        self._committed = self._read

    def begin_drain(self) -> None:
        """Mask the writer's signals while this side drains the ring."""
        self._control[INTERRUPT_MASK_OFFSET // 4] = 1
        _full_fence()

    def end_drain(self) -> bool:
        """Unmask signals. True if packets arrived meanwhile: drain again,
        since the writer may have skipped its signal while masked."""
        self._control[INTERRUPT_MASK_OFFSET // 4] = 0
        _full_fence()  # unmask before re-loading write_index
        return self.bytes_available != 0


def _check_packet_fields(type: int, flags: int, trans_id: int, header_len: int) -> None:
    if not MIN_PACKET_TYPE <= type <= MAX_PACKET_TYPE:
        raise ValueError(f"packet type {type} is not a VMBus packet type")
    if flags & ~KNOWN_FLAGS or flags < 0:
        raise ValueError(f"packet flags {flags:#x} has unknown bits")
    if not 0 <= trans_id < 1 << 64:
        raise ValueError(f"trans_id {trans_id} does not fit 64 bits")
    if header_len % ALIGNMENT:
        raise ValueError(f"packet header of {header_len} bytes is not 8-aligned")


def _check_descriptor(type: int, offset8: int, len8: int, flags: int, available: int) -> None:
    if not MIN_PACKET_TYPE <= type <= MAX_PACKET_TYPE:
        raise RingCorrupt(f"unknown packet type {type:#x}")
    if flags & ~KNOWN_FLAGS:
        raise RingCorrupt(f"unknown packet flags {flags:#x}")
    if offset8 < MIN_OFFSET8:
        raise RingCorrupt(f"offset8 {offset8} points inside the descriptor")
    if len8 < offset8:
        raise RingCorrupt(f"len8 {len8} is smaller than offset8 {offset8}")
    if len8 * 8 + TRAILER_SIZE > available:
        raise RingCorrupt(f"packet of {len8 * 8} bytes overruns the {available} bytes published")
