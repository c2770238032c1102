"""The synthetic video VSP: the guest's framebuffer lives in its own memory
(VRAM it grants through a GPADL); mode changes and dirty rectangles arrive
over the channel, and the VSP copies the dirty regions into a `Screen`,
which the PNG snapshot and the VNC server show."""

from __future__ import annotations

import uuid

import numpy as np

from vmbus import guid
from vmbus._ringpacket import Packet
from vmbus.channel import Channel
from vmbus.device import OpenContext, Vsp
from vmbus.host import OfferSpec
from vmbus.protocols import video as sv
from vsp.video.screen import Screen

DEFAULT_VRAM_MB = 8  # what Hyper-V offers a WIN8+ guest


class VideoVsp(Vsp):
    """One synthetic video device of one child, shown on `screen`."""

    reserve = 0  # interim: moves to the ChannelHandler contract

    def __init__(
        self,
        screen: Screen | None = None,
        *,
        vram_megabytes: int = DEFAULT_VRAM_MB,
        instance_id: uuid.UUID | None = None,
    ) -> None:
        self.screen = screen or Screen(1024, 768)
        self.vram_size = vram_megabytes << 20
        self.instance_id = instance_id or uuid.uuid4()
        self.server = sv.SynthvidServer(self.vram_size)
        self.channel: Channel | None = None
        self.context: OpenContext | None = None
        self.vram: np.ndarray | None = None  # the guest's VRAM, (vram_size,) uint8 view
        self.frames = 0  # DIRT messages shown
        self.pending: list[tuple[int, int, int, int]] | None = []  # None: the whole screen
        self.dirt_requested = False

    def offers(self) -> list[OfferSpec]:
        return [OfferSpec(guid.SYNTHVID, self.instance_id, mmio_megabytes=self.vram_size >> 20)]

    def open(self, channel: Channel, context: OpenContext) -> VideoVsp:  # type: ignore[override]  # interim
        self.channel, self.context = channel, context
        self.server = sv.SynthvidServer(self.vram_size)
        self.vram, self.dirt_requested = None, False
        return self

    def vram_ok(self, gpa: int, size: int) -> bool:
        """VRAM must be guest memory the guest granted us through a GPADL."""
        assert self.context is not None
        memory = self.context.memory
        if gpa < 0 or gpa + size > memory.size:
            return False
        first, last = gpa // 4096, (gpa + size - 1) // 4096
        return any(set(range(first, last + 1)) <= set(g.pfns) for g in self.context.gpadls.values())

    def on_packet(self, packet: Packet) -> None:
        assert self.channel is not None and self.context is not None
        replies, events = self.server.receive(packet.payload, vram_ok=self.vram_ok)
        for reply in replies:
            self.channel.send(reply, timeout=0)
        for event in events:
            if isinstance(event, sv.VramLocation):
                view = self.context.memory.view(event.gpa, self.vram_size)
                self.vram = np.frombuffer(view, np.uint8)
            elif isinstance(event, sv.ModeSet):
                self.screen.resize(event.width, event.height)
                self._show(None)
                if not self.dirt_requested:  # start the guest's dirty-rectangle updates
                    self.dirt_requested = True
                    self.channel.send(self.server.feature_change(dirt=True), timeout=0)
            elif isinstance(event, sv.Dirty):
                self.frames += 1
                self._dirty(event.rects)

    def _dirty(self, rects: tuple[tuple[int, int, int, int], ...]) -> None:
        """Collect a drain's dirty rectangles; on_signal copies them once,
        so a burst of updates of one region costs one copy, not one each."""
        if self.pending is None:
            return  # already the whole screen
        self.pending.extend(rects)
        if len(self.pending) > sv.MAX_DIRT_RECTS:
            self.pending = None

    def on_signal(self) -> None:
        """After the worker drained the channel: show what changed."""
        if self.pending != []:
            self._show(self.pending)
            self.pending = []

    def _show(self, rects: list[tuple[int, int, int, int]] | None) -> None:
        mode = self.server.mode
        if self.vram is None or mode is None:
            return
        # The protocol checked offset + pitch * height fits the VRAM.
        rows = self.vram[mode.vram_offset : mode.vram_offset + mode.pitch * mode.height]
        pixels = np.lib.stride_tricks.as_strided(
            rows, (mode.height, mode.width, 4), (mode.pitch, 4, 1), writeable=False
        )
        self.screen.update(pixels, rects)

    def close(self) -> None:
        self.vram = None
        self.channel = self.context = None
