"""Network backends: the learning switch (learning, flooding, bounded queues,
readiness, threads, link state), null, pcap capture, and a TAP device in a
network namespace of its own answering ARP and ICMP echo from the kernel."""

from __future__ import annotations

import os
import select
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute, netns

from vsp.net import (
    LearningSwitch,
    NetBackend,
    NullBackend,
    PcapCapture,
    SwitchPort,
    TapBackend,
)

BROADCAST = b"\xff" * 6
MAC_A, MAC_B, MAC_C = (bytes([2, 0, 0, 0, 0, n]) for n in (0xA, 0xB, 0xC))
IPV4, ARP = 0x0800, 0x0806


def frame(dst: bytes, src: bytes, payload: bytes = b"x" * 46, ethertype: int = 0x88B5) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def readable(backend: NetBackend) -> bool:
    return bool(select.select([backend.fileno()], [], [], 0)[0])


def drain(backend: NetBackend) -> list[bytes]:
    frames, batch = [], backend.receive(64)
    while batch:
        frames += batch
        batch = backend.receive(64)
    return frames


@pytest.fixture
def switch() -> Iterator[tuple[SwitchPort, SwitchPort, SwitchPort]]:
    ports = LearningSwitch(queue_frames=8)
    a, b, c = ports.port(), ports.port(), ports.port()
    with a, b, c:
        yield a, b, c


# --- learning switch ---


def test_switch_learns_so_only_the_owner_of_a_mac_receives(switch: tuple[SwitchPort, ...]) -> None:
    a, b, c = switch
    assert a.send([frame(MAC_B, MAC_A)]) == 1  # B not yet learned: flooded
    assert len(drain(b)) == len(drain(c)) == 1
    b.send([frame(MAC_A, MAC_B)])  # A was learned from its frame: only A
    assert len(drain(a)) == 1 and drain(c) == []
    a.send([frame(MAC_B, MAC_A, b"to b")])
    assert drain(b) == [frame(MAC_B, MAC_A, b"to b")]
    assert drain(a) == drain(c) == []
    a.send([frame(MAC_A, MAC_A)])  # to the port it came from: filtered
    assert drain(a) == drain(b) == drain(c) == []
    assert (a.frames_out, b.frames_in, c.frames_in) == (3, 2, 1)


def test_switch_floods_broadcast_multicast_and_unknown_unicast(
    switch: tuple[SwitchPort, ...],
) -> None:
    a, b, c = switch
    b.send([frame(MAC_A, MAC_B)])  # B is known from here on
    drain(a), drain(c)
    multicast = bytes.fromhex("01005e000001")
    unknown = bytes.fromhex("020000000099")
    sent = [frame(BROADCAST, MAC_A), frame(multicast, MAC_A), frame(unknown, MAC_A)]
    assert a.send(sent) == 3
    assert drain(b) == drain(c) == sent
    assert drain(a) == []  # never back to the sender


def test_switch_port_mac_is_learned_before_it_sends() -> None:
    switch = LearningSwitch()
    with switch.port(MAC_A) as a, switch.port(MAC_B) as b, switch.port() as c:
        assert a.mac == MAC_A
        c.send([frame(MAC_A, MAC_C)])
        assert len(drain(a)) == 1 and drain(b) == []


def test_switch_bounded_queue_drops_are_counted(switch: tuple[SwitchPort, ...]) -> None:
    a, b, c = switch
    frames = [frame(BROADCAST, MAC_A, bytes([n]) * 46) for n in range(20)]
    assert a.send(frames) == 20  # A's ring took them all; 12 were dropped at the full ports
    assert drain(b) == frames[:8]
    assert b.drops == c.drops == b.dropped == c.dropped == 12 and a.drops == 0
    assert a.send(frames[:1]) == 1 and drain(b) == frames[:1]  # room again once drained


def test_switch_drops_malformed_frames_at_the_sender(switch: tuple[SwitchPort, ...]) -> None:
    a, b, _ = switch
    too_long = frame(BROADCAST, MAC_A, bytes(1500 + 4 + 1))
    good = frame(BROADCAST, MAC_A, bytes(1500 + 4))  # a full frame with a VLAN tag
    assert a.send([b"short", too_long, good]) == 1
    assert a.drops == 2 and drain(b) == [good]


def test_switch_fileno_is_readable_exactly_while_frames_wait(
    switch: tuple[SwitchPort, ...],
) -> None:
    a, b, _ = switch
    assert not readable(b)
    a.send([frame(BROADCAST, MAC_A, bytes([n]) * 46) for n in range(3)])
    assert readable(b) and readable(b)  # level-triggered: select does not consume it
    assert len(b.receive(2)) == 2 and readable(b)
    assert len(b.receive(2)) == 1 and not readable(b)
    assert b.receive(2) == [] and not readable(b)


