"""Receive segment coalescing (RSC) and receive checksum info toward the
guest (docs/protocol.md §6.10), sans-I/O: what netvsp makes of a frame a TAP
with IFF_VNET_HDR hands over (the checksum info, a TCP GSO frame checked and
cut into RNDIS_PKTINFO_ID fragments), the guest's joining of the fragments
as Linux's netvsc joins them, and the virtio_net_hdr with which a received
frame enters the guest's own TAP.

Layouts from drivers/net/hyperv/hyperv_net.h (rndis_pktinfo_id,
ndis_tcp_ip_checksum_info) and rndis_filter.c (rndis_filter_receive_data).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

from vmbus.protocols.net.offload import (
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    PPI_CHECKSUM,
    VNET_DATA_VALID,
    VNET_HDR,
    VNET_NEEDS_CSUM,
    ZERO_HEADER,
    ip4_header_checksum,
    ip_header_at,
    transport,
)

__all__ = [
    "FRAGMENT_OVERHEAD",
    "GSO_MAX_FRAME",
    "PPI_PKTINFO",
    "RSC_MAX_FRAGMENTS",
    "Reassembly",
    "Received",
    "coalesced_segment",
    "complete_checksum",
    "fragment_ppis",
    "fragment_room",
    "fragments",
    "receive_checksum_info",
    "received_vnet_header",
]

# ndis_tcp_ip_checksum_info, receive bits.
RX_TCP_OK, RX_UDP_OK, RX_IP_OK, RX_TCP_VALUE_INVALID = 1 << 3, 1 << 4, 1 << 5, 1 << 7
# rndis_pktinfo_id: u8 ver, u8 flag, u16 pkt_id (RNDIS_PKTINFO_ID, an internal PPI).
PKTINFO_VERSION = 1
FRAG_SUBALLOC, FRAG_FIRST, FRAG_LAST = 0x1, 0x2, 0x4
PPI_PKTINFO = (1 << 31) | 1  # rndis_wire.RNDIS_PKTINFO_ID
RSC_MAX_FRAGMENTS = 562  # Linux's NVSP_RSC_MAX: more fragments and it drops the frame
_PPI_ELEMENT = 16  # a 12-byte header and a u32 value
FRAGMENT_OVERHEAD = 44 + 2 * _PPI_ELEMENT  # PacketHeader, the pktinfo and checksum PPIs
GSO_MAX_FRAME = 0xFFFF + 14 + 4  # what an IPv4 length holds, with its Ethernet header


class Received(bytes):
    """A frame the host delivered with receive checksum info: `checksum_ok`
    when the host verified its TCP or UDP checksum (the field may then hold
    a partial sum: Hyper-V's 'value invalid'), `coalesced` when it is several
    TCP segments the host coalesced (RSC), longer than the MTU allows."""

    checksum_ok: bool = False
    coalesced: bool = False


def receive_checksum_info(frame: bytes, vnet: bytes) -> int:
    """The receive TCPIP_CHKSUM_PKTINFO value for a frame a TAP handed over
    with this virtio_net_hdr: 0 (no info) unless the kernel left the
    checksum partial (NEEDS_CSUM) or said it is valid (DATA_VALID)."""
    flags = vnet[0]
    if not flags & (VNET_NEEDS_CSUM | VNET_DATA_VALID):
        return 0
    place = transport(frame)
    if place is None or place[2] not in (IPPROTO_TCP, IPPROTO_UDP):
        return 0
    ipv6, _, protocol = place
    value = (RX_TCP_OK if protocol == IPPROTO_TCP else RX_UDP_OK) | (0 if ipv6 else RX_IP_OK)
    return value | (RX_TCP_VALUE_INVALID if flags & VNET_NEEDS_CSUM else 0)


def coalesced_segment(frame: bytes, vnet: bytes) -> bytes | None:
    """A GSO frame from a TAP (gso_type TCPV4/TCPV6 with NEEDS_CSUM: several
    TCP segments' worth, the TCP checksum partial) checked and made a
    coalesced receive: the IPv4 header checksum computed over its full
    length (Linux checks it; Hyper-V says 'value invalid' instead). None when
    it is not such a frame (the frame is dropped)."""
    flags, gso_type, *_ = VNET_HDR.unpack_from(vnet)
    kind = gso_type & 0x7F
    if kind not in (GSO_TCPV4, GSO_TCPV6) or not flags & VNET_NEEDS_CSUM:
        return None
    if not 14 < len(frame) <= GSO_MAX_FRAME:
        return None
    place = transport(frame)
    if place is None or place[0] != (kind == GSO_TCPV6) or place[2] != IPPROTO_TCP:
        return None
    l3 = ip_header_at(frame)
    assert l3 is not None
    ip_at = l3[1]
    if place[1] + 20 > len(frame):
        return None
    if kind == GSO_TCPV6:
        return frame
    out = bytearray(frame)
    if (out[ip_at] & 0xF) * 4 < 20 or int.from_bytes(out[ip_at + 2 : ip_at + 4], "big") != len(
        out
    ) - ip_at:
        return None  # its IPv4 length must be the frame's
    ip4_header_checksum(out, ip_at)
    return bytes(out)


def fragment_ppis(first: bool, last: bool, pkt_id: int, checksum: int) -> list[tuple[int, bytes]]:
    """The per-packet info of one fragment of a coalesced receive: the
    checksum info on the first (Linux keeps the first fragment's), the
    RNDIS_PKTINFO_ID on each."""
    flag = FRAG_SUBALLOC | (FRAG_FIRST if first else 0) | (FRAG_LAST if last else 0)
    ppis = [(PPI_PKTINFO, struct.pack("<BBH", PKTINFO_VERSION, flag, pkt_id & 0xFFFF))]
    if first and checksum:
        ppis.insert(0, (PPI_CHECKSUM, struct.pack("<I", checksum)))
    return ppis


def fragment_room(section_size: int) -> int:
    """Frame bytes one receive section holds as an RSC fragment."""
    return section_size - FRAGMENT_OVERHEAD


def fragments(length: int, section_size: int) -> int:
    """Sections (fragments) a coalesced frame of `length` bytes takes."""
    return -(-length // fragment_room(section_size))


def complete_checksum(frame: bytes | bytearray | memoryview, start: int, offset: int) -> bytearray:
    """The frame with the checksum the kernel left partial (CHECKSUM_PARTIAL:
    the field holds the pseudo-header sum) completed over frame[start:]."""
    out = bytearray(frame)
    at = start + offset
    if not start < at + 2 <= len(out):
        return out  # not a place a checksum can be: the receiver drops it
    data = out[start:] + (b"\0" if (len(out) - start) % 2 else b"")
    total = int.from_bytes(data, "big") % 0xFFFF  # 2**16 = 1 (mod 0xFFFF): the 16-bit sum
    if not total:  # the sum is 0xFFFF, or 0 if every word is
        total = 0xFFFF if any(data) else 0
    out[at : at + 2] = (~total & 0xFFFF).to_bytes(2, "big")
    return out


def received_vnet_header(frame: bytes, checksum_ok: bool, mtu: int) -> bytes:
    """The virtio_net_hdr with which a frame the host delivered enters a
    guest's TAP: a verified TCP/UDP checksum as NEEDS_CSUM (the kernel takes
    CHECKSUM_PARTIAL as verified, and the field may hold only a partial
    sum), and a frame longer than the MTU (a coalesced receive) as TCP GSO
    with the MSS the MTU gives, as GRO would have built it."""
    if not checksum_ok:
        return ZERO_HEADER
    place = transport(frame)
    if place is None or place[2] not in (IPPROTO_TCP, IPPROTO_UDP):
        return ZERO_HEADER
    ipv6, at, protocol = place
    tcp = protocol == IPPROTO_TCP
    if at + (20 if tcp else 8) > len(frame):
        return ZERO_HEADER
    l3 = ip_header_at(frame)
    assert l3 is not None
    if not tcp or len(frame) - l3[1] <= mtu:
        return VNET_HDR.pack(VNET_NEEDS_CSUM, GSO_NONE, 0, 0, at, 16 if tcp else 6)
    header_len = at + (frame[at + 12] >> 4) * 4
    mss = mtu - (header_len - l3[1])
    if mss <= 0 or header_len > len(frame):
        return ZERO_HEADER
    gso = GSO_TCPV6 if ipv6 else GSO_TCPV4
    return VNET_HDR.pack(VNET_NEEDS_CSUM, gso, header_len, mss, at, 16)


class Reassembly:
    """The guest's side of RSC, as Linux's rndis_filter_receive_data: the
    fragments of a coalesced frame (RNDIS_PKTINFO_ID with SUBALLOC; the
    first with 1ST_FRAG, the last with LAST_FRAG) joined, the checksum info
    taken from the first. A fragment out of order, one too many, or a frame
    cut by the end of its transfer-page packet is dropped (counted)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.checksum = 0
        self.dropped = 0  # frames (or stray fragments) dropped

    def add(self, frame: Any, ppis: Iterable[tuple[int, bytes]], last_range: bool) -> bytes | None:
        """One PACKET message's frame and PPIs, `last_range` when it is the
        last range of its packet: the whole frame once complete, else None."""
        flag, checksum = 0, 0
        for kind, value in ppis:
            if kind == PPI_PKTINFO and len(value) >= 4:
                flag = value[1]
            elif kind == PPI_CHECKSUM and len(value) >= 4:
                checksum = int.from_bytes(value[:4], "little")
        more = False
        if flag & FRAG_SUBALLOC:
            if flag & FRAG_FIRST:
                self._discard()
            elif not self.parts:
                self.dropped += 1
                return None
            more = not flag & FRAG_LAST
            if more and last_range:
                self._discard(counted=True)
                return None
        else:
            self._discard()
        if len(self.parts) >= RSC_MAX_FRAGMENTS:
            self._discard(counted=True)
            return None
        if not self.parts:
            self.checksum = checksum
        self.parts.append(bytes(frame))
        if more:
            return None
        parts, self.parts = self.parts, []
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if not self.checksum & (RX_TCP_OK | RX_UDP_OK):
            return data
        received = Received(data)
        received.checksum_ok = True
        received.coalesced = len(parts) > 1
        return received

    def _discard(self, counted: bool = False) -> None:
        if self.parts or counted:
            self.dropped += 1
        self.parts = []
