"""pytest-benchmark tests of the network path in one process and one thread:
the per-frame pieces of NVSP and RNDIS on each side, the switch, a raw TAP
write (as root), and the whole NetAdapter → netvsp path over a loopback that
runs the parent's worker whenever the guest would wait. Nothing sleeps or
wakes: these are CPU costs, the floor of `python -m benchmarks.net_bench`.

    .venv/bin/pytest benchmarks/test_bench_net.py --benchmark-enable -p no:cacheprovider
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from benchmarks.net_bench import MAC_A, MAC_B, NS_IP, TAP_NIC, TAP_NIC_IP, interface_mac, udp_frame
from vmbus.channel import COMPLETION_REQUESTED
from vmbus.packet import decode_transfer_page_header, encode_transfer_page_header
from vmbus.protocols.net import rndis_wire as r
from vmbus.protocols.net import wire as nvsp
from vmbus.testing import PumpedDevice
from vsc.net import NetAdapter
from vsp.net import LearningSwitch, NetVsp, NetvspChannel, NullBackend, SwitchPort, TapBackend

SIZES = pytest.mark.parametrize("size", [64, 1500], ids=["64B", "1500B"])
BATCH = 64  # frames per call where a test says so
MiB = 1 << 20


def frame_of(size: int) -> bytes:
    return udp_frame(MAC_B, MAC_A, "10.202.1.1", "10.202.1.2", size)


# --- a NetAdapter and its netvsp in one thread -------------------------------------------


def adapter(vsp: NetVsp) -> tuple[NetAdapter, NetvspChannel]:
    device: Any = PumpedDevice(vsp)
    nic = NetAdapter(device)
    return nic, device.handler


@pytest.fixture
def sender() -> tuple[NetAdapter, NetvspChannel]:
    """An initialized NetAdapter on a netvsp whose backend discards frames."""
    return adapter(NetVsp(NullBackend(), mac=MAC_A))


@pytest.fixture
def receiver() -> Iterator[tuple[NetAdapter, SwitchPort]]:
    """An initialized NetAdapter on switch port B, and port A to send it frames."""
    switch = LearningSwitch()
    port_a, port_b = switch.port(MAC_A), switch.port(MAC_B)
    nic, _ = adapter(NetVsp(port_b, mac=MAC_B))
    yield nic, port_a
    port_a.close()
    port_b.close()


@SIZES
def test_adapter_send_64_frames(benchmark: Any, sender: Any, size: int) -> None:
    """NetAdapter.send_batch of 64 frames, each served by netvsp (NVSP, RNDIS,
    backend, completion) and completed back (÷ 64 for a frame)."""
    nic, handler = sender
    batch = [frame_of(size)] * BATCH

    def send() -> None:
        nic.send_batch(batch)
        while nic.sending:
            nic._pump(1.0)

    benchmark(send)
    assert handler.backend.frames_out >= BATCH


@SIZES
def test_adapter_receive_64_frames(benchmark: Any, receiver: Any, size: int) -> None:
    """64 frames into switch port A, to port B's netvsp, into receive
    sections, then NetAdapter.receive of each (÷ 64 for a frame)."""
    nic, port_a = receiver
    batch = [frame_of(size)] * BATCH

    def receive() -> None:
        port_a.send(batch)
        for _ in batch:
            nic.receive(1.0)

    benchmark(receive)
    assert port_a.drops == 0


@SIZES
def test_netvsp_serve_64_packets(benchmark: Any, sender: Any, size: int) -> None:
    """netvsp alone: 64 prebuilt SEND_RNDIS_PKT packets (one frame in a send
    section each) written to the guest channel, served (NVSP, RNDIS, the
    discarding backend, completions), completions read back (÷ 64)."""
    nic, handler = sender
    message = r.encode_packet(frame_of(size))
    view = nic.buffers["send"][2]
    payloads = []
    for section in range(BATCH):
        start = section * nic.send_section
        view[start : start + len(message)] = message
        payloads.append(nvsp.send_rndis_packet(nvsp.RndisChannel.DATA, section, len(message)))
    channel = nic.channel

    def serve() -> None:
        for trans_id, payload in enumerate(payloads, start=1 << 40):
            channel.send(payload, flags=COMPLETION_REQUESTED, trans_id=trans_id)
        channel.device.serve()
        while channel.poll() is not None:
            pass

    benchmark(serve)
    assert handler.backend.frames_out >= BATCH


# --- the pieces, per frame -----------------------------------------------------------


@SIZES
def test_vsc_encode_packet(benchmark: Any, size: int) -> None:
    """The RNDIS PACKET message of one frame (NetAdapter.send)."""
    frame = frame_of(size)
    benchmark(lambda: r.encode_packet(frame))


def test_vsc_send_rndis_packet_message(benchmark: Any) -> None:
    """The NVSP SEND_RNDIS_PKT message naming a send section."""
    benchmark(lambda: nvsp.send_rndis_packet(nvsp.RndisChannel.DATA, 7, 1544))


def test_vsp_nvsp_receive(benchmark: Any, sender: Any) -> None:
    """NvspServer.receive of a SEND_RNDIS_PKT (netvsp, per packet)."""
    _, handler = sender
    payload = nvsp.send_rndis_packet(nvsp.RndisChannel.DATA, 7, 1544)
    sizes = {handle: g.byte_count for handle, g in handler.context.gpadls.items()}
    benchmark(lambda: handler.nvsp.receive(payload, gpadl_sizes=sizes))


@SIZES
def test_vsp_frame_from_guest(benchmark: Any, sender: Any, size: int) -> None:
    """RndisDevice.frames_from_guest of one section (each header parsed once)."""
    _, handler = sender
    message = r.encode_packet(frame_of(size))
    benchmark(lambda: handler.rndis.frames_from_guest(message))


def test_vsp_completion_message(benchmark: Any) -> None:
    """The SEND_RNDIS_PKT_COMPLETE netvsp encodes for every packet."""
    done = nvsp.SendRndisPacketComplete
    benchmark(lambda: nvsp.encode(done(status=nvsp.NvspStatus.SUCCESS)))


@SIZES
def test_vsp_frame_to_guest(benchmark: Any, receiver: Any, size: int) -> None:
    """RndisDevice.frame_to_guest: the filter and the PACKET message."""
    nic, _ = receiver
    device = nic.device.handler.rndis
    frame = udp_frame(nic.mac, MAC_A, "10.202.1.1", "10.202.1.2", size)
    assert device.frame_to_guest(frame) is not None
    benchmark(lambda: device.frame_to_guest(frame))


def test_vsp_transfer_page_header(benchmark: Any) -> None:
    """The transfer-page header of one receive section (netvsp, per frame)."""
    benchmark(lambda: encode_transfer_page_header(nvsp.RECEIVE_BUFFER_ID, [(1544, 1728 * 5)]))


@SIZES
def test_vsc_receive_decode(benchmark: Any, size: int) -> None:
    """NetAdapter's per-frame decoding: transfer-page header, PACKET message."""
    header = encode_transfer_page_header(nvsp.RECEIVE_BUFFER_ID, [(size + 44, 1728 * 5)])
    message = r.encode_packet(frame_of(size))

    def decode() -> None:
        decode_transfer_page_header(header, buffer_size=MiB)
        bytes(r.decode_packet(message)[0])

    benchmark(decode)


