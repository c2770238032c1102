"""The ring's layout, flow control and signalling rules, on both implementations."""

from __future__ import annotations

import struct
from types import ModuleType

import numpy as np
import pytest

from vmbus._ringdefs import HEADER_SIZE, RingCorrupt

U32 = struct.Struct("<I")


def make_ring(impl: ModuleType, data_size: int = 256, start: int = 0) -> bytearray:
    """A fresh ring whose indices both start at `start` (to place the wrap)."""
    buf = bytearray(HEADER_SIZE + data_size)
    impl.init_ring(buf)
    U32.pack_into(buf, 0, start)
    U32.pack_into(buf, 4, start)
    return buf


def index(buf: bytearray, offset: int) -> int:
    value: int = U32.unpack_from(buf, offset)[0]
    return value


def test_packet_bytes_follow_hyper_v_layout(ring_impl: ModuleType) -> None:
    buf = make_ring(ring_impl, start=40)
    writer = ring_impl.RingWriter(buf)
    assert writer.write(b"abc", type=9, flags=1, trans_id=0x1122334455667788, header=bytes(8))
    assert writer.commit()
    data = bytes(buf[HEADER_SIZE + 40 : HEADER_SIZE + 40 + 40])
    assert data.hex() == (
        "0900"
        "0300"
        "0400"
        "0100"
        "8877665544332211"  # type, offset8, len8, flags, id
        "0000000000000000"  # type-specific header
        "6162630000000000"  # payload, zero pad to 8
        "0000000028000000"  # trailer: old write index << 32
    )
    assert index(buf, 0) == 80


def test_reader_sees_packets_in_order_with_metadata(ring_impl: ModuleType) -> None:
    buf = make_ring(ring_impl)
    writer, reader = ring_impl.RingWriter(buf), ring_impl.RingReader(buf)
    assert writer.write(b"first", trans_id=1)
    assert writer.write(b"second!!", type=0xB, trans_id=2)
    writer.commit()
    packet = reader.read()
    assert (packet.type, packet.trans_id, bytes(packet.payload)) == (6, 1, b"first\0\0\0")
    out = bytearray(64)
    assert reader.read_into(out) == 8
    assert out[:8] == b"second!!"
    assert (reader.last_type, reader.last_trans_id) == (0xB, 2)
    assert reader.read() is None
    assert reader.read_into(out) == -1


def test_ring_is_never_completely_full(ring_impl: ModuleType) -> None:
    buf = make_ring(ring_impl, data_size=64)
    writer = ring_impl.RingWriter(buf)
    # 16 descriptor + 24 payload + 8 trailer = 48 < 64: fits; a second cannot.
    assert writer.write(bytes(24))
    assert not writer.write(bytes(8))  # 32 bytes needs free > 32; 16 left
    assert writer.free_bytes == 16
    # Exactly filling the ring (free == packet) is refused too.
    buf = make_ring(ring_impl, data_size=64)
    writer = ring_impl.RingWriter(buf)
    assert writer.max_payload() == 32
    assert writer.write(bytes(32))  # 56 bytes, 8 stay free
    buf = make_ring(ring_impl, data_size=64)
    with pytest.raises(ValueError, match="never fit"):
        ring_impl.RingWriter(buf).write(bytes(40))


def test_uncommitted_packets_are_invisible(ring_impl: ModuleType) -> None:
    buf = make_ring(ring_impl)
    writer, reader = ring_impl.RingWriter(buf), ring_impl.RingReader(buf)
    writer.write(b"x")
    assert writer.pending_bytes == 32
    assert reader.read() is None
    writer.commit()
    assert reader.read() is not None
    # The writer gets the space back only when the reader commits.
    before = writer.free_bytes
    reader.commit()
    assert writer.free_bytes == before + 32


def test_writer_signals_only_on_empty_to_non_empty(ring_impl: ModuleType) -> None:
    buf = make_ring(ring_impl)
    writer, reader = ring_impl.RingWriter(buf), ring_impl.RingReader(buf)
    writer.write(b"a")
    assert writer.commit() is True
    writer.write(b"b")
    assert writer.commit() is False  # reader has not caught up: ring was not empty
    assert writer.commit() is False  # nothing new
    while reader.read() is not None:
        pass
    reader.commit()
    writer.write(b"c")
    assert writer.commit() is True


def test_masked_reader_is_not_signalled_and_rechecks(ring_impl: ModuleType) -> None:
    buf = make_ring(ring_impl)
    writer, reader = ring_impl.RingWriter(buf), ring_impl.RingReader(buf)
    reader.begin_drain()
    writer.write(b"a")
    assert writer.commit() is False
    assert reader.end_drain() is True  # data arrived while masked: drain again
    reader.read()
    reader.commit()
    reader.begin_drain()
    assert reader.end_drain() is False


