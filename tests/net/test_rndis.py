"""RNDIS: golden bytes, round trips, hostile bytes, the device against a
model, and a Linux-like guest (NvspClient + RndisClient) initializing the
VSP (NvspServer + RndisDevice) in-process and moving frames both ways
through send- and receive-buffer sections, for every NVSP version.

Golden vectors are written by hand from the offset tables of
docs/protocol.md §6.5-6.7 (not produced by the code under test).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from vmbus.packet import decode_transfer_page_header, encode_transfer_page_header
from vmbus.protocols import net
from vmbus.protocols.net import wire as nvsp
from vmbus.protocols.net.rndis_data import (
    NDIS_OBJECT_TYPE_OFFLOAD,
    NDIS_OFFLOAD_SIZE_6_0,
    OID_802_3_CURRENT_ADDRESS,
    OID_802_3_PERMANENT_ADDRESS,
    OID_GEN_CURRENT_PACKET_FILTER,
    OID_GEN_FRIENDLY_NAME,
    OID_GEN_LINK_SPEED,
    OID_GEN_MAXIMUM_FRAME_SIZE,
    OID_GEN_MEDIA_CONNECT_STATUS,
    OID_GEN_RCV_OK,
    OID_GEN_RECEIVE_SCALE_CAPABILITIES,
    OID_GEN_RECEIVE_SCALE_PARAMETERS,
    OID_GEN_RNDIS_CONFIG_PARAMETER,
    OID_GEN_SUPPORTED_LIST,
    OID_GEN_XMIT_OK,
    OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES,
    OID_TCP_OFFLOAD_PARAMETERS,
    ConfigParameterInfo,
    NdisObjectHeader,
    RecvScaleCapabilities,
    decode_config_parameter,
    encode_config_parameter,
    network_address,
    u32,
)
from vmbus.protocols.net.rndis_wire import (
    MAX_CONTROL_MESSAGE,
    MAX_PPIS,
    MESSAGES,
    Halt,
    IndicateStatus,
    Initialize,
    InitializeComplete,
    Keepalive,
    PacketHeader,
    Ppi,
    PpiHeader,
    PpiType,
    Query,
    QueryComplete,
    Reset,
    ResetComplete,
    RndisError,
    RndisMessageType,
    RndisStatus,
    Set,
    SetComplete,
    decode,
    decode_packet,
    decode_packets,
    encode,
    encode_packet,
    message_view,
    parse_request,
    split_messages,
    type_of,
)
from vmbus.protocols.net.vsc import (
    Completion,
    Indication,
    RndisClient,
)
from vmbus.protocols.net.vsp import (
    SUPPORTED_OIDS,
    RndisDevice,
    RndisState,
)
from vmbus.testing.strategies import from_hex as h
from vmbus.testing.strategies import wire_values as any_struct

MAC = bytes.fromhex("00155d000001")
OTHER_MAC = bytes.fromhex("00155d0000aa")
FRAME = MAC + OTHER_MAC + b"\x08\x00" + bytes(range(46))  # 60 bytes: a minimal frame to us


def ask(device: RndisDevice, client: RndisClient, request: bytes) -> Completion:
    completion = client.receive(device.control(request))
    assert isinstance(completion, Completion)
    return completion


def ready_device(**kw: Any) -> tuple[RndisDevice, RndisClient]:
    device, client = RndisDevice(MAC, **kw), RndisClient()
    assert ask(device, client, client.initialize()).succeeded
    return device, client


# --- Golden bytes -------------------------------------------------------------

INITIALIZE = h(
    """
    02000000   # msg_type INITIALIZE
    18000000   # msg_len 24
    01000000   # req_id 1
    01000000   # major_ver 1
    00000000   # minor_ver 0
    00400000   # max_xfer_size 0x4000 (Linux's)
    """
)
INITIALIZE_CMPLT = h(
    """
    02000080   # msg_type INITIALIZE_CMPLT
    34000000   # msg_len 52
    01000000   # req_id 1
    00000000   # status SUCCESS
    01000000   # major_ver 1
    00000000   # minor_ver 0
    01000000   # dev_flags CONNECTIONLESS
    00000000   # medium 802.3
    08000000   # max_pkt_per_msg 8
    00000200   # max_xfer_size 0x20000
    03000000   # pkt_alignment_factor 3: 8-byte alignment
    00000000   # af_list_offset
    00000000   # af_list_size
    """
)
QUERY_PERMANENT_ADDRESS = h(
    """
    04000000   # msg_type QUERY
    1c000000   # msg_len 28
    02000000   # req_id 2
    01010101   # oid 802_3_PERMANENT_ADDRESS
    00000000   # info_buflen 0
    14000000   # info_buf_offset 20 (from byte 8: just past the request)
    00000000   # dev_vc_handle
    """
)
QUERY_PERMANENT_ADDRESS_CMPLT = h(
    """
    04000080   # msg_type QUERY_CMPLT
    1e000000   # msg_len 30
    02000000   # req_id 2
    00000000   # status SUCCESS
    06000000   # info_buflen 6
    10000000   # info_buf_offset 16: the buffer is at byte 24
    00155d000001   # the MAC
    """
)
PACKET_60 = (
    h(
        """
    01000000   # msg_type PACKET
    68000000   # msg_len 104 = 44 + 60
    24000000   # data_offset 36: the frame is at byte 44
    3c000000   # data_len 60
    00000000   # oob_data_offset
    00000000   # oob_data_len
    00000000   # num_oob_data_elements
    24000000   # per_pkt_info_offset 36 (as Linux), none there
    00000000   # per_pkt_info_len 0
    00000000   # vc_handle
    00000000   # reserved
    """
    )
    + FRAME
)
PACKET_WITH_HASH = (
    h(
        """
    01000000   # msg_type PACKET
    78000000   # msg_len 120 = 44 + 16 + 60
    34000000   # data_offset 52 = 36 + one 16-byte PPI
    3c000000   # data_len 60
    00000000 00000000 00000000   # no OOB data
    24000000   # per_pkt_info_offset 36
    10000000   # per_pkt_info_len 16
    00000000 00000000            # vc_handle, reserved
    10000000   # ppi.size 16
    08000000   # ppi.type NBL_HASH_VALUE
    0c000000   # ppi.ppi_offset 12
    78563412   # value: hash 0x12345678
    """
    )
    + FRAME
)
INDICATE_MEDIA_CONNECT = h(
    """
    07000000   # msg_type INDICATE_STATUS
    14000000   # msg_len 20
    0b000140   # status MEDIA_CONNECT 0x4001000B
    00000000   # status_buflen 0
    0c000000   # status_buf_offset 12: just past the fixed part
    """
)


def test_golden_initialize_and_its_completion() -> None:
    device, client = RndisDevice(MAC), RndisClient()
    assert client.initialize() == INITIALIZE
    assert device.control(INITIALIZE) == INITIALIZE_CMPLT
    completion = client.receive(INITIALIZE_CMPLT)
    assert isinstance(completion, Completion) and client.init_complete is not None
    assert device.state == RndisState.INITIALIZED


def test_golden_query_permanent_address_and_its_completion() -> None:
    device, client = ready_device()
    assert client.query(OID_802_3_PERMANENT_ADDRESS) == QUERY_PERMANENT_ADDRESS
    assert device.control(QUERY_PERMANENT_ADDRESS) == QUERY_PERMANENT_ADDRESS_CMPLT
    completion = client.receive(QUERY_PERMANENT_ADDRESS_CMPLT)
    assert isinstance(completion, Completion)
    assert (completion.oid, completion.info) == (OID_802_3_PERMANENT_ADDRESS, MAC)


def test_golden_packet_with_a_60_byte_frame() -> None:
    assert encode_packet(FRAME) == PACKET_60
    frame, ppis = decode_packet(PACKET_60)
    assert bytes(frame) == FRAME and ppis == ()
    assert encode_packet(FRAME, [(PpiType.NBL_HASH_VALUE, u32(0x12345678))]) == PACKET_WITH_HASH
    assert decode_packet(PACKET_WITH_HASH)[1] == (Ppi(8, u32(0x12345678)),)


def test_golden_indicate_media_connect() -> None:
    device = RndisDevice(MAC, link_up=False)
    assert device.link(True) == INDICATE_MEDIA_CONNECT and device.link_up
    assert RndisClient().receive(INDICATE_MEDIA_CONNECT) == Indication(
        RndisStatus.MEDIA_CONNECT, b""
    )


def test_golden_network_address_as_linux_sets_it() -> None:
    info = network_address(OTHER_MAC)
    assert info[:20] == h("14000000 1c000000 02000000 30000000 18000000")  # name@20 len 28, value
    assert info[20:48] == "NetworkAddress".encode("utf-16-le")
    assert info[48:] == "00155d0000aa".encode("utf-16-le")


def test_struct_sizes_and_values() -> None:
    sizes = {cls: cls.SIZE for cls in MESSAGES}
    assert sizes[InitializeComplete] == 52 and sizes[PacketHeader] == 44 and sizes[Query] == 28
    assert (PpiHeader.SIZE, ConfigParameterInfo.SIZE, RecvScaleCapabilities.SIZE) == (12, 20, 18)
    assert (
        RndisMessageType.KEEPALIVE_CMPLT == 0x80000008 and RndisStatus.NOT_SUPPORTED == 0xC00000BB
    )


# --- Round trips and hostile bytes --------------------------------------------


STRUCTS = (*MESSAGES, PpiHeader, ConfigParameterInfo, NdisObjectHeader, RecvScaleCapabilities)


@pytest.mark.parametrize("cls", STRUCTS, ids=lambda c: c.__name__)
@given(data=st.data())
@settings(max_examples=25)
def test_every_struct_round_trips(cls: type[Any], data: st.DataObject) -> None:
    value = data.draw(any_struct(cls, 0))
    assert cls.unpack(value.pack()) == value


BUFFERED = [Query, QueryComplete, Set, IndicateStatus]
PLAIN = [c for c in MESSAGES if c not in BUFFERED and c is not PacketHeader]


@pytest.mark.parametrize("cls", BUFFERED + PLAIN, ids=lambda c: c.__name__)
@given(data=st.data(), buffer=st.binary(max_size=40), padding=st.binary(max_size=16))
@settings(max_examples=25)
def test_every_message_round_trips(
    cls: type[Any], data: st.DataObject, buffer: bytes, padding: bytes
) -> None:
    message = data.draw(any_struct(cls, 2))  # msg_type and msg_len are encode's
    buffer = buffer if cls in BUFFERED else b""
    wire = encode(message, buffer)
    decoded, got = decode(wire + padding, cls)
    assert bytes(got) == buffer and decoded.msg_len == len(wire)
    names = dataclasses.fields(cls)[2:]
    own = {f.name for f in names} - set(getattr(cls, "BUFFER", ()))
    assert all(getattr(decoded, n) == getattr(message, n) for n in own)


ppi_lists = st.lists(st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=12)), max_size=5)


@given(frame=st.binary(min_size=1, max_size=300), ppis=ppi_lists, padding=st.binary(max_size=8))
def test_packet_round_trips(frame: bytes, ppis: list[tuple[int, bytes]], padding: bytes) -> None:
    got_frame, got_ppis = decode_packet(encode_packet(frame, ppis) + padding)
    assert bytes(got_frame) == frame and got_ppis == tuple(Ppi(*p) for p in ppis)


@given(st.lists(st.binary(min_size=1, max_size=80), min_size=1, max_size=8))
def test_batched_messages_split_back(frames: list[bytes]) -> None:
    messages = [encode_packet(f) for f in frames]
    assert [bytes(m) for m in split_messages(b"".join(messages))] == messages


@given(st.lists(st.tuples(st.binary(min_size=1, max_size=80), ppi_lists), min_size=1, max_size=8))
def test_batch_parsed_once_agrees_with_split_then_decode(
    packets: list[tuple[bytes, list[tuple[int, bytes]]]],
) -> None:
    """decode_packets (each header read once, as netvsp parses a section)
    gives what split_messages and decode_packet give one after the other."""
    batch = b"".join(encode_packet(frame, ppis) for frame, ppis in packets)
    once = [(bytes(f), p) for f, p in decode_packets(batch)]
    twice = [decode_packet(m) for m in split_messages(batch)]
    assert once == [(bytes(f), p) for f, p in twice]
    assert [f for f, _ in once] == [frame for frame, _ in packets]


@given(st.builds(lambda oid, info: (oid, info), st.integers(0, 2**32 - 1), st.binary(max_size=40)))
def test_control_request_parsed_once_keeps_its_fields_and_info(request: tuple[int, bytes]) -> None:
    oid, info = request
    parsed = parse_request(RndisClient().set(oid, info))
    assert isinstance(parsed.request, Set) and parsed.request.oid == oid
    assert parsed.info is not None and bytes(parsed.info) == info


@given(name=st.text(max_size=20), value=st.text(max_size=20))
@settings(max_examples=40)
def test_config_parameter_round_trips(name: str, value: str) -> None:
    parameter = decode_config_parameter(encode_config_parameter(name, value))
    assert (parameter.name, parameter.value) == (name, value.encode("utf-16-le"))


def typed_bytes() -> st.SearchStrategy[bytes]:
    """A known type and a plausible msg_len, then random bytes: reaches every branch."""
    types = st.sampled_from([int(t) for t in RndisMessageType]) | st.integers(0, 2**32 - 1)

    def build(msg_type: int, body: bytes, fudge: int) -> bytes:
        length = max(0, 8 + len(body) + fudge)
        return msg_type.to_bytes(4, "little") + length.to_bytes(4, "little") + body

    return st.builds(build, types, st.binary(max_size=80), st.integers(-4, 4)) | st.binary(
        max_size=90
    )


@given(typed_bytes())
@settings(max_examples=200)
def test_arbitrary_bytes_into_decoders_raise_only_rndis_error(data: bytes) -> None:
    for cls in MESSAGES:
        with contextlib.suppress(RndisError):
            decode(data, cls)
    decoders: list[Any] = [message_view, decode_packet, split_messages, decode_config_parameter]
    decoders += [decode_packets, parse_request]
    for decoder in decoders:
        with contextlib.suppress(RndisError):
            decoder(data)
    with contextlib.suppress(RndisError):
        RndisClient().receive(data)


@given(st.lists(typed_bytes(), max_size=10), st.booleans())
@settings(max_examples=200)
def test_arbitrary_bytes_into_device_give_a_reply_or_rndis_error(
    messages: list[bytes], initialized: bool
) -> None:
    device = ready_device()[0] if initialized else RndisDevice(MAC)
    for message in messages:
        try:
            reply = device.control(message)
        except RndisError:
            assert device.errors["malformed"]
            continue
        if reply is not None:  # a proper completion of what was asked
            msg_type, view = message_view(reply)
            assert msg_type == message_view(message)[0] | 0x80000000 and len(view) == len(reply)
        with contextlib.suppress(RndisError):
            device.frame_from_guest(message)


# --- The device against a model -----------------------------------------------


class DeviceMachine(RuleBasedStateMachine):
    """Initialize, halt, filters, MAC changes and frames in any order."""

    def __init__(self) -> None:
        super().__init__()
        self.device, self.client = RndisDevice(MAC), RndisClient()
        self.initialized, self.filter, self.mac = False, 0, MAC

    def ask(self, request: bytes) -> Completion:
        return ask(self.device, self.client, request)

    @rule()
    def initialize(self) -> None:
        assert self.ask(self.client.initialize()).succeeded
        self.initialized, self.filter = True, 0

    @rule()
    def halt(self) -> None:
        assert self.device.control(self.client.halt()) is None
        self.initialized, self.filter = False, 0

    @rule(value=st.sampled_from([0, 0x0D, 0x01, 0x08, 0x20, 0x04]))
    def set_filter(self, value: int) -> None:
        completion = self.ask(self.client.set(OID_GEN_CURRENT_PACKET_FILTER, u32(value)))
        assert completion.succeeded == self.initialized
        if self.initialized:
            self.filter = value

    @rule(mac=st.sampled_from([MAC, OTHER_MAC, b"\x01" * 6, bytes(6)]))
    def set_mac(self, mac: bytes) -> None:
        completion = self.ask(self.client.set(OID_GEN_RNDIS_CONFIG_PARAMETER, network_address(mac)))
        valid = self.initialized and mac[0] & 1 == 0 and any(mac)
        assert completion.succeeded == valid
        if valid:
            self.mac = mac

    @rule(oid=st.sampled_from([*SUPPORTED_OIDS, 0x12345678]))
    def query(self, oid: int) -> None:
        completion = self.ask(self.client.query(oid))
        settable_only = oid in (
            OID_TCP_OFFLOAD_PARAMETERS,
            OID_GEN_RECEIVE_SCALE_PARAMETERS,
            OID_GEN_RNDIS_CONFIG_PARAMETER,
            0x12345678,
        )
        expected = RndisStatus.NOT_SUPPORTED if settable_only else RndisStatus.SUCCESS
        assert completion.status == (expected if self.initialized else RndisStatus.FAILURE)

    @rule(destination=st.sampled_from([MAC, OTHER_MAC, b"\xff" * 6, b"\x01\x00\x5e\x00\x00\x01"]))
    def frame_to_guest(self, destination: bytes) -> None:
        got = self.device.frame_to_guest(destination + FRAME[6:])
        f = self.filter if self.initialized else 0
        if f & 0x20:
            wanted = bool(f)
        elif destination == b"\xff" * 6:
            wanted = bool(f & 0x08)
        elif destination[0] & 1:
            wanted = bool(f & 0x06)
        else:
            wanted = bool(f & 0x01) and destination == self.mac
        assert (got is not None) == wanted

    @rule()
    def frame_from_guest(self) -> None:
        got = self.device.frame_from_guest(PACKET_60)
        assert (got is not None) == self.initialized

    @invariant()
    def agrees_with_model(self) -> None:
        assert self.device.initialized == self.initialized
        assert self.device.packet_filter == self.filter
        assert self.device.mac == self.mac and self.device.permanent_mac == MAC


TestDeviceMachine = DeviceMachine.TestCase
TestDeviceMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)


# --- A Linux-like guest and the VSP, in-process, for each NVSP version -----------

RECV_GPADL, SEND_GPADL = 0x11, 0x12
RECV_SIZE, SEND_SIZE = 64 * 1728, 16 * 6144


class Guest:
    """The guest's memory, its NVSP and RNDIS clients, and the host's VSP,
    joined the way the I/O layers will join them."""

    def __init__(self, version: int) -> None:
        self.memory = {RECV_GPADL: bytearray(RECV_SIZE), SEND_GPADL: bytearray(SEND_SIZE)}
        self.sizes = {handle: len(buffer) for handle, buffer in self.memory.items()}
        self.server = net.NvspServer(versions=[version])
        self.nvsc = net.NvspClient(RECV_GPADL, RECV_SIZE, SEND_GPADL, SEND_SIZE)
        self.device, self.rndis = RndisDevice(MAC), RndisClient()
        self.sections: net.ReceiveSections | None = None
        self.next_trans_id = 1

    def nvsp_init(self) -> None:
        requests = self.nvsc.start()
        while requests:
            reply = b""
            for request in requests:
                event = self.server.receive(request.payload, gpadl_sizes=self.sizes)
                if (
                    isinstance(event, net.BufferEstablished)
                    and event.kind == nvsp.BufferKind.RECEIVE
                ):
                    self.sections = net.ReceiveSections.of(event.buffer)
                if request.completion_requested:
                    reply = event.payload if isinstance(event, net.Reply) else event.reply
            requests = self.nvsc.receive(reply)
        assert self.nvsc.ready

    def guest_sends(self, rndis: bytes, section: int | None) -> list[bytes]:
        """One RNDIS message from the guest: in a send-buffer section, or
        GPA-direct (section None). What the host sends back, as RNDIS bytes."""
        if section is None:
            payload = nvsp.send_rndis_packet(nvsp.RndisChannel.CONTROL)
        else:
            offset = section * 6144
            self.memory[SEND_GPADL][offset : offset + len(rndis)] = rndis
            payload = nvsp.send_rndis_packet(nvsp.RndisChannel.DATA, section, len(rndis))
        event = self.server.receive(payload, gpadl_sizes=self.sizes)
        assert isinstance(event, net.RndisPacket)
        if event.offset is None:
            data: Any = rndis  # the I/O layer reads the GPA ranges
        else:
            data = memoryview(self.memory[SEND_GPADL])[event.offset :][: event.section_size]
        out = []
        for message in split_messages(data):
            if message_view(message)[0] == RndisMessageType.PACKET:
                got = self.device.frame_from_guest(message)
                assert got is not None
                out.append(bytes(got[0]))
            else:
                reply = self.device.control(message)
                if reply is not None:
                    out.append(self.host_sends(reply))
        return out

    def host_sends(self, rndis: bytes) -> bytes:
        """Through a receive section and a transfer-page packet; the guest
        reads it and completes the packet."""
        assert self.sections is not None and len(rndis) <= self.sections.section_size
        trans_id, self.next_trans_id = self.next_trans_id, self.next_trans_id + 1
        (section,) = self.sections.alloc(trans_id) or pytest.fail("no free section")
        offset = self.sections.offset(section)
        self.memory[RECV_GPADL][offset : offset + len(rndis)] = rndis
        header = encode_transfer_page_header(0xCAFE, [(len(rndis), offset)])
        payload = nvsp.send_rndis_packet(nvsp.RndisChannel.DATA)
        # The guest's side:
        parsed = decode_transfer_page_header(header, RECV_SIZE)
        assert parsed.xfer_pageset_id == self.nvsc.recv[2]
        assert nvsp.decode(payload, nvsp.SendRndisPacket).msg_type == 107
        count, at = parsed.ranges[0]
        received = bytes(self.memory[RECV_GPADL][at : at + count])
        assert self.sections.free(trans_id) == (section,)  # the guest's completion
        return received

    def ask(self, request: bytes) -> Completion:
        (reply,) = self.guest_sends(request, None)
        completion = self.rndis.receive(reply)
        assert isinstance(completion, Completion)
        return completion


def offload_query(version: int) -> bytes:
    """The zeroed ndis_offload Linux sends with its capabilities query."""
    revision, size = (
        (3, 156) if version >= 0x50000 else (2, 144) if version >= 0x40000 else (1, 112)
    )
    return NdisObjectHeader(NDIS_OBJECT_TYPE_OFFLOAD, revision, size).pack().ljust(size, b"\0")


def offload_parameters(version: int) -> bytes:
    """ndis_offload_params with everything disabled, as Linux sets them with no capabilities."""
    size = 28 if version >= 0x50000 else 22
    params = bytearray(
        NdisObjectHeader(0x80, 3 if size == 28 else 2, size).pack().ljust(size, b"\0")
    )
    params[4:15] = b"\x01" * 11  # csum, LSO, IPsec, TCP connection: disabled
    return bytes(params)


@pytest.mark.parametrize("version", nvsp.NVSP_VERSIONS, ids=hex)
def test_linux_like_guest_initializes_and_moves_frames(version: int) -> None:
    guest = Guest(version)
    guest.nvsp_init()
    assert guest.ask(guest.rndis.initialize()).succeeded
    assert guest.ask(guest.rndis.query(OID_802_3_PERMANENT_ADDRESS)).info == MAC
    assert guest.ask(guest.rndis.query(OID_GEN_MAXIMUM_FRAME_SIZE)).info == u32(1500)
    request = offload_query(version)
    caps = guest.ask(guest.rndis.query(OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES, request)).info
    header = NdisObjectHeader.unpack(caps)  # Linux's checks:
    assert header.type == NDIS_OBJECT_TYPE_OFFLOAD and header.revision >= 1
    assert NDIS_OFFLOAD_SIZE_6_0 <= header.size <= len(caps) <= len(request) and not any(caps[4:])
    assert guest.ask(
        guest.rndis.set(OID_TCP_OFFLOAD_PARAMETERS, offload_parameters(version))
    ).succeeded
    assert guest.ask(guest.rndis.query(OID_GEN_MEDIA_CONNECT_STATUS)).info == u32(0)
    if version >= 0x50000:
        assert guest.ask(guest.rndis.query(OID_GEN_LINK_SPEED)).info == u32(100_000_000)
        rss = RecvScaleCapabilities().pack()
        reply = guest.ask(guest.rndis.query(OID_GEN_RECEIVE_SCALE_CAPABILITIES, rss)).info
        assert len(reply) <= len(rss) and RecvScaleCapabilities.unpack(reply).num_recv_que < 2
    name = guest.ask(guest.rndis.query(OID_GEN_FRIENDLY_NAME)).info
    assert name.decode("utf-16-le") == "Network Adapter\0"
    assert guest.ask(guest.rndis.set(OID_GEN_CURRENT_PACKET_FILTER, u32(0x0D))).succeeded
    # Frames, guest -> host through a send section, and host -> guest through a receive one.
    assert guest.guest_sends(PACKET_60, section=5) == [FRAME]
    to_guest = guest.device.frame_to_guest(FRAME)
    assert to_guest is not None
    frame, _ = decode_packet(guest.host_sends(to_guest))
    assert bytes(frame) == FRAME
    assert guest.device.frame_to_guest(OTHER_MAC + FRAME[6:]) is None  # not ours: filtered
    counters = [
        guest.ask(guest.rndis.query(oid, bytes(8))).info
        for oid in (OID_GEN_XMIT_OK, OID_GEN_RCV_OK)
    ]
    assert counters == [(1).to_bytes(8, "little")] * 2
    assert guest.guest_sends(guest.rndis.halt(), None) == []
    assert guest.device.frame_to_guest(FRAME) is None and not guest.device.initialized


def test_guest_batches_messages_in_one_send_section() -> None:
    guest = Guest(nvsp.NVSP_PROTOCOL_VERSION_61)
    guest.nvsp_init()
    guest.ask(guest.rndis.initialize())
    padded = [encode_packet(FRAME + bytes(n)) for n in (1, 2, 3)]  # then pad each to 8, as Linux
    batch = []
    for message in padded:
        pad = -len(message) % 8
        batch.append(u32(1) + u32(len(message) + pad) + message[8:] + bytes(pad))
    assert guest.guest_sends(b"".join(batch), section=0) == [FRAME + bytes(n) for n in (1, 2, 3)]


# --- A hostile guest ----------------------------------------------------------


def test_guest_queries_unknown_oid_gets_not_supported() -> None:
    device, client = ready_device()
    completion = ask(device, client, client.query(0xDEADBEEF))
    assert completion.status == RndisStatus.NOT_SUPPORTED and completion.info == b""
    assert device.errors["unsupported_oid"] == 1


def test_guest_sets_unknown_oid_gets_not_supported() -> None:
    device, client = ready_device()
    assert ask(device, client, client.set(OID_802_3_PERMANENT_ADDRESS, OTHER_MAC)).status == (
        RndisStatus.NOT_SUPPORTED
    )


def test_guest_claims_rndis_length_beyond_message() -> None:
    device, client = ready_device()
    query = bytearray(client.query(OID_GEN_SUPPORTED_LIST))
    query[4:8] = u32(29)  # msg_len one byte past the 28 given
    with pytest.raises(RndisError, match="msg_len 29"):
        device.control(query)
    packet = bytearray(PACKET_60)
    packet[12:16] = u32(61)  # data_len one byte past the message
    with pytest.raises(RndisError, match="61 bytes at offset 36"):
        decode_packet(packet)
    assert device.errors["malformed"] == 1


def test_guest_claims_info_buffer_beyond_message() -> None:
    device, client = ready_device()
    request = bytearray(client.set(OID_GEN_CURRENT_PACKET_FILTER, u32(0x0D)))
    request[16:20] = u32(5)  # info_buflen 5 of the 4 bytes there
    assert ask(device, client, bytes(request)).status == RndisStatus.INVALID_DATA
    assert device.packet_filter == 0


def test_guest_points_info_buffer_into_the_header() -> None:
    device, client = ready_device()
    request = bytearray(client.set(OID_GEN_CURRENT_PACKET_FILTER, u32(0x0D)))
    request[20:24] = u32(0)  # info_buf_offset 0: over req_id and oid
    assert ask(device, client, bytes(request)).status == RndisStatus.INVALID_DATA


def test_guest_sets_filter_with_a_short_buffer() -> None:
    device, client = ready_device()
    assert ask(device, client, client.set(OID_GEN_CURRENT_PACKET_FILTER, b"\x0d")).status == (
        RndisStatus.INVALID_LENGTH
    )


def test_guest_queries_before_initialize() -> None:
    device, client = RndisDevice(MAC), RndisClient()
    assert (
        ask(device, client, client.query(OID_802_3_PERMANENT_ADDRESS)).status == RndisStatus.FAILURE
    )
    assert device.errors["out_of_order"] == 1


def test_guest_sends_frames_before_initialize_or_after_halt() -> None:
    device, client = ready_device()
    device.control(client.halt())
    assert device.frame_from_guest(PACKET_60) is None and device.errors["frame_while_halted"] == 1
    assert device.xmit_ok == 0


def test_guest_asks_for_an_offload_we_do_not_offer() -> None:
    device, client = ready_device()
    params = bytearray(offload_parameters(0x60001))
    params[5] = 4  # tcp_ip_v4_csum TX and RX
    assert ask(device, client, client.set(OID_TCP_OFFLOAD_PARAMETERS, bytes(params))).status == (
        RndisStatus.INVALID_DATA
    )


def test_guest_sets_a_multicast_or_malformed_mac() -> None:
    device, client = ready_device()
    for info in (
        network_address(b"\x01\x00\x5e\x00\x00\x01"),
        encode_config_parameter("NetworkAddress", "00155d00zz01"),
        encode_config_parameter("NetworkAddress", "00 15 5d 00 01"),
        network_address(OTHER_MAC)[:30],  # the value cut off
    ):
        assert not ask(device, client, client.set(OID_GEN_RNDIS_CONFIG_PARAMETER, info)).succeeded
    assert device.mac == MAC
    other = encode_config_parameter("MTU", "9000")
    assert ask(device, client, client.set(OID_GEN_RNDIS_CONFIG_PARAMETER, other)).status == (
        RndisStatus.NOT_SUPPORTED
    )


def test_guest_changes_mac_and_frames_follow() -> None:
    device, client = ready_device()
    ask(device, client, client.set(OID_GEN_CURRENT_PACKET_FILTER, u32(0x01)))
    assert ask(
        device, client, client.set(OID_GEN_RNDIS_CONFIG_PARAMETER, network_address(OTHER_MAC))
    ).succeeded
    assert ask(device, client, client.query(OID_802_3_CURRENT_ADDRESS)).info == OTHER_MAC
    assert ask(device, client, client.query(OID_802_3_PERMANENT_ADDRESS)).info == MAC
    assert device.frame_to_guest(OTHER_MAC + FRAME[6:]) is not None
    assert device.frame_to_guest(FRAME) is None


def test_guest_sends_a_truncated_request_or_a_completion() -> None:
    device, client = ready_device()
    with pytest.raises(RndisError, match="20-byte Query"):
        device.control(h("04000000 14000000") + bytes(12))
    with pytest.raises(RndisError, match="no control request"):
        device.control(encode(SetComplete()))
    with pytest.raises(RndisError):
        device.control(PACKET_60)
    with pytest.raises(RndisError, match="no header"):
        device.control(b"\x02\x00")


def test_guest_sends_an_oversized_control_message() -> None:
    device, client = ready_device()
    with pytest.raises(RndisError):
        device.control(client.set(OID_GEN_RECEIVE_SCALE_PARAMETERS, bytes(MAX_CONTROL_MESSAGE)))


def test_guest_sends_a_packet_with_too_many_or_broken_ppis() -> None:
    with pytest.raises(RndisError, match="more than"):
        decode_packet(encode_packet(FRAME, [(1, b"")] * (MAX_PPIS + 1)))
    packet = bytearray(PACKET_WITH_HASH)
    packet[44:48] = u32(11)  # ppi.size smaller than its header
    with pytest.raises(RndisError, match="per-packet-info of 11"):
        decode_packet(packet)
    packet[44:48], packet[52:56] = u32(16), u32(17)  # value past the element
    with pytest.raises(RndisError, match="value at 17"):
        decode_packet(packet)
    with pytest.raises(RndisError, match="without a frame"):
        decode_packet(PACKET_60[:12] + u32(0) + PACKET_60[16:])


def test_guest_batch_leaves_bytes_over() -> None:
    with pytest.raises(RndisError):
        split_messages(PACKET_60 + b"\x01\x00\x00")


def test_reset_keepalive_and_halt() -> None:
    device, client = ready_device()
    ask(device, client, client.set(OID_GEN_CURRENT_PACKET_FILTER, u32(0x0D)))
    assert device.control(encode(Reset())) == encode(ResetComplete())
    assert device.packet_filter == 0x0D  # addressing_reset 0: the filter stays
    assert ask(device, client, client.keepalive()).succeeded
    assert device.control(encode(Halt(req_id=9))) is None and device.packet_filter == 0
    assert ask(device, client, client.keepalive()).status == RndisStatus.FAILURE
    assert device.control(encode(Initialize(major_ver=2))) == encode(
        InitializeComplete(status=RndisStatus.NOT_SUPPORTED)
    )


def test_client_refuses_stray_completions() -> None:
    client = RndisClient()
    with pytest.raises(RndisError, match="not outstanding"):
        client.receive(QUERY_PERMANENT_ADDRESS_CMPLT)
    client.initialize()
    with pytest.raises(RndisError, match="not outstanding"):
        client.receive(encode(QueryComplete(req_id=1)))  # right id, wrong kind
    with pytest.raises(RndisError, match="no completion"):
        client.receive(encode(Keepalive()))


def test_link_speed_indication_and_supported_list() -> None:
    device, client = ready_device()
    indication = client.receive(device.indicate_link_speed(400_000))
    assert indication == Indication(RndisStatus.LINK_SPEED_CHANGE, u32(400_000))
    listed = ask(device, client, client.query(OID_GEN_SUPPORTED_LIST)).info
    oids = {int.from_bytes(listed[i : i + 4], "little") for i in range(0, len(listed), 4)}
    assert oids == set(SUPPORTED_OIDS) and OID_GEN_RCV_OK in oids
    assert ask(device, client, client.query(OID_GEN_XMIT_OK)).info == u32(0)  # room < 8: u32
    assert type_of(IndicateStatus) == RndisMessageType.INDICATE_STATUS


def test_device_refuses_bad_configuration() -> None:
    for kw in ({"mac": b"\x01" * 6}, {"mac": bytes(6)}, {"mac": MAC, "mtu": 67}):
        with pytest.raises(ValueError):
            RndisDevice(**kw)
