"""netvsp: a synthetic network adapter over NVSP and RNDIS.

The guest grants a receive buffer and a send buffer through GPADLs. Frames
it sends arrive as RNDIS PACKET messages in send-buffer sections (or by GPA
direct) and go to the backend; frames for the guest are written into
receive-buffer sections and announced by transfer-page packets, and a
section is reused only after the guest completes its packet. RNDIS control
replies travel the same receive path, as on Hyper-V.

Parse once: each request's NVSP message is copied out of the ring once,
and its RNDIS bytes out of the send section (or its GPA ranges) once; both
are parsed from those copies only.

Flow control, both ways, instead of loss:
- to the guest: frames are taken from the backend only while receive
  sections are free for them; otherwise the backend's descriptor is not
  watched and frames wait in the backend (a switch port then fills and holds
  its senders back, a TAP device's kernel queue fills);
- from the guest: a frame the backend cannot take yet (a full switch port)
  is held with its request's completion, and no further request is taken
  from the ring, until the backend's space descriptor says it has room.
  The guest, its send sections and ring full, waits. A frame the backend
  refuses (oversize, a port that drops) completes with NVSP_STAT_FAIL and
  is counted in `refused`.

The sections are sized from the backend's MTU; sections given explicitly
make the adapter report the largest MTU whose frames fit them.

The backend's descriptors are watched by the child's worker thread, so the
channel is only ever touched there; link changes from other threads are
queued and handed over through an eventfd (from the parent's process, through
the backend's LinkCell).

Compiled (`vsp.net._fast`, `NetVsp(fast_path=False)` or VMBUS_NET_FAST=0 to
turn it off): steady-state sends from the head of the ring in `admission()`,
and frames from a backend with a `fast_fd()` to the guest; both decline
anything else to the Python path here, which stays the definition.
Offloads (checksums, LSOv2, and coalesced receives for a guest that asks:
RSC, docs/protocol.md §6.10) when the backend is a TAP with IFF_VNET_HDR
(vmbus.protocols.net.offload); vRSS sub-channels with `channels` > 1
(vsp.net.vrss). The path to the guest is in vsp.net.delivery.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from vmbus import guid
from vmbus._ringpacket import Packet
from vmbus.channel import COMPLETION_REQUESTED, PAUSED, VM_PKT_COMP, Channel
from vmbus.device import BadGpaRanges, ChannelHandler, OpenContext, Vsp
from vmbus.errors import UsageError
from vmbus.host import OfferSpec
from vmbus.memory import MappedRegion, guest_segments
from vmbus.protocols.net import offload as ol
from vmbus.protocols.net import rndis_wire as rw
from vmbus.protocols.net import rsc
from vmbus.protocols.net import vsp as nv
from vmbus.protocols.net import wire as nvsp
from vsp.net.backends import (
    ETH_HLEN,
    GSO_MAX_FRAME,
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    VLAN_HLEN,
    NetBackend,
    TapBackend,
)
from vsp.net.delivery import GuestDelivery
from vsp.net.vrss import NetvspSubChannel

try:
    from vsp.net._fast import FastPath
except ImportError:  # not built: every packet takes the Python path
    FastPath = None  # type: ignore[assignment,misc]

__all__ = ["NetVsp", "NetvspChannel", "fast_path_default", "random_mac", "section_sizes"]

PPI_ROOM = 256  # per-packet info before a guest's frame (Linux sends < 128 bytes)
FRAME_OVERHEAD = ETH_HLEN + VLAN_HLEN  # what an MTU does not count
LSO_SECTION = -(-(rw.PacketHeader.SIZE + PPI_ROOM + GSO_MAX_FRAME) // 8) * 8  # one large send


def fast_path_default() -> bool:
    """On unless VMBUS_NET_FAST is 0 (or off/false/no)."""
    return os.environ.get("VMBUS_NET_FAST", "1").lower() not in ("0", "off", "false", "no")


def random_mac() -> bytes:
    """A locally administered unicast MAC."""
    mac = bytearray(os.urandom(6))
    mac[0] = (mac[0] & 0xFC) | 0x02
    return bytes(mac)


def _round8(n: int) -> int:
    return -(-n // 8) * 8


def section_sizes(mtu: int) -> tuple[int, int]:
    """Receive and send sections that hold an RNDIS PACKET of the largest
    frame of this MTU (a VLAN tag included), never below Linux's defaults."""
    frame = FRAME_OVERHEAD + mtu
    recv = _round8(rw.PacketHeader.SIZE + frame)
    send = _round8(rw.PacketHeader.SIZE + PPI_ROOM + frame)
    return max(nvsp.DEFAULT_RECV_SECTION_SIZE, recv), max(nvsp.DEFAULT_SEND_SECTION_SIZE, send)


