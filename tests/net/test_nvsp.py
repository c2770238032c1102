"""NVSP (netvsc/netvsp): golden bytes, round trips, hostile bytes, the VSP
state machine and the receive-section allocator against models, and the VSC
and VSP initializing in-process for every version.

Golden vectors are written by hand from the offset tables of
docs/protocol.md §6.3 (not produced by the code under test).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule

from vmbus.protocols.net.vsc import (
    NvspClient,
    VscState,
)
from vmbus.protocols.net.vsp import (
    AllocateSubChannels,
    BufferEstablished,
    BufferRevoked,
    NoReply,
    NvspServer,
    NvspState,
    ReceiveSections,
    Reply,
    RndisPacket,
)
from vmbus.protocols.net.wire import (
    INVALID_SECTION_INDEX,
    MAX_RECEIVE_SECTIONS,
    MESSAGES,
    NVSP_MESSAGE_SIZE,
    NVSP_MIN_MESSAGE_SIZE,
    NVSP_PROTOCOL_VERSION_1,
    NVSP_PROTOCOL_VERSION_2,
    NVSP_PROTOCOL_VERSION_4,
    NVSP_PROTOCOL_VERSION_5,
    NVSP_PROTOCOL_VERSION_6,
    NVSP_PROTOCOL_VERSION_61,
    NVSP_VERSIONS,
    Buffer,
    BufferKind,
    NvspError,
    NvspInit,
    NvspInitComplete,
    NvspMessageType,
    NvspStatus,
    RevokeReceiveBuffer,
    RevokeSendBuffer,
    RndisChannel,
    SendNdisConfig,
    SendNdisVersion,
    SendReceiveBuffer,
    SendReceiveBufferComplete,
    SendRndisPacketComplete,
    SendSendBuffer,
    SendSendBufferComplete,
    SubChannelComplete,
    SubChannelRequest,
    decode,
    decode_indirection_table,
    encode,
    encode_indirection_table,
    message_type,
    send_rndis_packet,
    type_of,
)
from vmbus.testing.strategies import from_hex as h
from vmbus.testing.strategies import wire_values
from vmbus.wire import WireError

RECV_GPADL, SEND_GPADL, SMALL_GPADL = 0x1001, 0x1002, 0x1003
MiB = 1 << 20
GPADLS = {RECV_GPADL: 16 * MiB, SEND_GPADL: 1044480, SMALL_GPADL: 1000}


def ready_server(version: int = NVSP_PROTOCOL_VERSION_61, **kw: Any) -> NvspServer:
    server = NvspServer(**kw)
    send(server, NvspInit(min_protocol_ver=version, max_protocol_ver=version))
    assert server.state == NvspState.READY
    return server


def with_buffers(version: int = NVSP_PROTOCOL_VERSION_61, **kw: Any) -> NvspServer:
    server = ready_server(version, **kw)
    assert isinstance(send(server, SendReceiveBuffer(gpadl_handle=RECV_GPADL)), BufferEstablished)
    assert isinstance(send(server, SendSendBuffer(gpadl_handle=SEND_GPADL)), BufferEstablished)
    return server


def send(server: NvspServer, message: Any, gpadls: Mapping[int, int] = GPADLS) -> Any:
    return server.receive(encode(message), gpadl_sizes=gpadls)


def reply_of(event: Any, cls: type[Any]) -> Any:
    payload = event.payload if isinstance(event, Reply) else event.reply
    assert len(payload) == NVSP_MESSAGE_SIZE
    return decode(payload, cls)


# --- Golden bytes -------------------------------------------------------------

INIT_61 = h(
    """
    01000000   # msg_type INIT
    01000600   # min_protocol_ver 0x00060001 (NVSP 6.1)
    01000600   # max_protocol_ver: Linux sends min = max
    """
) + bytes(28)  # padding to 40

INIT_COMPLETE_61 = h(
    """
    02000000   # msg_type INIT_COMPLETE
    01000600   # negotiated_protocol_ver 0x00060001
    00010000   # max_mdl_chain_len 256 (MAX_GPA_RANGES)
    01000000   # status SUCCESS
    """
) + bytes(24)

RECV_BUF_COMPLETE = h(
    """
    66000000   # msg_type SEND_RECV_BUF_COMPLETE (102)
    01000000   # status SUCCESS
    01000000   # num_sections 1
    00000000   # sections[0].offset 0
    c0060000   # sections[0].sub_alloc_size 1728
    ed250000   # sections[0].num_sub_allocs 9709 = 16 MiB // 1728
    c0ffff00   # sections[0].end_offset 9709 * 1728 = 16777152
    """
) + bytes(12)

RNDIS_PKT_CONTROL = h(
    """
    6b000000   # msg_type SEND_RNDIS_PKT (107)
    01000000   # channel_type 1: RMC_CONTROL
    ffffffff   # send_buf_section_index: not in the send buffer (GPA-direct)
    00000000   # send_buf_section_size 0
    """
) + bytes(24)

RNDIS_PKT_SECTION = h(
    """
    6b000000   # msg_type SEND_RNDIS_PKT
    00000000   # channel_type 0: RMC_DATA
    03000000   # send_buf_section_index 3
    68000000   # send_buf_section_size 104 (a 60-byte frame with its RNDIS header)
    """
) + bytes(24)


def test_golden_init_and_its_completion() -> None:
    assert encode(NvspInit(min_protocol_ver=0x60001, max_protocol_ver=0x60001)) == INIT_61
    event = NvspServer().receive(INIT_61, gpadl_sizes={})
    assert event == Reply(INIT_COMPLETE_61)


def test_golden_receive_buffer_completion() -> None:
    server = ready_server()
    request = h("65000000 0110 0000 feca") + bytes(30)  # SEND_RECV_BUF, gpadl 0x1001, id 0xCAFE
    assert request == encode(SendReceiveBuffer(gpadl_handle=RECV_GPADL, id=0xCAFE))
    event = server.receive(request, gpadl_sizes=GPADLS)
    assert event == BufferEstablished(
        BufferKind.RECEIVE, Buffer(RECV_GPADL, 0xCAFE, 1728, 9709), RECV_BUF_COMPLETE
    )


def test_golden_send_rndis_packet() -> None:
    assert send_rndis_packet(RndisChannel.CONTROL) == RNDIS_PKT_CONTROL
    assert send_rndis_packet(RndisChannel.DATA, 3, 104) == RNDIS_PKT_SECTION
    server = with_buffers()
    assert server.receive(RNDIS_PKT_CONTROL, gpadl_sizes={}) == RndisPacket(
        RndisChannel.CONTROL, INVALID_SECTION_INDEX, 0, None
    )
    assert server.receive(RNDIS_PKT_SECTION, gpadl_sizes={}) == RndisPacket(
        RndisChannel.DATA, 3, 104, 3 * 6144
    )


def test_golden_send_buffer_completion_and_rndis_completion() -> None:
    server = ready_server()
    event = send(server, SendSendBuffer(gpadl_handle=SEND_GPADL, id=0xFACE))
    assert event.reply == h("69000000 01000000 00180000") + bytes(28)  # 105, SUCCESS, 6144
    assert event.buffer == Buffer(SEND_GPADL, 0xFACE, 6144, 170)  # Linux's 170 x 6144 buffer
    assert encode(SendRndisPacketComplete()) == h("6c000000 01000000") + bytes(32)


def test_golden_indirection_table() -> None:
    wire = encode_indirection_table(list(range(16)))
    assert wire[:12] == h("86000000 10000000 28000000")  # 134, count 16, offset 40
    assert len(wire) == 104 and wire[40:44] == h("00000000") and wire[100:] == h("0f000000")
    assert decode_indirection_table(wire) == tuple(range(16))


def test_struct_sizes_and_enum_values() -> None:
    assert all(cls.SIZE <= NVSP_MIN_MESSAGE_SIZE for cls in MESSAGES)
    assert SendReceiveBufferComplete.SIZE == 28 and SendNdisConfig.SIZE == 20
    assert NvspMessageType.SUBCHANNEL == 133 and NvspMessageType.SEND_NDIS_CONFIG == 125
    assert NvspStatus.INVALID_RNDIS_PKT == 5
    assert NVSP_VERSIONS == (0x60001, 0x60000, 0x50000, 0x40000, 0x30002, 0x2)


# --- Round trips and hostile bytes --------------------------------------------


@pytest.mark.parametrize("cls", MESSAGES, ids=lambda c: c.__name__)
@given(data=st.data(), tail=st.binary(max_size=64))
@settings(max_examples=30)
def test_every_message_round_trips(cls: type[Any], data: st.DataObject, tail: bytes) -> None:
    message = data.draw(wire_values(cls, skip=1))  # not msg_type
    wire = encode(message)
    assert len(wire) == NVSP_MESSAGE_SIZE
    assert decode(wire, cls) == message
    assert decode(wire[:NVSP_MIN_MESSAGE_SIZE], cls) == message  # FreeBSD's 32 bytes
    assert decode(wire + tail, cls) == message  # ring padding after it
    assert message_type(wire) == type_of(cls)


@given(st.binary(max_size=80))
def test_arbitrary_bytes_into_decoders_raise_only_nvsp_error(data: bytes) -> None:
    for cls in MESSAGES:
        with contextlib.suppress(NvspError):
            decode(data, cls)
    for decoder in (message_type, decode_indirection_table):
        with contextlib.suppress(NvspError):
            decoder(data)


def typed_bytes() -> st.SearchStrategy[bytes]:
    """A known or random message type, then random bytes: reaches every handler."""
    types = st.sampled_from([int(t) for t in NvspMessageType]) | st.integers(0, 2**32 - 1)
    body = st.binary(max_size=44)
    return st.builds(lambda t, b: t.to_bytes(4, "little") + b, types, body) | st.binary(max_size=8)


@given(st.lists(typed_bytes(), max_size=12), st.sampled_from([None, NVSP_PROTOCOL_VERSION_61]))
@settings(max_examples=200)
def test_arbitrary_bytes_into_server_never_raise(messages: list[bytes], version: int) -> None:
    server = NvspServer() if version is None else with_buffers(version)
    for message in messages:
        event = server.receive(message, gpadl_sizes=GPADLS)
        if isinstance(event, Reply):
            assert len(event.payload) == NVSP_MESSAGE_SIZE
        if getattr(event, "error", None):
            assert sum(server.errors.values()) > 0


def test_short_message_is_refused_but_32_bytes_are_enough() -> None:
    wire = encode(NvspInit(min_protocol_ver=2, max_protocol_ver=2))
    event = NvspServer().receive(wire[:31], gpadl_sizes={})
    assert isinstance(event, Reply) and reply_of(event, NvspInitComplete).status == NvspStatus.FAIL
    assert NvspServer().receive(wire[:32], gpadl_sizes={}).payload[12] == NvspStatus.SUCCESS
    with pytest.raises(NvspError, match="31-byte"):
        decode(wire[:31], NvspInit)
    with pytest.raises(NvspError, match="INIT was expected"):
        decode(encode(SendNdisVersion()), NvspInit)


def test_encoding_a_value_too_big_is_a_local_error() -> None:
    with pytest.raises(WireError):
        encode(SendReceiveBuffer(gpadl_handle=1, id=1 << 16))
    with pytest.raises(ValueError):
        encode_indirection_table([0] * 15)


# --- The VSP against a model --------------------------------------------------

SECTION_SIZES = {BufferKind.RECEIVE: 1728, BufferKind.SEND: 6144}
MACHINE_GPADLS = {RECV_GPADL: 64 * 1728 + 5, SEND_GPADL: 8 * 6144, SMALL_GPADL: 1000}


class ServerMachine(RuleBasedStateMachine):
    """Every rule sends one message; the model says what must come back."""

    def __init__(self) -> None:
        super().__init__()
        self.server = NvspServer(max_sub_channels=4)
        self.version: int | None = None
        self.buffers: dict[BufferKind, Buffer | None] = dict.fromkeys(BufferKind)
        self.sub_channels = 0
        self.refusals = 0

    def send(self, message: Any) -> Any:
        return send(self.server, message, MACHINE_GPADLS)

    def refused(self, event: Any, cls: type[Any] | None, status: int = NvspStatus.FAIL) -> None:
        self.refusals += 1
        assert event.error
        if cls is None:
            assert isinstance(event, NoReply)
        else:
            assert reply_of(event, cls).status == status

    @initialize(versions=st.sets(st.sampled_from(NVSP_VERSIONS), min_size=1))
    def choose_versions(self, versions: set[int]) -> None:
        self.server = NvspServer(versions=sorted(versions), max_sub_channels=4)

    @rule(low=st.sampled_from(NVSP_VERSIONS) | st.integers(0, 2**32 - 1), wide=st.booleans())
    def init(self, low: int, wide: bool) -> None:
        high = 0xFFFFFFFF if wide else low
        event = self.send(NvspInit(min_protocol_ver=low, max_protocol_ver=high))
        if self.version is not None:
            return self.refused(event, NvspInitComplete)
        offered = [v for v in self.server.versions if low <= v <= high]
        reply = reply_of(event, NvspInitComplete)
        if offered:
            self.version = max(offered)
            assert (reply.status, reply.negotiated_protocol_ver) == (1, self.version)
        else:
            assert reply.status != NvspStatus.SUCCESS and not event.error

    @rule(config=st.booleans(), value=st.integers(0, 2**32 - 1))
    def ndis(self, config: bool, value: int) -> None:
        message = SendNdisConfig(mtu=value) if config else SendNdisVersion(ndis_major_ver=value)
        event = self.send(message)
        if self.version is None:
            return self.refused(event, None)
        assert event == NoReply()

    @rule(
        kind=st.sampled_from(BufferKind),
        gpadl=st.sampled_from([RECV_GPADL, SEND_GPADL, SMALL_GPADL, 0x9999]),
        buffer_id=st.integers(0, 0xFFFF),
    )
    def establish(self, kind: BufferKind, gpadl: int, buffer_id: int) -> None:
        receive = kind == BufferKind.RECEIVE
        cls = SendReceiveBufferComplete if receive else SendSendBufferComplete
        message = SendReceiveBuffer if receive else SendSendBuffer
        event = self.send(message(gpadl_handle=gpadl, id=buffer_id))
        other = self.buffers[BufferKind.SEND if receive else BufferKind.RECEIVE]
        section = SECTION_SIZES[kind]
        if (
            self.version is None
            or self.buffers[kind] is not None
            or MACHINE_GPADLS.get(gpadl, 0) < section
            or (other is not None and other.gpadl_handle == gpadl)
        ):
            return self.refused(event, cls)
        count = MACHINE_GPADLS[gpadl] // section
        self.buffers[kind] = Buffer(gpadl, buffer_id, section, count)
        assert event == BufferEstablished(kind, self.buffers[kind], event.reply)
        reply = reply_of(event, cls)
        assert reply.status == NvspStatus.SUCCESS
        if receive:
            assert (reply.num_sections, reply.offset, reply.sub_alloc_size) == (1, 0, section)
            assert reply.num_sub_allocs * section <= MACHINE_GPADLS[gpadl]
        else:
            assert reply.section_size == section

    @rule(kind=st.sampled_from(BufferKind), buffer_id=st.integers(0, 0xFFFF))
    def revoke(self, kind: BufferKind, buffer_id: int) -> None:
        message = RevokeReceiveBuffer if kind == BufferKind.RECEIVE else RevokeSendBuffer
        event = self.send(message(id=buffer_id))
        buffer = self.buffers[kind]
        if self.version is None or buffer is None or buffer.id != buffer_id:
            return self.refused(event, None)
        assert event == BufferRevoked(kind, buffer)
        self.buffers[kind] = None

    @rule(
        channel=st.integers(0, 2),
        index=st.sampled_from([INVALID_SECTION_INDEX, 0, 7, 8]) | st.integers(0, 2**32 - 1),
        size=st.sampled_from([0, 1, 6144, 6145]) | st.integers(0, 2**32 - 1),
    )
    def rndis_packet(self, channel: int, index: int, size: int) -> None:
        event = self.server.receive(send_rndis_packet(channel, index, size), gpadl_sizes={})
        buffer = self.buffers[BufferKind.SEND]
        if self.version is None:
            return self.refused(event, SendRndisPacketComplete)
        if (
            channel == 2
            or index != INVALID_SECTION_INDEX
            and (buffer is None or index >= buffer.section_count or not 0 < size <= 6144)
        ):
            return self.refused(event, SendRndisPacketComplete, NvspStatus.INVALID_RNDIS_PKT)
        if index == INVALID_SECTION_INDEX:
            assert event == RndisPacket(RndisChannel(channel), index, 0, None)
        else:
            assert event == RndisPacket(RndisChannel(channel), index, size, index * 6144)

    @rule(op=st.sampled_from([1, 1, 2]), count=st.integers(0, 100))
    def sub_channels(self, op: int, count: int) -> None:
        event = self.send(SubChannelRequest(op=op, num_subchannels=count))
        if (self.version or 0) < NVSP_PROTOCOL_VERSION_5 or op != 1 or self.sub_channels:
            return self.refused(event, SubChannelComplete)
        allocated = min(count, 4)
        assert reply_of(event, SubChannelComplete).num_subchannels == allocated
        assert isinstance(event, AllocateSubChannels if allocated else Reply)
        self.sub_channels = allocated

    @rule(data=typed_bytes())
    def garbage(self, data: bytes) -> None:
        before = sum(self.server.errors.values())
        self.server.receive(data, gpadl_sizes=MACHINE_GPADLS)
        self.refusals += sum(self.server.errors.values()) - before

    @invariant()
    def agrees_with_model(self) -> None:
        s = self.server
        assert s.version == self.version
        assert s.state == (NvspState.WAIT_INIT if self.version is None else NvspState.READY)
        assert (s.receive_buffer, s.send_buffer) == tuple(self.buffers.values())
        assert s.sub_channels == self.sub_channels
        assert sum(s.errors.values()) == self.refusals


TestServerMachine = ServerMachine.TestCase
TestServerMachine.settings = settings(max_examples=80, stateful_step_count=30, deadline=None)


# --- Receive sections against a model -----------------------------------------


class SectionsMachine(RuleBasedStateMachine):
    lent = Bundle("lent")

    @initialize(count=st.integers(1, 12))
    def create(self, count: int) -> None:
        self.sections = ReceiveSections(count, 1728)
        self.model: dict[int, tuple[int, ...]] = {}

    @rule(target=lent, trans_id=st.integers(0, 20), count=st.integers(1, 5))
    def alloc(self, trans_id: int, count: int) -> int:
        if trans_id in self.model:
            with pytest.raises(ValueError):
                self.sections.alloc(trans_id, count)
            return trans_id
        free = self.sections.section_count - sum(map(len, self.model.values()))
        got = self.sections.alloc(trans_id, count) if count <= self.sections.section_count else None
        if count > free:
            assert got is None
        else:
            assert got is not None and len(got) == count
            assert all(0 <= s < self.sections.section_count for s in got)
            self.model[trans_id] = got
        return trans_id

    @rule(trans_id=lent)
    def guest_completes(self, trans_id: int) -> None:
        if trans_id in self.model:
            assert self.sections.free(trans_id) == self.model.pop(trans_id)
        else:
            with pytest.raises(NvspError):
                self.sections.free(trans_id)

    @invariant()
    def never_lent_twice(self) -> None:
        if not hasattr(self, "model"):
            return
        held = [s for sections in self.model.values() for s in sections]
        assert len(held) == len(set(held))
        assert self.sections.free_count + len(held) == self.sections.section_count
        assert dict(self.sections.outstanding) == self.model


TestSectionsMachine = SectionsMachine.TestCase
TestSectionsMachine.settings = settings(max_examples=50, stateful_step_count=40, deadline=None)


def test_sections_offsets_and_limits() -> None:
    sections = ReceiveSections.of(Buffer(RECV_GPADL, 0xCAFE, 1728, 3))
    assert sections.alloc(7, 2) == (0, 1) and sections.offset(1) == 1728
    assert sections.alloc(8, 2) is None  # flow control: one left
    assert sections.free(7) == (0, 1) and sections.alloc(8, 3) is not None
    with pytest.raises(ValueError):
        ReceiveSections(MAX_RECEIVE_SECTIONS + 1, 1728)


# --- The VSC and the VSP together ---------------------------------------------


def run_init(client: NvspClient, server: NvspServer, gpadls: Mapping[int, int]) -> list[Any]:
    """Drive the client's requests through the server; the events, in order."""
    events, requests = [], client.start()
    while requests:
        replies = []
        for request in requests:
            event = server.receive(request.payload, gpadl_sizes=gpadls)
            events.append(event)
            if request.completion_requested:
                replies.append(event.payload if isinstance(event, Reply) else event.reply)
            else:
                assert event == NoReply()
        assert len(replies) == 1  # one outstanding request at a time, as Linux does
        requests = client.receive(replies[0])
    return events


