# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The VMBus ring in Cython: Hyper-V layout (docs/protocol.md §1-§2), lock-free
single producer / single consumer across processes.

Producer steps: copy descriptor, header, payload, zero pad and trailer at the
private write cursor; `commit` stores write_index with release (publishes the
bytes), full fence, then reads interrupt_mask and read_index to decide
whether to signal (empty -> non-empty while unmasked).

Consumer steps: load write_index with acquire (the bytes behind it are
visible), copy the descriptor out once and validate it, copy the payload;
`commit` stores read_index with release (hands the space back only after the
copies), full fence, then reads pending_send_sz to decide whether to wake a
blocked writer.

Assumptions: little-endian host; the control page is 4-byte aligned; the
peer may write anything at any time, so every shared value is loaded once
into a local, validated, and never re-read for the same decision.
"""

from cpython.buffer cimport (
    PyBUF_ANY_CONTIGUOUS,
    PyBUF_WRITABLE,
    PyBuffer_Release,
    PyObject_GetBuffer,
)
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memcpy, memset

from vmbus._ringdefs import RingCorrupt, data_size_of
from vmbus._ringpacket import Packet

# The classes' state, their inline methods, the atomics, Descriptor and the
# outcome codes (EMPTY, READY, BAD_*) are declared in _cring.pxd, so that a
# compiled fast path can cimport the ring.

DEF HEADER_SIZE = 4096
DEF MIN_PACKET_TYPE = 1
DEF MAX_PACKET_TYPE = 0xD
DEF KNOWN_FLAGS = 1
DEF FEAT_PENDING_SEND_SZ = 1
DEF VM_PKT_DATA_INBAND = 6
# Copies at least this big release the GIL; below it the release costs more
# than the copy.
DEF NOGIL_COPY_BYTES = 16384

cdef uint8_t ZEROS[8]
memset(ZEROS, 0, 8)


def init_ring(buffer, *, bint pending_send_sz=True):
    """Zero a ring's control page; advertise the pending_send_sz feature.
    Done once, by whoever allocates the ring, before either side attaches."""
    cdef Py_buffer view
    PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE | PyBUF_ANY_CONTIGUOUS)
    try:
        if view.len < HEADER_SIZE:
            raise ValueError(f"ring buffer of {view.len} bytes has no room for the header")
        memset(view.buf, 0, 68)
        (<uint32_t *>(<uint8_t *>view.buf + 64))[0] = FEAT_PENDING_SEND_SZ if pending_send_sz else 0
    finally:
        PyBuffer_Release(&view)


cdef class _RingSide:
    """What the writer and the reader share: the buffer and the copies."""
    def __cinit__(self, buffer, *, bint mirrored=False):
        PyObject_GetBuffer(buffer, &self.view, PyBUF_WRITABLE | PyBUF_ANY_CONTIGUOUS)
        self.attached = True
        if (<uintptr_t>self.view.buf) % 8:
            raise ValueError("ring buffer must be 8-byte aligned")
        self.dsize = data_size_of(self.view.len, mirrored)
        self.mirrored = mirrored
        cdef uint8_t *base = <uint8_t *>self.view.buf
        self.write_index = <uint32_t *>(base + 0)
        self.read_index = <uint32_t *>(base + 4)
        self.interrupt_mask = <uint32_t *>(base + 8)
        self.pending_send_sz = <uint32_t *>(base + 12)
        self.feature_bits = <uint32_t *>(base + 64)
        self.data = base + HEADER_SIZE
        self.data_view = memoryview(buffer).cast("B")[HEADER_SIZE:]

    def __dealloc__(self):
        if self.attached:
            PyBuffer_Release(&self.view)

    @property
    def data_size(self):
        return self.dsize

cdef class RingWriter(_RingSide):
    """The producer end of one ring. Write packets, then `commit()`."""
    def __init__(self, buffer, *, bint mirrored=False):
        cdef uint32_t w = vmbus_load_relaxed(self.write_index)
        cdef uint32_t r = vmbus_load_acquire(self.read_index)
        if not self.index_ok(w):
            raise RingCorrupt(f"write_index {w} is not an 8-aligned offset below {self.dsize}")
        if not self.index_ok(r):
            raise RingCorrupt(f"read_index {r} is not an 8-aligned offset below {self.dsize}")
        self.cursor = self.published = w
        self.seen_read = r

    @property
    def pending_bytes(self):
        """Bytes written but not yet committed."""
        return (self.cursor - self.published + self.dsize) % self.dsize

    @property
    def free_bytes(self):
        if self.refresh_read() < 0:
            self.raise_bad_read_index()
        return self.free_from(self.seen_read)

    def max_payload(self, Py_ssize_t header_len=0):
        """Largest payload a packet with this header can ever carry here."""
        return self.payload_limit(header_len)

    cdef void raise_bad_read_index(self) except *:
        r = vmbus_load_relaxed(self.read_index)
        raise RingCorrupt(f"read_index {r} is not an 8-aligned offset below {self.dsize}")

    cdef int put(self, const uint8_t *payload, uint32_t size, uint16_t type, uint16_t flags,
                 uint64_t trans_id, const uint8_t *header, uint32_t header_len) noexcept nogil:
        """Append one packet at the cursor: READY, EMPTY (meaning: full) or
        BAD_READ_INDEX. The caller has checked the packet can ever fit."""
        cdef uint32_t offset = DESCRIPTOR_SIZE + header_len
        cdef uint32_t length = offset + size
        cdef uint32_t padded = (length + 7) & ~(<uint32_t>7)
        cdef uint32_t total = padded + TRAILER_SIZE
        # The ring is never completely full: strictly more space than the packet.
        if self.free_from(self.seen_read) <= total:
            if self.refresh_read() < 0:
                return BAD_READ_INDEX
            if self.free_from(self.seen_read) <= total:
                return EMPTY
        cdef Descriptor d
        d.type = type
        d.offset8 = offset // 8
        d.len8 = padded // 8
        d.flags = flags
        d.trans_id = trans_id
        cdef uint64_t trailer = (<uint64_t>self.cursor) << 32
        cdef uint8_t *at
        if self.mirrored or self.cursor + total <= self.dsize:
            # Fast path, no wrap: stores straight into the ring. A padded
            # payload's last word is zeroed before the payload lands on it.
            at = self.data + self.cursor
            (<Descriptor *>at)[0] = d
            if header_len:
                memcpy(at + DESCRIPTOR_SIZE, header, header_len)
            if padded != length:  # then padded - 8 >= offset: inside the payload
                (<uint64_t *>(at + padded - 8))[0] = 0
            memcpy(at + offset, payload, size)
            (<uint64_t *>(at + padded))[0] = trailer
            self.cursor = self.advance(self.cursor, total)
            return READY
        cdef uint32_t pos = self.copy_in(self.cursor, &d, DESCRIPTOR_SIZE)
        if header_len:
            pos = self.copy_in(pos, header, header_len)
        pos = self.copy_in(pos, payload, size)
        if padded != length:
            pos = self.copy_in(pos, ZEROS, padded - length)
        self.cursor = self.copy_in(pos, &trailer, TRAILER_SIZE)
        return READY

    cdef int check_fits(self, Py_ssize_t size, Py_ssize_t header_len) except -1:
        if size > self.payload_limit(header_len):
            raise ValueError(
                f"payload of {size} bytes can never fit a ring of {self.dsize} bytes")
        return 0

    def write(self, payload, int type=VM_PKT_DATA_INBAND, int flags=0, trans_id=0,
              header=b""):
        """Append one packet; False (nothing written) if the ring is full."""
        cdef Py_buffer p, h
        cdef int result
        cdef uint64_t tid = check_packet_fields(type, flags, trans_id)
        PyObject_GetBuffer(payload, &p, PyBUF_ANY_CONTIGUOUS)
        try:
            PyObject_GetBuffer(header, &h, PyBUF_ANY_CONTIGUOUS)
            try:
                if h.len % 8:
                    raise ValueError(f"packet header of {h.len} bytes is not 8-aligned")
                self.check_fits(p.len, h.len)
                if p.len >= NOGIL_COPY_BYTES:
                    with nogil:
                        result = self.put(<uint8_t *>p.buf, p.len, type, flags, tid,
                                          <uint8_t *>h.buf, h.len)
                else:
                    result = self.put(<uint8_t *>p.buf, p.len, type, flags, tid,
                                      <uint8_t *>h.buf, h.len)
            finally:
                PyBuffer_Release(&h)
        finally:
            PyBuffer_Release(&p)
        if result == BAD_READ_INDEX:
            self.raise_bad_read_index()
        return result == READY

    def write_batch(self, payloads, int type=VM_PKT_DATA_INBAND, int flags=0, trans_id=0):
        """Append packets in order until one does not fit; packet i carries
        trans_id + i. Returns how many were written."""
        cdef uint64_t tid = check_packet_fields(type, flags, trans_id)
        cdef Py_buffer p
        cdef int result = READY
        cdef Py_ssize_t count = 0
        for payload in payloads:
            PyObject_GetBuffer(payload, &p, PyBUF_ANY_CONTIGUOUS)
            try:
                self.check_fits(p.len, 0)
                result = self.put(<uint8_t *>p.buf, p.len, type, flags, tid + count, NULL, 0)
            finally:
                PyBuffer_Release(&p)
            if result != READY:
                break
            count += 1
        if result == BAD_READ_INDEX:
            self.raise_bad_read_index()
        return count

    def write_packed(self, data, lengths, int type=VM_PKT_DATA_INBAND, int flags=0, trans_id=0):
        """Like write_batch, with the payloads back to back in `data` and
        their sizes in `lengths` (a uint32 buffer)."""
        cdef uint64_t tid = check_packet_fields(type, flags, trans_id)
        cdef Py_buffer d, l
        cdef Py_ssize_t i, n, count = 0, pos = 0, total = 0
        cdef const uint32_t *sizes
        cdef int result = READY
        PyObject_GetBuffer(data, &d, PyBUF_ANY_CONTIGUOUS)
        try:
            PyObject_GetBuffer(lengths, &l, PyBUF_ANY_CONTIGUOUS)
            try:
                n = checked_count(l.len, 4, "lengths")
                sizes = <const uint32_t *>l.buf
                for i in range(n):
                    self.check_fits(sizes[i], 0)
                    total += sizes[i]
                if total > d.len:
                    raise ValueError(f"lengths add up to {total} bytes, data has {d.len}")
                with nogil:
                    for i in range(n):
                        result = self.put(<uint8_t *>d.buf + pos, sizes[i], type, flags,
                                          tid + i, NULL, 0)
                        if result != READY:
                            break
                        pos += sizes[i]
                        count += 1
            finally:
                PyBuffer_Release(&l)
        finally:
            PyBuffer_Release(&d)
        if result == BAD_READ_INDEX:
            self.raise_bad_read_index()
        return count

    def commit(self):
        """Publish what was written. True if the reader must be signalled:
        it was not masked and the ring went from empty to non-empty."""
        if self.cursor == self.published:
            return False
        cdef uint32_t old = self.published
        # Release: every packet byte written above is visible before the
        # reader can see the index that covers it.
        vmbus_store_release(self.write_index, self.cursor)
        self.published = self.cursor
        # Full fence: our write_index store is ordered before the loads of
        # interrupt_mask and read_index below (store->load), so a reader that
        # unmasks and re-checks cannot miss both our packet and our signal.
        vmbus_fence_full()
        if vmbus_load_relaxed(self.interrupt_mask):
            return False
        if self.refresh_read() < 0:
            self.raise_bad_read_index()
        return self.seen_read == old

    def publish(self):
        """Publish what was written, without the signalling decision: for a
        reader that polls. Saves commit's full fence (a stall on the shared
        control line when the cores are far apart)."""
        # Release: every packet byte written is visible before the index.
        vmbus_store_release(self.write_index, self.cursor)
        self.published = self.cursor

    def request_space(self, uint32_t nbytes):
        """For a writer that found the ring full: ask the reader to signal when
        more than `nbytes` are free. True if they already are (no wait)."""
        vmbus_store_relaxed(self.pending_send_sz, nbytes)
        # Full fence: the request is visible before we re-read read_index, so
        # either we see the reader's progress or it sees our request.
        vmbus_fence_full()
        if self.refresh_read() < 0:
            self.raise_bad_read_index()
        if self.free_from(self.seen_read) > nbytes:
            vmbus_store_relaxed(self.pending_send_sz, 0)
            return True
        return False


cdef class RingReader(_RingSide):
    """The consumer end of one ring. Read packets, then `commit()` to hand
    their space back to the writer. Views stay valid until that commit."""
    def __init__(self, buffer, *, bint mirrored=False):
        cdef uint32_t r = vmbus_load_relaxed(self.read_index)
        if not self.index_ok(r):
            raise RingCorrupt(f"read_index {r} is not an 8-aligned offset below {self.dsize}")
        self.cursor = self.committed = self.seen_write = r
        self.last.type = self.last.flags = 0
        self.last.trans_id = 0

    @property
    def last_type(self):
        return self.last.type

    @property
    def last_flags(self):
        return self.last.flags

    @property
    def last_trans_id(self):
        return self.last.trans_id

    @property
    def bytes_available(self):
        """Bytes of unread packets (with trailers) published by the writer."""
        cdef int status = self.refresh_write()
        if status < 0:
            self.fail(status, NULL)
        return self.available()

    cdef int next(self, Descriptor *d) noexcept nogil:
        """Copy out and validate the next descriptor: READY, EMPTY, or a
        corruption reason (negative)."""
        cdef uint32_t avail = self.available()
        cdef int status
        if avail == 0:
            status = self.refresh_write()
            if status < 0:
                return status
            avail = self.available()
            if avail == 0:
                return EMPTY
        if avail < DESCRIPTOR_SIZE + TRAILER_SIZE:
            return SHORT_PUBLISH
        # One copy: the peer may rewrite the descriptor while we look at it.
        self.copy_out(self.cursor, d, DESCRIPTOR_SIZE)
        if d.type < MIN_PACKET_TYPE or d.type > MAX_PACKET_TYPE:
            return BAD_TYPE
        if d.flags & ~KNOWN_FLAGS:
            return BAD_FLAGS
        if d.offset8 < DESCRIPTOR_SIZE // 8:
            return BAD_OFFSET8
        if d.len8 < d.offset8:
            return BAD_LEN8
        # A published write_index always sits on a packet boundary, so a
        # packet running past it is corrupt, not in flight.
        if <uint32_t>d.len8 * 8 + TRAILER_SIZE > avail:
            return OVERRUN
        return READY

    cdef int fail(self, int status, Descriptor *d) except -1:
        if self.corrupt is None:
            self.corrupt = _corrupt_text(status, d, self.available(), self.bad_index, self.dsize)
        raise RingCorrupt(self.corrupt)

    def read(self):
        """The next packet as a zero-copy view (a copy only when it wraps a
        ring that is not mirrored), or None when the ring is empty."""
        cdef Descriptor d
        if self.check(&d) == EMPTY:
            return None
        cdef uint32_t size = <uint32_t>d.len8 * 8
        cdef uint32_t start = self.cursor
        if self.mirrored or start + size <= self.dsize:
            view = self.data_view[start:start + size]
        else:
            if self.scratch is None:
                self.scratch = bytearray(self.dsize)
            self.copy_out(start, <uint8_t *>self.scratch, size)
            view = memoryview(self.scratch)[:size]
        self.consume(&d)
        return Packet(d.type, d.flags, d.trans_id, d.offset8, view)

    def read_into(self, out):
        """Copy the next payload (with its padding) into `out`; its length,
        or -1 when the ring is empty. last_type, last_flags and last_trans_id
        describe the packet."""
        cdef Descriptor d
        if self.check(&d) == EMPTY:
            return -1
        cdef Py_buffer o
        cdef uint32_t size = (<uint32_t>d.len8 - d.offset8) * 8
        cdef uint32_t start = self.advance(self.cursor, <uint32_t>d.offset8 * 8)
        PyObject_GetBuffer(out, &o, PyBUF_WRITABLE | PyBUF_ANY_CONTIGUOUS)
        try:
            if size > o.len:
                raise ValueError(
                    f"payload of {size} bytes does not fit a {o.len}-byte buffer")
            if size >= NOGIL_COPY_BYTES:
                with nogil:
                    self.copy_out(start, o.buf, size)
            else:
                self.copy_out(start, o.buf, size)
        finally:
            PyBuffer_Release(&o)
        self.consume(&d)
        return size

    def read_packed(self, out, lengths, trans_ids=None):
        """Copy payloads back to back into `out`, their sizes into `lengths`
        (uint32) and optionally their ids into `trans_ids` (uint64), until
        the ring is empty or a buffer is full. Returns the packet count."""
        cdef Py_buffer o, l, t
        cdef bint has_ids = trans_ids is not None
        cdef Py_ssize_t limit, count = 0, pos = 0
        cdef uint32_t size
        cdef int status = READY
        cdef Descriptor d
        if self.corrupt is not None:
            self.fail(0, NULL)
        PyObject_GetBuffer(out, &o, PyBUF_WRITABLE | PyBUF_ANY_CONTIGUOUS)
        PyObject_GetBuffer(lengths, &l, PyBUF_WRITABLE | PyBUF_ANY_CONTIGUOUS)
        if has_ids:
            PyObject_GetBuffer(trans_ids, &t, PyBUF_WRITABLE | PyBUF_ANY_CONTIGUOUS)
        try:
            limit = checked_count(l.len, 4, "lengths")
            if has_ids:
                limit = min(limit, checked_count(t.len, 8, "trans_ids"))
            with nogil:
                while count < limit:
                    status = self.next(&d)
                    if status != READY:
                        break
                    size = (<uint32_t>d.len8 - d.offset8) * 8
                    if pos + size > o.len:
                        break
                    self.copy_out(self.advance(self.cursor, <uint32_t>d.offset8 * 8),
                                  <uint8_t *>o.buf + pos, size)
                    (<uint32_t *>l.buf)[count] = size
                    if has_ids:
                        (<uint64_t *>t.buf)[count] = d.trans_id
                    self.consume(&d)
                    pos += size
                    count += 1
            if status < 0:
                self.fail(status, &d)
            if count == 0 and status == READY and limit > 0:
                raise ValueError(f"payload of {size} bytes does not fit {o.len} bytes")
        finally:
            if has_ids:
                PyBuffer_Release(&t)
            PyBuffer_Release(&l)
            PyBuffer_Release(&o)
        return count

    def commit(self):
        """Hand the space of the packets read back to the writer. True if the
        writer must be signalled: it asked for space (pending_send_sz) and
        this commit is what made enough of it free."""
        if self.cursor == self.committed:
            return False
        cdef uint32_t old = self.committed
        # Release: all copies out of the consumed packets complete before the
        # writer can see their space as free.
        vmbus_store_release(self.read_index, self.cursor)
        self.committed = self.cursor
        if not vmbus_load_relaxed(self.feature_bits) & FEAT_PENDING_SEND_SZ:
            return False
        # Full fence: our read_index store is ordered before the load of
        # pending_send_sz, pairing with the fence in RingWriter.request_space.
        vmbus_fence_full()
        cdef uint32_t pending = vmbus_load_relaxed(self.pending_send_sz)
        if not pending:
            return False
        if self.refresh_write() < 0:
            self.fail(BAD_WRITE_INDEX, NULL)
        cdef uint32_t free = self.dsize - self.available()
        cdef uint32_t freed = (self.cursor - old + self.dsize) % self.dsize
        return free - freed <= pending < free

    def publish(self):
        """Hand the space back without the wake-the-writer decision: for a
        writer that polls rather than waits on pending_send_sz."""
        # Release: the copies out of the consumed packets complete first.
        vmbus_store_release(self.read_index, self.cursor)
        self.committed = self.cursor

    def begin_drain(self):
        """Mask the writer's signals while this side drains the ring."""
        vmbus_store_relaxed(self.interrupt_mask, 1)
        # Full fence: the mask is visible before the reads of the drain.
        vmbus_fence_full()

    def end_drain(self):
        """Unmask signals. True if packets arrived meanwhile: drain again,
        since the writer may have skipped its signal while masked."""
        vmbus_store_relaxed(self.interrupt_mask, 0)
        # Full fence: the unmask is visible before we re-load write_index, so
        # a writer that saw the mask set has published what we now check.
        vmbus_fence_full()
        return self.bytes_available != 0


