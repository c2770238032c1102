"""netvsc's compiled loops (vsc.net._fast.Engine) against NetAdapter's Python
loops, which define behaviour: `send_batch` writes the same send sections
and the same SEND_RNDIS_PKTs, and receiving handles the same host packets
(completions with any status, transfer-page packets, hostile ranges and
RNDIS headers) with the same frames, failures and completions sent back."""

from __future__ import annotations

import collections
import itertools
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmbus import ring
from vmbus.channel import COMPLETION_REQUESTED, Channel
from vmbus.errors import UsageError
from vmbus.packet import PacketType, encode_transfer_page_header
from vmbus.protocols.net import rsc
from vmbus.protocols.net import wire as nvsp
from vmbus.protocols.net.rndis_wire import encode_packet
from vmbus.protocols.net.rsc import Reassembly
from vmbus.protocols.net.vsc import RndisClient
from vmbus.testing.rings import channel_pair
from vsc.net import NetAdapter
from vsc.net._fast import Engine

pytestmark = pytest.mark.skipif(
    ring.IMPLEMENTATION != "cython", reason="the compiled loops need the Cython ring"
)

SECTION = nvsp.DEFAULT_SEND_SECTION_SIZE
SECTIONS = 8
RECEIVE = 64 << 10


OPEN: list[Channel] = []  # the channel ends of the current example, closed after it


@pytest.fixture(autouse=True)
def close_channels() -> Iterator[None]:
    yield
    release()


def release() -> None:
    """Close the signals (eventfds) of every channel end made so far."""
    while OPEN:
        end = OPEN.pop()
        end.notify_peer.close()


def adapter(fast: bool) -> tuple[NetAdapter, Channel]:
    """A NetAdapter past its initialization, on a channel pair: (adapter, host end)."""
    guest, host = channel_pair(256 << 10, spin_seconds=0)
    OPEN.extend((guest, host))
    nic = NetAdapter.__new__(NetAdapter)
    send, receive = bytearray(SECTIONS * SECTION), bytearray(RECEIVE)
    nic.channel = guest  # type: ignore[assignment]
    nic.buffers = {"receive": ([], 0, memoryview(receive)), "send": ([], 0, memoryview(send))}
    nic.frames, nic.link_events = collections.deque(), collections.deque()
    nic.rndis, nic.rndis_replies = RndisClient(), {}
    nic.ids, nic.sending, nic.send_failures = itertools.count(1), {}, 0
    nic.reassembly = Reassembly()
    nic.send_section, nic.free_sections = SECTION, collections.deque(range(SECTIONS))
    nic.mtu, nic.max_packets, nic.alignment, nic.link_up = 1500, 8, 8, True
    nic.fast = (
        Engine(guest, nic.buffers["send"][2], nic.buffers["receive"][2], SECTION, 8, 8)
        if fast
        else None
    )
    if nic.fast is not None:
        nic.fast.reassembly = nic.reassembly
    return nic, host


def host_packets(host: Channel) -> list[tuple[int, int, int, bytes, bytes]]:
    out = []
    while (packet := host.poll()) is not None:
        out.append(
            (
                packet.type,
                packet.flags,
                packet.trans_id,
                bytes(packet.payload),
                bytes(packet.header),
            )
        )
    return out


def state(nic: NetAdapter) -> tuple[Any, ...]:
    return (
        [
            (type(f).__name__, getattr(f, "checksum_ok", None), getattr(f, "coalesced", None), f)
            for f in nic.frames
        ],  # fmt: skip
        nic.reassembly.dropped,
        nic.reassembly.parts,
        nic.send_failures,
        dict(nic.sending),
        list(nic.free_sections),
        sorted(nic.channel.completions),
        dict(nic.rndis_replies),
        bytes(nic.buffers["send"][2]),
    )


frames = st.lists(
    st.integers(1, 1600).map(lambda n: bytes((n + i) & 0xFF for i in range(n))), max_size=40
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames, st.integers(1, 3))
def test_send_batch_writes_what_the_python_loop_writes(batch: list[bytes], rounds: int) -> None:
    release()  # the previous example's
    sides = [adapter(True), adapter(False)]
    for nic, host in sides:
        for _ in range(rounds):
            # Completions free the sections between rounds, as the host's would.
            nic.send_batch(batch[: SECTIONS * 8])
            for _, _, trans_id, _, _ in host_packets(host):
                done = nvsp.encode(nvsp.SendRndisPacketComplete(status=nvsp.NvspStatus.SUCCESS))
                host.send(done, type=PacketType.COMP, trans_id=trans_id)
            nic._pump(0)
    (fast, fast_host), (slow, slow_host) = sides
    assert state(fast) == state(slow)
    assert fast.channel.packets_sent == slow.channel.packets_sent


def test_a_frame_too_large_raises_on_both_paths() -> None:
    for fast in (True, False):
        nic, host = adapter(fast)
        with pytest.raises(UsageError):
            nic.send_batch([b"x" * 60, b"y" * (SECTION - 44 + 1)])
        with pytest.raises(UsageError):
            nic.send_batch([b""])
        assert len(nic.free_sections) == SECTIONS and host_packets(host) == []


