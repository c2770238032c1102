"""The synthetic video VSP: the guest's framebuffer lives in its own memory
(VRAM it grants through a GPADL); mode changes and dirty rectangles arrive
over the channel, and the VSP copies the dirty regions into a `Screen`,
which the PNG snapshot and the VNC server show."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from vmbus import guid
from vmbus._ringpacket import Packet
from vmbus.channel import VM_PKT_DATA_INBAND, Channel
from vmbus.device import ChannelHandler, OpenContext, Vsp
from vmbus.errors import UsageError
from vmbus.gpadl import Gpadl
from vmbus.host import OfferSpec
from vmbus.protocols import video as sv
from vmbus.timers import Timer
from vsp.video.screen import CONTROL_SIZE, Rect, Screen

DEFAULT_VRAM_MB = 8  # what Hyper-V offers a WIN8+ guest
DEFAULT_MODE = (1024, 768)
# The Screen is refreshed from VRAM at most this often: more than a viewer
# shows, far fewer than a guest can send DIRTs (~4,000 full frames/s here).
MAX_COPIES_PER_SECOND = 500.0


class VideoHandler(ChannelHandler):
    """The service of one open synthvid channel: answers the guest (one
    answer per message, within the reserve), asks it for dirty rectangles
    once a mode is set, and shows what it draws on the VSP's `Screen`."""

    max_reply = sv.MAX_HOST_MESSAGE  # a RESOLUTION_RESPONSE, the largest answer

    def __init__(self, channel: Channel, context: OpenContext, vsp: VideoVsp) -> None:
        super().__init__(channel, context)
        self.screen = vsp.screen
        self.vram_size = vsp.vram_size
        self.server = sv.SynthvidServer(vsp.vram_size, vsp.resolutions, vsp.default)
        self.vram: npt.NDArray[np.uint8] | None = None  # the guest's VRAM, (vram_size,) uint8
        self.vram_gpadl: Gpadl | None = None  # the grant it lies in
        self.frames = 0  # DIRT messages shown
        self.pending: list[Rect] | None = []  # not yet shown; None: the whole screen
        self.dirt_requested = False
        self.size_requests: list[tuple[int, int]] = []  # viewers' sizes, newest last
        self.cursor_shapes = 0
        self.throttled = 0  # drains whose copy waited for min_copy_interval
        # The parent's requests (a viewer's size) come through the Screen's
        # socket pair.
        # Copies are at most `min_copy_interval` apart while the guest
        # streams, unless a viewer waits for newer pixels (Screen.wanted):
        # copies nobody reads only take memory bandwidth and CPU from the
        # guest and the viewer. What a burst leaves pending is copied by a
        # timer of the worker's loop once the interval has passed.
        self.min_copy_interval = vsp.min_copy_interval
        self.last_copy = 0.0
        self.later: Timer | None = None
        self.watching = False
        try:
            context.watch(self.screen.control_fd, self._on_control)
        except UsageError:  # no worker loop (a bare harness): never wait to copy
            pass
        else:
            self.watching = True

    def _vram_ok(self, gpa: int, size: int) -> bool:
        """VRAM must be guest memory the guest granted us through one GPADL."""
        memory = self.context.memory
        if gpa < 0 or gpa + size > memory.size:
            return False
        self.vram_gpadl = self.context.gpadl_covering(gpa, size)
        return self.vram_gpadl is not None

    def on_packet(self, packet: Packet) -> None:
        errors = self.server.errors.total()
        # One copy out of the ring; the server decodes that copy once.
        replies, events = self.server.receive(bytes(packet.payload), vram_ok=self._vram_ok)
        if self.server.errors.total() != errors:
            self.context.protocol_error("synthvid: %s", self.server.last_error)
        for reply in replies:  # an answer: the reserve holds its room
            self.reply(packet.trans_id, reply, type=VM_PKT_DATA_INBAND)
        for event in events:
            if isinstance(event, sv.VramLocation):
                view = self.context.memory.view(event.gpa, self.vram_size)
                self.vram = np.frombuffer(view, np.uint8)
            elif isinstance(event, sv.ModeSet):
                if (self.screen.width, self.screen.height) != (event.width, event.height):
                    self.screen.resize(event.width, event.height)
                self.pending = None
                self._flush()
                if not self.dirt_requested:  # start the guest's dirty-rectangle updates
                    self.dirt_requested = True
                    self.post(self.server.feature_change(dirt=True))  # unsolicited
            elif isinstance(event, sv.Dirty):
                self.frames += 1
                self._dirty(event.rects)
            elif isinstance(event, sv.PointerShape):
                self._pointer_shape(event)

    def _pointer_shape(self, shape: sv.PointerShape) -> None:
        """The guest's pointer (ARGB8888: B, G, R, A bytes) for Cursor clients."""
        pixels = np.frombuffer(shape.argb, np.uint8).reshape(shape.height, shape.width, 4)
        hot_x, hot_y = (
            min(shape.hot_x, max(shape.width - 1, 0)),
            min(shape.hot_y, max(shape.height - 1, 0)),
        )
        self.screen.set_cursor(pixels, hot_x, hot_y)
        self.cursor_shapes += 1

    def _dirty(self, rects: tuple[Rect, ...]) -> None:
        """Collect a drain's dirty rectangles; on_signal copies them once,
        so a burst of updates of one region costs one copy, not one each."""
        if self.pending is None:
            return  # already the whole screen
        self.pending.extend(rects)
        if len(self.pending) > sv.MAX_DIRT_RECTS:
            self.pending = None

    def on_signal(self) -> None:
        """After the worker drained the channel: send what waited for room,
        then show what changed."""
        super().on_signal()
        self._flush()

    def _on_control(self) -> None:
        """The parent's requests, in the worker."""
        for kind, a, b in self.screen.read_control():
            if kind == CONTROL_SIZE:  # a viewer's window: the guest's preferred size
                self.size_requests = [*self.size_requests[-7:], (a, b)]
                change = self.server.prefer(a, b)
                if change is not None and self.dirt_requested:
                    self.post(change)

    def _on_later(self) -> None:
        self.later = None
        self._flush(now=True)

    def _flush(self, now: bool = False) -> None:
        """Show what is pending, unless the last copy was too recent and no
        viewer waits (then the timer `later` shows it)."""
        if self.pending == []:
            return
        clock = time.monotonic()
        wait = self.last_copy + self.min_copy_interval - clock
        if not now and wait > 0 and not self.screen.wanted and self._show_later(wait):
            self.throttled += 1
            return
        if self.later is not None:
            self.later.cancel()
            self.later = None
        self._show(self.pending)
        self.pending = []
        self.last_copy = clock

    def _show_later(self, delay: float) -> bool:
        """Have the worker loop's timer show what is pending; False where
        there is no loop (a bare harness): then it is shown now."""
        if self.later is None:
            try:
                self.later = self.context.call_later(delay, self._on_later)
            except UsageError:
                return False
        return True

    def _show(self, rects: list[Rect] | None) -> None:
        mode = self.server.mode
        if self.vram is None or mode is None:
            return
        if self.vram_gpadl is not None and self.vram_gpadl.gpadl not in self.context.gpadls:
            self.vram = self.vram_gpadl = None  # the guest revoked its grant
            return
        # The protocol checked offset + pitch * height fits the VRAM.
        rows = self.vram[mode.vram_offset : mode.vram_offset + mode.pitch * mode.height]
        pixels = np.lib.stride_tricks.as_strided(
            rows, (mode.height, mode.width, 4), (mode.pitch, 4, 1), writeable=False
        )
        self.screen.update(pixels, rects)

    def close(self) -> None:
        self.vram = self.vram_gpadl = None
        if self.later is not None:
            self.later.cancel()
            self.later = None
        if self.watching:
            self.watching = False
            self.context.unwatch(self.screen.control_fd)
        super().close()


