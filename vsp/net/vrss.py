"""vRSS: a netvsp sub-channel. The guest asks the primary channel for
sub-channels (NVSP SUBCHANNEL), the VSP offers them and sends the send
indirection table (every channel in turn), and the guest spreads its sends
over them, each a channel of its own with its own ring and doorbell.

A sub-channel carries the guest's sends only: SEND_RNDIS_PKTs on the DATA
channel, through the send buffer and the NVSP and RNDIS state of the
primary (Linux establishes the buffers there once). It is served by a
thread of its own (`own_thread`), so the compiled paths of several channels
write to the backend at once, without the GIL; its Python path takes the
primary's `shared` lock. Frames for the guest, control messages and
indications all travel on the primary. A sub-channel holds no frame back:
a medium that cannot take one refuses it (counted), as a full TAP does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vmbus._ringpacket import Packet
from vmbus.channel import COMPLETION_REQUESTED, PAUSED, VM_PKT_COMP, Channel
from vmbus.device import ChannelHandler, OpenContext
from vmbus.protocols.net import vsp as nv
from vmbus.protocols.net import wire as nvsp

try:
    from vsp.net._fast import FastPath
except ImportError:  # not built: every packet takes the Python path
    FastPath = None  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    from vsp.net.device import NetvspChannel

__all__ = ["NetvspSubChannel"]


class NetvspSubChannel(ChannelHandler):
    """The service of one sub-channel of an adapter whose primary is `primary`."""

    max_reply = nvsp.NVSP_MESSAGE_SIZE
    own_thread = True

    def __init__(self, primary: NetvspChannel, channel: Channel, context: OpenContext) -> None:
        super().__init__(channel, context)
        self.primary = primary
        self.index = context.offer.sub_channel_index
        self.refused = 0  # frames the backend refused (completed NVSP_STAT_FAIL)
        self.held = None  # never: see the module doc (the compiled path asks)
        self.serving = True
        self.fast: Any = None
        if primary.vsp.fast_path and FastPath is not None:
            try:
                self.fast = FastPath(channel, self.reserve)
            except TypeError:  # the Python ring
                self.fast = None

    # What the compiled path reads of its handler: the primary's state.
    @property
    def backend(self) -> Any:
        return self.primary.backend

    @property
    def rndis(self) -> nv.RndisDevice:
        return self.primary.rndis

    @property
    def nvsp(self) -> nv.NvspServer:
        return self.primary.nvsp

    @property
    def buffers(self) -> Any:
        return self.primary.buffers

    @property
    def counters(self) -> Any:
        return self.primary.counters

    def admission(self) -> int:
        room = super().admission()
        if self.fast is not None and room < PAUSED and not self.channel.backlog:
            self.fast_served += self.fast.drain(self)
        return room

    def on_packet(self, packet: Packet) -> None:
        if packet.type == VM_PKT_COMP:
            self.context.protocol_error("netvsp: a completion on sub-channel %d", self.index)
            return
        message = bytes(packet.payload)  # the one copy of the NVSP message
        completion = bool(packet.flags & COMPLETION_REQUESTED)
        primary = self.primary
        with primary.shared:
            kind = nvsp.message_type(message)
            if kind != nvsp.NvspMessageType.SEND_RNDIS_PKT:
                self.context.protocol_error("netvsp: %r on sub-channel %d", kind, self.index)
                return  # only sends travel here: nothing to complete
            event = primary.nvsp.receive(message, gpadl_sizes=primary._sizes)
            if isinstance(event, nv.Reply):  # a bad section: refused, with its status
                self.context.protocol_error("netvsp: %s", event.error)
                if completion:
                    self.reply(packet.trans_id, event.payload)
                return
            assert isinstance(event, nv.RndisPacket)
            if event.channel_type != nvsp.RndisChannel.DATA:
                self.context.protocol_error("netvsp: control on sub-channel %d", self.index)
                status: int = nvsp.NvspStatus.INVALID_RNDIS_PKT
            else:
                status = primary.send_frames(packet, event, self.context)
        if completion:
            self.reply(packet.trans_id, nvsp.encode(nvsp.SendRndisPacketComplete(status=status)))

    def close(self) -> None:
        self.serving = False
        self.fast = None  # it holds the rings, which the worker unmaps next
        self.primary.counters.signals += self.channel.signals_sent
        if self in self.primary.vsp.subs:
            self.primary.vsp.subs.remove(self)
        super().close()
