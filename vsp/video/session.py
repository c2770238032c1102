"""One VNC client's session state, and the FramebufferUpdates it is sent.

`Session` holds what `vsp.video.vnc.VncServer` keeps per connection: the
handshake state, input and output queues, the `Encoder` (pixel format,
encodings, zlib streams, reused buffers), the client's framebuffer size,
its dirty rectangles and pending requests. `Session.update(screen)` builds
and queues the next update when one is asked for and the last one has gone:
pseudo-rectangles first (the answer to a SetDesktopSize, a new desktop size,
a new pointer shape), then the rectangles in the client's encoding. Raw is
encoded straight from the Screen's shared frame; the others from the
encoder's own copy (their zlib streams cannot be re-run if the writer
changed the frame meanwhile). Touched only by the server's thread.
"""

from __future__ import annotations

import collections
import contextlib
import os
import socket
import struct
import time
from typing import Any

import numpy as np

from vsp.video import rfb
from vsp.video.encodings import (
    ENC_EXTENDED_DESKTOP_SIZE,
    MIN_SCROLL_ROWS,
    Encoder,
    find_scroll,
    row_hashes,
)
from vsp.video.screen import (
    MAX_DIMENSION,
    Capture,
    Cursor,
    Rect,
    Screen,
    bounding_box,
    clip,
    covers,
    intersect,
    subtract,
)
from vsp.video.shared import SEQLOCK_PATIENCE

__all__ = [
    "MAX_DIRTY_RECTS",
    "MAX_QUEUED_MESSAGES",
    "REASON_CLIENT",
    "REASON_SERVER",
    "STATUS_INVALID",
    "STATUS_OK",
    "STATUS_PROHIBITED",
    "Drop",
    "Session",
]

MAX_DIRTY_RECTS = 32  # more are merged into their bounding box
# Output: one update at most (the next is encoded once it is sent) and this many
# messages behind it (replies to input, each at most 1.5 KiB).
MAX_QUEUED_MESSAGES = 64
# ExtendedDesktopSize: reasons and statuses (rfbproto).
REASON_SERVER, REASON_CLIENT = 0, 1
STATUS_OK, STATUS_PROHIBITED, STATUS_INVALID = 0, 1, 3
_RECT_HEADER = struct.Struct(">HHHHi")
IN_PLACE_ORDER = (0, 1, 2, 3)  # a client of the frame's own format: Raw is the frame's bytes
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16  # buffers per sendmsg


class Drop(Exception):
    """The client broke the protocol: log and disconnect it."""