@pytest.mark.parametrize("version", NVSP_VERSIONS, ids=hex)
def test_client_and_server_agree_on_each_version(version: int) -> None:
    server = NvspServer(versions=[version])
    client = NvspClient(RECV_GPADL, 16 * MiB, SEND_GPADL, 1044480)
    events = run_init(client, server, GPADLS)
    assert client.ready and client.version == server.version == version
    tried = NVSP_VERSIONS.index(version)
    assert len(events) == tried + 1 + (version > NVSP_PROTOCOL_VERSION_1) + 1 + 2
    ndis = (6, 30) if version >= NVSP_PROTOCOL_VERSION_5 else (6, 1)
    assert server.ndis_version == ndis
    if version == NVSP_PROTOCOL_VERSION_1:
        assert server.ndis_config is None
    else:
        assert server.ndis_config is not None and server.ndis_config.mtu == 1514
        assert bool(server.ndis_config.capability & 1 << 7) == (version >= NVSP_PROTOCOL_VERSION_61)
    assert client.receive_buffer == server.receive_buffer == Buffer(RECV_GPADL, 0xCAFE, 1728, 9709)
    assert client.send_buffer == server.send_buffer == Buffer(SEND_GPADL, 0, 6144, 170)


def test_sub_channels_end_to_end() -> None:
    server = NvspServer(max_sub_channels=3)
    client = NvspClient(RECV_GPADL, 16 * MiB, SEND_GPADL, 1044480)
    run_init(client, server, GPADLS)
    event = server.receive(client.request_sub_channels(7).payload, gpadl_sizes={})
    assert isinstance(event, AllocateSubChannels) and event.count == 3
    assert client.receive(event.reply) == [] and client.sub_channels == 3


