"""Receive segment coalescing (RSC) toward the guest: the fragments netvsp
frames (RNDIS_PKTINFO_ID, checksum info on the first) joined again as
Linux's netvsc joins them, the drops it makes, the negotiation (only a
guest that asks, with NVSP 6.1 and its NDIS_CONFIG capability, gets it),
and the virtio_net_hdr a coalesced frame enters the child's TAP with."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmbus.protocols.net import offload as ol
from vmbus.protocols.net import rndis_data as rd
from vmbus.protocols.net import rsc
from vmbus.protocols.net import wire as nvsp
from vmbus.protocols.net.rndis_wire import decode_packet, encode_packet
from vmbus.protocols.net.vsc import RndisClient
from vmbus.protocols.net.vsp import RndisDevice
from vmbus.testing import VspHarness
from vsp.net import NetVsp, NetvspChannel, TapBackend
from vsp.net.backends import _Backend

MAC = bytes.fromhex("020000001101")
OTHER = bytes.fromhex("020000001102")


def tcp4(payload: int, mac: bytes = MAC, options: int = 0) -> bytes:
    """Ethernet/IPv4/TCP with `payload` bytes, the lengths right, `options` TCP option bytes."""
    tcp = bytearray(20 + options)
    tcp[12] = (5 + options // 4) << 4
    body = bytes(tcp) + bytes((i * 13) & 0xFF for i in range(payload))
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 0, 0, 64, 6, 0, bytes(4), bytes(4))
    return mac + OTHER + b"\x08\x00" + ip + body


def device() -> RndisDevice:
    rndis = RndisDevice(MAC, offloads=ol.OFFERED)
    client = RndisClient()
    rndis.control(client.initialize())
    rndis.control(client.set(rd.OID_GEN_CURRENT_PACKET_FILTER, rd.u32(0x0D)))
    return rndis


def reassemble(messages: tuple[bytes, ...]) -> list[bytes | None]:
    reassembly = rsc.Reassembly()
    last = len(messages) - 1
    return [reassembly.add(*decode_packet(m), i == last) for i, m in enumerate(messages)]


@given(
    st.integers(15, rsc.GSO_MAX_FRAME),
    st.sampled_from([200, 1728, 4096]),
    st.sampled_from([0, rsc.RX_TCP_OK | rsc.RX_IP_OK | rsc.RX_TCP_VALUE_INVALID, rsc.RX_UDP_OK]),
)
def test_rsc_fragments_join_into_the_segment(length: int, section: int, checksum: int) -> None:
    segment = MAC + bytes((i * 7) & 0xFF for i in range(length - 6))
    messages = device().coalesced_to_guest(segment, checksum, section)
    assert messages is not None and len(messages) == rsc.fragments(length, section)
    assert all(len(m) <= section for m in messages)
    whole = reassemble(messages)
    assert whole[:-1] == [None] * (len(messages) - 1) and whole[-1] == segment
    assert isinstance(whole[-1], rsc.Received) == bool(checksum)
    if checksum:
        assert whole[-1].checksum_ok and whole[-1].coalesced == (len(messages) > 1)


def test_a_coalesced_frame_for_another_mac_is_filtered() -> None:
    assert device().coalesced_to_guest(OTHER + bytes(3000), 0, 1728) is None


def fragments(count: int) -> list[bytes]:
    return [
        encode_packet(bytes([k]) * 100, rsc.fragment_ppis(k == 0, k == count - 1, 1, 0x28))
        for k in range(count)
    ]


def test_a_fragment_run_cut_by_the_end_of_its_packet_is_dropped() -> None:
    reassembly = rsc.Reassembly()
    first, second, _ = fragments(3)
    assert reassembly.add(*decode_packet(first), False) is None
    assert reassembly.add(*decode_packet(second), True) is None  # the packet ends mid-run
    assert reassembly.dropped == 1 and reassembly.parts == []


def test_a_fragment_without_its_first_is_dropped() -> None:
    reassembly = rsc.Reassembly()
    _, second, third = fragments(3)
    assert reassembly.add(*decode_packet(second), False) is None
    assert reassembly.add(*decode_packet(third), True) is None
    assert reassembly.dropped == 2


def test_a_new_first_fragment_drops_the_unfinished_run() -> None:
    reassembly = rsc.Reassembly()
    first, second, third = fragments(3)
    reassembly.add(*decode_packet(first), False)
    assert reassembly.add(*decode_packet(first), False) is None
    assert reassembly.add(*decode_packet(second), False) is None
    whole = reassembly.add(*decode_packet(third), True)
    assert whole == bytes([0]) * 100 + bytes([1]) * 100 + bytes([2]) * 100
    assert reassembly.dropped == 1


def test_more_fragments_than_linux_takes_are_dropped() -> None:
    reassembly = rsc.Reassembly()
    run = [encode_packet(b"x" * 20, rsc.fragment_ppis(k == 0, False, 1, 0)) for k in range(600)]
    results = [reassembly.add(*decode_packet(m), False) for m in run]
    assert results == [None] * 600 and reassembly.dropped >= 1
    assert len(reassembly.parts) < rsc.RSC_MAX_FRAGMENTS


def test_rsc_parameters_are_taken_only_when_offered_and_for_both_families() -> None:
    on = ol.rsc_parameters(True)
    assert on[22:24] == b"\2\2" and on[4:22] == bytes(18)
    assert ol.parse_parameters(on, ol.OFFERED, ol.NO_OFFLOADS) == ol.Offloads(rsc=True)
    assert ol.parse_parameters(on, ol.Offloads(tx_tcp4=True), ol.NO_OFFLOADS) is None
    one_family = bytearray(on)
    one_family[23] = 1
    assert ol.parse_parameters(bytes(one_family), ol.OFFERED, ol.NO_OFFLOADS) is None
    off = ol.rsc_parameters(False)
    assert ol.parse_parameters(off, ol.OFFERED, ol.Offloads(rsc=True)) == ol.NO_OFFLOADS


def test_a_coalesced_frame_enters_the_tap_as_tcp_gso_with_the_mss_of_the_mtu() -> None:
    frame = tcp4(9000, options=12)
    flags, gso, hdr_len, gso_size, start, offset = ol.VNET_HDR.unpack(
        rsc.received_vnet_header(frame, True, 1500)
    )
    assert (flags, gso, hdr_len, gso_size, start, offset) == (1, ol.GSO_TCPV4, 66, 1448, 34, 16)
    small = ol.VNET_HDR.unpack(rsc.received_vnet_header(tcp4(1000), True, 1500))
    assert small == (1, ol.GSO_NONE, 0, 0, 34, 16)
    assert rsc.received_vnet_header(tcp4(9000), False, 1500) == ol.ZERO_HEADER


def test_an_ip_header_checksum_offload_on_a_runt_frame_is_refused_not_raised() -> None:
    csum = 1 | 4 | 16 | 34 << 16  # IPv4, TCP, the IP header checksum
    assert ol.vnet_header(MAC + OTHER + b"\x08\x00", {ol.PPI_CHECKSUM: csum}) is None
    assert ol.vnet_header(MAC + OTHER + b"\x08\x00" + bytes(10), {ol.PPI_CHECKSUM: csum}) is None


def test_a_gso_frame_whose_ip_length_is_not_its_own_is_dropped() -> None:
    frame = bytearray(tcp4(5000))
    header = ol.VNET_HDR.pack(1, ol.GSO_TCPV4, 54, 1448, 34, 16)
    assert rsc.coalesced_segment(bytes(frame), header) is not None
    frame[17] ^= 1
    assert rsc.coalesced_segment(bytes(frame), header) is None
    assert (
        rsc.coalesced_segment(tcp4(5000), ol.VNET_HDR.pack(0, ol.GSO_TCPV4, 54, 1448, 34, 16))
        is None
    )


# --- the negotiation, on a netvsp ---


class RecordingTap(TapBackend):
    """A TapBackend on a socket (no TAP device, no root) that records set_receive_offload."""

    def set_receive_offload(self, flags: int) -> None:
        if flags != self.rx_offload:  # as TapBackend: an ioctl only for a change
            self.settings.append(flags)
        self.rx_offload = flags


@pytest.fixture
def backend() -> Iterator[RecordingTap]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    tap = RecordingTap.__new__(RecordingTap)
    _Backend.__init__(tap, None, 1500, ours.detach())
    tap.netns, tap.index, tap._created_netns, tap.name = None, -1, False, "sp"
    tap.vnet_hdr, tap.settings = True, []
    yield tap
    tap.close()
    theirs.close()


def negotiate(
    tap: RecordingTap,
    version: int,
    capability: int,
    parameters: list[bytes],
    recv_pages: int = 64,
) -> list[int]:
    """The receive offloads set while the channel was open (closing turns them off)."""
    vsp = NetVsp(tap, mac=MAC)
    with VspHarness(vsp, memory_size=4 << 20) as harness:
        recv, send = harness.grant(recv_pages), harness.grant(-(-16 * vsp.sections[1] // 4096))
        config = nvsp.SendNdisConfig(mtu=1514, capability=capability)
        for message in (
            nvsp.encode(nvsp.NvspInit(min_protocol_ver=version, max_protocol_ver=version)),
            nvsp.encode(config),
            nvsp.encode(nvsp.SendReceiveBuffer(gpadl_handle=recv.gpadl)),
            nvsp.encode(nvsp.SendSendBuffer(gpadl_handle=send.gpadl)),
        ):
            harness.guest.send(message.ljust(40, b"\0"), flags=1, trans_id=1 << 40)
            harness.pump()
        client = RndisClient()
        for control in (
            client.initialize(),
            *(client.set(rd.OID_TCP_OFFLOAD_PARAMETERS, p) for p in parameters),
        ):
            harness.memory.view(send.pfns[0] * 4096, len(control))[:] = control
            request = nvsp.send_rndis_packet(nvsp.RndisChannel.CONTROL, 0, len(control))
            harness.guest.send(request, flags=1, trans_id=2)
            harness.pump()
            while harness.guest.poll() is not None:
                pass
        handler = harness.handler
        assert isinstance(handler, NetvspChannel) and handler.rndis.initialized
        return list(tap.settings)


RSC_CAPABILITY = nvsp.CAPABILITY_RSC | nvsp.CAPABILITY_IEEE8021Q


def test_rsc_is_turned_on_for_a_guest_that_asks_with_nvsp_61_and_its_capability(
    backend: RecordingTap,
) -> None:
    assert negotiate(backend, 0x60001, RSC_CAPABILITY, [ol.parameters(ol.OFFERED)]) == [7]
    assert backend.settings == [7, 0]  # off again when the channel closes


def test_a_guest_that_does_not_ask_for_rsc_keeps_whole_frames(backend: RecordingTap) -> None:
    without = ol.parameters(ol.Offloads(True, True, True, True, True, True))
    assert negotiate(backend, 0x60001, RSC_CAPABILITY, [without]) == []


@pytest.mark.parametrize("version, capability", [(0x60000, RSC_CAPABILITY), (0x60001, 0)])
def test_a_guest_without_nvsp_61_or_the_capability_gets_no_rsc(
    backend: RecordingTap, version: int, capability: int
) -> None:
    assert negotiate(backend, version, capability, [ol.parameters(ol.OFFERED)]) == []


def test_a_guest_that_turns_rsc_off_again_gets_whole_frames(backend: RecordingTap) -> None:
    on_off = [ol.rsc_parameters(True), ol.rsc_parameters(False)]
    assert negotiate(backend, 0x60001, RSC_CAPABILITY, on_off) == [7, 0]


def test_a_guest_whose_receive_buffer_holds_no_coalesced_frame_gets_no_rsc(
    backend: RecordingTap,
) -> None:
    # 8 pages: 18 sections of 1,728 bytes, fewer than a 64 KiB frame's 40 fragments
    # (the frames would wait for room that never comes).
    assert negotiate(backend, 0x60001, RSC_CAPABILITY, [ol.parameters(ol.OFFERED)], 8) == []
