"""The synthetic keyboard and HID mouse VSPs, with programmatic injection.

Input arrives from other threads (a VNC client, a test, an emulator), while
a channel belongs to its child's worker thread. So `KeyboardVsp.press` or
`MouseVsp.move` encodes the event on the caller's thread (a bad argument is
the caller's UsageError), queues it on the open channel's handler and rings
the handler's eventfd, which the worker watches (`OpenContext.watch`); the
worker posts what was queued. A guest that reads slowly is the contract's
problem: posts wait in the handler's bounded backlog (mouse moves coalesce
there) and go out as the guest makes room; past the limit they are counted
in `dropped`, and the channel lives on.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import uuid

from vmbus import guid
from vmbus._ringpacket import Packet
from vmbus.channel import VM_PKT_DATA_INBAND, Channel
from vmbus.device import ChannelHandler, OpenContext, Vsp, packet_space
from vmbus.host import OfferSpec
from vmbus.protocols.input import (
    ABS_MAX,
    BUTTONS_MASK,
    KeyboardServer,
    MouseServer,
    encode_keystroke,
    encode_mouse_report,
    keysym_to_scancode,
)
from vmbus.protocols.input.wire import (
    DEVICE_INFO_PAYLOAD,
    HID_MESSAGE_OVERHEAD,
    KEYBOARD_RESPONSE_PAYLOAD,
    PROTOCOL_RESPONSE_PAYLOAD,
    MouseReport,
)

__all__ = ["InputHandler", "KeyboardHandler", "KeyboardVsp", "MouseHandler", "MouseVsp"]


class InputHandler(ChannelHandler):
    """One open input channel: answers the guest inband within the reserve,
    and posts the events other threads inject. Injected events wait in
    `pending` (at most `backlog_limit`, the rest counted in `overflow`) until
    the worker takes them; then in the base backlog while the guest is slow."""

    server: KeyboardServer | MouseServer

    def __init__(self, channel: Channel, context: OpenContext) -> None:
        super().__init__(channel, context)
        self._lock = threading.Lock()  # pending, closed, and the eventfd's life
        self.pending: collections.deque[bytes] = collections.deque()
        self.overflow = 0  # injected while `pending` was full (the worker stalled)
        self.closed = False
        self._errors_seen = 0
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            context.watch(self._wake, self._on_wake)
        except BaseException:
            os.close(self._wake)
            raise

    # --- the guest's requests (worker thread) ---

    def on_packet(self, packet: Packet) -> None:
        answers = self.server.receive(bytes(packet.payload))  # one private copy, parsed once
        errors = self.server.errors.total()
        if errors != self._errors_seen:
            self._errors_seen = errors
            self.context.protocol_error("%s: %s", type(self).__name__, self.server.last_error)
        for answer in answers:  # inband: guests ignore completions (§7)
            self.reply(packet.trans_id, answer, type=VM_PKT_DATA_INBAND)

    def on_signal(self) -> None:
        super().on_signal()  # the backlog first: events keep their order
        self._take_pending()

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True  # from now on no thread writes the eventfd
            self.pending.clear()
        try:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.context.unwatch(self._wake)
        finally:
            os.close(self._wake)
            super().close()

    # --- injection (any thread) ---

    def inject(self, payload: bytes) -> bool:
        """Queue an encoded event for the worker; False if it was dropped
        (channel closed, or the worker has fallen `backlog_limit` behind)."""
        with self._lock:
            if self.closed:
                return False
            if len(self.pending) >= self.backlog_limit:
                self.overflow += 1
                return False
            self.pending.append(payload)
            os.eventfd_write(self._wake, 1)
        return True

    def _on_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake)
        self._take_pending()

    def _take_pending(self) -> None:
        with self._lock:
            if not self.pending:
                return
            taken, self.pending = self.pending, collections.deque()
        for payload in taken:
            admitted = self.server.admit(payload)  # None before the guest negotiated
            if admitted is not None:
                self.send_event(admitted)

    def send_event(self, payload: bytes) -> None:
        self.post(payload)


class KeyboardHandler(InputHandler):
    """The keyboard on one channel (§7.1)."""

    server: KeyboardServer
    max_reply = KEYBOARD_RESPONSE_PAYLOAD
    backlog_limit = 4096  # keys are small; a pasted page survives a busy guest

    def __init__(self, channel: Channel, context: OpenContext) -> None:
        self.server = KeyboardServer()
        super().__init__(channel, context)


class MouseHandler(InputHandler):
    """The mouse on one channel (§7.2). While the guest is slow, a pointer
    move replaces a move at the backlog's tail with the same buttons: the
    position is absolute, so only the latest matters. Button changes and
    wheel clicks are never merged."""

    server: MouseServer
    # A PROTOCOL_REQUEST is answered by two packets; the reserve holds both.
    max_reply = packet_space(PROTOCOL_RESPONSE_PAYLOAD) + packet_space(DEVICE_INFO_PAYLOAD)

    def __init__(self, channel: Channel, context: OpenContext) -> None:
        self.server = MouseServer()
        super().__init__(channel, context)
        self.coalesced = 0  # moves merged into the backlog's tail
        self._tail_move: int | None = None  # buttons of a move at the backlog's tail

    def send_event(self, payload: bytes) -> None:
        report = MouseReport.unpack_from(payload, HID_MESSAGE_OVERHEAD)  # our own bytes
        move = None if report.wheel else report.buttons
        if move is not None and self.backlog and self._tail_move == move:
            self.backlog[-1] = (payload, VM_PKT_DATA_INBAND, 0, 0)
            self.coalesced += 1
            return
        dropped = self.dropped
        if not self.post(payload) and self.dropped == dropped:  # now the backlog's tail
            self._tail_move = move


class _InputVsp(Vsp):
    """One input device of one child: its offer, and the handler of its open
    channel (the last one opened; injection goes there)."""

    class_id: uuid.UUID

    def __init__(self, instance_id: uuid.UUID | None = None) -> None:
        self.instance_id = instance_id or uuid.uuid4()
        self.handler: InputHandler | None = None
        self.unopened = 0  # events injected while no channel was open

    def offers(self) -> list[OfferSpec]:
        return [OfferSpec(self.class_id, self.instance_id)]

    def _inject(self, payload: bytes) -> bool:
        handler = self.handler
        if handler is None:
            self.unopened += 1
            return False
        return handler.inject(payload)


class KeyboardVsp(_InputVsp):
    """The synthetic keyboard (docs/protocol.md §7.1)."""

    class_id = guid.KEYBOARD

    def __init__(self, instance_id: uuid.UUID | None = None) -> None:
        super().__init__(instance_id)
        self._idle = KeyboardServer()

    def open(self, channel: Channel, context: OpenContext) -> KeyboardHandler:
        handler = KeyboardHandler(channel, context)
        self.handler = handler
        return handler

    @property
    def server(self) -> KeyboardServer:
        """The protocol state of the open (or last) channel."""
        return self.handler.server if isinstance(self.handler, KeyboardHandler) else self._idle

    def press(self, scan_code: int, *, down: bool, e0: bool = False, e1: bool = False) -> bool:
        """Inject one set-1 make (down) or break (up); thread-safe. False if
        it was dropped (no open channel, or the worker is far behind)."""
        return self._inject(encode_keystroke(scan_code, down=down, e0=e0, e1=e1))

    def key(self, keysym: int, down: bool) -> bool:
        """Inject an X11 keysym (what VNC clients send); False if unmapped."""
        code = keysym_to_scancode(keysym)
        if code is None:
            return False
        return self.press(code.make_code, down=down, e0=code.e0)


class MouseVsp(_InputVsp):
    """The synthetic HID mouse (docs/protocol.md §7.2), an absolute pointer."""

    class_id = guid.MOUSE

    def __init__(self, instance_id: uuid.UUID | None = None) -> None:
        super().__init__(instance_id)
        self._idle = MouseServer()

    def open(self, channel: Channel, context: OpenContext) -> MouseHandler:
        handler = MouseHandler(channel, context)
        self.handler = handler
        return handler

    @property
    def server(self) -> MouseServer:
        """The protocol state of the open (or last) channel."""
        return self.handler.server if isinstance(self.handler, MouseHandler) else self._idle

    def move(self, x: int, y: int, buttons: int = 0, wheel: int = 0) -> bool:
        """Inject an absolute position (0..32767 on each axis); thread-safe."""
        return self._inject(encode_mouse_report(x, y, buttons, wheel))

    def pointer(self, x: int, y: int, buttons: int, width: int, height: int) -> bool:
        """Inject a screen position (what VNC clients send), scaled to the
        HID range; VNC buttons 1-3 are bits 0-2, wheel clicks bits 3 and 4."""
        wheel = 1 if buttons & 0x08 else -1 if buttons & 0x10 else 0
        return self.move(_scale(x, width), _scale(y, height), buttons & BUTTONS_MASK, wheel)


def _scale(value: int, size: int) -> int:
    """A pixel coordinate on a `size`-pixel axis, in the HID range 0..32767."""
    return min(ABS_MAX, max(0, value) * ABS_MAX // max(1, size - 1))
