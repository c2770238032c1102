"""RNDIS over NVSP: the VSP's RNDIS device (sans-I/O) and a VSC's RNDIS
client. The front door: it re-exports the wire format (`rndis_wire`) and
the OIDs and info-buffer objects (`rndis_data`).

Source: PROTOCOL-FACTS §6.5-6.7 (include/linux/rndis.h,
drivers/net/hyperv/rndis_filter.c), cross-checked with DPDK (hn_rndis.c).

`RndisDevice.control(message)` answers one control message (bytes or None
for HALT); `frame_from_guest` / `frame_to_guest` are the data path. The I/O
layer gets RNDIS bytes from `NvspServer`'s `RndisPacket` events (use
`split_messages` on a send-buffer section: guests batch) and sends what the
device returns through receive-buffer sections.

Choices where the facts leave room:
- INITIALIZE_CMPLT offers max_pkt_per_msg 8 and 8-byte alignment (factor 3;
  DPDK raises anything under 4 to 4) and max_xfer_size MAX_XFER_SIZE.
- No offloads: TCP_OFFLOAD_HARDWARE_CAPABILITIES is a revision-1, 112-byte
  ndis_offload of zeros; TCP_OFFLOAD_PARAMETERS that would enable one is
  INVALID_DATA. One receive queue, so Linux asks for no sub-channels.
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

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any, NoReturn

from vmbus.protocols.net.rndis_data import *  # noqa: F403 - this module is the front door
from vmbus.protocols.net.rndis_data import (
    MEDIA_STATE_CONNECTED,
    MEDIA_STATE_DISCONNECTED,
    NDIS_OBJECT_TYPE_DEFAULT,
    NDIS_OBJECT_TYPE_RSS_PARAMETERS,
    NETWORK_ADDRESS,
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
    OID_GEN_VENDOR_ID,
    OID_GEN_XMIT_OK,
    OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES,
    OID_TCP_OFFLOAD_PARAMETERS,
    PACKET_TYPE_ALL_MULTICAST,
    PACKET_TYPE_BROADCAST,
    PACKET_TYPE_DIRECTED,
    PACKET_TYPE_MULTICAST,
    PACKET_TYPE_PROMISCUOUS,
    RNDIS_CONFIG_PARAM_TYPE_STRING,
    NdisObjectHeader,
    RecvScaleCapabilities,
    decode_config_parameter,
    offload_capabilities,
    u32,
)
from vmbus.protocols.net.rndis_wire import *  # noqa: F403
from vmbus.protocols.net.rndis_wire import (
    COMPLETION,
    MAX_CONTROL_MESSAGE,
    RNDIS_MAJOR_VERSION,
    Halt,
    IndicateStatus,
    Initialize,
    InitializeComplete,
    Keepalive,
    KeepaliveComplete,
    Ppi,
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
    encode,
    encode_packet,
    message_view,
    type_of,
)
from vmbus.wire import WireStruct, open_enum

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


class RndisState(Enum):
    UNINITIALIZED = "not initialized, or halted"
    INITIALIZED = "initialized"


_REQUESTS: dict[int, type[WireStruct]] = {
    type_of(cls): cls for cls in (Initialize, Halt, Query, Set, Reset, Keepalive)
}


def _completion(request: WireStruct, status: int) -> bytes:
    """The completion of a request, empty but for its status."""
    if isinstance(request, Initialize):
        return encode(InitializeComplete(req_id=request.req_id, status=status))
    if isinstance(request, Query):
        return encode(QueryComplete(req_id=request.req_id, status=status))
    if isinstance(request, Set):
        return encode(SetComplete(req_id=request.req_id, status=status))
    if isinstance(request, Keepalive):
        return encode(KeepaliveComplete(req_id=request.req_id, status=status))
    return encode(ResetComplete(status=status))


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
    ) -> None:
        if not _valid_mac(bytes(mac)):
            raise ValueError(f"{bytes(mac).hex(':')} is no unicast MAC address")
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise ValueError(f"mtu {mtu} is not in {MIN_MTU}..{MAX_MTU}")
        if not 0 <= link_speed < 1 << 32 or len(friendly_name) > MAX_FRIENDLY_NAME:
            raise ValueError("link_speed must fit 32 bits, friendly_name 255 characters")
        self.permanent_mac = self.mac = bytes(mac)
        self.mtu = mtu
        self.link_up = link_up
        self.link_speed = link_speed
        self.friendly_name = friendly_name
        self.state = RndisState.UNINITIALIZED
        self._packet_filter = 0
        self.offload_parameters = b""  # the guest's last TCP_OFFLOAD_PARAMETERS
        self.rss_parameters = b""  # and GEN_RECEIVE_SCALE_PARAMETERS
        self.xmit_ok = 0  # frames the guest sent
        self.rcv_ok = 0  # frames given to the guest
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
        raise RndisError(reason)

    def control(self, message: Any) -> bytes | None:
        """The completion of one control message, or None (HALT)."""
        try:
            msg_type, view = message_view(message)
        except RndisError as error:
            self._malformed(str(error))
        cls = _REQUESTS.get(msg_type)
        if cls is None:
            self._malformed(f"message type {msg_type!r} is no control request")
        if not cls.SIZE <= len(view) <= MAX_CONTROL_MESSAGE:
            self._malformed(f"{len(view)}-byte {cls.__name__}")
        request = cls.unpack(view)
        if isinstance(request, Halt):
            self.state, self._packet_filter = RndisState.UNINITIALIZED, 0
            return None
        if isinstance(request, Initialize):
            return self._initialize(request)
        if not self.initialized:
            self.errors["out_of_order"] += 1
            return _completion(request, RndisStatus.FAILURE)
        if isinstance(request, Keepalive | Reset):  # a reset keeps the filter: addressing_reset 0
            return _completion(request, RndisStatus.SUCCESS)
        try:
            _, info = decode(view, cls)
        except RndisError:
            self.errors["bad_info_buffer"] += 1
            return _completion(request, RndisStatus.INVALID_DATA)
        if isinstance(request, Query):
            return self._query(request, info)
        assert isinstance(request, Set)
        status = self._set(request.oid, info)
        if status != RndisStatus.SUCCESS:
            self.errors[
                "unsupported_oid" if status == RndisStatus.NOT_SUPPORTED else "bad_set"
            ] += 1
        return _completion(request, status)

    def _initialize(self, request: Initialize) -> bytes:
        if request.major_ver != RNDIS_MAJOR_VERSION:
            self.errors["bad_version"] += 1
            return _completion(request, RndisStatus.NOT_SUPPORTED)
        self.state, self._packet_filter = RndisState.INITIALIZED, 0
        reply = InitializeComplete(
            req_id=request.req_id,
            max_pkt_per_msg=MAX_PKT_PER_MSG,
            max_xfer_size=MAX_XFER_SIZE,
            pkt_alignment_factor=PKT_ALIGNMENT_FACTOR,
        )
        return encode(reply)

    def _query(self, request: Query, info: memoryview) -> bytes:
        answer = _QUERIES.get(request.oid)
        if answer is None:
            self.errors["unsupported_oid"] += 1
            return _completion(request, RndisStatus.NOT_SUPPORTED)
        value = answer(self, request.info_buflen)
        return encode(QueryComplete(req_id=request.req_id, status=RndisStatus.SUCCESS), value)

    def _set(self, oid: int, info: memoryview) -> int:
        if oid == OID_GEN_CURRENT_PACKET_FILTER:
            if len(info) < 4:
                return RndisStatus.INVALID_LENGTH
            self._packet_filter = int.from_bytes(info[:4], "little")
        elif oid in (OID_TCP_OFFLOAD_PARAMETERS, OID_GEN_RECEIVE_SCALE_PARAMETERS):
            if len(info) < NdisObjectHeader.SIZE:
                return RndisStatus.INVALID_LENGTH
            offload = oid == OID_TCP_OFFLOAD_PARAMETERS
            kind = NDIS_OBJECT_TYPE_DEFAULT if offload else NDIS_OBJECT_TYPE_RSS_PARAMETERS
            if NdisObjectHeader.unpack(info).type != kind:
                return RndisStatus.INVALID_DATA
            if offload:
                # ndis_offload_params: 0 no change, 1 off; the checksum, LSO, IPsec and
                # RSC bytes (4..14, 20..23) may not ask for an offload we do not offer.
                if any(b > 1 for b in bytes(info[4:15]) + bytes(info[20:24])):
                    return RndisStatus.INVALID_DATA
                self.offload_parameters = bytes(info)
            else:
                self.rss_parameters = bytes(info)  # one queue: nothing to spread
        elif oid == OID_GEN_RNDIS_CONFIG_PARAMETER:
            return self._set_config_parameter(info)
        else:
            return RndisStatus.NOT_SUPPORTED
        return RndisStatus.SUCCESS

    def _set_config_parameter(self, info: memoryview) -> int:
        try:
            parameter = decode_config_parameter(info)
            text = parameter.value.decode("utf-16-le").rstrip("\0")
        except (RndisError, UnicodeDecodeError):
            return RndisStatus.INVALID_DATA
        if parameter.name.rstrip("\0").lower() != NETWORK_ADDRESS.lower():
            return RndisStatus.NOT_SUPPORTED
        digits = text.replace("-", "").replace(":", "")
        if parameter.type != RNDIS_CONFIG_PARAM_TYPE_STRING or len(digits) != 12:
            return RndisStatus.INVALID_DATA
        try:
            mac = bytes.fromhex(digits)
        except ValueError:
            return RndisStatus.INVALID_DATA
        if not _valid_mac(mac):
            return RndisStatus.INVALID_DATA
        self.mac = mac
        return RndisStatus.SUCCESS

    def link(self, up: bool) -> bytes:
        """Record the link state and build the INDICATE_STATUS telling the guest."""
        self.link_up = up
        status = RndisStatus.MEDIA_CONNECT if up else RndisStatus.MEDIA_DISCONNECT
        return encode(IndicateStatus(status=status))

    def indicate_link_speed(self, speed: int) -> bytes:
        """Record a new link speed (100 bit/s units) and build its indication."""
        self.link_speed = speed
        return encode(IndicateStatus(status=RndisStatus.LINK_SPEED_CHANGE), u32(speed))

    # --- Data path ---

    def accepts(self, frame: Any) -> bool:
        """Whether the packet filter lets this Ethernet frame reach the guest."""
        wanted = self._packet_filter
        if not self.initialized or not wanted or len(frame) < ETH_HLEN:
            return False
        destination = bytes(frame[:6])
        if wanted & PACKET_TYPE_PROMISCUOUS:
            return True
        if destination == BROADCAST_MAC:
            return bool(wanted & PACKET_TYPE_BROADCAST)
        if destination[0] & 1:
            return bool(wanted & (PACKET_TYPE_MULTICAST | PACKET_TYPE_ALL_MULTICAST))
        return bool(wanted & PACKET_TYPE_DIRECTED) and destination == self.mac

    def frame_to_guest(self, frame: Any, ppis: Iterable[tuple[int, bytes]] = ()) -> bytes | None:
        """The PACKET message carrying `frame`, or None when the filter drops it."""
        if not self.accepts(frame):
            return None
        self.rcv_ok += 1
        return encode_packet(frame, ppis)

    def frame_from_guest(self, message: Any) -> tuple[memoryview, tuple[Ppi, ...]] | None:
        """A PACKET message from the guest: its frame (a view) and PPIs; None,
        and dropped, unless initialized."""
        try:
            frame, ppis = decode_packet(message)
        except RndisError as error:
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


_QUERIES: dict[int, Callable[[RndisDevice, int], bytes]] = {
    OID_GEN_MAXIMUM_FRAME_SIZE: lambda d, _: u32(d.mtu),  # NDIS: without the header
    OID_GEN_LINK_SPEED: lambda d, _: u32(d.link_speed),
    OID_GEN_VENDOR_ID: lambda d, _: u32(VENDOR_ID),
    OID_GEN_CURRENT_PACKET_FILTER: lambda d, _: u32(d.packet_filter),
    OID_GEN_MEDIA_CONNECT_STATUS: lambda d, _: u32(
        MEDIA_STATE_CONNECTED if d.link_up else MEDIA_STATE_DISCONNECTED
    ),
    OID_GEN_FRIENDLY_NAME: lambda d, _: _friendly_name(d),
    OID_802_3_PERMANENT_ADDRESS: lambda d, _: d.permanent_mac,
    OID_802_3_CURRENT_ADDRESS: lambda d, _: d.mac,
    OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES: lambda d, _: offload_capabilities(),
    OID_GEN_RECEIVE_SCALE_CAPABILITIES: lambda d, _: RecvScaleCapabilities().pack(),
    OID_GEN_XMIT_OK: lambda d, room: _counter(d.xmit_ok, room),
    OID_GEN_RCV_OK: lambda d, room: _counter(d.rcv_ok, room),
}
SETTABLE_OIDS = (
    OID_GEN_CURRENT_PACKET_FILTER,
    OID_TCP_OFFLOAD_PARAMETERS,
    OID_GEN_RECEIVE_SCALE_PARAMETERS,
    OID_GEN_RNDIS_CONFIG_PARAMETER,
)
SUPPORTED_OIDS = (OID_GEN_SUPPORTED_LIST, *_QUERIES, *SETTABLE_OIDS)
_QUERIES[OID_GEN_SUPPORTED_LIST] = lambda d, _: b"".join(map(u32, SUPPORTED_OIDS))


# --- The VSC side -------------------------------------------------------------


@dataclass(frozen=True)
class Completion:
    """The device's answer to one of our requests."""

    request_type: RndisMessageType
    req_id: int
    status: RndisStatus | int
    oid: int | None  # of a QUERY or SET
    info: bytes  # a QUERY's answer
    message: WireStruct  # the fixed part, e.g. the InitializeComplete

    @property
    def succeeded(self) -> bool:
        return self.status == RndisStatus.SUCCESS


