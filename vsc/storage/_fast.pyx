# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""storvsc's compiled steady state: the EXECUTE_SRB packet, the GPA-direct
header of a contiguous guest run, and the parse of a completion, with the
varying fields packed in place into precomputed templates; and
`GuestBuffer`, the buffer a child program reads into and writes from
without a bounce copy.

The declared structs of vmbus.protocols.storage (wire.py, vsc.py) stay the
definition: the storage tests check these byte for byte against them
(tests/storage/test_vsc_fast.py), for random and hostile input alike.
"""

from cpython.buffer cimport (
    PyBUF_ANY_CONTIGUOUS,
    PyBUF_SIMPLE,
    PyBUF_WRITABLE,
    PyBuffer_FillInfo,
    PyBuffer_Release,
    PyObject_GetBuffer,
)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.memoryview cimport PyMemoryView_FromObject
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

from vmbus._cring cimport BAD_READ_INDEX, EMPTY, READY, Descriptor, RingReader, RingWriter

from vmbus.errors import UsageError
from vmbus.memory import PAGE_SIZE
from vmbus.packet import PacketError
from vmbus.protocols.storage.vsc import SrbCompletion
from vmbus.protocols.storage.wire import Operation, StorageProtocolError
from vmbus.wire import WireError, open_enum

# vstor_packet and its vmscsi_request (wire.py): offsets from the packet start.
cdef enum:
    PACKET = 64
    PRE_WIN8_PACKET = 48
    WIN8 = 0x0501
    WIN10 = 0x0602
    SRB_LENGTH = 52
    PRE_WIN8_SRB_LENGTH = 36
    SENSE = 20
    PRE_WIN8_SENSE = 18
    MAX_CDB = 16
    OP_EXECUTE_SRB = 3
    OP_COMPLETE_IO = 1
    REQUEST_COMPLETION_FLAG = 1
    AT_OPERATION = 0
    AT_FLAGS = 4
    AT_STATUS = 8
    AT_LENGTH = 12
    AT_SRB_STATUS = 14
    AT_SCSI_STATUS = 15
    AT_PORT = 16
    AT_PATH = 17
    AT_TARGET = 18
    AT_LUN = 19
    AT_CDB_LENGTH = 20
    AT_SENSE_LENGTH = 21
    AT_DATA_IN = 22
    AT_TRANSFER = 24
    AT_DATA = 28
    AT_SRB_FLAGS = 52
    AT_TIME_OUT = 56
    VM_PKT_COMP = 0xB
    VM_PKT_DATA_INBAND = 0x6
    VM_PKT_DATA_USING_GPA_DIRECT = 0x9
    COMPLETION_REQUESTED = 0x1
    AUTOSENSE_VALID = 0x80
    SRB_STATUS_CODE = 0x3F  # srb_status without QUEUE_FROZEN and AUTOSENSE_VALID
    SRB_SUCCESS = 0x01
    DISABLE_SYNCH_TRANSFER = 0x08
    DATA_IN = 0x40
    DATA_OUT = 0x80
    READ_TYPE = 1
    WRITE_TYPE = 0
    UNKNOWN_TYPE = 2
    READ_16 = 0x88
    WRITE_16 = 0x8A
    FUA = 0x08
    TIME_OUT = 60
    # GPA-direct header (vmbus.packet): reserved, rangecount; byte_count, byte_offset, pfns.
    PAGE_SHIFT = 12
    PAGE = 1 << PAGE_SHIFT
    GPA_FIXED = 16
    MAX_GPA_PFNS = 8192

if PAGE != PAGE_SIZE:
    raise ImportError(f"vsc.storage._fast is built for {PAGE}-byte pages, not {PAGE_SIZE}")


cdef inline void put16(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = v >> 8


cdef inline void put32(uint8_t *p, uint32_t v) noexcept nogil:
    memcpy(p, &v, 4)  # x86-64: little-endian, as the wire


cdef inline void put32be(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = (v >> 24) & 0xFF
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF


cdef inline uint32_t get32(const uint8_t *p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


cdef inline uint8_t direction_flags(int direction) noexcept nogil:
    if direction == WRITE_TYPE:
        return DATA_OUT
    if direction == READ_TYPE:
        return DATA_IN
    return 0


cdef inline void srb_template(uint8_t *p, int win8, int lun, int direction,
                              uint32_t transfer_length) noexcept nogil:
    """The fields every SRB of this VSC shares, as vstor.build_srb sets them."""
    memset(p, 0, PACKET)
    p[AT_OPERATION] = OP_EXECUTE_SRB
    p[AT_FLAGS] = REQUEST_COMPLETION_FLAG
    put16(p + AT_LENGTH, SRB_LENGTH if win8 else PRE_WIN8_SRB_LENGTH)
    p[AT_LUN] = lun
    p[AT_SENSE_LENGTH] = SENSE if win8 else PRE_WIN8_SENSE
    p[AT_DATA_IN] = direction
    put32(p + AT_TRANSFER, transfer_length)
    if win8:
        put32(p + AT_SRB_FLAGS, DISABLE_SYNCH_TRANSFER | direction_flags(direction))
        put32(p + AT_TIME_OUT, TIME_OUT)


cdef inline bint in_range(object value, uint64_t limit):
    return 0 <= value < limit


def build_srb(cdb, lun, direction, transfer_length, sense_info_length=None, *,
              target_id=0, path_id=0, port_number=0, srb_flags=None, time_out_value=60,
              version=WIN10):
    """vstor.build_srb, packed in place: the same bytes, the same errors."""
    cdef uint8_t p[PACKET]
    cdef Py_buffer c
    cdef Py_ssize_t n
    cdef int win8 = version >= WIN8
    if not 1 <= len(cdb) <= MAX_CDB:
        raise UsageError(f"a CDB is 1..{MAX_CDB} bytes, got {len(cdb)}")
    if direction not in (WRITE_TYPE, READ_TYPE, UNKNOWN_TYPE):
        raise ValueError(f"{direction!r} is not a valid DataDirection")
    if srb_flags is None:
        srb_flags = DISABLE_SYNCH_TRANSFER | direction_flags(direction)
    if sense_info_length is None:
        sense_info_length = SENSE if win8 else PRE_WIN8_SENSE
    for name, value, limit in (
        ("lun", lun, 1 << 8), ("sense_info_length", sense_info_length, 1 << 8),
        ("target_id", target_id, 1 << 8), ("path_id", path_id, 1 << 8),
        ("port_number", port_number, 1 << 8), ("data_transfer_length", transfer_length, 1 << 32),
        ("srb_flags", srb_flags, 1 << 32), ("time_out_value", time_out_value, 1 << 32),
    ):
        if not in_range(value, limit):
            raise WireError(f"VmScsiRequest: {name} {value} is out of range")
    srb_template(p, win8, lun, direction, transfer_length)
    p[AT_PORT] = port_number
    p[AT_PATH] = path_id
    p[AT_TARGET] = target_id
    p[AT_SENSE_LENGTH] = sense_info_length
    PyObject_GetBuffer(cdb, &c, PyBUF_SIMPLE)
    try:
        n = c.len
        p[AT_CDB_LENGTH] = n
        memcpy(p + AT_DATA, c.buf, n)
    finally:
        PyBuffer_Release(&c)
    put32(p + AT_SRB_FLAGS, srb_flags)
    put32(p + AT_TIME_OUT, time_out_value)
    return PyBytes_FromStringAndSize(<char *>p, PACKET if win8 else PRE_WIN8_PACKET)


cdef bytes rw16_packet(int lun, bint write, bint fua, uint64_t lba, uint32_t blocks,
                       uint32_t transfer_length, int version):
    cdef uint8_t p[PACKET]
    cdef int win8 = version >= WIN8
    cdef int i
    if not 0 <= lun < 256:
        raise WireError(f"VmScsiRequest: lun {lun} is out of range")
    srb_template(p, win8, lun, WRITE_TYPE if write else READ_TYPE, transfer_length)
    p[AT_CDB_LENGTH] = 16
    p[AT_DATA] = WRITE_16 if write else READ_16
    p[AT_DATA + 1] = FUA if fua else 0
    for i in range(8):
        p[AT_DATA + 2 + i] = (lba >> (56 - 8 * i)) & 0xFF
    put32be(p + AT_DATA + 10, blocks)
    return PyBytes_FromStringAndSize(<char *>p, PACKET if win8 else PRE_WIN8_PACKET)


def build_rw16(int lun, bint write, bint fua, uint64_t lba, uint32_t blocks,
               uint32_t transfer_length, int version=WIN10):
    """The EXECUTE_SRB of a READ(16) or WRITE(16), its CDB packed in place:
    vstor.build_srb(Rw16Cdb(opcode, FUA if fua else 0, lba, blocks, 0, 0).pack(), ...)."""
    return rw16_packet(lun, write, fua, lba, blocks, transfer_length, version)


def gpa_header(uint64_t gpa, Py_ssize_t length):
    """The GPA-direct header of one range: `length` bytes of contiguous guest
    memory from `gpa` (a bounce slot, a GuestBuffer, or a slice of one)."""
    cdef uint32_t offset = gpa & (PAGE - 1)
    cdef uint64_t pfn = gpa >> PAGE_SHIFT
    cdef Py_ssize_t pages, i
    if not 0 < length < (<Py_ssize_t>1 << 32):
        raise PacketError(f"GPA range byte_count {length} is not in [1, 2**32)")
    pages = (offset + length + PAGE - 1) >> PAGE_SHIFT
    if pages > MAX_GPA_PFNS:
        raise PacketError(f"{pages} PFNs exceed the limit of {MAX_GPA_PFNS} per packet")
    header = PyBytes_FromStringAndSize(NULL, GPA_FIXED + 8 * pages)
    cdef uint8_t *p = <uint8_t *>PyBytes_AS_STRING(header)
    cdef uint64_t *pfns = <uint64_t *>(p + GPA_FIXED)
    put32(p, 0)
    put32(p + 4, 1)
    put32(p + 8, <uint32_t>length)
    put32(p + 12, offset)
    for i in range(pages):
        pfns[i] = pfn + i
    return header


cdef int copy_reply(object payload, uint8_t *p, Py_ssize_t *size) except -1:
    """The reply's first 64 bytes, copied once (zero-filled past its end)."""
    cdef Py_buffer b
    PyObject_GetBuffer(payload, &b, PyBUF_SIMPLE)
    try:
        size[0] = b.len
        memset(p, 0, PACKET)
        memcpy(p, b.buf, b.len if b.len < PACKET else PACKET)
    finally:
        PyBuffer_Release(&b)
    return 0


