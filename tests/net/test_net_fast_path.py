"""The compiled netvsp path (vsp.net._fast) against the Python path, which
defines behaviour: for random and hostile SEND_RNDIS_PKT streams, the fast
path either declines a packet (the Python path answers it) or produces the
same completion bytes, the same frames on the backend and the same counters.
Two VspHarnesses, fast path on and off, each over a TapBackend whose
descriptor is one end of a SOCK_SEQPACKET pair (a record per frame, as a
TAP device's writes are), so no root is needed."""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmbus import ring
from vmbus.channel import COMPLETION_REQUESTED, Channel
from vmbus.memory import PAGE_SIZE
from vmbus.packet import GpaRange, PacketType, encode_gpa_direct_header
from vmbus.protocols.net import offload as ol
from vmbus.protocols.net import rsc
from vmbus.protocols.net import wire as nvsp
from vmbus.protocols.net.rndis_wire import decode_packet, encode_packet
from vmbus.protocols.net.vsc import RndisClient
from vmbus.testing import VspHarness
from vsp.net import NetVsp, NetvspChannel, TapBackend
from vsp.net.backends import _Backend

pytestmark = pytest.mark.skipif(
    ring.IMPLEMENTATION != "cython", reason="the fast path needs the Cython ring"
)

MAC = bytes.fromhex("020000000f01")
SECTION = nvsp.DEFAULT_SEND_SECTION_SIZE
SECTIONS = 16
MTU = 1500


