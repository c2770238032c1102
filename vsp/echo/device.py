"""The echo VSP: the smallest complete device back end, and the template for
a new one. It answers each packet per `vmbus.protocols.echo`."""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

from vmbus._ringpacket import Packet
from vmbus.channel import COMPLETION_REQUESTED, Channel
from vmbus.device import ChannelHandler, OpenContext, Vsp
from vmbus.host import OfferSpec
from vmbus.protocols.echo import ECHO_CLASS_ID, ECHO_MAX_PAYLOAD


class EchoHandler(ChannelHandler):
    """The service of one open echo channel."""

    max_reply = ECHO_MAX_PAYLOAD  # so `reply` never waits

    def __init__(self, channel: Channel, context: OpenContext, vsp: EchoVsp | None = None) -> None:
        super().__init__(channel, context)
        self.vsp = vsp  # told when the channel closes
        self.packets = 0
        self.refused = 0

    def on_packet(self, packet: Packet) -> None:
        self.packets += 1
        if len(packet.payload) > ECHO_MAX_PAYLOAD:
            self.refused += 1
            self.context.protocol_error("echo payload of %d bytes", len(packet.payload))
        elif packet.flags & COMPLETION_REQUESTED:
            self.reply(packet.trans_id, packet.payload)
        else:  # unsolicited back: waits in the backlog if the guest reads slowly
            self.post(packet.payload, trans_id=packet.trans_id)

    def close(self) -> None:
        super().close()
        if self.vsp is not None:
            self.vsp.closed(self)


class EchoVsp(Vsp):
    """Offers `count` echo channels."""

    def __init__(self, count: int = 1) -> None:
        self.instances = [uuid.uuid4() for _ in range(count)]
        self.handlers: list[EchoHandler] = []  # the open channels'
        # What closed channels counted, by channel (instance, sub-channel):
        # a guest that opens and closes one again and again grows nothing here.
        self._served: Counter[tuple[uuid.UUID, int]] = Counter()
        self._refused = 0

    def offers(self) -> list[OfferSpec]:
        return [OfferSpec(ECHO_CLASS_ID, instance) for instance in self.instances]

    def open(self, channel: Channel, context: OpenContext) -> EchoHandler:
        handler = EchoHandler(channel, context, self)
        self.handlers.append(handler)
        return handler

    def closed(self, handler: EchoHandler) -> None:
        """A channel closed: forget its handler, keep what it counted."""
        if handler in self.handlers:
            self.handlers.remove(handler)
            self._served[_channel(handler)] += handler.packets
            self._refused += handler.refused

    def stats(self) -> dict[str, Any]:
        """Packets echoed on each channel (over all its opens), offered
        channels first, in offer order; and the payloads refused."""
        served = Counter(self._served)
        for handler in list(self.handlers):
            served[_channel(handler)] += handler.packets
        offered = [(offer.instance_id, offer.sub_channel_index) for offer in self.offers()]
        order = offered + [channel for channel in served if channel not in offered]
        return {
            "packets": [served[channel] for channel in order],
            "refused": self._refused + sum(handler.refused for handler in list(self.handlers)),
        }


def _channel(handler: EchoHandler) -> tuple[uuid.UUID, int]:
    offer = handler.context.offer
    return offer.instance_id, offer.sub_channel_index
