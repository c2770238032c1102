"""Hypothesis: the Cython ring and the Python reference, driven side by side
through random interleavings, against a model; and random corruption."""

from __future__ import annotations

import ctypes
import mmap
import struct
from collections import deque
from typing import Any

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from vmbus import _cring, _pyring
from vmbus._ringdefs import HEADER_SIZE, RingCorrupt

IMPLS = (_pyring, _cring)
payloads = st.binary(max_size=200)
packet_types = st.sampled_from([0x6, 0x7, 0x9, 0xB])


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 8)


def same_outcome(calls: list[Any]) -> Any:
    """Run one call per implementation; both must return equal values or
    raise the same exception class. Returns the shared value."""
    outcomes = []
    for call in calls:
        try:
            outcomes.append(("ok", call()))
        except (ValueError, RingCorrupt) as error:
            outcomes.append((type(error).__name__, None))
    assert outcomes[0] == outcomes[1], outcomes
    if outcomes[0][0] != "ok":
        raise AssertionError(f"unexpected {outcomes[0][0]}")
    return outcomes[0][1]


class RingPair(RuleBasedStateMachine):
    """Both implementations on separate buffers must stay byte-identical."""

    @initialize(
        data_size=st.sampled_from([64, 72, 128, 256, 1024]),
        start=st.integers(0, 1023),
    )
    def setup(self, data_size: int, start: int) -> None:
        start = start * 8 % data_size  # every wrap-around offset is reachable
        self.data_size = data_size
        self.buffers = []
        self.writers, self.readers = [], []
        for impl in IMPLS:
            buf = bytearray(HEADER_SIZE + data_size)
            impl.init_ring(buf)
            struct.pack_into("<II", buf, 0, start, start)
            self.buffers.append(buf)
            self.writers.append(impl.RingWriter(buf))
            self.readers.append(impl.RingReader(buf))
        # (type, trans_id, header, padded payload) of packets not yet read
        self.unpublished: deque[tuple[int, int, bytes, bytes]] = deque()
        self.published: deque[tuple[int, int, bytes, bytes]] = deque()

    @rule(
        payload=payloads,
        type=packet_types,
        trans_id=st.integers(0, 2**64 - 1),
        header=st.sampled_from([b"", bytes(8), bytes(range(16))]),
    )
    def write(self, payload: bytes, type: int, trans_id: int, header: bytes) -> None:
        written = (
            same_outcome(
                [
                    lambda w=w: w.write(payload, type=type, trans_id=trans_id, header=header)
                    for w in self.writers
                ]
            )
            if len(payload) + len(header) <= self.writers[0].max_payload()
            else None
        )
        if written:
            self.unpublished.append((type, trans_id, header, padded(payload)))

    @rule(batch=st.lists(payloads, max_size=6), trans_id=st.integers(0, 2**64 - 1))
    def write_batch(self, batch: list[bytes], trans_id: int) -> None:
        assume(all(len(p) <= self.writers[0].max_payload() for p in batch))
        count = same_outcome(
            [lambda w=w: w.write_batch(batch, trans_id=trans_id) for w in self.writers]
        )
        for i, payload in enumerate(batch[:count]):
            self.unpublished.append((6, (trans_id + i) % 2**64, b"", padded(payload)))

    @rule(batch=st.lists(payloads, max_size=6))
    def write_packed(self, batch: list[bytes]) -> None:
        assume(all(len(p) <= self.writers[0].max_payload() for p in batch))
        lengths = np.array([len(p) for p in batch], dtype=np.uint32)
        data = b"".join(batch)
        count = same_outcome(
            [lambda w=w: w.write_packed(data, lengths, type=0xB) for w in self.writers]
        )
        for i, payload in enumerate(batch[:count]):
            self.unpublished.append((0xB, i, b"", padded(payload)))

    @rule()
    def commit_writer(self) -> None:
        same_outcome([w.commit for w in self.writers])
        self.published.extend(self.unpublished)
        self.unpublished.clear()

    @rule()
    def read(self) -> None:
        got = same_outcome([lambda r=r: _describe(r.read()) for r in self.readers])
        if not self.published:
            assert got is None
            return
        assert got == self.published.popleft()

    @rule(size=st.integers(0, 256))
    def read_into(self, size: int) -> None:
        outs = [bytearray(size) for _ in IMPLS]
        expected = self.published[0] if self.published else None
        if expected is not None and len(expected[3]) > size:
            assume(False)  # the too-small case is a unit test
        n = same_outcome(
            [lambda r=r, o=o: r.read_into(o) for r, o in zip(self.readers, outs, strict=True)]
        )
        assert outs[0] == outs[1]
        if expected is None:
            assert n == -1
            return
        self.published.popleft()
        assert bytes(outs[0][:n]) == expected[3]

    @rule(count=st.integers(1, 8))
    def read_packed(self, count: int) -> None:
        results = []
        for reader in self.readers:
            out, sizes = bytearray(4096), np.zeros(count, np.uint32)
            ids = np.zeros(count, np.uint64)
            n = reader.read_packed(out, sizes, ids)
            results.append((n, bytes(out), sizes.tolist(), ids.tolist()))
        assert results[0] == results[1]
        n, out, sizes, ids = results[0]
        pos = 0
        for i in range(n):
            _, trans_id, _, body = self.published.popleft()
            assert out[pos : pos + sizes[i]] == body and ids[i] == trans_id
            pos += sizes[i]

    @rule()
    def publish_writer(self) -> None:
        for writer in self.writers:
            writer.publish()
        self.published.extend(self.unpublished)
        self.unpublished.clear()

    @rule()
    def publish_reader(self) -> None:
        for reader in self.readers:
            reader.publish()

    @rule()
    def commit_reader(self) -> None:
        same_outcome([r.commit for r in self.readers])

    @rule()
    def drain_cycle(self) -> None:
        for reader in self.readers:
            reader.begin_drain()
        more = same_outcome([r.end_drain for r in self.readers])
        assert more == bool(self.published)

    @rule(nbytes=st.integers(0, 1100))
    def request_space(self, nbytes: int) -> None:
        same_outcome([lambda w=w: w.request_space(nbytes) for w in self.writers])

    @invariant()
    def buffers_identical(self) -> None:
        assert self.buffers[0] == self.buffers[1]


