"""The VSC side of VSTOR, sans-I/O: the initialization state machine
(`StorvscProtocol`), and the build of an SRB and the parse of its
completion, each through the declared structs of `wire`.

The init machine's `start()` is the first packet; `receive(reply)` returns
the next one, or None once ready. Send each inband with trans_id
VMBUS_RQST_INIT and COMPLETION_REQUESTED.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from vmbus.errors import UsageError
from vmbus.protocols.storage.wire import (
    MAX_CDB_LENGTH,
    PRE_WIN8_VMSCSI_REQUEST_SIZE,
    SRB_STATUS_FLAGS,
    STATUS_SUCCESS,
    STORAGE_CHANNEL_SUPPORTS_MULTI_CHANNEL,
    VMSCSI_REQUEST_SIZE,
    VSC_VERSIONS,
    VSTOR_PACKET_SIZE,
    VSTOR_VERSION_WIN8,
    VSTOR_VERSION_WIN10,
    DataDirection,
    Operation,
    ProtocolVersion,
    SrbFlags,
    SrbStatus,
    StorageChannelProperties,
    StorageProtocolError,
    SubChannelCount,
    VmScsiRequest,
    VstorPacket,
    packet_size,
    sense_buffer_size,
)
from vmbus.wire import WireError, open_enum

__all__ = [
    "SrbCompletion",
    "StorvscProtocol",
    "VscState",
    "build_srb",
    "parse_completion",
]


@dataclass(frozen=True)
class SrbCompletion:
    """The result of one SRB, as the VSP reported it."""

    status: int  # vstor_packet.status
    srb_status: int  # with its flag bits
    scsi_status: int
    sense: bytes
    transferred: int

    @property
    def succeeded(self) -> bool:
        return self.srb_status & ~SRB_STATUS_FLAGS == SrbStatus.SUCCESS


def _decode_reply(payload: bytes | bytearray | memoryview) -> VstorPacket:
    try:
        packet = VstorPacket.decode(payload)
    except WireError as error:
        raise StorageProtocolError(str(error)) from None
    if packet.operation != Operation.COMPLETE_IO:
        raise StorageProtocolError(f"reply is operation {open_enum(Operation, packet.operation)!r}")
    return packet


def parse_completion(payload: bytes | bytearray | memoryview) -> SrbCompletion:
    """Decode the VSP's reply to an EXECUTE_SRB. Sense bytes count only when
    AUTOSENSE_VALID says so (as Linux copies them); they stop at the union,
    as Linux clamps sense_info_length."""
    reply = _decode_reply(payload)
    srb = VmScsiRequest.unpack(reply.body)
    sense = srb.sense if srb.srb_status & SrbStatus.AUTOSENSE_VALID else b""
    return SrbCompletion(
        reply.status, srb.srb_status, srb.scsi_status, sense, srb.data_transfer_length
    )


_DIRECTION_FLAGS = {
    DataDirection.WRITE_TYPE: SrbFlags.DATA_OUT,
    DataDirection.READ_TYPE: SrbFlags.DATA_IN,
    DataDirection.UNKNOWN_TYPE: SrbFlags.NO_DATA_TRANSFER,
}


def build_srb(
    cdb: bytes,
    lun: int,
    direction: DataDirection | int,
    transfer_length: int,
    sense_info_length: int | None = None,
    *,
    target_id: int = 0,
    path_id: int = 0,
    port_number: int = 0,
    srb_flags: int | None = None,
    time_out_value: int = 60,
    version: int = VSTOR_VERSION_WIN10,
) -> bytes:
    """An EXECUTE_SRB packet as Linux builds it; sense_info_length defaults to
    the version's sense buffer (20, or 18 before Win8)."""
    if not 1 <= len(cdb) <= MAX_CDB_LENGTH:
        raise UsageError(f"a CDB is 1..{MAX_CDB_LENGTH} bytes, got {len(cdb)}")
    direction = DataDirection(direction)
    if srb_flags is None:
        srb_flags = SrbFlags.DISABLE_SYNCH_TRANSFER | _DIRECTION_FLAGS[direction]
    win8 = version >= VSTOR_VERSION_WIN8
    if sense_info_length is None:
        sense_info_length = sense_buffer_size(version)
    request = VmScsiRequest(
        VMSCSI_REQUEST_SIZE if win8 else PRE_WIN8_VMSCSI_REQUEST_SIZE,
        port_number=port_number,
        path_id=path_id,
        target_id=target_id,
        lun=lun,
        cdb_length=len(cdb),
        sense_info_length=sense_info_length,
        data_in=direction,
        data_transfer_length=transfer_length,
        data=cdb,
        srb_flags=srb_flags,
        time_out_value=time_out_value,
    )
    return VstorPacket(Operation.EXECUTE_SRB, body=request.pack()).encode(packet_size(version))