def _fitting_mtu(mtu: int, recv: int, send: int) -> int:
    """The largest MTU up to `mtu` whose frames fit both sections."""
    room = min(recv - rw.PacketHeader.SIZE, send - rw.PacketHeader.SIZE - PPI_ROOM)
    return min(mtu, room - FRAME_OVERHEAD)


class NetVsp(Vsp):
    """One network adapter of one child, attached to `backend`."""

    def __init__(
        self,
        backend: NetBackend,
        *,
        mac: bytes | None = None,
        instance_id: uuid.UUID | None = None,
        recv_section_size: int | None = None,
        send_section_size: int | None = None,
        fast_path: bool | None = None,
        channels: int = 1,
    ) -> None:
        if not 1 <= channels <= 1 + nvsp.MAX_SUB_CHANNELS:
            raise UsageError(f"channels {channels} is not in 1..{1 + nvsp.MAX_SUB_CHANNELS}")
        self.channels = channels  # vRSS: the primary and up to channels - 1 sub-channels
        self.offered: set[int] = set()  # sub-channel indices offered, ever
        self.subs: list[NetvspSubChannel] = []
        self.backend = backend
        self.fast_path = fast_path_default() if fast_path is None else fast_path
        self.mac = mac or backend.mac or random_mac()
        self.instance_id = instance_id or uuid.uuid4()
        # Offloads (checksums, LSOv2) where the backend takes virtio_net_hdrs:
        # then a send section also holds one large send.
        self.offload = isinstance(backend, TapBackend) and backend.vnet_hdr
        recv, send = section_sizes(backend.mtu)
        if self.offload:
            send = max(send, LSO_SECTION)
        self.sections = (recv_section_size or recv, send_section_size or send)
        self.mtu = _fitting_mtu(backend.mtu, *self.sections)  # what the guest is told
        if self.mtu < nv.MIN_MTU:
            raise UsageError(f"sections of {self.sections} bytes hold no {nv.MIN_MTU}-byte MTU")
        self.handler: NetvspChannel | None = None
        self.counters = Counters()  # of every channel this adapter served

    def offers(self) -> list[OfferSpec]:
        return [OfferSpec(guid.NETWORK, self.instance_id)]

    def open(self, channel: Channel, context: OpenContext) -> ChannelHandler:
        if context.offer.sub_channel_index:
            if self.handler is None or not self.handler.serving:
                raise UsageError("a sub-channel opened without its primary")
            sub = NetvspSubChannel(self.handler, channel, context)
            self.subs.append(sub)
            return sub
        self.handler = NetvspChannel(self, channel, context)
        return self.handler

    def offer_sub_channels(self, count: int, context: OpenContext) -> None:
        """Offer sub-channels 1..count never offered (a reopened primary's
        guest reuses the offers it already has)."""
        for index in range(1, count + 1):
            if index not in self.offered:
                self.offered.add(index)
                context.add_offer(OfferSpec(guid.NETWORK, self.instance_id, index))

    def __getstate__(self) -> dict[str, object]:
        """For `vmbus.handoff`: the adapter crosses before any channel opens;
        its backend carries its own descriptors."""
        state = self.__dict__.copy()
        state["handler"] = None
        state["subs"] = []
        return state

    def stats(self) -> dict[str, Any]:
        """Frames and bytes each way, what was refused or lost, doorbells,
        and the backend's own counters (all counted where the frames move)."""
        counts = self.counters
        live = self.handler if self.handler is not None and self.handler.serving else None
        backend = self.backend
        return {
            "frames_from_guest": counts.frames_from_guest,
            "bytes_from_guest": counts.bytes_from_guest,
            "frames_to_guest": counts.frames_to_guest,
            "bytes_to_guest": counts.bytes_to_guest,
            "refused": counts.refused,
            "undelivered": counts.undelivered,
            "signals_to_guest": counts.signals
            + (live.channel.signals_sent if live else 0)
            + sum(sub.channel.signals_sent for sub in self.subs if sub.serving),
            "sub_channels": sum(1 for sub in self.subs if sub.serving),
            "backend_frames_out": backend.frames_out,
            "backend_frames_in": backend.frames_in,
            "backend_drops": backend.drops,
            "link_up": backend.link_up,
        }


