# cython: language_level=3
"""The C-level contract of the Cython ring (vmbus/_cring.pyx documents the
protocol): its classes' state and the cdef methods another Cython module
may call to read and write packets in place (a compiled device fast path),
without going through Python objects.

Rules for a caller: one thread drives an end at a time (the ring has no
lock); `next` peeks and validates a descriptor without moving the cursor,
`consume` moves past it; `put` appends at the private cursor; nothing is
visible to the peer until the Python-level `commit()` (or `publish()`).
The inline methods live here so that callers compile them in, as the ring
itself does.
"""

from cpython.buffer cimport Py_buffer
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

cdef extern from "_atomic.h":
    uint32_t vmbus_load_acquire(const uint32_t *p) nogil
    uint32_t vmbus_load_relaxed(const uint32_t *p) nogil
    void vmbus_store_release(uint32_t *p, uint32_t v) nogil
    void vmbus_store_relaxed(uint32_t *p, uint32_t v) nogil
    void vmbus_fence_full() nogil
    void vmbus_cpu_relax() nogil

cdef packed struct Descriptor:
    uint16_t type
    uint16_t offset8
    uint16_t len8
    uint16_t flags
    uint64_t trans_id

cdef enum:
    DESCRIPTOR_SIZE = 16
    TRAILER_SIZE = 8

# Reader and writer outcomes; negative values are corruption reasons.
cdef enum:
    EMPTY = 0
    READY = 1
    BAD_WRITE_INDEX = -1
    SHORT_PUBLISH = -2
    BAD_TYPE = -3
    BAD_FLAGS = -4
    BAD_OFFSET8 = -5
    BAD_LEN8 = -6
    OVERRUN = -7
    BAD_READ_INDEX = -8


cdef class _RingSide:
    cdef Py_buffer view
    cdef bint attached
    cdef uint8_t *data
    cdef uint32_t *write_index
    cdef uint32_t *read_index
    cdef uint32_t *interrupt_mask
    cdef uint32_t *pending_send_sz
    cdef uint32_t *feature_bits
    cdef uint32_t dsize
    cdef bint mirrored
    cdef object data_view

    cdef inline uint32_t advance(self, uint32_t pos, uint32_t n) noexcept nogil:
        pos += n
        return pos - self.dsize if pos >= self.dsize else pos

    cdef inline uint32_t copy_in(self, uint32_t pos, const void *src, uint32_t n) noexcept nogil:
        cdef uint32_t first
        if self.mirrored or pos + n <= self.dsize:
            memcpy(self.data + pos, src, n)
        else:
            first = self.dsize - pos
            memcpy(self.data + pos, src, first)
            memcpy(self.data, <const uint8_t *>src + first, n - first)
        return self.advance(pos, n)

    cdef inline void copy_out(self, uint32_t pos, void *dst, uint32_t n) noexcept nogil:
        cdef uint32_t first
        if self.mirrored or pos + n <= self.dsize:
            memcpy(dst, self.data + pos, n)
        else:
            first = self.dsize - pos
            memcpy(dst, self.data + pos, first)
            memcpy(<uint8_t *>dst + first, self.data, n - first)

    cdef inline bint index_ok(self, uint32_t index) noexcept nogil:
        return index < self.dsize and index % 8 == 0


cdef class RingWriter(_RingSide):
    cdef uint32_t cursor      # private: where the next packet goes
    cdef uint32_t published   # the write_index we last stored
    cdef uint32_t seen_read   # a validated read_index; the reader only moves it on

    cdef inline Py_ssize_t payload_limit(self, Py_ssize_t header_len) noexcept nogil:
        # Packet plus trailer must leave at least 8 bytes free (never full).
        return <Py_ssize_t>self.dsize - 8 - TRAILER_SIZE - DESCRIPTOR_SIZE - header_len

    cdef inline uint32_t free_from(self, uint32_t read) noexcept nogil:
        return self.dsize - (self.cursor - read + self.dsize) % self.dsize

    cdef inline int refresh_read(self) noexcept nogil:
        # Acquire: the reader's copies out of the space it freed happen
        # before we overwrite that space.
        cdef uint32_t r = vmbus_load_acquire(self.read_index)
        if not self.index_ok(r):
            return BAD_READ_INDEX
        self.seen_read = r
        return READY

    cdef void raise_bad_read_index(self) except *
    cdef int put(self, const uint8_t *payload, uint32_t size, uint16_t type, uint16_t flags,
                 uint64_t trans_id, const uint8_t *header, uint32_t header_len) noexcept nogil
    cdef int check_fits(self, Py_ssize_t size, Py_ssize_t header_len) except -1


cdef class RingReader(_RingSide):
    cdef uint32_t cursor      # private: the next packet to read
    cdef uint32_t committed   # the read_index we last stored
    cdef uint32_t seen_write  # a validated write_index; the writer only moves it on
    cdef str corrupt          # sticky: once corrupt, every call raises this
    cdef uint32_t bad_index   # the invalid write_index, for the message
    cdef Descriptor last
    cdef bytearray scratch

    cdef inline uint32_t available(self) noexcept nogil:
        return (self.seen_write - self.cursor + self.dsize) % self.dsize

    cdef inline int refresh_write(self) noexcept nogil:
        # Acquire: the packet bytes the writer stored before this index are
        # visible to the copies that follow.
        cdef uint32_t w = vmbus_load_acquire(self.write_index)
        if not self.index_ok(w):
            self.bad_index = w
            return BAD_WRITE_INDEX
        self.seen_write = w
        return READY

    cdef int next(self, Descriptor *d) noexcept nogil

    cdef inline void consume(self, Descriptor *d) noexcept nogil:
        self.last = d[0]
        self.cursor = self.advance(self.cursor, <uint32_t>d.len8 * 8 + TRAILER_SIZE)

    cdef int fail(self, int status, Descriptor *d) except -1

    cdef inline int check(self, Descriptor *d) except -2:
        if self.corrupt is not None:
            self.fail(0, NULL)
        cdef int status = self.next(d)
        if status < 0:
            self.fail(status, d)
        return status


