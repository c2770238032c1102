"""Checksum offload and LSOv2: the NDIS objects both sides exchange (golden
bytes, laid out from hyperv_net.h), the negotiation as Linux's netvsc runs
it, the per-packet info turned into virtio_net_hdrs with the fields a large
send leaves to the host filled in, and one 62 KiB segment reaching a TAP
device (IFF_VNET_HDR) as one write."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import subprocess
from collections.abc import Iterator

import pytest
from pyroute2 import netns

from vmbus.channel import COMPLETION_REQUESTED
from vmbus.memory import PAGE_SIZE
from vmbus.protocols.net import offload as ol
from vmbus.protocols.net import rndis_data as rd
from vmbus.protocols.net import wire as nvsp
from vmbus.protocols.net.rndis_wire import RndisStatus, encode_packet
from vmbus.protocols.net.vsc import RndisClient
from vmbus.protocols.net.vsp import RndisDevice
from vmbus.testing import VspHarness
from vsp.net import NetVsp, TapBackend

MAC, PEER = bytes.fromhex("020000001001"), bytes.fromhex("020000001002")
SRC, DST = "10.204.0.2", "10.204.0.1"


def ones_sum(data: bytes) -> int:
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def tcp_frame(payload: bytes, *, lso: bool) -> bytes:
    """An Ethernet/IPv4/TCP frame as netvsc hands a large send to the host:
    IP total length and checksum 0, TCP checksum the pseudo-header sum
    without the length (lso), or with it (a CHECKSUM_PARTIAL frame)."""
    tcp_len = 20 + len(payload)
    addresses = socket.inet_aton(SRC) + socket.inet_aton(DST)
    pseudo = ones_sum(addresses + struct.pack("!HH", 6, 0 if lso else tcp_len))
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1, 0, 5 << 4, 0x18, 65535, pseudo, 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0 if lso else 20 + tcp_len, 1, 0, 64, 6, 0,
                     *map(socket.inet_aton, (SRC, DST)))  # fmt: skip
    return PEER + MAC + b"\x08\x00" + ip + tcp


# --- golden bytes ---


def test_offered_capabilities_are_the_ndis_offload_linux_reads() -> None:
    caps = ol.capabilities()
    assert len(caps) == 156 and caps[:4] == bytes([0xA7, 3, 156, 0])  # revision 3: rsc
    # csum: ip4 tx encap/flags, rx encap/flags, ip6 tx, rx (8 u32 from byte 4)
    assert caps[4:36] == struct.pack("<8I", 2, 0x54, 2, 0x54, 2, 0x55, 2, 0x55)
    assert caps[36:80] == bytes(44)  # LSOv1 and IPsec v1: none
    assert caps[80:108] == struct.pack("<7I", 2, 62780, 2, 2, 62780, 2, 0x5)
    assert caps[108:144] == bytes(36)  # flags, IPsec v2
    assert caps[144:156] == bytes([1, 1]) + bytes(10)  # rsc ip4, ip6; padding, encap_gre
    assert ol.decode_capabilities(caps) == ol.OFFERED
    assert ol.decode_capabilities(rd.offload_capabilities()) == ol.NO_OFFLOADS


def test_parameters_are_what_linux_sets() -> None:
    params = ol.parameters(ol.OFFERED)
    # rsc_ip_v4 and rsc_ip_v6 (22, 23): 2 on, as Linux with LRO
    assert params == bytes([0x80, 3, 28, 0, 1, 4, 4, 4, 4, 0, 0, 2, 2]) + bytes(
        9
    ) + b"\2\2" + bytes(4)
    assert ol.parse_parameters(params, ol.OFFERED, ol.NO_OFFLOADS) == ol.OFFERED
    assert ol.parse_parameters(params, ol.NO_OFFLOADS, ol.NO_OFFLOADS) is None
    off = bytearray(params)
    off[5:13] = bytes([1, 1, 1, 1, 0, 0, 1, 1])
    off[22:24] = b"\1\1"
    assert ol.parse_parameters(bytes(off), ol.OFFERED, ol.OFFERED) == ol.NO_OFFLOADS
    keep = bytearray(28)
    assert ol.parse_parameters(bytes(keep), ol.OFFERED, ol.OFFERED) == ol.OFFERED  # 0: no change


def test_ppis_are_netvscs_bit_layout() -> None:
    assert ol.lso_ppi(False, 34, 1448) == (2, struct.pack("<I", 1448 | 34 << 20 | 1 << 30))
    assert ol.lso_ppi(True, 54, 1428) == (2, struct.pack("<I", 1428 | 54 << 20 | 3 << 30))
    assert ol.csum_ppi(False, True, 34) == (0, struct.pack("<I", 0b101 | 34 << 16))
    assert ol.csum_ppi(True, False, 54) == (0, struct.pack("<I", 0b1010 | 54 << 16))


def test_large_send_becomes_one_gso_header_and_a_completed_frame() -> None:
    payload = bytes(range(256)) * 40
    frame = tcp_frame(payload, lso=True)
    (kind, value) = ol.lso_ppi(False, 34, 1448)
    vnet = ol.vnet_header(frame, {kind: int.from_bytes(value, "little")})
    assert vnet is not None
    # flags NEEDS_CSUM, gso TCPV4, hdr_len 54, gso_size 1448, csum_start 34, csum_offset 16
    assert vnet.header == bytes([1, 1, 54, 0]) + struct.pack("<HHH", 1448, 34, 16)
    fixed = vnet.frame
    assert struct.unpack_from("!H", fixed, 16)[0] == len(frame) - 14  # total length
    assert ones_sum(fixed[14:34]) == 0xFFFF  # a valid IPv4 header checksum
    partial = tcp_frame(payload, lso=False)  # the same frame as CHECKSUM_PARTIAL sends it
    assert fixed[:24] == partial[:24] and fixed[26:] == partial[26:]  # but the IP checksum


def test_checksum_offload_of_udp_over_ipv6_marks_the_checksum_field() -> None:
    datagram = struct.pack("!HHHH", 1, 2, 12, 0x1234) + b"abcd"
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(datagram), 17, 64,
                      ipaddress.IPv6Address("fd00::2").packed,
                      ipaddress.IPv6Address("fd00::1").packed)  # fmt: skip
    frame = PEER + MAC + b"\x86\xdd" + ip6 + datagram
    kind, value = ol.csum_ppi(True, False, 54)
    vnet = ol.vnet_header(frame, {kind: int.from_bytes(value, "little")})
    assert vnet == ol.VnetFrame(bytes([1, 0, 0, 0, 0, 0]) + struct.pack("<HH", 54, 6), frame)


@pytest.mark.parametrize(
    "value",
    [
        1448 | 10 << 20 | 1 << 30,  # the TCP header inside the IP header
        0 | 34 << 20 | 1 << 30,  # mss 0
        1448 | 34 << 20 | 3 << 30,  # IPv6 claimed for an IPv4 frame
        1448 | 1000 << 20 | 1 << 30,  # the TCP header past the frame
        1448 | 34 << 20,  # LSOv1: not offered
    ],
)
def test_large_send_info_that_does_not_fit_the_frame_is_refused(value: int) -> None:
    assert ol.vnet_header(tcp_frame(b"x" * 3000, lso=True), {ol.PPI_LSO: value}) is None


def test_rndis_device_offers_and_takes_offloads_only_when_made_with_them() -> None:
    client = RndisClient()
    for offered, expected in ((ol.OFFERED, ol.capabilities()), (ol.NO_OFFLOADS, None)):
        device = RndisDevice(MAC, offloads=offered)
        device.control(client.initialize())
        reply = device.control(client.query(rd.OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES))
        assert reply is not None
        info = bytes(reply[24:])
        assert info == (expected or rd.offload_capabilities())
        answer = device.control(
            client.set(rd.OID_TCP_OFFLOAD_PARAMETERS, ol.parameters(ol.OFFERED))
        )
        assert answer is not None
        status = int.from_bytes(answer[12:16], "little")
        if offered is ol.OFFERED:
            assert status == RndisStatus.SUCCESS and device.offloads == ol.OFFERED
        else:
            assert status == RndisStatus.INVALID_DATA and device.offloads == ol.NO_OFFLOADS


# --- one large send, one write ---


@pytest.fixture
def vnet_tap() -> Iterator[TapBackend]:
    name = f"nbol{os.getpid()}"
    try:
        with TapBackend(netns=name, address=f"{DST}/24", create_netns=True, vnet_hdr=True) as tap:
            yield tap
    finally:
        if name in netns.listnetns():
            netns.remove(name)


def rx_counters(tap: TapBackend) -> tuple[int, int]:
    base = f"/sys/class/net/{tap.name}/statistics"
    out = subprocess.run(
        ["ip", "netns", "exec", tap.netns or "", "cat", f"{base}/rx_packets", f"{base}/rx_bytes"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    packets, nbytes = out.stdout.split()
    return int(packets), int(nbytes)


@pytest.mark.requires_root
def test_a_large_send_reaches_the_tap_as_one_write(vnet_tap: TapBackend) -> None:
    vsp = NetVsp(vnet_tap, mac=MAC)
    assert vsp.offload and vsp.sections[1] >= 65535 + 18 + 44
    with VspHarness(vsp, memory_size=4 << 20, ring_size=256 << 10) as harness:
        recv, send = harness.grant(64), harness.grant(2 * vsp.sections[1] // PAGE_SIZE + 1)

        def request(message: bytes, trans_id: int) -> bytes:
            harness.guest.send(
                message.ljust(40, b"\0"), flags=COMPLETION_REQUESTED, trans_id=trans_id
            )
            harness.pump()
            while (reply := harness.guest.poll()) is not None:
                if reply.trans_id == trans_id:
                    return bytes(reply.payload)
            raise AssertionError("no completion")

        init = nvsp.NvspInit(min_protocol_ver=0x60001, max_protocol_ver=0x60001)
        request(nvsp.encode(init), 1)
        request(nvsp.encode(nvsp.SendReceiveBuffer(gpadl_handle=recv.gpadl)), 2)
        request(nvsp.encode(nvsp.SendSendBuffer(gpadl_handle=send.gpadl)), 3)
        section = send.pfns[0] * PAGE_SIZE

        def rndis(message: bytes, channel: int, trans_id: int) -> bytes:
            harness.memory.view(section, len(message))[:] = message
            return request(nvsp.send_rndis_packet(channel, 0, len(message)), trans_id)

        rndis(RndisClient().initialize(), nvsp.RndisChannel.CONTROL, 4)
        harness.handler.rndis._packet_filter = 0x0D  # type: ignore[attr-defined]
        before = rx_counters(vnet_tap)
        frame = tcp_frame(os.urandom(62000), lso=True)
        message = encode_packet(frame, [ol.lso_ppi(False, 34, 1448)])
        done = rndis(message, nvsp.RndisChannel.DATA, 5)
        assert nvsp.decode(done, nvsp.SendRndisPacketComplete).status == nvsp.NvspStatus.SUCCESS
        packets, nbytes = rx_counters(vnet_tap)
        assert (packets - before[0], nbytes - before[1]) == (1, len(frame))
        assert vsp.stats()["backend_frames_out"] == 1 and vsp.stats()["refused"] == 0
