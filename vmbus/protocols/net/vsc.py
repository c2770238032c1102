"""The VSC side of NVSP and RNDIS, sans-I/O, as Linux's netvsc does it
(docs/protocol.md §6.4-6.7): the NVSP initialization (`NvspClient`), the RNDIS
requests and their completions (`RndisClient`), and the decoding of what a
host sends, at the sizes Linux accepts (`decode_completion`,
`decode_receive`): hosts send the type field and one union member, not 40
bytes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple

from vmbus.errors import UsageError
from vmbus.protocols.net import rndis_wire as rw
from vmbus.protocols.net.wire import (
    CAPABILITY_IEEE8021Q,
    CAPABILITY_RSC,
    CAPABILITY_SRIOV,
    CAPABILITY_TEAMING,
    MIN_SECTION_SIZE,
    NDIS_VERSION_6_1,
    NDIS_VERSION_6_30,
    NVSP_PROTOCOL_VERSION_1,
    NVSP_PROTOCOL_VERSION_5,
    NVSP_PROTOCOL_VERSION_61,
    NVSP_VERSIONS,
    RECEIVE_BUFFER_ID,
    SEND_BUFFER_ID,
    Buffer,
    NvspError,
    NvspInit,
    NvspInitComplete,
    NvspMessageType,
    NvspStatus,
    RevokeReceiveBuffer,
    RevokeSendBuffer,
    SendNdisConfig,
    SendNdisVersion,
    SendReceiveBuffer,
    SendReceiveBufferComplete,
    SendRndisPacket,
    SendRndisPacketComplete,
    SendSendBuffer,
    SendSendBufferComplete,
    SubChannelComplete,
    SubChannelRequest,
    decode_short,
    encode,
    message_type,
)
from vmbus.wire import WireStruct, open_enum

__all__ = [
    "ETH_HLEN",
    "Completion",
    "Indication",
    "NvspClient",
    "Request",
    "RndisClient",
    "VscState",
    "decode_completion",
    "decode_receive",
    "receive_completion",
]

ETH_HLEN = 14  # Linux's NDIS_CONFIG mtu includes the Ethernet header

# What a host may complete, by message type, decoded at Linux's minimum size.
_HOST_COMPLETIONS: dict[int, type[WireStruct]] = {
    NvspMessageType.INIT_COMPLETE: NvspInitComplete,
    NvspMessageType.SEND_RECV_BUF_COMPLETE: SendReceiveBufferComplete,
    NvspMessageType.SEND_SEND_BUF_COMPLETE: SendSendBufferComplete,
    NvspMessageType.SEND_RNDIS_PKT_COMPLETE: SendRndisPacketComplete,
    NvspMessageType.SUBCHANNEL: SubChannelComplete,
}


def decode_completion(payload: Any) -> WireStruct:
    """A host's completion packet: as short as its type field and member
    (INIT_COMPLETE 16 bytes, SEND_RECV_BUF_COMPLETE 28, SEND_SEND_BUF_COMPLETE
    12, SEND_RNDIS_PKT_COMPLETE 8, SUBCHANNEL 12). NvspError otherwise."""
    kind = message_type(payload)
    cls = _HOST_COMPLETIONS.get(kind)
    if cls is None:
        raise NvspError(f"message type {kind!r} is no completion a VSC expects")
    return decode_short(payload, cls)


def decode_receive(payload: Any) -> SendRndisPacket:
    """The SEND_RNDIS_PKT of a host's transfer-page packet: 16 bytes suffice."""
    return decode_short(payload, SendRndisPacket)


def receive_completion(status: int = NvspStatus.SUCCESS) -> bytes:
    """The completion of a transfer-page packet, 8 bytes as Linux sends it."""
    return SendRndisPacketComplete(status=status).pack()


# --- NVSP initialization ----------------------------------------------------------


class Request(NamedTuple):
    """A message for the VSC to send inband; one with completion_requested awaits a reply."""

    payload: bytes
    completion_requested: bool


class VscState(Enum):
    INIT = "INIT sent"
    RECEIVE_BUFFER = "SEND_RECV_BUF sent"
    SEND_BUFFER = "SEND_SEND_BUF sent"
    READY = "ready"
    SUB_CHANNELS = "SUBCHANNEL sent"


_EXPECTED: dict[VscState, type[WireStruct]] = {
    VscState.INIT: NvspInitComplete,
    VscState.RECEIVE_BUFFER: SendReceiveBufferComplete,
    VscState.SEND_BUFFER: SendSendBufferComplete,
    VscState.SUB_CHANNELS: SubChannelComplete,
}


