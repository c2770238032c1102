# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""storvsc's lone request, compiled: one SRB sent, waited for (a spin, then
a sleep on the doorbell, without the GIL) and its completion reaped, in one
call (`run_one`), with the controller's choice of spin and its bookkeeping
around it (`run_lone`, StorageController._run_one's body). What it does is
what StorageController.run does for one command: the storage tests hold
the two to the same packets and the same results (tests/storage)."""

from cpython.buffer cimport (
    PyBUF_ANY_CONTIGUOUS,
    PyBUF_WRITABLE,
    PyBuffer_Release,
    PyObject_GetBuffer,
)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

from vmbus._cring cimport (
    monotonic,
    vmbus_cpu_relax,
    BAD_READ_INDEX,
    BAD_WRITE_INDEX,
    EMPTY,
    READY,
    SIGNAL,
    Descriptor,
    RingReader,
    RingWriter,
    mask_signals,
    reader_commit,
    ring_doorbell,
    unmask_signals,
    wait_doorbell,
    writer_commit,
)

from vmbus.channel import ChannelTimeout, DeviceRemoved
from vsc.storage._fast cimport copy_buffers
from vsc.storage._fast import gpa_header

# vstor_packet offsets and VMBus values, as vsc/storage/_fast.pyx names them.
cdef enum:
    PACKET = 64
    PRE_WIN8_PACKET = 48
    OP_COMPLETE_IO = 1
    AT_OPERATION = 0
    AT_SRB_STATUS = 14
    AT_TRANSFER = 24
    SRB_STATUS_CODE = 0x3F
    SRB_SUCCESS = 0x01
    VM_PKT_COMP = 0xB
    VM_PKT_DATA_INBAND = 0x6
    VM_PKT_DATA_USING_GPA_DIRECT = 0x9
    COMPLETION_REQUESTED = 0x1


cdef inline uint32_t get32(const uint8_t *p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v




# run_one's outcomes
ONE_DONE, ONE_FAILED, ONE_FULL, ONE_TIMEOUT, ONE_REMOVED = 0, 1, 2, 3, 4


cdef int wait_reply(RingReader reader, int wake_fd, double spin, double deadline,
                    double *caught) noexcept nogil:
    """Channel.wait until a packet is in `reader` (masked except while we
    sleep): spin up to `spin` seconds, then unmask, re-check and sleep on
    the doorbell. READY, EMPTY at the deadline, or a bad write_index.
    `caught`: the seconds the spin took to see it, or -1 if we slept."""
    cdef double start = monotonic(), now
    cdef double spin_ends = start + spin
    cdef int state
    caught[0] = -1
    while True:
        state = reader.refresh_write()
        if state != READY:
            return state
        if reader.available():
            caught[0] = monotonic() - start
            return READY
        if spin <= 0 or monotonic() >= spin_ends:
            break
        vmbus_cpu_relax()
    while True:
        state = unmask_signals(reader)
        if state != EMPTY:
            mask_signals(reader)
            return state  # READY: it came as we unmasked (no doorbell)
        now = monotonic()
        if now >= deadline:
            mask_signals(reader)
            return EMPTY
        wait_doorbell(wake_fd, <int>((deadline - now) * 1000) + 1)
        mask_signals(reader)
        # Back to the caller after any wake-up, a packet or not: a doorbell
        # with nothing behind it may be the device's removal (Channel.remove).
        return reader.refresh_write()


def run_one(RingWriter writer, RingReader reader, command, slot, uint64_t trans_id,
            int notify_fd, int wake_fd, double spin, double timeout, channel=None):
    """StorageController.run for one command on an idle channel (controller
    .py's form; `slot` its bounce slot), sent and waited for in one call,
    without the GIL while it waits. Returns (outcome, value, signals,
    caught): ONE_DONE with the bytes moved (a bounce read copied out);
    ONE_FAILED with a private copy of the reply's first 64 bytes, for
    `finish`; ONE_FULL when the ring had no room (nothing sent); ONE_TIMEOUT;
    ONE_REMOVED when `channel` (if given) was removed meanwhile (its slot in flight).
    `signals`: doorbells rung; `caught`: as wait_reply. Packets that are not
    its completion are consumed and skipped, as the controller's reap does."""
    cdef Descriptor d
    cdef uint8_t p[PACKET]
    cdef uint32_t size, taken
    cdef int state, result, rung = 0
    cdef double caught = -1, deadline
    packet, length, gpa, data, reading, _ = command
    if not length:
        header, kind = b"", VM_PKT_DATA_INBAND
    elif gpa >= 0:
        header, kind = gpa_header(gpa, length), VM_PKT_DATA_USING_GPA_DIRECT
    else:
        header, kind = slot.header(length), VM_PKT_DATA_USING_GPA_DIRECT
    writer.check_fits(len(<bytes>packet), len(<bytes>header))
    if length and gpa < 0 and not reading:
        copy_buffers(slot.view, data, length)
    result = writer.put(<const uint8_t *>PyBytes_AS_STRING(packet), len(<bytes>packet), kind,
                        COMPLETION_REQUESTED, trans_id,
                        <const uint8_t *>PyBytes_AS_STRING(header), len(<bytes>header))
    if result == BAD_READ_INDEX:
        writer.raise_bad_read_index()
    if result != READY:
        return ONE_FULL, 0, 0, -1.0
    state = writer_commit(writer)
    if state == BAD_READ_INDEX:
        writer.raise_bad_read_index()
    if state == SIGNAL:
        ring_doorbell(notify_fd)
        rung += 1
    deadline = monotonic() + timeout
    while True:
        with nogil:
            state = wait_reply(reader, wake_fd, spin, deadline, &caught)
        if state == EMPTY:
            return ONE_TIMEOUT, 0, rung, caught
        status = reader.check(&d)  # raises RingCorrupt on a corrupt ring
        if status == EMPTY:
            if channel is not None and channel.removed:  # the host rescinded the device
                return ONE_REMOVED, 0, rung, caught
            continue
        if d.type != VM_PKT_COMP or d.trans_id != trans_id:
            reader.consume(&d)  # unsolicited, or no request of ours
            if reader_commit(reader) == SIGNAL:
                ring_doorbell(notify_fd)
                rung += 1
            continue
        size = (<uint32_t>d.len8 - d.offset8) * 8
        taken = size if size < PACKET else PACKET
        memset(p, 0, PACKET)
        reader.copy_out(reader.advance(reader.cursor, <uint32_t>d.offset8 * 8), p, taken)
        reader.consume(&d)
        state = reader_commit(reader)
        if state == BAD_WRITE_INDEX:
            reader.fail(BAD_WRITE_INDEX, NULL)
        if state == SIGNAL:
            ring_doorbell(notify_fd)
            rung += 1
        if (size >= PRE_WIN8_PACKET and get32(p + AT_OPERATION) == OP_COMPLETE_IO
                and p[AT_SRB_STATUS] & SRB_STATUS_CODE == SRB_SUCCESS):
            if gpa < 0 and reading:
                copy_buffers(data, slot.view, min(<Py_ssize_t>get32(p + AT_TRANSFER),
                                                  <Py_ssize_t>length))
            return ONE_DONE, get32(p + AT_TRANSFER), rung, caught
        return ONE_FAILED, PyBytes_FromStringAndSize(<char *>p, taken), rung, caught


def run_lone(controller, channel, RingWriter writer, RingReader reader, command, results,
             tuple policy):
    """StorageController._run_one compiled (its docstring says what it does),
    on `channel` (the controller's one, compiled, idle): the spin it waits
    with (the channel's adaptive one, or for a large request the learnt long
    spin of `policy`: LONG_REQUEST, LONG_SPIN_MAX, LONG_SPIN_PROBE,
    LONG_SPIN_MARGIN, LEARNING_RATE, LONG_SPIN_MISSED, and the TIMEOUT it
    waits for at most), run_one, and the bookkeeping after. False when the ring had no room (nothing sent)."""
    cdef Py_ssize_t length = command[1], long_request = policy[0]
    cdef double long_max = policy[1], spin, expected, caught
    cdef double channel_spin = channel.spin_seconds
    cdef bint long_spin = length >= long_request and channel_spin > 0
    if long_spin:
        expected = length * <double>controller._seconds_per_byte
        long_waits = controller._long_waits + 1
        controller._long_waits = long_waits
        if expected > long_max and long_waits % policy[2]:
            spin = 0.0  # a slow disk: sleep at once
        else:
            spin = min(max(expected * <double>policy[3], channel_spin), long_max)
    else:
        spin = channel._spin_budget()
    free = controller._free
    slot = free.pop()
    trans_id = next(channel.ids)
    try:
        outcome, value, rung, caught = run_one(
            writer, reader, command, slot, trans_id, channel.notify_peer.fileno(),
            channel.wake_me.fileno(), spin, policy[6], channel)
    except BaseException:
        free.append(slot)
        raise
    channel.notify_peer.sent += rung
    if outcome == ONE_REMOVED:
        raise DeviceRemoved("the host removed this device")
    if outcome == ONE_TIMEOUT:  # still in flight: a late completion is reaped
        controller._in_flight[0][trans_id] = (command, slot)
    else:
        free.append(slot)
    if outcome == ONE_FULL:
        return False
    channel.packets_sent += 1
    if long_spin and spin:  # learn how long large requests take
        if caught >= 0:
            per_byte = controller._seconds_per_byte
            controller._seconds_per_byte = per_byte + (caught / length - per_byte) * policy[4]
        else:
            controller._seconds_per_byte = min(controller._seconds_per_byte * policy[5],
                                               2 * long_max / length)
    elif spin:
        if caught >= 0:
            channel.spin_misses = 0
        else:
            channel.spin_misses += 1
    if outcome == ONE_TIMEOUT:
        raise ChannelTimeout("timed out waiting for a packet")
    if outcome == ONE_FAILED:
        failure = controller.finish(command, slot, value)
        if failure is not None:
            if results is None:
                raise failure
            index = command[5]
            results[index] = results[index] or failure
    return True