# A host packet: a completion (trans_id pick, payload) or a transfer-page packet
# (messages written in the receive buffer, ranges as (count, offset) or None: exact).
HostPacket = tuple[str, Any]


def rndis_packet(frame: bytes, ppis: list[tuple[int, bytes]]) -> bytes:
    return encode_packet(frame, ppis)


@st.composite
def rsc_runs(draw: st.DrawFn) -> list[bytes]:
    """The RSC fragments of one coalesced frame, as netvsp sends them (a
    fragment missing, flags or checksum info changed now and then)."""
    count = draw(st.integers(1, 5))
    checksum = draw(st.sampled_from([0, 0x28, 0x30, 0xA8, 0x1, 0xFFFFFFFF]))
    pieces = [bytes([k]) * draw(st.integers(1, 1514)) for k in range(count)]
    out = [
        rndis_packet(piece, rsc.fragment_ppis(k == 0, k == count - 1, 7, checksum))
        for k, piece in enumerate(pieces)
    ]
    mutation = draw(st.integers(0, 9))
    if mutation == 0 and count > 1:
        del out[draw(st.integers(0, count - 1))]
    elif mutation == 1:
        at = draw(st.integers(0, count - 1))
        flag = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7]))
        out[at] = rndis_packet(pieces[at], [(rsc.PPI_PKTINFO, bytes([1, flag, 7, 0]))])
    return out


@st.composite
def host_streams(draw: st.DrawFn) -> list[HostPacket]:
    out: list[HostPacket] = []
    for _ in range(draw(st.integers(1, 16))):
        if draw(st.booleans()):
            status = draw(st.sampled_from([1, 1, 1, 2]))
            kind = draw(st.sampled_from([108, 108, 108, 101]))
            size = draw(st.sampled_from([8, 8, 40, 4]))
            payload = struct.pack("<II", kind, status).ljust(40, b"\0")[:size]
            out.append(("completion", (draw(st.integers(0, 20)), payload)))
            continue
        messages = []
        if draw(st.integers(0, 2)) == 0:
            messages += draw(rsc_runs())
        for _ in range(draw(st.integers(0 if messages else 1, 6))):
            n = draw(st.integers(1, 1514))
            ppis = draw(st.lists(st.tuples(st.integers(0, 9), st.binary(max_size=4)), max_size=1))
            message = bytearray(rndis_packet(bytes((n + i) & 0xFF for i in range(n)), ppis))
            if draw(st.integers(0, 7)) == 0:
                at = draw(st.sampled_from([0, 4, 8, 12, 20, 32]))
                struct.pack_into("<I", message, at, draw(st.integers(0, 1 << 32 - 1)))
            messages.append(bytes(message))
        payload = nvsp.send_rndis_packet(nvsp.RndisChannel.DATA)
        if draw(st.integers(0, 9)) == 0:
            payload = struct.pack("<I", 7) + payload[4:]
        out.append(("xfer", (messages, payload, draw(st.integers(0, 9)) == 0)))
    return out


def play(nic: NetAdapter, host: Channel, stream: list[HostPacket]) -> list[Any]:
    """Send the stream from the host; let the adapter pump; what it did."""
    log: list[Any] = []
    nic.send_batch([bytes(60)] * 20)  # sends in flight, for the completions to name
    host_packets(host)
    xfer_ids = itertools.count(1 << 32)
    for kind, value in stream:
        if kind == "completion":
            pick, payload = value
            host.send(payload, type=PacketType.COMP, trans_id=pick)
        else:
            messages, payload, bad_range = value
            offset, ranges = 0, []
            view = nic.buffers["receive"][2]
            for message in messages:
                view[offset : offset + len(message)] = message
                ranges.append((len(message), offset))
                offset += -(-len(message) // 8) * 8
            if bad_range:
                ranges[-1] = (ranges[-1][0], RECEIVE - 8)
            header = encode_transfer_page_header(nvsp.RECEIVE_BUFFER_ID, ranges)
            trans_id = next(xfer_ids)
            host.send(
                payload,
                type=PacketType.DATA_USING_XFER_PAGES,
                flags=COMPLETION_REQUESTED,
                trans_id=trans_id,
                header=header,
            )
        try:  # one packet at a time: the receive buffer is rewritten for the next
            nic._pump(0)
        except Exception as error:  # noqa: BLE001 - what the Python path raises, compared
            log.append(type(error).__name__)
            host_packets(host)
            return log + [state(nic)]
        log.append(host_packets(host))
    return log + [state(nic)]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(host_streams())
def test_receiving_handles_what_the_python_loop_handles(stream: list[HostPacket]) -> None:
    release()  # the previous example's
    fast, fast_host = adapter(True)
    slow, slow_host = adapter(False)
    assert play(fast, fast_host, stream) == play(slow, slow_host, stream)