def test_revoke_end_to_end_then_buffers_again() -> None:
    server = NvspServer()
    client = NvspClient(RECV_GPADL, 16 * MiB, SEND_GPADL, 1044480)
    run_init(client, server, GPADLS)
    events = [server.receive(r.payload, gpadl_sizes={}) for r in client.revoke()]
    assert [type(e) for e in events] == [BufferRevoked, BufferRevoked]
    assert server.receive_buffer is None and server.send_buffer is None
    assert isinstance(send(server, SendReceiveBuffer(gpadl_handle=RECV_GPADL)), BufferEstablished)


def test_client_refuses_what_linux_refuses() -> None:
    client = NvspClient(RECV_GPADL, 100_000, SEND_GPADL, 1044480, versions=[0x40000])
    client.start()
    client.receive(encode(NvspInitComplete(status=NvspStatus.SUCCESS)))
    assert client.state == VscState.RECEIVE_BUFFER
    too_many = SendReceiveBufferComplete(
        status=1, num_sections=1, sub_alloc_size=1728, num_sub_allocs=100
    )
    with pytest.raises(NvspError, match="100 sections"):
        client.receive(encode(too_many))
    with pytest.raises(NvspError, match="expected"):
        client.receive(encode(SendSendBufferComplete(status=1, section_size=6144)))


