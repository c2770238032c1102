"""The compiled storvsp path (vsp.storage._fast) against the Python path,
which defines behaviour: for random and hostile packet streams, the fast
path either declines a packet (the Python path answers it) or produces the
same completion bytes, the same disk contents and the same guest memory.
Two VspHarnesses, fast path on and off, over identical images and memory.
And a racing guest that rewrites its SRBs, GPA lists and data pages while
the parent serves them."""

from __future__ import annotations

import contextlib
import os
import random
import struct
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scsi_support import negotiate

from vmbus import ring
from vmbus.channel import COMPLETION_REQUESTED, Channel
from vmbus.memory import PAGE_SIZE
from vmbus.packet import PacketType
from vmbus.testing import VspHarness
from vmbus.testing import harness as harness_module
from vmbus.testing.rings import ring_buffer
from vmbus.transport import Signal
from vsp.storage import RawFileBackend, StorVsp
from vsp.storage._fast import RUN_IDLE
from vsp.storage.device import StorvspChannel

pytestmark = pytest.mark.skipif(
    ring.IMPLEMENTATION != "cython", reason="the fast path needs the Cython ring"
)

MEMORY = 1 << 20  # 256 guest pages; 0 and 1 stand for the rings
PAGES = MEMORY // PAGE_SIZE
DISK = 1 << 20  # 2048 blocks of 512 bytes
BLOCKS = DISK // 512
DATA_PFN = 2  # the harness hands out pages from here on
EXECUTE_SRB = 3
READS, WRITES, SYNCS = (0x08, 0x28, 0xA8, 0x88), (0x0A, 0x2A, 0xAA, 0x8A), (0x35, 0x91)


def cdb(opcode: int, lba: int, blocks: int, flags: int = 0, control: int = 0) -> bytes:
    """A READ/WRITE/SYNCHRONIZE CACHE CDB, packed by hand from SBC-3."""
    if opcode in (0x08, 0x0A):
        return struct.pack(
            ">BBHBB", opcode, (lba >> 16) & 0x1F, lba & 0xFFFF, blocks & 0xFF, control
        )
    if opcode in (0x28, 0x2A, 0x35):
        return struct.pack(">BBIBHB", opcode, flags, lba & 0xFFFFFFFF, 0, blocks & 0xFFFF, control)
    if opcode in (0xA8, 0xAA):
        return struct.pack(">BBIIBB", opcode, flags, lba & 0xFFFFFFFF, blocks, 0, control)
    return struct.pack(">BBQIBB", opcode, flags, lba, blocks, 0, control)


def srb_packet(
    cdb_bytes: bytes,
    direction: int,
    length: int,
    *,
    lun: int = 0,
    path: int = 0,
    target: int = 0,
    cdb_length: int | None = None,
    sense_room: int = 20,
    operation: int = EXECUTE_SRB,
    tail: bytes = bytes(16),
) -> bytes:
    """A vstor_packet carrying a vmscsi_request (64 bytes), by hand."""
    header = struct.pack("<III", operation, 1, 0)
    request = struct.pack(
        "<HBBBBBBBBBBI20s",
        52,
        0,
        0,
        0,
        path,
        target,
        lun,
        len(cdb_bytes) if cdb_length is None else cdb_length,
        sense_room,
        direction,
        0,
        length,
        cdb_bytes[:20].ljust(20, b"\0"),
    )
    return header + request + tail


def gpa_header(ranges: list[tuple[int, int, list[int]]]) -> bytes:
    """A GPA-direct header: (byte_count, byte_offset, pfns) each, by hand."""
    parts = [struct.pack("<II", 0, len(ranges))]
    for byte_count, byte_offset, pfns in ranges:
        parts.append(struct.pack("<II", byte_count, byte_offset))
        parts.append(struct.pack(f"<{len(pfns)}Q", *pfns))
    return b"".join(parts)