class Session:
    """One connection's protocol state; touched only by the server thread."""

    def __init__(self, sock: socket.socket, source: str, generation: int) -> None:
        self.sock = sock
        self.source = source  # the peer's address, for the login backoff
        self.inbuf = bytearray()
        self.out: collections.deque[memoryview] = collections.deque()
        self.state = "version"
        self.minor = 8
        self.challenge = b""
        self.discard = 0  # ClientCutText bytes still to skip
        self.closing = False  # drop once the output is sent
        self.accepted = self.since = time.monotonic()  # since: the last send progress
        self.active = self.accepted  # the last message from the client
        self.generation = generation
        self.encoder = Encoder()  # format, encodings, zlib streams, reused buffers
        self.width = self.height = 0  # the client's framebuffer: ServerInit's, or DesktopSize's
        self.cursor_serial = 0  # the pointer shape the client has
        self.layout_told = False  # ExtendedDesktopSize: the client knows the layout
        self.size_reply: int | None = None  # status owed for its SetDesktopSize
        self.dirty: list[Rect] = []
        self.want_full: Rect | None = None  # union of pending non-incremental requests
        self.want_incr: Rect | None = None
        self.in_place = True  # Raw straight from the shared frame when the format allows
        self.busy_since: float | None = None  # when an update first waited for the writer

    @property
    def admitted(self) -> bool:
        """Past security: counts against the client limit."""
        return self.state in ("init", "normal")

    def send(self, data: bytes | memoryview) -> None:
        # Updates are queued only onto an empty queue: the rest is small replies.
        if len(self.out) >= MAX_QUEUED_MESSAGES:
            raise Drop("not reading its replies")
        if not self.out:
            self.since = time.monotonic()
        self.out.append(memoryview(data))

    def add_dirty(self, rect: Rect) -> None:
        if any(covers(d, rect) for d in self.dirty):
            return  # already covered
        self.dirty = [d for d in self.dirty if subtract(d, rect)] + [rect]
        if len(self.dirty) > MAX_DIRTY_RECTS:
            self.dirty = [bounding_box(self.dirty)]

    def desktop_size_status(self, width: int, height: int, screens: int, *, allowed: bool) -> int:
        """SetDesktopSize: the status this client's next update answers with."""
        if not self.encoder.extended_desktop_size:
            raise Drop("SetDesktopSize without ExtendedDesktopSize")
        if not allowed:
            self.size_reply = STATUS_PROHIBITED
        elif screens < 1 or not (1 <= width <= MAX_DIMENSION and 1 <= height <= MAX_DIMENSION):
            self.size_reply = STATUS_INVALID
        else:
            self.size_reply = STATUS_OK
        return self.size_reply

    def update(self, screen: Screen) -> bool:
        """Queue an update if one is asked for, there is something to send
        and the last one has gone; True if one was queued."""
        if self.state != "normal" or self.out or self.closing:
            return False
        if self.want_full is None and self.want_incr is None:
            return False
        enc = self.encoder
        gen, w, h = screen.geometry()
        # One word tells whether the shape changed; the shape is read only then.
        changed = enc.cursor and screen.cursor_serial() != self.cursor_serial
        cursor = screen.cursor() if changed else None
        new_cursor = cursor is not None and cursor.serial != self.cursor_serial
        rects = [self.want_full] if self.want_full else []
        if self.want_incr is not None:
            rects += [r for d in self.dirty if (r := intersect(d, self.want_incr))]
        rects = [c for r in rects if (c := clip(r, w, h)) is not None]
        layout = enc.extended_desktop_size and not self.layout_told
        owed = self.size_reply is not None
        idle = not rects and gen == self.generation and self.want_full is None
        if idle and not (new_cursor or layout or owed):
            screen.want_update()  # the guest's next change is copied at once
            return False  # an incremental request waits for a change
        if self._writer_busy(screen):
            return False  # its copy ends with a doorbell: the update follows then
        # The next change is copied (into another of the Screen's frames)
        # while this one is read and sent.
        screen.want_update()
        if enc.encoding == rfb.ENC_RAW and enc.order == IN_PLACE_ORDER and self.in_place:
            self._update_in_place(screen, rects, cursor if new_cursor else None, owed, layout)
            return True
        direct = enc.encoding == rfb.ENC_RAW  # stateless: encoded from the shared frame
        raw_count = [0]
        if direct:
            cap = screen.capture(rects, self.generation, encode=lambda c: self._raw(c, raw_count))
        else:
            scroll = self._scroll_candidates(rects, gen)
            cap = screen.capture(rects, self.generation, into=enc.scratch)
            if cap.frame is not enc.scratch:  # a new size: a new copy, unknown to the client
                enc.synced = False
            if cap.frame is not None:
                enc.scratch = cap.frame
        resized, announce = self._account(cap)
        count = self._pseudo(owed, announce or layout, cursor if new_cursor else None)
        if not direct and not resized and scroll:
            cap, moved = self._scrolled(cap, scroll)
            count += moved
        count += raw_count[0] if direct else self._rects(cap, self.width, self.height)
        if not direct and (0, 0, cap.width, cap.height) in cap.rects:
            enc.synced = (cap.width, cap.height) == (self.width, self.height)
        enc.out.array[:4] = np.frombuffer(struct.pack(">BxH", 0, min(count, 0xFFFF)), np.uint8)
        self.send(enc.out.view())
        if direct:
            self.send(enc.work.view())  # the rectangles, behind the header
        return True

    def _writer_busy(self, screen: Screen) -> bool:
        """The writer is mid-copy: rather than spin for it (taking the CPU
        it needs), wait for its doorbell, for at most SEQLOCK_PATIENCE."""
        if not screen.writing():
            self.busy_since = None
            return False
        now = time.monotonic()
        if self.busy_since is None:
            self.busy_since = now
        if now - self.busy_since < SEQLOCK_PATIENCE:
            return True
        self.busy_since = None  # a writer stuck mid-change: capture gives a torn read
        return False

    def _account(self, cap: Capture) -> tuple[bool, bool]:
        """The client's state once `cap` is sent: (resized, announced)."""
        enc = self.encoder
        resized = cap.generation != self.generation
        self.generation = cap.generation
        announce = resized and (enc.desktop_size or enc.extended_desktop_size)
        if announce:
            self.width, self.height = cap.width, cap.height
        if resized:
            self.dirty = []
        else:
            for sent in cap.rects:
                self.dirty = [p for d in self.dirty for p in subtract(d, sent)]
            if len(self.dirty) > MAX_DIRTY_RECTS:
                self.dirty = [bounding_box(self.dirty)]
        self.want_full = self.want_incr = None
        return resized, announce

    def _pseudo(self, owed: bool, layout: bool, cursor: Cursor | None) -> int:
        """The update's header (counted later) and pseudo-rectangles into
        `out`: the answer to a SetDesktopSize, the layout, the pointer shape."""
        enc = self.encoder
        out = enc.out
        out.reset()
        out.reserve(4)  # the header, once the rectangles are counted
        count = 0
        if owed:  # the answer to its SetDesktopSize, with the size it has now
            assert self.size_reply is not None
            self._layout(REASON_CLIENT, self.size_reply)
            self.size_reply, self.layout_told, count = None, True, count + 1
        if layout:  # first, so the client resizes before drawing
            if enc.extended_desktop_size:
                self._layout(REASON_SERVER, STATUS_OK)
                self.layout_told = True
            else:
                out.write(_RECT_HEADER.pack(0, 0, self.width, self.height, rfb.ENC_DESKTOP_SIZE))
            count += 1
        if cursor is not None:
            enc.cursor_rect(cursor.hot_x, cursor.hot_y, cursor.pixels)
            self.cursor_serial = cursor.serial
            count += 1
        return count

    def _update_in_place(
        self, screen: Screen, rects: list[Rect], cursor: Cursor | None, owed: bool, layout: bool
    ) -> None:
        """Raw in the frame's own format: the rows go to the socket straight
        from the shared frame (its unused byte is already 0xFF), what the
        socket does not take at once is copied behind, all while the read
        holds the writer off. A writer that changed the frame anyway (one
        that cannot defer) leaves the rectangles dirty: sent again next."""

        def send(cap: Capture) -> None:
            _, announce = self._account(cap)
            count = self._pseudo(owed, announce or layout, cursor)
            buffers: list[Any] = [None]  # the header and pseudo-rectangles, once counted
            for rect, pix in zip(cap.rects, cap.pixels, strict=True):
                fits = clip(rect, self.width, self.height)  # what fits the client's framebuffer
                if fits is None:
                    continue
                x1, y1, x2, y2 = fits
                pix = pix[y1 - rect[1] : y2 - rect[1], x1 - rect[0] : x2 - rect[0]]
                buffers.append(_RECT_HEADER.pack(x1, y1, x2 - x1, y2 - y1, rfb.ENC_RAW))
                if pix.flags.c_contiguous:  # whole rows of the frame: one run
                    buffers.append(pix.reshape(-1))
                else:
                    buffers.extend(pix.reshape(pix.shape[0], -1))
                count += 1
            out = self.encoder.out
            out.array[:4] = np.frombuffer(struct.pack(">BxH", 0, min(count, 0xFFFF)), np.uint8)
            buffers[0] = out.view()
            self._send_now(buffers)

        cap = screen.capture(rects, self.generation, encode=send, retry=False)
        if not cap.consistent:
            for rect in cap.rects:
                self.add_dirty(rect)

    def _send_now(self, buffers: list[Any]) -> None:
        """Send `buffers` (the queue is empty); the rest, copied, is queued."""
        views = [memoryview(b).cast("B") for b in buffers]
        done = 0
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while done < len(views):
                batch = views[done : done + IOV_MAX]
                sent = self.sock.sendmsg(batch)
                self.since = time.monotonic()
                while done < len(views) and sent >= len(views[done]):
                    sent -= len(views[done])
                    done += 1
                if sent:  # the socket's buffer is full
                    views[done] = views[done][sent:]
                    break
        if done < len(views):
            work = self.encoder.work
            work.reset()
            for view in views[done:]:
                work.write(view)
            self.send(work.view())

    def _scroll_candidates(self, rects: list[Rect], generation: int) -> dict[Rect, Any]:
        """Row hashes of what the client has under the big rectangles about
        to be sent, for CopyRect (taken before the capture overwrites them)."""
        enc = self.encoder
        if not (enc.copyrect and enc.synced) or generation != self.generation:
            return {}
        found: dict[Rect, Any] = {}
        for rect in rects[:4]:
            x1, y1, x2, y2 = rect
            inside = x2 <= min(self.width, enc.scratch.shape[1]) and y2 <= min(
                self.height, enc.scratch.shape[0]
            )
            if inside and y2 - y1 >= MIN_SCROLL_ROWS and x2 - x1 >= 64:
                found[rect] = row_hashes(enc.scratch[y1:y2, x1:x2])
        return found

    def _scrolled(self, cap: Capture, scroll: dict[Rect, Any]) -> tuple[Capture, int]:
        """One CopyRect for the longest band that moved inside a rectangle;
        the capture then holds the rest of that rectangle, above and below."""
        best: tuple[Rect, tuple[int, int, int]] | None = None
        for rect, pix in zip(cap.rects, cap.pixels, strict=True):
            band = find_scroll(scroll[rect], row_hashes(pix)) if rect in scroll else None
            if band is not None and (best is None or band[1] - band[0] > best[1][1] - best[1][0]):
                best = (rect, band)
        if best is None:
            return cap, 0
        (x1, y1, x2, y2), (a, b, dy) = best
        self.encoder.copy_rect(x1, y1 + a, x2 - x1, b - a, x1, y1 + a + dy)
        rects, pixels = [], []
        for rect, pix in zip(cap.rects, cap.pixels, strict=True):
            if rect != best[0]:
                rects.append(rect)
                pixels.append(pix)
                continue
            for top, bottom in ((0, a), (b, y2 - y1)):  # what did not move
                if top < bottom:
                    rects.append((x1, y1 + top, x2, y1 + bottom))
                    pixels.append(pix[top:bottom])
        return Capture(cap.generation, cap.width, cap.height, rects, pixels, cap.frame), 1

    def _raw(self, cap: Capture, count: list[int]) -> None:
        """Raw rectangles into the encoder's `work` buffer straight from the
        shared frame (called again from the start if the frame changed)."""
        enc = self.encoder
        width, height = self.width, self.height
        if cap.generation != self.generation and (enc.desktop_size or enc.extended_desktop_size):
            width, height = cap.width, cap.height  # announced in this update
        out, enc.out = enc.out, enc.work
        try:
            enc.work.reset()
            count[0] = self._rects(cap, width, height)
        finally:
            enc.out = out

    def _rects(self, cap: Capture, width: int, height: int) -> int:
        count = 0
        for rect, pix in zip(cap.rects, cap.pixels, strict=True):
            # Only what fits the client's framebuffer: one that missed a
            # resize (no DesktopSize) keeps its own size.
            fits = clip(rect, width, height)
            if fits is None:
                continue
            x1, y1, x2, y2 = fits
            pix = pix[y1 - rect[1] : y2 - rect[1], x1 - rect[0] : x2 - rect[0]]
            count += self.encoder.rect(x1, y1, pix)
        return count

    def _layout(self, reason: int, status: int) -> None:
        """An ExtendedDesktopSize rectangle: one screen, the client's framebuffer."""
        w, h = self.width, self.height
        self.encoder.out.write(
            _RECT_HEADER.pack(reason, status, w, h, ENC_EXTENDED_DESKTOP_SIZE)
            + struct.pack(">B3xIHHHHI", 1, 0, 0, 0, w, h, 0)
        )