def test_client_gives_up_when_no_version_is_common() -> None:
    server = NvspServer(versions=[NVSP_PROTOCOL_VERSION_6])
    client = NvspClient(1, 1, 2, 1, versions=[NVSP_PROTOCOL_VERSION_4, NVSP_PROTOCOL_VERSION_2])
    with pytest.raises(NvspError, match="accepts none"):
        run_init(client, server, {})


# --- A hostile guest ----------------------------------------------------------


def test_guest_sends_rndis_before_init() -> None:
    server = NvspServer()
    event = server.receive(RNDIS_PKT_SECTION, gpadl_sizes={})
    assert reply_of(event, SendRndisPacketComplete).status == NvspStatus.FAIL
    assert server.errors["out_of_order"] == 1


def test_guest_sends_receive_buffer_before_init() -> None:
    server = NvspServer()
    event = send(server, SendReceiveBuffer(gpadl_handle=RECV_GPADL))
    assert reply_of(event, SendReceiveBufferComplete).status == NvspStatus.FAIL
    assert server.receive_buffer is None


def test_guest_names_send_section_out_of_range() -> None:
    server = with_buffers()
    event = server.receive(send_rndis_packet(0, 170, 100), gpadl_sizes={})  # sections 0..169
    assert reply_of(event, SendRndisPacketComplete).status == NvspStatus.INVALID_RNDIS_PKT
    assert server.errors["bad_rndis_packet"] == 1


