# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The compiled steady-state path of one netvsp channel, both directions.

Guest -> backend (`FastPath.drain`, from `admission()`): SEND_RNDIS_PKT
in-band packets on the DATA channel naming a send-buffer section, served
without the GIL from the head of the ring. The NVSP message is copied out of
the ring once and the section once, into private buffers; the RNDIS PACKET
messages in it are checked as `rndis_wire.decode_packets` checks them (PPIs
included) and each frame is written to the backend's `fast_fd()` (a TAP
device: one write per frame, the kernel processes it before returning) with
TapBackend.send's length checks and drop rules. Over a TAP with
IFF_VNET_HDR, checksum and LSOv2 info becomes each frame's virtio_net_hdr
as `offload.vnet_header` makes it (the IP lengths and sums fixed up in the
private copy): one write per large send. The completion is written into
the ring in place; both rings are committed once per batch.

Backend -> guest (`FastPath.deliver`, from the backend's readable
callback): frames read from the descriptor into a private staging buffer,
filtered as `RndisDevice.accepts` filters them, framed as
`rndis_wire.encode_packet` frames them into receive sections lent by
`ReceiveSections`, and announced in transfer-page packets of up to
DELIVERY_BATCH ranges, one commit per call. For a guest that takes
coalesced receives (`FastPath.deliver_coalesced`, docs/protocol.md §6.10),
each frame is read with its virtio_net_hdr: a TCP GSO frame of up to 64 KiB
becomes the RSC fragments of a transfer-page packet of its own, written
straight into its sections; others carry checksum info.

Everything else declines: a packet is left in the ring for
`NetvspChannel.on_packet` (the Python path, the definition of behaviour),
and what the receive side cannot place is handed back as frames for the
Python path to queue. The differential tests hold the two together
(tests/net/test_net_fast_path.py).
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.errno cimport EAGAIN, EINTR, EINVAL, EIO, ENOBUFS, ENOMEM, errno
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset
from posix.uio cimport iovec, readv, writev
from posix.unistd cimport read, write

from vmbus._cring cimport (
    BAD_READ_INDEX,
    DESCRIPTOR_SIZE,
    READY,
    Descriptor,
    RingReader,
    RingWriter,
    next_request,
)

from vmbus.protocols.net import offload as _ol
from vmbus.protocols.net import rsc as _rsc
from vmbus.protocols.net import rndis_wire as _rw
from vmbus.protocols.net import vsp as _nv
from vmbus.protocols.net import wire as _nvsp
from vsp.net.backends import max_frame as _max_frame

__all__ = ["FastPath"]

DEF SECTION_MAX = 66048      # private copy of one send section (device.LSO_SECTION fits); larger declines
DEF MAX_MESSAGES = 64        # rndis_wire.MAX_MESSAGES_PER_BATCH
DEF MAX_PPIS = 32            # rndis_wire.MAX_PPIS
DEF PACKET_HEADER = 44       # rndis_wire.PacketHeader.SIZE
DEF RNDIS_HEADER = 8
DEF PPI_HEADER = 12
DEF RNDIS_PACKET = 1
DEF NVSP_MIN = 32            # wire.NVSP_MIN_MESSAGE_SIZE
DEF NVSP_SIZE = 40           # wire.NVSP_MESSAGE_SIZE
DEF SEND_RNDIS_PKT = 107
DEF DATA_CHANNEL = 0
DEF INVALID_SECTION = 0xFFFFFFFF
DEF INBAND = 0x6
DEF XFER_PAGES = 0x7
DEF COMPLETION = 0xB
DEF COMPLETION_REQUESTED = 0x1
DEF BATCH_LIMIT = 1024       # packets per call: bounds one call's latency
DEF STAGE_FRAMES = 64        # frames read from the backend per call (RECEIVE_BATCH)
DEF STAGE_SLOT = 1536        # a staged frame: max_frame(1500) = 1518 fits; larger MTUs decline
DEF XFER_PAGESET = 0xCAFE    # wire.RECEIVE_BUFFER_ID
DEF DELIVERY = 16            # device.DELIVERY_BATCH ranges per transfer-page packet
DEF VNET_HDR = 10            # offload.VNET_HDR_SIZE
DEF PROMISCUOUS = 0x20
DEF BROADCAST = 0x08
DEF MULTICASTS = 0x06        # MULTICAST | ALL_MULTICAST
DEF DIRECTED = 0x01
# Coalesced receives (RSC), rsc.py's values:
DEF GSO_FRAME = 65553        # rsc.GSO_MAX_FRAME
DEF FRAGMENT_OVERHEAD = 76   # rsc.FRAGMENT_OVERHEAD
DEF RSC_MAX = 562            # rsc.RSC_MAX_FRAGMENTS
DEF RECEIVE_BATCH = 64       # delivery.RECEIVE_BATCH
DEF NEEDS_CSUM = 1
DEF DATA_VALID = 2
DEF GSO_TCPV4 = 1
DEF GSO_TCPV6 = 4
DEF RX_TCP_OK = 0x08
DEF RX_UDP_OK = 0x10
DEF RX_IP_OK = 0x20
DEF RX_VALUE_INVALID = 0x80
DEF PPI_SIZE = 16            # a PPI of a u32 value
DEF PKTINFO_LOW = 1          # rsc.PPI_PKTINFO less its internal bit (31)
# What one frame read with its virtio_net_hdr is (classify):
DEF K_DROP = 0               # counted in the backend's drops
DEF K_FILTERED = 1           # the packet filter drops it, uncounted
DEF K_SINGLE = 2             # one PACKET message
DEF K_GROUP = 3              # RSC fragments, one transfer-page packet of their own
DEF K_PYTHON = 4             # the Python path's (a checksum to complete, a size it drops)

DEF SERVED = 1
DEF DECLINED = 0
DEF FAILED = -1              # a system call failed as no drop rule allows: Python raises

