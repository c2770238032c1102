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
from vmbus.packet import MAX_TRANSFER_RANGES, PacketType
from vmbus.packet import encode_transfer_page_header as transfer_header
from vmbus.protocols.net import offload as ol
from vmbus.protocols.net import rndis_wire as rw
from vmbus.protocols.net import rsc
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
    to_guest: collections.deque[bytes | tuple[bytes, ...]]  # a tuple: one coalesced frame
    ids: itertools.count[int]
    reserve: int
    undelivered: int
    _receiving: bool

    def _room(self) -> int:
        """Frames the guest can take now: free sections not yet spoken for."""
        sections = self.receive_sections
        free = RECEIVE_BATCH if sections is None else sections.free_count
        queued = sum(len(m) if isinstance(m, tuple) else 1 for m in self.to_guest)
        return min(free, MAX_PENDING) - queued

    def _from_backend(self) -> None:
        """The backend has frames: take as many as the guest has room for."""
        room = self._room()
        if self.backend_coalesces:
            self._coalesced_from_backend(room)
            return
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

    @property
    def backend_coalesces(self) -> bool:
        """The TAP hands over GSO frames and partial checksums (set_receive_offload)."""
        return bool(getattr(self.backend, "rx_offload", 0))

    def _wanted_room(self) -> int:
        """Free sections worth watching the backend for: one frame's, or
        the largest coalesced frame's."""
        sections = self.receive_sections
        if not self.backend_coalesces or sections is None:
            return 1
        if sections.section_size <= rsc.FRAGMENT_OVERHEAD:
            return 1
        return rsc.fragments(rsc.GSO_MAX_FRAME, sections.section_size)

    def _coalesced_from_backend(self, room: int) -> None:
        """_from_backend while the guest takes coalesced receives (RSC): each
        frame read with its virtio_net_hdr; a GSO frame becomes the RSC
        fragments of one transfer-page packet, a partial or valid checksum
        the receive checksum info. Reads only while the largest frame fits."""
        sections = self.receive_sections
        size = sections.section_size if sections is not None else 0
        worst = self._wanted_room() if size > rsc.FRAGMENT_OVERHEAD else 0
        left = None
        if self.fast is not None and worst and room >= worst:
            left = self.fast.deliver_coalesced(self, room, worst)
        if left is not None:  # what the compiled path read but left to this one, in order
            for header, frame in left:
                message = self._offloaded_to_guest(header, frame, size)
                if message is not None:
                    self.to_guest.append(message)
        taken = 0
        while left is None and worst and room >= worst and taken < RECEIVE_BATCH:
            got = self.backend.receive_offloaded(1)
            if not got:
                break
            taken += 1
            header, frame = got[0]
            message = self._offloaded_to_guest(header, frame, size)
            if message is None:
                continue
            self.to_guest.append(message)
            room -= len(message) if isinstance(message, tuple) else 1
        self._deliver()
        if self._room() < self._wanted_room() and self._receiving:  # the rest waits in the backend
            self._receiving = False
            self.context.unwatch(self.backend.fileno())

    def _offloaded_to_guest(
        self, header: bytes, frame: bytes, section_size: int
    ) -> bytes | tuple[bytes, ...] | None:
        """The RNDIS message(s) for one frame read with its virtio_net_hdr,
        or None (filtered, or a frame no rule lets through: counted)."""
        if len(header) < ol.VNET_HDR_SIZE or len(frame) < 14:
            self.backend.drops += 1
            return None
        if header[1] == ol.GSO_NONE:
            checksum = rsc.receive_checksum_info(frame, header)
            if not checksum and header[0] & ol.VNET_NEEDS_CSUM:  # not TCP or UDP: sum it here
                start, offset = int.from_bytes(header[6:8], "little"), header[8] | header[9] << 8
                frame = bytes(rsc.complete_checksum(frame, start, offset))
            ppis = [(ol.PPI_CHECKSUM, checksum.to_bytes(4, "little"))] if checksum else []
            message: bytes | tuple[bytes, ...] | None = self.rndis.frame_to_guest(frame, ppis)
        else:
            segment = rsc.coalesced_segment(frame, header)
            if segment is None:
                self.backend.drops += 1
                return None
            message = self.rndis.coalesced_to_guest(
                segment, rsc.receive_checksum_info(segment, header), section_size
            )
        if message is not None:
            self.counters.frames_to_guest += 1
            self.counters.bytes_to_guest += len(frame)
        return message

    def _queue(self, message: bytes) -> None:
        if len(self.to_guest) >= MAX_PENDING:
            self.undelivered += 1
            self.counters.undelivered += 1
            return
        self.to_guest.append(message)

    def _deliver(self) -> None:
        """Write queued messages into free receive sections, up to
        DELIVERY_BATCH per transfer-page packet (one range each), or the
        fragments of one coalesced frame alone in a packet (Linux drops an
        RSC frame cut by a packet's end), keeping room for a reply; stop
        when sections or ring space run out."""
        sections, mapped = self.receive_sections, self.buffers.get(nvsp.BufferKind.RECEIVE)
        writer = self.channel.writer
        while self.to_guest and sections is not None and mapped is not None:
            if not self._drop_undeliverable(sections.section_size, sections.section_count):
                continue
            head = self.to_guest[0]
            if isinstance(head, tuple):
                messages: list[bytes] = list(head)
                entries = 1
            else:
                messages = []
                for entry in itertools.islice(self.to_guest, DELIVERY_BATCH):
                    if isinstance(entry, tuple) or len(entry) > sections.section_size:
                        break
                    messages.append(entry)
                entries = len(messages)
            if len(messages) > sections.free_count:
                if isinstance(head, tuple):
                    break  # its fragments go together: the guest's completions free sections
                del messages[sections.free_count :]
                entries = len(messages)
            trans_id = next(self.ids)
            taken = sections.alloc(trans_id, len(messages)) if messages else None
            if taken is None:
                break  # the guest's completions free sections and call us again
            ranges = []
            for message, section in zip(messages, taken, strict=True):
                offset = sections.offset(section)
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
            for _ in range(entries):
                self.to_guest.popleft()
        if not self._receiving and self._room() >= self._wanted_room():
            self._receiving = True
            self.context.watch(self.backend.fileno(), self._from_backend)

    def _drop_undeliverable(self, section_size: int, section_count: int) -> bool:
        """Drop the head of the queue (counted) when no section, or not all
        the sections there are, can hold it; True when it stays."""
        head = self.to_guest[0]
        if isinstance(head, tuple):
            fits = (
                len(head) <= min(section_count, MAX_TRANSFER_RANGES)
                and max(map(len, head)) <= section_size
            )
        else:
            fits = len(head) <= section_size
        if fits:
            return True
        self.to_guest.popleft()
        self.undelivered += 1
        self.counters.undelivered += 1
        return False

    def _completed(self, trans_id: int) -> None:
        """The guest completed a transfer-page packet (its payload, 8 bytes
        from Linux, says nothing we use): its sections come back."""
        if self.receive_sections is not None:
            try:
                self.receive_sections.free(trans_id)
            except nvsp.NvspError as error:
                self.context.protocol_error("netvsp: %s", str(error))
        self._deliver()