def test_switch_copies_frames_the_caller_may_reuse(switch: tuple[SwitchPort, ...]) -> None:
    a, b, _ = switch
    buffer = bytearray(frame(BROADCAST, MAC_A))
    a.send([memoryview(buffer)])
    buffer[20:] = bytes(len(buffer) - 20)
    assert drain(b) == [frame(BROADCAST, MAC_A)]


def test_switch_table_cap_floods_macs_it_cannot_learn() -> None:
    switch = LearningSwitch(table_entries=2)
    with switch.port(MAC_A) as a, switch.port(MAC_B) as b, switch.port() as c:
        a.send([frame(MAC_C, MAC_A)])  # unknown: flooded
        assert len(drain(b)) == len(drain(c)) == 1
        c.send([frame(MAC_A, MAC_C)])  # MAC_A and MAC_B fill the table: MAC_C is not learned
        assert len(drain(a)) == 1 and drain(b) == []
        a.send([frame(MAC_C, MAC_A)])
        assert len(drain(b)) == len(drain(c)) == 1  # so frames to it still flood


def test_switch_closed_port_is_forgotten() -> None:
    switch = LearningSwitch()
    with switch.port(MAC_A) as a, switch.port() as c:
        b = switch.port(MAC_B)
        b.close()
        assert b.fileno() == -1 and b.send([frame(MAC_A, MAC_B)]) == 0
        a.send([frame(MAC_B, MAC_A)])  # B's MAC is unknown again: flooded to C
        assert len(drain(c)) == 1


def test_switch_link_down_drops_a_ports_traffic(switch: tuple[SwitchPort, ...]) -> None:
    a, b, c = switch
    changes: list[bool] = []
    b.on_link_change = changes.append
    a.send([frame(BROADCAST, MAC_A)])  # waiting at B when its cable is pulled
    b.set_link(False)
    b.set_link(False)
    assert changes == [False] and not b.link_up and not readable(b) and b.drops == 1
    a.send([frame(BROADCAST, MAC_A)])
    assert b.receive(8) == [] and b.drops == 2 and len(drain(c)) == 2
    assert b.send([frame(MAC_A, MAC_B)]) == 0 and b.drops == 3 and drain(a) == []
    b.set_link(True)
    assert changes == [False, True]
    a.send([frame(BROADCAST, MAC_A)])
    assert len(drain(b)) == 1


def test_switch_two_sending_threads_lose_and_reorder_nothing() -> None:
    count, batch = 4000, 16
    switch = LearningSwitch(queue_frames=2 * count)  # no drops: every frame is accounted for
    with switch.port(MAC_A) as a, switch.port(MAC_B) as b, switch.port(MAC_C) as c:
        start = threading.Barrier(2)

        def send(port: SwitchPort, mac: bytes) -> None:
            frames = [frame(MAC_C, mac, struct.pack("!I", n) + bytes(42)) for n in range(count)]
            start.wait()
            for i in range(0, count, batch):
                assert port.send(frames[i : i + batch]) == batch

        threads = [threading.Thread(target=send, args=(p, m)) for p, m in ((a, MAC_A), (b, MAC_B))]
        for thread in threads:
            thread.start()
        got: dict[bytes, list[int]] = {MAC_A: [], MAC_B: []}
        deadline = time.monotonic() + 5
        while sum(map(len, got.values())) < 2 * count and time.monotonic() < deadline:
            select.select([c.fileno()], [], [], 0.5)
            for received in c.receive(256):
                got[received[6:12]].append(struct.unpack_from("!I", received, 14)[0])
        for thread in threads:
            thread.join()
        assert got[MAC_A] == got[MAC_B] == list(range(count))
        assert c.drops == 0 and not readable(c)


# --- null and pcap ---


def test_null_backend_accepts_everything_and_never_receives() -> None:
    with NullBackend(mac=MAC_A) as null:
        assert null.mac == MAC_A and null.mtu == 1500
        assert null.send([frame(BROADCAST, MAC_A)] * 3) == 3 and null.frames_out == 3
        assert null.receive(8) == [] and not readable(null)
        null.set_link(False)
        assert null.send([frame(BROADCAST, MAC_A)]) == 0 and null.drops == 1