def test_guest_claims_section_bigger_than_a_section() -> None:
    server = with_buffers()
    event = server.receive(send_rndis_packet(0, 0, 6145), gpadl_sizes={})
    assert reply_of(event, SendRndisPacketComplete).status == NvspStatus.INVALID_RNDIS_PKT


def test_guest_names_send_section_without_a_send_buffer() -> None:
    server = ready_server()
    event = server.receive(send_rndis_packet(0, 0, 100), gpadl_sizes={})
    assert reply_of(event, SendRndisPacketComplete).status == NvspStatus.INVALID_RNDIS_PKT


def test_guest_gives_receive_buffer_smaller_than_a_section() -> None:
    server = ready_server()
    event = send(server, SendReceiveBuffer(gpadl_handle=SMALL_GPADL))
    assert reply_of(event, SendReceiveBufferComplete).status == NvspStatus.FAIL
    assert server.errors["bad_buffer"] == 1 and server.receive_buffer is None


def test_guest_names_a_gpadl_it_never_established() -> None:
    event = send(ready_server(), SendSendBuffer(gpadl_handle=0xDEAD))
    assert reply_of(event, SendSendBufferComplete).status == NvspStatus.FAIL
    assert "no GPADL 0xdead" in event.error


def test_guest_uses_one_gpadl_for_both_buffers() -> None:
    server = ready_server()
    send(server, SendReceiveBuffer(gpadl_handle=RECV_GPADL))
    event = send(server, SendSendBuffer(gpadl_handle=RECV_GPADL))
    assert reply_of(event, SendSendBufferComplete).status == NvspStatus.FAIL


