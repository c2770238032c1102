# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The compiled steady-state path of one storvsp channel.

It serves, without the GIL and straight from the ring, the requests that
matter: EXECUTE_SRB with READ/WRITE (6, 10, 12, 16) and SYNCHRONIZE CACHE
(10, 16) to a LUN whose disk is a raw file, with a valid GPA-direct buffer,
on a protocol that is READY and a disk with no unit attention pending. Each
packet is copied out of the ring ONCE into a private buffer (the VSTOR packet
and its GPA range list; the descriptor was copied and checked by the ring)
and validated from that copy; the data moves with preadv/pwritev between the
image file and the guest's pages; the completion is written into the ring in
place; both rings are committed once per batch, and the completions also
every PUBLISH_EVERY packets (or PUBLISH_BYTES moved) inside a long one, so
a guest with a deep queue reaps and refills while the rest of the batch is
served (pipelining, not turns).

Everything else is declined: the drain stops at the first packet it does not
serve and leaves it, and all after it, in the ring for the Python path
(`StorvspChannel.on_packet`), which stays the only definition of behaviour.
So a declined packet is never consumed here, order is kept, and a request is
taken only while its completion fits (the channel's reserve). The checks
below are those of StorvspProtocol.receive, OpenContext.gpa_ranges and
ScsiDisk.execute for the success case; any failure of theirs, and any error
of a system call, declines (the Python path then produces the error reply).
A completion is byte for byte what StorvspProtocol.complete_srb builds.

Two ways in: `drain` serves the head of the ring once (from admission(),
before the Python drain takes a packet); `run` is the whole service of a
channel on a thread of its own (drain, spin, sleep on the doorbell, in C;
see StorvspChannel._run_compiled). What `configure` reads of the protocol
and the disks is kept until vsp.storage.changes says it changed.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from libc.errno cimport EINTR, errno
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset
from posix.types cimport off_t
from posix.uio cimport iovec, preadv, pwritev
from posix.unistd cimport fdatasync

from vmbus._cring cimport (
    monotonic,
    vmbus_cpu_relax,
    BAD_READ_INDEX,
    DESCRIPTOR_SIZE,
    EMPTY,
    READY,
    Descriptor,
    RingReader,
    RingWriter,
    SIGNAL,
    mask_signals,
    next_request,
    reader_commit,
    ring_doorbell,
    unmask_signals,
    wait_doorbell,
    writer_commit,
    vmbus_fence_full,
    vmbus_load_relaxed,
    vmbus_store_release,
)

from vmbus.memory import PAGE_SIZE as _PAGE_SIZE
from vmbus.protocols.storage.vsp import VspState
from vmbus.protocols.storage.wire import VSTOR_VERSION_WIN8
from vsp.storage import changes as _changes
from vsp.storage.backends import RawFileBackend
from vsp.storage.scsi import ScsiDisk

__all__ = ["FastPath", "RUN_IDLE", "RUN_PYTHON", "RUN_STUCK"]

DEF PAGE = 4096              # vmbus.memory.PAGE_SIZE, checked at import
DEF PACKET_MAX = 16384       # private copy: GPA header + VSTOR packet; larger declines
DEF IOV_LIMIT = 1024         # iovecs of one request (Linux IOV_MAX); more declines
DEF BATCH_LIMIT = 4096       # packets per call: bounds one call's latency
DEF PUBLISH_EVERY = 8        # completions published this often inside a batch,
DEF PUBLISH_BYTES = 65536    # or once they moved this much (a large request: at once)
DEF POLL_MISSES = 4          # run: spins in a row that found nothing before it backs off
DEF POLL_PROBE = 32          # then spin after one batch in this many
DEF GAP_MARGIN = 3.0         # run spins this many times the usual wait for the next request,
DEF SPIN_FLOOR = 3e-6        # but at least this long,
DEF GAP_LEARNING = 0.25      # learning the usual wait from each spin that saw a request
DEF GAP_MISSED = 1.25        # and growing it by this after one that did not
DEF LUNS = 256               # a vmscsi_request's u8 lun
DEF MAX_RANGES = 256         # vmbus.packet.MAX_GPA_RANGES
DEF MAX_PFNS = 8192          # vmbus.packet.MAX_GPA_PFNS
DEF VSTOR_PACKET = 64        # negotiated from Win8 on; 48 before
DEF HEADER = 12              # vstor_packet operation, flags, status
DEF SENSE_BUFFER = 20        # the cdb/sense union of the vmscsi_request
DEF MAX_CDB = 16
DEF GPA_DIRECT = 0x9         # VMBus packet types
DEF INBAND = 0x6
DEF COMPLETION = 0xB
DEF EXECUTE_SRB = 3          # vstor operations
DEF COMPLETE_IO = 1
DEF SRB_SUCCESS = 0x01
DEF DATA_OUT = 0             # data_in: WRITE_TYPE, READ_TYPE, UNKNOWN_TYPE
DEF DATA_IN = 1
DEF DATA_NONE = 2
DEF PROTECT_MASK = 0xE0      # CDB byte 1
DEF FUA = 0x08
DEF CONTROL_BAD = 0x05       # NACA | LINK in the CONTROL byte

# Outcomes of serving one packet.
DEF SERVED = 1
DEF DECLINED = 0
# Why FastPath.run returned (the Python names are RUN_*).
DEF OUT_IDLE = 0      # nothing came for `idle` seconds: the ring is unmasked, asleep
DEF OUT_PYTHON = 1    # a packet declined, a ring to report or a turn over: Python's go
DEF OUT_STUCK = 2     # requests wait for room for their replies: Python asks for it
RUN_IDLE, RUN_PYTHON, RUN_STUCK = OUT_IDLE, OUT_PYTHON, OUT_STUCK



# The count of changes to what configure reads (vsp.storage.changes), held
# for the life of the process: the array cannot be resized under us.
cdef Py_buffer _changes_view
PyObject_GetBuffer(_changes.COUNT, &_changes_view, PyBUF_SIMPLE)
cdef const volatile uint64_t *CHANGES = <const volatile uint64_t *>_changes_view.buf


if _PAGE_SIZE != PAGE:
    raise ImportError(f"vsp.storage._fast assumes {PAGE}-byte pages, not {_PAGE_SIZE}")


cdef struct Lun:
    bint present
    bint read_only
    int fd
    uint32_t block_size
    uint64_t block_count
    uint64_t max_transfer


cdef struct Request:
    # What one validated packet asks for, parsed from the private copy.
    const uint8_t *srb        # the vmscsi_request inside the private copy
    const uint8_t *header     # the GPA-direct header inside the private copy
    uint32_t header_len
    uint32_t ranges
    uint64_t buffer           # bytes the ranges describe
    uint32_t length           # data_transfer_length
    uint8_t direction


cdef inline uint32_t le32(const uint8_t *p) noexcept nogil:
    return p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline void put_le32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = v >> 24


cdef inline uint32_t be16(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 8) | p[1]


cdef inline uint32_t be32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline uint64_t be64(const uint8_t *p) noexcept nogil:
    return (<uint64_t>be32(p) << 32) | be32(p + 4)


cdef inline uint64_t le64(const uint8_t *p) noexcept nogil:
    return le32(p) | (<uint64_t>le32(p + 4) << 32)


cdef class FastPath:
    """The fast path of one channel: `drain(vsp)` serves the steady-state
    packets at the head of the ring and returns how many it served."""

    cdef RingReader reader
    cdef RingWriter writer
    cdef object channel            # for its signal to the guest and its counters
    cdef object notify_peer
    cdef object memory             # the child's GuestMemory
    cdef uint64_t page_count
    cdef bytes ring_map            # bit per guest page: a channel ring page
    cdef const uint8_t *rings
    cdef uint32_t reserve          # ring bytes a completion needs (the handler's)
    # Refreshed at each call that finds a packet, under the GIL:
    cdef uint32_t packet_size
    cdef uint64_t max_transfer
    cdef uint8_t *base             # guest memory, mapped
    cdef Lun luns[LUNS]
    # Scratch, reused by every packet (no allocation in the loop):
    cdef uint8_t private[PACKET_MAX]
    cdef uint8_t reply[VSTOR_PACKET]
    cdef iovec iov[IOV_LIMIT]
    cdef bint signal_due                     # a publish in the batch asks for a signal
    cdef uint64_t unpublished                # bytes moved by completions not yet published
    cdef uint64_t seen_changes               # CHANGES when configure last ran
    cdef bint configured, ready              # it ran; what it said
    cdef int notify_fd                       # the guest's doorbell (its eventfd)
    cdef int wake_fd                         # ours
    cdef unsigned long long rung             # doorbells rung without the GIL, not yet counted
    cdef unsigned long long waits            # run's adaptive spin
    cdef unsigned int spin_misses
    cdef double gap                          # seconds the guest's next request usually takes
    cdef public unsigned long long served    # requests completed here, ever (counted live)
    cdef public unsigned long long declined  # calls that stopped at a packet for Python

    def __init__(self, channel, memory, ring_pfns, int reserve):
        # TypeError unless the channel runs on the Cython ring.
        self.reader = channel.reader
        self.writer = channel.writer
        self.channel = channel
        self.notify_peer = channel.notify_peer
        self.notify_fd = channel.notify_peer.fileno()
        self.wake_fd = channel.wake_me.fileno()
        self.memory = memory
        self.page_count = memory.page_count
        self.reserve = reserve
        bitmap = bytearray((self.page_count + 7) // 8)
        for pfn in ring_pfns:
            if 0 <= pfn < self.page_count:
                bitmap[pfn >> 3] |= 1 << (pfn & 7)
        self.ring_map = bytes(bitmap)
        self.rings = self.ring_map

    def drain(self, vsp):
        """Serve packets from the head of the ring until one is declined, the
        ring is empty, or a completion would not fit. Commits both rings
        and signals the guest as they answer. Returns the count served."""
        cdef Descriptor d
        if self.reader.corrupt is not None or self.reader.next(&d) != READY:
            return 0  # empty, or corrupt: the Python drain reports corruption
        if not self.refresh(vsp):
            self.declined += 1
            return 0
        cdef object mapping
        cdef Py_buffer view
        try:
            mapping = self.memory.view(0, self.memory.size)  # the whole of it, public and checked
            PyObject_GetBuffer(mapping, &view, PyBUF_WRITABLE)
        except Exception:  # closed memory: the Python path reports it
            self.declined += 1
            return 0
        cdef uint32_t count = 0
        cdef int outcome = SERVED
        try:
            if <uint64_t>view.len < self.page_count * PAGE:
                outcome = DECLINED
            else:
                self.base = <uint8_t *>view.buf
                with nogil:
                    outcome = self.serve_batch(&count)
        finally:
            self.base = NULL
            PyBuffer_Release(&view)
        if outcome == DECLINED:
            self.declined += 1
        if self.signal_due:  # a publish inside the batch found the guest asleep
            self.signal_due = False
            self.notify_peer.set()
        if count:
            self.channel.packets_sent += count  # the completions, as Channel counts them
            # One commit per batch each way; signal as the rings answer.
            if self.writer.commit():
                self.notify_peer.set()
            if self.reader.commit():
                self.notify_peer.set()
        return count

    def poll(self, double seconds):
        """Spin up to `seconds`, without the GIL, until the guest has written
        a packet: True once one is there (or the ring's write index is bad,
        which the drain then reports), False if none came."""
        cdef double end
        cdef bint found = False
        with nogil:
            end = monotonic() + seconds
            while True:
                if self.reader.refresh_write() != READY or self.reader.available():
                    found = True
                    break
                if monotonic() >= end:
                    break
                vmbus_cpu_relax()
        return found

    def run(self, vsp, double spin, double turn, double idle):
        """Serve the channel from a thread of its own, without the GIL, for up
        to `turn` seconds: drain, publish, spin up to `spin` seconds for the
        next request (the ring masked: the guest rings no doorbell), then
        unmask and sleep on the doorbell, for at most `idle` seconds. Returns
        (served, why): RUN_PYTHON when a packet is declined (left in the
        ring), a ring must be reported or the turn is over, the ring masked
        again so the caller's service takes it (the caller rings its own
        doorbell); RUN_STUCK when requests wait for room for their replies
        (the ring unmasked; Python's service asks the guest for room);
        RUN_IDLE when none came within `idle`, or the protocol or the disks
        are not ready for this path (the ring unmasked: the guest's next
        request rings the doorbell)."""
        cdef Py_buffer view
        cdef uint32_t count = 0
        cdef int why = OUT_PYTHON
        if self.reader.corrupt is not None:
            return 0, OUT_PYTHON
        if not self.refresh(vsp):  # not ready (the handshake): Python serves what comes
            return 0, OUT_IDLE
        try:
            mapping = self.memory.view(0, self.memory.size)
            PyObject_GetBuffer(mapping, &view, PyBUF_WRITABLE)
        except Exception:  # closed memory: the Python path reports it
            return 0, OUT_PYTHON
        try:
            if <uint64_t>view.len >= self.page_count * PAGE:
                self.base = <uint8_t *>view.buf
                with nogil:
                    why = self.serve_loop(vsp, &count, spin, turn, <int>(idle * 1000) + 1)
        finally:
            self.base = NULL
            PyBuffer_Release(&view)
        if self.signal_due:  # a publish found the guest asleep, and its signal failed
            self.signal_due = False
            self.notify_peer.set()
        self.notify_peer.sent += self.rung
        self.rung = 0
        self.channel.packets_sent += count
        return count, why

    cdef int serve_loop(self, object vsp, uint32_t *count, double spin, double turn,
                        int idle_ms) noexcept nogil:
        cdef double now = monotonic(), turn_ends = now + turn, spin_ends
        cdef uint32_t before
        cdef int outcome, state
        cdef bint spinning
        mask_signals(self.reader)
        while True:
            if CHANGES[0] != self.seen_changes and not self.refresh_nogil(vsp):
                return OUT_PYTHON  # what the Python path changed: it serves the next
            before = count[0]
            outcome = self.serve_batch(count)
            if count[0] != before and not self.commit_both():
                return OUT_PYTHON  # a bad index: Python raises it
            if outcome == DECLINED:
                return OUT_PYTHON
            if self.reader.available():  # left: no room for its reply, or corrupt
                if self.writer.free_from(self.writer.seen_read) > self.reserve:
                    return OUT_PYTHON  # corrupt: the drain reports it
                if count[0] == 0:  # the caller's service asked the guest for room
                    unmask_signals(self.reader)
                    return OUT_STUCK
                return OUT_PYTHON  # its service asks for room
            now = monotonic()
            if now >= turn_ends:
                return OUT_PYTHON
            # Poll mode: the next request, with the ring masked, for as long
            # as the guest's next request usually takes to come (learnt from
            # the spins that saw it; at most `spin`); after POLL_MISSES
            # fruitless spins in a row, one wait in POLL_PROBE spins.
            if self.gap <= 0 or self.gap > spin:
                self.gap = spin / GAP_MARGIN
            spin_ends = now + max(SPIN_FLOOR, min(spin, self.gap * GAP_MARGIN))
            state = EMPTY
            self.waits += 1
            spinning = spin > 0 and (self.spin_misses < POLL_MISSES
                                     or self.waits % POLL_PROBE == 0)
            while spinning:
                state = self.reader.refresh_write()
                if state != READY or self.reader.available():
                    break
                if monotonic() >= spin_ends:
                    break
                vmbus_cpu_relax()
            if state != READY and state != EMPTY:
                return OUT_PYTHON  # a bad write_index: the drain reports it
            if self.reader.available():
                if spinning:
                    self.gap += (monotonic() - now - self.gap) * GAP_LEARNING
                self.spin_misses = 0
                continue
            if spinning:
                self.spin_misses += 1
                self.gap *= GAP_MISSED
            # Sleep: unmask, re-check, wait on the doorbell.
            state = unmask_signals(self.reader)
            if state == READY:
                mask_signals(self.reader)
                continue
            if state != EMPTY:
                return OUT_PYTHON
            if not wait_doorbell(self.wake_fd, idle_ms):
                return OUT_IDLE
            mask_signals(self.reader)

    cdef bint commit_both(self) noexcept nogil:
        """Both rings' commits, signalling the guest as they answer; False
        on a bad index."""
        cdef int written = writer_commit(self.writer)
        cdef int read = reader_commit(self.reader)
        if written < 0 or read < 0:
            return False
        if written == SIGNAL or read == SIGNAL:
            ring_doorbell(self.notify_fd)
            self.rung += 1
        return True

    cdef bint refresh(self, vsp) except -1:
        """configure, when what it reads may have changed since it last ran
        (vsp.storage.changes); else what it said then."""
        if self.configured and CHANGES[0] == self.seen_changes:
            return self.ready
        self.seen_changes = CHANGES[0]  # first: a change while we read reads again
        self.configured, self.ready = True, False
        self.ready = self.configure(vsp)
        return self.ready

    cdef bint refresh_nogil(self, object vsp) noexcept nogil:
        with gil:
            try:
                return self.refresh(vsp)
            except BaseException:  # the Python path meets it, and reports it
                return False

    cdef bint configure(self, vsp) except -1:
        """The protocol's negotiated state and the disks this path may serve,
        read afresh (they change under the Python path)."""
        protocol = vsp.protocol
        if protocol.state is not VspState.READY or protocol.version is None:
            return False
        paths, targets, max_luns = protocol.limits
        if paths < 1 or targets < 1 or vsp.targets.get((0, 0)) is not vsp.target:
            return False
        self.packet_size = VSTOR_PACKET if protocol.version >= VSTOR_VERSION_WIN8 else 48
        self.max_transfer = protocol.max_transfer_bytes
        memset(self.luns, 0, sizeof(self.luns))
        for lun, disk in vsp.target.disks.items():
            if not 0 <= lun < min(max_luns, LUNS) or type(disk) is not ScsiDisk:
                continue
            backend = (<object>disk).backend
            if disk.unit_attention is not None or type(backend) is not RawFileBackend:
                continue
            if backend.fd < 0:
                continue
            self.luns[lun].present = True
            self.luns[lun].read_only = backend.read_only
            self.luns[lun].fd = backend.fd
            self.luns[lun].block_size = backend.block_size
            self.luns[lun].block_count = backend.block_count
            self.luns[lun].max_transfer = disk.limits.max_transfer_bytes
        return True

    cdef int serve_batch(self, uint32_t *count) noexcept nogil:
        cdef Descriptor d
        cdef int taken
        while count[0] < BATCH_LIMIT:
            taken = next_request(self.reader, self.writer, self.reserve, &d)
            if taken == BAD_READ_INDEX:
                return DECLINED  # Python raises it
            if taken != READY:
                return SERVED  # empty, full or corrupt: Python goes on from here
            if self.serve(&d) != SERVED:
                return DECLINED  # left in the ring, unconsumed
            self.reader.consume(&d)
            count[0] += 1
            self.served += 1  # live: another thread may read the counters
            if count[0] % PUBLISH_EVERY == 0 or self.unpublished >= PUBLISH_BYTES:
                if not self.publish():
                    return DECLINED  # a bad read_index: Python raises it
        return SERVED

    cdef bint publish(self) noexcept nogil:
        """RingWriter.commit without the GIL: make the completions written so
        far visible; if the guest sleeps on an empty ring (unmasked, it had
        read everything), ring its doorbell now. False on a bad read_index."""
        cdef uint32_t old = self.writer.published
        self.unpublished = 0
        if self.writer.cursor == old:
            return True
        # Release: the completions' bytes are visible before the index.
        vmbus_store_release(self.writer.write_index, self.writer.cursor)
        self.writer.published = self.writer.cursor
        # Full fence: the index store is ordered before the loads below, so
        # a guest that unmasks and re-checks sees the packets or our signal.
        vmbus_fence_full()
        if vmbus_load_relaxed(self.writer.interrupt_mask):
            return True
        if self.writer.refresh_read() != READY:
            return False
        if self.writer.seen_read == old:
            with gil:
                self.signal_due = False
                try:
                    self.notify_peer.set()
                except OSError:
                    self.signal_due = True  # tried again after the batch
        return True

    cdef int serve(self, Descriptor *d) noexcept nogil:
        """Serve the packet `d` describes (its descriptor already copied out
        and checked by the ring), or decline it, touching nothing."""
        cdef Request r
        cdef uint32_t total = <uint32_t>d.len8 * 8 - DESCRIPTOR_SIZE
        cdef uint32_t header_len = <uint32_t>d.offset8 * 8 - DESCRIPTOR_SIZE
        cdef uint32_t payload_len = total - header_len
        if d.type != GPA_DIRECT and d.type != INBAND:
            return DECLINED
        if total > PACKET_MAX or payload_len < self.packet_size:
            return DECLINED
        # The one copy out of the ring: the guest may rewrite it meanwhile.
        self.reader.copy_out(self.reader.advance(self.reader.cursor, DESCRIPTOR_SIZE),
                             self.private, total)
        cdef const uint8_t *payload = self.private + header_len
        if le32(payload) != EXECUTE_SRB:
            return DECLINED
        r.srb = payload + HEADER
        r.header = self.private
        r.header_len = header_len
        r.ranges = 0
        r.buffer = 0
        if d.type == GPA_DIRECT and not self.check_ranges(&r):
            return DECLINED
        if not self.check_srb(&r):
            return DECLINED
        cdef Lun *lun = &self.luns[r.srb[7]]
        cdef uint64_t moved = 0
        if not self.execute(&r, lun, &moved):
            return DECLINED
        self.unpublished += moved
        return self.complete(payload, moved, d.trans_id)

    cdef bint check_ranges(self, Request *r) noexcept nogil:
        """OpenContext.gpa_ranges on the private copy: ranges that fill the
        header exactly, in guest memory, off the channel's rings."""
        cdef const uint8_t *h = r.header
        cdef uint32_t size = r.header_len, pos = 8, i, k, n
        cdef uint32_t byte_count, byte_offset
        cdef uint64_t pfns = 0, pfn
        if size < 8:
            return False
        cdef uint32_t ranges = le32(h + 4)
        if ranges == 0 or ranges > MAX_RANGES or ranges > (size - 8) // 16:
            return False
        for i in range(ranges):
            if pos + 8 > size:
                return False
            byte_count = le32(h + pos)
            byte_offset = le32(h + pos + 4)
            if byte_count == 0 or byte_offset >= PAGE:
                return False
            n = <uint32_t>((<uint64_t>byte_offset + byte_count + PAGE - 1) // PAGE)
            pfns += n
            if pfns > MAX_PFNS:
                return False
            pos += 8
            if <uint64_t>pos + 8 * <uint64_t>n > size:
                return False
            for k in range(n):
                pfn = le64(h + pos + 8 * k)
                # Inside guest memory, and never one of this channel's rings.
                if pfn >= self.page_count or self.rings[pfn >> 3] & (1 << (pfn & 7)):
                    return False
            pos += 8 * n
            r.buffer += byte_count
        if pos != size:
            return False  # garbage after the last range
        r.ranges = ranges
        return True

    cdef bint check_srb(self, Request *r) noexcept nogil:
        """StorvspProtocol's SRB checks and the address: path 0, target 0, a
        LUN this path serves."""
        cdef const uint8_t *s = r.srb
        cdef uint8_t cdb_length = s[8], direction = s[10]
        r.length = le32(s + 12)
        r.direction = direction
        if cdb_length < 1 or cdb_length > MAX_CDB or s[9] > SENSE_BUFFER:
            return False
        if direction > DATA_NONE or r.length > self.max_transfer:
            return False
        if direction == DATA_NONE and r.length:
            return False
        if r.length > r.buffer:
            return False
        return s[5] == 0 and s[6] == 0 and self.luns[s[7]].present

    cdef bint execute(self, Request *r, Lun *lun, uint64_t *moved) noexcept nogil:
        """ScsiDisk.execute for the commands served here, success only."""
        cdef const uint8_t *cdb = r.srb + 16
        cdef uint8_t cdb_length = r.srb[8], op = cdb[0], flags = 0
        cdef uint64_t lba, blocks
        cdef int layout
        if op == 0x08 or op == 0x0A:  # READ (6), WRITE (6)
            layout = 6
            lba = (<uint64_t>(cdb[1] & 0x1F) << 16) | be16(cdb + 2)
            blocks = cdb[4] if cdb[4] else 256
        elif op == 0x28 or op == 0x2A or op == 0x35:  # READ/WRITE/SYNCHRONIZE CACHE (10)
            layout = 10
            flags, lba, blocks = cdb[1], be32(cdb + 2), be16(cdb + 7)
        elif op == 0xA8 or op == 0xAA:  # READ/WRITE (12)
            layout = 12
            flags, lba, blocks = cdb[1], be32(cdb + 2), be32(cdb + 6)
        elif op == 0x88 or op == 0x8A or op == 0x91:  # READ/WRITE/SYNCHRONIZE CACHE (16)
            layout = 16
            flags, lba, blocks = cdb[1], be64(cdb + 2), be32(cdb + 10)
        else:
            return False
        if cdb_length < layout or cdb[layout - 1] & CONTROL_BAD:
            return False  # short CDB, NACA or LINK: INVALID FIELD IN CDB
        # LBA range, without overflow: lba + blocks <= block_count.
        if lba > lun.block_count or blocks > lun.block_count - lba:
            return False
        if op == 0x35 or op == 0x91:
            moved[0] = 0
            return self.flush(lun)
        cdef bint write = op == 0x0A or op == 0x2A or op == 0xAA or op == 0x8A
        cdef uint64_t nbytes = blocks * lun.block_size
        if flags & PROTECT_MASK or blocks == 0 or nbytes > lun.max_transfer:
            return False
        # The data phase: the declared direction, inside the buffer.
        if r.direction != (DATA_OUT if write else DATA_IN) or nbytes > r.length:
            return False
        if write and lun.read_only:
            return False
        if not self.transfer(r, lun, lba * lun.block_size, nbytes, write):
            return False
        if write and flags & FUA and not self.flush(lun):
            return False
        moved[0] = nbytes
        return True

    cdef bint flush(self, Lun *lun) noexcept nogil:
        while fdatasync(lun.fd) != 0:
            if errno != EINTR:
                return False  # the Python path reports the failure
        return True

    cdef bint transfer(self, Request *r, Lun *lun, uint64_t offset, uint64_t nbytes,
                       bint write) noexcept nogil:
        """preadv/pwritev between the file and the first `nbytes` of the
        guest's buffer, one iovec per run of consecutive pages."""
        cdef int count = self.build_iov(r, nbytes)
        if count <= 0:
            return False
        cdef int first = 0
        cdef ssize_t done
        while first < count:
            if write:
                done = pwritev(lun.fd, &self.iov[first], count - first, <off_t>offset)
            else:
                done = preadv(lun.fd, &self.iov[first], count - first, <off_t>offset)
            if done < 0:
                if errno == EINTR:
                    continue
                return False
            if done == 0:
                if write:
                    return False  # wrote nothing: the Python path fails it (EIO)
                while first < count:  # end of file inside the disk: sparse zeros
                    memset(self.iov[first].iov_base, 0, self.iov[first].iov_len)
                    first += 1
                return True
            offset += done
            while first < count and <size_t>done >= self.iov[first].iov_len:
                done -= self.iov[first].iov_len
                first += 1
            if done:
                self.iov[first].iov_base = <uint8_t *>self.iov[first].iov_base + done
                self.iov[first].iov_len -= done
        return True

    cdef int build_iov(self, Request *r, uint64_t nbytes) noexcept nogil:
        """The iovecs of the buffer's first `nbytes`, as guest_segments cuts
        them; -1 when there would be more than IOV_LIMIT."""
        cdef const uint8_t *h = r.header
        cdef uint32_t pos = 8, i, k, n, byte_count, byte_offset
        cdef uint64_t start, end, size, pfn, left = nbytes
        cdef uint8_t *at
        cdef int count = 0
        for i in range(r.ranges):
            if left == 0:
                break
            byte_count = le32(h + pos)
            byte_offset = le32(h + pos + 4)
            n = <uint32_t>((<uint64_t>byte_offset + byte_count + PAGE - 1) // PAGE)
            pos += 8
            start, end = byte_offset, <uint64_t>byte_offset + byte_count
            for k in range(n):
                if left == 0:
                    break
                pfn = le64(h + pos + 8 * k)
                # This page's part of the range, cut to what is left.
                size = min(end, (<uint64_t>k + 1) * PAGE) - start
                if size > left:
                    size = left
                at = self.base + pfn * PAGE + (start - <uint64_t>k * PAGE)
                if count and <uint8_t *>self.iov[count - 1].iov_base \
                        + self.iov[count - 1].iov_len == at:
                    self.iov[count - 1].iov_len += size  # the next page of a run
                else:
                    if count == IOV_LIMIT:
                        return -1
                    self.iov[count].iov_base = at
                    self.iov[count].iov_len = size
                    count += 1
                left -= size
                start += size
            pos += 8 * n
        return count if left == 0 else -1

    cdef int complete(self, const uint8_t *payload, uint64_t moved,
                      uint64_t trans_id) noexcept nogil:
        """StorvspProtocol.complete_srb(request, SUCCESS, GOOD, b"", moved),
        written into the ring as the completion of `trans_id`."""
        cdef uint8_t *out = self.reply
        cdef uint8_t *srb = out + HEADER
        memset(out, 0, VSTOR_PACKET)
        put_le32(out, COMPLETE_IO)  # flags 0, status STATUS_SUCCESS
        memcpy(srb, payload + HEADER, self.packet_size - HEADER)
        srb[2] = SRB_SUCCESS
        srb[3] = 0          # scsi_status GOOD
        srb[9] = 0          # sense_info_length: no sense
        put_le32(srb + 12, <uint32_t>moved)  # data_transfer_length: bytes moved
        memset(srb + 16, 0, SENSE_BUFFER)  # the cdb/sense union, now empty sense
        if self.writer.put(out, self.packet_size, COMPLETION, 0, trans_id, NULL, 0) != READY:
            return DECLINED  # cannot happen past the reserve; Python reports it
        return SERVED