class NvspClient:
    """The VSC side of initialization, sans-I/O, as Linux does it: INIT for
    each version newest first, then NDIS_CONFIG (NVSP 2+), NDIS_VER,
    SEND_RECV_BUF and SEND_SEND_BUF. `start()` and `receive(reply)` return
    the next requests; `ready` once both buffers are established. A reply
    Linux would refuse raises NvspError."""

    def __init__(
        self,
        recv_gpadl: int,
        recv_buffer_size: int,
        send_gpadl: int,
        send_buffer_size: int,
        *,
        versions: Sequence[int] = NVSP_VERSIONS,
        mtu: int = 1500,
        recv_id: int = RECEIVE_BUFFER_ID,
        send_id: int = SEND_BUFFER_ID,
    ) -> None:
        if not versions:
            raise UsageError("no protocol version to offer")
        self.versions = tuple(versions)
        self.recv = (recv_gpadl, recv_buffer_size, recv_id)
        self.send = (send_gpadl, send_buffer_size, send_id)
        self.mtu = mtu
        self.state = VscState.INIT
        self.version: int | None = None
        self.receive_buffer: Buffer | None = None
        self.send_buffer: Buffer | None = None
        self.sub_channels = 0
        self._tried = 0

    @property
    def ready(self) -> bool:
        return self.state == VscState.READY

    def _init(self) -> list[Request]:
        version = self.versions[self._tried]
        return [Request(encode(NvspInit(min_protocol_ver=version, max_protocol_ver=version)), True)]

    def start(self) -> list[Request]:
        self.state, self._tried = VscState.INIT, 0
        return self._init()

    def receive(self, payload: Any) -> list[Request]:
        """The host's completion of our last request; the next requests."""
        expected = _EXPECTED.get(self.state)
        if expected is None:
            raise NvspError(f"a reply while {self.state.value}")
        reply = decode_short(payload, expected)
        if isinstance(reply, NvspInitComplete):
            return self._init_complete(reply)
        status = getattr(reply, "status")  # noqa: B009 - every other reply has one
        if status != NvspStatus.SUCCESS:
            raise NvspError(f"{self.state.value}: status {open_enum(NvspStatus, status)!r}")
        if isinstance(reply, SendReceiveBufferComplete):
            self.receive_buffer = self._receive_buffer(reply)
            self.state = VscState.SEND_BUFFER
            gpadl, _, send_id = self.send
            return [Request(encode(SendSendBuffer(gpadl_handle=gpadl, id=send_id)), True)]
        if isinstance(reply, SendSendBufferComplete):
            gpadl, size, send_id = self.send
            if reply.section_size < MIN_SECTION_SIZE:
                raise NvspError(f"send section of {reply.section_size} bytes")
            self.send_buffer = Buffer(
                gpadl, send_id, reply.section_size, size // reply.section_size
            )
        elif isinstance(reply, SubChannelComplete):
            self.sub_channels = reply.num_subchannels
        self.state = VscState.READY
        return []

    def _init_complete(self, reply: NvspInitComplete) -> list[Request]:
        if reply.status != NvspStatus.SUCCESS:
            self._tried += 1
            if self._tried == len(self.versions):
                raise NvspError(f"the VSP accepts none of {self.versions}")
            return self._init()
        self.version = version = self.versions[self._tried]
        requests = []
        if version > NVSP_PROTOCOL_VERSION_1:
            capability = CAPABILITY_IEEE8021Q
            if version >= NVSP_PROTOCOL_VERSION_5:
                capability |= CAPABILITY_SRIOV | CAPABILITY_TEAMING
            if version >= NVSP_PROTOCOL_VERSION_61:
                capability |= CAPABILITY_RSC
            config = SendNdisConfig(mtu=self.mtu + ETH_HLEN, capability=capability)
            requests.append(Request(encode(config), False))
        ndis = NDIS_VERSION_6_30 if version >= NVSP_PROTOCOL_VERSION_5 else NDIS_VERSION_6_1
        ndis_version = SendNdisVersion(ndis_major_ver=ndis >> 16, ndis_minor_ver=ndis & 0xFFFF)
        requests.append(Request(encode(ndis_version), False))
        gpadl, _, recv_id = self.recv
        requests.append(Request(encode(SendReceiveBuffer(gpadl_handle=gpadl, id=recv_id)), True))
        self.state = VscState.RECEIVE_BUFFER
        return requests

    def _receive_buffer(self, reply: SendReceiveBufferComplete) -> Buffer:
        """Linux's checks: one section, at offset 0, of sections of 68 bytes
        or more that fit the buffer."""
        gpadl, size, recv_id = self.recv
        count, section = reply.num_sub_allocs, reply.sub_alloc_size
        if reply.num_sections != 1 or reply.offset != 0:
            raise NvspError(f"{reply.num_sections} sections at offset {reply.offset}")
        if section < MIN_SECTION_SIZE or count * section > size:
            raise NvspError(f"{count} sections of {section} bytes in a {size}-byte buffer")
        return Buffer(gpadl, recv_id, section, count)

    def request_sub_channels(self, count: int) -> Request:
        """SUBCHANNEL ALLOCATE (NVSP 5+); the reply says how many were allocated."""
        if self.state != VscState.READY or (self.version or 0) < NVSP_PROTOCOL_VERSION_5:
            raise UsageError(f"cannot ask for sub-channels ({self.state.value}, {self.version})")
        self.state = VscState.SUB_CHANNELS
        return Request(encode(SubChannelRequest(num_subchannels=count)), True)

    def revoke(self) -> list[Request]:
        """Teardown: REVOKE_RECV_BUF and REVOKE_SEND_BUF (no replies)."""
        self.state = VscState.INIT
        return [
            Request(encode(RevokeReceiveBuffer(id=self.recv[2])), False),
            Request(encode(RevokeSendBuffer(id=self.send[2])), False),
        ]