def test_guest_sends_receive_buffer_twice() -> None:
    server = with_buffers()
    event = send(server, SendReceiveBuffer(gpadl_handle=SMALL_GPADL))
    assert reply_of(event, SendReceiveBufferComplete).status == NvspStatus.FAIL
    assert server.receive_buffer is not None and server.receive_buffer.gpadl_handle == RECV_GPADL


def test_guest_gives_huge_receive_buffer_gets_capped_sections() -> None:
    event = send(ready_server(), SendReceiveBuffer(gpadl_handle=1), {1: 1 << 40})
    assert reply_of(event, SendReceiveBufferComplete).num_sub_allocs == MAX_RECEIVE_SECTIONS


def test_guest_revokes_a_buffer_it_does_not_have() -> None:
    server = ready_server()
    assert send(server, RevokeReceiveBuffer(id=0xCAFE)).error
    send(server, SendReceiveBuffer(gpadl_handle=RECV_GPADL, id=0xCAFE))
    assert send(server, RevokeReceiveBuffer(id=0xBEEF)).error
    assert server.receive_buffer is not None and server.errors["bad_revoke"] == 2


def test_guest_sends_an_unknown_message_type() -> None:
    server = ready_server()
    event = server.receive((4321).to_bytes(4, "little") + bytes(36), gpadl_sizes={})
    assert isinstance(event, NoReply) and server.errors["unsupported"] == 1


