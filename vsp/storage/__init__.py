"""storvsp: a synthetic SCSI controller on the VMBus (enlightened SCSI).

The guest's SCSI CDBs arrive in VSTOR packets; their data moves through
GPA-direct page ranges straight between guest memory and the backend (for a
raw file: one preadv/pwritev on the guest's pages). There is no device
emulation in between: the CDB goes to the SCSI target as it came.

One `StorVsp` is one controller of one child: its LUNs, its primary channel
and the sub-channels the guest creates for parallelism.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence

from vmbus import guid
from vmbus._ringdefs import DESCRIPTOR_SIZE, TRAILER_SIZE
from vmbus._ringpacket import Packet
from vmbus.channel import Channel
from vmbus.device import ChannelHandler, OpenContext, Vsp
from vmbus.host import OfferSpec
from vmbus.memory import GuestMemory, guest_segments
from vmbus.packet import GpaRange, PacketError, PacketType, decode_gpa_direct_header
from vmbus.protocols import storage as vstor
from vmbus.protocols.storage.scsi_wire import GOOD, Opcode
from vsp.storage.scsi import BlockBackend, ScsiDisk, ScsiTarget

log = logging.getLogger(__name__)

DEFAULT_MAX_TRANSFER = 1 << 20
# Room for one reply: descriptor, the largest vstor_packet, trailer.
REPLY_RESERVE = DESCRIPTOR_SIZE + vstor.VSTOR_PACKET_SIZE + TRAILER_SIZE


class StorVsp(Vsp):
    """A SCSI controller with `disks` by LUN, offered as one VMBus device."""

    def __init__(
        self,
        disks: Mapping[int, BlockBackend] | Sequence[BlockBackend],
        *,
        instance_id: uuid.UUID | None = None,
        max_transfer_bytes: int = DEFAULT_MAX_TRANSFER,
        channels: int = 1,
        serial: str = "vmbus",
    ) -> None:
        by_lun = dict(disks) if isinstance(disks, Mapping) else dict(enumerate(disks))
        self.instance_id = instance_id or uuid.uuid4()
        self.target = ScsiTarget(
            {lun: ScsiDisk(backend, serial=f"{serial}-{lun}") for lun, backend in by_lun.items()}
        )
        self.max_transfer_bytes = max_transfer_bytes
        self.channels = channels
        self.protocol = self._new_protocol()
        self.handlers: list[StorvspChannel] = []

    def _new_protocol(self) -> vstor.StorvspProtocol:
        return vstor.StorvspProtocol(self.max_transfer_bytes, self.channels)

    def offers(self) -> list[OfferSpec]:
        return [OfferSpec(guid.SCSI, self.instance_id)]

    def open(self, channel: Channel, context: OpenContext) -> StorvspChannel:
        if context.offer.sub_channel_index == 0:
            self.protocol = self._new_protocol()  # a (re)opened primary starts over
        handler = StorvspChannel(self, channel, context)
        self.handlers.append(handler)
        return handler

    @property
    def errors(self) -> int:
        """Bad requests answered with an error status, on every channel."""
        return sum(self.protocol.errors.values()) + sum(h.bad_ranges for h in self.handlers)


class StorvspChannel(ChannelHandler):
    """The service of one open channel (primary or sub-channel)."""

    reserve = REPLY_RESERVE  # take a request only when its reply fits

    def __init__(self, vsp: StorVsp, channel: Channel, context: OpenContext) -> None:
        super().__init__(channel, context)
        self.vsp = vsp
        self.memory: GuestMemory = context.memory
        self.requests = 0
        self.bad_ranges = 0

    def on_packet(self, packet: Packet) -> None:
        self.requests += 1
        ranges = self._ranges(packet)
        event = self.vsp.protocol.receive(packet.payload, ranges)
        if isinstance(event, vstor.ExecuteSrb):
            reply = self._execute(event)
        elif isinstance(event, vstor.CreateSubChannels):
            for index in range(1, event.count + 1):
                self.context.add_offer(OfferSpec(guid.SCSI, self.vsp.instance_id, index))
            reply = event.reply
        else:
            if event.error:
                log.info("%s: storage request refused: %s", self.context.partition, event.error)
            reply = event.payload
        # The reserve guarantees the room: this never waits.
        self.channel.send(reply, type=PacketType.COMP, trans_id=packet.trans_id, timeout=0)

    def _ranges(self, packet: Packet) -> list[GpaRange]:
        """The packet's GPA ranges; none (so the SRB fails) if they name
        pages outside the child's memory or the channel's own rings."""
        if packet.type != PacketType.DATA_USING_GPA_DIRECT:
            return []
        try:
            ranges = decode_gpa_direct_header(packet.header, max_pfn=self.memory.page_count)
        except PacketError as error:
            self.bad_ranges += 1
            log.info("%s: bad GPA ranges: %s", self.context.partition, error)
            return []
        if any(not self.context.ring_pfns.isdisjoint(r.pfns) for r in ranges):
            self.bad_ranges += 1
            log.info("%s: GPA ranges overlap the channel's rings", self.context.partition)
            return []
        return ranges

    def _execute(self, srb: vstor.ExecuteSrb) -> bytes:
        protocol = self.vsp.protocol
        if srb.lun not in self.vsp.target.disks and srb.cdb[:1] != bytes((Opcode.REPORT_LUNS,)):
            return protocol.complete_srb(srb.request, vstor.SrbStatus.INVALID_LUN)
        data = guest_segments(self.memory, srb.ranges, srb.transfer_length)
        result = self.vsp.target.execute(srb.lun, srb.cdb, data, srb.direction)
        status = vstor.SrbStatus.SUCCESS if result.status == GOOD else vstor.SrbStatus.ERROR
        return protocol.complete_srb(
            srb.request, status, result.status, result.sense, result.transferred
        )

    def close(self) -> None:
        pass