@dataclass
class Side:
    """One storvsp on a raw image, its harness, and its guest end."""

    vsp: StorVsp
    backend: RawFileBackend
    harness: VspHarness

    @property
    def guest(self) -> Channel:
        return self.harness.guest

    @property
    def handler(self) -> StorvspChannel:
        handler = self.harness.handler
        assert isinstance(handler, StorvspChannel)
        return handler

    @property
    def served(self) -> int:
        """Requests the compiled path completed."""
        assert self.handler.fast is not None
        return self.handler.fast.served


@contextlib.contextmanager
def side(path: str, fast: bool, image: bytes, memory: bytes, version: int) -> Iterator[Side]:
    with open(path, "wb") as file:
        file.write(image)
    backend = RawFileBackend(path)
    vsp = StorVsp([backend], max_transfer_bytes=64 << 10, fast_path=fast)
    harness = VspHarness(vsp, memory_size=MEMORY)
    try:
        harness.memory.view(0, MEMORY)[:] = memory
        negotiate(harness, (version,))
        yield Side(vsp, backend, harness)
    finally:
        harness.close()
        backend.close()


def run_stream(
    s: Side, stream: list[tuple[int, bytes, bytes]], compiled_loop: bool = False
) -> list[tuple[int, int, int, bytes]]:
    """Send every packet (in ring-sized batches), serve, collect the replies.
    With `compiled_loop`, the compiled loop a channel thread runs
    (FastPath.run) serves first, and the harness's Python service takes
    what it hands back, as the channel's thread does."""
    serve = (lambda: serve_compiled(s)) if compiled_loop else s.harness.pump
    replies = []
    for trans_id, (kind, payload, header) in enumerate(stream, 1):
        if not s.guest.try_send(payload, kind, COMPLETION_REQUESTED, trans_id, header):
            serve()
            replies += drain_replies(s.guest)
            assert s.guest.try_send(payload, kind, COMPLETION_REQUESTED, trans_id, header)
    serve()
    return replies + drain_replies(s.guest)


def serve_compiled(s: Side) -> None:
    """FastPath.run until the ring is empty (it then waits out its idle
    millisecond), the Python service after each return that leaves work."""
    fast = s.handler.fast
    assert fast is not None
    while True:
        _, why = fast.run(s.vsp, 0.0, 1.0, 0.0)
        s.harness.pump()
        if why == RUN_IDLE and not s.handler.channel.reader.bytes_available:
            return


def drain_replies(guest: Channel) -> list[tuple[int, int, int, bytes]]:
    out = []
    while (reply := guest.poll()) is not None:
        out.append((reply.type, reply.flags, reply.trans_id, bytes(reply.payload)))
    return out


def differential(
    stream: list[tuple[int, bytes, bytes]], version: int = 0x0602, compiled_loop: bool = False
) -> int:
    """Run `stream` through both paths (the fast one by the harness's drain,
    or by the compiled loop); assert they agree; return how many requests
    the fast path served."""
    rng = random.Random(len(stream))
    image = rng.randbytes(DISK)
    memory = bytes(2 * PAGE_SIZE) + rng.randbytes(MEMORY - 2 * PAGE_SIZE)
    with tempfile.TemporaryDirectory() as directory, contextlib.ExitStack() as stack:
        fast = stack.enter_context(side(f"{directory}/f", True, image, memory, version))
        slow = stack.enter_context(side(f"{directory}/s", False, image, memory, version))
        assert fast.handler.fast is not None and slow.handler.fast is None
        fast_replies = run_stream(fast, stream, compiled_loop)
        slow_replies = run_stream(slow, stream)
        assert len(slow_replies) == len(stream)
        assert fast_replies == slow_replies
        assert os.pread(fast.backend.fd, DISK, 0) == os.pread(slow.backend.fd, DISK, 0)
        assert bytes(fast.harness.memory.view(0, MEMORY)) == bytes(
            slow.harness.memory.view(0, MEMORY)
        )
        assert fast.vsp.errors == slow.vsp.errors
        assert fast.handler.requests == slow.handler.requests
        # The completions it writes count as the channel's packets (benchmarks divide by them).
        assert fast.handler.channel.packets_sent == slow.handler.channel.packets_sent
        return fast.served


