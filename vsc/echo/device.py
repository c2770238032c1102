"""The guest's echo driver: the smallest complete front end, and the
template for a new one."""

from __future__ import annotations

from vmbus.errors import UsageError
from vmbus.guest import GuestChannel, GuestDevice
from vmbus.protocols.echo import ECHO_MAX_PAYLOAD


class EchoVsc:
    """Bound to each echo offer by class GUID (`guest.register`)."""

    def __init__(self, device: GuestDevice) -> None:
        self.device = device
        self.channel: GuestChannel | None = None

    def open(self, ring_size: int = 64 * 1024) -> GuestChannel:
        self.channel = self.device.open(ring_size, ring_size)
        return self.channel

    def echo(self, payload: bytes, timeout: float = 10.0) -> bytes:
        """Send `payload` and return what comes back (padded to 8 bytes)."""
        if len(payload) > ECHO_MAX_PAYLOAD:
            raise UsageError(f"echo payload of {len(payload)} bytes exceeds {ECHO_MAX_PAYLOAD}")
        if self.channel is None:
            self.open()
        assert self.channel is not None
        return bytes(self.channel.request(payload, timeout=timeout).payload)
