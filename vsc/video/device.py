"""The synthetic video device, for child programs: a `Framebuffer` whose
pixels are a numpy view of VRAM in guest memory (granted to the parent
through a GPADL); drawing is writing to the array, and `update(rects)` tells
the parent which rectangles changed."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from vmbus.errors import UsageError
from vmbus.guest import GuestChannel, GuestDevice
from vmbus.memory import PAGE_SIZE
from vmbus.protocols import video as sv

RING_SIZE = 256 * 1024  # what Linux's hyperv_fb asks for
TIMEOUT = 10.0


class Framebuffer:
    """`pixels` is (height, width, 4) uint8 in XRGB8888 little-endian
    (byte 0 blue, 1 green, 2 red): write into it, then `update()`."""

    def __init__(
        self,
        device: GuestDevice,
        width: int = 1024,
        height: int = 768,
        *,
        follow_host: bool = False,
    ) -> None:
        self.device = device
        self.vram_size = device.offer.mmio_megabytes << 20
        if not self.vram_size:
            raise UsageError("the video offer names no VRAM size")
        self.channel: GuestChannel = device.open(RING_SIZE, RING_SIZE)
        # follow_host: take the size the host prefers (a viewer's window)
        # when it says so; `poll` (and `update`) then switch mode, and
        # `mode_changes` counts it for the program to redraw.
        self.client = sv.SynthvidClient(follow_host=follow_host)
        self.mode_changes = 0
        guest = device.guest
        self.pfns = guest.allocator.alloc(self.vram_size // PAGE_SIZE)
        self.gpadl = guest.create_gpadl(device.relid, self.pfns)
        vram_gpa = self.pfns[0] * PAGE_SIZE  # the allocator hands out contiguous runs
        self.vram: npt.NDArray[np.uint8] = np.frombuffer(
            guest.memory.view(vram_gpa, self.vram_size), np.uint8
        )
        # Linux's order: version (and, from WIN10, the resolution list), VRAM, mode.
        self._exchange([self.client.start()], lambda: self.client.negotiated)
        self._exchange([self.client.vram_location(vram_gpa)], lambda: self.client.vram_acked)
        self.pixels = self.vram[:0].reshape(0, 0, 4)
        self.set_mode(width, height)

    def _send(self, payloads: list[bytes]) -> None:
        for payload in payloads:
            self.channel.send(payload, timeout=TIMEOUT)

    def _exchange(
        self, payloads: list[bytes], done: Callable[[], bool], timeout: float = TIMEOUT
    ) -> None:
        """Send, then handle the host's messages until `done()`."""
        self._send(payloads)
        deadline = time.monotonic() + timeout
        while not done():
            packet = self.channel.receive(max(0.0, deadline - time.monotonic()))
            self._send(self.client.receive(packet.payload))

    def poll(self) -> bool:
        """Handle what the host sent (e.g. the FEATURE_CHANGE that starts
        updates); True if the mode changed to the host's size (redraw)."""
        while (packet := self.channel.poll()) is not None:
            self._send(self.client.receive(packet.payload))
        size, self.client.host_size = self.client.host_size, None
        if size is None or size == (self.width, self.height):
            return False
        if size[0] * size[1] * sv.BYTES_PER_PIXEL > self.vram_size:
            return False  # the host offers only what fits; never trust it blindly
        self.set_mode(*size)
        self.mode_changes += 1
        return True

    def set_mode(self, width: int, height: int) -> None:
        """Switch resolution; `pixels` is re-made for it."""
        if width * height * sv.BYTES_PER_PIXEL > self.vram_size:
            raise UsageError(f"{width}x{height} does not fit {self.vram_size} bytes of VRAM")
        self._send([*self.client.hide_pointer(), self.client.situation_update(width, height)])
        self.width, self.height = width, height
        self.pixels = self.vram[: width * height * sv.BYTES_PER_PIXEL].reshape(height, width, 4)

    def update(self, *rects: tuple[int, int, int, int]) -> None:
        """Tell the host these (x1, y1, x2, y2) rectangles changed (all of the
        screen if none are given); batched 64 per message."""
        self.poll()
        rects = rects or ((0, 0, self.width, self.height),)
        for start in range(0, len(rects), sv.MAX_DIRT_RECTS):
            self._send([self.client.dirt(*rects[start : start + sv.MAX_DIRT_RECTS])])

    def wait_ready(self, timeout: float = TIMEOUT) -> None:
        """Wait until the host asked for dirty rectangles (it shows nothing before)."""
        self._exchange([], lambda: self.client.dirt_needed, timeout)

    def close(self) -> None:
        self.pixels = self.vram = None  # type: ignore[assignment]
        guest = self.device.guest
        self.channel.close()
        guest.teardown_gpadl(self.device.relid, self.gpadl)
        guest.allocator.free(self.pfns)
