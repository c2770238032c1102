"""The IC VSPs on real rings, the worker played by IcHarness (its clock moved
by the test, never slept), the guest by the sans-I/O IcClient: heartbeats,
shutdown and KVP through `control`, time samples, and hostile guests."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ic_support import IcHarness, control

from vmbus import handoff
from vmbus.channel import VM_PKT_COMP
from vmbus.errors import UsageError
from vmbus.protocols.ic import IcClient, MessageType, Status
from vmbus.protocols.ic import wire as w
from vsc.ic import KvpStore
from vsp.ic import HeartbeatVsp, KvpVsp, ShutdownVsp, TimeSyncVsp, integration_services


def beat(harness: IcHarness, client: IcClient, answer: bool = True) -> int:
    """The host's next beat; the guest answers it (seq + 1) if `answer`."""
    trans_id, request = harness.request(client)
    seq = w.HeartbeatData.unpack_from(request.body).seq_num
    if answer:
        harness.answer(trans_id, request.answer(body=w.HeartbeatData(seq + 1).pack()[:8]))
    return seq


def test_heartbeat_beats_and_counts() -> None:
    vsp = HeartbeatVsp(interval=1.0)
    assert vsp.stats()["state"] == "no contact"
    with IcHarness(vsp) as harness:
        client = harness.negotiate()
        for expected in range(3):
            assert beat(harness, client) == expected
            harness.advance(1.0)
        stats = vsp.stats()
        assert (stats["state"], stats["seq"], stats["beats"], stats["misses"]) == ("ok", 3, 3, 0)
        assert stats["version"] == "3.0" and json.loads(json.dumps(stats)) == stats


def test_guest_that_stops_answering_beats_is_lost_then_ok_again() -> None:
    vsp = HeartbeatVsp(interval=1.0, timeout=2.0)
    with IcHarness(vsp) as harness:
        client = harness.negotiate()
        beat(harness, client)
        harness.advance(1.0)
        beat(harness, client, answer=False)
        harness.advance(2.0)  # the timeout
        assert vsp.stats()["state"] == "lost" and vsp.misses == 1 and vsp.timeouts == 1
        harness.advance(1.0)  # beats go on: a guest that comes back is seen
        beat(harness, client)
        assert vsp.stats()["state"] == "ok" and not harness.closed


def test_guest_that_never_answers_the_negotiation_stays_no_contact() -> None:
    vsp = HeartbeatVsp(interval=1.0, timeout=2.0)
    with IcHarness(vsp) as harness:
        harness.advance()
        assert len(harness.sent()) == 1
        harness.advance(5.0)
        assert vsp.stats()["state"] == "no contact" and vsp.timeouts == 1
        assert vsp.stats()["negotiation"] == "negotiating" and harness.sent() == []


def test_heartbeat_answered_with_the_wrong_sequence_number_fails_the_channel() -> None:
    vsp = HeartbeatVsp()
    with IcHarness(vsp) as harness:
        client = harness.negotiate()
        trans_id, request = harness.request(client)
        harness.answer(trans_id, request.answer(body=w.HeartbeatData(77).pack()))
        assert harness.closed and "answered 77" in (harness.failure or "")
        assert vsp.bad_answers == 1 and harness.context.peer_log.count == 1


def test_garbage_answer_is_counted_and_fails_the_channel_alone() -> None:
    vsp = KvpVsp()
    with IcHarness(vsp) as harness:
        harness.negotiate()
        replies = control(vsp, {"op": "get", "pool": 0, "key": "k"})
        ((trans_id, _),) = harness.sent()
        harness.answer(trans_id, b"\xff" * 13)
        assert harness.closed and vsp.bad_answers == 1
        assert replies and "answered badly" in replies[0]["error"]


def test_answer_with_a_wrong_transaction_id_fails_the_channel() -> None:
    vsp = ShutdownVsp()
    with IcHarness(vsp) as harness:
        client = harness.negotiate()
        replies = control(vsp, {"op": "shutdown"})
        trans_id, request = harness.request(client)
        harness.answer(trans_id + 5, request.answer())
        assert harness.closed and vsp.bad_answers == 1
        assert "was not asked" in replies[0]["error"]