for _name, _ours, _theirs in (
    ("MAX_MESSAGES_PER_BATCH", MAX_MESSAGES, _rw.MAX_MESSAGES_PER_BATCH),
    ("MAX_PPIS", MAX_PPIS, _rw.MAX_PPIS),
    ("PacketHeader.SIZE", PACKET_HEADER, _rw.PacketHeader.SIZE),
    ("NVSP_MIN_MESSAGE_SIZE", NVSP_MIN, _nvsp.NVSP_MIN_MESSAGE_SIZE),
    ("NVSP_MESSAGE_SIZE", NVSP_SIZE, _nvsp.NVSP_MESSAGE_SIZE),
    ("SEND_RNDIS_PKT", SEND_RNDIS_PKT, _nvsp.NvspMessageType.SEND_RNDIS_PKT),
    ("RECEIVE_BUFFER_ID", XFER_PAGESET, _nvsp.RECEIVE_BUFFER_ID),
    ("GSO_MAX_FRAME", GSO_FRAME, _rsc.GSO_MAX_FRAME),
    ("PPI_CHECKSUM, PPI_LSO", 0 | 2 << 8, _ol.PPI_CHECKSUM | _ol.PPI_LSO << 8),
    ("FRAGMENT_OVERHEAD", FRAGMENT_OVERHEAD, _rsc.FRAGMENT_OVERHEAD),
    ("RSC_MAX_FRAGMENTS", RSC_MAX, _rsc.RSC_MAX_FRAGMENTS),
    ("PPI_PKTINFO", 1 << 31 | PKTINFO_LOW, _rsc.PPI_PKTINFO),
    ("RX bits", RX_TCP_OK | RX_UDP_OK << 8 | RX_IP_OK << 16 | RX_VALUE_INVALID << 24,
     _rsc.RX_TCP_OK | _rsc.RX_UDP_OK << 8 | _rsc.RX_IP_OK << 16 | _rsc.RX_TCP_VALUE_INVALID << 24),
):
    if _ours != _theirs:
        raise ImportError(f"vsp.net._fast: {_name} is {_theirs}, built for {_ours}")


cdef inline uint32_t le32(const uint8_t *p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)  # x86-64: little-endian, as the wire
    return v


cdef inline void put32(uint8_t *p, uint32_t v) noexcept nogil:
    memcpy(p, &v, 4)


cdef inline uint32_t fold(uint32_t total) noexcept nogil:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


cdef inline void ip4_checksum(uint8_t *ip, uint32_t ihl) noexcept nogil:
    """offload._ip4_checksum: the IPv4 header checksum of `ihl` bytes, in place."""
    cdef uint32_t total = 0, k
    ip[10] = ip[11] = 0
    for k in range(0, ihl, 2):
        total += (<uint32_t>ip[k] << 8) | ip[k + 1]
    total = ~fold(total) & 0xFFFF
    ip[10], ip[11] = total >> 8, total & 0xFF


cdef inline bint area_ok(uint32_t offset, uint32_t length, uint32_t msg_len) noexcept nogil:
    """rndis_wire.area for a PACKET: empty, or after the fixed part and inside."""
    if length == 0:
        return True
    if offset < PACKET_HEADER - RNDIS_HEADER:
        return False
    return <uint64_t>RNDIS_HEADER + offset + length <= msg_len


cdef inline bint ppis_ok(const uint8_t *info, uint32_t size) noexcept nogil:
    """rndis_wire._decode_ppis's checks, without building the values."""
    cdef uint32_t pos = 0, count = 0, ppi_size, ppi_offset
    while pos < size:
        if count == MAX_PPIS or size - pos < PPI_HEADER:
            return False
        ppi_size = le32(info + pos)
        ppi_offset = le32(info + pos + 8)
        if ppi_size < PPI_HEADER or ppi_size > size - pos:
            return False
        if ppi_offset < PPI_HEADER or ppi_offset > ppi_size:
            return False
        pos += ppi_size
        count += 1
    return True


