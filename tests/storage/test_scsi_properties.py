"""Properties of the SCSI target: a random sequence of reads, writes, UNMAPs
and WRITE SAMEs agrees with a bytearray model, and arbitrary CDBs with any
buffers and directions always complete, never raise, and never write
outside the buffers or into a buffer the target may only read."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scsi_support import IN, LBA_RANGE, NONE, OUT, Unit, execute, pattern, run, rw, unmap

from vsp.storage import BlockBackend, ScsiDisk, ScsiTarget
from vsp.storage.backends import RamBackend, ReadOnlyBackend

MODEL_BLOCKS = 64
operations = st.tuples(
    st.sampled_from(["read", "write", "unmap", "same", "zero", "zero_unmap"]),
    st.sampled_from([0, 1, 2, 3]),  # CDB size: 6, 10, 12, 16
    st.integers(0, MODEL_BLOCKS + 4),
    st.integers(0, 8),
    st.integers(0, 255),
    st.lists(st.integers(1, 700), max_size=3),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(operations, max_size=25))
def test_model_checked_sequence(ops: list[tuple[str, int, int, int, int, list[int]]]) -> None:
    backend = RamBackend(MODEL_BLOCKS * 512)
    disk, model = ScsiDisk(backend), bytearray(MODEL_BLOCKS * 512)
    for kind, size, lba, blocks, seed, cuts in ops:
        blocks = blocks or 1
        in_range = lba + blocks <= MODEL_BLOCKS
        start, end = lba * 512, (lba + blocks) * 512
        if kind in ("read", "write"):
            op = [(0x08, 0x0A), (0x28, 0x2A), (0xA8, 0xAA), (0x88, 0x8A)][size][kind == "write"]
            data = pattern(blocks * 512, seed) if kind == "write" else bytes(blocks * 512)
            segments = scatter(data, cuts)
            result = disk.execute(rw(op, lba, blocks), segments, OUT if kind == "write" else IN)
            if in_range and kind == "write":
                model[start:end] = data
            elif in_range:
                assert b"".join(bytes(s) for s in segments) == model[start:end]
        elif kind == "unmap":
            result = unmap(disk, (lba, blocks))
            if in_range:
                model[start:end] = bytes(end - start)
        else:
            block = pattern(512, seed) if kind == "same" else bytes(512)
            flags = 0x08 if kind == "zero_unmap" else 0
            result = run(disk, rw(0x41 if size % 2 else 0x93, lba, blocks, flags), block, OUT)
            if in_range:
                model[start:end] = block * blocks
        assert result.status == (0 if in_range else 2)
        assert in_range or result.sense == LBA_RANGE
        assert backend.data == model


def scatter(data: bytes, sizes: list[int]) -> list[memoryview]:
    """`data` in writable segments of `sizes`, the rest in one more (some may be empty)."""
    views, position = [], 0
    for size in [*sizes, len(data)]:
        views.append(memoryview(bytearray(data[position : position + size])))
        position += size
    return views


BLOCK_OPCODES = [0x08, 0x0A, 0x28, 0x2A, 0x2F, 0x35, 0x41, 0x88, 0x8A, 0x8F, 0x91, 0x93, 0xA8, 0xAA]
# Valid CDBs of the other commands, to mutate.
SEEDS = [
    bytes(6),
    bytes([0x03, 0, 0, 0, 18, 0]),
    bytes([0x1B, 0, 0, 0, 1, 0]),
    *(bytes([0x12, 1, page, 0, 255, 0]) for page in (0, 0x80, 0x83, 0xB0, 0xB1, 0xB2)),
    bytes([0x12, 0, 0, 0, 96, 0]),
    bytes([0x1A, 0, 0x3F, 0, 255, 0]),
    bytes([0x5A, 0, 0x08, 0, 0, 0, 0, 0, 255, 0]),
    bytes([0x25]) + bytes(9),
    bytes([0x9E, 0x10]) + bytes(8) + bytes([0, 0, 0, 32, 0, 0]),
    bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]),
    bytes([0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0]),
]
GUARD = 0xA5
# Mostly zeros and flag-like values, so that mutated fields often stay valid.
field_bytes = st.one_of(
    st.just(0), st.sampled_from([1, 2, 8, 0x10, 0x3F, 0x80, 0xFF]), st.integers(0, 255)
)


@st.composite
def cdbs(draw: st.DrawFn) -> bytes:
    """Any bytes, or a known opcode with plausible fields, sometimes cut or padded."""
    kind = draw(st.sampled_from(["raw", "block", "other"]))
    if kind == "raw":
        return draw(st.binary(max_size=32))
    if kind == "block":
        cdb = rw(
            draw(st.sampled_from(BLOCK_OPCODES)),
            draw(st.integers(0, 70)),
            draw(st.integers(0, 4)),
            draw(st.sampled_from([0, 0x01, 0x02, 0x08, 0x09, 0x10, 0x20])),
        )
    else:
        mutated = bytearray(draw(st.sampled_from(SEEDS)))
        for index, value in draw(st.lists(st.tuples(st.integers(0, 15), field_bytes), max_size=2)):
            mutated[index % len(mutated)] = value
        cdb = bytes(mutated)
    return cdb[: draw(st.integers(0, 32))] if draw(st.integers(0, 9)) == 0 else cdb


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cdb=cdbs(),
    sizes=st.lists(st.one_of(st.integers(0, 5000), st.sampled_from([600, 4096, 8192])), max_size=4),
    direction=st.sampled_from([OUT, IN, OUT, IN, NONE, 7]),
    which=st.sampled_from(["disk", "read-only", "4k", "target"]),
    lun=st.integers(0, 3),
)
def test_arbitrary_cdbs_never_raise_or_overrun(
    cdb: bytes, sizes: list[int], direction: int, which: str, lun: int
) -> None:
    backend: BlockBackend = {
        "disk": lambda: RamBackend(64 * 512),
        "read-only": lambda: ReadOnlyBackend(RamBackend(64 * 512)),
        "4k": lambda: RamBackend(16 * 4096, block_size=4096),
        "target": lambda: RamBackend(64 * 512),
    }[which]()
    unit: Unit = ScsiDisk(backend, serial="FUZZ")
    if which == "target":
        unit = ScsiTarget({0: unit, 2: ScsiDisk(RamBackend(8 * 512))})
    # The segments sit in one arena, with guard bytes around each.
    arena = bytearray([GUARD]) * (sum(sizes) + 16 * (len(sizes) + 1))
    content = pattern(sum(sizes), seed=len(cdb))
    spans, position, used = [], 16, 0
    for size in sizes:
        arena[position : position + size] = content[used : used + size]
        spans.append((position, position + size))
        position, used = position + size + 16, used + size
    before = bytes(arena)
    segments = [memoryview(arena)[a:b] for a, b in spans]

    result = execute(unit, cdb, segments, direction, lun)

    assert result.status in (0, 2)
    if result.status == 2:
        assert len(result.sense) == 18 and result.sense[0] == 0x70 and result.transferred == 0
    else:
        assert result.sense == b""
    assert 0 <= result.transferred <= sum(sizes)
    after = b"".join(arena[a:b] for a, b in spans)
    assert after[result.transferred :] == content[result.transferred :]  # only the head moves
    if direction != IN:
        assert arena == before  # an OUT or NONE buffer is never written
    guards = [arena[:16]] + [arena[end : end + 16] for _, end in spans]
    assert all(guard == bytes([GUARD]) * 16 for guard in guards)
