# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""netvsc's compiled steady state: a batch of frames framed as RNDIS PACKET
messages straight into send sections and announced with one commit, and
the host's packets (send completions, transfer-page packets of frames)
handled from the ring with one commit each way.

The Python path of `vsc.net.NetAdapter` stays the definition: `pack` writes
the bytes `send_batch`'s Python loop writes (rndis_wire.encode_packet, padded
to the device's alignment, batched as the loop batches them), and `reap`
handles only what `_handle` would handle the same way without an error: a
SUCCESS completion of one of our sends, and a transfer-page packet whose
every range is a well-formed PACKET message, its per-packet info (checksum
info, RSC fragments) what `rsc.Reassembly` would take without a drop:
whole fragment runs are joined here into one frame. It stops at anything
else and leaves it in the ring for `_handle`.
tests/net/test_vsc_fast.py holds the two together.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

from vmbus._cring cimport BAD_READ_INDEX, DESCRIPTOR_SIZE, READY, Descriptor, RingReader, RingWriter

from vmbus.errors import UsageError
from vmbus.packet import MAX_TRANSFER_RANGES as _MAX_RANGES
from vmbus.protocols.net import rsc as _rsc
from vmbus.protocols.net import rndis_wire as _rw
from vmbus.protocols.net import wire as _nvsp

_Received = _rsc.Received

__all__ = ["Engine"]

DEF PACKET_HEADER = 44       # rndis_wire.PacketHeader.SIZE
DEF PACKET_BODY = 36         # where Linux puts its PPIs: PacketHeader.SIZE - 8
DEF RNDIS_HEADER = 8
DEF RNDIS_PACKET = 1
DEF NVSP_SIZE = 40
DEF SEND_RNDIS_PKT = 107
DEF SEND_RNDIS_PKT_COMPLETE = 108
DEF SUCCESS = 1              # NvspStatus.SUCCESS
DEF INBAND = 0x6
DEF XFER_PAGES = 0x7
DEF COMPLETION = 0xB
DEF COMPLETION_REQUESTED = 0x1
DEF XFER_FIXED = 8           # transfer-page header: pageset id, owns, reserved, range count
DEF REAP_LIMIT = 4096        # packets per call
DEF MAX_RANGES = 562         # vmbus.packet.MAX_TRANSFER_RANGES
DEF MAX_PPIS = 32            # rndis_wire.MAX_PPIS
DEF PPI_HEADER = 12
DEF PPI_CHECKSUM = 0         # offload.PPI_CHECKSUM
DEF PPI_PKTINFO_LOW = 1      # rsc.PPI_PKTINFO, less the internal bit (31)
DEF FRAG_SUBALLOC = 0x1
DEF FRAG_FIRST = 0x2
DEF FRAG_LAST = 0x4
DEF RX_CHECKSUM_OK = 0x18    # offload.RX_TCP_OK | RX_UDP_OK
DEF RSC_MAX = 562            # rsc.RSC_MAX_FRAGMENTS

if (_rw.PacketHeader.SIZE != PACKET_HEADER or _nvsp.NvspStatus.SUCCESS != SUCCESS
        or _MAX_RANGES != MAX_RANGES or _rw.MAX_PPIS != MAX_PPIS
        or _rsc.PPI_PKTINFO != (1 << 31 | PPI_PKTINFO_LOW) or _rsc.RSC_MAX_FRAGMENTS != RSC_MAX
        or _rsc.RX_TCP_OK | _rsc.RX_UDP_OK != RX_CHECKSUM_OK
        or (_rsc.FRAG_SUBALLOC, _rsc.FRAG_FIRST, _rsc.FRAG_LAST) != (FRAG_SUBALLOC, FRAG_FIRST, FRAG_LAST)):
    raise ImportError("vsc.net._fast was built for other RNDIS/NVSP constants")


