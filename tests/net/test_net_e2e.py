"""Network end to end: children's NetAdapters against the parent's netvsp,
through the in-memory switch and through a real TAP device in a network
namespace the test creates (as root), where the Linux kernel answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmbus import guid
from vmbus.channel import ChannelTimeout
from vmbus.guest import Guest, GuestDevice
from vmbus.partition import Host, wait_until
from vmbus.testing import ethernet as eth
from vsc.net import NetAdapter
from vsp.net import LearningSwitch, NetVsp, TapBackend

MAC_A, MAC_B = bytes.fromhex("020000000a01"), bytes.fromhex("020000000b02")
IP_A, IP_B = "10.201.0.1", "10.201.0.2"


def adapter(guest: Guest) -> NetAdapter:
    devices: list[GuestDevice] = []
    guest.register(guid.NETWORK, devices.append)
    return NetAdapter(devices[0])


def next_matching(nic: NetAdapter, wanted, timeout: float = 10):  # type: ignore[no-untyped-def]
    """The next frame that `wanted(parsed)` accepts (others are noise)."""
    deadline = time.monotonic() + timeout
    while True:
        parsed = eth.parse(nic.receive(max(0.001, deadline - time.monotonic())))
        if wanted(parsed):
            return parsed


def pinger(guest: Guest, count: int) -> None:
    """Child A: ping B through the switch."""
    nic = adapter(guest)
    assert nic.mac == MAC_A and nic.link_up and nic.mtu == 1500
    for seq in range(count):
        icmp = eth.icmp_echo(7, seq, b"ping %d" % seq)
        request = eth.ethernet(MAC_B, MAC_A, eth.ETH_IPV4, eth.ipv4(IP_A, IP_B, eth.IP_ICMP, icmp))
        for _ in range(20):  # like ping: B drops frames until its packet filter is set
            nic.send(request)
            try:
                reply = next_matching(nic, lambda p, s=seq: p.icmp_id_seq == (7, s), timeout=0.5)
                break
            except ChannelTimeout:
                continue
        assert reply.icmp_type == 0 and reply.data.startswith(b"ping %d" % seq)


def responder(guest: Guest) -> None:
    """Child B: answer echo requests until stopped."""
    nic = adapter(guest)
    while True:
        request = next_matching(nic, lambda p: p.icmp_type == 8, timeout=3600)
        ident, seq = request.icmp_id_seq
        icmp = eth.icmp_echo(ident, seq, request.data, reply=True)
        packet = eth.ipv4(IP_B, request.ip_src, eth.IP_ICMP, icmp)
        nic.send(eth.ethernet(request.src, MAC_B, eth.ETH_IPV4, packet))


def test_two_children_ping_through_the_switch() -> None:
    switch = LearningSwitch()
    with Host() as host:
        b = host.start(responder, devices=[NetVsp(switch.port(MAC_B), mac=MAC_B)])
        a = host.start(pinger, devices=[NetVsp(switch.port(MAC_A), mac=MAC_A)], args=(50,))
        assert a.wait(timeout=60) == 0
        assert b.state == "running"  # it answered all 50 and is still serving
        b.stop()


def link_watcher(guest: Guest, workdir: str) -> None:
    nic = adapter(guest)
    (Path(workdir) / "ready").write_text("1")
    nic.wait_link(False, timeout=20)
    nic.wait_link(True, timeout=20)
    (Path(workdir) / "seen").write_text(json.dumps(list(nic.link_events)))


def test_link_down_and_up_reach_the_child(tmp_path: Path) -> None:
    port = LearningSwitch().port()
    with Host() as host:
        child = host.start(link_watcher, devices=[NetVsp(port)], args=(str(tmp_path),))
        assert wait_until(lambda: (tmp_path / "ready").exists(), 30)
        port.set_link(False)
        time.sleep(0.1)
        port.set_link(True)
        assert child.wait(timeout=30) == 0
        assert json.loads((tmp_path / "seen").read_text()) == [False, True]


# --- a real TAP device in a network namespace (root) ---

NS_IP, CHILD_IP, UDP_PORT = "10.200.7.1", "10.200.7.2", 40007
CHILD_MAC = bytes.fromhex("020000000c03")


def tap_client(guest: Guest) -> None:
    """Child: ARP for the namespace's address, ping it, and bounce a UDP
    datagram off a real socket there."""
    nic = adapter(guest)
    nic.send(eth.arp_request(nic.mac, CHILD_IP, NS_IP))
    reply = next_matching(nic, lambda p: p.arp_op == 2 and p.arp_sender[1] == NS_IP)
    ns_mac = reply.arp_sender[0]
    icmp = eth.icmp_echo(9, 1, b"hello kernel")
    packet = eth.ipv4(CHILD_IP, NS_IP, eth.IP_ICMP, icmp)
    nic.send(eth.ethernet(ns_mac, nic.mac, eth.ETH_IPV4, packet))
    echo = next_matching(nic, lambda p: p.icmp_type == 0)
    assert echo.ip_src == NS_IP and echo.data == b"hello kernel"
    datagram = eth.udp(CHILD_IP, NS_IP, 5555, UDP_PORT, b"over the vmbus")
    packet = eth.ipv4(CHILD_IP, NS_IP, eth.IP_UDP, datagram, ident=2)
    nic.send(eth.ethernet(ns_mac, nic.mac, eth.ETH_IPV4, packet))
    back = next_matching(nic, lambda p: p.protocol == eth.IP_UDP)
    assert back.ports == (UDP_PORT, 5555) and back.data == b"over the vmbus"


UDP_ECHO = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("{ip}", {port}))
print("ready", flush=True)
data, peer = s.recvfrom(2048)
s.sendto(data, peer)
"""