def test_answer_as_a_completion_fails_the_channel() -> None:
    vsp = ShutdownVsp()
    with IcHarness(vsp) as harness:
        harness.advance()
        ((trans_id, _),) = harness.sent()
        harness.guest.send(b"", type=VM_PKT_COMP, trans_id=trans_id)
        harness.serve()
        assert harness.closed and "not an inband answer" in (harness.failure or "")


def test_guest_that_never_answers_a_shutdown_fails_the_request_not_the_channel() -> None:
    vsp = ShutdownVsp(timeout=3.0)
    with IcHarness(vsp) as harness:
        client = harness.negotiate()
        replies = control(vsp, {"op": "shutdown", "reason": "patching"})
        trans_id, request = harness.request(client)
        harness.advance(3.0)
        assert replies == [{"error": "the guest did not answer within 3 s"}]
        harness.answer(trans_id, request.answer())  # at last: late, not hostile
        assert not harness.closed and harness.handler.server.late == 1
        assert control(vsp, {"op": "shutdown"}) == []  # the next request may go


def test_shutdown_request_and_the_guests_answer() -> None:
    vsp = ShutdownVsp()
    with IcHarness(vsp) as harness:
        client = harness.negotiate()
        assert harness.handler.server.message == (3, 2)
        replies = control(
            vsp, {"op": "shutdown", "reboot": True, "force": True, "reason": "kernel update"}
        )
        trans_id, request = harness.request(client)
        data = w.ShutdownData.unpack_from(request.body)
        assert data.flags == w.ShutdownFlags.REBOOT | w.ShutdownFlags.FORCE
        assert data.display_message.startswith("kernel update\0".encode("utf-16-le"))
        assert data.reason_code == w.SHTDN_REASON_FLAG_PLANNED
        harness.answer(trans_id, request.answer(Status.E_FAIL))
        assert replies == [{"accepted": False, "status": Status.E_FAIL}]
        assert vsp.stats()["refused"] == 1


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        ({"op": "reboot"}, "takes op 'shutdown'"),
        ({"op": "shutdown", "reboot": "yes"}, "true or false"),
        ({"op": "shutdown", "reason": 5}, "a string"),
        ({"op": "shutdown", "reason": "x" * 1024}, "at most 1023"),
        ({"op": "shutdown", "timeout_seconds": -1}, "whole number"),
    ],
)
def test_bad_shutdown_requests_are_the_callers_error(
    request_: dict[str, object], match: str
) -> None:
    vsp = ShutdownVsp()
    with IcHarness(vsp) as harness:
        harness.negotiate()
        with pytest.raises(UsageError, match=match):
            vsp.control(request_, lambda reply: None)


def test_shutdown_without_a_guest_service_is_an_error() -> None:
    vsp = ShutdownVsp()
    with pytest.raises(UsageError, match="no shutdown service open"):
        vsp.control({"op": "shutdown"}, lambda reply: None)
    with IcHarness(vsp) as harness:
        harness.advance()  # negotiating
        with pytest.raises(UsageError, match="negotiating"):
            vsp.control({"op": "shutdown"}, lambda reply: None)
    with pytest.raises(UsageError, match="no shutdown service open"):
        vsp.control({"op": "shutdown"}, lambda reply: None)


def test_a_second_request_while_one_is_outstanding_is_refused() -> None:
    vsp = KvpVsp()
    with IcHarness(vsp) as harness:
        harness.negotiate()
        control(vsp, {"op": "get", "key": "a"})
        with pytest.raises(UsageError, match="one at a time"):
            vsp.control({"op": "get", "key": "b"}, lambda reply: None)


def test_a_request_outstanding_when_the_channel_closes_is_answered() -> None:
    vsp = KvpVsp()
    with IcHarness(vsp) as harness:
        harness.negotiate()
        replies = control(vsp, {"op": "get", "key": "a"})
        harness.close()
        assert replies == [{"error": "the guest's KVP channel closed"}]