cdef inline uint32_t le32(const uint8_t *p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)  # x86-64: little-endian, as the wire
    return v


cdef inline void put32(uint8_t *p, uint32_t v) noexcept nogil:
    memcpy(p, &v, 4)


cdef inline bint read_ppis(const uint8_t *info, uint32_t size, uint32_t *flag,
                           uint32_t *checksum) noexcept nogil:
    """rndis_wire._decode_ppis's checks, and the values Reassembly.add takes
    (the RSC flag and the checksum info, the last of each type, a value of
    4 bytes or more); False when the Python decoder would raise."""
    cdef uint32_t pos = 0, count = 0, ppi_size, ppi_type, ppi_offset
    while pos < size:
        if count == MAX_PPIS or size - pos < PPI_HEADER:
            return False
        ppi_size, ppi_type, ppi_offset = le32(info + pos), le32(info + pos + 4), le32(info + pos + 8)
        if ppi_size < PPI_HEADER or ppi_size > size - pos:
            return False
        if ppi_offset < PPI_HEADER or ppi_offset > ppi_size:
            return False
        if ppi_size - ppi_offset >= 4:
            if ppi_type >> 31 and ppi_type & 0x7FFFFFFF == PPI_PKTINFO_LOW:  # PPI_PKTINFO
                flag[0] = info[pos + ppi_offset + 1]
            elif ppi_type == PPI_CHECKSUM:
                checksum[0] = le32(info + pos + ppi_offset)
        pos += ppi_size
        count += 1
    return True


