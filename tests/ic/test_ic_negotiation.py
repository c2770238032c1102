"""The IC state machines of both sides, sans-I/O: version negotiation with
any version lists (the guest picks as vmbus_prep_negotiate_resp does), one
request at a time, and the answers a host refuses."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmbus.errors import UsageError
from vmbus.protocols.ic import (
    HEARTBEAT_VERSIONS,
    IcClient,
    IcClientError,
    IcProtocolError,
    IcServer,
    IcState,
    MessageType,
    Status,
    choose_version,
)
from vmbus.protocols.ic import wire as w

version = st.tuples(st.integers(0, 4), st.integers(0, 3))
versions = st.lists(version, min_size=1, max_size=5, unique=True).map(tuple)
guest_versions = st.lists(version, max_size=5, unique=True).map(tuple)


def negotiated(server: IcServer, client: IcClient) -> None:
    trans_id, request = server.negotiate()
    answer, _ = client.receive(request)
    assert answer is not None
    assert server.receive(answer, trans_id) is None


@given(versions, versions, guest_versions, guest_versions)
def test_negotiation_picks_the_guests_first_version_the_host_offered(
    host_fw: tuple[w.Version, ...],
    host_msg: tuple[w.Version, ...],
    guest_fw: tuple[w.Version, ...],
    guest_msg: tuple[w.Version, ...],
) -> None:
    server = IcServer(MessageType.SHUTDOWN, host_msg, host_fw)
    client = IcClient(MessageType.SHUTDOWN, guest_msg, guest_fw)
    negotiated(server, client)
    framework, message = (
        choose_version(list(host_fw), guest_fw),
        choose_version(list(host_msg), guest_msg),
    )
    if framework is None or message is None:
        assert server.state == IcState.UNSUPPORTED and client.message is None
        with pytest.raises(UsageError):
            server.request(b"")
    else:
        assert server.state == IcState.READY
        assert (server.framework, server.message) == (framework, message)
        assert (client.framework, client.message) == (framework, message)


def test_linux_and_our_host_agree_on_the_newest_versions() -> None:
    for msgtype, ours in [
        (MessageType.HEARTBEAT, w.HEARTBEAT_VERSIONS),
        (MessageType.SHUTDOWN, w.SHUTDOWN_VERSIONS),
        (MessageType.TIMESYNC, w.TIMESYNC_VERSIONS),
        (MessageType.KVP_EXCHANGE, w.KVP_VERSIONS),
    ]:
        server, client = IcServer(msgtype, ours), IcClient(msgtype, ours)
        negotiated(server, client)
        assert server.framework == (3, 0) and server.message == ours[0]


def ready_pair() -> tuple[IcServer, IcClient]:
    server = IcServer(MessageType.HEARTBEAT, HEARTBEAT_VERSIONS)
    client = IcClient(MessageType.HEARTBEAT, HEARTBEAT_VERSIONS)
    negotiated(server, client)
    return server, client


def test_a_request_and_its_answer() -> None:
    server, client = ready_pair()
    trans_id, payload = server.request(w.HeartbeatData(41).pack())
    _, request = client.receive(payload)
    assert request is not None and request.header.flags == w.REQUEST_FLAGS
    answer = server.receive(request.answer(body=w.HeartbeatData(42).pack()), trans_id)
    assert answer is not None and answer.status == Status.S_OK
    assert w.HeartbeatData.unpack_from(answer.body).seq_num == 42


def test_one_request_is_outstanding_at_most() -> None:
    server, _ = ready_pair()
    server.request(b"\0" * 40)
    with pytest.raises(UsageError, match="one request outstanding"):
        server.request(b"\0" * 40)


def test_guest_that_answers_after_the_timeout_is_late_not_hostile() -> None:
    server, client = ready_pair()
    trans_id, payload = server.request(w.HeartbeatData(1).pack())
    assert server.expire() is not None
    _, request = client.receive(payload)
    assert request is not None
    assert server.receive(request.answer(), trans_id) is None
    assert server.late == 1
    server.request(w.HeartbeatData(2).pack())  # the next one may go


def answer_of(server: IcServer, client: IcClient) -> tuple[int, bytes]:
    trans_id, payload = server.request(w.HeartbeatData(1).pack())
    _, request = client.receive(payload)
    assert request is not None
    return trans_id, request.answer()


def rewrite(payload: bytes, **fields: int) -> bytes:
    header = w.IcHeader.unpack_from(payload, w.PIPE_HEADER_SIZE)
    values = {**header.__dict__, **fields}
    return payload[:8] + w.IcHeader(**values).pack() + payload[w.ICMSG_HDR :]


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda p, t: (p, t + 1), "not asked"),  # a wrong VMBus transaction id
        (lambda p, t: (rewrite(p, transaction_id=99), t), "id 99"),  # a wrong IC id
        (lambda p, t: (rewrite(p, flags=w.REQUEST_FLAGS), t), "icflags"),  # not an answer
        (lambda p, t: (rewrite(p, msgtype=w.MessageType.SHUTDOWN), t), "type 3"),
        (lambda p, t: (p[:20], t), "needs 20 bytes"),  # cut short
        (lambda p, t: (rewrite(p, msgsize=0xFFFF), t), "icmsgsize"),
    ],
)
def test_answers_a_host_refuses(damage: object, match: str) -> None:
    server, client = ready_pair()
    trans_id, answer = answer_of(server, client)
    payload, tid = damage(answer, trans_id)  # type: ignore[operator]
    with pytest.raises(IcProtocolError, match=match):
        server.receive(payload, tid)


def test_guest_that_answers_twice_is_refused() -> None:
    server, client = ready_pair()
    trans_id, answer = answer_of(server, client)
    server.receive(answer, trans_id)
    with pytest.raises(IcProtocolError, match="not asked"):
        server.receive(answer, trans_id)


def test_guest_that_chooses_a_version_never_offered_is_refused() -> None:
    server = IcServer(MessageType.HEARTBEAT, ((1, 0),))
    client = IcClient(MessageType.HEARTBEAT, ((1, 0),))
    trans_id, request = server.negotiate()
    answer, _ = client.receive(request)
    assert answer is not None
    forged = bytearray(answer)
    w.IcVersion(9, 9).pack_into(forged, w.ICMSG_HDR + 12)  # the message version chosen
    with pytest.raises(IcProtocolError, match="never offered"):
        server.receive(bytes(forged), trans_id)


def test_guest_that_chooses_two_versions_is_refused() -> None:
    server = IcServer(MessageType.HEARTBEAT, HEARTBEAT_VERSIONS)
    trans_id, request = server.negotiate()
    forged = bytearray(rewrite(request, flags=w.RESPONSE_FLAGS))
    w.NegotiateHeader(2, 2).pack_into(forged, w.ICMSG_HDR)  # our own list, sent back
    with pytest.raises(IcProtocolError, match="not 1 \\+ 1"):
        server.receive(bytes(forged), trans_id)


def test_renegotiation_starts_over() -> None:
    server, client = ready_pair()
    server.negotiate()
    assert server.state == IcState.NEGOTIATING and server.message is None


@given(st.binary(max_size=200))
def test_guest_side_takes_any_bytes_without_crashing(data: bytes) -> None:
    client = IcClient(MessageType.HEARTBEAT, HEARTBEAT_VERSIONS)
    try:
        answer, request = client.receive(data)
    except IcClientError:
        return
    assert (answer is None) != (request is None)


def test_guest_side_refuses_another_services_request() -> None:
    server, client = ready_pair()
    shutdown = IcClient(MessageType.SHUTDOWN, w.SHUTDOWN_VERSIONS)
    _, payload = server.request(b"\0" * 40)
    with pytest.raises(IcClientError, match="type 1 on the SHUTDOWN channel"):
        shutdown.receive(payload)


def test_guest_side_refuses_a_message_past_its_receive_buffer() -> None:
    client = IcClient(MessageType.HEARTBEAT, HEARTBEAT_VERSIONS, receive_limit=w.PAGE_SIZE)
    with pytest.raises(IcClientError, match="limit"):
        client.receive(bytes(w.PAGE_SIZE + 1))