def seqpacket_tap(mtu: int = MTU, vnet: bool = False) -> tuple[TapBackend, socket.socket]:
    """A TapBackend (its send, drop rules and fast_fd) on a socket pair's end."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    theirs.setblocking(False)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
    backend = TapBackend.__new__(TapBackend)
    _Backend.__init__(backend, None, mtu, ours.detach())
    backend.netns, backend.index, backend._created_netns, backend.name = None, -1, False, "sp"
    backend.vnet_hdr = vnet  # each record then starts with a virtio_net_hdr
    return backend, theirs


def frames_out(sock: socket.socket) -> list[bytes]:
    got = []
    with contextlib.suppress(BlockingIOError):
        while True:
            got.append(sock.recv(1 << 17))
    return got


@dataclass
class Side:
    harness: VspHarness
    backend: TapBackend
    wire: socket.socket
    send_pfn: int
    recv_at: int = 0
    recv_pages: int = 0
    section: int = SECTION

    @property
    def guest(self) -> Channel:
        return self.harness.guest

    @property
    def handler(self) -> NetvspChannel:
        handler = self.harness.handler
        assert isinstance(handler, NetvspChannel)
        return handler

    def request(self, payload: bytes, flags: int = COMPLETION_REQUESTED, trans_id: int = 0) -> None:
        self.guest.send(payload.ljust(40, b"\0"), flags=flags, trans_id=trans_id)

    def replies(self) -> list[tuple[int, int, int, bytes]]:
        """Completions; transfer-page packets (control replies) completed as Linux does."""
        out = []
        while (reply := self.guest.poll()) is not None:
            if reply.type == PacketType.DATA_USING_XFER_PAGES:
                done = nvsp.SendRndisPacketComplete(status=nvsp.NvspStatus.SUCCESS).pack()
                self.guest.send(done, type=PacketType.COMP, trans_id=reply.trans_id)
                continue
            out.append((reply.type, reply.flags, reply.trans_id, bytes(reply.payload)))
        return out

    def write_section(self, section: int, data: bytes) -> None:
        offset = self.send_pfn * PAGE_SIZE + section * self.section
        self.harness.memory.view(offset, len(data))[:] = data


@contextlib.contextmanager
def side(
    fast: bool,
    link_up: bool = True,
    recv_pages: int = 64,
    ring_size: int = 256 << 10,
    vnet: bool = False,
) -> Iterator[Side]:
    backend, wire = seqpacket_tap(vnet=vnet)
    vsp = NetVsp(backend, mac=MAC, fast_path=fast)
    harness = VspHarness(vsp, memory_size=4 << 20 if vnet else 1 << 20, ring_size=ring_size)
    try:
        recv = harness.grant(recv_pages)
        section = vsp.sections[1]
        send = harness.grant(-(-SECTIONS * section // PAGE_SIZE))
        s = Side(
            harness, backend, wire, send.pfns[0], recv.pfns[0] * PAGE_SIZE, recv_pages, section
        )
        assert (s.handler.fast is not None) == fast
        init = nvsp.NvspInit(min_protocol_ver=0x60001, max_protocol_ver=0x60001)
        for message in (
            nvsp.encode(init),
            nvsp.encode(nvsp.SendReceiveBuffer(gpadl_handle=recv.gpadl)),
            nvsp.encode(nvsp.SendSendBuffer(gpadl_handle=send.gpadl)),
        ):
            s.request(message, trans_id=1 << 40)
            harness.pump()
        s.write_section(0, control := RndisClient().initialize())
        s.request(nvsp.send_rndis_packet(nvsp.RndisChannel.CONTROL, 0, len(control)), trans_id=1)
        harness.pump()
        s.replies()
        harness.pump()
        assert s.handler.rndis.initialized
        s.handler.rndis._packet_filter = 0x0D  # as Linux sets it next
        if not link_up:
            backend.link_up = False
        yield s
    finally:
        harness.close()
        backend.close()
        wire.close()


def rndis_packet(frame: bytes, ppis: list[tuple[int, bytes]], pad: int) -> bytes:
    message = encode_packet(frame, ppis)
    padded = len(message) + pad
    return message[:4] + struct.pack("<I", padded) + message[8:] + bytes(pad)


# A request: (section, section bytes, claimed size or None, channel, flags, gpa-direct)
Request = tuple[int, bytes, int | None, int, int, bool]


@pytest.fixture(autouse=True)
def quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)  # every hostile packet logs a protocol error


def differential(requests: list[Request], link_up: bool = True, vnet: bool = False) -> int:
    """Run the requests through both paths; assert they agree; return how
    many the fast path served."""
    with side(True, link_up, vnet=vnet) as fast, side(False, link_up, vnet=vnet) as slow:
        results = []
        for s in (fast, slow):
            for trans_id, (section, data, size, channel, flags, gpa) in enumerate(requests, 2):
                s.write_section(section, data)
                claimed = len(data) if size is None else size
                if gpa:
                    start = s.send_pfn * PAGE_SIZE + section * s.section
                    pfns = tuple(
                        range(start // PAGE_SIZE, (start + len(data) - 1) // PAGE_SIZE + 1)
                    )
                    rng = GpaRange(len(data), start % PAGE_SIZE, pfns)
                    header = encode_gpa_direct_header([rng])
                    payload = nvsp.send_rndis_packet(channel)
                    s.guest.send(
                        payload,
                        type=PacketType.DATA_USING_GPA_DIRECT,
                        flags=flags,
                        trans_id=trans_id,
                        header=header,
                    )
                else:
                    payload = nvsp.send_rndis_packet(channel, section, claimed)
                    s.request(payload, flags=flags, trans_id=trans_id)
                s.harness.pump()
            results.append(
                (
                    s.replies(),
                    frames_out(s.wire),
                    s.harness.vsp.stats(),
                    s.handler.refused,
                    s.handler.rndis.xmit_ok,
                    dict(s.handler.rndis.errors),
                    dict(s.handler.nvsp.errors),
                    s.handler.channel.packets_sent,
                )
            )
        stats_fast, stats_slow = results[0][2], results[1][2]
        stats_fast.pop("signals_to_guest"), stats_slow.pop("signals_to_guest")  # one commit a batch
        assert results[0] == results[1]
        assert fast.handler.fast is not None
        return fast.handler.fast.served


def frame_of(size: int, seed: int) -> bytes:
    return bytes((seed + i) & 0xFF for i in range(size))


def test_plain_sends_are_served_by_the_fast_path() -> None:
    batch = b"".join(rndis_packet(frame_of(n, n), [], -(44 + n) % 8) for n in (60, 1514, 14, 700))
    requests: list[Request] = [
        (i % SECTIONS, batch, None, 0, COMPLETION_REQUESTED, False) for i in range(40)
    ]
    assert differential(requests) == 40


def test_oversize_and_runt_frames_complete_with_fail_on_both_paths() -> None:
    batch = rndis_packet(frame_of(13, 1), [], 3) + rndis_packet(frame_of(1519, 2), [], 1)
    batch += rndis_packet(frame_of(1518, 3), [(0, b"\1\2\3\4")], 2)  # the largest with a VLAN tag
    assert differential([(0, batch, None, 0, COMPLETION_REQUESTED, False)]) == 1


def test_link_down_declines_and_the_python_path_drops() -> None:
    batch = rndis_packet(frame_of(100, 1), [], 4)
    assert differential([(0, batch, None, 0, COMPLETION_REQUESTED, False)], link_up=False) == 0


@st.composite
def requests(draw: st.DrawFn) -> list[Request]:
    out: list[Request] = []
    for _ in range(draw(st.integers(1, 12))):
        hostile = draw(st.integers(0, 3)) == 0  # else plausible: what a guest sends
        messages = []
        for _ in range(draw(st.integers(1, 9))):
            sizes = (
                [0, 1, 13, 14, 60, 64, 1500, 1514, 1518, 1519, 2000] if hostile else [14, 60, 1514]
            )
            size = draw(st.sampled_from(sizes))
            ppis = draw(st.lists(st.tuples(st.integers(0, 12), st.binary(max_size=8)), max_size=3))
            message = bytearray(
                rndis_packet(frame_of(size, len(messages)), ppis, draw(st.integers(0, 8)))
                if size
                else encode_packet(b"x")
            )
            if size == 0:
                message[12:16] = bytes(4)  # data_len 0: no frame
            if (
                hostile and draw(st.integers(0, 3)) == 0
            ):  # a hostile field: type, lengths, offsets, PPIs
                at = draw(st.sampled_from([0, 4, 8, 12, 16, 20, 28, 32, 44, 48, 52]))
                if at + 4 <= len(message):
                    message[at : at + 4] = struct.pack("<I", draw(st.integers(0, 1 << 32 - 1)))
            messages.append(bytes(message))
        data = b"".join(messages)[:SECTION]
        size = channel = gpa = None
        if hostile:
            size = draw(st.sampled_from([None, 0, len(data) - 1, SECTION + 1]))
            channel = draw(st.sampled_from([0, 1, 7]))
            gpa = draw(st.booleans())
        flags = draw(st.sampled_from([COMPLETION_REQUESTED] * 4 + [0]))
        section = draw(st.integers(0, SECTIONS - 1))
        out.append((section, data, size, channel or 0, flags, bool(gpa)))
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), st.booleans())
def test_fast_path_agrees_with_the_python_path(stream: list[Request], vnet: bool) -> None:
    differential(stream, vnet=vnet)


def test_a_vnet_backend_gets_a_header_before_each_frame_on_both_paths() -> None:
    batch = b"".join(rndis_packet(frame_of(n, n), [], -(44 + n) % 8) for n in (60, 1514))
    with_ppi = rndis_packet(frame_of(80, 9), [(0, bytes(4))], 4)  # a checksum info of 0
    requests: list[Request] = [(0, batch, None, 0, COMPLETION_REQUESTED, False)] * 3
    requests.append((1, with_ppi, None, 0, COMPLETION_REQUESTED, False))
    assert differential(requests, vnet=True) == 4


@st.composite
def offloaded_requests(draw: st.DrawFn) -> list[Request]:
    """Large sends and checksum offloads as Linux's netvsc sends them (the
    IP lengths zeroed for a large send), their PPI values changed now and then."""
    out: list[Request] = []
    for _ in range(draw(st.integers(1, 6))):
        messages = []
        for _ in range(draw(st.integers(1, 3))):
            ipv6 = draw(st.booleans())
            at = 54 if ipv6 else 34
            if draw(st.booleans()):  # LSOv2
                frame = bytearray(tcp_frame(MAC, draw(st.sampled_from([100, 3000, 20000])), ipv6))
                frame[16 if not ipv6 else 18 : 18 if not ipv6 else 20] = b"\0\0"
                ppis = [ol.lso_ppi(ipv6, at, draw(st.sampled_from([0, 1448, 536])))]
            else:
                tcp = draw(st.booleans())
                frame = bytearray(tcp_frame(MAC, 500, ipv6, proto=6 if tcp else 17))
                kind, value = ol.csum_ppi(ipv6, tcp, at)
                if draw(st.booleans()):  # and the IPv4 header checksum
                    value = (int.from_bytes(value, "little") | 16).to_bytes(4, "little")
                ppis = [(kind, value)]
            if draw(st.integers(0, 3)) == 0:
                kind, value = ppis[0]
                ppis = [(kind, struct.pack("<I", draw(st.integers(0, (1 << 32) - 1))))]
            if draw(st.integers(0, 5)) == 0:
                ppis.append((ol.PPI_CHECKSUM, struct.pack("<I", draw(st.integers(0, 31)))))
            messages.append(rndis_packet(bytes(frame), ppis, -len(encode_packet(frame, ppis)) % 8))
        data = b"".join(messages)
        out.append((draw(st.integers(0, SECTIONS - 1)), data, None, 0, COMPLETION_REQUESTED, False))
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(offloaded_requests())
def test_offloaded_sends_agree_with_the_python_path(stream: list[Request]) -> None:
    differential(stream, vnet=True)


def test_large_sends_are_served_by_the_fast_path() -> None:
    requests: list[Request] = []
    for ipv6 in (False, True):
        frame = tcp_frame(MAC, 30000, ipv6)
        ppis = [ol.lso_ppi(ipv6, 54 if ipv6 else 34, 1448)]
        requests.append((0, encode_packet(frame, ppis), None, 0, COMPLETION_REQUESTED, False))
    assert differential(requests, vnet=True) == 2


# --- backend -> guest ---

OTHER = bytes.fromhex("020000000f02")
MULTICAST = bytes.fromhex("01005e000001")


def inbound(dst: bytes, size: int, seed: int) -> bytes:
    return (dst + OTHER + b"\x88\xb5" + bytes((seed + i) & 0xFF for i in range(size)))[:size]


# A step: ("frames", [(destination, size)]) from the backend, or ("complete", n) by the guest.
Step = tuple[str, Any]


def delivered(s: Side, steps: list[Step]) -> list[Any]:
    log: list[Any] = []
    outstanding: list[int] = []
    for seed, (kind, value) in enumerate(steps):
        if kind == "frames":
            for dst, size in value:
                s.wire.send(inbound(dst, size, seed))
        else:
            done = nvsp.SendRndisPacketComplete(status=nvsp.NvspStatus.SUCCESS).pack()
            for trans_id in outstanding[:value]:
                s.guest.send(done, type=PacketType.COMP, trans_id=trans_id)
            del outstanding[:value]
        s.harness.pump()
        while (packet := s.guest.poll()) is not None:
            header = bytes(packet.header)
            messages = []
            count = struct.unpack_from("<I", header, 4)[0]
            for i in range(count):
                length, offset = struct.unpack_from("<II", header, 8 + 8 * i)
                messages.append(bytes(s.harness.memory.view(s.recv_at + offset, length)))
            log.append(
                (
                    packet.type,
                    packet.flags,
                    packet.trans_id,
                    bytes(packet.payload),
                    header,
                    messages,
                )
            )
            outstanding.append(packet.trans_id)
    log.append(s.harness.vsp.stats())
    log[-1].pop("signals_to_guest")
    log.append((s.handler.rndis.rcv_ok, s.handler.undelivered, len(s.handler.to_guest)))
    return log


def receive_differential(
    steps: list[Step], recv_pages: int, ring_size: int, packet_filter: int
) -> int:
    logs = []
    with (
        side(True, recv_pages=recv_pages, ring_size=ring_size) as fast,
        side(False, recv_pages=recv_pages, ring_size=ring_size) as slow,
    ):
        for s in (fast, slow):
            s.handler.rndis._packet_filter = packet_filter
            logs.append(delivered(s, steps))
        assert logs[0] == logs[1]
        assert fast.handler.fast is not None
        return fast.handler.fast.delivered


def test_frames_from_the_backend_are_delivered_by_the_fast_path() -> None:
    steps: list[Step] = [
        ("frames", [(MAC, 60), (b"\xff" * 6, 1514), (OTHER, 100), (MULTICAST, 64)])
    ]
    steps += [("complete", 8), ("frames", [(MAC, 1518)] * 40), ("complete", 40)]
    assert receive_differential(steps, 64, 256 << 10, 0x0D) == 43


@st.composite
def receive_steps(draw: st.DrawFn) -> list[Step]:
    steps: list[Step] = []
    for _ in range(draw(st.integers(1, 10))):
        if draw(st.booleans()):
            dst = st.sampled_from([MAC, MAC, OTHER, MULTICAST, b"\xff" * 6])
            size = st.sampled_from([0, 13, 14, 60, 1514, 1518, 1600])
            steps.append(("frames", draw(st.lists(st.tuples(dst, size), max_size=80))))
        else:
            steps.append(("complete", draw(st.integers(0, 20))))
    return steps


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    receive_steps(),
    st.sampled_from([2, 8, 64]),
    st.sampled_from([8 << 10, 256 << 10]),
    st.sampled_from([0, 0x01, 0x0D, 0x20]),
)
def test_delivery_agrees_with_the_python_path(
    steps: list[Step], recv_pages: int, ring_size: int, packet_filter: int
) -> None:
    receive_differential(steps, recv_pages, ring_size, packet_filter)


# --- backend -> guest, coalesced receives (RSC) ---


def tcp_frame(
    dst: bytes, payload: int, ipv6: bool = False, proto: int = 6, bad_len: bool = False
) -> bytes:
    """An Ethernet/IP/TCP (or `proto`) frame with `payload` bytes after a 20-byte header."""
    body = bytes(20) + bytes((i * 7) & 0xFF for i in range(payload))
    body = body[:12] + b"\x50" + body[13:]  # data offset 5
    if ipv6:
        ip = struct.pack("!IHBB16s16s", 0x60000000, len(body), proto, 64, bytes(16), bytes(16))
        return dst + OTHER + b"\x86\xdd" + ip + body
    length = 20 + len(body) + (1 if bad_len else 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, length, 0, 0, 64, proto, 0, bytes(4), bytes(4))
    return dst + OTHER + b"\x08\x00" + ip + body


def vnet(flags: int = 0, gso: int = 0, gso_size: int = 0, start: int = 0, offset: int = 0) -> bytes:
    return struct.pack("<BBHHHH", flags, gso, 54 if gso else 0, gso_size, start, offset)


# One record the TAP hands over: (virtio_net_hdr, frame).
COALESCED_RECORDS = [
    (vnet(1, 1, 1448, 34, 16), tcp_frame(MAC, 20000)),  # a TCPv4 GSO frame: RSC fragments
    (vnet(1, 4, 1428, 54, 16), tcp_frame(MAC, 9000, ipv6=True)),  # TCPv6
    (vnet(1, 1, 1448, 34, 16), tcp_frame(MAC, 65000 - 54)),  # the largest
    (vnet(1, 0, 0, 34, 16), tcp_frame(MAC, 100)),  # a partial checksum: checksum info
    (vnet(1, 0, 0, 34, 6), tcp_frame(MAC, 100, proto=17)),  # UDP
    (vnet(2), tcp_frame(MAC, 1400)),  # DATA_VALID
    (vnet(), tcp_frame(MAC, 1446)),  # whole and checksummed: a plain frame
    (vnet(1, 0, 0, 34, 8), tcp_frame(MAC, 200, proto=132)),  # SCTP-like: summed in Python
    (vnet(1, 1, 1448, 34, 16), tcp_frame(MAC, 5000, bad_len=True)),  # dropped: IP length
    (vnet(0, 1, 1448, 34, 16), tcp_frame(MAC, 5000)),  # dropped: GSO without NEEDS_CSUM
    (vnet(1, 4, 1448, 34, 16), tcp_frame(MAC, 5000)),  # dropped: TCPV6 of an IPv4 frame
    (vnet(1, 1, 1448, 34, 16), tcp_frame(OTHER, 5000)),  # filtered: another MAC
    (vnet(), tcp_frame(b"\xff" * 6, 60)),  # broadcast
    (vnet()[:6], b""),  # a runt record
    (vnet(), tcp_frame(MAC, 2000)),  # longer than any section: undelivered
]


def coalesced_delivered(s: Side, steps: list[Step], rx_offload: int = 7) -> list[Any]:
    s.backend.rx_offload = rx_offload  # as set_receive_offload leaves it (no ioctl on a socket)
    log: list[Any] = []
    outstanding: list[int] = []
    for kind, value in steps:
        if kind == "frames":
            for index in value:
                header, frame = COALESCED_RECORDS[index]
                try:
                    s.wire.send(header + frame)
                except BlockingIOError:  # the socket is full: the guest completes nothing yet
                    break
        else:
            done = nvsp.SendRndisPacketComplete(status=nvsp.NvspStatus.SUCCESS).pack()
            for trans_id in outstanding[:value]:
                s.guest.send(done, type=PacketType.COMP, trans_id=trans_id)
            del outstanding[:value]
        s.harness.pump()
        while (packet := s.guest.poll()) is not None:
            header = bytes(packet.header)
            count = struct.unpack_from("<I", header, 4)[0]
            messages = []
            for i in range(count):
                length, offset = struct.unpack_from("<II", header, 8 + 8 * i)
                messages.append(bytes(s.harness.memory.view(s.recv_at + offset, length)))
            log.append((packet.type, packet.trans_id, bytes(packet.payload), header, messages))
            outstanding.append(packet.trans_id)
    log.append(s.harness.vsp.stats())
    log[-1].pop("signals_to_guest")
    rndis = s.handler.rndis
    log.append((rndis.rcv_ok, rndis.coalesced, s.handler.undelivered, len(s.handler.to_guest)))
    return log


def coalesced_differential(
    steps: list[Step], recv_pages: int, ring_size: int, rx_offload: int = 7
) -> int:
    logs = []
    with (
        side(True, recv_pages=recv_pages, ring_size=ring_size, vnet=True) as fast,
        side(False, recv_pages=recv_pages, ring_size=ring_size, vnet=True) as slow,
    ):
        for s in (fast, slow):
            logs.append(coalesced_delivered(s, steps, rx_offload))
        assert logs[0] == logs[1]
        assert fast.handler.fast is not None
        return fast.handler.fast.delivered


def test_coalesced_receives_are_delivered_by_the_fast_path() -> None:
    steps: list[Step] = [("frames", [0, 1, 3, 4, 5, 6, 12]), ("complete", 50), ("frames", [2, 0])]
    steps.append(("complete", 50))
    assert coalesced_differential(steps, 64, 256 << 10) == 9


def test_rsc_fragments_reassemble_into_the_frame_the_tap_handed_over() -> None:
    with side(True, recv_pages=64, vnet=True) as s:
        section = s.handler.vsp.sections[0]
        log = coalesced_delivered(s, [("frames", [0])])
    (_, _, _, _, messages), *_ = log
    frame = tcp_frame(MAC, 20000)
    assert len(messages) == rsc.fragments(len(frame), section) > 1
    assert all(len(m) <= section for m in messages)
    reassembly = rsc.Reassembly()
    last = len(messages) - 1
    whole = [reassembly.add(*decode_packet(m), i == last) for i, m in enumerate(messages)]
    assert whole[:-1] == [None] * last
    got = whole[-1]
    assert isinstance(got, rsc.Received) and got.coalesced and got.checksum_ok
    # The frame, its IPv4 header checksum filled in (the TAP leaves it as the stack made it).
    assert got[:24] == frame[:24] and got[26:] == frame[26:]
    assert sum(struct.unpack("!10H", got[14:34])) % 0xFFFF == 0


@st.composite
def coalesced_steps(draw: st.DrawFn) -> list[Step]:
    steps: list[Step] = []
    for _ in range(draw(st.integers(1, 8))):
        if draw(st.booleans()):
            index = st.integers(0, len(COALESCED_RECORDS) - 1)
            steps.append(("frames", draw(st.lists(index, max_size=24))))
        else:
            steps.append(("complete", draw(st.integers(0, 20))))
    return steps


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(coalesced_steps(), st.sampled_from([24, 64]), st.sampled_from([16 << 10, 256 << 10]))
def test_coalesced_delivery_agrees_with_the_python_path(
    steps: list[Step], recv_pages: int, ring_size: int
) -> None:
    coalesced_differential(steps, recv_pages, ring_size)


def test_frames_queued_before_the_guest_turned_rsc_off_are_dropped_not_cut_short() -> None:
    """The TAP still holds GSO frames and partial checksums it queued while
    RSC was on: read as whole frames they would reach the guest cut to the
    MTU or unsummed. Both paths drop and count them, and deliver the rest."""
    offloaded = {
        i for i, (h, _) in enumerate(COALESCED_RECORDS) if len(h) == 10 and (h[1] or h[0] & 1)
    }
    fit = [i for i, (_, frame) in enumerate(COALESCED_RECORDS) if len(frame) <= 1518]
    steps: list[Step] = [("frames", sorted(offloaded | set(fit))), ("complete", 50)]
    with side(False, recv_pages=64, vnet=True) as s:
        log = coalesced_delivered(s, steps, rx_offload=0)
    frames = [bytes(decode_packet(m)[0]) for entry in log[:-2] for m in entry[4]]
    sent = [f for i, (_, f) in enumerate(COALESCED_RECORDS) if i not in offloaded]
    assert frames and all(frame in sent for frame in frames)  # whole, as the TAP queued them
    assert log[-2]["backend_drops"] == len(offloaded) == 10
    assert coalesced_differential(steps, 64, 256 << 10, rx_offload=0) == len(frames)
