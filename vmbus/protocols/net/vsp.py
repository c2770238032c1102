"""The VSP side of NVSP and RNDIS, sans-I/O: `NvspServer` (one network
channel's NVSP state machine), `ReceiveSections` (the receive-buffer
sections lent to the guest) and `RndisDevice` (the adapter's RNDIS).

Source: docs/protocol.md §6.3-6.7 (drivers/net/hyperv/netvsc.c,
rndis_filter.c, include/linux/rndis.h), cross-checked with DPDK (hn_nvs.c,
hn_rndis.c) and FreeBSD (§10.1).

Data path, for the I/O layer around them:
- guest -> host: SEND_RNDIS_PKT (inband naming a send-buffer section, or
  GPA-direct) yields `RndisPacket`; copy the RNDIS bytes out once, give
  them to `RndisDevice.control` (channel CONTROL) or
  `RndisDevice.frames_from_guest` (DATA: guests batch), then complete the
  packet with `encode(SendRndisPacketComplete(status=...))`.
- host -> guest: write each RNDIS message into a section lent by
  `ReceiveSections`, send a transfer-page packet (pageset id = the receive
  buffer's id, completion requested) whose payload is `send_rndis_packet(...)`,
  and free its sections when the guest completes that trans_id.

NVSP choices where the facts leave room: INIT_COMPLETE reports
max_mdl_chain_len = MAX_GPA_RANGES; a refused INIT carries
NVSP_INVALID_PROTOCOL_VERSION; the receive buffer is cut into at most
MAX_RECEIVE_SECTIONS sections (Linux accepts fewer than fit), the send buffer
into all that fit (Linux counts them itself); a second SEND_RECV_BUF /
SEND_SEND_BUF without a revoke, or one naming the other buffer's GPADL, is
refused; SUBCHANNEL is answered once.

RNDIS choices:
- INITIALIZE_CMPLT offers max_pkt_per_msg 8 and 8-byte alignment (factor 3;
  DPDK raises anything under 4 to 4) and max_xfer_size MAX_XFER_SIZE.
- Offloads only when the device is made with them (`offloads=offload.OFFERED`,
  a TAP with IFF_VNET_HDR behind it): TCP_OFFLOAD_HARDWARE_CAPABILITIES is
  then offload.capabilities() (TCP/UDP checksums and LSOv2 over IPv4 and
  IPv6), else a revision-1, 112-byte ndis_offload of zeros;
  TCP_OFFLOAD_PARAMETERS that would enable anything not offered is
  INVALID_DATA. `queues` receive queues (1 by default, so Linux asks for no
  sub-channels; more for vRSS).
- GEN_LINK_SPEED defaults to 10 Gbit/s; VENDOR_ID is 0xFFFFFF (no OUI);
  GEN_XMIT_OK / GEN_RCV_OK are u64 when the query offers 8 bytes, else u32.
- PERMANENT_ADDRESS stays the MAC the device was made with; NetworkAddress
  changes CURRENT_ADDRESS and the receive filter's address.
- The packet filter is applied: directed (to the current MAC), broadcast,
  multicast (MULTICAST or ALL_MULTICAST: no multicast list is kept) and
  promiscuous. Frames flow only between INITIALIZE and HALT.
- Requests before INITIALIZE complete with FAILURE; a malformed info buffer
  with INVALID_DATA (too short for its OID: INVALID_LENGTH); a message too
  short or of a type with no completion raises RndisError, so the I/O layer
  completes the NVSP packet with INVALID_RNDIS_PKT.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, NoReturn

from vmbus.errors import UsageError
from vmbus.packet import MAX_GPA_RANGES
from vmbus.protocols.net import offload as ol
from vmbus.protocols.net import rndis_data as rd
from vmbus.protocols.net import rndis_wire as rw
from vmbus.protocols.net import rsc
from vmbus.protocols.net.wire import (
    DEFAULT_RECV_SECTION_SIZE,
    DEFAULT_SEND_SECTION_SIZE,
    GUEST_MESSAGES,
    INVALID_SECTION_INDEX,
    MAX_RECEIVE_SECTIONS,
    MAX_SECTION_SIZE,
    MAX_SUB_CHANNELS,
    MIN_SECTION_SIZE,
    NVSP_MIN_MESSAGE_SIZE,
    NVSP_PROTOCOL_VERSION_5,
    NVSP_VERSIONS,
    SUBCHANNEL_ALLOCATE,
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
    SendRndisPacket,
    SendRndisPacketComplete,
    SendSendBuffer,
    SendSendBufferComplete,
    SubChannelComplete,
    SubChannelRequest,
    encode,
    type_of,
)
from vmbus.wire import WireStruct, open_enum

__all__ = [
    "AllocateSubChannels",
    "BufferEstablished",
    "BufferRevoked",
    "Event",
    "NoReply",
    "NvspServer",
    "NvspState",
    "ReceiveSections",
    "Reply",
    "RndisDevice",
    "RndisPacket",
    "RndisState",
    "SETTABLE_OIDS",
    "SUPPORTED_OIDS",
]


@dataclass(frozen=True)
class Reply:
    """Send `payload` now, as the completion of the packet."""

    payload: bytes
    error: str | None = None  # why the guest's message was refused (counted in errors)


@dataclass(frozen=True)
class NoReply:
    """Nothing to send: a message without a reply, or one dropped (`error`)."""

    error: str | None = None


@dataclass(frozen=True)
class BufferEstablished:
    """Map the buffer's GPADL, then send `reply` as the completion."""

    kind: BufferKind
    buffer: Buffer
    reply: bytes