def kvp_guest(harness: IcHarness, client: IcClient, store: dict[str, str]) -> None:
    """Answer the host's KVP requests from `store` as a guest would."""
    for trans_id, payload in harness.sent():
        _, request = client.receive(payload)
        assert request is not None
        header = w.KvpHeader.unpack_from(request.body)
        if header.operation == w.KvpOp.SET:
            data = w.kvp_value_at(request.body, header.operation)
            store[w.decode_utf16(data.key, data.key_size, "key")] = w.kvp_value_text(data)
            harness.answer(trans_id, request.answer())
        elif header.operation == w.KvpOp.ENUMERATE:
            pairs = list(store.items())
            index = w.kvp_index(request.body)
            if index >= len(pairs):
                harness.answer(trans_id, request.answer(Status.S_CONT))
            else:
                value = w.make_kvp_value(*pairs[index]).pack()
                harness.answer(trans_id, request.answer(body=request.body[:8] + value))
        else:
            data = w.kvp_value_at(request.body, header.operation)
            key = w.decode_utf16(data.key, data.key_size, "key")
            if key not in store:
                harness.answer(trans_id, request.answer(Status.S_CONT))
            else:
                value = w.make_kvp_value(key, store[key]).pack()
                harness.answer(trans_id, request.answer(body=request.body[:4] + value))


def test_kvp_set_get_and_enumerate() -> None:
    vsp, store = KvpVsp(), {"os": "linux"}
    with IcHarness(vsp) as harness:
        client = harness.negotiate()
        assert harness.handler.server.message == (4, 0)
        replies = control(vsp, {"op": "set", "pool": 0, "key": "vm", "value": "ünïcode ✓"})
        kvp_guest(harness, client, store)
        assert replies == [{"ok": True, "status": 0}] and store["vm"] == "ünïcode ✓"
        replies = control(vsp, {"op": "get", "pool": 0, "key": "vm"})
        kvp_guest(harness, client, store)
        assert replies == [{"value": "ünïcode ✓", "status": 0}]
        replies = control(vsp, {"op": "get", "pool": 0, "key": "missing"})
        kvp_guest(harness, client, store)
        assert replies == [{"value": None, "status": Status.S_CONT}]
        replies = control(vsp, {"op": "enumerate", "pool": 0})
        while not replies:
            kvp_guest(harness, client, store)
        assert replies == [{"items": [["os", "linux"], ["vm", "ünïcode ✓"]]}]
        assert vsp.stats()["operations"] == {"get": 2, "set": 1, "delete": 0, "enumerate": 1}


def test_kvp_answer_for_another_pool_fails_the_channel() -> None:
    vsp = KvpVsp()
    with IcHarness(vsp) as harness:
        client = harness.negotiate()
        replies = control(vsp, {"op": "get", "pool": 1, "key": "k"})
        trans_id, request = harness.request(client)
        harness.answer(trans_id, request.answer(body=w.KvpHeader(w.KvpOp.GET, 2).pack()))
        assert harness.closed and "asked 0 1" in replies[0]["error"]


def test_kvp_value_the_guest_cannot_mean_fails_the_channel() -> None:
    vsp = KvpVsp()
    with IcHarness(vsp) as harness:
        client = harness.negotiate()
        replies = control(vsp, {"op": "get", "key": "k"})
        trans_id, request = harness.request(client)
        bad = w.KvpValue(w.RegType.SZ, 4, 9999, b"k\0", b"").pack()
        harness.answer(trans_id, request.answer(body=request.body[:4] + bad))
        assert harness.closed and vsp.bad_answers == 1 and "size 9999" in replies[0]["error"]


def test_enumerate_of_a_guest_that_never_ends_is_bounded() -> None:
    vsp = KvpVsp()
    with IcHarness(vsp) as harness:
        client = harness.negotiate()
        replies = control(vsp, {"op": "enumerate", "pool": 2})
        while not replies:
            trans_id, request = harness.request(client)
            value = w.make_kvp_value("same", "again").pack()
            harness.answer(trans_id, request.answer(body=request.body[:8] + value))
        assert len(replies[0]["items"]) == 1024 and replies[0]["truncated"]


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        ({"op": "frob"}, "one of"),
        ({"op": "get", "pool": 5, "key": "k"}, "pool is 0..4"),
        ({"op": "get", "pool": True, "key": "k"}, "pool is 0..4"),
        ({"op": "get"}, "needs a key"),
        ({"op": "get", "key": "k" * 256}, "at most 255"),
        ({"op": "set", "key": "k", "value": "v" * 1024}, "at most 1023"),
        ({"op": "set", "key": "k\0", "value": ""}, "NUL"),
        ({"op": "set", "key": 3, "value": ""}, "strings"),
    ],
)
def test_bad_kvp_requests_are_the_callers_error(request_: dict[str, object], match: str) -> None:
    vsp = KvpVsp()
    with IcHarness(vsp) as harness:
        harness.negotiate()
        with pytest.raises(UsageError, match=match):
            vsp.control(request_, lambda reply: None)
        assert harness.sent() == []


