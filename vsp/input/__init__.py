"""The synthetic keyboard and HID mouse VSPs, with programmatic injection.

Input arrives from other threads (a VNC client, a test, an emulator), while
a channel belongs to its child's worker thread. So injection queues the
event and rings an eventfd that the worker watches (`OpenContext.watch`);
the worker turns queued events into packets on its own channel.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import uuid

from vmbus import guid
from vmbus._ringpacket import Packet
from vmbus.channel import Channel
from vmbus.device import OpenContext, Vsp
from vmbus.host import OfferSpec
from vmbus.protocols.input import hid, keyboard
from vmbus.protocols.input.scancodes import keysym_to_scancode

MAX_QUEUED_EVENTS = 4096  # a guest that never reads cannot grow our memory


class _InputVsp(Vsp):
    """One device of one child: an offer, one open channel, a queue."""

    reserve = 0  # interim: moves to the ChannelHandler contract

    class_id: uuid.UUID

    def __init__(self, instance_id: uuid.UUID | None = None) -> None:
        self.instance_id = instance_id or uuid.uuid4()
        self.queue: collections.deque[bytes] = collections.deque(maxlen=MAX_QUEUED_EVENTS)
        self.lock = threading.Lock()
        self.ready = os.eventfd(0, os.EFD_NONBLOCK)
        self.channel: Channel | None = None
        self.context: OpenContext | None = None
        self.sent = 0

    def offers(self) -> list[OfferSpec]:
        return [OfferSpec(self.class_id, self.instance_id)]

    def on_packet(self, packet: Packet) -> None:
        raise NotImplementedError  # each device answers its own protocol

    def open(self, channel: Channel, context: OpenContext) -> _InputVsp:  # type: ignore[override]  # interim
        self.channel, self.context = channel, context
        context.watch(self.ready, self._flush)
        return self

    def _reply(self, payloads: list[bytes]) -> None:
        assert self.channel is not None
        for payload in payloads:
            self.channel.send(payload, timeout=0)

    def _enqueue(self, payload: bytes | None) -> None:
        if payload is None:
            return  # the guest has not negotiated yet: the protocol counted the drop
        with self.lock:
            self.queue.append(payload)
        os.eventfd_write(self.ready, 1)

    def _flush(self) -> None:
        """In the worker: send what was injected, while the ring has room."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.ready)
        self.on_signal()

    def on_signal(self) -> None:
        channel = self.channel
        while channel is not None:
            with self.lock:
                if not self.queue:
                    return
                payload = self.queue[0]
            if not channel.try_send(payload):
                return  # the guest reads slowly: its reading signals us again
            with self.lock:
                self.queue.popleft()
            self.sent += 1

    def close(self) -> None:
        if self.context is not None:
            self.context.unwatch(self.ready)
        self.channel = self.context = None


class KeyboardVsp(_InputVsp):
    """The synthetic keyboard (PROTOCOL-FACTS §7.1)."""

    class_id = guid.KEYBOARD

    def __init__(self, instance_id: uuid.UUID | None = None) -> None:
        super().__init__(instance_id)
        self.server = keyboard.KeyboardServer()

    def on_packet(self, packet: Packet) -> None:
        self._reply(self.server.receive(packet.payload))
        self._flush()

    def press(self, scan_code: int, *, down: bool, e0: bool = False, e1: bool = False) -> None:
        """Inject one set-1 make (down) or break (up); thread-safe."""
        self._enqueue(self.server.keystroke(scan_code, down=down, e0=e0, e1=e1))

    def key(self, keysym: int, down: bool) -> bool:
        """Inject an X11 keysym (what VNC clients send); False if unmapped."""
        code = keysym_to_scancode(keysym)
        if code is None:
            return False
        self.press(code.make_code, down=down, e0=code.e0)
        return True


class MouseVsp(_InputVsp):
    """The synthetic HID mouse (PROTOCOL-FACTS §7.2), an absolute pointer."""

    class_id = guid.MOUSE

    def __init__(self, instance_id: uuid.UUID | None = None) -> None:
        super().__init__(instance_id)
        self.server = hid.MouseServer()

    def on_packet(self, packet: Packet) -> None:
        self._reply(self.server.receive(packet.payload))
        self._flush()

    def move(self, x: int, y: int, buttons: int = 0, wheel: int = 0) -> None:
        """Inject an absolute position (0..32767 on each axis); thread-safe."""
        self._enqueue(self.server.report(x, y, buttons, wheel))

    def pointer(self, x: int, y: int, buttons: int, width: int, height: int) -> None:
        """Inject a screen position (what VNC clients send), scaled to the
        HID range; VNC buttons 1-3 are bits 0-2, wheel clicks bits 3 and 4."""
        wheel = 1 if buttons & 0x08 else -1 if buttons & 0x10 else 0
        self.move(_scale(x, width), _scale(y, height), buttons & hid.BUTTONS_MASK, wheel)


def _scale(value: int, size: int) -> int:
    """A pixel coordinate on a `size`-pixel axis, in the HID range 0..32767."""
    return min(hid.ABS_MAX, max(0, value) * hid.ABS_MAX // max(1, size - 1))
