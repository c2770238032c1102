"""Hand-built Ethernet frames for tests and examples: ARP, and IPv4 with
ICMP echo and UDP, with correct checksums; and their parsing."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, replace

BROADCAST = b"\xff" * 6
ETH_ARP, ETH_IPV4 = 0x0806, 0x0800
IP_ICMP, IP_UDP = 1, 17


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ip(address: str) -> bytes:
    return ipaddress.IPv4Address(address).packed


def ethernet(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    frame = dst + src + struct.pack("!H", ethertype) + payload
    return frame.ljust(60, b"\0")  # the Ethernet minimum, without FCS


def arp_request(src_mac: bytes, src_ip: str, target_ip: str) -> bytes:
    body = struct.pack("!HHBBH", 1, ETH_IPV4, 6, 4, 1)
    body += src_mac + ip(src_ip) + bytes(6) + ip(target_ip)
    return ethernet(BROADCAST, src_mac, ETH_ARP, body)


def arp_reply(src_mac: bytes, src_ip: str, dst_mac: bytes, dst_ip: str) -> bytes:
    body = struct.pack("!HHBBH", 1, ETH_IPV4, 6, 4, 2)
    body += src_mac + ip(src_ip) + dst_mac + ip(dst_ip)
    return ethernet(dst_mac, src_mac, ETH_ARP, body)


def ipv4(src: str, dst: str, protocol: int, payload: bytes, ident: int = 1) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(payload),
        ident,
        0x4000,
        64,
        protocol,
        0,
        ip(src),
        ip(dst),
    )
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + payload


def icmp_echo(ident: int, seq: int, data: bytes, reply: bool = False) -> bytes:
    message = struct.pack("!BBHHH", 0 if reply else 8, 0, 0, ident, seq) + data
    return message[:2] + struct.pack("!H", checksum(message)) + message[4:]


def udp(src: str, dst: str, sport: int, dport: int, data: bytes) -> bytes:
    length = 8 + len(data)
    pseudo = ip(src) + ip(dst) + struct.pack("!BBH", 0, IP_UDP, length)
    header = struct.pack("!HHHH", sport, dport, length, 0)
    value = checksum(pseudo + header + data) or 0xFFFF
    return header[:6] + struct.pack("!H", value) + data


@dataclass(frozen=True)
class Parsed:
    """What a test needs of a received frame."""

    dst: bytes
    src: bytes
    ethertype: int
    arp_op: int = 0
    arp_sender: tuple[bytes, str] | None = None
    arp_target_ip: str = ""
    ip_src: str = ""
    ip_dst: str = ""
    protocol: int = 0
    icmp_type: int = -1
    icmp_id_seq: tuple[int, int] = (0, 0)
    ports: tuple[int, int] = (0, 0)
    data: bytes = b""


def parse(frame: bytes) -> Parsed:
    dst, src, ethertype = frame[:6], frame[6:12], struct.unpack("!H", frame[12:14])[0]
    body = frame[14:]
    if ethertype == ETH_ARP and len(body) >= 28:
        op = struct.unpack("!H", body[6:8])[0]
        sender = (body[8:14], str(ipaddress.IPv4Address(body[14:18])))
        target = str(ipaddress.IPv4Address(body[24:28]))
        return Parsed(dst, src, ethertype, op, sender, target)
    if ethertype != ETH_IPV4 or len(body) < 20:
        return Parsed(dst, src, ethertype)
    length, protocol = struct.unpack("!H", body[2:4])[0], body[9]
    src_ip = str(ipaddress.IPv4Address(body[12:16]))
    dst_ip = str(ipaddress.IPv4Address(body[16:20]))
    inner = body[(body[0] & 0xF) * 4 : length]
    parsed = Parsed(dst, src, ethertype, ip_src=src_ip, ip_dst=dst_ip, protocol=protocol)
    if protocol == IP_ICMP and len(inner) >= 8:
        ident, seq = struct.unpack("!HH", inner[4:8])
        return replace(parsed, icmp_type=inner[0], icmp_id_seq=(ident, seq), data=inner[8:])
    if protocol == IP_UDP and len(inner) >= 8:
        sport, dport = struct.unpack("!HH", inner[:4])
        return replace(parsed, ports=(sport, dport), data=inner[8:])
    return parsed
