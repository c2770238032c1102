"""netvsc: a network adapter for child programs, over NVSP and RNDIS.

`NetAdapter` grants a receive and a send buffer, runs the NVSP and RNDIS
initialization, and then sends Ethernet frames through send-buffer sections
and receives them from receive-buffer sections, completing each
transfer-page packet so the host can reuse its section. What the host sends
is decoded at the sizes Linux's netvsc accepts (`vmbus.protocols.net.vsc`):
real hosts send the type field and one union member, not 40 bytes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import os
import time
from collections.abc import Iterable
from typing import Any

from vmbus._ringpacket import Packet
from vmbus.channel import COMPLETION_REQUESTED, ChannelTimeout, wait_any
from vmbus.errors import UsageError
from vmbus.guest import GuestChannel, GuestDevice
from vmbus.memory import PAGE_SIZE
from vmbus.packet import PacketType, decode_transfer_page_header
from vmbus.protocols.net import offload as ol
from vmbus.protocols.net import rndis_data as rd
from vmbus.protocols.net import rndis_wire as rw
from vmbus.protocols.net import rsc, vsc
from vmbus.protocols.net import wire as nvsp

try:
    from vsc.net._fast import Engine
except ImportError:  # not built: the Python loops
    Engine = None  # type: ignore[assignment,misc]

__all__ = ["NetAdapter"]

RING_SIZE = 128 * 1024
RECEIVE_BUFFER = 1 << 20  # Linux defaults to 16 MiB; a child's memory is smaller
SEND_BUFFER = 1 << 20
TIMEOUT = 10.0
PACKET_FILTER = rd.PACKET_TYPE_DIRECTED | rd.PACKET_TYPE_BROADCAST | rd.PACKET_TYPE_ALL_MULTICAST


class NetAdapter:
    """A synthetic NIC of the parent's netvsp, seen from a child program."""

    # vRSS (open_sub_channels): the sub-channels with their compiled loops, and
    # the host's send indirection table (which channel each send goes on).
    subs: tuple[tuple[GuestChannel, Engine | None], ...] = ()
    send_table: tuple[int, ...] = (0,) * nvsp.VRSS_SEND_TABLE_SIZE
    _turn = 0

    def __init__(
        self,
        device: GuestDevice,
        *,
        receive_buffer: int = RECEIVE_BUFFER,
        send_buffer: int = SEND_BUFFER,
        fast: bool | None = None,
    ) -> None:
        self.device = device
        self.fast: Engine | None = None  # the compiled loops, once initialized
        self.channel: GuestChannel = device.open(RING_SIZE, RING_SIZE)
        guest = device.guest
        self.buffers = {}
        for name, size in (("receive", receive_buffer), ("send", send_buffer)):
            pfns = guest.allocator.alloc(size // PAGE_SIZE)
            handle = guest.create_gpadl(device.relid, pfns)
            self.buffers[name] = (pfns, handle, guest.memory.view(pfns[0] * PAGE_SIZE, size))
        self.frames: collections.deque[bytes] = collections.deque()
        self.link_events: collections.deque[bool] = collections.deque()
        self.rndis = vsc.RndisClient()
        self.rndis_replies: dict[int, vsc.Completion] = {}
        self.ids = itertools.count(1)
        self.sending: dict[int, int] = {}  # trans_id -> send section
        self.send_failures = 0  # sends the host completed with a status other than SUCCESS
        self.reassembly = rsc.Reassembly()  # coalesced receives (RSC), once asked for
        self.receive_coalescing = False
        self._initialize(receive_buffer, send_buffer)
        if fast is None:
            fast = os.environ.get("VMBUS_NET_FAST", "1").lower() not in ("0", "off", "false", "no")
        if fast and Engine is not None:
            try:
                self.fast = Engine(
                    self.channel,
                    self.buffers["send"][2],
                    self.buffers["receive"][2],
                    self.send_section,
                    self.max_packets,
                    self.alignment,
                )
            except TypeError:  # the Python ring: no C-level access
                self.fast = None
            if self.fast is not None:
                self.fast.reassembly = self.reassembly

    # --- initialization ---

    def _initialize(self, receive_size: int, send_size: int) -> None:
        client = vsc.NvspClient(
            self.buffers["receive"][1], receive_size, self.buffers["send"][1], send_size
        )
        requests = client.start()
        while requests:
            next_requests = []
            for request in requests:
                trans_id = next(self.ids)
                flags = COMPLETION_REQUESTED if request.completion_requested else 0
                self.channel.send(request.payload, flags=flags, trans_id=trans_id, timeout=TIMEOUT)
                if request.completion_requested:
                    reply = self.channel.wait_completion(trans_id, TIMEOUT)
                    next_requests += client.receive(reply.payload)
            requests = next_requests
        assert client.send_buffer is not None
        self.send_section = client.send_buffer.section_size
        self.nvsp_version = client.version or 0
        self.free_sections = collections.deque(range(client.send_buffer.section_count))
        init = self._control(self.rndis.initialize())
        self.mtu = self._query_u32(rd.OID_GEN_MAXIMUM_FRAME_SIZE)
        self.mac = self._control(self.rndis.query(rd.OID_802_3_PERMANENT_ADDRESS)).info[:6]
        self.link_up = self._query_u32(rd.OID_GEN_MEDIA_CONNECT_STATUS) == 0
        self._control(self.rndis.set(rd.OID_GEN_CURRENT_PACKET_FILTER, rd.u32(PACKET_FILTER)))
        self.offloads = self._negotiate_offloads()
        assert isinstance(init.message, rw.InitializeComplete)
        self.max_packets = max(1, init.message.max_pkt_per_msg)
        self.alignment = 1 << min(init.message.pkt_alignment_factor, 12)

    def _negotiate_offloads(self) -> ol.Offloads:
        """As Linux's netvsc: query the hardware capabilities (offering a
        zeroed revision-3 ndis_offload) and enable what they offer."""
        query = rd.NdisObjectHeader(rd.NDIS_OBJECT_TYPE_OFFLOAD, 3, rd.NDIS_OFFLOAD_SIZE)
        oid = rd.OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES
        caps = self._control(self.rndis.query(oid, query.pack().ljust(rd.NDIS_OFFLOAD_SIZE, b"\0")))
        offloads = ol.decode_capabilities(bytes(caps.info))
        # RSC only on request (coalesce_receives), as Linux only with NETIF_F_LRO.
        self.rsc_offered = offloads.rsc and self.nvsp_version >= nvsp.NVSP_PROTOCOL_VERSION_61
        offloads = dataclasses.replace(offloads, rsc=False)
        if offloads.any:
            self._control(self.rndis.set(rd.OID_TCP_OFFLOAD_PARAMETERS, ol.parameters(offloads)))
        return offloads

    def coalesce_receives(self, on: bool = True) -> bool:
        """Ask the host for coalesced receives (RSC), as Linux does when LRO
        is turned on: several TCP segments then arrive as one frame longer
        than the MTU, an `rsc.Received` with `coalesced` set. Only when
        the host offers it (NVSP 6.1); returns whether it is on."""
        if on and not self.rsc_offered:
            return False
        self._control(self.rndis.set(rd.OID_TCP_OFFLOAD_PARAMETERS, ol.rsc_parameters(on)))
        self.receive_coalescing = on
        self.offloads = dataclasses.replace(self.offloads, rsc=on)
        return on

    def _query_u32(self, oid: int) -> int:
        return int.from_bytes(self._control(self.rndis.query(oid)).info[:4], "little")

    def _control(self, message: bytes) -> vsc.Completion:
        """Send an RNDIS request; its completion comes back on the receive path."""
        req_id = int.from_bytes(message[8:12], "little")
        self._send_rndis(message, nvsp.RndisChannel.CONTROL)
        deadline = time.monotonic() + TIMEOUT
        while req_id not in self.rndis_replies:
            self._pump(max(0.0, deadline - time.monotonic()))
        completion = self.rndis_replies.pop(req_id)
        if not completion.succeeded:
            raise rw.RndisError(f"RNDIS request {completion.request_type!r}: {completion.status!r}")
        return completion

    # --- sending ---

    def _send_rndis(
        self, message: bytes, channel_type: int, channel: GuestChannel | None = None
    ) -> None:
        while not self.free_sections:
            self._pump(TIMEOUT)  # completions of earlier sends free sections
        section = self.free_sections.popleft()
        view = self.buffers["send"][2]
        view[section * self.send_section : section * self.send_section + len(message)] = message
        trans_id = next(self.ids)
        self.sending[trans_id] = section
        payload = nvsp.send_rndis_packet(channel_type, section, len(message))
        (channel or self.channel).send(
            payload, flags=COMPLETION_REQUESTED, trans_id=trans_id, timeout=TIMEOUT
        )

    def send(self, frame: Any) -> None:
        """Send one Ethernet frame (14-byte header, no FCS)."""
        self.send_batch((frame,))

    def send_batch(self, frames: Iterable[Any]) -> None:
        """Send frames, several RNDIS messages per send section (as many as
        the device allows), so the bus carries one packet per batch."""
        if self.fast is not None:
            self._send_fast(frames if isinstance(frames, list | tuple) else list(frames))
            return
        _, channel = self._next_channel()
        batch: list[bytes] = []
        size = 0
        for frame in frames:
            message = self._aligned(rw.encode_packet(frame))
            if len(message) > self.send_section:
                size = memoryview(frame).nbytes
                raise UsageError(f"frame of {size} bytes is too large for MTU {self.mtu}")
            if batch and (
                len(batch) == self.max_packets or size + len(message) > self.send_section
            ):
                self._send_rndis(b"".join(batch), nvsp.RndisChannel.DATA, channel)
                batch, size = [], 0
            batch.append(message)
            size += len(message)
        if batch:
            self._send_rndis(b"".join(batch), nvsp.RndisChannel.DATA, channel)

    def send_segment(self, frame: Any, *, mss: int = 0) -> None:
        """Send one IPv4/IPv6 TCP or UDP frame whose transport checksum the
        host completes (the checksum field holds the pseudo-header sum, as
        for CHECKSUM_PARTIAL); with `mss`, a TCP segment of up to 64 KiB
        that the host cuts into segments of `mss` bytes (LSOv2: IP lengths
        and checksums are the host's to fill). Needs the offloads the host
        offered (`offloads`)."""
        data = bytes(frame)
        place = ol.transport(data)
        if place is None or place[2] not in (ol.IPPROTO_TCP, ol.IPPROTO_UDP):
            raise UsageError("send_segment takes an IPv4 or IPv6 TCP or UDP frame")
        ipv6, offset, protocol = place
        tcp = protocol == ol.IPPROTO_TCP
        wanted = {
            (False, True): self.offloads.tx_tcp4,
            (False, False): self.offloads.tx_udp4,
            (True, True): self.offloads.tx_tcp6,
            (True, False): self.offloads.tx_udp6,
        }[(ipv6, tcp)]
        if mss:
            wanted = tcp and (self.offloads.lso6 if ipv6 else self.offloads.lso4)
        if not wanted:
            raise UsageError("the host offers no such offload")
        ppi = ol.lso_ppi(ipv6, offset, mss) if mss else ol.csum_ppi(ipv6, tcp, offset)
        message = self._aligned(rw.encode_packet(data, [ppi]))
        if len(message) > self.send_section:
            raise UsageError(f"a {len(data)}-byte segment does not fit a send section")
        self._send_rndis(message, nvsp.RndisChannel.DATA)

    def _send_fast(self, frames: list[Any] | tuple[Any, ...]) -> None:
        """send_batch's loop, compiled: sections filled in place, one commit
        per pass; waits here for sections (completions) or ring room."""
        engine, channel = self._next_channel()
        assert engine is not None
        start = 0
        while start < len(frames):
            start, stalled = engine.pack(frames, start, self.free_sections, self.sending, self.ids)
            if stalled is not None:
                payload, trans_id = stalled
                channel.send(
                    payload, flags=COMPLETION_REQUESTED, trans_id=trans_id, timeout=TIMEOUT
                )
            elif start < len(frames):
                self._pump(TIMEOUT)  # completions of earlier sends free sections

    def _next_channel(self) -> tuple[Engine | None, GuestChannel]:
        """The channel this batch goes on (the next entry of the send table),
        with its compiled loops."""
        if not self.subs:
            return self.fast, self.channel
        index = self.send_table[self._turn % len(self.send_table)] % (1 + len(self.subs))
        self._turn += 1
        if index == 0:
            return self.fast, self.channel
        channel, engine = self.subs[index - 1]
        return engine, channel

    def open_sub_channels(self, count: int, timeout: float = TIMEOUT) -> int:
        """vRSS, as Linux's netvsc sets it up: when the host reports several
        receive queues (NVSP 5 and up), ask for up to `count` sub-channels,
        wait for their offers and open them; batches then spread over every
        channel by the host's send indirection table. Returns how many opened."""
        if self.nvsp_version < nvsp.NVSP_PROTOCOL_VERSION_5 or count < 1 or self.subs:
            return 0
        caps = self._control(self.rndis.query(rd.OID_GEN_RECEIVE_SCALE_CAPABILITIES))
        info = bytes(caps.info)
        queues = int.from_bytes(info[12:16], "little") if len(info) >= 18 else 1
        count = min(count, queues - 1, nvsp.MAX_SUB_CHANNELS)
        if count < 1:
            return 0
        trans_id = next(self.ids)
        request = nvsp.encode(nvsp.SubChannelRequest(num_subchannels=count))
        self.channel.send(request, flags=COMPLETION_REQUESTED, trans_id=trans_id, timeout=TIMEOUT)
        deadline = time.monotonic() + timeout
        while trans_id not in self.channel.completions:
            self._pump(max(0.0, deadline - time.monotonic()))
        reply = nvsp.decode_short(
            self.channel.completions.pop(trans_id).payload, nvsp.SubChannelComplete
        )
        if reply.status != nvsp.NvspStatus.SUCCESS or not 0 < reply.num_subchannels <= count:
            return 0
        count = reply.num_subchannels
        guest, primary = self.device.guest, self.device
        while True:
            offered = sorted(
                (d for d in guest.devices.values()
                 if d.instance_id == primary.instance_id and d.sub_channel_index),
                key=lambda d: d.sub_channel_index,
            )  # fmt: skip
            if len(offered) >= count:
                break
            if time.monotonic() > deadline:
                raise ChannelTimeout(f"{len(offered)} of {count} sub-channel offers arrived")
            self._pump(0)  # the table may come meanwhile; offers come on the control port
            time.sleep(0.001)
        subs = []
        for device in offered[:count]:
            channel = device.open(RING_SIZE, RING_SIZE)
            channel.spin_seconds = self.channel.spin_seconds
            engine = None
            if self.fast is not None:
                send, receive = self.buffers["send"][2], self.buffers["receive"][2]
                args = (self.send_section, self.max_packets, self.alignment)
                engine = Engine(channel, send, receive, *args)
                engine.reassembly = self.reassembly
            subs.append((channel, engine))
        self.subs = tuple(subs)
        if not any(self.send_table):  # the host's table may come later: Linux's default
            self.send_table = tuple(i % (1 + count) for i in range(nvsp.VRSS_SEND_TABLE_SIZE))
        return count

    def _aligned(self, message: bytes) -> bytes:
        """Pad to the device's alignment; msg_len covers the padding."""
        padded = -(-len(message) // self.alignment) * self.alignment
        return (
            message[:4] + padded.to_bytes(4, "little") + message[8:] + bytes(padded - len(message))
        )

    # --- receiving ---

    def poll(self) -> bytes | None:
        """A frame that has already arrived, or None (never waits)."""
        if not self.frames:
            self._pump(0)
        return self.frames.popleft() if self.frames else None

    def receive(self, timeout: float | None = None) -> bytes:
        """The next frame the host delivered, waiting for one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.frames:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if left == 0.0:
                raise ChannelTimeout("no frame arrived in time")
            self._pump(left)
        return self.frames.popleft()

    async def areceive(self) -> bytes:
        """The asyncio form of receive."""
        loop = asyncio.get_running_loop()
        while not self.frames:
            self._pump(0)
            if self.frames:
                break
            ready = asyncio.Event()
            fd = self.channel.wake_me.fileno()
            loop.add_reader(fd, ready.set)
            try:
                self.channel.reader.end_drain()
                if not self.channel.reader.bytes_available:
                    await ready.wait()
            finally:
                loop.remove_reader(fd)
                self.channel.reader.begin_drain()
        return self.frames.popleft()

    def wait_link(self, up: bool, timeout: float = TIMEOUT) -> None:
        """Wait for the host to report the link `up` (or down)."""
        deadline = time.monotonic() + timeout
        while self.link_up != up:
            self._pump(max(0.0, deadline - time.monotonic()))

    def _pump(self, timeout: float | None) -> None:
        """Handle at least one packet from the host (waiting up to timeout)."""
        fast = self.fast if not self.channel.backlog else None
        reaped = 0 if fast is None else fast.reap(self.sending, self.free_sections, self.frames)
        if self.subs:
            reaped += self._pump_subs()
        packet = self.channel.poll()
        if packet is None:
            if timeout == 0 or reaped:
                return
            if self.subs:
                wait_any([self.channel, *(channel for channel, _ in self.subs)], timeout)
                self._pump(0)
                return
            packet = self.channel.receive(timeout)
        while packet is not None:
            self._handle(packet)
            if fast is not None:
                fast.reap(self.sending, self.free_sections, self.frames)
            packet = self.channel.poll()

    def _pump_subs(self) -> int:
        """What the sub-channels hold: completions of the sends made there."""
        handled = 0
        for channel, engine in self.subs:
            if engine is not None and not channel.backlog:
                handled += engine.reap(self.sending, self.free_sections, self.frames)
            while (packet := channel.poll()) is not None:
                self._handle(packet, channel)
                handled += 1
        return handled

    def _handle(self, packet: Packet, channel: GuestChannel | None = None) -> None:
        if packet.type == PacketType.COMP:
            section = self.sending.pop(packet.trans_id, None)
            if section is None:
                self.channel.completions[packet.trans_id] = packet
                return
            self.free_sections.append(section)  # whatever the status: the section is ours
            completion = vsc.decode_completion(packet.payload)  # 8 bytes from a host
            if getattr(completion, "status", None) != nvsp.NvspStatus.SUCCESS:
                self.send_failures += 1
        elif packet.type == PacketType.DATA_USING_XFER_PAGES:
            vsc.decode_receive(packet.payload)  # a SEND_RNDIS_PKT: 16 bytes suffice
            view = self.buffers["receive"][2]
            header = decode_transfer_page_header(packet.header, buffer_size=len(view))
            last = len(header.ranges) - 1
            for index, (count, offset) in enumerate(header.ranges):
                self._rndis_message(bytes(view[offset : offset + count]), index == last)
            done = vsc.receive_completion()  # 8 bytes, as Linux completes it
            (channel or self.channel).send(done, type=PacketType.COMP, trans_id=packet.trans_id)
        elif nvsp.message_type(packet.payload) == nvsp.NvspMessageType.SEND_INDIRECTION_TABLE:
            with contextlib.suppress(nvsp.NvspError):  # Linux logs a bad table, keeps its own
                self.send_table = nvsp.decode_indirection_table(packet.payload)
        # other in-band packets (VF association): nothing for this adapter

    def _rndis_message(self, message: bytes, last_range: bool = True) -> None:
        if int.from_bytes(message[:4], "little") == rw.RndisMessageType.PACKET:
            frame, ppis = rw.decode_packet(message)
            if ppis or self.reassembly.parts:  # checksum info, RSC fragments
                whole = self.reassembly.add(frame, ppis, last_range)
                if whole is not None:
                    self.frames.append(whole)
                return
            self.frames.append(bytes(frame))
            return
        event = self.rndis.receive(message)
        if isinstance(event, vsc.Indication):
            if event.status in (rw.RndisStatus.MEDIA_CONNECT, rw.RndisStatus.MEDIA_DISCONNECT):
                self.link_up = event.status == rw.RndisStatus.MEDIA_CONNECT
                self.link_events.append(self.link_up)
        else:
            self.rndis_replies[event.req_id] = event

    def close(self) -> None:
        for channel, engine in self.subs:
            if engine is not None:
                engine.release()
            channel.close()
        self.subs = ()
        if self.fast is not None:
            self.fast.release()  # its hold on the buffers, before they go
            self.fast = None
        guest = self.device.guest
        for _, _, view in self.buffers.values():
            view.release()
        self.channel.close()
        for pfns, handle, _ in self.buffers.values():
            guest.teardown_gpadl(self.device.relid, handle)
            guest.allocator.free(pfns)