def read_pcap(path: Path) -> tuple[tuple[int, ...], list[tuple[float, int, bytes]]]:
    """The global header's fields, and (time, frame length, bytes) per record."""
    data = path.read_bytes()
    header = struct.unpack_from("<IHHiIII", data)
    records, offset = [], 24
    while offset < len(data):
        seconds, micros, captured, length = struct.unpack_from("<IIII", data, offset)
        assert micros < 1_000_000
        records.append((seconds + micros / 1e6, length, data[offset + 16 : offset + 16 + captured]))
        offset += 16 + captured
    assert offset == len(data)
    return header, records


def test_pcap_capture_records_frames_sent_and_received(tmp_path: Path) -> None:
    switch = LearningSwitch()
    path = tmp_path / "capture.pcap"
    peer = switch.port(MAC_B)
    capture = PcapCapture(switch.port(MAC_A), path)
    out = [frame(MAC_B, MAC_A, b"one" * 20), frame(BROADCAST, MAC_A, bytes(1500))]
    back = frame(MAC_A, MAC_B, b"reply" * 10)
    before = time.time()
    with capture, peer:
        assert capture.send([memoryview(f) for f in out]) == 2
        assert drain(peer) == out
        peer.send([back])
        assert readable(capture) and capture.receive(8) == [back]
        changes: list[bool] = []
        capture.on_link_change = changes.append
        capture.set_link(False)
        assert changes == [False] and not capture.link_up
        assert (capture.mac, capture.frames_in, capture.frames_out) == (MAC_A, 1, 2)
    header, records = read_pcap(path)
    assert header == (0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)  # LINKTYPE_ETHERNET
    assert [(length, data) for _, length, data in records] == [(len(f), f) for f in [*out, back]]
    assert all(before - 1 <= when <= time.time() + 1 for when, _, _ in records)


def test_pcap_capture_of_null_records_frames_the_medium_discards(tmp_path: Path) -> None:
    path = tmp_path / "null.pcap"
    with PcapCapture(NullBackend(), path) as capture:
        capture.send([frame(BROADCAST, MAC_A)])
    assert [data for _, _, data in read_pcap(path)[1]] == [frame(BROADCAST, MAC_A)]


# --- TAP in a network namespace (10.200.N.0/24 exists only in there) ---

SUBNET = f"10.200.{os.getpid() % 200 + 1}"
GUEST_MAC = bytes.fromhex("020000c0ffee")
GUEST_IP, TAP_IP = f"{SUBNET}.2", f"{SUBNET}.1"
IFF_UP = 0x1


def ip(text: str) -> bytes:
    return bytes(int(part) for part in text.split("."))


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071); 0 over data that carries a correct one."""
    data += b"\0" * (len(data) % 2)
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def arp(op: int, src_mac: bytes, src_ip: str, dst_mac: bytes, dst_ip: str) -> bytes:
    body = struct.pack("!HHBBH", 1, IPV4, 6, 4, op) + src_mac + ip(src_ip) + dst_mac + ip(dst_ip)
    return frame(BROADCAST if op == 1 else dst_mac, src_mac, body + bytes(18), ARP)


def echo_request(dst_mac: bytes, ident: int, payload: bytes) -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + payload
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    header = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(icmp), ident, 0x4000, 64, 1, 0)
    header += ip(GUEST_IP) + ip(TAP_IP)  # version 4, 20 bytes, don't fragment, TTL 64, ICMP
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return frame(dst_mac, GUEST_MAC, header + icmp, IPV4)


def ethertype(data: bytes) -> int:
    return int.from_bytes(data[12:14], "big")


def wait_for(tap: TapBackend, wanted: Callable[[bytes], bool], seconds: float = 3.0) -> bytes:
    """The first frame from the kernel that is `wanted`, answering its ARP
    requests for the guest meanwhile; the rest (IPv6 MLD reports, router
    solicitations, duplicate address detection) is noise to skip."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        select.select([tap], [], [], left)
        for data in tap.receive(32):
            if wanted(data):
                return data
            if ethertype(data) == ARP and data[20:22] == b"\0\1" and data[38:42] == ip(GUEST_IP):
                tap.send([arp(2, GUEST_MAC, GUEST_IP, data[6:12], TAP_IP)])
    raise AssertionError("no such frame from the kernel")


def is_arp_reply(data: bytes) -> bool:
    return (
        ethertype(data) == ARP
        and data[:6] == GUEST_MAC
        and data[20:22] == b"\0\2"
        and data[28:32] == ip(TAP_IP)
        and data[32:42] == GUEST_MAC + ip(GUEST_IP)
    )


