"""The echo device: the smallest complete VSP and VSC, used by the tests and
as the template for a new device. The VSP answers every packet that asks for
a completion with a completion carrying the same payload, and echoes other
packets back as in-band packets."""

from __future__ import annotations

import uuid

from vmbus._ringpacket import Packet
from vmbus.channel import COMPLETION_REQUESTED, Channel
from vmbus.guest import GuestChannel, GuestDevice
from vmbus.host import OfferSpec

ECHO_CLASS_ID = uuid.UUID("6c0ac8a2-7e1d-4d8e-9b0a-2f3f8e0c0e10")


class EchoHandler:
    """The VSP's service of one open echo channel."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.packets = 0

    def on_packet(self, packet: Packet) -> None:
        self.packets += 1
        if packet.flags & COMPLETION_REQUESTED:
            self.channel.send_completion(packet.trans_id, packet.payload)
        else:
            self.channel.send(packet.payload, trans_id=packet.trans_id)

    def close(self) -> None:
        pass


class EchoVsp:
    """Offers `count` echo channels."""

    def __init__(self, count: int = 1) -> None:
        self.instances = [uuid.uuid4() for _ in range(count)]
        self.handlers: list[EchoHandler] = []

    def offers(self) -> list[OfferSpec]:
        return [OfferSpec(ECHO_CLASS_ID, instance) for instance in self.instances]

    def open(self, channel: Channel, context: object) -> EchoHandler:
        handler = EchoHandler(channel)
        self.handlers.append(handler)
        return handler


class EchoVsc:
    """The guest's echo driver: bound to each echo offer by class GUID."""

    def __init__(self, device: GuestDevice) -> None:
        self.device = device
        self.channel: GuestChannel | None = None

    def open(self, ring_size: int = 64 * 1024) -> GuestChannel:
        self.channel = self.device.open(ring_size, ring_size)
        return self.channel

    def echo(self, payload: bytes, timeout: float = 10.0) -> bytes:
        """Send `payload` and return what comes back (padded to 8 bytes)."""
        if self.channel is None:
            self.open()
        assert self.channel is not None
        return bytes(self.channel.request(payload, timeout=timeout).payload)
