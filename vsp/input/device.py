"""The synthetic keyboard and HID mouse VSPs, with programmatic injection.

Input comes from the parent (a VNC client, a test, an emulator), while the
device runs in the VM's worker, a process of its own or a thread. So each
input VSP owns a pipe (`EventPipe`): `KeyboardVsp.press` or `MouseVsp.move`
encodes the event on the caller's thread (a bad argument is the caller's
UsageError) and writes it; the worker's copy of the VSP watches the read
end (`OpenContext.watch`) while a channel is open and posts what arrives.
The pipe (1 MiB where the system allows: tens of thousands of events) is
the queue between the two: if the worker falls that far behind, an
injection fails and is counted in `overflow`. A
guest that reads slowly is the contract's problem: posts wait in the
handler's bounded backlog (mouse moves coalesce there) and go out as the
guest makes room; past the limit they are counted in `dropped`, and the
channel lives on.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from typing import Any

from vmbus import guid
from vmbus._ringpacket import Packet
from vmbus.channel import VM_PKT_DATA_INBAND, Channel
from vmbus.device import ChannelHandler, OpenContext, Vsp, packet_space
from vmbus.errors import UsageError
from vmbus.handoff import SharedFd
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

PIPE_BYTES = 1 << 20  # asked of the kernel; fs.pipe-max-size may cap it
READ_BYTES = 1 << 16  # taken from the pipe per read


class EventPipe:
    """Injected events on their way to the worker: a pipe in which each
    event is one write of its length (a byte) and its bytes. A write of up
    to PIPE_BUF bytes is atomic, so an event is queued whole or refused
    whole. The parent keeps the write end; a worker's copy gets the read end
    only."""

    def __init__(self) -> None:
        self.read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.write_fd: int | None = write_fd
        with contextlib.suppress(OSError):  # the default 64 KiB still holds thousands
            fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        self._partial = b""  # a read may end inside an event

    def __getstate__(self) -> dict[str, Any]:
        return {"read_fd": SharedFd(self.read_fd)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.read_fd, self.write_fd, self._partial = state["read_fd"].take(), None, b""

    def __del__(self) -> None:  # the device's descriptors live as long as the device
        for fd in (self.read_fd, self.write_fd):
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def put(self, payload: bytes) -> bool:
        """Queue one event; False if the pipe is full."""
        if self.write_fd is None:
            raise UsageError("events are injected through the parent's device, not its copy")
        try:
            os.write(self.write_fd, bytes((len(payload),)) + payload)
        except BlockingIOError:
            return False
        return True

    def take(self) -> list[bytes] | None:
        """The events queued now (at most a read's worth); None once the
        write end is closed and everything was taken."""
        try:
            data = self._partial + os.read(self.read_fd, READ_BYTES)
        except BlockingIOError:
            return []
        if len(data) == len(self._partial):
            return None  # end of file: the parent's device is gone
        events, at = [], 0
        while at < len(data) and at + 1 + data[at] <= len(data):
            events.append(data[at + 1 : at + 1 + data[at]])
            at += 1 + data[at]
        self._partial = data[at:]
        return events


class InputHandler(ChannelHandler):
    """One open input channel: answers the guest inband within the reserve,
    and posts the events injected into its VSP's pipe. Events injected
    before the channel opened are stale: discarded and counted in
    `unopened`. At most `backlog_limit` events are taken per wake-up, so a
    flood of injections cannot hold the worker."""

    server: KeyboardServer | MouseServer

    def __init__(self, channel: Channel, context: OpenContext, events: EventPipe) -> None:
        super().__init__(channel, context)
        self.events = events
        self.taken = 0  # events taken from the pipe and handed to the server
        self.unopened = self._discard_stale()
        self.closed = False
        self._errors_seen = 0
        context.watch(events.read_fd, self._take_events)

    def _discard_stale(self) -> int:
        count = 0
        while stale := self.events.take():
            count += len(stale)
        return count

    # --- the guest's requests ---

    def on_packet(self, packet: Packet) -> None:
        answers = self.server.receive(bytes(packet.payload))  # one private copy, parsed once
        errors = self.server.errors.total()
        if errors != self._errors_seen:
            self._errors_seen = errors
            self.context.protocol_error("%s: %s", type(self).__name__, self.server.last_error)
        for answer in answers:  # inband: guests ignore completions (§7)
            self.reply(packet.trans_id, answer, type=VM_PKT_DATA_INBAND)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.context.unwatch(self.events.read_fd)
        finally:
            super().close()

    # --- injected events ---

    def _take_events(self) -> None:
        events = self.events.take()  # a read's worth: a flood cannot hold the worker
        if events is None:  # the parent's device is gone: nothing more will come
            self.context.unwatch(self.events.read_fd)
            return
        for payload in events:
            self.taken += 1
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

    def __init__(self, channel: Channel, context: OpenContext, events: EventPipe) -> None:
        self.server = KeyboardServer()
        super().__init__(channel, context, events)


class MouseHandler(InputHandler):
    """The mouse on one channel (§7.2). While the guest is slow, a pointer
    move replaces a move at the backlog's tail with the same buttons: the
    position is absolute, so only the latest matters. Button changes and
    wheel clicks are never merged."""

    server: MouseServer
    # A PROTOCOL_REQUEST is answered by two packets; the reserve holds both.
    max_reply = packet_space(PROTOCOL_RESPONSE_PAYLOAD) + packet_space(DEVICE_INFO_PAYLOAD)

    def __init__(self, channel: Channel, context: OpenContext, events: EventPipe) -> None:
        self.server = MouseServer()
        super().__init__(channel, context, events)
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
    """One input device of one child: its offer, the pipe events are
    injected through, and the handler of its open channel (the last one
    opened). The parent's object sends; the worker's copy (or, with a worker
    thread, the same object) receives."""

    class_id: uuid.UUID

    def __init__(self, instance_id: uuid.UUID | None = None) -> None:
        self.instance_id = instance_id or uuid.uuid4()
        self.handler: InputHandler | None = None
        self.overflow = 0  # injections refused: the worker was that far behind
        self._events = EventPipe()

    def __getstate__(self) -> dict[str, Any]:
        """The worker's copy: the receiving end only (injection is the
        parent's), no handler yet."""
        return {"instance_id": self.instance_id, "events": self._events}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.instance_id = state["instance_id"]
        self.handler, self.overflow = None, 0
        self._events = state["events"]

    def offers(self) -> list[OfferSpec]:
        return [OfferSpec(self.class_id, self.instance_id)]

    def stats(self) -> dict[str, Any]:
        handler = self.handler
        if handler is None:
            return {"open": False}
        return {
            "open": not handler.closed,
            "events": handler.taken,
            "unopened": handler.unopened,
            "dropped": handler.dropped,
        }

    def _inject(self, payload: bytes) -> bool:
        if self._events.put(payload):
            return True
        self.overflow += 1
        return False


class KeyboardVsp(_InputVsp):
    """The synthetic keyboard (docs/protocol.md §7.1)."""

    class_id = guid.KEYBOARD

    def open(self, channel: Channel, context: OpenContext) -> KeyboardHandler:
        handler = KeyboardHandler(channel, context, self._events)
        self.handler = handler
        return handler

    @property
    def server(self) -> KeyboardServer:
        """The protocol state of the open (or last) channel."""
        return (
            self.handler.server if isinstance(self.handler, KeyboardHandler) else KeyboardServer()
        )

    def press(self, scan_code: int, *, down: bool, e0: bool = False, e1: bool = False) -> bool:
        """Inject one set-1 make (down) or break (up); thread-safe. False if
        it was refused (the worker is far behind)."""
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

    def open(self, channel: Channel, context: OpenContext) -> MouseHandler:
        handler = MouseHandler(channel, context, self._events)
        self.handler = handler
        return handler

    @property
    def server(self) -> MouseServer:
        """The protocol state of the open (or last) channel."""
        return self.handler.server if isinstance(self.handler, MouseHandler) else MouseServer()

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