@dataclass
class Counters:
    """An adapter's traffic: guest frames taken by the backend, frames
    delivered to the guest, refused frames, undelivered messages, and the
    doorbells of channels already closed."""

    frames_from_guest: int = 0
    bytes_from_guest: int = 0
    frames_to_guest: int = 0
    bytes_to_guest: int = 0
    refused: int = 0
    undelivered: int = 0
    signals: int = 0


class _GpadlSizes(Mapping[int, int]):
    """The child's GPADLs as NvspServer sees them: handle -> byte_count; a
    GPADL on the channel's rings is never a buffer."""

    def __init__(self, context: OpenContext) -> None:
        self.context = context

    def __getitem__(self, handle: int) -> int:
        gpadl = self.context.gpadls[handle]
        if not self.context.ring_pfns.isdisjoint(gpadl.pfns):
            raise KeyError(handle)
        return gpadl.byte_count

    def __iter__(self) -> Iterator[int]:
        return iter(self.context.gpadls)

    def __len__(self) -> int:
        return len(self.context.gpadls)


@dataclass
class _Mapped:
    buffer: nvsp.Buffer
    region: MappedRegion
    whole: memoryview  # the region's pages
    view: memoryview  # the granted bytes: byte_offset, byte_count


@dataclass
class _Send:
    """A SEND_RNDIS_PKT in progress: frames not yet taken by the backend."""

    trans_id: int
    completion: bool
    frames: list[memoryview]
    refused: int = 0


