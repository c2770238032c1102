"""A VM's worker killed under the service: that VM alone is reported
crashed, the others keep serving verified traffic, and the crashed one
starts again through the API. Devices hot-added and removed under traffic.
And a service that runs VMs for ever holds what it held."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from vmms_support import Service, define, requests_of, wait_for

from vmbus.vmms.client import Client

CYCLES = 200


def test_a_worker_killed_is_reported_crashed_and_its_siblings_keep_serving(
    service: Service,
) -> None:
    client = service.client
    names = ["a", "b", "c"]
    for name in names:
        define(client, name)
        client.start(name, wait_devices=30)
    victim = client.status("b")
    os.kill(victim["worker_pid"], signal.SIGKILL)
    assert wait_for(lambda: client.status("b")["state"] == "crashed")
    # The others go on: each disk write is read back and compared in the
    # guest, which ends with an error on a mismatch.
    for name in ("a", "c"):
        before = requests_of(client, name)
        assert wait_for(lambda n=name, b=before: requests_of(client, n) > b + 200)
        assert client.status(name)["state"] == "running"
    again = client.start("b", wait_devices=30)
    assert again["state"] == "running" and again["starts"] == 2
    assert again["worker_pid"] != victim["worker_pid"]
    assert wait_for(lambda: requests_of(client, "b") > 200)
    for name in names:
        assert client.shutdown(name, wait=30)["state"] == "exited"
        assert client.status(name)["exitcode"] == 0  # no disk ever gave back wrong bytes


def test_a_disk_hot_added_and_removed_under_traffic(service: Service) -> None:
    client = service.client
    define(client, "hot")
    client.start("hot", wait_devices=30)
    for cycle in range(3):
        name = f"scratch{cycle}"
        client.add_device("hot", {"kind": "ramdisk", "name": name, "size_mb": 2})
        assert wait_for(lambda n=name: requests_of(client, "hot", n) > 50)
        before = requests_of(client, "hot")
        client.remove_device("hot", name)
        status = client.status("hot")
        assert all(device["name"] != name for device in status["devices"])
        assert wait_for(lambda: client.status("hot")["bus"]["offered"] == 5)  # released
        assert wait_for(lambda b=before: requests_of(client, "hot") > b + 50)  # the first disk
    assert client.shutdown("hot", wait=30)["state"] == "exited"
    assert client.status("hot")["exitcode"] == 0


def test_200_create_start_stop_cycles_hold_the_services_resources(
    service: Service, tmp_path: Path
) -> None:
    client = service.client
    disk = {"kind": "disk", "path": str(tmp_path / "disk.img"), "size_mb": 1}
    devices = [disk, {"kind": "echo"}, {"kind": "heartbeat"}, {"kind": "net"}]

    def cycle(index: int) -> None:
        name = f"vm{index}"
        client.create({"name": name, "devices": devices})
        assert client.start(name, wait_devices=0)["state"] in ("starting", "running")
        assert client.stop(name, timeout=5)["state"] == "stopped"
        client.delete(name)

    for index in range(20):  # warm up: the pool's threads, the allocator's arenas
        cycle(index)
    baseline = service.resources()
    for index in range(20, CYCLES):
        cycle(index)
    assert client.list() == []

    def settled() -> bool:  # the switch reaps a hung-up port on its own thread
        after = service.resources()
        return (
            after["fds"] <= baseline["fds"]
            and after["threads"] <= baseline["threads"]
            and after["rss_kib"] < baseline["rss_kib"] + 8 * 1024
        )

    assert wait_for(settled, 30), (baseline, service.resources())


def test_an_integration_service_removed_is_released_by_the_guest(service: Service) -> None:
    client = service.client
    define(client, "ic")
    client.start("ic", wait_devices=30)
    assert client.kvp("ic", "set", "k", "v")["ok"]
    client.remove_device("ic", "kvp")
    assert wait_for(lambda: client.status("ic")["bus"]["offered"] == 4)  # released
    client.add_device("ic", {"kind": "kvp"})
    assert wait_for(lambda: kvp_ready(client))  # the guest took it up and negotiated
    assert client.kvp("ic", "get", "k")["value"] == "v"  # the guest's pool outlived the channel
    assert client.shutdown("ic", wait=30)["state"] == "exited"


def kvp_ready(client: Client) -> bool:
    devices = client.status("ic")["devices"]
    kvp = next(d for d in devices if d["kind"] == "kvp")
    return bool(kvp.get("counters", {}).get("negotiation") == "ready")