def completed(payload):
    """The hot path of a completion: the bytes moved when `payload` is a
    well-formed COMPLETE_IO whose SRB succeeded; -1 for anything else (then
    parse_completion says what it is)."""
    cdef uint8_t p[PACKET]
    cdef Py_ssize_t size
    copy_reply(payload, p, &size)
    if size < PRE_WIN8_PACKET or get32(p + AT_OPERATION) != OP_COMPLETE_IO:
        return -1
    if p[AT_SRB_STATUS] & SRB_STATUS_CODE != SRB_SUCCESS:
        return -1
    return get32(p + AT_TRANSFER)


def parse_completion(payload):
    """vstor.parse_completion from one private copy: the same SrbCompletion
    and the same StorageProtocolError."""
    cdef uint8_t p[PACKET]
    cdef Py_ssize_t size
    cdef uint32_t operation
    cdef int sense_length
    copy_reply(payload, p, &size)
    if size < PRE_WIN8_PACKET:
        raise StorageProtocolError(f"vstor_packet of {size} bytes, needs {PRE_WIN8_PACKET}")
    operation = get32(p + AT_OPERATION)
    if operation != OP_COMPLETE_IO:
        raise StorageProtocolError(f"reply is operation {open_enum(Operation, operation)!r}")
    sense = b""
    if p[AT_SRB_STATUS] & AUTOSENSE_VALID:
        sense_length = min(p[AT_SENSE_LENGTH], SENSE)
        sense = PyBytes_FromStringAndSize(<char *>p + AT_DATA, sense_length)
    return SrbCompletion(
        get32(p + AT_STATUS), p[AT_SRB_STATUS], p[AT_SCSI_STATUS], sense, get32(p + AT_TRANSFER)
    )