@dataclass(frozen=True)
class BufferRevoked:
    """Stop using the buffer (no reply); the guest tears its GPADL down next."""

    kind: BufferKind
    buffer: Buffer


@dataclass(frozen=True)
class RndisPacket:
    """RNDIS bytes to fetch: `section_size` bytes at `offset` in the send
    buffer, or, when section_index is INVALID_SECTION_INDEX (offset None),
    the packet's GPA ranges. Then complete the packet with
    `encode(SendRndisPacketComplete(status=...))`."""

    channel_type: RndisChannel
    section_index: int
    section_size: int
    offset: int | None = None


@dataclass(frozen=True)
class AllocateSubChannels:
    """Offer `count` sub-channels, then send `reply`."""

    count: int
    reply: bytes


Event = Reply | NoReply | BufferEstablished | BufferRevoked | RndisPacket | AllocateSubChannels


class NvspState(Enum):
    WAIT_INIT = "waiting for an acceptable INIT"
    READY = "ready"


_T = NvspMessageType
_REQUESTS: dict[int, type[WireStruct]] = {
    type_of(cls): cls for cls in GUEST_MESSAGES if cls is not SendRndisPacketComplete
}
# What a VSC may send in each state; an accepted INIT moves WAIT_INIT -> READY.
_ACCEPTED: dict[NvspState, frozenset[int]] = {
    NvspState.WAIT_INIT: frozenset({_T.INIT}),
    NvspState.READY: frozenset(_REQUESTS) - {_T.INIT},
}
# The failed completion of each message that has one; the others get none.
_FAILURES: dict[int, Callable[[int], WireStruct]] = {
    _T.INIT: lambda status: NvspInitComplete(status=status),
    _T.SEND_RECV_BUF: lambda status: SendReceiveBufferComplete(status=status),
    _T.SEND_SEND_BUF: lambda status: SendSendBufferComplete(status=status),
    _T.SEND_RNDIS_PKT: lambda status: SendRndisPacketComplete(status=status),
    _T.SUBCHANNEL: lambda status: SubChannelComplete(status=status),
}


def _check_section_size(name: str, size: int) -> None:
    if not MIN_SECTION_SIZE <= size <= MAX_SECTION_SIZE:
        raise UsageError(f"{name} {size} is not in {MIN_SECTION_SIZE}..{MAX_SECTION_SIZE}")


