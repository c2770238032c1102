"""netvsp's path to the guest: frames from the backend (and RNDIS control
replies and indications) written into receive-buffer sections the guest
lent and announced by transfer-page packets, a section reused only once
the guest completes the packet naming it. Frames are taken from the
backend only while sections are free for them (the backend's descriptor is
unwatched meanwhile), so a slow guest holds its backend back instead of
losing frames. A mixin of `NetvspChannel` (vsp.net.device), which holds
the state named below; the compiled path (`FastPath.deliver`) serves the
steady state first."""

from __future__ import annotations

import collections
import itertools
from typing import Any

from vmbus.channel import COMPLETION_REQUESTED, Channel, packet_space
from vmbus.device import OpenContext
from vmbus.packet import PacketType
from vmbus.packet import encode_transfer_page_header as transfer_header
from vmbus.protocols.net import rndis_wire as rw
from vmbus.protocols.net import vsp as nv
from vmbus.protocols.net import wire as nvsp

__all__ = ["DELIVERY_BATCH", "MAX_PENDING", "RECEIVE_BATCH", "GuestDelivery"]

MAX_PENDING = 1024  # RNDIS messages (control replies, indications) waiting for sections
RECEIVE_BATCH = 64  # frames taken from the backend per wake-up
DELIVERY_BATCH = 16  # frames per transfer-page packet (one range each)


class GuestDelivery:
    """The to-guest half of a netvsp channel's service."""

    channel: Channel
    context: OpenContext
    backend: Any
    rndis: nv.RndisDevice
    counters: Any
    fast: Any
    buffers: dict[nvsp.BufferKind, Any]
    receive_sections: nv.ReceiveSections | None
    to_guest: collections.deque[bytes]
    ids: itertools.count[int]
    reserve: int
    undelivered: int
    _receiving: bool

    def _room(self) -> int:
        """Frames the guest can take now: free sections not yet spoken for."""
        sections = self.receive_sections
        free = RECEIVE_BATCH if sections is None else sections.free_count
        return min(free, MAX_PENDING) - len(self.to_guest)

    def _from_backend(self) -> None:
        """The backend has frames: take as many as the guest has room for."""
        room = self._room()
        left = None if self.fast is None or room <= 0 else self.fast.deliver(self, room)
        if left is not None:  # the compiled path read and announced what it could
            self.to_guest.extend(map(rw.encode_packet, left))
            self._deliver()
        elif room > 0:
            for frame in self.backend.receive(min(room, RECEIVE_BATCH)):
                message = self.rndis.frame_to_guest(frame)
                if message is not None:
                    self.to_guest.append(message)
                    self.counters.frames_to_guest += 1
                    self.counters.bytes_to_guest += len(frame)
            self._deliver()
        if self._room() <= 0 and self._receiving:  # the rest waits in the backend
            self._receiving = False
            self.context.unwatch(self.backend.fileno())

    def _queue(self, message: bytes) -> None:
        if len(self.to_guest) >= MAX_PENDING:
            self.undelivered += 1
            self.counters.undelivered += 1
            return
        self.to_guest.append(message)

    def _deliver(self) -> None:
        """Write queued messages into free receive sections, up to
        DELIVERY_BATCH per transfer-page packet (one range each), keeping
        room for a reply; stop when sections or ring space run out."""
        sections, mapped = self.receive_sections, self.buffers.get(nvsp.BufferKind.RECEIVE)
        writer = self.channel.writer
        while self.to_guest and sections is not None and mapped is not None:
            while self.to_guest and len(self.to_guest[0]) > sections.section_size:
                self.to_guest.popleft()  # cannot be delivered: too big for a section
                self.undelivered += 1
                self.counters.undelivered += 1
            count = min(len(self.to_guest), DELIVERY_BATCH, sections.free_count)
            trans_id = next(self.ids)
            taken = sections.alloc(trans_id, count) if count else None
            if taken is None:
                break  # the guest's completions free sections and call us again
            ranges = []
            for index, section in enumerate(taken):
                message, offset = self.to_guest[index], sections.offset(section)
                mapped.view[offset : offset + len(message)] = message
                ranges.append((len(message), offset))
            header = transfer_header(nvsp.RECEIVE_BUFFER_ID, ranges)
            payload = nvsp.send_rndis_packet(nvsp.RndisChannel.DATA)
            need = packet_space(len(payload), len(header)) + self.reserve
            if writer.free_bytes <= need and not writer.request_space(need):
                sections.free(trans_id)
                break  # the guest reading makes room and signals us (on_signal)
            self.channel.try_send(
                payload, PacketType.DATA_USING_XFER_PAGES, COMPLETION_REQUESTED, trans_id, header
            )
            for _ in taken:
                self.to_guest.popleft()
        if not self._receiving and self._room() > 0:
            self._receiving = True
            self.context.watch(self.backend.fileno(), self._from_backend)

    def _completed(self, trans_id: int) -> None:
        """The guest completed a transfer-page packet (its payload, 8 bytes
        from Linux, says nothing we use): its sections come back."""
        if self.receive_sections is not None:
            try:
                self.receive_sections.free(trans_id)
            except nvsp.NvspError as error:
                self.context.protocol_error("netvsp: %s", str(error))
        self._deliver()