def test_blocked_writer_is_woken_when_space_crosses_its_request(ring_impl: ModuleType) -> None:
    buf = make_ring(ring_impl, data_size=128)
    writer, reader = ring_impl.RingWriter(buf), ring_impl.RingReader(buf)
    while writer.write(bytes(16)):  # 40-byte packets
        pass
    writer.commit()
    assert writer.free_bytes == 8
    assert writer.request_space(40) is False
    assert index(buf, 12) == 40  # pending_send_sz published
    reader.read()
    assert reader.commit() is True  # 48 free > 40, and 8 free before: wake
    reader.read()
    assert reader.commit() is False  # was already awake after the first commit


def test_reader_does_not_wake_writer_without_the_feature_bit(ring_impl: ModuleType) -> None:
    buf = bytearray(HEADER_SIZE + 128)
    ring_impl.init_ring(buf, pending_send_sz=False)
    writer, reader = ring_impl.RingWriter(buf), ring_impl.RingReader(buf)
    while writer.write(bytes(16)):
        pass
    writer.commit()
    writer.request_space(40)
    reader.read()
    assert reader.commit() is False


def test_request_space_succeeds_at_once_when_space_is_free(ring_impl: ModuleType) -> None:
    buf = make_ring(ring_impl)
    writer = ring_impl.RingWriter(buf)
    assert writer.request_space(100) is True
    assert index(buf, 12) == 0


def test_wrapped_packet_reads_whole(ring_impl: ModuleType) -> None:
    buf = make_ring(ring_impl, data_size=128, start=120)
    writer, reader = ring_impl.RingWriter(buf), ring_impl.RingReader(buf)
    payload = bytes(range(40))
    assert writer.write(payload, trans_id=7)
    writer.commit()
    packet = reader.read()
    assert bytes(packet.payload) == payload
    assert packet.trans_id == 7
    assert index(buf, 0) == (120 + 64) % 128


def test_mirrored_ring_reads_wrapped_packet_in_place(ring_impl: ModuleType) -> None:
    data_size = 128
    flat = make_ring(ring_impl, data_size=data_size, start=112)
    writer = ring_impl.RingWriter(flat)
    payload = bytes(range(100, 140))
    assert writer.write(payload)
    writer.commit()
    # Build the mirrored image a double mapping would show.
    mirrored = flat[: HEADER_SIZE + data_size] + flat[HEADER_SIZE:]
    reader = ring_impl.RingReader(mirrored, mirrored=True)
    assert bytes(reader.read().payload) == payload


def test_batch_calls_write_and_read_many(ring_impl: ModuleType) -> None:
    buf = make_ring(ring_impl, data_size=4096)
    writer, reader = ring_impl.RingWriter(buf), ring_impl.RingReader(buf)
    payloads = [bytes([i]) * (8 * (i % 5 + 1)) for i in range(40)]
    assert writer.write_batch(payloads[:20], trans_id=100) == 20
    data = b"".join(payloads[20:])
    lengths = np.array([len(p) for p in payloads[20:]], dtype=np.uint32)
    assert writer.write_packed(data, lengths, trans_id=200) == 20
    writer.commit()
    out = bytearray(4096)
    sizes = np.zeros(64, np.uint32)
    ids = np.zeros(64, np.uint64)
    count = reader.read_packed(out, sizes, ids)
    assert count == 40
    assert sizes[:count].tolist() == [len(p) for p in payloads]
    assert ids[:count].tolist() == list(range(100, 120)) + list(range(200, 220))
    assert bytes(out[: sizes.sum()]) == b"".join(payloads)


def test_batch_write_stops_at_the_first_packet_that_does_not_fit(ring_impl: ModuleType) -> None:
    buf = make_ring(ring_impl, data_size=256)
    writer = ring_impl.RingWriter(buf)
    assert writer.write_batch([bytes(40)] * 10) == 3  # 64 bytes each, 256 never full
    lengths = np.array([8, 8], dtype=np.uint32)
    assert writer.write_packed(bytes(16), lengths) == 1


def test_read_packed_stops_when_output_is_full(ring_impl: ModuleType) -> None:
    buf = make_ring(ring_impl, data_size=1024)
    writer, reader = ring_impl.RingWriter(buf), ring_impl.RingReader(buf)
    writer.write_batch([bytes(16)] * 5)
    writer.commit()
    sizes = np.zeros(8, np.uint32)
    assert reader.read_packed(bytearray(40), sizes) == 2
    assert reader.read_packed(bytearray(40), sizes[:1]) == 1
    with pytest.raises(ValueError, match="does not fit"):
        reader.read_packed(bytearray(8), sizes)
    assert reader.read_packed(bytearray(64), sizes) == 2