cdef uint64_t check_packet_fields(int type, int flags, trans_id) except? 0xFFFFFFFFFFFFFFFF:
    if type < MIN_PACKET_TYPE or type > MAX_PACKET_TYPE:
        raise ValueError(f"packet type {type} is not a VMBus packet type")
    if flags & ~KNOWN_FLAGS or flags < 0:
        raise ValueError(f"packet flags {flags:#x} has unknown bits")
    if not 0 <= trans_id < (1 << 64):
        raise ValueError(f"trans_id {trans_id} does not fit 64 bits")
    return trans_id


cdef Py_ssize_t checked_count(Py_ssize_t nbytes, Py_ssize_t item, str name) except -1:
    if nbytes % item:
        raise ValueError(f"{name} buffer of {nbytes} bytes is not a whole number of "
                         f"{item}-byte items")
    return nbytes // item


cdef str _corrupt_text(int status, Descriptor *d, uint32_t avail, uint32_t bad_index,
                       uint32_t dsize):
    if status == BAD_WRITE_INDEX:
        return f"write_index {bad_index} is not an 8-aligned offset below {dsize}"
    if status == SHORT_PUBLISH:
        return f"{avail} bytes published, less than one packet"
    if status == BAD_TYPE:
        return f"unknown packet type {d.type:#x}"
    if status == BAD_FLAGS:
        return f"unknown packet flags {d.flags:#x}"
    if status == BAD_OFFSET8:
        return f"offset8 {d.offset8} points inside the descriptor"
    if status == BAD_LEN8:
        return f"len8 {d.len8} is smaller than offset8 {d.offset8}"
    return f"packet of {d.len8 * 8} bytes overruns the {avail} bytes published"
