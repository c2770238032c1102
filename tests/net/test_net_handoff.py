"""netvsp and its backends handed to a VM's worker (`vmbus.handoff`): the
copy works the descriptors the parent opened (the TAP device, the capture
file), the parent's link changes reach it, and `NetVsp.stats` counts there."""

from __future__ import annotations

import os
import select
import struct
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pyroute2 import netns

from vmbus import handoff
from vmbus.testing import VspHarness
from vmbus.testing import ethernet as eth
from vsp.net import NetVsp, NullBackend, PcapCapture, TapBackend

T = TypeVar("T")
MAC = bytes.fromhex("020000000e01")


def round_trip(obj: T) -> T:
    data, fds = handoff.dumps(obj)
    copy: T = handoff.loads(data, [os.dup(fd) for fd in fds])  # the worker's own descriptors
    return copy


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_null_backend_copy_has_its_own_descriptor_and_sees_the_parents_link() -> None:
    with NullBackend(mac=MAC) as parent:
        copy = round_trip(parent)
        with copy:
            assert copy.fileno() not in (-1, parent.fileno()) and copy.mac == MAC
            changes: list[bool] = []
            copy.on_link_change = changes.append
            assert not readable(copy.link_fileno())
            parent.set_link(False)
            assert readable(copy.link_fileno())
            copy.poll_link()
            assert changes == [False] and not copy.link_up
            assert copy.send([bytes(60)]) == 0 and copy.drops == 1  # the link is down there
            parent.set_link(True)
            parent.set_link(False)
            parent.set_link(True)
            copy.poll_link()  # only the last state counts
            assert changes == [False, True] and copy.link_up and not readable(copy.link_fileno())


def test_link_cell_made_at_pickling_keeps_a_link_already_down() -> None:
    with NullBackend() as parent:
        parent.set_link(False)
        with round_trip(parent) as copy:
            copy.poll_link()
            assert not copy.link_up


def test_netvsp_copy_serves_and_counts_in_stats() -> None:
    parent = NetVsp(NullBackend(mac=MAC))
    copy = round_trip(parent)
    assert copy.mac == parent.mac and copy.instance_id == parent.instance_id
    assert copy.sections == parent.sections and copy.mtu == parent.mtu
    with VspHarness(copy) as harness:
        assert copy.handler is harness.handler
        assert harness.context is not None
        stats = copy.stats()
        assert stats["frames_from_guest"] == 0 and stats["link_up"] is True
        parent.backend.set_link(False)  # after "start": reaches the worker's copy
        harness.pump()
        assert copy.stats()["link_up"] is False
    parent.backend.close()
    copy.backend.close()


def test_netvsp_stats_are_json_able() -> None:
    import json

    vsp = NetVsp(NullBackend(mac=MAC))
    with VspHarness(vsp):
        stats: dict[str, Any] = vsp.stats()
        assert json.loads(json.dumps(stats)) == stats
        assert set(stats) >= {"frames_from_guest", "bytes_to_guest", "refused", "backend_drops"}
    vsp.backend.close()


def test_pcap_copy_writes_on_in_the_parents_file(tmp_path: Path) -> None:
    path = tmp_path / "capture.pcap"
    frame = eth.ethernet(eth.BROADCAST, MAC, 0x88B5, b"x" * 46)
    parent = PcapCapture(NullBackend(mac=MAC), path)
    parent.send([frame])
    copy = round_trip(parent)
    assert copy.fast_fd() == -1  # every frame passes through the capture
    copy.send([frame, frame])
    copy.close()
    parent.close()
    data = path.read_bytes()
    assert data.count(frame) == 3 and struct.unpack_from("<I", data)[0] == 0xA1B2C3D4


@pytest.mark.requires_root
def test_tap_copy_works_the_parents_device_and_leaves_its_namespace(tap: TapBackend) -> None:
    copy = round_trip(tap)
    assert copy.fast_fd() == copy.fileno() != tap.fileno() and copy.name == tap.name
    arp = eth.ethernet(
        eth.BROADCAST,
        MAC,
        0x0806,
        bytes.fromhex("0001080006040001")
        + MAC
        + bytes([10, 203, 0, 2])
        + bytes(6)
        + bytes([10, 203, 0, 1]),
    )
    assert copy.send([arp]) == 1 and copy.frames_out == 1 and tap.frames_out == 0
    ready = select.select([copy.fileno()], [], [], 3.0)[0]
    assert ready  # the kernel answers on the device both descriptors share
    copy.close()  # the worker's copy goes first: the device and namespace stay
    assert tap.netns in netns.listnetns()
    assert tap.send([arp]) == 1


# --- in a real worker process (the default Host.start) ---


def link_watcher(guest: Any, workdir: str) -> None:
    """Child: send 10 frames, say so, then wait for the parent's link down and up."""
    from pathlib import Path

    from tests.net.test_net_e2e import adapter

    nic = adapter(guest)
    frame = eth.ethernet(eth.BROADCAST, nic.mac, 0x88B5, b"x" * 46)
    nic.send_batch([frame] * 10)
    while nic.sending:
        nic._pump(10.0)
    Path(workdir, "sent").write_text("1")
    nic.wait_link(False, timeout=20)
    Path(workdir, "down").write_text("1")
    nic.wait_link(True, timeout=20)
    nic.close()


def test_worker_process_counts_and_sees_the_parents_link_changes(tmp_path: Path) -> None:
    import time

    from vmbus.partition import Host

    backend = NullBackend(mac=MAC)
    vsp = NetVsp(backend, mac=MAC)
    with Host() as host:
        child = host.start(link_watcher, devices=[vsp], args=(str(tmp_path),))
        deadline = time.monotonic() + 30
        while not (tmp_path / "sent").exists():
            assert time.monotonic() < deadline and child.wait(timeout=0.05) is None
        (stats,) = child.device_stats()
        assert stats["frames_from_guest"] == 10 and stats["backend_frames_out"] == 10
        assert backend.frames_out == 0  # the parent's copy moved nothing: the worker's did
        backend.set_link(False)  # the parent's object, after start
        while not (tmp_path / "down").exists():  # the child saw it before it comes back up
            assert time.monotonic() < deadline and child.wait(timeout=0.05) is None
        backend.set_link(True)
        assert child.wait(timeout=30) == 0
    backend.close()
