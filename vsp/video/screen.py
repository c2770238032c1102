"""The parent's console for the synthetic video device: the `Screen` it draws on.

The video VSP owns one `Screen` per device and feeds it; the console backends
read it. Nothing here knows the VMBus.

Interface:

- ``Screen(width, height)``: the current frame, a numpy uint8 array of shape
  (height, width, 4) in the guest's framebuffer format, XRGB8888 little-endian
  (byte 0 blue, 1 green, 2 red, 3 unused: the Screen keeps it 0xFF, what VNC
  clients that read it as alpha want, so Raw in the frame's own format is
  the frame's bytes as they are). New and resized frames are black.
- ``Screen.resize(width, height)``: a mode change. Listeners are told the whole
  new frame is dirty; VNC clients get a DesktopSize update if they support it,
  otherwise what of the new frame fits the framebuffer they have.
- ``Screen.update(pixels, rects=None)``: ``pixels`` is the guest's VRAM as a
  (h, w, 4) uint8 view (strided views, e.g. a pitch wider than the mode, are
  fine); ``rects`` are the dirty rectangles ``(x1, y1, x2, y2)``, ends
  exclusive, ``None`` for all of it. The Screen *copies* those regions into its
  own frame under its lock (the unused byte set), so a guest rewriting VRAM
  meanwhile cannot tear a frame being encoded, then notifies its listeners.
  Rectangles are clipped; a flood of them is merged into their bounding box.
- ``Screen.snapshot_png(path_or_file)``: the frame as an 8-bit RGB PNG.
- ``Screen.add_listener(fn)`` / ``remove_listener(fn)``: ``fn(rects)`` is called
  (outside the lock, from the updating thread) after each change.
- ``Screen.capture(rects, generation, into=None, encode=None)``: consistent
  copies of regions, or views for `encode`; a stale generation: the frame.

Across processes: the frame lives in a memfd (`vsp.video.shared`). A Screen
pickled with `vmbus.handoff` (a `VideoVsp` handed to its VM's worker process)
arrives as the *writer's* copy: it draws into the same memory and rings an
eventfd; the parent's Screen keeps its API (listeners are then called from a
thread of the Screen's, which reads the dirty rectangles out of the shared
header), validates all it reads, and sends the worker requests
(``request_size``) through a socket pair whose worker end the VSP watches
(``control_fd``, ``read_control``). The memory holds three frames: the
writer fills one that is neither the newest nor the one being read, so a
read and the next copy run side by side (`vsp.video.shared`).
``Screen.set_cursor`` / ``cursor()`` carry the guest's
pointer shape the same way. One consumer may instead read the damage itself
(``claim_doorbell``: an eventfd the writer rings; ``damage_since``), which
the VNC server does, saving a thread hand-over per change; a viewer waiting
for newer pixels says so (``want_update``, read by the writer as ``wanted``)
so the VSP copies at its next chance rather than at its own pace.

Backends: `vsp.video.vnc.VncServer` (RFB, noVNC over WebSocket), `vsp.video.png`.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import struct
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from vmbus.handoff import SharedFd
from vsp.video.frames import (
    OPAQUE,
    Capture,
    Cursor,
    Frame,
    Rect,
    bounding_box,
    clip,
    copy_opaque,
    covers,
    intersect,
    subtract,
)
from vsp.video.png import write_png
from vsp.video.shared import (
    CURSOR_MAX,
    FRAMES,
    MAX_DIMENSION,
    SharedFrame,
    check_size,
    close_all,
    read_records,
)

__all__ = [
    "CONTROL_SIZE",
    "MAX_DIMENSION",
    "MAX_UPDATE_RECTS",
    "Capture",
    "Cursor",
    "Rect",
    "Screen",
    "bounding_box",
    "clip",
    "covers",
    "intersect",
    "subtract",
]

Listener = Callable[[list[Rect]], None]

# More rectangles in one update are merged: no unbounded per-rectangle work.
MAX_UPDATE_RECTS = 64
# Parent -> worker requests, one SOCK_SEQPACKET record each: kind, a, b (u32).
CONTROL_SIZE = 2  # a viewer asks for a width x height (a) x (b) screen
_CONTROL = struct.Struct("<III")
_TORN_RETRIES = 3  # copies retried while the writer keeps changing the frame


class Screen:
    """The frame a console shows; thread-safe (the VSP writes, backends read),
    and shared with the worker's copy of it once pickled."""

    def __init__(self, width: int, height: int, *, capacity: int | None = None) -> None:
        capacity = capacity or MAX_DIMENSION * MAX_DIMENSION * 4  # sparse until drawn on
        check_size(width, height, capacity)
        self._shm = SharedFrame.create(capacity)
        self._events = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._doorbell = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        parent, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent.setblocking(False)
        worker.setblocking(False)
        self._control, self._control_worker = parent, worker
        self._init_common(remote=False)
        self._shm.set_mode(0, width, height)
        self._shm.frames[0][: width * height * 4].view(np.uint32)[:] = OPAQUE  # black
        self._mode = (0, width, height)

    def _init_common(self, *, remote: bool) -> None:
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []
        self._remote = remote  # the worker's copy: wakes the parent instead of calling listeners
        self._exported = False  # the parent's, once pickled: a watcher calls the listeners
        self._watcher: threading.Thread | None = None
        self._stop_watch: socket.socket | None = None
        self._seen = (0, 0, 0)  # (generation, serial, cursor serial) the watcher passed on
        # The writer's: per frame, what changed since it was last filled
        # (None: all of it), copied from the newest frame when it is filled next.
        self._front = self._shm.front
        self._stale: list[list[Rect] | None] = [
            [] if k == self._front else None for k in range(FRAMES)
        ]
        self._doorbell_claimed = False
        self.torn = 0  # captures that gave up waiting for a consistent frame
        self.dropped_controls = 0
        fds = [self._shm.fd, self._events, self._doorbell]
        sockets = {self._control, self._control_worker}  # one socket in a worker's copy
        self._finalizer = weakref.finalize(self, close_all, fds, tuple(sockets))

    # Pickling: the worker's copy maps the same memfd (vmbus.handoff).

    def __getstate__(self) -> dict[str, Any]:
        if self._remote:
            raise TypeError("a worker's copy of a Screen is not handed on")
        with self._lock:
            self._exported = True
            self._seen = self._seen_now()
        self._update_watcher()
        return {
            "capacity": self._shm.capacity,
            "memfd": SharedFd(self._shm.fd),
            "events": SharedFd(self._events),
            "doorbell": SharedFd(self._doorbell),
            "control": SharedFd(self._control_worker.fileno()),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        memfd, events = state["memfd"].take(), state["events"].take()
        self._doorbell = state["doorbell"].take()
        control = state["control"].take()
        self._control = self._control_worker = socket.socket(fileno=control)
        self._events = events
        try:
            self._shm = SharedFrame(memfd, int(state["capacity"]), create=False)
        except BaseException:
            close_all([memfd, events, self._doorbell])
            self._control.close()
            raise
        self._init_common(remote=True)
        generation, width, height, _ = self._shm.read_mode()
        self._mode = (generation, width, height)

    def close(self) -> None:
        """Release the memfd, the eventfd and the sockets (also done when collected)."""
        with self._lock:
            self._listeners.clear()
        self._update_watcher()
        self._finalizer()

    # The mode, as the writer set it (validated when read from shared memory).

    @property
    def capacity(self) -> int:
        return self._shm.capacity

    @property
    def width(self) -> int:
        return self.geometry()[1]

    @property
    def height(self) -> int:
        return self.geometry()[2]

    def geometry(self) -> tuple[int, int, int]:
        """(generation, width, height), read together (validated; without
        waiting for a writer's frame copy, which leaves them alone)."""
        if not self._remote and not self._exported:
            return self._mode
        generation, width, height, _ = self._shm.read_mode(wait=False)
        return generation, width, height

    def add_listener(self, fn: Listener) -> None:
        with self._lock:
            self._listeners.append(fn)
        self._update_watcher()

    def remove_listener(self, fn: Listener) -> None:
        with self._lock:
            if fn in self._listeners:
                self._listeners.remove(fn)
        self._update_watcher()

    def _notify(self, rects: list[Rect]) -> None:
        if self._shm.doorbell:  # a consumer reads the ring itself, woken directly
            with contextlib.suppress(BlockingIOError):
                os.eventfd_write(self._doorbell, 1)
        if self._remote:  # the parent's watcher reads the rectangles from the header
            with contextlib.suppress(BlockingIOError):
                os.eventfd_write(self._events, 1)
            return
        with self._lock:
            listeners = list(self._listeners)
        for fn in listeners:
            fn(rects)

    # The writer: the VSP (in the worker, or in-process).

    def resize(self, width: int, height: int) -> None:
        """A mode change: a new black frame of the new size."""
        check_size(width, height, self._shm.capacity)
        with self._lock:
            shm = self._shm
            generation = self._mode[0] + 1
            target = self._free_frame()
            shm.begin_fill(target)
            shm.frames[target][: width * height * 4].view(np.uint32)[:] = OPAQUE  # black
            shm.end_fill(target)
            self._stale = [None] * FRAMES  # the others hold the old mode
            self._publish(target, [(0, 0, width, height)], (generation, width, height))
        self._notify([(0, 0, width, height)])

    def update(self, pixels: npt.NDArray[np.uint8], rects: Iterable[Rect] | None = None) -> None:
        """Copy the dirty `rects` of `pixels` (the VRAM view) into a frame
        nobody reads, brought up to date from the newest one, which it then
        becomes."""
        if pixels.ndim != 3 or pixels.shape[2] != 4 or pixels.dtype != np.uint8:
            raise ValueError(f"pixels must be (h, w, 4) uint8, not {pixels.shape} {pixels.dtype}")
        with self._lock:
            _, fw, fh = mode = self._mode
            w, h = min(fw, pixels.shape[1]), min(fh, pixels.shape[0])
            wanted = [(0, 0, w, h)] if rects is None else list(rects)
            dirty = [c for r in wanted if (c := clip(r, w, h)) is not None]
            if not dirty:
                return
            if len(dirty) > 1:  # a drain's DIRTs often repeat one rect, or the screen
                dirty = [(0, 0, w, h)] if (0, 0, w, h) in dirty else list(dict.fromkeys(dirty))
            if len(dirty) > MAX_UPDATE_RECTS:
                dirty = [bounding_box(dirty)]
            shm = self._shm
            target = self._free_frame()
            frame, newest = shm.frame(target, fw, fh), shm.frame(self._front, fw, fh)
            stale = self._stale[target]
            shm.begin_fill(target)
            for x1, y1, x2, y2 in [(0, 0, fw, fh)] if stale is None else stale:
                if not any(covers(d, (x1, y1, x2, y2)) for d in dirty):
                    np.copyto(frame[y1:y2, x1:x2], newest[y1:y2, x1:x2])
            for x1, y1, x2, y2 in dirty:
                copy_opaque(frame[y1:y2, x1:x2], pixels[y1:y2, x1:x2])
            shm.end_fill(target)
            self._publish(target, dirty, mode)
            shm.want(False)
        self._notify(dirty)

    def _free_frame(self) -> int:
        """A frame that is neither the newest nor the one the parent reads."""
        busy = {self._front, self._shm.pinned}
        return next(k for k in range(FRAMES) if k not in busy)

    def _publish(self, target: int, dirty: list[Rect], mode: tuple[int, int, int]) -> None:
        """Frame `target` (filled) is the newest, `dirty` what changed."""
        shm = self._shm
        shm.begin_write()
        shm.set_mode(*mode)
        shm.publish(dirty)
        shm.set_front(target)
        shm.end_write()
        self._mode, self._front = mode, target
        self._stale[target] = []
        for k, stale in enumerate(self._stale):
            if k != target and stale is not None:
                stale += dirty
                if len(stale) > MAX_UPDATE_RECTS:
                    self._stale[k] = [bounding_box(stale)]

    @property
    def wanted(self) -> bool:
        """A viewer waits for newer pixels (the writer should not wait to copy)."""
        return self._shm.wanted

    def want_update(self) -> None:
        """The reader's side: a viewer waits for newer pixels than it has."""
        self._shm.want(True)

    def set_cursor(self, pixels: npt.NDArray[np.uint8], hot_x: int, hot_y: int) -> None:
        """The guest's pointer shape, BGRA (h, w, 4), at most CURSOR_MAX square."""
        h, w = pixels.shape[:2]
        if not (w <= CURSOR_MAX and h <= CURSOR_MAX and 0 <= hot_x < max(w, 1)) or not (
            0 <= hot_y < max(h, 1)
        ):
            raise ValueError(f"cursor {w}x{h} with hot spot {hot_x},{hot_y}")
        with self._lock:
            shm = self._shm
            shm.begin_write()
            shm.cursor(w, h)[:] = pixels
            shm.set_cursor(w, h, hot_x, hot_y)
            shm.end_write()
        self._notify([])

    @property
    def control_fd(self) -> int:
        """The worker's end of the request socket: the VSP watches it."""
        return self._control_worker.fileno()

    def read_control(self) -> list[tuple[int, int, int]]:
        """The requests waiting on `control_fd` (kind, a, b); malformed ones dropped."""
        records, dropped = read_records(self._control_worker, _CONTROL.size)
        self.dropped_controls += dropped
        return [_CONTROL.unpack(record) for record in records]

    # The reader: the parent (console, snapshots).

    def request_size(self, width: int, height: int) -> None:
        """Ask the guest for a width x height screen (a viewer's size)."""
        self._send_control(CONTROL_SIZE, width, height)

    def _send_control(self, kind: int, a: int = 0, b: int = 0) -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # full: one is pending anyway
            self._control.send(_CONTROL.pack(kind, a, b))

    def capture(
        self,
        rects: Sequence[Rect],
        generation: int,
        into: Frame | None = None,
        encode: Callable[[Capture], None] | None = None,
        *,
        retry: bool = True,
    ) -> Capture:
        """Copies of `rects` (clipped); the whole frame if `generation` is stale.
        `into` (an (h, w, 4) array an encoder keeps): the rects are copied into
        it at their places (a new array if the size changed). `encode`: no
        copy; it is called with views of the newest frame while the writer
        keeps off it, again from the start if the writer changed it anyway
        (one that ignores the pin), or once without `retry` (it sent the
        views on), the Capture's `consistent` then saying whether the frame
        held still."""
        with self._lock:
            shm = self._shm
            for attempt in range(_TORN_RETRIES + 1):
                try:
                    if self._remote or self._exported:
                        index, gen, w, h, consistent = shm.pin_front()
                    else:  # the writer is this object, kept out by the lock
                        (gen, w, h), index, consistent = self._mode, self._front, True
                    before = shm.frame_seq(index)
                    wanted = [(0, 0, w, h)] if generation != gen else rects
                    kept = [c for r in wanted if (c := clip(r, w, h)) is not None]
                    frame = shm.frame(index, w, h)
                    if encode is not None:
                        views = [frame[y1:y2, x1:x2] for x1, y1, x2, y2 in kept]
                        encode(Capture(gen, w, h, kept, views))
                        pixels = []
                    elif into is None:
                        pixels = [frame[y1:y2, x1:x2].copy() for x1, y1, x2, y2 in kept]
                    else:
                        if into.shape != (h, w, 4):
                            into = np.empty((h, w, 4), np.uint8)
                        pixels = []
                        for x1, y1, x2, y2 in kept:
                            np.copyto(into[y1:y2, x1:x2], frame[y1:y2, x1:x2])
                            pixels.append(into[y1:y2, x1:x2])
                    still = not before & 1 and shm.frame_seq(index) == before
                finally:  # an encoder that raised must not leave the frame pinned
                    shm.pin(None)
                if consistent and still:
                    break
                if not consistent or attempt == _TORN_RETRIES or not retry:  # stuck, never still
                    self.torn += 1
                    break
            return Capture(gen, w, h, kept, pixels, into, consistent and still)

    def writing(self) -> bool:
        """The writer is mid-change (a reader would wait for it)."""
        return bool(self._shm.seq() & 1)

    def cursor_serial(self) -> int:
        """How many pointer shapes the guest has set (a cheap check before `cursor`)."""
        return self._shm.cursor_serial

    def cursor(self) -> Cursor:
        """The pointer shape (0x0 until the guest sets one)."""
        with self._lock:
            shm = self._shm
            for _ in range(_TORN_RETRIES + 1):
                seq = shm.stable_seq()
                state = shm.read_header()
                w, h, hot_x, hot_y = state.cursor
                pixels = shm.cursor(w, h).copy()
                if seq is None or shm.seq() == seq:
                    break
            return Cursor(state.cursor_serial, hot_x, hot_y, pixels)

    def frame_copy(self) -> Frame:
        return self.capture([], -1).pixels[0]

    def snapshot_png(self, target: str | os.PathLike[str] | BinaryIO) -> None:
        """Write the frame to `target` (a path or a binary file) as an RGB PNG."""
        write_png(target, self.frame_copy()[:, :, 2::-1])  # BGRX -> RGB

    # The parent's watcher: once the Screen is handed to a worker, a thread
    # (only while there are listeners) turns the worker's wake-ups into calls.

    def _seen_now(self) -> tuple[int, int, int]:
        state = self._shm.read_header()
        return state.generation, state.serial, state.cursor_serial

    def _update_watcher(self) -> None:
        with self._lock:
            want = self._exported and bool(self._listeners)
            running = self._watcher
            if want and running is None:
                stop_r, stop_w = socket.socketpair()
                self._stop_watch = stop_w
                thread = threading.Thread(
                    target=self._watch, args=(stop_r,), name="screen-watcher", daemon=True
                )
                self._watcher = thread
                thread.start()
                return
            if want or running is None:
                return
            self._watcher = None
            stop, self._stop_watch = self._stop_watch, None
        assert stop is not None
        stop.close()  # the watcher sees EOF
        if running is not threading.current_thread():
            running.join()

    def _watch(self, stop: socket.socket) -> None:
        with selectors.DefaultSelector() as selector, stop:
            selector.register(self._events, selectors.EVENT_READ)
            selector.register(stop, selectors.EVENT_READ)
            while True:
                ready = [key.fd for key, _ in selector.select()]
                if stop.fileno() in ready:
                    return
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._events)
                rects = self._new_damage()
                if rects is not None:
                    with self._lock:
                        listeners = list(self._listeners)
                    for fn in listeners:
                        fn(rects)

    def _new_damage(self) -> list[Rect] | None:
        rects, self._seen = self.damage_since(self._seen)
        return rects

    def damage_cursor(self) -> tuple[int, int, int]:
        """Where the damage is now, for `damage_since`."""
        return self._seen_now()

    def damage_since(
        self, seen: tuple[int, int, int], wait: bool = True
    ) -> tuple[list[Rect] | None, tuple[int, int, int]]:
        """What changed since `seen` (a `damage_cursor`): the ring's new rects,
        or the whole frame after a mode change or a gap; [] for a new pointer
        shape alone; None for nothing (or, without `wait`, while the writer is
        mid-change: its doorbell rings when done). And the new cursor."""
        if not wait and self.writing():
            return None, seen
        generation, serial, cursor = seen
        gen, w, h, now, cursor_now, rects, consistent = self._shm.read_damage(serial)
        seen = (gen, now, cursor_now)
        if gen != generation or not consistent or rects is None:
            return [(0, 0, w, h)], seen
        if rects:
            return rects, seen
        return ([] if cursor_now != cursor else None), seen

    def claim_doorbell(self) -> int | None:
        """For one consumer that reads the damage itself (`damage_since`):
        an eventfd the writer rings after each change, which saves the
        listeners' thread a hand-over. None if another consumer has it."""
        with self._lock:
            if self._doorbell_claimed:
                return None
            self._doorbell_claimed = True
            self._shm.set_doorbell(True)
            return self._doorbell

    def release_doorbell(self) -> None:
        with self._lock:
            self._doorbell_claimed = False
            self._shm.set_doorbell(False)