def guest_span(obj, Py_ssize_t base, Py_ssize_t size, bint writable):
    """(gpa, nbytes) of a C-contiguous buffer that lies wholly inside guest
    memory mapped at `base` (`size` bytes); gpa -1 when it does not. With
    `writable`, a read-only buffer is refused (BufferError)."""
    cdef Py_buffer b
    cdef Py_ssize_t at, gpa = -1
    PyObject_GetBuffer(obj, &b, PyBUF_ANY_CONTIGUOUS | (PyBUF_WRITABLE if writable else 0))
    try:
        at = <Py_ssize_t>b.buf - base
        if 0 <= at and b.len <= size - at:
            gpa = at
        return gpa, b.len
    finally:
        PyBuffer_Release(&b)


def address_of(obj):
    """Where a buffer's bytes start in this process."""
    cdef Py_buffer b
    PyObject_GetBuffer(obj, &b, PyBUF_SIMPLE)
    try:
        return <Py_ssize_t>b.buf
    finally:
        PyBuffer_Release(&b)


cdef class GuestBuffer:
    """Bytes in guest memory that the VSC owns (its pages granted to no one
    else), exported as a writable buffer: memoryview(b), numpy.frombuffer(b),
    bytes(b), b[i:j]. Reads and writes of a BlockDevice into or from it (or
    any slice of it) move no bounce copy: the SRB names its pages.

    `release()` (or leaving `with`) hands the pages back; while views of it
    are alive they stay allocated, and are freed when the last one goes."""

    cdef Py_buffer view        # of guest memory, held while the pages are ours
    cdef object on_free        # called with the PFNs once; None after
    cdef readonly object pfns  # the pages, consecutive
    cdef readonly Py_ssize_t gpa, nbytes
    cdef Py_ssize_t exports
    cdef bint _released
    cdef bint holding          # self.view is acquired

    def __cinit__(self, memory_view, pfns, Py_ssize_t gpa, Py_ssize_t nbytes, on_free):
        PyObject_GetBuffer(memory_view, &self.view, PyBUF_WRITABLE | PyBUF_ANY_CONTIGUOUS)
        if self.view.len < nbytes:
            PyBuffer_Release(&self.view)
            raise ValueError(f"a view of {self.view.len} bytes cannot hold {nbytes}")
        self.holding = True
        self.pfns, self.gpa, self.nbytes, self.on_free = tuple(pfns), gpa, nbytes, on_free

    def __dealloc__(self):
        if self.holding:
            PyBuffer_Release(&self.view)

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        if self._released:
            raise ValueError("operation on a released GuestBuffer")
        PyBuffer_FillInfo(buffer, self, self.view.buf, self.nbytes, 0, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *buffer):
        self.exports -= 1
        if self._released and self.exports == 0:
            self._free()

    def __len__(self):
        return self.nbytes

    @property
    def released(self):
        return self._released

    def __getitem__(self, index):
        return memoryview(self)[index]

    def __setitem__(self, index, value):
        memoryview(self)[index] = value

    cdef int _free(self) except -1:
        on_free, self.on_free = self.on_free, None
        if self.holding:
            self.holding = False
            PyBuffer_Release(&self.view)
        if on_free is not None:
            on_free(self)
        return 0

    def release(self):
        """Give the pages back (now, or when the last view of them goes).
        Idempotent."""
        if self._released:
            return
        self._released = True
        if self.exports == 0:
            self._free()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __repr__(self):
        state = "released" if self._released else f"{self.exports} views"
        return f"GuestBuffer({self.nbytes} bytes at gpa {self.gpa:#x}, {state})"