class VscState(Enum):
    BEGIN = "BEGIN_INITIALIZATION sent"
    VERSION = "QUERY_PROTOCOL_VERSION sent"
    PROPERTIES = "QUERY_PROPERTIES sent"
    END = "END_INITIALIZATION sent"
    READY = "ready"
    SUB_CHANNELS = "CREATE_SUB_CHANNELS sent"


class StorvscProtocol:
    """The VSC side of initialization, sans-I/O. `start()` is the first
    packet; `receive(reply)` returns the next one, or None once ready. Send
    each inband with trans_id VMBUS_RQST_INIT and COMPLETION_REQUESTED.
    Packets before a version is agreed are `initial_size` bytes (UEFI: 48)."""

    def __init__(
        self, versions: Sequence[int] = VSC_VERSIONS, initial_size: int = VSTOR_PACKET_SIZE
    ) -> None:
        if not versions:
            raise UsageError("no protocol version to offer")
        self.versions = tuple(versions)
        self.initial_size = initial_size
        self.state = VscState.BEGIN
        self.version: int | None = None
        self.properties: StorageChannelProperties | None = None
        self._tried = 0

    @property
    def packet_size(self) -> int:
        return self.initial_size if self.version is None else packet_size(self.version)

    def _packet(self, op: Operation, body: bytes = b"") -> bytes:
        return VstorPacket(op, body=body).encode(self.packet_size)

    def _query_version(self) -> bytes:
        body = ProtocolVersion(self.versions[self._tried]).pack()
        return self._packet(Operation.QUERY_PROTOCOL_VERSION, body)

    def start(self) -> bytes:
        self.state = VscState.BEGIN
        return self._packet(Operation.BEGIN_INITIALIZATION)

    def receive(self, payload: bytes | bytearray | memoryview) -> bytes | None:
        reply = _decode_reply(payload)
        if self.state == VscState.READY:
            raise StorageProtocolError("a reply while no request is outstanding")
        if self.state == VscState.VERSION and reply.status != STATUS_SUCCESS:
            self._tried += 1
            if self._tried == len(self.versions):
                raise StorageProtocolError(f"the VSP accepts none of {self.versions}")
            return self._query_version()
        if reply.status != STATUS_SUCCESS:
            raise StorageProtocolError(f"{self.state.value}: status {reply.status:#x}")
        if self.state == VscState.BEGIN:
            self.state = VscState.VERSION
            return self._query_version()
        if self.state == VscState.VERSION:
            self.version = self.versions[self._tried]
            self.state = VscState.PROPERTIES
            return self._packet(Operation.QUERY_PROPERTIES)
        if self.state == VscState.PROPERTIES:
            self.properties = StorageChannelProperties.unpack(reply.body)
            self.state = VscState.END
            return self._packet(Operation.END_INITIALIZATION)
        self.state = VscState.READY  # END or SUB_CHANNELS done
        return None

    @property
    def max_sub_channels(self) -> int:
        """How many sub-channels the VSP lets us create (0: none)."""
        p = self.properties
        if p is None or not p.flags & STORAGE_CHANNEL_SUPPORTS_MULTI_CHANNEL:
            return 0
        return p.max_channel_cnt

    def create_sub_channels(self, count: int) -> bytes:
        """CREATE_SUB_CHANNELS; Linux asks for min(CPUs - 1, max_sub_channels)."""
        if self.state != VscState.READY or not 1 <= count <= self.max_sub_channels:
            raise UsageError(f"cannot ask for {count} sub-channels ({self.state.value})")
        self.state = VscState.SUB_CHANNELS
        return self._packet(Operation.CREATE_SUB_CHANNELS, SubChannelCount(count).pack())
