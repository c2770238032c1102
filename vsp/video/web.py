"""The browser console: RFB over WebSocket, and noVNC's own files over HTTP.

``WebConsole(vnc, host, port, novnc_dir=None)`` listens on one port (the
`websockets` library, threaded): a WebSocket connection on any path is a
VNC client of `vnc` (the bytes of each binary message go to the RFB
session, the session's bytes come back as binary messages; noVNC treats
the socket as a byte stream); any other GET is a file of the noVNC client
installed on the system (Debian's ``novnc`` package, /usr/share/novnc), so a
browser opening ``url`` gets noVNC, which connects back to the same port.
noVNC's code is served from where the system installed it, never copied
into this project.

Each WebSocket session is an ordinary client of the VNC server, adopted
through a socket pair (`VncServer.adopt`): the same security (VNC
authentication), limits, backoff per source address and encodings. A
page from another origin may not open the WebSocket (its Origin must name
the host it connects to): a browser would otherwise let any web site talk
to a console on localhost.
"""

from __future__ import annotations

import contextlib
import logging
import mimetypes
import socket
import threading
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.sync.server import Server, ServerConnection, serve
from websockets.typing import Subprotocol

if TYPE_CHECKING:
    from vsp.video.vnc import VncServer

__all__ = ["NOVNC_DIRS", "WebConsole", "find_novnc"]

log = logging.getLogger(__name__)

NOVNC_DIRS = ("/usr/share/novnc",)  # where Debian's novnc package puts the client
MAX_MESSAGE = 1 << 20  # from the browser: input events, a few bytes each
PUMP_CHUNK = 1 << 20


def find_novnc() -> Path | None:
    """The noVNC client installed on this system, if any."""
    for candidate in NOVNC_DIRS:
        if (Path(candidate) / "vnc.html").is_file():
            return Path(candidate)
    return None


class WebConsole:
    """Serves `vnc` to browsers on `port` (0: any free port)."""

    def __init__(
        self, vnc: VncServer, host: str = "127.0.0.1", port: int = 0, novnc_dir: Path | None = None
    ) -> None:
        self.vnc = vnc
        self.host, self.port = host, port
        self.novnc_dir = novnc_dir if novnc_dir is not None else find_novnc()
        self._server: Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("the web console is not started")
        host, port = self._server.socket.getsockname()[:2]
        return host, port

    @property
    def url(self) -> str:
        """The one URL to open: noVNC, connecting at once, following the
        browser's size, with the session's password when there is one."""
        host, port = self.address
        query = {"autoconnect": "true", "resize": "remote", "path": "websockify"}
        if self.vnc.password is not None:
            query["password"] = self.vnc.password
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return f"http://{netloc}/vnc.html?{urllib.parse.urlencode(query)}"

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("already started")
        self._server = serve(
            self._session,
            self.host,
            self.port,
            process_request=self._http,
            select_subprotocol=_binary,
            compression=None,  # pixels are compressed already, or meant to be fast
            max_size=MAX_MESSAGE,
            ping_interval=None,  # the RFB session has its own idle timeout
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="vnc-web", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None

    # HTTP: the noVNC files; the WebSocket handshake only from our own pages.

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        origin = request.headers.get("Origin")
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        if upgrade:
            if origin is not None and urllib.parse.urlsplit(origin).netloc != request.headers.get(
                "Host"
            ):
                return _response(403, "Forbidden", b"cross-origin WebSocket refused\n")
            return None
        return self._file(request.path)

    def _file(self, target: str) -> Response:
        if self.novnc_dir is None:
            return _response(404, "Not Found", b"noVNC is not installed (apt-get install novnc)\n")
        path = urllib.parse.unquote(urllib.parse.urlsplit(target).path)
        if path in ("", "/"):
            path = "/vnc.html"
        root = self.novnc_dir.resolve()
        file = (root / path.lstrip("/")).resolve()
        if not file.is_relative_to(root) or not file.is_file():
            return _response(404, "Not Found", b"not found\n")
        kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        if file.suffix == ".js":
            kind = "text/javascript"  # modules need it
        return _response(200, "OK", file.read_bytes(), kind)

    # WebSocket: one RFB session, through a socket pair the VNC server adopts.

    def _session(self, connection: ServerConnection) -> None:
        ours, theirs = socket.socketpair()
        address = connection.remote_address
        source = str(address[0]) if address else "websocket"
        try:
            self.vnc.adopt(theirs, source)
        except Exception:
            ours.close()
            theirs.close()
            raise
        pump = threading.Thread(
            target=_to_browser, args=(ours, connection), name="vnc-web-pump", daemon=True
        )
        pump.start()
        try:
            for message in connection:
                if isinstance(message, str):
                    break  # RFB is binary
                ours.sendall(message)
        except (ConnectionClosed, OSError):
            pass
        finally:
            with contextlib.suppress(OSError):
                ours.shutdown(socket.SHUT_RDWR)
            pump.join()
            ours.close()


def _binary(connection: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    """noVNC may offer "binary" (older versions insist on it); none is fine too."""
    return Subprotocol("binary") if "binary" in offered else None


def _to_browser(ours: socket.socket, connection: ServerConnection) -> None:
    """The RFB session's bytes to the browser, as they come."""
    try:
        while data := ours.recv(PUMP_CHUNK):
            connection.send(data)
    except (ConnectionClosed, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            connection.close()


def _response(status: int, reason: str, body: bytes, kind: str = "text/plain") -> Response:
    headers = Headers()
    headers["Content-Type"] = kind
    headers["Content-Length"] = str(len(body))
    headers["Cache-Control"] = "no-store"
    headers["X-Content-Type-Options"] = "nosniff"
    return Response(status, reason, headers, body)