class NvspServer:
    """The VSP side of one network device's primary channel. A hostile guest
    never raises here: a bad message gets a failed completion where its type
    has one, else is dropped; either way it is counted in `errors`."""

    def __init__(
        self,
        recv_section_size: int = DEFAULT_RECV_SECTION_SIZE,
        send_section_size: int = DEFAULT_SEND_SECTION_SIZE,
        versions: Sequence[int] = NVSP_VERSIONS,
        max_sub_channels: int = 0,
    ) -> None:
        _check_section_size("recv_section_size", recv_section_size)
        _check_section_size("send_section_size", send_section_size)
        if not versions or not set(versions) <= set(NVSP_VERSIONS):
            raise UsageError(f"versions {versions!r} must be among {NVSP_VERSIONS!r}")
        if not 0 <= max_sub_channels <= MAX_SUB_CHANNELS:
            raise UsageError(f"max_sub_channels {max_sub_channels} is not in 0..{MAX_SUB_CHANNELS}")
        self.recv_section_size = recv_section_size
        self.send_section_size = send_section_size
        self.versions = tuple(sorted(set(versions), reverse=True))
        self.max_sub_channels = max_sub_channels
        self.state = NvspState.WAIT_INIT
        self.version: int | None = None
        self.ndis_version: tuple[int, int] | None = None
        self.ndis_config: SendNdisConfig | None = None  # Linux's mtu includes ETH_HLEN
        self.receive_buffer: Buffer | None = None
        self.send_buffer: Buffer | None = None
        self.sub_channels = 0
        self.errors: Counter[str] = Counter()

    def receive(self, payload: Any, *, gpadl_sizes: Mapping[int, int]) -> Event:
        """The one answer to one message from the guest (a private copy: it
        is decoded once, here). gpadl_sizes maps the child's established
        GPADL handles to their sizes in bytes."""
        view = memoryview(payload).cast("B")
        msg_type = open_enum(NvspMessageType, int.from_bytes(view[:4], "little"))
        if len(view) < NVSP_MIN_MESSAGE_SIZE:
            reason = f"{len(view)}-byte message, needs {NVSP_MIN_MESSAGE_SIZE}"
            return self._refuse(msg_type, "malformed", reason)
        cls = _REQUESTS.get(msg_type)
        if cls is None:
            return self._refuse(msg_type, "unsupported", f"message type {msg_type!r}")
        if msg_type not in _ACCEPTED[self.state]:
            return self._refuse(msg_type, "out_of_order", f"{msg_type!r} while {self.state.value}")
        message = cls.unpack(view)
        if isinstance(message, NvspInit):
            return self._init(message)
        if isinstance(message, SendNdisVersion):
            self.ndis_version = (message.ndis_major_ver, message.ndis_minor_ver)
            return NoReply()
        if isinstance(message, SendNdisConfig):
            self.ndis_config = message
            return NoReply()
        if isinstance(message, SendReceiveBuffer | SendSendBuffer):
            return self._establish(message, gpadl_sizes)
        if isinstance(message, RevokeReceiveBuffer | RevokeSendBuffer):
            return self._revoke(message)
        if isinstance(message, SendRndisPacket):
            return self._rndis_packet(message)
        assert isinstance(message, SubChannelRequest)
        return self._sub_channels(message)

    def _refuse(
        self, msg_type: int, kind: str, reason: str, status: int = NvspStatus.FAIL
    ) -> Reply | NoReply:
        self.errors[kind] += 1
        failure = _FAILURES.get(msg_type)
        return NoReply(reason) if failure is None else Reply(encode(failure(status)), reason)

    def _init(self, message: NvspInit) -> Event:
        low, high = message.min_protocol_ver, message.max_protocol_ver
        if low > high:
            return self._refuse(_T.INIT, "malformed", f"version range {low:#x}..{high:#x}")
        chosen = next((v for v in self.versions if low <= v <= high), None)
        if chosen is None:  # not an error: the guest tries its next version
            status = NvspStatus.PROTOCOL_UNSUPPORTED
            if high < self.versions[-1]:
                status = NvspStatus.PROTOCOL_TOO_OLD
            elif low > self.versions[0]:
                status = NvspStatus.PROTOCOL_TOO_NEW
            return Reply(encode(NvspInitComplete(status=status)))
        self.version, self.state = chosen, NvspState.READY
        reply = NvspInitComplete(
            negotiated_protocol_ver=chosen,
            max_mdl_chain_len=MAX_GPA_RANGES,  # the ranges one GPA-direct packet may carry
            status=NvspStatus.SUCCESS,
        )
        return Reply(encode(reply))

    def _establish(
        self, message: SendReceiveBuffer | SendSendBuffer, gpadl_sizes: Mapping[int, int]
    ) -> Event:
        receive = isinstance(message, SendReceiveBuffer)
        kind = BufferKind.RECEIVE if receive else BufferKind.SEND
        mine, other = self.receive_buffer, self.send_buffer
        section = self.recv_section_size
        if not receive:
            mine, other, section = other, mine, self.send_section_size
        handle, size = message.gpadl_handle, gpadl_sizes.get(message.gpadl_handle, 0)
        problem = None
        if mine is not None:
            problem = f"the {kind.value} is already established"
        elif handle not in gpadl_sizes:
            problem = f"no GPADL {handle:#x}"
        elif other is not None and other.gpadl_handle == handle:
            problem = f"GPADL {handle:#x} is already the other buffer"
        elif size < section:
            problem = f"a {size}-byte {kind.value} holds no {section}-byte section"
        if problem is not None:
            return self._refuse(message.msg_type, "bad_buffer", problem)
        reply: WireStruct
        if receive:
            count = min(size // section, MAX_RECEIVE_SECTIONS)
            self.receive_buffer = buffer = Buffer(handle, message.id, section, count)
            reply = SendReceiveBufferComplete(
                status=NvspStatus.SUCCESS,
                num_sections=1,
                offset=0,
                sub_alloc_size=section,
                num_sub_allocs=count,
                end_offset=count * section,
            )
        else:
            self.send_buffer = buffer = Buffer(handle, message.id, section, size // section)
            reply = SendSendBufferComplete(status=NvspStatus.SUCCESS, section_size=section)
        return BufferEstablished(kind, buffer, encode(reply))

    def _revoke(self, message: RevokeReceiveBuffer | RevokeSendBuffer) -> Event:
        receive = isinstance(message, RevokeReceiveBuffer)
        kind = BufferKind.RECEIVE if receive else BufferKind.SEND
        buffer = self.receive_buffer if receive else self.send_buffer
        if buffer is None or buffer.id != message.id:
            return self._refuse(message.msg_type, "bad_revoke", f"no {kind.value} {message.id:#x}")
        if receive:
            self.receive_buffer = None
        else:
            self.send_buffer = None
        return BufferRevoked(kind, buffer)

    def _rndis_packet(self, message: SendRndisPacket) -> Event:
        channel = open_enum(RndisChannel, message.channel_type)
        index, size = message.send_buf_section_index, message.send_buf_section_size
        buffer = self.send_buffer
        if not isinstance(channel, RndisChannel):
            problem = f"channel_type {channel}"
        elif index == INVALID_SECTION_INDEX:
            return RndisPacket(channel, index, 0)  # GPA-direct: the ranges give the size
        elif buffer is None:
            problem = f"send-buffer section {index} without a send buffer"
        elif index >= buffer.section_count:
            problem = f"send-buffer section {index} of {buffer.section_count}"
        elif not 0 < size <= buffer.section_size:
            problem = f"{size} bytes in a {buffer.section_size}-byte section"
        else:
            return RndisPacket(channel, index, size, index * buffer.section_size)
        status = NvspStatus.INVALID_RNDIS_PKT
        return self._refuse(_T.SEND_RNDIS_PKT, "bad_rndis_packet", problem, status)

    def _sub_channels(self, message: SubChannelRequest) -> Event:
        version = self.version or 0
        if version < NVSP_PROTOCOL_VERSION_5:
            problem = f"sub-channels need NVSP 5, not {version:#x}"
        elif message.op != SUBCHANNEL_ALLOCATE:
            problem = f"sub-channel op {message.op}"
        elif self.sub_channels:
            problem = "sub-channels were already allocated"
        else:
            count = min(message.num_subchannels, self.max_sub_channels)  # a host may give fewer
            reply = encode(SubChannelComplete(status=NvspStatus.SUCCESS, num_subchannels=count))
            if not count:
                return Reply(reply)
            self.sub_channels = count
            return AllocateSubChannels(count, reply)
        return self._refuse(_T.SUBCHANNEL, "bad_sub_channels", problem)


class ReceiveSections:
    """Receive-buffer sections lent to the guest: each transfer-page packet,
    by trans_id, holds its sections until the guest completes it. A section
    is never lent twice."""

    def __init__(self, section_count: int, section_size: int) -> None:
        if not 0 < section_count <= MAX_RECEIVE_SECTIONS:
            raise UsageError(f"section_count {section_count} is not in 1..{MAX_RECEIVE_SECTIONS}")
        self.section_count = section_count
        self.section_size = section_size
        self._free = deque(range(section_count))
        self._lent: dict[int, tuple[int, ...]] = {}

    @classmethod
    def of(cls, buffer: Buffer) -> ReceiveSections:
        return cls(buffer.section_count, buffer.section_size)

    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def outstanding(self) -> Mapping[int, tuple[int, ...]]:
        """trans_id -> the sections that packet holds."""
        return self._lent

    def offset(self, section: int) -> int:
        """The section's byte offset in the receive buffer (a transfer range's byte_offset)."""
        return section * self.section_size

    def alloc(self, trans_id: int, count: int = 1) -> tuple[int, ...] | None:
        """`count` free sections for packet `trans_id`; None while too few are
        free (flow control: wait for the guest's completions)."""
        if not 0 < count <= self.section_count:
            raise UsageError(f"cannot lend {count} of {self.section_count} sections")
        if trans_id in self._lent:
            raise UsageError(f"trans_id {trans_id:#x} already holds sections")
        if count > len(self._free):
            return None
        sections = tuple(self._free.popleft() for _ in range(count))
        self._lent[trans_id] = sections
        return sections

    def free(self, trans_id: int) -> tuple[int, ...]:
        """The guest completed packet `trans_id`: its sections come back.
        NvspError when it holds none (a completion we never asked for)."""
        sections = self._lent.pop(trans_id, None)
        if sections is None:
            raise NvspError(f"completion for trans_id {trans_id:#x}, which holds no sections")
        self._free.extend(sections)
        return sections


# --- RNDIS ---------------------------------------------------------------------

DEFAULT_LINK_SPEED = 100_000_000  # 10 Gbit/s, in GEN_LINK_SPEED's 100 bit/s units
DEFAULT_FRIENDLY_NAME = "Network Adapter"  # Hyper-V's default, which Linux ignores
MAX_PKT_PER_MSG = 8  # RNDIS messages a guest may batch in one send section
PKT_ALIGNMENT_FACTOR = 3  # batched messages start 8-byte aligned
MAX_XFER_SIZE = 0x20000  # the largest RNDIS message or batch: above a 64 KiB frame
VENDOR_ID = 0xFFFFFF  # NDIS: no IEEE OUI
MIN_MTU, MAX_MTU = 68, 65521  # Linux netvsc's range
MAX_FRIENDLY_NAME = 255  # characters: Linux reads 256 UCS-2 units with the NUL
ETH_HLEN = 14
BROADCAST_MAC = b"\xff" * 6

_S = rw.RndisStatus


class RndisState(Enum):
    UNINITIALIZED = "not initialized, or halted"
    INITIALIZED = "initialized"


def _completion(request: WireStruct, status: int) -> bytes:
    """The completion of a request, empty but for its status."""
    if isinstance(request, rw.Initialize):
        return rw.encode(rw.InitializeComplete(req_id=request.req_id, status=status))
    if isinstance(request, rw.Query):
        return rw.encode(rw.QueryComplete(req_id=request.req_id, status=status))
    if isinstance(request, rw.Set):
        return rw.encode(rw.SetComplete(req_id=request.req_id, status=status))
    if isinstance(request, rw.Keepalive):
        return rw.encode(rw.KeepaliveComplete(req_id=request.req_id, status=status))
    return rw.encode(rw.ResetComplete(status=status))


def _valid_mac(mac: bytes) -> bool:
    return len(mac) == 6 and not mac[0] & 1 and any(mac)  # unicast, not zero


class RndisDevice:
    """The VSP side of one network adapter's RNDIS. A hostile guest never
    raises here except RndisError; refusals are counted in `errors`."""

    def __init__(
        self,
        mac: bytes,
        mtu: int = 1500,
        link_up: bool = True,
        link_speed: int = DEFAULT_LINK_SPEED,
        *,
        friendly_name: str = DEFAULT_FRIENDLY_NAME,
        offloads: ol.Offloads = ol.NO_OFFLOADS,
        queues: int = 1,
    ) -> None:
        if not _valid_mac(bytes(mac)):
            raise UsageError(f"{bytes(mac).hex(':')} is no unicast MAC address")
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise UsageError(f"mtu {mtu} is not in {MIN_MTU}..{MAX_MTU}")
        if not 0 <= link_speed < 1 << 32 or len(friendly_name) > MAX_FRIENDLY_NAME:
            raise UsageError("link_speed must fit 32 bits, friendly_name 255 characters")
        self.permanent_mac = self.mac = bytes(mac)
        self.mtu = mtu
        self.link_up = link_up
        self.link_speed = link_speed
        self.friendly_name = friendly_name
        self.state = RndisState.UNINITIALIZED
        self._packet_filter = 0
        self.offered = offloads  # what TCP_OFFLOAD_HARDWARE_CAPABILITIES reports
        self.queues = queues  # receive queues in GEN_RECEIVE_SCALE_CAPABILITIES (vRSS)
        self.offloads = ol.NO_OFFLOADS  # what the guest enabled
        self.offload_parameters = b""  # the guest's last TCP_OFFLOAD_PARAMETERS
        self.rss_parameters = b""  # and GEN_RECEIVE_SCALE_PARAMETERS
        self.xmit_ok = 0  # frames the guest sent
        self.rcv_ok = 0  # frames given to the guest
        self.coalesced = 0  # of them, coalesced receives (RSC)
        self.errors: Counter[str] = Counter()

    @property
    def initialized(self) -> bool:
        return self.state == RndisState.INITIALIZED

    @property
    def packet_filter(self) -> int:
        """GEN_CURRENT_PACKET_FILTER: no frame reaches the guest while it is 0."""
        return self._packet_filter

    def _malformed(self, reason: str) -> NoReturn:
        self.errors["malformed"] += 1
        raise rw.RndisError(reason)

    def control(self, message: Any) -> bytes | None:
        """The completion of one control message, or None (HALT). The message
        (a private copy) is parsed once, then executed."""
        try:
            request, info = rw.parse_request(message)
        except rw.RndisError as error:
            self._malformed(str(error))
        if isinstance(request, rw.Halt):
            self.state, self._packet_filter = RndisState.UNINITIALIZED, 0
            return None
        if isinstance(request, rw.Initialize):
            return self._initialize(request)
        if not self.initialized:
            self.errors["out_of_order"] += 1
            return _completion(request, _S.FAILURE)
        if isinstance(request, rw.Keepalive | rw.Reset):  # a reset keeps the filter
            return _completion(request, _S.SUCCESS)
        if info is None:
            self.errors["bad_info_buffer"] += 1
            return _completion(request, _S.INVALID_DATA)
        if isinstance(request, rw.Query):
            return self._query(request)
        assert isinstance(request, rw.Set)
        status = self._set(request.oid, info)
        if status != _S.SUCCESS:
            self.errors["unsupported_oid" if status == _S.NOT_SUPPORTED else "bad_set"] += 1
        return _completion(request, status)

    def _initialize(self, request: rw.Initialize) -> bytes:
        if request.major_ver != rw.RNDIS_MAJOR_VERSION:
            self.errors["bad_version"] += 1
            return _completion(request, _S.NOT_SUPPORTED)
        self.state, self._packet_filter = RndisState.INITIALIZED, 0
        reply = rw.InitializeComplete(
            req_id=request.req_id,
            max_pkt_per_msg=MAX_PKT_PER_MSG,
            max_xfer_size=MAX_XFER_SIZE,
            pkt_alignment_factor=PKT_ALIGNMENT_FACTOR,
        )
        return rw.encode(reply)

    def _query(self, request: rw.Query) -> bytes:
        answer = _QUERIES.get(request.oid)
        if answer is None:
            self.errors["unsupported_oid"] += 1
            return _completion(request, _S.NOT_SUPPORTED)
        value = answer(self, request.info_buflen)
        return rw.encode(rw.QueryComplete(req_id=request.req_id, status=_S.SUCCESS), value)

    def _set(self, oid: int, info: memoryview) -> int:
        if oid == rd.OID_GEN_CURRENT_PACKET_FILTER:
            if len(info) < 4:
                return _S.INVALID_LENGTH
            self._packet_filter = int.from_bytes(info[:4], "little")
        elif oid in (rd.OID_TCP_OFFLOAD_PARAMETERS, rd.OID_GEN_RECEIVE_SCALE_PARAMETERS):
            if len(info) < rd.NdisObjectHeader.SIZE:
                return _S.INVALID_LENGTH
            offload = oid == rd.OID_TCP_OFFLOAD_PARAMETERS
            kind = rd.NDIS_OBJECT_TYPE_DEFAULT if offload else rd.NDIS_OBJECT_TYPE_RSS_PARAMETERS
            if rd.NdisObjectHeader.unpack(info).type != kind:
                return _S.INVALID_DATA
            if offload:
                # ndis_offload_params: 0 no change, 1 off; no byte may ask for
                # an offload we do not offer (offload.parse_parameters).
                chosen = ol.parse_parameters(bytes(info), self.offered, self.offloads)
                if chosen is None:
                    return _S.INVALID_DATA
                self.offloads = chosen
                self.offload_parameters = bytes(info)
            else:
                self.rss_parameters = bytes(info)  # one queue: nothing to spread
        elif oid == rd.OID_GEN_RNDIS_CONFIG_PARAMETER:
            return self._set_config_parameter(info)
        else:
            return _S.NOT_SUPPORTED
        return _S.SUCCESS

    def _set_config_parameter(self, info: memoryview) -> int:
        try:
            parameter = rd.decode_config_parameter(info)
            text = parameter.value.decode("utf-16-le").rstrip("\0")
        except (rw.RndisError, UnicodeDecodeError):
            return _S.INVALID_DATA
        if parameter.name.rstrip("\0").lower() != rd.NETWORK_ADDRESS.lower():
            return _S.NOT_SUPPORTED
        digits = text.replace("-", "").replace(":", "")
        if parameter.type != rd.RNDIS_CONFIG_PARAM_TYPE_STRING or len(digits) != 12:
            return _S.INVALID_DATA
        try:
            mac = bytes.fromhex(digits)
        except ValueError:
            return _S.INVALID_DATA
        if not _valid_mac(mac):
            return _S.INVALID_DATA
        self.mac = mac
        return _S.SUCCESS

    def link(self, up: bool) -> bytes:
        """Record the link state and build the INDICATE_STATUS telling the guest."""
        self.link_up = up
        status = _S.MEDIA_CONNECT if up else _S.MEDIA_DISCONNECT
        return rw.encode(rw.IndicateStatus(status=status))

    def indicate_link_speed(self, speed: int) -> bytes:
        """Record a new link speed (100 bit/s units) and build its indication."""
        self.link_speed = speed
        return rw.encode(rw.IndicateStatus(status=_S.LINK_SPEED_CHANGE), rd.u32(speed))

    # --- Data path ---

    def accepts(self, frame: Any) -> bool:
        """Whether the packet filter lets this Ethernet frame reach the guest."""
        wanted = self._packet_filter
        if not self.initialized or not wanted or len(frame) < ETH_HLEN:
            return False
        destination = bytes(frame[:6])
        if wanted & rd.PACKET_TYPE_PROMISCUOUS:
            return True
        if destination == BROADCAST_MAC:
            return bool(wanted & rd.PACKET_TYPE_BROADCAST)
        if destination[0] & 1:
            return bool(wanted & (rd.PACKET_TYPE_MULTICAST | rd.PACKET_TYPE_ALL_MULTICAST))
        return bool(wanted & rd.PACKET_TYPE_DIRECTED) and destination == self.mac

    def frame_to_guest(self, frame: Any, ppis: Iterable[tuple[int, bytes]] = ()) -> bytes | None:
        """The PACKET message carrying `frame`, or None when the filter drops it."""
        if not self.accepts(frame):
            return None
        self.rcv_ok += 1
        return rw.encode_packet(frame, ppis)

    def coalesced_to_guest(
        self, segment: bytes, checksum: int, section_size: int
    ) -> tuple[bytes, ...] | None:
        """The RSC fragments (PACKET messages, each within a receive section)
        carrying one coalesced TCP frame, or None when the filter drops it."""
        if not self.accepts(segment):
            return None
        room = rsc.fragment_room(section_size)
        count = -(-len(segment) // room)
        self.rcv_ok += 1
        self.coalesced += 1
        pkt_id = self.coalesced & 0xFFFF
        return tuple(
            rw.encode_packet(
                segment[i * room : (i + 1) * room],
                rsc.fragment_ppis(i == 0, i == count - 1, pkt_id, checksum),
            )
            for i in range(count)
        )

    def frames_from_guest(self, batch: Any) -> list[tuple[memoryview, tuple[rw.Ppi, ...]]]:
        """The frames (views into `batch`, a private copy) and PPIs of the
        PACKET messages of one send section or GPA-direct packet, each header
        parsed once; none, and dropped (counted), unless initialized."""
        try:
            frames = rw.decode_packets(batch)
        except rw.RndisError as error:
            self._malformed(str(error))
        if not self.initialized:
            self.errors["frame_while_halted"] += len(frames)
            return []
        self.xmit_ok += len(frames)
        return frames

    def frame_from_guest(self, message: Any) -> tuple[memoryview, tuple[rw.Ppi, ...]] | None:
        """One PACKET message from the guest: its frame (a view) and PPIs;
        None, and dropped, unless initialized."""
        try:
            frame, ppis = rw.decode_packet(message)
        except rw.RndisError as error:
            self._malformed(str(error))
        if not self.initialized:
            self.errors["frame_while_halted"] += 1
            return None
        self.xmit_ok += 1
        return frame, ppis


def _counter(value: int, room: int) -> bytes:
    """NDIS statistics: u64 when the query offers 8 bytes, else u32."""
    size = 8 if room >= 8 else 4
    return (value % (1 << 8 * size)).to_bytes(size, "little")


def _friendly_name(device: RndisDevice) -> bytes:
    name = device.friendly_name
    return (name + "\0").encode("utf-16-le") if name else b""  # empty: "name not set"


def _media(device: RndisDevice) -> int:
    return rd.MEDIA_STATE_CONNECTED if device.link_up else rd.MEDIA_STATE_DISCONNECTED


_QUERIES: dict[int, Callable[[RndisDevice, int], bytes]] = {
    rd.OID_GEN_MAXIMUM_FRAME_SIZE: lambda d, _: rd.u32(d.mtu),  # NDIS: without the header
    rd.OID_GEN_LINK_SPEED: lambda d, _: rd.u32(d.link_speed),
    rd.OID_GEN_VENDOR_ID: lambda d, _: rd.u32(VENDOR_ID),
    rd.OID_GEN_CURRENT_PACKET_FILTER: lambda d, _: rd.u32(d.packet_filter),
    rd.OID_GEN_MEDIA_CONNECT_STATUS: lambda d, _: rd.u32(_media(d)),
    rd.OID_GEN_FRIENDLY_NAME: lambda d, _: _friendly_name(d),
    rd.OID_802_3_PERMANENT_ADDRESS: lambda d, _: d.permanent_mac,
    rd.OID_802_3_CURRENT_ADDRESS: lambda d, _: d.mac,
    rd.OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES: lambda d, _: (
        ol.capabilities() if d.offered.any else rd.offload_capabilities()
    ),
    rd.OID_GEN_RECEIVE_SCALE_CAPABILITIES: lambda d, _: rd.RecvScaleCapabilities(
        num_int_msg=d.queues, num_recv_que=d.queues
    ).pack(),
    rd.OID_GEN_XMIT_OK: lambda d, room: _counter(d.xmit_ok, room),
    rd.OID_GEN_RCV_OK: lambda d, room: _counter(d.rcv_ok, room),
}
SETTABLE_OIDS = (
    rd.OID_GEN_CURRENT_PACKET_FILTER,
    rd.OID_TCP_OFFLOAD_PARAMETERS,
    rd.OID_GEN_RECEIVE_SCALE_PARAMETERS,
    rd.OID_GEN_RNDIS_CONFIG_PARAMETER,
)
SUPPORTED_OIDS = (rd.OID_GEN_SUPPORTED_LIST, *_QUERIES, *SETTABLE_OIDS)
_QUERIES[rd.OID_GEN_SUPPORTED_LIST] = lambda d, _: b"".join(map(rd.u32, SUPPORTED_OIDS))