class NetvspChannel(GuestDelivery, ChannelHandler):
    """The service of the adapter's channel."""

    max_reply = nvsp.NVSP_MESSAGE_SIZE  # every completion is one nvsp_message

    def __init__(self, vsp: NetVsp, channel: Channel, context: OpenContext) -> None:
        super().__init__(channel, context)
        self.vsp = vsp
        self.backend = vsp.backend
        self.nvsp = nv.NvspServer(*vsp.sections, max_sub_channels=vsp.channels - 1)
        self.shared = threading.Lock()  # what sub-channel threads share with this one
        offered = ol.OFFERED if vsp.offload else ol.NO_OFFLOADS
        self.rndis = nv.RndisDevice(
            vsp.mac, vsp.mtu, self.backend.link_up, offloads=offered, queues=vsp.channels
        )
        self.buffers: dict[nvsp.BufferKind, _Mapped] = {}
        self.receive_sections: nv.ReceiveSections | None = None
        # RNDIS messages; a tuple: the RSC fragments of one coalesced frame
        self.to_guest: collections.deque[bytes | tuple[bytes, ...]] = collections.deque()
        self.ids = itertools.count(1)
        self.refused = 0  # guest frames the backend refused (completed NVSP_STAT_FAIL)
        self.undelivered = 0  # messages for the guest lost: too many waiting, too big
        self.held: _Send | None = None  # the send waiting for the backend's room
        self._sizes = _GpadlSizes(context)
        self._receiving = True  # the backend's descriptor is watched
        self.link_changes: collections.deque[bool] = collections.deque()
        self.lock = threading.Lock()
        self.kick = os.eventfd(0, os.EFD_NONBLOCK)
        self.counters = vsp.counters
        self.fast = self._fast_path() if vsp.fast_path else None
        self.serving = True  # until close: its doorbells are then in the counters
        self.backend.on_link_change = self._link_changed
        context.watch(self.backend.fileno(), self._from_backend)
        context.watch(self.kick, self._kicked)
        self._link_fd = self.backend.link_fileno()  # the parent's set_link, across processes
        if self._link_fd >= 0:
            context.watch(self._link_fd, self.backend.poll_link)

    def _fast_path(self) -> FastPath | None:
        """The compiled path, when the channel runs on the Cython ring."""
        if FastPath is None:
            return None
        try:
            return FastPath(self.channel, self.reserve)
        except TypeError:  # the Python ring: no C-level access
            return None

    # --- from the guest ---

    def admission(self) -> int:
        """Asked before each packet the drain takes: first the compiled path
        serves the steady-state sends at the head of the ring (stopping at
        the first it declines, which the drain hands to on_packet)."""
        room = super().admission()
        if self.fast is not None and room < PAUSED and not self.channel.backlog:
            self.fast_served += self.fast.drain(self)
        return room

    def on_packet(self, packet: Packet) -> None:
        if packet.type == VM_PKT_COMP:
            self._completed(packet.trans_id)
        else:
            self._serve(packet)

    def _serve(self, packet: Packet) -> None:
        with self.shared:
            self._serve_shared(packet)

    def _serve_shared(self, packet: Packet) -> None:
        message = bytes(packet.payload)  # the one copy of the NVSP message
        event = self.nvsp.receive(message, gpadl_sizes=self._sizes)
        completion = bool(packet.flags & COMPLETION_REQUESTED)
        if isinstance(event, nv.RndisPacket):
            self._rndis(packet, event, completion)
            return
        if isinstance(event, (nv.Reply, nv.NoReply)) and event.error:  # a refused message
            self.context.protocol_error("netvsp: %s", event.error)
        if isinstance(event, nv.BufferEstablished):
            self._map(event.kind, event.buffer)
            payload: bytes | None = event.reply
        elif isinstance(event, nv.BufferRevoked):
            self._unmap(event.kind)
            payload = None
        elif isinstance(event, nv.Reply):
            payload = event.payload
        elif isinstance(event, nv.AllocateSubChannels):
            self.vsp.offer_sub_channels(event.count, self.context)
            if completion:
                self.reply(packet.trans_id, event.reply)
            # Where the guest should send: spread over every channel, as Hyper-V does.
            table = [i % (event.count + 1) for i in range(nvsp.VRSS_SEND_TABLE_SIZE)]
            self.post(nvsp.encode_indirection_table(table))
            return
        else:
            payload = None
        if payload is not None and completion:
            self.reply(packet.trans_id, payload)

    def _status(self, trans_id: int, completion: bool, status: int) -> None:
        if completion:
            self.reply(trans_id, nvsp.encode(nvsp.SendRndisPacketComplete(status=status)))

    def _rndis(self, packet: Packet, event: nv.RndisPacket, completion: bool) -> None:
        data = self._rndis_bytes(packet, event)
        if data is None:
            self._status(packet.trans_id, completion, nvsp.NvspStatus.INVALID_RNDIS_PKT)
            return
        try:
            if event.channel_type == nvsp.RndisChannel.CONTROL:
                reply = self.rndis.control(data)
                self._apply_receive_offload()
                if reply is not None:
                    self._queue(reply)
                self._status(packet.trans_id, completion, nvsp.NvspStatus.SUCCESS)
                self._deliver()
                return
            frames = self.rndis.frames_from_guest(data)
        except rw.RndisError as error:
            self.context.protocol_error("netvsp: bad RNDIS message: %s", str(error))
            self._status(packet.trans_id, completion, nvsp.NvspStatus.INVALID_RNDIS_PKT)
            return
        if not self.rndis.initialized:  # frames before INITIALIZE or after HALT
            self._status(packet.trans_id, completion, nvsp.NvspStatus.FAIL)
            return
        counts = self.counters
        counts.frames_from_guest += len(frames)
        counts.bytes_from_guest += sum(len(frame) for frame, _ in frames)
        if self.vsp.offload:
            refused = self._offloaded(frames)
            status = nvsp.NvspStatus.FAIL if refused else nvsp.NvspStatus.SUCCESS
            self._status(packet.trans_id, completion, status)
            return
        self._transmit(_Send(packet.trans_id, completion, [frame for frame, _ in frames]))

    def _apply_receive_offload(self) -> None:
        """Coalesced receives (RSC) for a guest that asked for them with
        NVSP 6.1 and its NDIS_CONFIG capability: the TAP then hands over
        TCP GSO frames and partial checksums (a guest that did not ask gets
        whole, checksummed frames, as before)."""
        backend = self.backend
        if not self.vsp.offload or not isinstance(backend, TapBackend):
            return
        config, sections = self.nvsp.ndis_config, self.receive_sections
        wanted = 0
        if (
            self.rndis.offloads.rsc
            and (self.nvsp.version or 0) >= nvsp.NVSP_PROTOCOL_VERSION_61
            and config is not None
            and config.capability & nvsp.CAPABILITY_RSC
            and sections is not None  # and it holds the largest coalesced frame
            and sections.section_size > rsc.FRAGMENT_OVERHEAD
            and rsc.fragments(rsc.GSO_MAX_FRAME, sections.section_size)
            <= min(sections.section_count, rsc.RSC_MAX_FRAGMENTS)
        ):
            wanted = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
        backend.set_receive_offload(wanted)

    def send_frames(self, packet: Packet, event: nv.RndisPacket, context: OpenContext) -> int:
        """A sub-channel's DATA send (under `shared`): its frames to the
        backend, without holding any back (a full medium refuses them).
        Returns the completion's status."""
        data = self._rndis_bytes(packet, event, context)
        if data is None:
            return nvsp.NvspStatus.INVALID_RNDIS_PKT
        try:
            frames = self.rndis.frames_from_guest(data)
        except rw.RndisError as error:
            context.protocol_error("netvsp: bad RNDIS message: %s", str(error))
            return nvsp.NvspStatus.INVALID_RNDIS_PKT
        if not self.rndis.initialized:
            return nvsp.NvspStatus.FAIL
        self.counters.frames_from_guest += len(frames)
        self.counters.bytes_from_guest += sum(len(frame) for frame, _ in frames)
        if self.vsp.offload:
            refused = self._offloaded(frames)
        else:
            sent = self.backend.transmit([frame for frame, _ in frames])
            refused = sent.refused + len(frames) - sent.taken
            self.refused += refused
            self.counters.refused += refused
        return nvsp.NvspStatus.FAIL if refused else nvsp.NvspStatus.SUCCESS

    def _offloaded(self, frames: list[tuple[memoryview, tuple[rw.Ppi, ...]]]) -> int:
        """Frames with their checksum and LSO per-packet info, as
        virtio_net_hdrs to a TAP that never holds back; a frame whose info
        does not fit it is refused. Returns the refused."""
        backend = self.backend
        assert isinstance(backend, TapBackend)
        ready = []
        for frame, ppis in frames:
            values = {
                p.type: int.from_bytes(p.value[:4], "little")
                for p in ppis
                if p.type in (ol.PPI_CHECKSUM, ol.PPI_LSO) and len(p.value) >= 4
            }
            vnet = ol.vnet_header(bytes(frame), values)
            if vnet is not None:
                ready.append(vnet)
        refused = len(frames) - len(ready)
        backend.drops += refused
        refused += len(ready) - backend.send_offloaded(ready)
        self.refused += refused
        self.counters.refused += refused
        return refused

    def _rndis_bytes(
        self, packet: Packet, event: nv.RndisPacket, context: OpenContext | None = None
    ) -> bytes | None:
        """One private copy of the RNDIS message(s): from a send-buffer
        section, or through the checked GPA ranges (of `context`'s channel)."""
        context = context or self.context
        if event.offset is not None:
            mapped = self.buffers.get(nvsp.BufferKind.SEND)
            if mapped is None:
                return None
            return bytes(mapped.view[event.offset : event.offset + event.section_size])
        try:
            ranges = context.gpa_ranges(packet.header)
        except BadGpaRanges:
            return None  # counted and logged by the context
        total = sum(r.byte_count for r in ranges)
        if not 0 < total <= nv.MAX_XFER_SIZE:
            context.protocol_error("netvsp: %d bytes by GPA direct", total)
            return None
        return b"".join(guest_segments(context.memory, ranges, total))

    def _transmit(self, send: _Send) -> None:
        """Offer the frames to the backend; hold what it cannot take yet."""
        sent = self.backend.transmit(send.frames)
        send.refused += sent.refused
        del send.frames[: sent.taken]
        if send.frames and self.backend.space_fileno() < 0:  # no room will ever come
            send.refused += len(send.frames)
            send.frames.clear()
        if send.frames:
            if self.held is None:
                self.context.watch(self.backend.space_fileno(), self._backend_has_room)
                self.pause()  # no request is taken while a send waits for the backend
            self.held = send
            return
        if self.held is send:
            self.held = None
            self.context.unwatch(self.backend.space_fileno())
        self.refused += send.refused
        self.counters.refused += send.refused
        status = nvsp.NvspStatus.FAIL if send.refused else nvsp.NvspStatus.SUCCESS
        self._status(send.trans_id, send.completion, status)

    def _backend_has_room(self) -> None:
        if self.held is not None:
            self._transmit(self.held)
        if self.held is None:
            self.resume()  # the worker serves the ring again

    def on_signal(self) -> None:
        super().on_signal()
        self._deliver()

    # --- buffers ---

    def _map(self, kind: nvsp.BufferKind, buffer: nvsp.Buffer) -> None:
        self._unmap(kind)
        gpadl, region = self.context.map_gpadl(buffer.gpadl_handle)
        whole = region.view()
        view = whole[gpadl.byte_offset : gpadl.byte_offset + gpadl.byte_count]
        self.buffers[kind] = _Mapped(buffer, region, whole, view)
        if kind == nvsp.BufferKind.RECEIVE:
            self.receive_sections = nv.ReceiveSections.of(buffer)
            self._apply_receive_offload()

    def _unmap(self, kind: nvsp.BufferKind) -> None:
        mapped = self.buffers.pop(kind, None)
        if mapped is not None:
            mapped.view.release()
            mapped.whole.release()
            mapped.region.close()
        if kind == nvsp.BufferKind.RECEIVE:
            self.receive_sections = None
            if self.serving:
                self._apply_receive_offload()

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
        if self._receiving:
            self.context.unwatch(self.backend.fileno())
        if self.held is not None:
            self.context.unwatch(self.backend.space_fileno())
            self.held = None
        self.context.unwatch(self.kick)
        os.close(self.kick)
        if self._link_fd >= 0:
            self.context.unwatch(self._link_fd)
        self.counters.signals += self.channel.signals_sent
        self.serving = False
        self.fast = None  # it holds the rings, which the worker unmaps next
        self.backend.on_link_change = None
        if getattr(self.backend, "rx_offload", 0):  # the next guest asks for its own
            with contextlib.suppress(OSError):
                self.backend.set_receive_offload(0)
        for kind in list(self.buffers):
            self._unmap(kind)
        super().close()
