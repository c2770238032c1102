"""The VSP side of VSTOR, sans-I/O: one state machine per storage device
(its primary channel and sub-channels share it).

`StorvspProtocol.receive` takes one packet's payload (and the checked GPA
ranges of a GPA-direct packet) and returns exactly one event. The payload is
copied once and every field decoded once: the header, then the one union
member its operation names. An `ExecuteSrb` carries that parse (the SRB, its
CDB as private bytes, the ranges) to the I/O layer, which moves the data and
calls `complete_srb`; nothing reads the ring again for that request.

The caller sends replies as completions echoing the packet's transaction
id. A hostile guest never raises here: a bad packet is answered with a
non-zero NTSTATUS (a bad SRB with an SRB error status) and counted in
`StorvspProtocol.errors`. Before a version is agreed guests use either
packet size (recent Linux and FreeBSD 64, UEFI 48); the VSP answers in the
size it was asked in, and in the negotiated size afterwards.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum

from vmbus.errors import UsageError
from vmbus.packet import PAGE_SIZE, GpaRange
from vmbus.protocols.storage.wire import (
    MAX_CDB_LENGTH,
    MAX_SUB_CHANNELS,
    MAX_TRANSFER_BYTES_LIMIT,
    PRE_WIN8_VSTOR_PACKET_SIZE,
    SCSI_MAX_LUNS,
    SCSI_MAX_PATHS,
    SCSI_MAX_TARGETS,
    SENSE_BUFFER_SIZE,
    STATUS_INVALID_DEVICE_STATE,
    STATUS_INVALID_PARAMETER,
    STATUS_NOT_SUPPORTED,
    STATUS_REVISION_MISMATCH,
    STATUS_SUCCESS,
    STORAGE_CHANNEL_SUPPORTS_MULTI_CHANNEL,
    VSP_VERSIONS,
    VSTOR_HEADER_SIZE,
    VSTOR_PACKET_SIZE,
    VSTOR_VERSION_WIN8,
    DataDirection,
    Operation,
    ProtocolVersion,
    SrbStatus,
    StorageChannelProperties,
    SubChannelCount,
    VmScsiRequest,
    VstorHeader,
    packet_size,
    sense_buffer_size,
)
from vmbus.wire import open_enum

__all__ = [
    "CreateSubChannels",
    "Event",
    "ExecuteSrb",
    "Reply",
    "StorvspProtocol",
    "VspState",
]

_COMPLETE_IO = VstorHeader(Operation.COMPLETE_IO, 0, STATUS_SUCCESS).pack()


def _completion(status: int, body: bytes, size: int) -> bytes:
    """A host reply: COMPLETE_IO with `status` and the union `body`, in `size` bytes."""
    header = _COMPLETE_IO if status == STATUS_SUCCESS else VstorHeader(1, 0, status).pack()
    return (header + body).ljust(VSTOR_PACKET_SIZE, b"\0")[:size]


def _failed_srb(request: VmScsiRequest, srb_status: int) -> bytes:
    """The vm_srb of a refused request: no data moved, no sense."""
    return replace(
        request, srb_status=srb_status, scsi_status=0, sense_info_length=0, data_transfer_length=0
    ).pack()


@dataclass(frozen=True)
class Reply:
    """Send `payload` now, as the completion of the packet."""

    payload: bytes
    error: str | None = None  # why the guest's packet was refused (counted in errors)


@dataclass(frozen=True)
class ExecuteSrb:
    """A valid SCSI request, parsed once: move the data through `ranges`,
    then send `StorvspProtocol.complete_srb(request, ...)`. `cdb` is the
    request's CDB, private bytes; the direction is data_in's; srb_flags pass
    through unchecked."""

    request: VmScsiRequest
    direction: DataDirection
    ranges: tuple[GpaRange, ...] = ()
    cdb: bytes = b""

    @property
    def lun(self) -> int:
        return self.request.lun

    @property
    def address(self) -> tuple[int, int, int]:
        """(path_id, target_id, lun)."""
        return self.request.path_id, self.request.target_id, self.request.lun

    @property
    def transfer_length(self) -> int:
        return self.request.data_transfer_length


@dataclass(frozen=True)
class CreateSubChannels:
    """Offer `count` sub-channels, then send `reply`."""

    count: int
    reply: bytes


Event = Reply | ExecuteSrb | CreateSubChannels


class VspState(Enum):
    WAIT_BEGIN = "waiting for BEGIN_INITIALIZATION"
    WAIT_VERSION = "waiting for an acceptable QUERY_PROTOCOL_VERSION"
    WAIT_PROPERTIES = "waiting for QUERY_PROPERTIES"
    WAIT_END = "waiting for END_INITIALIZATION"
    READY = "ready"


# (state, operation) -> the state after it succeeds. Any other pair is out of order.
_VSP_TRANSITIONS = {
    (VspState.WAIT_BEGIN, Operation.BEGIN_INITIALIZATION): VspState.WAIT_VERSION,
    (VspState.WAIT_VERSION, Operation.QUERY_PROTOCOL_VERSION): VspState.WAIT_PROPERTIES,
    (VspState.WAIT_PROPERTIES, Operation.QUERY_PROPERTIES): VspState.WAIT_END,
    (VspState.WAIT_END, Operation.END_INITIALIZATION): VspState.READY,
    (VspState.READY, Operation.EXECUTE_SRB): VspState.READY,
    (VspState.READY, Operation.RESET_LUN): VspState.READY,
    (VspState.READY, Operation.RESET_ADAPTER): VspState.READY,
    (VspState.READY, Operation.RESET_BUS): VspState.READY,
    (VspState.READY, Operation.CREATE_SUB_CHANNELS): VspState.READY,
}
_VSP_OPERATIONS = frozenset(op for _, op in _VSP_TRANSITIONS)


class StorvspProtocol:
    """The VSP side of one storage device. max_channel_count counts the
    primary: more than 1 offers max_channel_count - 1 sub-channels from
    protocol 5.1 on. Addresses past (max_paths, max_targets, max_luns) are
    refused here as errors; which addresses inside them hold a device is the
    I/O layer's to say."""

    def __init__(
        self,
        max_transfer_bytes: int,
        max_channel_count: int = 1,
        *,
        accept_versions: Sequence[int] = VSP_VERSIONS,
        max_paths: int = SCSI_MAX_PATHS,
        max_targets: int = SCSI_MAX_TARGETS,
        max_luns: int = SCSI_MAX_LUNS,
    ) -> None:
        if not PAGE_SIZE <= max_transfer_bytes <= MAX_TRANSFER_BYTES_LIMIT:
            raise UsageError(f"max_transfer_bytes {max_transfer_bytes} is not in 4 KiB..32 MiB")
        if not 1 <= max_channel_count <= 1 + MAX_SUB_CHANNELS:
            raise UsageError(f"max_channel_count {max_channel_count} is not in 1..65")
        if not accept_versions or any(not 0 < v <= 0xFFFF for v in accept_versions):
            raise UsageError(f"accept_versions {accept_versions!r} must be u16 versions")
        self.max_transfer_bytes = max_transfer_bytes
        self.max_channel_count = max_channel_count
        self.accept_versions = tuple(accept_versions)
        self.limits = (max_paths, max_targets, max_luns)
        self.state = VspState.WAIT_BEGIN
        self.version: int | None = None
        self.sub_channels = 0
        self.errors: Counter[str] = Counter()

    @property
    def packet_size(self) -> int:
        if self.version is None:
            raise UsageError("no protocol version negotiated yet")
        return packet_size(self.version)

    @property
    def max_sub_channels(self) -> int:
        """What QUERY_PROPERTIES offers: none before Win8 (64-byte packets)."""
        if self.version is None or self.version < VSTOR_VERSION_WIN8:
            return 0
        return self.max_channel_count - 1

    def receive(
        self,
        payload: bytes | bytearray | memoryview,
        ranges: Sequence[GpaRange] = (),
        *,
        primary: bool = True,
    ) -> Event:
        """The one answer to one packet from the guest. `ranges` are the GPA
        ranges of a GPA-direct packet, already checked against guest memory;
        `primary`: it came on the primary channel (sub-channels are asked
        for there only)."""
        view = memoryview(payload).cast("B")
        if self.version is None:  # answer in the size we were asked in
            size = minimum = PRE_WIN8_VSTOR_PACKET_SIZE
            if len(view) >= VSTOR_PACKET_SIZE:
                size = VSTOR_PACKET_SIZE
        else:
            size = minimum = self.packet_size
        # The one private copy: the guest cannot change it between check and
        # use. A pre-Win8 packet gets a zero Win8 extension.
        private = bytes(view[:size]).ljust(VSTOR_PACKET_SIZE, b"\0")
        op = open_enum(Operation, VstorHeader.unpack_from(private).operation)
        if len(view) < minimum:
            reason = f"{len(view)}-byte packet, needs {minimum}"
            return self._refuse(op, private, size, STATUS_INVALID_PARAMETER, "malformed", reason)
        if op not in _VSP_OPERATIONS:
            reason = f"operation {op!r} is not one a VSC sends to this VSP"
            return self._refuse(op, private, size, STATUS_NOT_SUPPORTED, "unsupported", reason)
        after = _VSP_TRANSITIONS.get((self.state, Operation(op)))
        if after is None:
            reason = f"{Operation(op).name} while {self.state.value}"
            status = STATUS_INVALID_DEVICE_STATE
            return self._refuse(op, private, size, status, "out_of_order", reason)
        event, advance = self._handle(Operation(op), private, size, ranges, primary)
        if advance:
            self.state = after
        return event

    def _handle(
        self, op: Operation, private: bytes, size: int, ranges: Sequence[GpaRange], primary: bool
    ) -> tuple[Event, bool]:
        body = private[VSTOR_HEADER_SIZE:]
        if op == Operation.EXECUTE_SRB:
            return self._execute_srb(private, size, ranges), True
        if op == Operation.QUERY_PROTOCOL_VERSION:
            version = ProtocolVersion.unpack_from(private, VSTOR_HEADER_SIZE).major_minor
            if version not in self.accept_versions:  # the guest tries its next one
                return Reply(_completion(STATUS_REVISION_MISMATCH, body, size)), False
            self.version = version
        elif op == Operation.QUERY_PROPERTIES:
            subs = self.max_sub_channels
            properties = StorageChannelProperties(
                max_channel_cnt=subs,
                flags=STORAGE_CHANNEL_SUPPORTS_MULTI_CHANNEL if subs else 0,
                max_transfer_bytes=self.max_transfer_bytes,
            )
            return Reply(_completion(STATUS_SUCCESS, properties.pack(), size)), True
        elif op == Operation.CREATE_SUB_CHANNELS:
            return self._create_sub_channels(private, size, primary)
        # BEGIN/END_INITIALIZATION, and resets: outstanding SRBs complete on their own.
        return Reply(_completion(STATUS_SUCCESS, body, size)), True

    def _refuse(
        self,
        op: Operation | int,
        private: bytes,
        size: int,
        status: int,
        kind: str,
        reason: str,
        request: VmScsiRequest | None = None,
    ) -> Reply:
        """Complete a bad packet with `status`; an SRB also fails as an SRB
        (decoded here unless the caller already has it)."""
        self.errors[kind] += 1
        body = private[VSTOR_HEADER_SIZE:]
        if op == Operation.EXECUTE_SRB:
            srb = request or VmScsiRequest.unpack_from(private, VSTOR_HEADER_SIZE)
            body = _failed_srb(srb, SrbStatus.INVALID_REQUEST)
        return Reply(_completion(status, body, size), reason)

    def _execute_srb(self, private: bytes, size: int, ranges: Sequence[GpaRange]) -> Event:
        request = VmScsiRequest.unpack_from(private, VSTOR_HEADER_SIZE)
        problem = self._srb_problem(request, ranges)
        srb_status = SrbStatus.INVALID_REQUEST
        if problem is None:
            paths, targets, luns = self.limits
            if request.path_id < paths and request.target_id < targets and request.lun < luns:
                cdb = request.data[: request.cdb_length]
                return ExecuteSrb(request, DataDirection(request.data_in), tuple(ranges), cdb)
            problem = f"no LUN {request.path_id}:{request.target_id}:{request.lun}"
            srb_status = SrbStatus.INVALID_LUN
        self.errors["bad_srb"] += 1
        return Reply(_completion(STATUS_SUCCESS, _failed_srb(request, srb_status), size), problem)

    def _srb_problem(self, request: VmScsiRequest, ranges: Sequence[GpaRange]) -> str | None:
        if not 1 <= request.cdb_length <= MAX_CDB_LENGTH:
            return f"cdb_length {request.cdb_length} is not in 1..{MAX_CDB_LENGTH}"
        if request.sense_info_length > SENSE_BUFFER_SIZE:
            return f"sense_info_length {request.sense_info_length} is over {SENSE_BUFFER_SIZE}"
        direction = open_enum(DataDirection, request.data_in)
        if not isinstance(direction, DataDirection):
            return f"data_in {request.data_in} is no direction"
        length = request.data_transfer_length
        if length > self.max_transfer_bytes:
            return f"transfer of {length} bytes is over max_transfer_bytes"
        if direction == DataDirection.UNKNOWN_TYPE and length:
            return f"UNKNOWN_TYPE (no data) with a {length}-byte transfer"
        buffer = sum(r.byte_count for r in ranges)
        if length > buffer:
            return f"transfer of {length} bytes into a {buffer}-byte buffer"
        return None

    def _create_sub_channels(self, private: bytes, size: int, primary: bool) -> tuple[Event, bool]:
        count = SubChannelCount.unpack_from(private, VSTOR_HEADER_SIZE).sub_channel_count
        limit = self.max_sub_channels
        if not primary:
            status, reason = STATUS_INVALID_DEVICE_STATE, "asked for on a sub-channel"
        elif not limit:
            status, reason = STATUS_NOT_SUPPORTED, "sub-channels are not offered"
        elif self.sub_channels:
            status, reason = STATUS_INVALID_DEVICE_STATE, "sub-channels were already created"
        elif not 1 <= count <= limit:
            status, reason = STATUS_INVALID_PARAMETER, f"{count} sub-channels, not 1..{limit}"
        else:
            self.sub_channels = count
            reply = _completion(STATUS_SUCCESS, private[VSTOR_HEADER_SIZE:], size)
            return CreateSubChannels(count, reply), True
        op = Operation.CREATE_SUB_CHANNELS
        return self._refuse(op, private, size, status, "bad_sub_channels", reason), False

    def complete_srb(
        self,
        request: VmScsiRequest,
        srb_status: int,
        scsi_status: int = 0,
        sense: bytes = b"",
        transferred: int = 0,
    ) -> bytes:
        """The reply to an `ExecuteSrb`. Sense is cut to the room the guest
        gave and the protocol allows; when any is left, AUTOSENSE_VALID is set."""
        if not 0 <= transferred <= request.data_transfer_length:
            raise UsageError(f"{transferred} bytes transferred of {request.data_transfer_length}")
        room = min(request.sense_info_length, sense_buffer_size(self.version or 0))
        sense = bytes(sense[:room])
        if sense:
            srb_status |= SrbStatus.AUTOSENSE_VALID
        result = replace(
            request,
            srb_status=srb_status,
            scsi_status=scsi_status,
            sense_info_length=len(sense),
            data_transfer_length=transferred,
            data=sense,
        )
        return _completion(STATUS_SUCCESS, result.pack(), self.packet_size)
