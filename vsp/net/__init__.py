"""netvsp: a synthetic network adapter over NVSP and RNDIS.

The guest grants a receive buffer and a send buffer through GPADLs. Frames
it sends arrive as RNDIS PACKET messages in send-buffer sections (or by GPA
direct) and go to the backend; frames for the guest are written into
receive-buffer sections and announced by transfer-page packets, and a
section is reused only after the guest completes its packet. RNDIS control
replies travel the same receive path, as on Hyper-V.

The backend's descriptor is watched by the child's worker thread, so the
channel is only ever touched there; link changes from other threads are
queued and handed over through an eventfd.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import threading
import uuid

from vmbus import guid
from vmbus._ringdefs import DESCRIPTOR_SIZE, TRAILER_SIZE
from vmbus._ringpacket import Packet
from vmbus.channel import COMPLETION_REQUESTED, Channel
from vmbus.device import ChannelHandler, OpenContext, Vsp
from vmbus.host import OfferSpec
from vmbus.memory import MappedRegion, guest_segments, map_contiguous
from vmbus.packet import PacketError, PacketType, decode_gpa_direct_header
from vmbus.packet import encode_transfer_page_header as transfer_header
from vmbus.protocols.net import nvsp
from vmbus.protocols.net import rndis as r
from vsp.net.backends import NetBackend

log = logging.getLogger(__name__)

MAX_PENDING_FRAMES = 1024  # frames for a guest that completes nothing are dropped past this
RECEIVE_BATCH = 64  # frames taken from the backend per wake-up
DELIVERY_BATCH = 16  # frames per transfer-page packet (one range each)
REPLY_RESERVE = DESCRIPTOR_SIZE + nvsp.NVSP_MESSAGE_SIZE + TRAILER_SIZE


def random_mac() -> bytes:
    """A locally administered unicast MAC."""
    mac = bytearray(os.urandom(6))
    mac[0] = (mac[0] & 0xFC) | 0x02
    return bytes(mac)


class NetVsp(Vsp):
    """One network adapter of one child, attached to `backend`."""

    def __init__(
        self,
        backend: NetBackend,
        *,
        mac: bytes | None = None,
        instance_id: uuid.UUID | None = None,
        recv_section_size: int = 1728,
        send_section_size: int = 6144,
    ) -> None:
        self.backend = backend
        self.mac = mac or backend.mac or random_mac()
        self.instance_id = instance_id or uuid.uuid4()
        self.sections = (recv_section_size, send_section_size)
        self.handler: NetvspChannel | None = None

    def offers(self) -> list[OfferSpec]:
        return [OfferSpec(guid.NETWORK, self.instance_id)]

    def open(self, channel: Channel, context: OpenContext) -> NetvspChannel:
        self.handler = NetvspChannel(self, channel, context)
        return self.handler


class NetvspChannel(ChannelHandler):
    """The service of the adapter's channel."""

    reserve = REPLY_RESERVE

    def __init__(self, vsp: NetVsp, channel: Channel, context: OpenContext) -> None:
        super().__init__(channel, context)
        self.vsp = vsp
        self.backend = vsp.backend
        self.nvsp = nvsp.NvspServer(*vsp.sections)
        self.rndis = r.RndisDevice(vsp.mac, self.backend.mtu, self.backend.link_up)
        self.regions: dict[nvsp.BufferKind, tuple[nvsp.Buffer, MappedRegion, memoryview]] = {}
        self.receive_sections: nvsp.ReceiveSections | None = None
        self.to_guest: collections.deque[bytes] = collections.deque()  # RNDIS messages
        self.ids = itertools.count(1)
        self.dropped = 0
        self.link_changes: collections.deque[bool] = collections.deque()
        self.lock = threading.Lock()
        self.kick = os.eventfd(0, os.EFD_NONBLOCK)
        self.backend.on_link_change = self._link_changed
        context.watch(self.backend.fileno(), self._from_backend)
        context.watch(self.kick, self._kicked)

    # --- from the guest ---

    def on_packet(self, packet: Packet) -> None:
        if packet.type == PacketType.COMP:
            self._completed(packet.trans_id)
            return
        sizes = {handle: len(g.pfns) * 4096 for handle, g in self.context.gpadls.items()}
        event = self.nvsp.receive(packet.payload, gpadl_sizes=sizes)
        if isinstance(event, nvsp.Reply):
            self._complete(packet, event.payload)
        elif isinstance(event, nvsp.BufferEstablished):
            self._map(event.kind, event.buffer)
            self._complete(packet, event.reply)
        elif isinstance(event, nvsp.BufferRevoked):
            self._unmap(event.kind)
        elif isinstance(event, nvsp.RndisPacket):
            status = self._rndis(packet, event)
            self._complete(packet, nvsp.encode(nvsp.SendRndisPacketComplete(status=status)))
        elif isinstance(event, nvsp.AllocateSubChannels):  # not offered: max_sub_channels is 0
            self._complete(packet, event.reply)

    def _complete(self, packet: Packet, payload: bytes) -> None:
        if packet.flags & COMPLETION_REQUESTED:
            # The reserve guarantees the room: this never waits.
            self.channel.send(payload, type=PacketType.COMP, trans_id=packet.trans_id, timeout=0)

    def _map(self, kind: nvsp.BufferKind, buffer: nvsp.Buffer) -> None:
        self._unmap(kind)
        gpadl = self.context.gpadls[buffer.gpadl_handle]
        region = map_contiguous(self.context.memory, gpadl.pfns)
        self.regions[kind] = (buffer, region, region.view())
        if kind == nvsp.BufferKind.RECEIVE:
            self.receive_sections = nvsp.ReceiveSections.of(buffer)

    def _unmap(self, kind: nvsp.BufferKind) -> None:
        entry = self.regions.pop(kind, None)
        if entry is not None:
            entry[2].release()
            entry[1].close()
        if kind == nvsp.BufferKind.RECEIVE:
            self.receive_sections = None

    def _rndis(self, packet: Packet, event: nvsp.RndisPacket) -> int:
        data = self._rndis_bytes(packet, event)
        if data is None:
            return nvsp.NvspStatus.INVALID_RNDIS_PKT
        try:
            if event.channel_type == nvsp.RndisChannel.CONTROL:
                reply = self.rndis.control(data)
                if reply is not None:
                    self._queue(reply)
            else:
                frames = [self.rndis.frame_from_guest(m) for m in r.split_messages(data)]
                self.backend.send([f[0] for f in frames if f is not None])
        except r.RndisError as error:
            log.info("%s: bad RNDIS message: %s", self.context.partition, str(error))
            return nvsp.NvspStatus.INVALID_RNDIS_PKT
        self._deliver()
        return nvsp.NvspStatus.SUCCESS

    def _rndis_bytes(self, packet: Packet, event: nvsp.RndisPacket) -> bytes | None:
        """The RNDIS message(s): from a send-buffer section, or the GPA ranges."""
        if event.offset is not None:
            entry = self.regions.get(nvsp.BufferKind.SEND)
            if entry is None:
                return None
            return bytes(entry[2][event.offset : event.offset + event.section_size])
        try:
            ranges = decode_gpa_direct_header(packet.header, max_pfn=self.context.memory.page_count)
        except PacketError:
            return None
        if any(pfn in self.context.ring_pfns for g in ranges for pfn in g.pfns):
            return None
        total = sum(g.byte_count for g in ranges)
        return b"".join(guest_segments(self.context.memory, ranges, total))

    # --- to the guest ---

    def _from_backend(self) -> None:
        """The backend has frames: filter them, queue them, deliver what fits."""
        for frame in self.backend.receive(RECEIVE_BATCH):
            message = self.rndis.frame_to_guest(frame)
            if message is not None:
                self._queue(message)
        self._deliver()

    def _queue(self, message: bytes) -> None:
        if len(self.to_guest) >= MAX_PENDING_FRAMES:
            self.dropped += 1
            return
        self.to_guest.append(message)

    def _deliver(self) -> None:
        """Write queued messages into free receive sections, up to
        DELIVERY_BATCH per transfer-page packet (one range each); stop when
        sections or ring space run out."""
        sections, entry = self.receive_sections, self.regions.get(nvsp.BufferKind.RECEIVE)
        while self.to_guest and sections is not None and entry is not None:
            while self.to_guest and len(self.to_guest[0]) > sections.section_size:
                self.to_guest.popleft()  # cannot be delivered: too big for a section
                self.dropped += 1
            count = min(len(self.to_guest), DELIVERY_BATCH, sections.free_count)
            trans_id = next(self.ids)
            taken = sections.alloc(trans_id, count) if count else None
            if taken is None:
                return  # the guest's completions free sections and call us again
            ranges = []
            for index, section in enumerate(taken):
                message, offset = self.to_guest[index], sections.offset(section)
                entry[2][offset : offset + len(message)] = message
                ranges.append((len(message), offset))
            header = transfer_header(nvsp.RECEIVE_BUFFER_ID, ranges)
            payload = nvsp.send_rndis_packet(nvsp.RndisChannel.DATA)
            sent = self.channel.try_send(
                payload, PacketType.DATA_USING_XFER_PAGES, COMPLETION_REQUESTED, trans_id, header
            )
            if not sent:
                sections.free(trans_id)
                return  # the guest reading makes room and signals us (on_signal)
            for _ in taken:
                self.to_guest.popleft()

    def _completed(self, trans_id: int) -> None:
        if self.receive_sections is not None:
            try:
                self.receive_sections.free(trans_id)
            except nvsp.NvspError as error:
                log.info("%s: %s", self.context.partition, str(error))
        self._deliver()

    def on_signal(self) -> None:
        self._deliver()

    # --- link state ---

    def _link_changed(self, up: bool) -> None:
        """From any thread: hand the change to the worker."""
        with self.lock:
            self.link_changes.append(up)
        os.eventfd_write(self.kick, 1)

    def _kicked(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.kick)
        while True:
            with self.lock:
                if not self.link_changes:
                    break
                up = self.link_changes.popleft()
            if self.rndis.initialized:
                self._queue(self.rndis.link(up))
        self._deliver()

    def close(self) -> None:
        self.context.unwatch(self.backend.fileno())
        self.context.unwatch(self.kick)
        os.close(self.kick)
        self.backend.on_link_change = None
        for kind in list(self.regions):
            self._unmap(kind)