cdef inline int next_request(
    RingReader reader, RingWriter writer, uint32_t reserve, Descriptor *d
) noexcept nogil:
    """What a device fast path asks before it takes a request: READY with
    the next packet in `d` only if the ring back has room for its reply
    (`reserve`); EMPTY when nothing is there, or the reply would not fit
    (Python asks the guest for room), or the packet is corrupt (Python
    reports it); BAD_READ_INDEX when the peer's read_index is (Python
    raises it)."""
    # Reserve first: the completion of a request taken must fit now.
    if writer.free_from(writer.seen_read) <= reserve:
        if writer.refresh_read() != READY:
            return BAD_READ_INDEX
        if writer.free_from(writer.seen_read) <= reserve:
            return EMPTY
    return READY if reader.next(d) == READY else EMPTY


# --- without the GIL: the commits and the doorbell of a compiled serve loop ---
# (a loop that waits, serves and publishes on a thread of its own; the
# Python-level commit()/begin_drain()/end_drain() are the definitions.)

cdef enum:
    PENDING_SEND_SZ_FEATURE = 1   # feature_bits: the writer may ask for space
    SIGNAL = 1                    # a commit's answer: ring the peer's doorbell

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum: POLLIN

cdef extern from "<unistd.h>" nogil:
    ssize_t read(int fd, void *buf, size_t count)
    ssize_t write(int fd, const void *buf, size_t count)


cdef inline int writer_commit(RingWriter w) noexcept nogil:
    """RingWriter.commit: SIGNAL if the reader must be signalled, 0 if not,
    BAD_READ_INDEX (the caller raises it with the GIL)."""
    if w.cursor == w.published:
        return 0
    cdef uint32_t old = w.published
    vmbus_store_release(w.write_index, w.cursor)  # the packets before the index
    w.published = w.cursor
    vmbus_fence_full()  # the index store before the loads below (see commit)
    if vmbus_load_relaxed(w.interrupt_mask):
        return 0
    if w.refresh_read() != READY:
        return BAD_READ_INDEX
    return SIGNAL if w.seen_read == old else 0


cdef inline int reader_commit(RingReader r) noexcept nogil:
    """RingReader.commit: SIGNAL if the writer asked for the space this
    frees, 0 if not, BAD_WRITE_INDEX (the caller reports it)."""
    if r.cursor == r.committed:
        return 0
    cdef uint32_t old = r.committed
    vmbus_store_release(r.read_index, r.cursor)  # our copies out before the space
    r.committed = r.cursor
    if not vmbus_load_relaxed(r.feature_bits) & PENDING_SEND_SZ_FEATURE:
        return 0
    vmbus_fence_full()  # pairs with RingWriter.request_space
    cdef uint32_t pending = vmbus_load_relaxed(r.pending_send_sz)
    if not pending:
        return 0
    if r.refresh_write() != READY:
        return BAD_WRITE_INDEX
    cdef uint32_t free = r.dsize - r.available()
    cdef uint32_t freed = (r.cursor - old + r.dsize) % r.dsize
    return SIGNAL if free - freed <= pending < free else 0


cdef inline void mask_signals(RingReader r) noexcept nogil:
    """RingReader.begin_drain."""
    vmbus_store_relaxed(r.interrupt_mask, 1)
    vmbus_fence_full()


cdef inline int unmask_signals(RingReader r) noexcept nogil:
    """RingReader.end_drain: READY if packets came meanwhile (drain again),
    EMPTY if not, BAD_WRITE_INDEX."""
    vmbus_store_relaxed(r.interrupt_mask, 0)
    vmbus_fence_full()  # the unmask before the re-load of write_index
    if r.refresh_write() != READY:
        return BAD_WRITE_INDEX
    return READY if r.available() else EMPTY


cdef inline void ring_doorbell(int fd) noexcept nogil:
    """Signal.set on an eventfd (a full counter still reads as rung)."""
    cdef uint64_t one = 1
    write(fd, &one, 8)


cdef inline bint wait_doorbell(int fd, int timeout_ms) noexcept nogil:
    """Signal.wait on a non-blocking eventfd: True once rung (and cleared),
    False after `timeout_ms` (or an interruption: the caller waits again)."""
    cdef pollfd p
    cdef uint64_t count
    p.fd, p.events, p.revents = fd, POLLIN, 0
    if poll(&p, 1, timeout_ms) <= 0:
        return False
    read(fd, &count, 8)
    return True


cdef inline double monotonic() noexcept nogil:
    """CLOCK_MONOTONIC in seconds, for the deadlines of spins and sleeps."""
    cdef timespec now
    clock_gettime(CLOCK_MONOTONIC, &now)
    return now.tv_sec + now.tv_nsec * 1e-9
