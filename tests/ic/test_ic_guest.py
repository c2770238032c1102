"""The integration services end to end: the guest's drivers (vsc.ic) against
the VSPs served by a real worker, in this process (loopback) and in a child
process whose VSPs run in a worker process of their own (`Host.start`),
the parent asking through `ChildPartition.control`."""

from __future__ import annotations

import sys
import threading
from typing import Any

import pytest

from vmbus.channel import VM_PKT_DATA_INBAND
from vmbus.guest import Guest
from vmbus.partition import ControlError, Host, wait_until
from vmbus.protocols.ic import IcServer, KvpPool, MessageType
from vmbus.protocols.ic import wire as w
from vmbus.testing import loopback
from vmbus.testing.rings import channel_pair
from vsc.ic import Heartbeat, IntegrationServices
from vsp.ic import ShutdownVsp, integration_services

HEARTBEAT, SHUTDOWN, TIMESYNC, KVP = range(4)  # integration_services' order
FAST = {"heartbeat": {"interval": 0.05}, "timesync": {"interval": 0.1, "offset": 30.0}}


def test_guest_drivers_answer_every_service_in_process() -> None:
    vsps = integration_services(**FAST)
    bound: dict[str, IntegrationServices] = {}

    def register(guest: Guest) -> None:
        bound["ic"] = IntegrationServices(guest)

    with loopback(vsps, register) as (_, partition):
        ic = bound["ic"]
        ic.wait_open()
        assert ic.heartbeat and ic.kvp and ic.timesync and ic.shutdown
        assert wait_until(lambda: vsps[HEARTBEAT].beats >= 3, 30), vsps[HEARTBEAT].stats()
        assert wait_until(lambda: ic.timesync is not None and ic.timesync.synced.is_set(), 30)
        assert ic.timesync.offset is not None and abs(ic.timesync.offset - 30.0) < 5.0
        assert partition.control(KVP, {"op": "set", "pool": 0, "key": "k", "value": "v"}) == {
            "ok": True,
            "status": 0,
        }
        assert ic.kvp.get(KvpPool.EXTERNAL, "k") == "v"
        ic.kvp.set(KvpPool.GUEST, "hostname", "lo")
        items = partition.control(KVP, {"op": "enumerate", "pool": 1})
        assert items == {"items": [["hostname", "lo"]]}
        assert partition.control(KVP, {"op": "delete", "pool": 1, "key": "hostname"})["ok"]
        answer = partition.control(SHUTDOWN, {"op": "shutdown", "reboot": True, "reason": "r"})
        assert answer == {"accepted": True, "status": 0}
        request = ic.shutdown.wait(10)
        assert request is not None and request.reboot and request.reason == "r"
        ic.heartbeat.answering = False  # a hung guest: the beats go unanswered
        assert wait_until(lambda: vsps[HEARTBEAT].stats()["state"] == "lost", 30)
        assert all(vsp.bad_answers == 0 for vsp in vsps) and ic.kvp.errors == 0
        ic.close()


def ic_child(guest: Guest) -> None:
    """A child program: its integration services, a KVP pair of its own, and
    an exit when the host asks it to shut down."""
    ic = IntegrationServices(guest)
    ic.wait_open()
    assert ic.kvp is not None and ic.shutdown is not None
    ic.kvp.set(KvpPool.GUEST, "guest", "ic-child")
    request = ic.shutdown.wait(60)
    ic.close()
    sys.exit(0 if request is not None and request.reason == "done" else 5)


def stats_of(child: Any, device: int) -> dict[str, Any]:
    stats: dict[str, Any] = child.device_stats()[device]
    return stats


def test_child_process_heartbeat_kvp_and_shutdown_through_control() -> None:
    with Host() as host:
        child = host.start(ic_child, devices=integration_services(**FAST))
        try:
            assert wait_until(lambda: stats_of(child, HEARTBEAT)["state"] == "ok", 60)
            assert wait_until(lambda: stats_of(child, KVP)["negotiation"] == "ready", 60)
            set_ = {"op": "set", "pool": 0, "key": "role", "value": "web"}
            assert child.control(KVP, set_) == {"ok": True, "status": 0}
            get = {"op": "get", "pool": 1, "key": "guest"}
            assert wait_until(lambda: child.control(KVP, get).get("value") == "ic-child", 30)
            assert child.control(KVP, {"op": "get", "pool": 0, "key": "role"})["value"] == "web"
            answer = child.control(SHUTDOWN, {"op": "shutdown", "reason": "done"})
            assert answer == {"accepted": True, "status": 0}
            assert child.wait(60) == 0
        finally:
            child.kill()


class FakeDevice:
    """Enough of a GuestDevice for a service: `open` hands it the guest's
    end of an in-process channel pair; the test holds the host's."""

    def __init__(self) -> None:
        self.guest, self.host = channel_pair(w.RING_SIZE, spin_seconds=0.0)

    def open(self, *args: object, **kwargs: object) -> Any:
        self.guest.close = lambda *a: None  # type: ignore[method-assign]
        return self.guest


def test_host_that_sends_garbage_is_dropped_and_counted_and_the_next_beat_answered() -> None:
    device = FakeDevice()
    heartbeat = Heartbeat(device)  # type: ignore[arg-type]
    try:
        server = IcServer(MessageType.HEARTBEAT, w.HEARTBEAT_VERSIONS)
        device.host.send(b"\xee" * 40, type=VM_PKT_DATA_INBAND, trans_id=99)  # garbage
        trans_id, payload = server.negotiate()
        device.host.send(payload, type=VM_PKT_DATA_INBAND, trans_id=trans_id)
        answer = device.host.receive(timeout=30)
        assert answer.trans_id == trans_id and heartbeat.errors == 1
        server.receive(answer.payload, answer.trans_id)
        trans_id, payload = server.request(w.HeartbeatData(7).pack())
        device.host.send(payload, type=VM_PKT_DATA_INBAND, trans_id=trans_id)
        answer = device.host.receive(timeout=30)
        ic_answer = server.receive(answer.payload, answer.trans_id)
        assert ic_answer is not None
        assert w.HeartbeatData.unpack_from(ic_answer.body).seq_num == 8
    finally:
        heartbeat.close()


def test_guest_that_never_answers_is_a_control_error_with_the_reason() -> None:
    vsps = [ShutdownVsp(timeout=0.5)]
    release = threading.Event()
    bound: dict[str, IntegrationServices] = {}

    def hang(reboot: bool, reason: str) -> bool:
        return release.wait(30)  # the guest hangs in its shutdown handler

    def register(guest: Guest) -> None:
        bound["ic"] = IntegrationServices(guest, on_shutdown=hang)

    with loopback(vsps, register) as (_, partition):
        bound["ic"].wait_open()
        assert wait_until(lambda: vsps[0].stats()["negotiation"] == "ready", 30)
        with pytest.raises(ControlError, match="did not answer within 0.5 s"):
            partition.control(0, {"op": "shutdown"})
        release.set()
        assert wait_until(lambda: vsps[0].stats()["late"] == 1, 30)  # late, not hostile
        assert vsps[0].bad_answers == 0 and len(partition.channels) == 1
        bound["ic"].close()
