"""The VSC side of NVSP initialization, sans-I/O, as Linux's netvsc does it
(PROTOCOL-FACTS §6.4); `vmbus.protocols.net.nvsp` re-exports it."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Any, NamedTuple

from vmbus.protocols.net.nvsp_wire import (
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
    NvspStatus,
    RevokeReceiveBuffer,
    RevokeSendBuffer,
    SendNdisConfig,
    SendNdisVersion,
    SendReceiveBuffer,
    SendReceiveBufferComplete,
    SendSendBuffer,
    SendSendBufferComplete,
    SubChannelComplete,
    SubChannelRequest,
    decode,
    encode,
)
from vmbus.wire import WireStruct, open_enum

ETH_HLEN = 14  # Linux's NDIS_CONFIG mtu includes the Ethernet header


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
            raise ValueError("no protocol version to offer")
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
        expected = _EXPECTED.get(self.state)
        if expected is None:
            raise NvspError(f"a reply while {self.state.value}")
        reply = decode(payload, expected)
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
            raise ValueError(f"cannot ask for sub-channels ({self.state.value}, {self.version})")
        self.state = VscState.SUB_CHANNELS
        return Request(encode(SubChannelRequest(num_subchannels=count)), True)

    def revoke(self) -> list[Request]:
        """Teardown: REVOKE_RECV_BUF and REVOKE_SEND_BUF (no replies)."""
        self.state = VscState.INIT
        return [
            Request(encode(RevokeReceiveBuffer(id=self.recv[2])), False),
            Request(encode(RevokeSendBuffer(id=self.send[2])), False),
        ]