def test_read_into_too_small_buffer_consumes_nothing(ring_impl: ModuleType) -> None:
    buf = make_ring(ring_impl)
    writer, reader = ring_impl.RingWriter(buf), ring_impl.RingReader(buf)
    writer.write(bytes(32))
    writer.commit()
    with pytest.raises(ValueError, match="does not fit"):
        reader.read_into(bytearray(16))
    assert reader.read_into(bytearray(32)) == 32


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda w: w.write(b"x", type=0), "not a VMBus packet type"),
        (lambda w: w.write(b"x", type=0xE), "not a VMBus packet type"),
        (lambda w: w.write(b"x", flags=2), "unknown bits"),
        (lambda w: w.write(b"x", trans_id=1 << 64), "64 bits"),
        (lambda w: w.write(b"x", trans_id=-1), "64 bits"),
        (lambda w: w.write(b"x", header=b"abc"), "not 8-aligned"),
        (lambda w: w.write_packed(b"ab", np.array([3], np.uint32)), "add up"),
        (lambda w: w.write_packed(b"ab", b"\0\0\0"), "whole number"),
    ],
)
def test_local_misuse_raises_value_error(ring_impl: ModuleType, call, message: str) -> None:  # type: ignore[no-untyped-def]
    writer = ring_impl.RingWriter(make_ring(ring_impl))
    with pytest.raises(ValueError, match=message):
        call(writer)
    assert writer.pending_bytes == 0


@pytest.mark.parametrize("size", [4096 + 7, 4096 + 16, 100])
def test_attach_refuses_buffers_without_the_layout(ring_impl: ModuleType, size: int) -> None:
    with pytest.raises(ValueError):
        ring_impl.RingReader(bytearray(size))


def test_attach_refuses_read_only_buffers(ring_impl: ModuleType) -> None:
    with pytest.raises((ValueError, BufferError, TypeError)):
        ring_impl.RingWriter(bytes(HEADER_SIZE + 64))


# --- A hostile peer: each corruption raises RingCorrupt, and stays failed. ---


def corrupt_after_one_packet(impl: ModuleType, field: int, value: int) -> object:
    buf = make_ring(impl)
    writer, reader = impl.RingWriter(buf), impl.RingReader(buf)
    writer.write(b"payload!")
    writer.commit()
    struct.pack_into("<H", buf, HEADER_SIZE + field, value)
    return reader


@pytest.mark.parametrize(
    ("name", "field", "value", "message"),
    [
        ("writer_sets_unknown_packet_type", 0, 0x20, "unknown packet type"),
        ("writer_sets_invalid_packet_type", 0, 0, "unknown packet type"),
        ("writer_sets_offset8_inside_descriptor", 2, 1, "offset8"),
        ("writer_sets_len8_below_offset8", 4, 1, "len8"),
        ("writer_claims_packet_longer_than_published", 4, 200, "overruns"),
        ("writer_sets_unknown_flags", 6, 0x8000, "flags"),
    ],
)
def test_peer_corrupts_descriptor(
    ring_impl: ModuleType, name: str, field: int, value: int, message: str
) -> None:
    reader = corrupt_after_one_packet(ring_impl, field, value)
    for _ in range(2):  # sticky: the channel stays failed
        with pytest.raises(RingCorrupt, match=message):
            reader.read()  # type: ignore[attr-defined]


def test_peer_publishes_misaligned_write_index(ring_impl: ModuleType) -> None:
    buf = make_ring(ring_impl)
    reader = ring_impl.RingReader(buf)
    U32.pack_into(buf, 0, 12)
    with pytest.raises(RingCorrupt, match="write_index"):
        reader.read()


def test_peer_publishes_write_index_beyond_the_ring(ring_impl: ModuleType) -> None:
    buf = make_ring(ring_impl)
    reader = ring_impl.RingReader(buf)
    U32.pack_into(buf, 0, 256)
    with pytest.raises(RingCorrupt):
        reader.read_into(bytearray(64))


def test_peer_publishes_less_than_a_packet(ring_impl: ModuleType) -> None:
    buf = make_ring(ring_impl)
    reader = ring_impl.RingReader(buf)
    U32.pack_into(buf, 0, 16)
    with pytest.raises(RingCorrupt, match="less than one packet"):
        reader.read()


def test_peer_reader_moves_read_index_out_of_range(ring_impl: ModuleType) -> None:
    buf = make_ring(ring_impl)
    writer = ring_impl.RingWriter(buf)
    writer.write(bytes(200))  # forces a read_index refresh on the next write
    U32.pack_into(buf, 4, 0xFFFFFFF8)
    with pytest.raises(RingCorrupt, match="read_index"):
        writer.write(bytes(100))


def test_attaching_to_a_corrupt_control_page_fails(ring_impl: ModuleType) -> None:
    buf = make_ring(ring_impl)
    U32.pack_into(buf, 4, 3)
    with pytest.raises(RingCorrupt):
        ring_impl.RingReader(buf)
    with pytest.raises(RingCorrupt):
        ring_impl.RingWriter(buf)


def test_publish_hands_over_without_a_signal_decision(ring_impl: ModuleType) -> None:
    buf = make_ring(ring_impl, data_size=128)
    writer, reader = ring_impl.RingWriter(buf), ring_impl.RingReader(buf)
    writer.write(b"polled")
    assert writer.publish() is None
    assert index(buf, 0) == 32 and writer.pending_bytes == 0
    assert bytes(reader.read().payload).rstrip(b"\0") == b"polled"
    reader.publish()
    assert index(buf, 4) == 32
    assert reader.commit() is False  # nothing left to hand back