# --- strategies: mostly plausible requests, with every field sometimes hostile ---

pfns_ok = st.integers(DATA_PFN, PAGES - 1)
pfn_any = st.one_of(pfns_ok, st.sampled_from([0, 1, PAGES, PAGES + 7, 1 << 40, (1 << 64) - 1]))


@st.composite
def gpa_ranges(draw: st.DrawFn) -> bytes:
    count = draw(st.integers(1, 3))
    ranges = []
    for _ in range(count):
        offset = draw(st.one_of(st.just(0), st.integers(0, PAGE_SIZE - 1), st.just(PAGE_SIZE)))
        size = draw(st.one_of(st.sampled_from([512, 4096, 8192]), st.integers(0, 5 * PAGE_SIZE)))
        pages = max(1, -(-(offset + size) // PAGE_SIZE))
        contiguous = draw(st.booleans())
        first = draw(pfns_ok if draw(st.integers(0, 9)) else pfn_any)
        pfns = (
            [min(first + i, (1 << 64) - 1) for i in range(pages)]
            if contiguous
            else [draw(pfn_any if draw(st.integers(0, 9)) == 0 else pfns_ok) for _ in range(pages)]
        )
        ranges.append(
            (size, offset, pfns[: draw(st.sampled_from([pages, pages, max(pages - 1, 0)]))])
        )
    header = gpa_header(ranges)
    if draw(st.integers(0, 9)) == 0:  # truncated, or garbage after the ranges
        header = header[: draw(st.integers(0, len(header) // 8)) * 8] + bytes(
            8 * draw(st.integers(0, 2))
        )
    if len(header) >= 8 and draw(st.integers(0, 19)) == 0:  # a lying range count
        header = header[:4] + struct.pack("<I", draw(st.integers(0, (1 << 32) - 1))) + header[8:]
    return header


@st.composite
def packets(draw: st.DrawFn) -> tuple[int, bytes, bytes]:
    opcode = draw(st.one_of(st.sampled_from(READS + WRITES + SYNCS), st.integers(0, 255)))
    lba = draw(
        st.one_of(
            st.integers(0, BLOCKS - 1), st.sampled_from([BLOCKS, BLOCKS - 1, 0x1FFFFF, 1 << 33])
        )
    )
    blocks = draw(st.one_of(st.integers(0, 24), st.sampled_from([128, 256, 1 << 16])))
    flags = draw(st.sampled_from([0, 0, 0, 0x08, 0x20, 0x10]))
    control = draw(st.sampled_from([0, 0, 0, 0x04, 0x01]))
    write = opcode in WRITES
    direction = draw(st.sampled_from([0 if write else 1] * 4 + [0, 1, 2, 3]))
    length = draw(st.one_of(st.just(blocks * 512), st.integers(0, 70 << 10)))
    built = cdb(opcode, lba & ((1 << 64) - 1), blocks, flags, control)
    payload = srb_packet(
        built,
        direction,
        length,
        lun=draw(st.sampled_from([0, 0, 0, 0, 1, 254, 255])),
        path=draw(st.sampled_from([0, 0, 0, 0, 1, 8])),
        target=draw(st.sampled_from([0, 0, 0, 0, 1, 2])),
        cdb_length=draw(st.sampled_from([None, None, None, 0, 5, 6, 9, 17])),
        sense_room=draw(st.sampled_from([20, 18, 0, 21, 255])),
        operation=draw(st.sampled_from([EXECUTE_SRB] * 8 + [4, 10, 77])),
    )
    size = draw(st.sampled_from([64] * 6 + [48, 40, 72, 8]))
    payload = payload[:size].ljust(size, b"\0")
    kind = draw(
        st.sampled_from([PacketType.DATA_USING_GPA_DIRECT] * 6 + [PacketType.DATA_INBAND, 7])
    )
    header = draw(gpa_ranges()) if kind != PacketType.DATA_INBAND or draw(st.booleans()) else b""
    return int(kind), payload, header


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(packets(), min_size=1, max_size=24))
def test_random_and_hostile_streams_agree_with_the_python_path(
    stream: list[tuple[int, bytes, bytes]],
) -> None:
    differential(stream)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(packets(), min_size=1, max_size=24))
def test_the_compiled_loop_of_a_channel_thread_agrees_with_the_python_path(
    stream: list[tuple[int, bytes, bytes]],
) -> None:
    differential(stream, compiled_loop=True)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(packets(), min_size=1, max_size=12))
def test_pre_win8_guest_48_byte_packets_agree(stream: list[tuple[int, bytes, bytes]]) -> None:
    differential(stream, version=0x0402)


def steady_stream(count: int, seed: int) -> list[tuple[int, bytes, bytes]]:
    """Valid reads, writes and flushes of every CDB size, some FUA, some
    across scattered and unaligned pages."""
    rng = random.Random(seed)
    stream = []
    for _ in range(count):
        opcode = rng.choice(READS + WRITES + SYNCS)
        blocks = rng.randint(1, 16)
        lba = rng.randint(0, BLOCKS - blocks)
        length = blocks * 512 + rng.choice([0, 0, 512])
        offset = rng.choice([0, 0, 512, 100])
        pages = -(-(offset + length) // PAGE_SIZE)
        pfns = rng.sample(range(DATA_PFN, PAGES), pages)
        flags = rng.choice([0, 0x08]) if opcode not in (0x08, 0x0A) else 0
        direction = 0 if opcode in WRITES else 1
        payload = srb_packet(cdb(opcode, lba, blocks, flags), direction, length)
        stream.append(
            (int(PacketType.DATA_USING_GPA_DIRECT), payload, gpa_header([(length, offset, pfns)]))
        )
    return stream


def test_steady_state_is_served_by_the_fast_path_byte_for_byte() -> None:
    assert differential(steady_stream(200, seed=7)) == 200
    assert differential(steady_stream(200, seed=8), compiled_loop=True) == 200


def test_declined_packet_is_answered_once_in_order_between_served_ones() -> None:
    stream = steady_stream(6, seed=3)
    inquiry = srb_packet(bytes([0x12, 0, 0, 0, 36, 0]), 1, 36)
    stream[2:2] = [(int(PacketType.DATA_USING_GPA_DIRECT), inquiry, gpa_header([(36, 0, [9])]))]
    assert differential(stream) == 6  # the INQUIRY went to Python, once


def test_fast_path_off_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMBUS_STORAGE_FAST", "0")
    assert StorVsp([], serial="x").fast_path is False
    monkeypatch.delenv("VMBUS_STORAGE_FAST")
    assert StorVsp([], serial="x").fast_path is True


# --- a racing guest ---------------------------------------------------------

RACE_PFNS = 3  # one range of 3 pages: every packet is 128 bytes in the ring
RACE_PACKET = 128


def test_guest_rewriting_srbs_gpa_lists_and_data_while_served(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A guest thread flips bytes of the queued packets (all but their
    descriptors and trailers, which the ring itself checks) and of its data
    pages while the parent serves them: every request is answered, nothing
    raises, and the fast path and the Python path share the work."""
    rings: list[bytearray] = []

    def recording_pair(data_size: int, spin_seconds: float) -> tuple[Channel, Channel]:
        outbound, inbound = ring_buffer(data_size), ring_buffer(data_size)
        rings.append(outbound)
        to_host, to_guest = Signal(), Signal()
        guest = Channel(outbound, inbound, to_host, to_guest, spin_seconds=spin_seconds)
        return guest, Channel(inbound, outbound, to_guest, to_host, spin_seconds=spin_seconds)

    monkeypatch.setattr(harness_module, "channel_pair", recording_pair)
    rng = random.Random(5)
    memory = bytes(MEMORY)
    with side(f"{tmp_path}/race", True, bytes(DISK), memory, 0x0602) as s:
        (request_ring,) = rings
        # Packets from here on start at the write index plus multiples of 128.
        base = struct.unpack_from("<I", request_ring)[0]
        pages = s.harness.memory.view(DATA_PFN * PAGE_SIZE, MEMORY - DATA_PFN * PAGE_SIZE)
        stop = threading.Event()

        def racer() -> None:
            flip = random.Random(11)
            ring_data = memoryview(request_ring)[PAGE_SIZE:]
            while not stop.is_set():
                for _ in range(64):
                    slot = flip.randrange(len(ring_data) // RACE_PACKET) * RACE_PACKET
                    at = base + slot + flip.randrange(16, RACE_PACKET - 8)
                    ring_data[at % len(ring_data)] = flip.randrange(256)
                    pages[flip.randrange(len(pages))] = flip.randrange(256)

        handshake = s.handler.requests
        thread = threading.Thread(target=racer, daemon=True)
        thread.start()
        answered = 0
        try:
            for _ in range(200):
                sent = []
                for _ in range(32):
                    opcode = rng.choice(READS[1:] + WRITES[1:])
                    pfns = [rng.randrange(DATA_PFN, PAGES) for _ in range(RACE_PFNS)]
                    payload = srb_packet(
                        cdb(opcode, rng.randrange(BLOCKS - 16), 16), int(opcode in READS), 8192
                    )
                    header = gpa_header([(8192, rng.choice([0, 512]), pfns)])
                    assert len(header) + len(payload) + 24 == RACE_PACKET
                    trans_id = answered + len(sent) + 1
                    s.guest.send(
                        payload,
                        type=PacketType.DATA_USING_GPA_DIRECT,
                        trans_id=trans_id,
                        header=header,
                        timeout=0,
                    )
                    sent.append(trans_id)
                s.harness.pump()
                replies = drain_replies(s.guest)
                assert sorted(r[2] for r in replies) == sent
                assert all(r[0] == PacketType.COMP for r in replies)
                answered += len(sent)
        finally:
            stop.set()
            thread.join()
            pages.release()
        assert answered == 6400 == s.handler.requests - handshake
        assert s.served > 0


def test_a_disk_that_changes_between_requests_is_read_afresh_by_the_compiled_path() -> None:
    """The compiled path keeps what it read of the disks until something
    says they changed (vsp.storage.changes): a unit attention raised, a LUN
    removed. The next request after either goes to the Python path, which
    reports it (CHECK CONDITION once; then INVALID_LUN)."""
    read = srb_packet(cdb(0x28, 0, 1), 1, 512)
    header = gpa_header([(512, 0, [DATA_PFN])])
    kind = int(PacketType.DATA_USING_GPA_DIRECT)
    with (
        tempfile.TemporaryDirectory() as directory,
        side(f"{directory}/d", True, bytes(DISK), bytes(MEMORY), 0x0602) as s,
    ):

        def status() -> int:
            (reply,) = run_stream(s, [(kind, read, header)])
            return reply[3][14] & 0x3F  # srb_status, without AUTOSENSE_VALID

        assert (status(), s.served) == (0x01, 1)
        s.vsp.target.disks[0].notify_capacity_changed()
        assert (status(), s.served) == (0x04, 1)  # SRB_STATUS_ERROR: the unit attention
        assert (status(), s.served) == (0x01, 2)
        del s.vsp.target.disks[0]
        assert (status(), s.served) == (0x20, 2)  # SRB_STATUS_INVALID_LUN
