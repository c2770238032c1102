"""A VNC (RFB 3.8, also 3.3 and 3.7) server for a `vsp.video.screen.Screen`.

``VncServer(screen, host="127.0.0.1", port=5900, password=None, on_key=None,
on_pointer=None, name="vmbus", *, authenticate=True, max_clients=16,
idle_timeout=600, ...)``; ``start()`` binds (port 0: any free port,
see ``address``) and serves from one background thread; ``stop()`` ends it.
``on_key(keysym, down)`` and ``on_pointer(x, y, buttons)`` are called from that
thread; pointer positions are clamped to the screen.

Security: VNC Authentication (2) (DES of a random challenge; like every VNC
server only the first 8 bytes of the password count). With no password given
the server makes one for the run (``password``, for the caller to show);
``authenticate=False`` serves security None (1) instead, for trusted setups
only: any local process could then watch the guest and type into it. After a
failed login a source (IP address) waits a growing, bounded delay
(`vsp.video.access.LoginBackoff`) before its next login is checked.

Encodings (`vsp.video.encodings`, per-client state in `vsp.video.session`):
Tight (7; JPEG when the client names a quality level), ZRLE (16), Hextile (5),
Zlib (6), Raw; the client's first announced one wins. Pseudo-encodings:
DesktopSize, ExtendedDesktopSize (a client's SetDesktopSize becomes
``screen.request_size``, the guest's preferred size; ``resize=False`` refuses
it), Cursor (the guest's pointer shape), JPEG quality and compression levels.
Pixel formats: any true-colour 8/16/32 bpp format; a colour-mapped 8 bpp
format gets a BGR233 colour map. The unused bits of 32 bpp pixels are sent
set: clients that read them as alpha (noVNC) show an opaque screen.
``web_port``: also RFB over WebSocket, and noVNC's files (`vsp.video.web`);
``url`` is the one address to open in a browser.

Updates follow the Screen's dirty rectangles: each client accumulates them and
gets the part inside its request on its next FramebufferUpdateRequest; a
non-incremental request gets the requested region in full. Robustness: one
thread multiplexes all clients with non-blocking sockets; a client that sends
garbage, stalls its reads, idles in the handshake or sends nothing for
``idle_timeout`` seconds is dropped alone. Bounds per client: MAX_INPUT_BYTES
of unparsed input, MAX_DIRTY_RECTS dirty rectangles, at most one update queued
(the next is encoded only once the last one has been sent) plus
MAX_QUEUED_MESSAGES small replies, and SEND_STALL_TIMEOUT seconds without send
progress. At most ``max_clients`` (MAX_CLIENTS) clients past security; one
more is refused with an RFB failure reason. Connections still in the handshake
do not count against it; at most MAX_PENDING of them at once.

A client that does not announce DesktopSize keeps the framebuffer size it was
told at ServerInit: after a mode change it gets only what fits in it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from vmbus.errors import UsageError
from vsp.video import rfb, tight
from vsp.video.access import LoginBackoff, generate_password
from vsp.video.handshake import Handshake
from vsp.video.screen import (
    Rect,
    Screen,
    bounding_box,
)
from vsp.video.session import (
    MAX_DIRTY_RECTS,
    MAX_QUEUED_MESSAGES,
    STATUS_OK,
    Drop,
    Session,
)

if TYPE_CHECKING:
    from vsp.video.web import WebConsole

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "IDLE_TIMEOUT",
    "MAX_CLIENTS",
    "MAX_DIRTY_RECTS",
    "MAX_INPUT_BYTES",
    "MAX_PENDING",
    "MAX_QUEUED_MESSAGES",
    "SEND_STALL_TIMEOUT",
    "VncServer",
]

log = logging.getLogger(__name__)

MAX_CLIENTS = 16  # past security; the default of max_clients
MAX_PENDING = 16  # connections still in the handshake
# Above the largest legal client message: SetEncodings with 65535 entries (256 KiB).
MAX_INPUT_BYTES = 512 * 1024
HANDSHAKE_TIMEOUT = 10.0  # seconds from accept to ServerInit
IDLE_TIMEOUT = 600.0  # seconds a client may send nothing (a viewer asks for updates)
SEND_STALL_TIMEOUT = 10.0  # seconds a queued update may make no progress

_SERVER_VERSION = b"RFB 003.008\n"
_U32 = struct.Struct(">I")
_SET_DESKTOP_SIZE = 251


class VncServer(Handshake):
    """Serves `screen` to VNC clients from one background thread."""

    def __init__(
        self,
        screen: Screen,
        host: str = "127.0.0.1",
        port: int = 5900,
        password: str | None = None,
        on_key: Callable[[int, bool], None] | None = None,
        on_pointer: Callable[[int, int, int], None] | None = None,
        name: str = "vmbus",
        *,
        authenticate: bool = True,
        max_clients: int = MAX_CLIENTS,
        idle_timeout: float = IDLE_TIMEOUT,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        send_stall_timeout: float = SEND_STALL_TIMEOUT,
        backoff: LoginBackoff | None = None,
        resize: bool = True,
        web_port: int | None = None,
        novnc_dir: Path | None = None,
    ) -> None:
        if not authenticate and password is not None:
            raise UsageError("a password with authenticate=False")
        if max_clients < 1:
            raise UsageError(f"max_clients {max_clients}: at least 1")
        self.screen = screen
        self.host, self.port = host, port
        # VNC authentication unless the caller chose None; a password of its own if none given.
        self.password: str | None = (password or generate_password()) if authenticate else None
        self.max_clients = max_clients
        self.idle_timeout = idle_timeout
        self.backoff = backoff or LoginBackoff()
        self.on_key, self.on_pointer = on_key, on_pointer
        self.name = name.encode()
        self.handshake_timeout = handshake_timeout
        self.send_stall_timeout = send_stall_timeout
        self.resize = resize  # viewers' SetDesktopSize become size requests to the guest
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._running = False
        self._clients: dict[socket.socket, Session] = {}
        self._damage: collections.deque[list[Rect]] = collections.deque()
        self._adopted: collections.deque[tuple[socket.socket, str]] = collections.deque()
        self._doorbell: int | None = None
        self._seen = (0, 0, 0)
        self.hooked = True  # False: the server ignores the Screen's damage (benchmarks)
        self.web: WebConsole | None = None
        if web_port is not None:  # the websockets library only when asked for
            from vsp.video.web import WebConsole

            self.web = WebConsole(self, host, web_port, novnc_dir)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_pending = False
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._pool: ThreadPoolExecutor | None = None  # encoders' helpers (Tight's bands)

    @property
    def address(self) -> tuple[str, int]:
        if self._listener is None:
            raise RuntimeError("the server is not started")
        host, port = self._listener.getsockname()[:2]
        return host, port

    @property
    def client_count(self) -> int:
        """Connections, in the handshake or past it."""
        return len(self._clients)

    @property
    def admitted_count(self) -> int:
        """Clients past security: what `max_clients` bounds."""
        return sum(client.admitted for client in self._clients.values())

    def start(self) -> None:
        if self._listener is not None:
            raise RuntimeError("already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._listener = socket.create_server((self.host, self.port), family=family, backlog=8)
        self._listener.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        # The damage: read from the Screen's ring when its doorbell rings (one
        # thread hand-over less), or from a listener if another server has it.
        self._doorbell = self.screen.claim_doorbell()
        if self._doorbell is not None:
            self._seen = self.screen.damage_cursor()
            self._selector.register(self._doorbell, selectors.EVENT_READ, "doorbell")
        else:
            self.screen.add_listener(self._on_damage)
        self._running = True
        if tight.PARALLEL > 1:
            self._pool = ThreadPoolExecutor(tight.PARALLEL - 1, thread_name_prefix="vnc-encode")
        self._thread = threading.Thread(target=self._run, name="vnc-server", daemon=True)
        self._thread.start()
        if self.web is not None:
            try:
                self.web.start()
            except BaseException:  # e.g. web_port in use: not half started
                self.web, web = None, self.web
                self.stop()
                self.web = web
                raise

    @property
    def url(self) -> str:
        """The browser console's one URL (noVNC; with `web_port` only)."""
        if self.web is None:
            raise UsageError("no browser console: VncServer(..., web_port=...) makes one")
        return self.web.url

    def stop(self) -> None:
        if not self._running:
            return
        if self.web is not None:
            self.web.stop()
        self._running = False
        if self._doorbell is not None:
            self.screen.release_doorbell()
        else:
            self.screen.remove_listener(self._on_damage)
        self._wake()
        if self._thread is not None:
            self._thread.join()
        for client in list(self._clients.values()):
            self._drop(client)
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        while self._adopted:
            self._adopted.popleft()[0].close()
        assert self._listener is not None
        self._selector.close()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> VncServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wake(self) -> None:
        # Full: a wake-up is pending anyway; closed: stopping.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"!")

    def _doorbell_rang(self) -> None:
        assert self._doorbell is not None
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._doorbell)
        # Not waiting out a copy in progress: it rings again when done.
        rects, self._seen = self.screen.damage_since(self._seen, wait=False)
        if rects is not None and self._clients and self.hooked:
            self._damage.append(rects)

    def _on_damage(self, rects: list[Rect]) -> None:
        # The Screen's (the VSP's) thread: hand over, never block. With no
        # client there is nothing to do (a new client gets a full frame), and
        # one wake-up is enough until the server loop has caught up.
        if not self._clients or not self.hooked:
            return
        self._damage.append(rects)
        if not self._wake_pending:
            self._wake_pending = True
            self._wake()

    def _run(self) -> None:
        while self._running:
            try:
                self._step()
            except Exception:  # keep serving: per-client faults are handled in _guard
                log.exception("vnc: server loop failed")
                time.sleep(0.1)

    def _step(self) -> None:
        for key, events in self._selector.select(timeout=0.25):
            if key.fileobj is self._listener:
                self._accept()
            elif key.data == "doorbell":
                self._doorbell_rang()
            elif key.fileobj is self._wake_r:
                self._wake_pending = False  # before draining: later damage wakes us again
                with contextlib.suppress(BlockingIOError):
                    self._wake_r.recv(4096)
            elif key.data.sock in self._clients:
                self._serve(key.data, events)
        while self._adopted:
            self._admit(*self._adopted.popleft())
        while self._damage:
            rects = self._damage.popleft()
            for client in self._clients.values():
                if client.state == "normal":
                    for rect in rects:
                        client.add_dirty(rect)
        now = time.monotonic()
        for client in list(self._clients.values()):
            if client.state != "normal" and now - client.accepted > self.handshake_timeout:
                self._drop(client, "handshake timeout")
            elif client.state == "normal" and now - client.active > self.idle_timeout:
                self._drop(client, f"idle for {self.idle_timeout:g} s")
            elif client.out and now - client.since > self.send_stall_timeout:
                self._drop(client, "not reading its updates")
            else:
                self._guard(client, self._update)

    def adopt(self, sock: socket.socket, source: str) -> None:
        """Serve `sock` (connected, e.g. a WebSocket session's socket pair)
        as a client from `source` (an address, for the login backoff); from
        any thread."""
        if not self._running:
            raise RuntimeError("the server is not started")
        self._adopted.append((sock, source))
        self._wake()

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            sock, address = self._listener.accept()
        except OSError:
            return
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._admit(sock, str(address[0]))

    def _admit(self, sock: socket.socket, source: str) -> None:
        if len(self._clients) - self.admitted_count >= MAX_PENDING:
            log.info("vnc: refusing %s: %d connections in the handshake", source, MAX_PENDING)
            sock.close()
            return
        sock.setblocking(False)
        client = Session(sock, source, self.screen.geometry()[0])
        client.encoder.pool = self._pool
        self._clients[sock] = client
        self._selector.register(sock, selectors.EVENT_READ, client)
        client.send(_SERVER_VERSION)
        self._guard(client, self._flush)

    def _drop(self, client: Session, reason: str = "") -> None:
        if reason:
            log.info("vnc: dropping client: %s", reason)
        if self._clients.pop(client.sock, None) is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(client.sock)
        client.sock.close()

    def _guard(self, client: Session, step: Callable[[Session], None]) -> None:
        if client.sock not in self._clients:
            return
        try:
            step(client)
        except Drop as e:
            self._drop(client, str(e))
        except OSError as e:
            self._drop(client, f"socket error: {e}")
        except Exception:  # a bug one client triggers must not stop the others
            log.exception("vnc: client failed")
            self._drop(client)

    def _serve(self, client: Session, events: int) -> None:
        if events & selectors.EVENT_WRITE:
            self._guard(client, self._flush)
        if events & selectors.EVENT_READ:
            self._guard(client, self._receive)

    def _receive(self, client: Session) -> None:
        try:
            data = client.sock.recv(65536)
        except BlockingIOError:
            return
        if not data:
            raise Drop("disconnected")
        if client.closing:
            return
        client.active = time.monotonic()
        client.inbuf += data
        buf, off = memoryview(bytes(client.inbuf)), 0
        while off < len(buf) and not client.closing:
            if client.discard:  # ClientCutText: skipped as it streams in, never buffered
                skip = min(client.discard, len(buf) - off)
                client.discard -= skip
                off += skip
                continue
            used = self._parse(client, buf[off:])
            if used == 0:
                break
            off += used
        client.inbuf = bytearray(buf[off:])
        if len(client.inbuf) > MAX_INPUT_BYTES:
            raise Drop("input buffer overflow")
        self._flush(client)

    def _flush(self, client: Session) -> None:
        while client.out:
            chunk = client.out[0]
            try:
                sent = client.sock.send(chunk)
            except BlockingIOError:
                break
            client.since = time.monotonic()
            if sent == len(chunk):
                client.out.popleft()
            else:
                client.out[0] = chunk[sent:]
        if not client.out and client.closing:
            raise Drop("")
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.out else 0)
        self._selector.modify(client.sock, events, client)

    def _parse(self, client: Session, buf: memoryview) -> int:
        """Handles one message at the head of `buf`; returns its length, 0 if incomplete."""
        used = self._handshake(client, buf)
        return self._message(client, buf) if used is None else used

    def _message(self, client: Session, buf: memoryview) -> int:
        kind = buf[0]
        need = {0: 20, 2: 4, 3: 10, 4: 8, 5: 6, 6: 8, _SET_DESKTOP_SIZE: 8}.get(kind)
        if need is None:
            raise Drop(f"unknown message type {kind}")
        if kind == 2 and len(buf) >= 4:
            need += 4 * int.from_bytes(buf[2:4], "big")
        if kind == _SET_DESKTOP_SIZE and len(buf) >= 8:
            need += 16 * buf[6]
        if len(buf) < need:
            return 0
        if kind == 0:
            fmt = rfb.PixelFormat.unpack(bytes(buf[4:20]))
            if not fmt.valid():
                raise Drop(f"unsupported pixel format {fmt}")
            if not fmt.true_colour:
                client.send(rfb.colour_map())
                fmt = rfb.BGR233
            client.encoder.set_format(fmt)
        elif kind == 2:
            client.encoder.set_encodings(struct.unpack(f">{(need - 4) // 4}i", buf[4:need]))
        elif kind == _SET_DESKTOP_SIZE:
            self._set_desktop_size(client, *struct.unpack(">xxHHBx", buf[:8]))
        elif kind == 3:
            incremental, x, y, w, h = struct.unpack(">xBHHHH", buf[:10])
            rect = (x, y, x + w, y + h)
            if incremental:
                client.want_incr = rect
            else:
                old = client.want_full
                client.want_full = bounding_box([old, rect]) if old else rect
        elif kind == 4:
            down, keysym = struct.unpack(">x?2xI", buf[:8])
            self._callback(self.on_key, keysym, down)
        elif kind == 5:
            buttons, x, y = struct.unpack(">xBHH", buf[:6])
            _, w, h = self.screen.geometry()
            self._callback(self.on_pointer, min(x, w - 1), min(y, h - 1), buttons)
        else:  # ClientCutText: ignored
            client.discard = _U32.unpack(buf[4:8])[0]
        return need

    @staticmethod
    def _callback(fn: Callable[..., None] | None, *args: object) -> None:
        if fn is not None:
            try:
                fn(*args)
            except Exception:
                log.exception("vnc: input callback failed")

    def _set_desktop_size(self, client: Session, width: int, height: int, screens: int) -> None:
        """SetDesktopSize: a size request to the guest (the answer is this
        client's next update; the new mode follows when the guest takes it)."""
        status = client.desktop_size_status(width, height, screens, allowed=self.resize)
        if status == STATUS_OK:
            self.screen.request_size(width, height)

    def _update(self, client: Session) -> None:
        """Send an update if one is asked for and the previous one has been sent."""
        if client.update(self.screen):
            self._flush(client)
