"""The synthetic keyboard and mouse, for child programs: event streams of
scan codes and absolute pointer positions, blocking or asyncio."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Generic, TypeVar

from vmbus.channel import COMPLETION_REQUESTED, AsyncChannel
from vmbus.guest import GuestChannel, GuestDevice
from vmbus.protocols.input import (
    HidProtocolError,
    KeyboardClient,
    KeyboardProtocolError,
    KeyEvent,
    MouseClient,
    MouseEvent,
)

__all__ = ["Keyboard", "Mouse", "events"]

RING_SIZE = 40 * 1024  # VMBUS_RING_SIZE(36 KiB) on older Linux; FreeBSD's size
TIMEOUT = 10.0  # Linux waits this long for the keyboard's PROTOCOL_RESPONSE
E = TypeVar("E")


class _InputDevice(Generic[E]):
    """An input channel: poll, wait for, or await the next decoded event."""

    def __init__(self, device: GuestDevice) -> None:
        self.device = device
        self.channel: GuestChannel = device.open(RING_SIZE, RING_SIZE)

    def _decode(self, payload: bytes) -> E | None:
        """The event a message carries, if any (answering what needs it)."""
        raise NotImplementedError

    def _next_payload(self, deadline: float | None) -> bytes:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return bytes(self.channel.receive(left).payload)

    def poll(self) -> E | None:
        """An event that has already arrived, or None (never waits)."""
        while (packet := self.channel.poll()) is not None:
            event = self._decode(bytes(packet.payload))
            if event is not None:
                return event
        return None

    def next_event(self, timeout: float | None = None) -> E:
        """The next event, waiting for it (ChannelTimeout after `timeout`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (event := self._decode(self._next_payload(deadline))) is None:
            pass
        return event

    async def anext_event(self, channel: AsyncChannel) -> E:
        while (event := self._decode(bytes((await channel.receive()).payload))) is None:
            pass
        return event

    def close(self) -> None:
        self.channel.close()


class Keyboard(_InputDevice[KeyEvent]):
    """Key events (set-1 scan codes) from the parent."""

    def __init__(self, device: GuestDevice) -> None:
        super().__init__(device)
        self.client = KeyboardClient()
        self.channel.send(self.client.request(), flags=COMPLETION_REQUESTED, trans_id=1)
        deadline = time.monotonic() + TIMEOUT
        while self.client.accepted is None:
            self._decode(self._next_payload(deadline))
        if not self.client.accepted:
            raise KeyboardProtocolError("the host refused keyboard protocol 1.0")

    def _decode(self, payload: bytes) -> KeyEvent | None:
        return self.client.receive(payload)


class Mouse(_InputDevice[MouseEvent]):
    """Pointer events from the parent: absolute x, y in 0..32767, buttons."""

    def __init__(self, device: GuestDevice) -> None:
        super().__init__(device)
        self.client = MouseClient()
        self.channel.send(self.client.request(), flags=COMPLETION_REQUESTED, trans_id=1)
        deadline = time.monotonic() + TIMEOUT
        while self.client.report_descriptor is None:
            self._decode(self._next_payload(deadline))
        if not self.client.approved:
            raise HidProtocolError("the host refused HID protocol 2.0")

    def _decode(self, payload: bytes) -> MouseEvent | None:
        replies, event = self.client.receive(payload)
        for reply in replies:  # the device-info acknowledgement
            self.channel.send(reply)
        return event


async def events(device: Keyboard | Mouse) -> AsyncIterator[KeyEvent | MouseEvent]:
    """`async for event in events(keyboard)`: the asyncio form."""
    channel = AsyncChannel(device.channel)
    try:
        while True:
            yield await device.anext_event(channel)
    finally:
        channel.close()
