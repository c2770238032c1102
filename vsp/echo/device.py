"""The echo VSP: the smallest complete device back end, and the template for
a new one. It answers each packet per `vmbus.protocols.echo`."""

from __future__ import annotations

import uuid
from typing import Any

from vmbus._ringpacket import Packet
from vmbus.channel import COMPLETION_REQUESTED, Channel
from vmbus.device import ChannelHandler, OpenContext, Vsp
from vmbus.host import OfferSpec
from vmbus.protocols.echo import ECHO_CLASS_ID, ECHO_MAX_PAYLOAD


class EchoHandler(ChannelHandler):
    """The service of one open echo channel."""

    max_reply = ECHO_MAX_PAYLOAD  # so `reply` never waits

    def __init__(self, channel: Channel, context: OpenContext) -> None:
        super().__init__(channel, context)
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


class EchoVsp(Vsp):
    """Offers `count` echo channels."""

    def __init__(self, count: int = 1) -> None:
        self.instances = [uuid.uuid4() for _ in range(count)]
        self.handlers: list[EchoHandler] = []

    def offers(self) -> list[OfferSpec]:
        return [OfferSpec(ECHO_CLASS_ID, instance) for instance in self.instances]

    def open(self, channel: Channel, context: OpenContext) -> EchoHandler:
        handler = EchoHandler(channel, context)
        self.handlers.append(handler)
        return handler

    def stats(self) -> dict[str, Any]:
        return {
            "packets": [handler.packets for handler in self.handlers],
            "refused": sum(handler.refused for handler in self.handlers),
        }