def test_switch_forward_64_frames_1500(benchmark: Any) -> None:
    """64 frames sent one per call into port A (as netvsp sends them), then
    taken from port B in one receive (÷ 64 for a frame)."""
    switch = LearningSwitch()
    port_a, port_b = switch.port(MAC_A), switch.port(MAC_B)
    one = [frame_of(1500)]

    def forward() -> None:
        for _ in range(BATCH):
            port_a.send(one)
        assert len(port_b.receive(BATCH)) == BATCH

    benchmark(forward)
    port_a.close()
    port_b.close()


# --- the reference: writing to a TAP device ---------------------------------------------


@pytest.fixture(scope="module")
def tap() -> Iterator[TapBackend]:
    if os.geteuid() != 0:
        pytest.skip("a TAP device needs root")
    ns = f"netbench-pytest-{os.getpid()}"
    backend = TapBackend(f"nbp{os.getpid()}", netns=ns, create_netns=True, address="10.202.0.1/24")
    yield backend
    backend.close()


@SIZES
def test_tap_raw_write(benchmark: Any, tap: TapBackend, size: int) -> None:
    """os.write of one frame (to the TAP's own MAC, a UDP port nothing
    listens on): the kernel processes it before the write returns."""
    frame = udp_frame(interface_mac(tap.netns or "", tap.name), TAP_NIC, TAP_NIC_IP, NS_IP, size)
    fd = tap.fileno()
    benchmark(lambda: os.write(fd, frame))
