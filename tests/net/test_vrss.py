"""vRSS: a child asks for a sub-channel as Linux's netvsc does (the RSS
capabilities, NVSP SUBCHANNEL, the send indirection table), and its sends
spread over both channels, each served in the worker by a thread of its
own; the frames all reach the backend, none refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.net.test_net_e2e import adapter
from vmbus import guid
from vmbus.channel import COMPLETION_REQUESTED
from vmbus.errors import UsageError
from vmbus.guest import Guest
from vmbus.host import OfferSpec
from vmbus.memory import PAGE_SIZE
from vmbus.packet import PacketType
from vmbus.partition import Host
from vmbus.protocols.net import wire as nvsp
from vmbus.protocols.net.rndis_wire import encode_packet
from vmbus.protocols.net.vsp import RndisState
from vmbus.testing import VspHarness
from vmbus.testing import ethernet as eth
from vsp.net import NetVsp, NullBackend, TapBackend
from vsp.net.vrss import NetvspSubChannel

MAC = bytes.fromhex("020000001101")
BATCHES, BATCH = 40, 16


def vrss_sender(guest: Guest, workdir: str) -> None:
    nic = adapter(guest)
    opened = nic.open_sub_channels(3)  # the host offers 2 queues: one sub-channel
    frame = eth.ethernet(eth.BROADCAST, nic.mac, 0x88B5, bytes(range(100)))
    for _ in range(BATCHES):
        nic.send_batch([frame] * BATCH)
    while nic.sending:
        nic._pump(10.0)
    report = {
        "opened": opened,
        "table": list(nic.send_table),
        "packets": [nic.channel.packets_sent] + [c.packets_sent for c, _ in nic.subs],
        "failures": nic.send_failures,
        "fast": nic.fast is not None,
    }
    (Path(workdir) / "vrss.json").write_text(json.dumps(report))
    nic.close()


def run(vsp: NetVsp, tmp_path: Path) -> dict[str, object]:
    with Host() as host:
        child = host.start(vrss_sender, devices=[vsp], args=(str(tmp_path),), worker="thread")
        assert child.wait(timeout=60) == 0
    report: dict[str, object] = json.loads((tmp_path / "vrss.json").read_text())
    assert report["opened"] == 1 and report["failures"] == 0
    assert report["table"] == [i % 2 for i in range(16)]  # every channel in turn
    packets = report["packets"]
    assert isinstance(packets, list) and all(p >= BATCHES // 2 for p in packets)  # both carried
    assert vsp.counters.frames_from_guest == BATCHES * BATCH and vsp.counters.refused == 0
    return report


def test_sends_spread_over_a_sub_channel(tmp_path: Path) -> None:
    backend = NullBackend(mac=MAC)
    run(NetVsp(backend, mac=MAC, channels=2), tmp_path)
    assert backend.frames_out == BATCHES * BATCH


def test_one_channel_offers_no_sub_channels(tmp_path: Path) -> None:
    vsp = NetVsp(NullBackend(mac=MAC), mac=MAC)
    with Host() as host:
        child = host.start(vrss_sender, devices=[vsp], args=(str(tmp_path),), worker="thread")
        assert child.wait(timeout=60) == 0
    report = json.loads((tmp_path / "vrss.json").read_text())
    assert report["opened"] == 0 and len(report["packets"]) == 1


@pytest.mark.requires_root
def test_sub_channel_sends_take_the_compiled_path_to_a_tap(tap: TapBackend, tmp_path: Path) -> None:
    run(NetVsp(tap, mac=MAC, channels=2), tmp_path)
    assert tap.frames_out == BATCHES * BATCH and tap.drops == 0


# --- a hostile guest on a sub-channel (in one process) ---


def sub_harness(vsp: NetVsp) -> VspHarness:
    return VspHarness(vsp, offer=OfferSpec(guid.NETWORK, vsp.instance_id, 1))


def test_sub_channel_without_its_primary_is_refused() -> None:
    vsp = NetVsp(NullBackend(mac=MAC), mac=MAC, channels=2)
    with pytest.raises(UsageError):
        sub_harness(vsp)


def test_sub_channel_takes_data_sends_only_and_counts_the_rest() -> None:
    backend = NullBackend(mac=MAC)
    vsp = NetVsp(backend, mac=MAC, channels=2)
    with VspHarness(vsp, ring_size=256 << 10) as primary:
        recv, send = primary.grant(64), primary.grant(16)
        for trans_id, message in enumerate(
            (
                nvsp.encode(nvsp.NvspInit(min_protocol_ver=0x60001, max_protocol_ver=0x60001)),
                nvsp.encode(nvsp.SendReceiveBuffer(gpadl_handle=recv.gpadl)),
                nvsp.encode(nvsp.SendSendBuffer(gpadl_handle=send.gpadl)),
            ),
            1,
        ):
            primary.guest.send(message, flags=COMPLETION_REQUESTED, trans_id=trans_id)
            primary.pump()
        vsp.handler.rndis.state = RndisState.INITIALIZED  # type: ignore[union-attr]
        frame = eth.ethernet(eth.BROADCAST, MAC, 0x88B5, b"x" * 60)
        message = encode_packet(frame)
        offset = send.pfns[0] * PAGE_SIZE
        primary.memory.view(offset, len(message))[:] = message
        with sub_harness(vsp) as sub:
            assert isinstance(sub.handler, NetvspSubChannel) and sub.handler.own_thread
            errors = sub.context.peer_log.count

            def send_on_sub(payload: bytes, trans_id: int) -> int | None:
                sub.guest.send(payload, flags=COMPLETION_REQUESTED, trans_id=trans_id)
                sub.pump()
                reply = sub.guest.poll()
                return None if reply is None else int.from_bytes(reply.payload[4:8], "little")

            init = nvsp.encode(nvsp.NvspInit(min_protocol_ver=2, max_protocol_ver=2))
            assert send_on_sub(init, 10) is None  # not a send: counted, never answered
            control = nvsp.send_rndis_packet(nvsp.RndisChannel.CONTROL, 0, len(message))
            assert send_on_sub(control, 11) == nvsp.NvspStatus.INVALID_RNDIS_PKT
            bad = nvsp.send_rndis_packet(nvsp.RndisChannel.DATA, 999, len(message))
            assert send_on_sub(bad, 12) == nvsp.NvspStatus.INVALID_RNDIS_PKT
            sub.guest.send(b"\0" * 8, type=PacketType.COMP, trans_id=13)
            sub.pump()
            assert sub.context.peer_log.count == errors + 4
            data = nvsp.send_rndis_packet(nvsp.RndisChannel.DATA, 0, len(message))
            assert send_on_sub(data, 14) == nvsp.NvspStatus.SUCCESS
            assert backend.frames_out == 1 and vsp.stats()["sub_channels"] == 1
        assert vsp.stats()["sub_channels"] == 0
    backend.close()