@pytest.mark.requires_root
def test_child_talks_to_the_kernel_through_a_tap_device() -> None:
    namespace = f"vmbus-test-{os.getpid()}"
    tap = TapBackend(
        f"vmt{os.getpid() % 100000}", netns=namespace, create_netns=True, address=f"{NS_IP}/24"
    )
    echo = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            namespace,
            sys.executable,
            "-c",
            UDP_ECHO.format(ip=NS_IP, port=UDP_PORT),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
        with Host() as host:
            child = host.start(tap_client, devices=[NetVsp(tap, mac=CHILD_MAC)])
            assert child.wait(timeout=60) == 0
        assert echo.wait(timeout=10) == 0
    finally:
        if echo.poll() is None:
            echo.kill()
        tap.close()
    assert not os.path.exists(f"/run/netns/{namespace}")


def batch_sender(guest: Guest, count: int) -> None:
    nic = adapter(guest)
    frames = [
        eth.ethernet(
            MAC_B,
            MAC_A,
            eth.ETH_IPV4,
            eth.ipv4(IP_A, IP_B, eth.IP_UDP, eth.udp(IP_A, IP_B, 1, 2, b"%06d" % i + bytes(size))),
        )
        for i, size in zip(range(count), [18, 1400, 600, 40] * count, strict=False)
    ]
    nic.send_batch(frames)


def batch_receiver(guest: Guest, count: int, workdir: str) -> None:
    nic = adapter(guest)
    (Path(workdir) / "ready").write_text("1")
    got = [eth.parse(nic.receive(10)).data[:6] for _ in range(count)]
    (Path(workdir) / "got.json").write_text(json.dumps([g.decode() for g in got]))


def test_batched_frames_arrive_in_order(tmp_path: Path) -> None:
    """send_batch packs several RNDIS messages per send section."""
    switch = LearningSwitch()
    receiver_port = switch.port(MAC_B)
    with Host() as host:
        b = host.start(
            batch_receiver, devices=[NetVsp(receiver_port, mac=MAC_B)], args=(200, str(tmp_path))
        )
        assert wait_until(lambda: (tmp_path / "ready").exists(), 30)
        a_vsp = NetVsp(switch.port(MAC_A), mac=MAC_A)
        # The sender's worker is a thread of ours, so its handler can be inspected.
        a = host.start(batch_sender, devices=[a_vsp], args=(200,), worker="thread")
        assert a.wait(timeout=60) == 0 and b.wait(timeout=60) == 0
        got = json.loads((tmp_path / "got.json").read_text())
        assert got == [f"{i:06d}" for i in range(200)]
        assert a_vsp.handler is not None and a_vsp.handler.nvsp.errors.total() == 0


def async_receiver(guest: Guest, workdir: str) -> None:
    """Child: the asyncio form of receive."""
    import asyncio

    nic = adapter(guest)
    (Path(workdir) / "ready").write_text("1")
    frames = asyncio.run(asyncio.wait_for(_collect(nic, 3), 20))
    (Path(workdir) / "got.json").write_text(json.dumps([f[14:20].hex() for f in frames]))


async def _collect(nic: NetAdapter, count: int) -> list[bytes]:
    return [await nic.areceive() for _ in range(count)]


def test_frames_reach_an_asyncio_receiver(tmp_path: Path) -> None:
    switch = LearningSwitch()
    injector = switch.port(MAC_A)
    with Host() as host:
        child = host.start(
            async_receiver, devices=[NetVsp(switch.port(MAC_B), mac=MAC_B)], args=(str(tmp_path),)
        )
        assert wait_until(lambda: (tmp_path / "ready").exists(), 30)
        time.sleep(0.2)  # the child is now awaiting
        payloads = [bytes([i]) * 6 for i in (1, 2, 3)]
        injector.send([eth.ethernet(MAC_B, MAC_A, 0x88B5, p) for p in payloads])
        assert child.wait(timeout=30) == 0
        assert json.loads((tmp_path / "got.json").read_text()) == [p.hex() for p in payloads]