cdef class FastPath:
    """The fast path of one channel; see the module doc."""

    cdef RingReader reader
    cdef RingWriter writer
    cdef object channel
    cdef object notify_peer
    cdef uint32_t reserve
    # Configured per call, under the GIL:
    cdef int fd
    cdef bint vnet                 # the backend's frames carry a virtio_net_hdr
    cdef uint8_t vnet_zero[VNET_HDR]
    cdef uint8_t vnet_in[VNET_HDR]
    cdef uint32_t max_frame
    cdef const uint8_t *send_base
    cdef uint64_t send_len
    cdef uint32_t section_size
    cdef uint32_t section_count
    # Scratch, reused by every packet (no allocation in the loop):
    cdef uint8_t nvsp[NVSP_SIZE]
    cdef uint8_t private[SECTION_MAX]
    cdef uint32_t frame_at[MAX_MESSAGES]
    cdef uint32_t frame_len[MAX_MESSAGES]
    cdef uint8_t frame_hdr[MAX_MESSAGES * VNET_HDR]   # vnet: each frame's virtio_net_hdr
    cdef bint frame_refused[MAX_MESSAGES]             # vnet: its per-packet info does not fit it
    cdef uint8_t reply_ok[NVSP_SIZE]
    cdef uint8_t reply_fail[NVSP_SIZE]
    # What one call did, handed to the Python counters after it:
    cdef uint64_t frames, nbytes, written, drops, refused, replies
    cdef int error
    # Receive side:
    cdef uint8_t stage[STAGE_FRAMES * STAGE_SLOT]
    cdef uint32_t stage_len[STAGE_FRAMES]
    cdef uint32_t accepted[STAGE_FRAMES]   # indices into the stage, in order
    cdef uint8_t mac[6]
    cdef uint32_t packet_filter
    cdef uint8_t xfer_payload[NVSP_SIZE]
    cdef uint8_t xfer_header[8 + 8 * RSC_MAX]
    # Coalesced receives: one frame as read, and up to DELIVERY singles staged for a packet.
    cdef uint8_t big_hdr[VNET_HDR]
    cdef uint8_t big[GSO_FRAME]
    cdef uint8_t stage_hdr[STAGE_FRAMES * VNET_HDR]
    cdef uint32_t stage_csum[STAGE_FRAMES]
    cdef public unsigned long long served    # SEND_RNDIS_PKTs completed here, ever
    cdef public unsigned long long declined  # calls that stopped at a packet for Python
    cdef public unsigned long long delivered  # frames given to the guest here, ever
    cdef uint64_t wrote                      # transfer-page packets of this call

    def __cinit__(self):
        memset(self.vnet_zero, 0, VNET_HDR)

    def __init__(self, channel, int reserve):
        # TypeError unless the channel runs on the Cython ring.
        self.reader = channel.reader
        self.writer = channel.writer
        self.channel = channel
        self.notify_peer = channel.notify_peer
        self.reserve = reserve
        ok = _nvsp.encode(_nvsp.SendRndisPacketComplete(status=_nvsp.NvspStatus.SUCCESS))
        fail = _nvsp.encode(_nvsp.SendRndisPacketComplete(status=_nvsp.NvspStatus.FAIL))
        memcpy(self.reply_ok, <const char *>ok, NVSP_SIZE)
        memcpy(self.reply_fail, <const char *>fail, NVSP_SIZE)
        xfer = _nvsp.send_rndis_packet(_nvsp.RndisChannel.DATA)
        memcpy(self.xfer_payload, <const char *>xfer, NVSP_SIZE)

    # --- guest -> backend ---------------------------------------------------------

    def drain(self, handler):
        """Serve SEND_RNDIS_PKTs from the head of the ring until one is
        declined, the ring is empty, or a completion would not fit. Commits
        both rings, signals the guest as they answer, and adds to the
        counters. Returns the count served."""
        cdef Descriptor d
        if self.reader.corrupt is not None or self.reader.next(&d) != READY:
            return 0  # empty, or corrupt: the Python drain reports corruption
        mapped = self.configure_send(handler)
        if mapped is None:
            self.declined += 1
            return 0
        cdef Py_buffer view
        PyObject_GetBuffer(mapped, &view, PyBUF_SIMPLE)
        cdef uint32_t count = 0
        cdef int outcome
        self.frames = self.nbytes = self.written = self.drops = self.refused = 0
        self.replies = 0
        self.error = 0
        try:
            self.send_base = <const uint8_t *>view.buf
            self.send_len = view.len
            with nogil:
                outcome = self.serve_batch(&count)
        finally:
            self.send_base = NULL
            PyBuffer_Release(&view)
        if outcome != SERVED:
            self.declined += 1
        if count:
            self.served += count
            self.account(handler)
            if self.writer.commit():
                self.notify_peer.set()
            if self.reader.commit():
                self.notify_peer.set()
        if outcome == FAILED:
            raise OSError(self.error, "netvsp: a frame write failed")
        return count

    cdef object configure_send(self, handler):
        """The send buffer's view when this path may serve: NVSP ready, RNDIS
        initialized, the backend's frame descriptor usable, nothing held."""
        if handler.held is not None or handler.paused:
            return None
        backend = handler.backend
        if not handler.rndis.initialized or not backend.link_up:
            return None
        if handler.nvsp.state is not _nv.NvspState.READY:
            return None
        fd = backend.fast_fd()
        buffer = handler.nvsp.send_buffer
        mapped = handler.buffers.get(_nvsp.BufferKind.SEND)
        if fd < 0 or buffer is None or mapped is None:
            return None
        self.fd = fd
        self.vnet = backend.vnet_hdr
        self.max_frame = _max_frame(backend.mtu)
        self.section_size = buffer.section_size
        self.section_count = buffer.section_count
        return mapped.view

    cdef int account(self, handler) except -1:
        counters = handler.counters
        counters.frames_from_guest += self.frames
        counters.bytes_from_guest += self.nbytes
        counters.refused += self.refused
        handler.refused += self.refused
        handler.rndis.xmit_ok += self.frames
        backend = handler.backend
        backend.frames_out += self.written
        backend.drops += self.drops
        self.channel.packets_sent += self.replies
        return 0

    cdef int serve_batch(self, uint32_t *count) noexcept nogil:
        cdef Descriptor d
        cdef int taken
        cdef int outcome
        while count[0] < BATCH_LIMIT:
            taken = next_request(self.reader, self.writer, self.reserve, &d)
            if taken == BAD_READ_INDEX:
                return DECLINED  # Python raises it
            if taken != READY:
                return SERVED  # empty, full or corrupt: Python goes on from here
            outcome = self.serve(&d)
            if outcome == DECLINED:
                return DECLINED  # left in the ring, unconsumed
            self.reader.consume(&d)
            count[0] += 1
            if outcome == FAILED:
                return FAILED
        return SERVED

    cdef int serve(self, Descriptor *d) noexcept nogil:
        """Serve the packet `d` describes, or decline it touching nothing."""
        cdef uint32_t total = <uint32_t>d.len8 * 8 - DESCRIPTOR_SIZE
        cdef uint32_t header_len = <uint32_t>d.offset8 * 8 - DESCRIPTOR_SIZE
        cdef uint32_t payload_len = total - header_len
        cdef uint32_t index, size, messages
        if d.type != INBAND or payload_len < NVSP_MIN:
            return DECLINED
        # The one copy of the NVSP message (the fields used are its first 16 bytes).
        self.reader.copy_out(
            self.reader.advance(self.reader.cursor, DESCRIPTOR_SIZE + header_len), self.nvsp, 16)
        if le32(self.nvsp) != SEND_RNDIS_PKT or le32(self.nvsp + 4) != DATA_CHANNEL:
            return DECLINED
        index, size = le32(self.nvsp + 8), le32(self.nvsp + 12)
        if index == <uint32_t>INVALID_SECTION or index >= self.section_count:
            return DECLINED  # GPA-direct, or a bad index: the Python path
        if size == 0 or size > self.section_size or size > SECTION_MAX:
            return DECLINED
        if <uint64_t>index * self.section_size + size > self.send_len:
            return DECLINED
        # The one copy of the section: the guest may rewrite it meanwhile.
        memcpy(self.private, self.send_base + <uint64_t>index * self.section_size, size)
        messages = self.parse(size)
        if messages == 0:
            return DECLINED  # malformed: Python answers INVALID_RNDIS_PKT
        return self.transmit(messages, d)

    cdef uint32_t parse(self, uint32_t size) noexcept nogil:
        """rndis_wire.decode_packets on the private copy: the frames' places,
        or 0 when it would raise."""
        cdef uint32_t pos = 0, count = 0, left, msg_len, data_off, data_len
        cdef const uint8_t *m
        while pos < size:
            if count == MAX_MESSAGES:
                return 0
            left = size - pos
            if left < PACKET_HEADER:
                return 0
            m = self.private + pos
            msg_len = le32(m + 4)
            if le32(m) != RNDIS_PACKET or msg_len < PACKET_HEADER or msg_len > left:
                return 0
            data_off, data_len = le32(m + 8), le32(m + 12)
            if data_len == 0 or not area_ok(data_off, data_len, msg_len):
                return 0
            if not area_ok(le32(m + 16), le32(m + 20), msg_len):
                return 0  # the OOB area: bounds only
            if not area_ok(le32(m + 28), le32(m + 32), msg_len):
                return 0
            if le32(m + 32) and not ppis_ok(m + RNDIS_HEADER + le32(m + 28), le32(m + 32)):
                return 0
            self.frame_at[count] = pos + RNDIS_HEADER + data_off
            self.frame_len[count] = data_len
            if self.vnet and not self.offload_header(count, m, data_off, data_len):
                return 0  # per-packet info this path does not translate: the Python path
            count += 1
            pos += msg_len
        return count

    cdef bint offload_header(self, uint32_t i, const uint8_t *m, uint32_t data_off,
                             uint32_t data_len) noexcept nogil:
        """offload.vnet_header for frame `i` (in the private copy, fixed up
        there) from its message's checksum and LSO info: its header, or
        refused. True: nothing here declines."""
        cdef uint32_t info_off = le32(m + 28), info_len = le32(m + 32)
        cdef const uint8_t *info = m + RNDIS_HEADER + info_off
        cdef uint32_t pos = 0, size, kind, value_at, csum = 0, lso = 0, ethertype, ip_at
        cdef uint32_t th, offset, ihl, tcp_len, header_len, mss, total, k
        cdef bint has_csum = False, has_lso = False, ipv4, ipv6, tcp, udp
        cdef uint8_t *f = self.private + self.frame_at[i]
        cdef uint8_t *h = self.frame_hdr + i * VNET_HDR
        cdef uint32_t length = data_len
        memset(h, 0, VNET_HDR)
        self.frame_refused[i] = False
        while pos < info_len:  # checked by ppis_ok: the last value of each type wins
            size, kind, value_at = le32(info + pos), le32(info + pos + 4), le32(info + pos + 8)
            if size - value_at >= 4 and (kind == 0 or kind == 2):
                if kind == 0:
                    has_csum, csum = True, le32(info + pos + value_at)
                else:
                    has_lso, lso = True, le32(info + pos + value_at)
            pos += size
        if not has_lso and not csum:
            return True
        if length < 14:
            self.frame_refused[i] = True
            return True
        ethertype, ip_at = (<uint32_t>f[12] << 8) | f[13], 14
        if ethertype == 0x8100:
            if length < 18:
                self.frame_refused[i] = True
                return True
            ethertype, ip_at = (<uint32_t>f[16] << 8) | f[17], 18
        if has_lso and lso >> 30 & 1:
            ipv6, mss, th = (lso >> 31) != 0, lso & 0xFFFFF, lso >> 20 & 0x3FF
            if mss == 0 or ethertype != (0x86DD if ipv6 else 0x0800) or th + 20 > length \
                    or length - ip_at > 0xFFFF:
                self.frame_refused[i] = True
                return True
            tcp_len = length - th
            header_len = th + (f[th + 12] >> 4) * 4
            if header_len > length or header_len < th + 20:
                self.frame_refused[i] = True
                return True
            total = 0
            if ipv6:
                if th < ip_at + 40 or f[ip_at + 6] != 6:
                    self.frame_refused[i] = True
                    return True
                f[ip_at + 4], f[ip_at + 5] = (length - ip_at - 40) >> 8 & 0xFF, (length - ip_at - 40) & 0xFF
                for k in range(ip_at + 8, ip_at + 40, 2):
                    total += (<uint32_t>f[k] << 8) | f[k + 1]
                h[1] = GSO_TCPV6
            else:
                ihl = (f[ip_at] & 0xF) * 4
                if f[ip_at] >> 4 != 4 or ihl < 20 or th != ip_at + ihl or f[ip_at + 9] != 6:
                    self.frame_refused[i] = True
                    return True
                f[ip_at + 2], f[ip_at + 3] = (length - ip_at) >> 8 & 0xFF, (length - ip_at) & 0xFF
                ip4_checksum(f + ip_at, ihl)
                for k in range(ip_at + 12, ip_at + 20, 2):
                    total += (<uint32_t>f[k] << 8) | f[k + 1]
                h[1] = GSO_TCPV4
            total = fold(total + 6 + (tcp_len & 0xFFFF) + (tcp_len >> 16))
            f[th + 16], f[th + 17] = total >> 8, total & 0xFF
            h[0] = NEEDS_CSUM
            h[2], h[3] = header_len & 0xFF, header_len >> 8
            h[4], h[5] = mss & 0xFF, mss >> 8 & 0xFF
            h[6], h[7] = th & 0xFF, th >> 8
            h[8], h[9] = 16, 0
            return True
        if has_lso:
            self.frame_refused[i] = True  # LSOv1: never offered
            return True
        ipv4, ipv6, tcp, udp = (csum & 1) != 0, (csum & 2) != 0, (csum & 4) != 0, (csum & 8) != 0
        th = csum >> 16 & 0x3FF
        if ipv4 == ipv6 or (ipv4 and ethertype != 0x0800) or (ipv6 and ethertype != 0x86DD):
            self.frame_refused[i] = True
            return True
        if csum & 16 and ipv4:
            ihl = (f[ip_at] & 0xF) * 4
            if length <= ip_at or ip_at + (ihl if ihl > 20 else 20) > length:
                self.frame_refused[i] = True  # no whole IPv4 header to sum
                return True
            ip4_checksum(f + ip_at, ihl)
        if not (tcp or udp):
            return True
        offset = 16 if tcp else 6
        if tcp == udp or th < ip_at + (20 if ipv4 else 40) or th + offset + 2 > length:
            self.frame_refused[i] = True
            return True
        h[0] = NEEDS_CSUM
        h[6], h[7] = th & 0xFF, th >> 8
        h[8] = offset
        return True

    cdef int transmit(self, uint32_t messages, Descriptor *d) noexcept nogil:
        """TapBackend.send of the frames, then the completion."""
        cdef uint32_t i, refused = 0, length
        cdef ssize_t done
        cdef int outcome = SERVED
        cdef const uint8_t *reply
        cdef iovec iov[2]
        cdef uint32_t largest
        iov[0].iov_len = VNET_HDR
        for i in range(messages):
            length = self.frame_len[i]
            self.frames += 1
            self.nbytes += length
            largest = self.max_frame
            if self.vnet:
                if self.frame_refused[i]:
                    refused += 1
                    continue
                iov[0].iov_base = self.frame_hdr + i * VNET_HDR
                if self.frame_hdr[i * VNET_HDR + 1]:  # a large send: TapBackend.send_offloaded
                    largest = GSO_FRAME
            if length < 14 or length > largest:
                refused += 1
                continue
            while True:
                if self.vnet:
                    iov[1].iov_base = self.private + self.frame_at[i]
                    iov[1].iov_len = length
                    done = writev(self.fd, iov, 2)
                else:
                    done = write(self.fd, self.private + self.frame_at[i], length)
                if done >= 0 or errno != EINTR:
                    break
            if done >= 0:
                self.written += 1
            elif errno in (EAGAIN, ENOBUFS, ENOMEM, EIO, EINVAL):
                refused += 1
            else:
                self.error = errno
                outcome = FAILED
                break
        self.drops += refused
        self.refused += refused
        if outcome == FAILED or not d.flags & COMPLETION_REQUESTED:
            return outcome
        reply = self.reply_ok
        if refused:
            reply = self.reply_fail
        if self.writer.put(reply, NVSP_SIZE, COMPLETION, 0, d.trans_id, NULL, 0) != READY:
            return FAILED  # cannot happen past the reserve
        self.replies += 1
        return outcome

    # --- backend -> guest ---------------------------------------------------------

    def deliver(self, handler, int limit):
        """NetvspChannel._from_backend and _deliver for up to `limit` frames
        (the free sections not spoken for): read from the backend's frame
        descriptor, filtered, framed into receive sections and announced,
        one commit. Returns the accepted frames it could not announce (no
        ring room: the Python path queues and sends them), or None when it
        declined before reading anything."""
        sections = handler.receive_sections
        mapped = handler.buffers.get(_nvsp.BufferKind.RECEIVE)
        backend = handler.backend
        cdef int fd = backend.fast_fd()
        if fd < 0 or sections is None or mapped is None or handler.to_guest or limit <= 0:
            return None
        cdef uint32_t max_frame = _max_frame(backend.mtu)
        if max_frame > STAGE_SLOT or sections.section_size < PACKET_HEADER + max_frame:
            return None
        rndis = handler.rndis
        self.packet_filter = rndis.packet_filter if rndis.initialized else 0
        mac = rndis.mac
        memcpy(self.mac, <const char *>mac, 6)
        cdef uint32_t got = 0, kept = 0, offloaded = 0, i, count, k, at, length, wrote = 0
        cdef uint64_t nbytes = 0
        cdef int error = 0
        cdef ssize_t done
        cdef int wanted = limit if limit < STAGE_FRAMES else STAGE_FRAMES
        cdef bint vnet = backend.vnet_hdr
        cdef iovec iov[2]
        iov[0].iov_base = self.vnet_in
        iov[0].iov_len = VNET_HDR
        with nogil:
            while got < <uint32_t>wanted:
                if vnet:  # the header goes aside: TapBackend.receive drops it too
                    iov[1].iov_base = self.stage + got * STAGE_SLOT
                    iov[1].iov_len = max_frame
                    done = readv(fd, iov, 2)
                    if done >= VNET_HDR and (self.vnet_in[1] != 0 or self.vnet_in[0] & NEEDS_CSUM):
                        offloaded += 1  # queued while offloads were on: cut short or unsummed
                        got += 1
                        continue
                    if done >= 0:
                        done = done - VNET_HDR if done >= VNET_HDR else 0
                else:
                    done = read(fd, self.stage + got * STAGE_SLOT, max_frame)
                if done < 0:
                    if errno == EINTR:
                        continue
                    if errno != EAGAIN:
                        error = errno
                    break
                self.stage_len[got] = <uint32_t>done
                if self.accepts(self.stage + got * STAGE_SLOT, <uint32_t>done):
                    self.accepted[kept] = got
                    kept += 1
                    nbytes += <uint32_t>done
                got += 1
        backend.frames_in += got - offloaded
        backend.drops += offloaded
        rndis.rcv_ok += kept
        handler.counters.frames_to_guest += kept
        handler.counters.bytes_to_guest += nbytes
        cdef Py_buffer view
        cdef uint8_t *base
        cdef uint32_t section_size = sections.section_size
        cdef uint32_t need
        left = []
        PyObject_GetBuffer(mapped.view, &view, PyBUF_WRITABLE)
        try:
            base = <uint8_t *>view.buf
            i = 0
            while i < kept:
                count = kept - i if kept - i < DELIVERY else DELIVERY
                # packet_space(payload, header) and the reply reserve, as _deliver asks.
                need = ((16 + 8 + 8 * count + NVSP_SIZE + 7) & ~7u) + 8 + self.reserve
                if self.writer.free_from(self.writer.seen_read) <= need:
                    if self.writer.refresh_read() != READY:
                        break
                    if self.writer.free_from(self.writer.seen_read) <= need:
                        break  # the rest goes through the Python path, which asks for room
                trans_id = next(handler.ids)
                taken = sections.alloc(trans_id, count)
                put32(self.xfer_header, XFER_PAGESET)  # pageset id, sender_owns_set 0
                put32(self.xfer_header + 4, count)
                for k in range(count):
                    at = <uint32_t>taken[k] * section_size
                    if <uint64_t>at + section_size > <uint64_t>view.len:
                        raise RuntimeError("netvsp: a receive section outside the buffer")
                    length = self.stage_len[self.accepted[i + k]]
                    self.frame_message(base + at, self.stage + self.accepted[i + k] * STAGE_SLOT,
                                       length)
                    put32(self.xfer_header + 8 + 8 * k, PACKET_HEADER + length)
                    put32(self.xfer_header + 12 + 8 * k, at)
                if self.writer.put(self.xfer_payload, NVSP_SIZE, XFER_PAGES, COMPLETION_REQUESTED,
                                   trans_id, self.xfer_header, 8 + 8 * count) != READY:
                    sections.free(trans_id)
                    break
                wrote += 1
                self.delivered += count
                i += count
            while i < kept:
                k = self.accepted[i]
                left.append(PyBytes_FromStringAndSize(
                    <const char *>self.stage + k * STAGE_SLOT, self.stage_len[k]))
                i += 1
        finally:
            PyBuffer_Release(&view)
        if wrote:
            self.channel.packets_sent += wrote
            if self.writer.commit():
                self.notify_peer.set()
        if error:
            raise OSError(error, "netvsp: a frame read failed")
        return left

    cdef bint accepts(self, const uint8_t *frame, uint32_t length) noexcept nogil:
        """RndisDevice.accepts."""
        cdef uint32_t wanted = self.packet_filter
        if not wanted or length < 14:
            return False
        if wanted & PROMISCUOUS:
            return True
        if frame[0] == 0xFF and frame[1] == 0xFF and frame[2] == 0xFF and frame[3] == 0xFF \
                and frame[4] == 0xFF and frame[5] == 0xFF:
            return (wanted & BROADCAST) != 0
        if frame[0] & 1:
            return (wanted & MULTICASTS) != 0
        return (wanted & DIRECTED) != 0 and memcmp(frame, self.mac, 6) == 0

    cdef void frame_message(self, uint8_t *at, const uint8_t *frame, uint32_t length) noexcept nogil:
        """rndis_wire.encode_packet(frame): the header, then the frame."""
        memset(at, 0, PACKET_HEADER)
        put32(at, RNDIS_PACKET)
        put32(at + 4, PACKET_HEADER + length)
        put32(at + 8, PACKET_HEADER - RNDIS_HEADER)
        put32(at + 12, length)
        put32(at + 28, PACKET_HEADER - RNDIS_HEADER)
        memcpy(at + PACKET_HEADER, frame, length)


    # --- backend -> guest, coalesced receives (RSC) -----------------------------

    def deliver_coalesced(self, handler, int room, int worst):
        """GuestDelivery._coalesced_from_backend's read loop and the _deliver
        after it: frames read with their virtio_net_hdr while `room`
        sections hold the largest (`worst`), up to RECEIVE_BATCH; a TCP GSO
        frame framed as RSC fragments in a transfer-page packet of its own,
        other frames up to DELIVERY a packet, each as the Python path frames
        it. From the first frame it would not place as the Python path does
        (a checksum to complete, no ring room) on, frames are returned as
        read, (header, frame), in order, for the Python path, uncounted but
        in frames_in. None when it declined before reading."""
        sections = handler.receive_sections
        mapped = handler.buffers.get(_nvsp.BufferKind.RECEIVE)
        backend = handler.backend
        cdef int fd = backend.fast_fd()
        if fd < 0 or sections is None or mapped is None or handler.to_guest or worst <= 0:
            return None
        cdef uint32_t section_size = sections.section_size
        if section_size <= FRAGMENT_OVERHEAD or section_size < PACKET_HEADER + PPI_SIZE + STAGE_SLOT:
            return None
        rndis = handler.rndis
        self.packet_filter = rndis.packet_filter if rndis.initialized else 0
        memcpy(self.mac, <const char *>rndis.mac, 6)
        cdef uint32_t max_frame = _max_frame(backend.mtu)
        cdef uint64_t coalesced = rndis.coalesced
        cdef uint32_t staged = 0, taken = 0, cost, kind, checksum, length
        cdef uint64_t placed = 0, nbytes = 0, groups = 0, drops = 0
        cdef ssize_t done
        cdef int error = 0
        cdef bint python = False
        cdef iovec iov[2]
        cdef Py_buffer view
        iov[0].iov_base = self.big_hdr
        iov[0].iov_len = VNET_HDR
        iov[1].iov_base = self.big
        iov[1].iov_len = GSO_FRAME
        left = []
        self.wrote = 0
        PyObject_GetBuffer(mapped.view, &view, PyBUF_WRITABLE)
        try:
            while room >= worst and taken < RECEIVE_BATCH:
                with nogil:
                    while True:
                        done = readv(fd, iov, 2)
                        if done >= 0 or errno != EINTR:
                            break
                if done < 0:
                    if errno != EAGAIN:
                        error = errno
                    break
                taken += 1
                length = <uint32_t>(done - VNET_HDR) if done >= VNET_HDR else 0
                kind = self.classify(done, length, max_frame, section_size, &cost, &checksum)
                if python or kind == K_PYTHON:
                    if not python and staged:  # the singles before it share its packet there
                        self.unstage(left, staged)
                        staged = 0
                    python = True
                    room -= cost
                    left.append((PyBytes_FromStringAndSize(<const char *>self.big_hdr,
                                                           done if done < VNET_HDR else VNET_HDR),
                                 PyBytes_FromStringAndSize(<const char *>self.big, length)))
                    continue
                if kind == K_DROP:
                    drops += 1
                    continue
                if kind == K_FILTERED:
                    continue
                room -= cost
                if kind == K_SINGLE:
                    memcpy(self.stage + staged * STAGE_SLOT, self.big, length)
                    memcpy(self.stage_hdr + staged * VNET_HDR, self.big_hdr, VNET_HDR)
                    self.stage_len[staged] = length
                    self.stage_csum[staged] = checksum
                    staged += 1
                    if staged == DELIVERY:
                        if not self.flush_singles(handler, sections, &view, staged):
                            python = True
                            self.unstage(left, staged)
                        else:
                            placed += staged
                            nbytes += self.staged_bytes(staged)
                        staged = 0
                    continue
                # K_GROUP: the singles before it go first, in their own packet.
                if staged:
                    if not self.flush_singles(handler, sections, &view, staged):
                        python = True
                        self.unstage(left, staged)
                    else:
                        placed += staged
                        nbytes += self.staged_bytes(staged)
                    staged = 0
                if not python:
                    self.fix_ip4_checksum(length)
                    if self.place_group(handler, sections, &view, length, cost, checksum,
                                        (coalesced + 1) & 0xFFFF):
                        coalesced += 1
                        groups += 1
                        placed += 1
                        nbytes += length
                        continue
                    python = True
                left.append((PyBytes_FromStringAndSize(<const char *>self.big_hdr, VNET_HDR),
                             PyBytes_FromStringAndSize(<const char *>self.big, length)))
            if staged:
                if self.flush_singles(handler, sections, &view, staged):
                    placed += staged
                    nbytes += self.staged_bytes(staged)
                else:
                    self.unstage(left, staged)
        finally:
            PyBuffer_Release(&view)
        backend.frames_in += taken
        backend.drops += drops
        rndis.rcv_ok += placed
        rndis.coalesced = coalesced
        handler.counters.frames_to_guest += placed
        handler.counters.bytes_to_guest += nbytes
        self.delivered += placed
        if self.wrote:
            self.channel.packets_sent += self.wrote
            if self.writer.commit():
                self.notify_peer.set()
        if error:
            raise OSError(error, "netvsp: a frame read failed")
        return left

    cdef uint64_t staged_bytes(self, uint32_t staged) noexcept:
        cdef uint64_t total = 0
        cdef uint32_t i
        for i in range(staged):
            total += self.stage_len[i]
        return total

    cdef int unstage(self, list left, uint32_t staged) except -1:
        """Staged singles back to the Python path, as read."""
        cdef uint32_t i
        for i in range(staged):
            left.append((PyBytes_FromStringAndSize(<const char *>self.stage_hdr + i * VNET_HDR,
                                                   VNET_HDR),
                         PyBytes_FromStringAndSize(<const char *>self.stage + i * STAGE_SLOT,
                                                   self.stage_len[i])))
        return 0

    cdef uint32_t classify(self, ssize_t done, uint32_t length, uint32_t max_frame,
                           uint32_t section_size, uint32_t *cost, uint32_t *checksum) noexcept:
        """_offloaded_to_guest's decision for the frame in `big`, and the
        sections it takes (`cost`, what _coalesced_from_backend takes off room)."""
        cdef const uint8_t *h = self.big_hdr
        cdef uint32_t kind, count, l4, ip_at, ihl
        cdef int ipv6, proto
        cost[0] = 0
        checksum[0] = 0
        if done < VNET_HDR or length < 14:
            return K_DROP
        if h[1] == 0:  # GSO_NONE
            checksum[0] = self.checksum_info(length)
            if not checksum[0] and h[0] & NEEDS_CSUM:
                cost[0] = 1 if self.accepts(self.big, length) else 0
                return K_PYTHON  # the checksum completed in Python
            if not self.accepts(self.big, length):
                return K_FILTERED
            cost[0] = 1
            if length > STAGE_SLOT or PACKET_HEADER + (PPI_SIZE if checksum[0] else 0) + length \
                    > section_size:
                return K_PYTHON  # it drops what no section holds
            return K_SINGLE
        # rsc.coalesced_segment's checks
        kind = h[1] & 0x7F
        if (kind != GSO_TCPV4 and kind != GSO_TCPV6) or not h[0] & NEEDS_CSUM:
            return K_DROP
        if length <= 14 or length > GSO_FRAME:
            return K_DROP
        if not self.transport(length, &ipv6, &l4, &proto, &ip_at):
            return K_DROP
        if ipv6 != (kind == GSO_TCPV6) or proto != 6 or l4 + 20 > length:
            return K_DROP
        if kind == GSO_TCPV4:
            ihl = (self.big[ip_at] & 0xF) * 4
            if ihl < 20 or ((<uint32_t>self.big[ip_at + 2] << 8) | self.big[ip_at + 3]) \
                    != length - ip_at:
                return K_DROP
        checksum[0] = self.checksum_info(length)
        if not self.accepts(self.big, length):
            return K_FILTERED
        count = (length + section_size - FRAGMENT_OVERHEAD - 1) // (section_size - FRAGMENT_OVERHEAD)
        cost[0] = count
        if count > RSC_MAX:
            return K_PYTHON
        return K_GROUP

    cdef bint transport(self, uint32_t length, int *ipv6, uint32_t *l4, int *proto,
                        uint32_t *ip_at) noexcept:
        """offload.transport of the frame in `big`."""
        cdef const uint8_t *f = self.big
        cdef uint32_t ethertype = (<uint32_t>f[12] << 8) | f[13], at = 14
        if ethertype == 0x8100:
            if length < 18:
                return False
            ethertype = (<uint32_t>f[16] << 8) | f[17]
            at = 18
        ip_at[0] = at
        if ethertype == 0x0800 and length >= at + 20:
            ipv6[0] = 0
            l4[0] = at + (f[at] & 0xF) * 4
            proto[0] = f[at + 9]
            return True
        if ethertype == 0x86DD and length >= at + 40:
            ipv6[0] = 1
            l4[0] = at + 40
            proto[0] = f[at + 6]
            return True
        return False

    cdef uint32_t checksum_info(self, uint32_t length) noexcept:
        """rsc.receive_checksum_info of the frame in `big`."""
        cdef uint8_t flags = self.big_hdr[0]
        cdef int ipv6, proto
        cdef uint32_t l4, ip_at, value
        if not flags & (NEEDS_CSUM | DATA_VALID):
            return 0
        if not self.transport(length, &ipv6, &l4, &proto, &ip_at) or (proto != 6 and proto != 17):
            return 0
        value = RX_TCP_OK if proto == 6 else RX_UDP_OK
        if not ipv6:
            value |= RX_IP_OK
        if flags & NEEDS_CSUM:
            value |= RX_VALUE_INVALID
        return value

    cdef void fix_ip4_checksum(self, uint32_t length) noexcept:
        """offload._ip4_checksum for a TCPV4 GSO frame in `big` (checked by classify)."""
        cdef int ipv6, proto
        cdef uint32_t l4, ip_at, ihl, i, total = 0
        if self.big_hdr[1] & 0x7F != GSO_TCPV4:
            return
        self.transport(length, &ipv6, &l4, &proto, &ip_at)
        ihl = (self.big[ip_at] & 0xF) * 4
        self.big[ip_at + 10] = self.big[ip_at + 11] = 0
        for i in range(0, ihl, 2):
            total += (<uint32_t>self.big[ip_at + i] << 8) | self.big[ip_at + i + 1]
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        total = ~total & 0xFFFF
        self.big[ip_at + 10] = total >> 8
        self.big[ip_at + 11] = total & 0xFF

    cdef bint ring_room(self, uint32_t ranges) except -1:
        cdef uint32_t need = ((16 + 8 + 8 * ranges + NVSP_SIZE + 7) & ~7u) + 8 + self.reserve
        if self.writer.free_from(self.writer.seen_read) <= need:
            if self.writer.refresh_read() != READY:
                return False
            if self.writer.free_from(self.writer.seen_read) <= need:
                return False
        return True

    cdef bint flush_singles(self, handler, sections, Py_buffer *view, uint32_t staged) except -1:
        """The staged singles as one transfer-page packet (False: no ring room, nothing done)."""
        cdef uint32_t k, at, length, msg
        cdef uint8_t *base = <uint8_t *>view.buf
        cdef uint32_t section_size = sections.section_size
        if not self.ring_room(staged):
            return False
        trans_id = next(handler.ids)
        taken = sections.alloc(trans_id, staged)
        if taken is None:
            raise RuntimeError("netvsp: receive sections counted free were not")
        put32(self.xfer_header, XFER_PAGESET)
        put32(self.xfer_header + 4, staged)
        for k in range(staged):
            at = <uint32_t>taken[k] * section_size
            if <uint64_t>at + section_size > <uint64_t>view.len:
                raise RuntimeError("netvsp: a receive section outside the buffer")
            length = self.stage_len[k]
            msg = self.write_message(base + at, self.stage + k * STAGE_SLOT, length,
                                     self.stage_csum[k], 0, 0)
            put32(self.xfer_header + 8 + 8 * k, msg)
            put32(self.xfer_header + 12 + 8 * k, at)
        if self.writer.put(self.xfer_payload, NVSP_SIZE, XFER_PAGES, COMPLETION_REQUESTED,
                           trans_id, self.xfer_header, 8 + 8 * staged) != READY:
            raise RuntimeError("netvsp: the ring refused a packet it had room for")
        self.wrote += 1
        return True

    cdef bint place_group(self, handler, sections, Py_buffer *view, uint32_t length,
                          uint32_t count, uint32_t checksum, uint32_t pkt_id) except -1:
        """The frame in `big` as `count` RSC fragments in one transfer-page
        packet (False: no ring room, nothing done)."""
        cdef uint32_t k, at, piece, msg, flag, room
        cdef uint8_t *base = <uint8_t *>view.buf
        cdef uint32_t section_size = sections.section_size
        room = section_size - FRAGMENT_OVERHEAD
        if not self.ring_room(count):
            return False
        trans_id = next(handler.ids)
        taken = sections.alloc(trans_id, count)
        if taken is None:
            raise RuntimeError("netvsp: receive sections counted free were not")
        put32(self.xfer_header, XFER_PAGESET)
        put32(self.xfer_header + 4, count)
        for k in range(count):
            at = <uint32_t>taken[k] * section_size
            if <uint64_t>at + section_size > <uint64_t>view.len:
                raise RuntimeError("netvsp: a receive section outside the buffer")
            piece = length - k * room if length - k * room < room else room
            flag = 0x1 | (0x2 if k == 0 else 0) | (0x4 if k == count - 1 else 0)
            msg = self.write_message(base + at, self.big + k * room, piece,
                                     checksum if k == 0 else 0, flag, pkt_id)
            put32(self.xfer_header + 8 + 8 * k, msg)
            put32(self.xfer_header + 12 + 8 * k, at)
        if self.writer.put(self.xfer_payload, NVSP_SIZE, XFER_PAGES, COMPLETION_REQUESTED,
                           trans_id, self.xfer_header, 8 + 8 * count) != READY:
            raise RuntimeError("netvsp: the ring refused a packet it had room for")
        self.wrote += 1
        return True

    cdef uint32_t write_message(self, uint8_t *at, const uint8_t *frame, uint32_t length,
                                uint32_t checksum, uint32_t flag, uint32_t pkt_id) noexcept:
        """rndis_wire.encode_packet(frame, ppis): the checksum info PPI when
        `checksum`, the RNDIS_PKTINFO_ID when `flag` (offload.fragment_ppis's
        order). Returns msg_len."""
        cdef uint32_t info = 0
        cdef uint8_t *p = at + PACKET_HEADER
        if checksum:
            put32(p, PPI_SIZE)
            put32(p + 4, 0)
            put32(p + 8, PPI_HEADER)
            put32(p + 12, checksum)
            p += PPI_SIZE
            info += PPI_SIZE
        if flag:
            put32(p, PPI_SIZE)
            put32(p + 4, 1u << 31 | PKTINFO_LOW)
            put32(p + 8, PPI_HEADER)
            p[12] = 1
            p[13] = flag
            p[14] = pkt_id & 0xFF
            p[15] = (pkt_id >> 8) & 0xFF
            info += PPI_SIZE
        memset(at, 0, PACKET_HEADER)
        put32(at, RNDIS_PACKET)
        put32(at + 4, PACKET_HEADER + info + length)
        put32(at + 8, PACKET_HEADER - RNDIS_HEADER + info)
        put32(at + 12, length)
        put32(at + 28, PACKET_HEADER - RNDIS_HEADER)
        put32(at + 32, info)
        memcpy(at + PACKET_HEADER + info, frame, length)
        return PACKET_HEADER + info + length