def test_guest_sends_a_host_message() -> None:
    server = ready_server()
    assert isinstance(send(server, SendSendBufferComplete()), NoReply)
    assert server.errors["unsupported"] == 1


def test_guest_inits_twice() -> None:
    server = ready_server(NVSP_PROTOCOL_VERSION_5)
    event = send(server, NvspInit(min_protocol_ver=0x60001, max_protocol_ver=0x60001))
    assert reply_of(event, NvspInitComplete).status == NvspStatus.FAIL
    assert server.version == NVSP_PROTOCOL_VERSION_5


def test_guest_sends_inverted_version_range() -> None:
    server = NvspServer()
    event = send(server, NvspInit(min_protocol_ver=0x60001, max_protocol_ver=2))
    assert reply_of(event, NvspInitComplete).status == NvspStatus.FAIL
    assert server.errors["malformed"] == 1


@pytest.mark.parametrize(
    ("version", "status"),
    [
        (0x1, NvspStatus.PROTOCOL_TOO_OLD),
        (0x70000, NvspStatus.PROTOCOL_TOO_NEW),
        (0x30001, NvspStatus.PROTOCOL_UNSUPPORTED),
    ],
)
def test_guest_offers_a_version_we_do_not_speak(version: int, status: int) -> None:
    server = NvspServer(versions=[NVSP_PROTOCOL_VERSION_1, NVSP_PROTOCOL_VERSION_61])
    event = send(server, NvspInit(min_protocol_ver=version, max_protocol_ver=version))
    assert reply_of(event, NvspInitComplete).status == status
    assert server.state == NvspState.WAIT_INIT and not server.errors


def test_guest_asks_sub_channels_on_nvsp_4() -> None:
    event = send(ready_server(NVSP_PROTOCOL_VERSION_4, max_sub_channels=4), SubChannelRequest())
    assert reply_of(event, SubChannelComplete).status == NvspStatus.FAIL


def test_guest_asks_sub_channels_twice() -> None:
    server = ready_server(NVSP_PROTOCOL_VERSION_6, max_sub_channels=4)
    assert isinstance(send(server, SubChannelRequest(num_subchannels=2)), AllocateSubChannels)
    assert (
        reply_of(send(server, SubChannelRequest(num_subchannels=2)), SubChannelComplete).status == 2
    )


def test_server_refuses_bad_configuration() -> None:
    with pytest.raises(ValueError):
        NvspServer(recv_section_size=67)
    with pytest.raises(ValueError):
        NvspServer(versions=[0x12345])
    with pytest.raises(ValueError):
        NvspServer(max_sub_channels=65)