def test_time_sync_sends_a_sync_then_samples() -> None:
    vsp = TimeSyncVsp(interval=5.0, offset=60.0)
    with IcHarness(vsp) as harness:
        client = harness.negotiate()
        flags = []
        for _ in range(3):
            trans_id, request = harness.request(client)
            sample = w.TimeSyncRefData.unpack_from(request.body)
            flags.append(sample.flags)
            harness.answer(trans_id, request.answer())
            harness.advance(5.0)
        assert flags == [w.TimeSyncFlags.SYNC, w.TimeSyncFlags.SAMPLE, w.TimeSyncFlags.SAMPLE]
        stats = vsp.stats()
        assert (stats["samples"], stats["answered"]) == (4, 3)  # the fourth is out
        assert abs(stats["last_offset"] - 60.0) < 1.0


def test_time_sync_before_version_4_sends_ictimesync_data() -> None:
    vsp = TimeSyncVsp()
    with IcHarness(vsp) as harness:
        client = harness.negotiate(IcClient(MessageType.TIMESYNC, ((3, 0),)))
        _, request = harness.request(client)
        assert request.header.msgsize == w.TimeSyncData.SIZE


def test_the_worker_copy_starts_without_a_channel_and_counts_there() -> None:
    services = integration_services(heartbeat={"interval": 0.5})
    copies = [handoff.loads(*handoff.dumps(vsp)) for vsp in services]
    assert [type(c) for c in copies] == [HeartbeatVsp, ShutdownVsp, TimeSyncVsp, KvpVsp]
    assert all(c.handler is None for c in copies) and copies[0].interval == 0.5
    assert [c.offers() for c in copies] == [s.offers() for s in services]
    with pytest.raises(UsageError, match="no integration service"):
        integration_services(vss={})


keys = st.text("abç", min_size=1, max_size=3)
values = st.text(st.characters(blacklist_characters="\0", blacklist_categories=["Cs"]), max_size=12)
kvp_ops = st.lists(
    st.tuples(
        st.sampled_from(["get", "set", "delete", "enumerate"]), st.integers(0, 4), keys, values
    ),
    max_size=16,
)


@settings(max_examples=40, deadline=None)
@given(kvp_ops)
def test_host_kvp_ops_on_the_guests_store_act_as_a_dict(
    ops: list[tuple[str, int, str, str]],
) -> None:
    """The parent's KVP requests against vsc.ic's store, the guest's side of
    Linux's daemon, agree with five plain dicts."""
    vsp, store = KvpVsp(), KvpStore()
    model: list[dict[str, str]] = [{} for _ in range(5)]
    client = IcClient(MessageType.KVP_EXCHANGE, w.KVP_VERSIONS, receive_limit=w.KVP_RECEIVE_LIMIT)
    with IcHarness(vsp) as harness:
        harness.negotiate(client)
        for op, pool, key, value in ops:
            replies = control(vsp, {"op": op, "pool": pool, "key": key, "value": value})
            while not replies:
                for trans_id, payload in harness.sent():
                    _, request = client.receive(payload)
                    assert request is not None
                    harness.answer(trans_id, store.answer(request))
            (reply,) = replies
            pairs = model[pool]
            if op == "get":
                assert reply["value"] == pairs.get(key)
            elif op == "set":
                assert reply["ok"]
                pairs[key] = value
            elif op == "delete":
                assert reply["ok"] == (pairs.pop(key, None) is not None)
            else:
                assert reply == {"items": [list(item) for item in pairs.items()]}
        assert [dict(store.items(pool)) for pool in range(5)] == model
        assert not harness.closed and vsp.bad_answers == 0


def test_heartbeat_channel_closed_after_contact_is_lost_and_before_it_no_contact() -> None:
    vsp = HeartbeatVsp()
    with IcHarness(vsp) as harness:
        harness.advance()
    assert vsp.stats()["state"] == "no contact"
    with IcHarness(vsp) as harness:
        client = harness.negotiate()
        beat(harness, client)
    assert vsp.stats()["state"] == "lost" and not vsp.stats()["open"]