@dataclass(frozen=True)
class Indication:
    """An INDICATE_STATUS from the device (MEDIA_CONNECT, LINK_SPEED_CHANGE...)."""

    status: RndisStatus | int
    buffer: bytes


_COMPLETIONS: dict[int, type[WireStruct]] = {
    type_of(cls): cls for cls in (InitializeComplete, QueryComplete, SetComplete, KeepaliveComplete)
}


class RndisClient:
    """The VSC side: builds requests with fresh req ids and matches the
    device's completions to them. RndisError for anything Linux would drop."""

    def __init__(self) -> None:
        self._next_id = 1
        self.pending: dict[int, tuple[RndisMessageType, int | None]] = {}  # req_id -> request
        self.init_complete: InitializeComplete | None = None

    def _request(
        self, cls: type[WireStruct], oid: int | None = None, info: bytes = b"", **kw: Any
    ) -> bytes:
        req_id = self._next_id
        while req_id in self.pending or not req_id:
            req_id = (req_id + 1) % (1 << 32)
        self._next_id = (req_id + 1) % (1 << 32)
        if cls is not Halt:  # HALT has no completion
            self.pending[req_id] = (type_of(cls), oid)
        fields = kw if oid is None else {**kw, "oid": oid}
        build: Callable[..., WireStruct] = cls
        return encode(build(req_id=req_id, **fields), info)

    def initialize(self, max_xfer_size: int = 0x4000) -> bytes:
        return self._request(Initialize, max_xfer_size=max_xfer_size)

    def query(self, oid: int, info: bytes = b"") -> bytes:
        """Linux sends an input buffer with the NDIS objects it queries (offload, RSS caps)."""
        return self._request(Query, oid, info)

    def set(self, oid: int, info: bytes) -> bytes:
        return self._request(Set, oid, info)

    def keepalive(self) -> bytes:
        return self._request(Keepalive)

    def halt(self) -> bytes:
        self.init_complete = None
        return self._request(Halt)

    def receive(self, message: Any) -> Completion | Indication:
        msg_type, view = message_view(message)
        if msg_type == RndisMessageType.INDICATE_STATUS:
            indication, buffer = decode(view, IndicateStatus)
            return Indication(open_enum(RndisStatus, indication.status), bytes(buffer))
        cls = _COMPLETIONS.get(msg_type)
        if cls is None:
            raise RndisError(f"message type {msg_type!r} is no completion or indication")
        reply, info = decode(view, cls)
        req_id = getattr(reply, "req_id")  # noqa: B009 - every completion here has one
        request_type, oid = self.pending.get(req_id, (None, None))
        if request_type is None or request_type | COMPLETION != msg_type:
            raise RndisError(f"{msg_type!r} for req_id {req_id}, which is not outstanding")
        del self.pending[req_id]
        status = open_enum(RndisStatus, getattr(reply, "status"))  # noqa: B009
        if isinstance(reply, InitializeComplete) and status == RndisStatus.SUCCESS:
            self.init_complete = reply
        return Completion(request_type, req_id, status, oid, bytes(info), reply)