def rw_command(obj, bint write, bint fua, Py_ssize_t offset, int lun, Py_ssize_t block_size,
               Py_ssize_t capacity, Py_ssize_t max_io, int version, Py_ssize_t base,
               Py_ssize_t size, Py_ssize_t index):
    """One READ(16)/WRITE(16) request in the controller's command form,
    (packet, nbytes, gpa, view, reading, index) (controller.py), when it
    fits one SRB; None when it must be split (nbytes > max_io). `gpa` is
    the buffer's place in guest memory (zero copy), or -1: bounce. Raises
    UsageError for an offset or length off the block grid or past the disk."""
    cdef Py_buffer b
    cdef Py_ssize_t gpa = -1, at, nbytes
    PyObject_GetBuffer(obj, &b, PyBUF_ANY_CONTIGUOUS | (0 if write else PyBUF_WRITABLE))
    try:
        nbytes = b.len
        at = <Py_ssize_t>b.buf - base
        if 0 <= at and nbytes <= size - at:
            gpa = at
    finally:
        PyBuffer_Release(&b)
    if offset % block_size or nbytes % block_size or offset < 0:
        raise UsageError(f"offset {offset} and length {nbytes} must be multiples of {block_size}")
    if offset + nbytes > capacity:
        raise UsageError(f"{nbytes} bytes at {offset} run past the disk's {capacity}")
    if nbytes > max_io:
        return None
    packet = rw16_packet(lun, write, fua, offset // block_size, nbytes // block_size, nbytes,
                         version)
    return packet, nbytes, gpa, PyMemoryView_FromObject(obj), not write, index


def copy(dst, src, Py_ssize_t n):
    """memcpy of n bytes between two C-contiguous buffers of any format
    (a bounce slot and a caller's buffer); n is clamped to both."""
    copy_buffers(dst, src, n)