cdef class Engine:
    """The compiled send and receive loops of one NetAdapter's channel."""

    cdef RingWriter writer
    cdef RingReader reader
    cdef object notify_peer
    cdef object channel
    cdef object send_obj          # the buffers, taken for the length of each call
    cdef object recv_obj
    cdef Py_buffer send_view
    cdef Py_buffer recv_view
    cdef bint holding
    cdef uint32_t section_size
    cdef uint32_t max_packets
    cdef uint32_t alignment
    cdef uint32_t max_ranges
    cdef uint8_t template[NVSP_SIZE]
    cdef uint8_t done[8]
    cdef uint32_t frame_at[MAX_RANGES]       # one transfer-page packet's checked frames
    cdef uint32_t frame_len[MAX_RANGES]
    cdef uint32_t frame_flag[MAX_RANGES]     # its RSC flag (0: a frame of its own)
    cdef uint32_t frame_csum[MAX_RANGES]     # its checksum info
    cdef bint frame_ppi[MAX_RANGES]          # it carried per-packet info
    cdef public object reassembly            # the adapter's rsc.Reassembly
    cdef public unsigned long long sent       # frames framed here
    cdef public unsigned long long received   # frames taken from the ring here

    def __cinit__(self, channel, send_view, recv_view, uint32_t section_size,
                  uint32_t max_packets, uint32_t alignment):
        # TypeError unless the channel runs on the Cython ring.
        self.writer = channel.writer
        self.reader = channel.reader
        self.channel = channel
        self.notify_peer = channel.notify_peer
        if alignment == 0 or alignment & (alignment - 1) or max_packets == 0:
            raise UsageError("alignment must be a power of two, max_packets above 0")
        memoryview(send_view).cast("B")[:0]  # TypeError now if not a writable buffer
        if memoryview(send_view).readonly:
            raise TypeError("the send buffer must be writable")
        self.send_obj, self.recv_obj = send_view, recv_view
        self.holding = True
        self.section_size, self.max_packets, self.alignment = section_size, max_packets, alignment
        self.max_ranges = MAX_RANGES
        template = _nvsp.send_rndis_packet(_nvsp.RndisChannel.DATA, 0, 0)
        memcpy(self.template, <const char *>template, NVSP_SIZE)
        done = _nvsp.SendRndisPacketComplete(status=SUCCESS).pack()
        memcpy(self.done, <const char *>done, 8)

    cpdef release(self):
        """Let go of the buffers of guest memory and the rings (before the
        adapter unmaps them)."""
        self.holding = False
        self.send_obj = self.recv_obj = None
        self.writer = None
        self.reader = None
        self.channel = None
        self.notify_peer = None

    # --- sending ---------------------------------------------------------------

    def pack(self, frames, Py_ssize_t start, free, dict sending, ids):
        """Frame frames[start:] into free send sections (taken from `free`,
        recorded in `sending` by trans_id from `ids`) and write their
        SEND_RNDIS_PKTs, committing once. Returns (the index of the first
        frame not sent, and None or (payload, trans_id) of a packet the ring
        had no room for: its section is filled and recorded, the caller sends it)."""
        if not self.holding:
            raise UsageError("the adapter is closed")
        PyObject_GetBuffer(self.send_obj, &self.send_view, PyBUF_WRITABLE)
        try:
            return self.pack_into(frames, start, free, sending, ids)
        finally:
            PyBuffer_Release(&self.send_view)

    cdef object pack_into(self, frames, Py_ssize_t start, free, dict sending, ids):
        cdef Py_ssize_t n = len(frames), i = start, first, k
        cdef uint32_t used, count, message, length, section
        cdef uint8_t *base
        cdef Py_buffer frame
        cdef int result
        cdef uint8_t payload[NVSP_SIZE]
        stalled = None
        written = 0
        while i < n and free:
            # Size the section's batch first: a frame too large raises before
            # anything of this section is written (as the Python loop does).
            first, used, count = i, 0, 0
            while i < n and count < self.max_packets:
                length = len(frames[i])
                if length == 0:
                    raise UsageError("an RNDIS packet carries a frame")
                message = (PACKET_HEADER + length + self.alignment - 1) & ~(self.alignment - 1)
                if message > self.section_size:
                    raise UsageError(f"frame of {length} bytes is too large for the send section")
                if count and used + message > self.section_size:
                    break
                used += message
                count += 1
                i += 1
            section = free.popleft()
            if section >= (<uint64_t>self.send_view.len) // self.section_size:
                raise UsageError(f"send section {section} is outside the send buffer")
            base = <uint8_t *>self.send_view.buf + <uint64_t>section * self.section_size
            used = 0
            for k in range(first, i):
                PyObject_GetBuffer(frames[k], &frame, PyBUF_SIMPLE)
                try:
                    length = frame.len
                    message = (PACKET_HEADER + length + self.alignment - 1) & ~(self.alignment - 1)
                    memset(base + used, 0, PACKET_HEADER)
                    put32(base + used, RNDIS_PACKET)
                    put32(base + used + 4, message)
                    put32(base + used + 8, PACKET_BODY)
                    put32(base + used + 12, length)
                    put32(base + used + 28, PACKET_BODY)
                    memcpy(base + used + PACKET_HEADER, frame.buf, length)
                    memset(base + used + PACKET_HEADER + length, 0,
                           message - PACKET_HEADER - length)
                finally:
                    PyBuffer_Release(&frame)
                used += message
            trans_id = next(ids)
            sending[trans_id] = section
            memcpy(payload, self.template, NVSP_SIZE)
            put32(payload + 8, section)
            put32(payload + 12, used)
            self.sent += i - first
            result = self.writer.put(payload, NVSP_SIZE, INBAND, COMPLETION_REQUESTED,
                                     <uint64_t>trans_id, NULL, 0)
            if result == BAD_READ_INDEX:
                self.writer.raise_bad_read_index()
            if result != READY:  # full: the caller waits for room and sends it
                stalled = (PyBytes_FromStringAndSize(<char *>payload, NVSP_SIZE), trans_id)
                break
            written += 1
        if written:
            self.channel.packets_sent += written
            if self.writer.commit():
                self.notify_peer.set()
        return i, stalled

    # --- receiving -------------------------------------------------------------

    def reap(self, dict sending, free, frames):
        """Handle the host's packets at the head of the ring that the Python
        path would handle without error: SUCCESS completions of sends in
        `sending` (their sections go back to `free`), and transfer-page
        packets of PACKET messages (the frames appended to `frames`, each
        packet completed). Stops at any other; commits both rings once.
        Returns the packets handled."""
        if not self.holding or self.reader.corrupt is not None:
            return 0
        PyObject_GetBuffer(self.recv_obj, &self.recv_view, PyBUF_SIMPLE)
        try:
            return self.reap_from(sending, free, frames)
        finally:
            PyBuffer_Release(&self.recv_view)

    cdef object reap_from(self, dict sending, free, frames):
        cdef Descriptor d
        cdef uint32_t handled = 0, wrote = 0
        cdef uint8_t head[16]
        cdef uint32_t size
        append = frames.append
        while handled < REAP_LIMIT and self.reader.next(&d) == READY:
            size = (<uint32_t>d.len8 - d.offset8) * 8
            if d.type == COMPLETION:
                if size < 8:
                    break
                self.reader.copy_out(self.reader.advance(self.reader.cursor, d.offset8 * 8),
                                     head, 8)
                if le32(head) != SEND_RNDIS_PKT_COMPLETE or le32(head + 4) != SUCCESS:
                    break  # a failed send, or another completion: _handle
                section = sending.pop(d.trans_id, None)
                if section is None:
                    break  # not a send of ours: _handle keeps it for its waiter
                free.append(section)
            elif d.type == XFER_PAGES:
                if not self.frames_of(&d, append):
                    break
                if self.writer.put(self.done, 8, COMPLETION, 0, d.trans_id, NULL, 0) != READY:
                    raise RuntimeError("netvsc: no room for a receive completion")
                wrote += 1
            else:
                break  # in-band packets: _handle
            self.reader.consume(&d)
            handled += 1
        if wrote:
            self.channel.packets_sent += wrote
            if self.writer.commit():
                self.notify_peer.set()
        if handled and self.reader.commit():
            self.notify_peer.set()
        return handled

    cdef bint frames_of(self, Descriptor *d, append) except -1:
        """The frames of a transfer-page packet appended, or False (nothing
        appended) when _handle must see it: a bad header or a range that is
        not a plain PACKET message, or no room to complete it."""
        cdef uint32_t header_len = <uint32_t>d.offset8 * 8 - DESCRIPTOR_SIZE
        cdef uint32_t size = (<uint32_t>d.len8 - d.offset8) * 8
        cdef uint8_t fixed[XFER_FIXED]
        cdef uint8_t head[16]
        cdef uint8_t wire[8]
        cdef uint32_t count, i, byte_count, byte_offset, msg_len, data_offset, data_len
        cdef uint32_t ppi_offset, ppi_len
        cdef uint32_t at
        cdef const uint8_t *m
        cdef uint64_t buffer_size = self.recv_view.len
        cdef const uint8_t *recv = <const uint8_t *>self.recv_view.buf
        if size < 16 or header_len < XFER_FIXED:
            return False
        # Room for the completion first: _handle would wait for it.
        if self.writer.free_from(self.writer.seen_read) <= 64:
            if self.writer.refresh_read() != READY:
                return False
            if self.writer.free_from(self.writer.seen_read) <= 64:
                return False
        self.reader.copy_out(self.reader.advance(self.reader.cursor, d.offset8 * 8), head, 16)
        if le32(head) != SEND_RNDIS_PKT:
            return False
        at = self.reader.advance(self.reader.cursor, DESCRIPTOR_SIZE)
        self.reader.copy_out(at, fixed, XFER_FIXED)
        count = le32(fixed + 4)
        if count == 0 or count > self.max_ranges or count > (header_len - XFER_FIXED) // 8:
            return False
        # Check every range before appending any frame.
        for i in range(count):
            self.reader.copy_out(self.reader.advance(at, XFER_FIXED + 8 * i), wire, 8)
            byte_count, byte_offset = le32(wire), le32(wire + 4)
            if <uint64_t>byte_offset + byte_count > buffer_size or byte_count < PACKET_HEADER:
                return False
            m = recv + byte_offset
            msg_len, data_offset, data_len = le32(m + 4), le32(m + 8), le32(m + 12)
            if le32(m) != RNDIS_PACKET or msg_len < PACKET_HEADER or msg_len > byte_count:
                return False
            if data_len == 0 or data_offset < PACKET_BODY:
                return False
            if <uint64_t>RNDIS_HEADER + data_offset + data_len > msg_len:
                return False
            if le32(m + 20):
                return False  # OOB data: _handle decodes it
            self.frame_flag[i] = self.frame_csum[i] = 0
            self.frame_ppi[i] = le32(m + 32) != 0
            if self.frame_ppi[i]:
                ppi_offset, ppi_len = le32(m + 28), le32(m + 32)
                if ppi_offset < PACKET_BODY or <uint64_t>RNDIS_HEADER + ppi_offset + ppi_len > msg_len:
                    return False
                if not read_ppis(m + RNDIS_HEADER + ppi_offset, ppi_len, &self.frame_flag[i],
                                 &self.frame_csum[i]):
                    return False
            self.frame_at[i] = byte_offset + RNDIS_HEADER + data_offset
            self.frame_len[i] = data_len
        if not self.sequences_whole(count):
            return False
        i = 0
        while i < count:  # the places checked above, read once
            if not self.frame_ppi[i]:
                append(PyBytes_FromStringAndSize(<const char *>recv + self.frame_at[i],
                                                 self.frame_len[i]))
                self.received += 1
                i += 1
                continue
            i = self.join(recv, i, append)
        return True

    cdef bint sequences_whole(self, uint32_t count) except -1:
        """Whether Reassembly.add would take this packet's per-packet info
        without dropping anything (every RSC fragment run from its first to
        its last inside the packet, within RSC_MAX): the case joined here."""
        cdef uint32_t i, flag, parts = 0
        cdef bint open_run = False, any_ppi = False
        for i in range(count):
            any_ppi = any_ppi or self.frame_ppi[i]
            flag = self.frame_flag[i] if self.frame_ppi[i] else 0
            if flag & FRAG_SUBALLOC:
                if flag & FRAG_FIRST:
                    if open_run:
                        return False
                    parts = 0
                elif not open_run:
                    return False
                open_run = not flag & FRAG_LAST
            elif open_run:
                return False
            parts += 1
            if parts > RSC_MAX:
                return False
        if open_run:
            return False
        if any_ppi and (self.reassembly is None or self.reassembly.parts):
            return False  # fragments held over (never, from a well-behaved host): _handle
        return True

    cdef uint32_t join(self, const uint8_t *recv, uint32_t first, append) except 0:
        """Reassembly.add over the run starting at `first` (a frame with
        per-packet info, or an RSC run): one frame appended; the next index."""
        cdef uint32_t last = first, total = 0, i, at = 0
        while self.frame_flag[last] & FRAG_SUBALLOC and not self.frame_flag[last] & FRAG_LAST:
            last += 1
        for i in range(first, last + 1):
            total += self.frame_len[i]
        data = PyBytes_FromStringAndSize(NULL, total)
        cdef uint8_t *out = <uint8_t *>(<char *>data)
        for i in range(first, last + 1):
            memcpy(out + at, recv + self.frame_at[i], self.frame_len[i])
            at += self.frame_len[i]
        if self.frame_csum[first] & RX_CHECKSUM_OK:
            received = _Received(data)
            received.checksum_ok = True
            received.coalesced = last > first
            append(received)
        else:
            append(data)
        self.received += 1
        return last + 1