class VideoVsp(Vsp):
    """One synthetic video device of one child, shown on `screen`. The
    guest is offered `resolutions` (by default the standard ones that fit
    its VRAM) and prefers `default` (1024x768 when offered)."""

    def __init__(
        self,
        screen: Screen | None = None,
        *,
        vram_megabytes: int = DEFAULT_VRAM_MB,
        resolutions: Sequence[tuple[int, int]] | None = None,
        default: tuple[int, int] | None = None,
        instance_id: uuid.UUID | None = None,
        max_copies_per_second: float = MAX_COPIES_PER_SECOND,
    ) -> None:
        self.vram_size = vram_megabytes << 20
        self.min_copy_interval = 1.0 / max_copies_per_second
        # Every mode fits the VRAM, so a Screen that holds the VRAM holds every mode.
        self.screen = screen or Screen(
            *DEFAULT_MODE, capacity=max(self.vram_size, DEFAULT_MODE[0] * DEFAULT_MODE[1] * 4)
        )
        if self.screen.capacity < self.vram_size:
            raise UsageError(
                f"a Screen of {self.screen.capacity} bytes cannot show {vram_megabytes} MiB of VRAM"
            )
        if resolutions is None:
            resolutions = [
                (w, h)
                for w, h in sv.STANDARD_RESOLUTIONS
                if w * h * sv.BYTES_PER_PIXEL <= self.vram_size
            ]
        if not resolutions:
            raise UsageError(f"{vram_megabytes} MiB of VRAM fits no standard resolution")
        self.resolutions = tuple(resolutions)
        self.default = default or (DEFAULT_MODE if DEFAULT_MODE in resolutions else resolutions[0])
        sv.SynthvidServer(self.vram_size, self.resolutions, self.default)  # checks them now
        self.instance_id = instance_id or uuid.uuid4()
        self.handler: VideoHandler | None = None  # the open (or last) channel's

    def offers(self) -> list[OfferSpec]:
        return [OfferSpec(guid.SYNTHVID, self.instance_id, mmio_megabytes=self.vram_size >> 20)]

    def open(self, channel: Channel, context: OpenContext) -> VideoHandler:
        self.handler = VideoHandler(channel, context, self)
        return self.handler

    # What the open (or last) channel did, for the console and tests.

    @property
    def frames(self) -> int:
        return 0 if self.handler is None else self.handler.frames

    @property
    def errors(self) -> Counter[str]:
        return Counter() if self.handler is None else self.handler.server.errors

    def stats(self) -> dict[str, Any]:
        handler = self.handler
        server = None if handler is None else handler.server
        mode = None if server is None or server.mode is None else server.mode
        return {
            "frames": self.frames,
            "errors": dict(self.errors),
            "mode": None if mode is None else [mode.width, mode.height, mode.pitch],
            "vram_mapped": self.vram is not None,
            "cursor_shapes": 0 if handler is None else handler.cursor_shapes,
            "throttled": 0 if handler is None else handler.throttled,
            "queued_bytes": 0 if handler is None else handler.channel.reader.bytes_available,
            "size_requests": [] if handler is None else [list(s) for s in handler.size_requests],
        }

    @property
    def vram(self) -> npt.NDArray[np.uint8] | None:
        return None if self.handler is None else self.handler.vram