cdef int copy_buffers(object dst, object src, Py_ssize_t n) except -1:
    cdef Py_buffer d, s
    PyObject_GetBuffer(dst, &d, PyBUF_ANY_CONTIGUOUS | PyBUF_WRITABLE)
    try:
        PyObject_GetBuffer(src, &s, PyBUF_ANY_CONTIGUOUS)
        try:
            n = min(n, d.len, s.len)
            if n >= 65536:
                with nogil:
                    memcpy(d.buf, s.buf, n)
            elif n > 0:
                memcpy(d.buf, s.buf, n)
        finally:
            PyBuffer_Release(&s)
    finally:
        PyBuffer_Release(&d)
    return 0


def reap(RingReader reader, dict flight, list free, list failures, finish):
    """Read every packet `reader` holds (the caller commits). For each
    completion of a request in `flight` ({trans_id: (command, slot)},
    controller.py): its slot goes back to `free`; a success is finished in
    place (a bounce read copied out of its slot); anything else goes to
    finish(command, slot, payload), which gets a private copy of the
    reply's first 64 bytes, and whose error is appended to `failures` as
    (index, error). Other packets are skipped. Returns the completions."""
    cdef Descriptor d
    cdef uint8_t p[PACKET]
    cdef uint32_t size, taken
    cdef Py_ssize_t count = 0
    while reader.check(&d) != EMPTY:
        if d.type != VM_PKT_COMP:
            reader.consume(&d)
            continue  # unsolicited (ENUMERATE_BUS...): nothing to do for a fixed disk
        entry = flight.pop(d.trans_id, None)
        if entry is None:
            reader.consume(&d)
            continue  # no request of ours
        # One copy of the reply out of the ring: everything below reads it.
        size = (<uint32_t>d.len8 - d.offset8) * 8
        taken = size if size < PACKET else PACKET
        memset(p, 0, PACKET)
        reader.copy_out(reader.advance(reader.cursor, <uint32_t>d.offset8 * 8), p, taken)
        reader.consume(&d)
        command, slot = entry
        free.append(slot)
        count += 1
        if (size >= PRE_WIN8_PACKET and get32(p + AT_OPERATION) == OP_COMPLETE_IO
                and p[AT_SRB_STATUS] & SRB_STATUS_CODE == SRB_SUCCESS):
            if command[2] < 0 and command[4]:  # a bounce read: out of its slot
                copy_buffers(command[3], slot.view, min(<Py_ssize_t>get32(p + AT_TRANSFER),
                                                        <Py_ssize_t>command[1]))
            continue
        failure = finish(command, slot, PyBytes_FromStringAndSize(<char *>p, taken))
        if failure is not None:
            failures.append((command[5], failure))
    return count


def submit(RingWriter writer, pending, stalled, dict flight, list free, Py_ssize_t spare, ids):
    """Write commands (controller.py's form) on one channel while more than
    `spare` slots are free (the caller commits): each takes a slot, its
    GPA-direct header (the buffer's pages for zero copy; else the slot's,
    after a bounce write's data is copied in) and the next trans_id, and
    goes into `flight`. Returns (the command the ring had no room for, or
    None; whether `pending` may hold more; how many were written)."""
    cdef Py_ssize_t written = 0
    cdef int result
    cdef bint more = True
    while len(free) > spare:
        command = stalled if stalled is not None else next(pending, None)
        stalled = None
        if command is None:
            more = False
            break
        packet, length, gpa, data, reading, _ = command
        slot = free.pop()
        if not length:
            header, kind = b"", VM_PKT_DATA_INBAND
        elif gpa >= 0:
            header, kind = gpa_header(gpa, length), VM_PKT_DATA_USING_GPA_DIRECT
        else:
            if not reading:
                copy_buffers(slot.view, data, length)
            header, kind = slot.header(length), VM_PKT_DATA_USING_GPA_DIRECT
        trans_id = next(ids)
        writer.check_fits(len(<bytes>packet), len(<bytes>header))
        result = writer.put(<const uint8_t *>PyBytes_AS_STRING(packet), len(<bytes>packet), kind,
                            COMPLETION_REQUESTED, trans_id,
                            <const uint8_t *>PyBytes_AS_STRING(header), len(<bytes>header))
        if result == BAD_READ_INDEX:
            free.append(slot)
            writer.raise_bad_read_index()
        if result != READY:  # the ring is full: room comes back as completions are read
            free.append(slot)
            stalled = command
            break
        flight[trans_id] = (command, slot)
        written += 1
    return stalled, more, written