# --- RNDIS requests -----------------------------------------------------------------


@dataclass(frozen=True)
class Completion:
    """The device's answer to one of our requests."""

    request_type: rw.RndisMessageType
    req_id: int
    status: rw.RndisStatus | int
    oid: int | None  # of a QUERY or SET
    info: bytes  # a QUERY's answer
    message: WireStruct  # the fixed part, e.g. the InitializeComplete

    @property
    def succeeded(self) -> bool:
        return self.status == rw.RndisStatus.SUCCESS


@dataclass(frozen=True)
class Indication:
    """An INDICATE_STATUS from the device (MEDIA_CONNECT, LINK_SPEED_CHANGE...)."""

    status: rw.RndisStatus | int
    buffer: bytes


_COMPLETIONS: dict[int, type[WireStruct]] = {
    rw.type_of(cls): cls
    for cls in (rw.InitializeComplete, rw.QueryComplete, rw.SetComplete, rw.KeepaliveComplete)
}


class RndisClient:
    """The VSC side: builds requests with fresh req ids and matches the
    device's completions to them. RndisError for anything Linux would drop."""

    def __init__(self) -> None:
        self._next_id = 1
        self.pending: dict[int, tuple[rw.RndisMessageType, int | None]] = {}  # req_id -> request
        self.init_complete: rw.InitializeComplete | None = None

    def _request(
        self, cls: type[WireStruct], oid: int | None = None, info: bytes = b"", **kw: Any
    ) -> bytes:
        req_id = self._next_id
        while req_id in self.pending or not req_id:
            req_id = (req_id + 1) % (1 << 32)
        self._next_id = (req_id + 1) % (1 << 32)
        if cls is not rw.Halt:  # HALT has no completion
            self.pending[req_id] = (rw.type_of(cls), oid)
        fields = kw if oid is None else {**kw, "oid": oid}
        build: Callable[..., WireStruct] = cls
        return rw.encode(build(req_id=req_id, **fields), info)

    def initialize(self, max_xfer_size: int = 0x4000) -> bytes:
        return self._request(rw.Initialize, max_xfer_size=max_xfer_size)

    def query(self, oid: int, info: bytes = b"") -> bytes:
        """Linux sends an input buffer with the NDIS objects it queries (offload, RSS caps)."""
        return self._request(rw.Query, oid, info)

    def set(self, oid: int, info: bytes) -> bytes:
        return self._request(rw.Set, oid, info)

    def keepalive(self) -> bytes:
        return self._request(rw.Keepalive)

    def halt(self) -> bytes:
        self.init_complete = None
        return self._request(rw.Halt)

    def receive(self, message: Any) -> Completion | Indication:
        msg_type, view = rw.message_view(message)
        if msg_type == rw.RndisMessageType.INDICATE_STATUS:
            indication, buffer = rw.decode(view, rw.IndicateStatus)
            return Indication(open_enum(rw.RndisStatus, indication.status), bytes(buffer))
        cls = _COMPLETIONS.get(msg_type)
        if cls is None:
            raise rw.RndisError(f"message type {msg_type!r} is no completion or indication")
        reply, info = rw.decode(view, cls)
        req_id = getattr(reply, "req_id")  # noqa: B009 - every completion here has one
        request_type, oid = self.pending.get(req_id, (None, None))
        if request_type is None or request_type | rw.COMPLETION != msg_type:
            raise rw.RndisError(f"{msg_type!r} for req_id {req_id}, which is not outstanding")
        del self.pending[req_id]
        status = open_enum(rw.RndisStatus, getattr(reply, "status"))  # noqa: B009
        if isinstance(reply, rw.InitializeComplete) and status == rw.RndisStatus.SUCCESS:
            self.init_complete = reply
        return Completion(request_type, req_id, status, oid, bytes(info), reply)
