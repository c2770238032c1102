"""The synthetic keyboard and mouse, for child programs: event streams of
scan codes and absolute pointer positions, blocking or asyncio."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from vmbus.channel import COMPLETION_REQUESTED, AsyncChannel
from vmbus.guest import GuestChannel, GuestDevice
from vmbus.protocols import hid, keyboard

RING_SIZE = 40 * 1024  # VMBUS_RING_SIZE(36 KiB) on older Linux; FreeBSD's size
TIMEOUT = 10.0


class _InputDevice:
    def __init__(self, device: GuestDevice) -> None:
        self.device = device
        self.channel: GuestChannel = device.open(RING_SIZE, RING_SIZE)

    def _payloads(self, timeout: float | None) -> bytes:
        return bytes(self.channel.receive(timeout).payload)

    def close(self) -> None:
        self.channel.close()


class Keyboard(_InputDevice):
    """Key events from the parent: `next_event()` or `await anext_event()`."""

    def __init__(self, device: GuestDevice) -> None:
        super().__init__(device)
        self.client = keyboard.KeyboardClient()
        self.channel.send(self.client.request(), flags=COMPLETION_REQUESTED, trans_id=1)
        deadline = time.monotonic() + TIMEOUT
        while self.client.accepted is None:
            self.client.receive(self._payloads(deadline - time.monotonic()))
        if not self.client.accepted:
            raise keyboard.KeyboardProtocolError("the host refused keyboard protocol 1.0")

    def poll(self) -> keyboard.KeyEvent | None:
        """A key event that has already arrived, or None (never waits)."""
        while (packet := self.channel.poll()) is not None:
            event = self.client.receive(bytes(packet.payload))
            if event is not None:
                return event
        return None

    def next_event(self, timeout: float | None = None) -> keyboard.KeyEvent:
        """The next key press or release (a set-1 scan code)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            event = self.client.receive(self._payloads(left))
            if event is not None:
                return event

    async def anext_event(self, channel: AsyncChannel) -> keyboard.KeyEvent:
        while True:
            packet = await channel.receive()
            event = self.client.receive(bytes(packet.payload))
            if event is not None:
                return event


class Mouse(_InputDevice):
    """Pointer events from the parent: absolute x, y in 0..32767, buttons."""

    def __init__(self, device: GuestDevice) -> None:
        super().__init__(device)
        self.client = hid.MouseClient()
        self.channel.send(self.client.request(), flags=COMPLETION_REQUESTED, trans_id=1)
        deadline = time.monotonic() + TIMEOUT
        while self.client.report_descriptor is None:
            self._handle(self._payloads(deadline - time.monotonic()))
        if not self.client.approved:
            raise hid.HidProtocolError("the host refused HID protocol 2.0")

    def _handle(self, payload: bytes) -> hid.MouseEvent | None:
        replies, event = self.client.receive(payload)
        for reply in replies:  # the device-info acknowledgement
            self.channel.send(reply)
        return event

    def poll(self) -> hid.MouseEvent | None:
        """A pointer event that has already arrived, or None (never waits)."""
        while (packet := self.channel.poll()) is not None:
            event = self._handle(bytes(packet.payload))
            if event is not None:
                return event
        return None

    def next_event(self, timeout: float | None = None) -> hid.MouseEvent:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            event = self._handle(self._payloads(left))
            if event is not None:
                return event

    async def anext_event(self, channel: AsyncChannel) -> hid.MouseEvent:
        while True:
            packet = await channel.receive()
            event = self._handle(bytes(packet.payload))
            if event is not None:
                return event


async def events(device: Keyboard | Mouse) -> AsyncIterator[keyboard.KeyEvent | hid.MouseEvent]:
    """`async for event in events(keyboard)`: the asyncio form."""
    channel = AsyncChannel(device.channel)
    try:
        while True:
            yield await device.anext_event(channel)
    finally:
        channel.close()