def _describe(packet: Any) -> Any:
    if packet is None:
        return None
    return (packet.type, packet.trans_id, bytes(packet.header), bytes(packet.payload))


TestRingPair = RingPair.TestCase
TestRingPair.settings = settings(
    max_examples=150,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


# --- Corruption: anything in shared memory yields packets or RingCorrupt. ---


class GuardedRing:
    """A ring whose buffer is fenced by PROT_NONE pages on both sides, so any
    out-of-bounds access by the ring kills the test loudly."""

    def __init__(self, data_size: int = 4096) -> None:
        self.map = mmap.mmap(-1, HEADER_SIZE + data_size + 2 * mmap.PAGESIZE)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        end = address + len(self.map) - mmap.PAGESIZE
        for page in (address, end):
            assert libc.mprotect(page, mmap.PAGESIZE, 0) == 0  # PROT_NONE
        self.buffer = memoryview(self.map)[mmap.PAGESIZE : -mmap.PAGESIZE]


GUARDED = GuardedRing()
control_edits = st.lists(
    st.tuples(st.sampled_from([0, 4, 8, 12, 64]), st.integers(0, 2**32 - 1)), max_size=3
)
data_edits = st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=6)


def run_hostile(
    impl: Any,
    buffer: Any,
    edits: list[tuple[int, int]],
    control: list[tuple[int, int]],
    batches: list[list[bytes]],
) -> list[Any]:
    """Corrupt a ring holding packets, then use both ends; the log of what
    happened. Anything but RingCorrupt escaping fails the test."""
    log: list[Any] = []
    for position, value in edits:
        buffer[HEADER_SIZE + position] = value
    for offset, value in control:
        struct.pack_into("<I", buffer, offset, value)
    try:
        reader = impl.RingReader(buffer)
        for _ in range(30):
            packet = reader.read()
            log.append(_describe(packet))
            if packet is None:
                break
        out, sizes = bytearray(4096), np.zeros(8, np.uint32)
        log.append(reader.read_packed(out, sizes))
        log.append(reader.commit())
    except RingCorrupt as error:
        log.append(str(error))
    try:
        writer = impl.RingWriter(buffer)
        for batch in batches:
            log.append(writer.write_batch(batch))
        log.append(writer.commit())
    except RingCorrupt as error:
        log.append(str(error))
    return log


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches=st.lists(st.lists(payloads, max_size=8), min_size=1, max_size=4),
    start=st.integers(0, 511),
    edits=data_edits,
    control=control_edits,
)
def test_random_corruption_only_raises_ring_corrupt(
    batches: list[list[bytes]],
    start: int,
    edits: list[tuple[int, int]],
    control: list[tuple[int, int]],
) -> None:
    logs = []
    for impl in IMPLS:
        buffer = GUARDED.buffer if impl is _cring else bytearray(len(GUARDED.buffer))
        buffer[:] = bytes(len(buffer))
        impl.init_ring(buffer)
        struct.pack_into("<II", buffer, 0, start * 8, start * 8)
        writer = impl.RingWriter(buffer)
        for batch in batches:
            writer.write_batch(batch)
        writer.commit()
        logs.append(run_hostile(impl, buffer, edits, control, batches))
    assert logs[0] == logs[1]
