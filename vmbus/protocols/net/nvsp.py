"""NVSP, the netvsc/netvsp protocol: the VSP state machine (sans-I/O) and the
receive-buffer section allocator. The front door: it re-exports the wire
format (`nvsp_wire`) and the VSC side (`nvsp_client`).

Source: PROTOCOL-FACTS §6.3-6.4 (drivers/net/hyperv/netvsc.c), cross-checked
with DPDK (hn_nvs.c) and FreeBSD (§10).

Data path, for the I/O layer around `NvspServer`:
- guest -> host: SEND_RNDIS_PKT (inband naming a send-buffer section, or
  GPA-direct) yields `RndisPacket`; fetch the RNDIS bytes, hand them to
  `vmbus.protocols.net.rndis`, then complete the packet with
  `encode(SendRndisPacketComplete(status=...))`.
- host -> guest: write each RNDIS message into a section lent by
  `ReceiveSections`, send a transfer-page packet (pageset id = the receive
  buffer's id, completion requested) whose payload is `send_rndis_packet(...)`,
  and free its sections when the guest completes that trans_id.

Choices where the facts leave room: INIT_COMPLETE reports max_mdl_chain_len
= MAX_GPA_RANGES; a refused INIT carries NVSP_INVALID_PROTOCOL_VERSION; the
receive buffer is cut into at most MAX_RECEIVE_SECTIONS sections (Linux
accepts fewer than fit), the send buffer into all that fit (Linux counts them
itself); a second SEND_RECV_BUF / SEND_SEND_BUF without a revoke, or one
naming the other buffer's GPADL, is refused; SUBCHANNEL is answered once.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from vmbus.packet import MAX_GPA_RANGES
from vmbus.protocols.net import nvsp_wire
from vmbus.protocols.net.nvsp_client import *  # noqa: F403 - this module is the front door
from vmbus.protocols.net.nvsp_wire import *  # noqa: F403
from vmbus.protocols.net.nvsp_wire import (
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
    decode,
    encode,
    message_type,
    type_of,
)
from vmbus.wire import WireStruct, open_enum


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
        raise ValueError(f"{name} {size} is not in {MIN_SECTION_SIZE}..{MAX_SECTION_SIZE}")


class NvspServer:
    """The VSP side of one network device's primary channel. A hostile guest
    never raises here: a bad message gets a failed completion where its type
    has one, else is dropped; either way it is counted in `errors`."""

    def __init__(
        self,
        recv_section_size: int = nvsp_wire.DEFAULT_RECV_SECTION_SIZE,
        send_section_size: int = nvsp_wire.DEFAULT_SEND_SECTION_SIZE,
        versions: Sequence[int] = NVSP_VERSIONS,
        max_sub_channels: int = 0,
    ) -> None:
        _check_section_size("recv_section_size", recv_section_size)
        _check_section_size("send_section_size", send_section_size)
        if not versions or not set(versions) <= set(NVSP_VERSIONS):
            raise ValueError(f"versions {versions!r} must be among {NVSP_VERSIONS!r}")
        if not 0 <= max_sub_channels <= MAX_SUB_CHANNELS:
            raise ValueError(f"max_sub_channels {max_sub_channels} is not in 0..{MAX_SUB_CHANNELS}")
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
        """The one answer to one message from the guest. gpadl_sizes maps the
        child's established GPADL handles to their sizes in bytes."""
        view = memoryview(payload).cast("B")
        msg_type = message_type(view) if len(view) >= 4 else _T.NONE
        if len(view) < NVSP_MIN_MESSAGE_SIZE:
            reason = f"{len(view)}-byte message, needs {NVSP_MIN_MESSAGE_SIZE}"
            return self._refuse(msg_type, "malformed", reason)
        if msg_type not in _REQUESTS:
            return self._refuse(msg_type, "unsupported", f"message type {msg_type!r}")
        if msg_type not in _ACCEPTED[self.state]:
            return self._refuse(msg_type, "out_of_order", f"{msg_type!r} while {self.state.value}")
        message = decode(view, _REQUESTS[msg_type])
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
            raise ValueError(f"section_count {section_count} is not in 1..{MAX_RECEIVE_SECTIONS}")
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
            raise ValueError(f"cannot lend {count} of {self.section_count} sections")
        if trans_id in self._lent:
            raise ValueError(f"trans_id {trans_id:#x} already holds sections")
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
