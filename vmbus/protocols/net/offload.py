"""Checksum offload and LSOv2 (docs/protocol.md §6.8), sans-I/O: the
ndis_offload a device offers, the ndis_offload_params a guest sets, the
per-packet info of an offloaded frame (both directions), and its
translation into the virtio_net_hdr a TAP device with IFF_VNET_HDR takes,
so that one large TCP segment is one write and the kernel segments it.

Layouts from drivers/net/hyperv/hyperv_net.h (ndis_offload, ndis_csum_offload,
ndis_lsov2_offload, ndis_offload_params, ndis_tcp_ip_checksum_info,
ndis_tcp_lso_info) and include/uapi/linux/virtio_net.h (virtio_net_hdr).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from vmbus.protocols.net import rndis_data as rd

__all__ = [
    "OFFERED",
    "NO_OFFLOADS",
    "Offloads",
    "VNET_HDR_SIZE",
    "ZERO_HEADER",
    "VnetFrame",
    "capabilities",
    "csum_ppi",
    "decode_capabilities",
    "lso_ppi",
    "parameters",
    "parse_parameters",
    "transport",
    "vnet_header",
]

# ndis_csum_offload flags (NDIS_TXCSUM_CAP_* / NDIS_RXCSUM_CAP_*, the same bits).
CSUM_IP4OPT, CSUM_TCP4OPT, CSUM_TCP4, CSUM_UDP4, CSUM_IP4 = 0x001, 0x004, 0x010, 0x040, 0x100
CSUM_IP6EXT, CSUM_TCP6OPT, CSUM_TCP6, CSUM_UDP6 = 0x001, 0x004, 0x010, 0x040
ENCAP_8023 = 0x0002  # NDIS_OFFLOAD_ENCAP_8023
LSOV2_IP6 = 0x001 | 0x004  # NDIS_LSOV2_CAP_IP6EXT | NDIS_LSOV2_CAP_TCP6OPT
LSO_MAX_SIZE = 62780  # bytes of one large send (below GSO's 64 KiB, with headers)
LSO_MIN_SEGMENTS = 2

# ndis_offload_params values.
PARAM_NO_CHANGE = 0
PARAM_TX_RX_DISABLED = 1  # also LSOV2_DISABLED
PARAM_LSOV2_ENABLED = 2  # also RSC_ENABLED
PARAM_TX_RX_ENABLED = 4
NDIS_OFFLOAD_REVISION_3 = 3  # the first with the rsc capability (offset 144)

# Per-packet info types (rndis_wire.PpiType).
PPI_CHECKSUM = 0  # TCPIP_CHKSUM_PKTINFO
PPI_LSO = 2  # TCP_LARGESEND_PKTINFO

# virtio_net_hdr (legacy, 10 bytes, little-endian on x86 as TUNSETVNETLE would make it).
VNET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_HDR_SIZE = VNET_HDR.size
VNET_NEEDS_CSUM = 1
VNET_DATA_VALID = 2
GSO_NONE, GSO_TCPV4, GSO_TCPV6 = 0, 1, 4

ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q = 0x0800, 0x86DD, 0x8100
IPPROTO_TCP, IPPROTO_UDP = 6, 17


@dataclass(frozen=True)
class Offloads:
    """What a guest enabled with TCP_OFFLOAD_PARAMETERS (or a device offers)."""

    tx_tcp4: bool = False
    tx_udp4: bool = False
    tx_tcp6: bool = False
    tx_udp6: bool = False
    lso4: bool = False
    lso6: bool = False
    rsc: bool = False  # receive segment coalescing, IPv4 and IPv6 (Linux sets both)

    @property
    def any(self) -> bool:
        return self.tx_tcp4 or self.tx_udp4 or self.tx_tcp6 or self.tx_udp6


NO_OFFLOADS = Offloads()
OFFERED = Offloads(True, True, True, True, True, True, True)


def capabilities() -> bytes:
    """OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES of a device that checksums TCP
    and UDP over IPv4 and IPv6 both ways (not the IPv4 header: Linux never
    asks), does LSOv2 for both and coalesces received TCP segments (RSC,
    IPv4 and IPv6): revision 3, 156 bytes, as Linux reads it (the TCP4/TCP6
    sets it requires, NDIS_TXCSUM_ALL_TCP4/6; 802.3 encapsulation)."""
    tcp4 = CSUM_TCP4 | CSUM_TCP4OPT | CSUM_UDP4
    tcp6 = CSUM_TCP6 | CSUM_TCP6OPT | CSUM_IP6EXT | CSUM_UDP6
    csum = struct.pack(
        "<8I", ENCAP_8023, tcp4, ENCAP_8023, tcp4, ENCAP_8023, tcp6, ENCAP_8023, tcp6
    )
    lsov1 = bytes(16)
    ipsecv1 = bytes(28)
    lsov2 = struct.pack(
        "<7I",
        ENCAP_8023,
        LSO_MAX_SIZE,
        LSO_MIN_SEGMENTS,
        ENCAP_8023,
        LSO_MAX_SIZE,
        LSO_MIN_SEGMENTS,
        LSOV2_IP6,
    )
    header = rd.NdisObjectHeader(
        rd.NDIS_OBJECT_TYPE_OFFLOAD, NDIS_OFFLOAD_REVISION_3, rd.NDIS_OFFLOAD_SIZE
    )
    rsc = bytes((1, 1, 0, 0))  # ip4, ip6, padding
    body = header.pack() + csum + lsov1 + ipsecv1 + lsov2 + bytes(4) + bytes(32) + rsc
    body += bytes(8)  # flags; ipsecv2; rsc; encap_gre
    assert len(body) == rd.NDIS_OFFLOAD_SIZE
    return body


def parse_parameters(info: bytes, offered: Offloads, current: Offloads) -> Offloads | None:
    """The offloads after a TCP_OFFLOAD_PARAMETERS SET (ndis_offload_params:
    header, then u8 ip_v4_csum, tcp_ip_v4_csum, udp_ip_v4_csum, tcp_ip_v6_csum,
    udp_ip_v6_csum, lso_v1, ip_sec_v1, lso_v2_ipv4, lso_v2_ipv6,
    tcp_connection_ip_v4/v6, u32 flags, ip_sec_v2, ip_sec_v2_ip_v4, rsc_ip_v4/v6);
    None if it asks for anything not offered (INVALID_DATA). 0 keeps a setting."""
    raw = bytes(info[4:15]).ljust(11, b"\0")
    tail = bytes(info[20:24]).ljust(4, b"\0")
    ip4, tcp4, udp4, tcp6, udp6, lso1, ipsec1, lso4, lso6, conn4, conn6 = raw
    if ip4 > PARAM_TX_RX_DISABLED or lso1 > 1 or ipsec1 > 1 or conn4 > 1 or conn6 > 1:
        return None  # the IPv4 header checksum, LSOv1, IPsec, chimney: never offered
    ipsec2, ipsec2_4, rsc4, rsc6 = tail
    if ipsec2 > 1 or ipsec2_4 > 1 or rsc4 > PARAM_LSOV2_ENABLED or rsc6 > PARAM_LSOV2_ENABLED:
        return None  # IPsec v2: never offered
    if rsc4 != rsc6 and PARAM_NO_CHANGE not in (rsc4, rsc6):
        return None  # RSC for one family only: Linux sets both, and so do we
    chosen: dict[str, bool] = {}
    rsc = rsc4 or rsc6
    if rsc == PARAM_LSOV2_ENABLED and not offered.rsc:
        return None
    chosen["rsc"] = current.rsc if rsc == PARAM_NO_CHANGE else rsc == PARAM_LSOV2_ENABLED
    for name, value, limit in (
        ("tx_tcp4", tcp4, PARAM_TX_RX_ENABLED),
        ("tx_udp4", udp4, PARAM_TX_RX_ENABLED),
        ("tx_tcp6", tcp6, PARAM_TX_RX_ENABLED),
        ("tx_udp6", udp6, PARAM_TX_RX_ENABLED),
        ("lso4", lso4, PARAM_LSOV2_ENABLED),
        ("lso6", lso6, PARAM_LSOV2_ENABLED),
    ):
        if value > limit or (value > PARAM_TX_RX_DISABLED and not getattr(offered, name)):
            return None
        if value == PARAM_NO_CHANGE:
            chosen[name] = getattr(current, name)
        elif name.startswith("lso"):
            chosen[name] = value == PARAM_LSOV2_ENABLED
        else:
            chosen[name] = value in (2, 4)  # TX enabled (with or without RX)
    return Offloads(**chosen)


def csum_ppi(ipv6: bool, tcp: bool, transport_offset: int) -> tuple[int, bytes]:
    """The transmit TCPIP_CHKSUM_PKTINFO netvsc sends for a CHECKSUM_PARTIAL frame."""
    value = (2 if ipv6 else 1) | (4 if tcp else 8) | (transport_offset & 0x3FF) << 16
    return PPI_CHECKSUM, struct.pack("<I", value)


def lso_ppi(ipv6: bool, transport_offset: int, mss: int) -> tuple[int, bytes]:
    """The TCP_LARGESEND_PKTINFO (lso_v2_transmit) netvsc sends for a GSO frame."""
    value = (mss & 0xFFFFF) | (transport_offset & 0x3FF) << 20 | 1 << 30 | int(ipv6) << 31
    return PPI_LSO, struct.pack("<I", value)


class VnetFrame(NamedTuple):
    """A frame for a TAP with IFF_VNET_HDR: its virtio_net_hdr and the frame
    (with the IP lengths and checksums an LSO sender leaves to the host filled in)."""

    header: bytes
    frame: bytes


ZERO_HEADER = bytes(VNET_HDR_SIZE)


def _fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def _l3(frame: bytes) -> tuple[int, int] | None:
    """(ethertype, offset of the IP header), past one VLAN tag."""
    if len(frame) < 14:
        return None
    ethertype, at = int.from_bytes(frame[12:14], "big"), 14
    if ethertype == ETH_P_8021Q:
        if len(frame) < 18:
            return None
        ethertype, at = int.from_bytes(frame[16:18], "big"), 18
    return ethertype, at


def vnet_header(frame: bytes, ppis: dict[int, int]) -> VnetFrame | None:
    """The virtio_net_hdr for a guest frame and its checksum/LSO per-packet
    info values (type -> u32); None when the info does not fit the frame
    (the frame is then refused)."""
    lso, csum = ppis.get(PPI_LSO), ppis.get(PPI_CHECKSUM)
    if lso is None and not csum:
        return VnetFrame(ZERO_HEADER, frame)
    l3 = _l3(frame)
    if l3 is None:
        return None
    ethertype, ip_at = l3
    if lso is not None and lso >> 30 & 1:  # LSOv2 (type 1)
        ipv6, mss, th = bool(lso >> 31), lso & 0xFFFFF, lso >> 20 & 0x3FF
        return _lso(bytearray(frame), ethertype, ip_at, ipv6, mss, th)
    if lso is not None:
        return None  # LSOv1: never offered
    assert csum is not None
    ipv4, ipv6, tcp, udp, iphdr = (bool(csum >> bit & 1) for bit in range(5))
    th = csum >> 16 & 0x3FF
    if ipv4 == ipv6 or (ipv4 and ethertype != ETH_P_IP) or (ipv6 and ethertype != ETH_P_IPV6):
        return None
    out = bytearray(frame)
    if iphdr and ipv4:
        if len(out) < ip_at + max(20, (out[ip_at] & 0xF) * 4 if len(out) > ip_at else 0):
            return None  # no whole IPv4 header to sum
        _ip4_checksum(out, ip_at)
    if not (tcp or udp):
        return VnetFrame(ZERO_HEADER, bytes(out))
    offset = 16 if tcp else 6
    if tcp == udp or th < ip_at + (20 if ipv4 else 40) or th + offset + 2 > len(out):
        return None
    return VnetFrame(VNET_HDR.pack(VNET_NEEDS_CSUM, GSO_NONE, 0, 0, th, offset), bytes(out))


def _ip4_checksum(out: bytearray, at: int) -> None:
    ihl = (out[at] & 0xF) * 4
    out[at + 10 : at + 12] = b"\0\0"
    out[at + 10 : at + 12] = (~_fold(_sum16(bytes(out[at : at + ihl]))) & 0xFFFF).to_bytes(2, "big")


def _lso(
    out: bytearray, ethertype: int, ip_at: int, ipv6: bool, mss: int, th: int
) -> VnetFrame | None:
    """Fill what netvsc leaves to the host in a large send: the IP length
    (and IPv4 header checksum) and the TCP pseudo-header sum with the length
    (what CHECKSUM_PARTIAL needs); the kernel segments at `mss`."""
    if mss == 0 or ethertype != (ETH_P_IPV6 if ipv6 else ETH_P_IP) or th + 20 > len(out):
        return None
    if len(out) - ip_at > 0xFFFF:
        return None  # no IP length field holds it
    tcp_len = len(out) - th
    header_len = th + (out[th + 12] >> 4) * 4
    if header_len > len(out) or header_len < th + 20:
        return None
    if ipv6:
        if th < ip_at + 40 or out[ip_at + 6] != IPPROTO_TCP:
            return None
        out[ip_at + 4 : ip_at + 6] = (len(out) - ip_at - 40).to_bytes(2, "big")
        addresses = bytes(out[ip_at + 8 : ip_at + 40])
        gso = GSO_TCPV6
    else:
        ihl = (out[ip_at] & 0xF) * 4
        if out[ip_at] >> 4 != 4 or ihl < 20 or th != ip_at + ihl or out[ip_at + 9] != IPPROTO_TCP:
            return None
        out[ip_at + 2 : ip_at + 4] = (len(out) - ip_at).to_bytes(2, "big")
        _ip4_checksum(out, ip_at)
        addresses = bytes(out[ip_at + 12 : ip_at + 20])
        gso = GSO_TCPV4
    pseudo = _fold(_sum16(addresses) + IPPROTO_TCP + (tcp_len & 0xFFFF) + (tcp_len >> 16))
    out[th + 16 : th + 18] = pseudo.to_bytes(2, "big")
    header = VNET_HDR.pack(VNET_NEEDS_CSUM, gso, header_len, mss, th, 16)
    return VnetFrame(header, bytes(out))


# --- the guest's side: what Linux's netvsc does with the capabilities ---


def decode_capabilities(info: bytes) -> Offloads:
    """What a guest enables from an ndis_offload, as rndis_netdev_set_hwcaps
    decides: TCP checksums only with the whole TCP set, UDP beside TCP, LSOv2
    with 802.3 encapsulation (over IPv6 with its options too). Anything too
    short for its fields offers nothing."""
    info = bytes(info)
    if len(info) < rd.NDIS_OFFLOAD_SIZE_6_0:
        return NO_OFFLOADS
    csum = struct.unpack_from("<8I", info, 4)
    lso = struct.unpack_from("<7I", info, 80)
    tcp4 = csum[1] & (CSUM_TCP4 | CSUM_TCP4OPT) == CSUM_TCP4 | CSUM_TCP4OPT
    all_tcp6 = CSUM_TCP6 | CSUM_TCP6OPT | CSUM_IP6EXT
    tcp6 = csum[5] & all_tcp6 == all_tcp6
    return Offloads(
        tx_tcp4=tcp4,
        tx_udp4=tcp4 and bool(csum[1] & CSUM_UDP4),
        tx_tcp6=tcp6,
        tx_udp6=tcp6 and bool(csum[5] & CSUM_UDP6),
        lso4=tcp4 and bool(lso[0] & ENCAP_8023),
        lso6=tcp6 and bool(lso[3] & ENCAP_8023) and lso[6] & LSOV2_IP6 == LSOV2_IP6,
        rsc=len(info) >= 146 and info[1] >= NDIS_OFFLOAD_REVISION_3 and all(info[144:146]),
    )


OFFLOAD_PARAMS_SIZE = 28  # ndis_offload_params revision 3, as Linux sends it from NVSP 5


def parameters(offloads: Offloads) -> bytes:
    """The TCP_OFFLOAD_PARAMETERS Linux sets for these: the IPv4 header
    checksum off, each offered offload on, RSC on for both families (as
    Linux with NETIF_F_LRO) or off, the rest 0 (no change)."""
    on, lso_on = PARAM_TX_RX_ENABLED, PARAM_LSOV2_ENABLED
    header = rd.NdisObjectHeader(rd.NDIS_OBJECT_TYPE_DEFAULT, 3, OFFLOAD_PARAMS_SIZE)
    values = bytes(
        (
            PARAM_TX_RX_DISABLED,
            on if offloads.tx_tcp4 else 0,
            on if offloads.tx_udp4 else 0,
            on if offloads.tx_tcp6 else 0,
            on if offloads.tx_udp6 else 0,
            0,
            0,
            lso_on if offloads.lso4 else 0,
            lso_on if offloads.lso6 else 0,
        )
    )
    rsc = PARAM_LSOV2_ENABLED if offloads.rsc else PARAM_TX_RX_DISABLED
    tail = bytes((0, 0, 0, 0, 0, 0, 0, rsc, rsc))  # flags, ip_sec_v2 (2), rsc_ip_v4, rsc_ip_v6
    return (header.pack() + values + bytes(2) + tail).ljust(OFFLOAD_PARAMS_SIZE, b"\0")


def rsc_parameters(on: bool) -> bytes:
    """A TCP_OFFLOAD_PARAMETERS that changes RSC only (everything else 0, no
    change), as Linux sends when NETIF_F_LRO is toggled."""
    header = rd.NdisObjectHeader(rd.NDIS_OBJECT_TYPE_DEFAULT, 3, OFFLOAD_PARAMS_SIZE)
    value = PARAM_LSOV2_ENABLED if on else PARAM_TX_RX_DISABLED
    body = bytearray(header.pack().ljust(OFFLOAD_PARAMS_SIZE, b"\0"))
    body[22] = body[23] = value
    return bytes(body)


def transport(frame: bytes) -> tuple[bool, int, int] | None:
    """(IPv6?, the transport header's offset, its protocol) of an IP frame
    without IPv6 extension headers; None for anything else."""
    l3 = _l3(frame)
    if l3 is None:
        return None
    ethertype, at = l3
    if ethertype == ETH_P_IP and len(frame) >= at + 20:
        return False, at + (frame[at] & 0xF) * 4, frame[at + 9]
    if ethertype == ETH_P_IPV6 and len(frame) >= at + 40:
        return True, at + 40, frame[at + 6]
    return None


# For the receive side (rsc.py): the IP header's place, and its IPv4 checksum filled in.
ip_header_at = _l3
ip4_header_checksum = _ip4_checksum
