"""vRSS: a child asks for a sub-channel as Linux's netvsc does (the RSS
capabilities, NVSP SUBCHANNEL, the send indirection table), and its sends
spread over both channels, each served in the worker by a thread of its
own; the frames all reach the backend, none refused."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import netns

from tests.net.test_net_e2e import adapter
from vmbus.guest import Guest
from vmbus.partition import Host
from vmbus.testing import ethernet as eth
from vsp.net import NetVsp, NullBackend, TapBackend

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


@pytest.fixture
def tap() -> Iterator[TapBackend]:
    name = f"nbvr{os.getpid()}"
    try:
        with TapBackend(netns=name, address="10.205.0.1/24", create_netns=True) as backend:
            yield backend
    finally:
        if name in netns.listnetns():
            netns.remove(name)


@pytest.mark.requires_root
def test_sub_channel_sends_take_the_compiled_path_to_a_tap(tap: TapBackend, tmp_path: Path) -> None:
    run(NetVsp(tap, mac=MAC, channels=2), tmp_path)
    assert tap.frames_out == BATCHES * BATCH and tap.drops == 0