def link(namespace: str, index: int) -> dict[str, Any]:
    with IPRoute(netns=namespace, flags=0) as ipr:
        (message,) = ipr.get_links(index)
        return {
            "flags": message["flags"],
            "operstate": message.get("IFLA_OPERSTATE"),
            "mtu": message.get("IFLA_MTU"),
            "carrier": message.get("IFLA_CARRIER"),
        }


def namespace_name(tag: str) -> str:
    return f"nb{tag}{os.getpid()}"


@pytest.fixture
def own_netns() -> Iterator[str]:
    """A namespace the test creates and removes itself."""
    name = namespace_name("own")
    netns.create(name)
    try:
        yield name
    finally:
        netns.remove(name)


@pytest.fixture
def tap() -> Iterator[TapBackend]:
    name = namespace_name("tap")
    try:
        backend = TapBackend(netns=name, address=f"{TAP_IP}/24", mtu=1400, create_netns=True)
        with backend:
            yield backend
        assert name not in netns.listnetns()  # close removed the namespace it created
    finally:
        if name in netns.listnetns():
            netns.remove(name)


@pytest.mark.requires_root
def test_tap_kernel_answers_arp_and_ping(tap: TapBackend) -> None:
    assert link(tap.netns or "", tap.index)["mtu"] == 1400
    assert tap.send([arp(1, GUEST_MAC, GUEST_IP, bytes(6), TAP_IP)]) == 1
    reply = wait_for(tap, is_arp_reply)
    tap_mac = reply[22:28]
    payload = os.urandom(56)
    ident = os.getpid() & 0xFFFF
    assert tap.send([echo_request(tap_mac, ident, payload)]) == 1

    def is_echo_reply(data: bytes) -> bool:
        return (
            ethertype(data) == IPV4 and data[23] == 1 and data[26:34] == ip(TAP_IP) + ip(GUEST_IP)
        )

    pong = wait_for(tap, is_echo_reply)
    assert pong[:12] == GUEST_MAC + tap_mac
    header, icmp = pong[14:34], pong[34 : 14 + int.from_bytes(pong[16:18], "big")]
    assert checksum(header) == 0 and checksum(icmp) == 0
    assert icmp[:2] == b"\0\0" and icmp[4:6] == struct.pack("!H", ident) and icmp[8:] == payload
    assert tap.frames_out == 2 and tap.frames_in >= 2 and tap.drops == 0
    assert tap.send([b"short", bytes(14 + 4 + 1401)]) == 0 and tap.drops == 2  # beyond the MTU


@pytest.mark.requires_root
def test_tap_link_down_is_seen_in_the_namespace(tap: TapBackend) -> None:
    changes: list[bool] = []
    tap.on_link_change = changes.append
    assert link(tap.netns or "", tap.index)["flags"] & IFF_UP
    tap.set_link(False)
    state = link(tap.netns or "", tap.index)
    assert not state["flags"] & IFF_UP and state["operstate"] == "DOWN"
    assert state["carrier"] == 0 and changes == [False]
    assert tap.send([arp(1, GUEST_MAC, GUEST_IP, bytes(6), TAP_IP)]) == 0 and tap.drops == 1
    tap.set_link(True)
    state = link(tap.netns or "", tap.index)
    assert state["flags"] & IFF_UP and state["carrier"] == 1 and changes == [False, True]
    tap.send([arp(1, GUEST_MAC, GUEST_IP, bytes(6), TAP_IP)])
    wait_for(tap, is_arp_reply)  # the address survived the link going down


@pytest.mark.requires_root
def test_tap_close_deletes_the_device(own_netns: str) -> None:
    tap = TapBackend(netns=own_netns, address=f"{TAP_IP}/24")
    try:
        with IPRoute(netns=own_netns, flags=0) as ipr:
            assert ipr.link_lookup(ifname=tap.name) == [tap.index]
    finally:
        tap.close()
    assert tap.fileno() == -1
    with IPRoute(netns=own_netns, flags=0) as ipr:
        assert ipr.link_lookup(ifname=tap.name) == []
    assert own_netns in netns.listnetns()  # not created by the backend: not removed


@pytest.mark.requires_root
def test_tap_failed_setup_leaves_nothing_behind(own_netns: str) -> None:
    name = f"nbbad{os.getpid()}"[:15]
    with pytest.raises(Exception):  # noqa: B017 - pyroute2's NetlinkError, or ValueError
        TapBackend(name, netns=own_netns, address=f"{TAP_IP}/99")
    with IPRoute(netns=own_netns, flags=0) as ipr:
        assert ipr.link_lookup(ifname=name) == []
