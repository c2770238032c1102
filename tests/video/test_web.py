"""The browser console: RFB over WebSocket to the same VNC sessions (the
test's client decodes what arrives), noVNC's files over HTTP from where
the system installed them, and the WebSocket refused to other origins."""

from __future__ import annotations

import http.client
import urllib.parse
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from vnc_client import DEFAULT_PF, RAW, TIGHT, Rfb, rgb_values, wait_for

from vsp.video.screen import Screen
from vsp.video.vnc import VncServer

websockets = pytest.importorskip("websockets", reason="the websockets library is not installed")
from websockets.sync.client import connect as ws_connect  # noqa: E402


class WebSocketStream:
    """A WebSocket as the byte stream the test's RFB client reads."""

    def __init__(self, url: str, **kwargs: object) -> None:
        self.connection = ws_connect(url, **kwargs)  # type: ignore[arg-type]
        self.ws = self.connection.__enter__()
        self.pending = b""

    def recv(self, n: int) -> bytes:
        if not self.pending:
            message = self.ws.recv(timeout=5)
            assert isinstance(message, bytes)
            self.pending = message
        chunk, self.pending = self.pending[:n], self.pending[n:]
        return chunk

    def sendall(self, data: bytes) -> None:
        self.ws.send(data)

    def close(self) -> None:
        self.connection.__exit__(None, None, None)


@pytest.fixture
def novnc(tmp_path: Path) -> Path:
    """A stand-in for the system's noVNC (its real files are tested in the browser test)."""
    (tmp_path / "vnc.html").write_text("<html>noVNC</html>")
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "ui.js").write_text("export default 1;")
    return tmp_path


@pytest.fixture
def web(serve: Callable[..., VncServer], novnc: Path) -> VncServer:
    return serve(web_port=0, novnc_dir=novnc)


def ws_url(server: VncServer) -> str:
    assert server.web is not None
    host, port = server.web.address
    return f"ws://{host}:{port}/websockify"


def rfb_over(server: VncServer, **kwargs: object) -> Rfb:
    """The test's RFB client, its socket a WebSocket to the console."""
    client = Rfb.__new__(Rfb)
    stream = WebSocketStream(ws_url(server), **kwargs)
    client.sock = stream  # type: ignore[assignment]
    client.pf = DEFAULT_PF
    client.zlib, client.zrle = zlib.decompressobj(), zlib.decompressobj()
    client.tight = [zlib.decompressobj() for _ in range(4)]
    client.colour_map, client.cursor, client.layouts, client.jpeg_rects = None, None, [], 0
    return client


def test_rfb_over_websocket_decodes_pixel_exact(web: VncServer, screen: Screen) -> None:
    client = rfb_over(web)
    client.handshake()
    client.set_encodings(TIGHT, RAW)
    client.request(False)
    assert [r[4] for r in client.read_update()] == [TIGHT]
    assert (client.fb == rgb_values(screen.frame_copy())).all()
    client.close()


def test_websocket_sessions_need_the_password(serve: Callable[..., VncServer], novnc: Path) -> None:
    server = serve(web_port=0, novnc_dir=novnc, password="s3cret-w")
    client = rfb_over(server)
    client.handshake(password="s3cret-w")
    client.request(False)
    client.read_update()
    assert (client.fb == rgb_values(server.screen.frame_copy())).all()
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(server.url).query)
    assert query["password"] == ["s3cret-w"] and query["resize"] == ["remote"]
    client.close()


def get(server: VncServer, path: str) -> tuple[int, bytes, str]:
    assert server.web is not None
    host, port = server.web.address
    conn = http.client.HTTPConnection(host, port, timeout=5)
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body, response.getheader("Content-Type") or ""


def test_novnc_files_are_served_and_nothing_else(web: VncServer) -> None:
    assert get(web, "/")[:2] == (200, b"<html>noVNC</html>")
    assert get(web, "/app/ui.js") == (200, b"export default 1;", "text/javascript")
    assert get(web, "/../../etc/passwd")[0] == 404
    assert get(web, "/%2e%2e/%2e%2e/etc/passwd")[0] == 404
    assert get(web, "/missing.js")[0] == 404
    assert web.url.startswith(f"http://127.0.0.1:{web.web.address[1]}/vnc.html?")  # type: ignore[union-attr]


def test_without_novnc_the_page_says_what_to_install(
    serve: Callable[..., VncServer], tmp_path: Path
) -> None:
    server = serve(web_port=0, novnc_dir=tmp_path / "none")
    assert server.web is not None
    server.web.novnc_dir = None
    status, body, _ = get(server, "/")
    assert status == 404 and b"novnc" in body


def test_a_page_of_another_origin_may_not_open_the_websocket(web: VncServer) -> None:
    with pytest.raises(websockets.exceptions.InvalidStatus):
        WebSocketStream(ws_url(web), origin="http://evil.example")
    assert web.client_count == 0


def test_same_origin_websocket_is_accepted(web: VncServer) -> None:
    assert web.web is not None
    host, port = web.web.address
    stream = WebSocketStream(ws_url(web), origin=f"http://{host}:{port}")
    assert stream.recv(12) == b"RFB 003.008\n"
    stream.close()


def test_a_dropped_browser_frees_its_session(web: VncServer) -> None:
    stream = WebSocketStream(ws_url(web))
    assert stream.recv(12) == b"RFB 003.008\n"
    wait_for(lambda: web.client_count == 1)
    stream.close()
    wait_for(lambda: web.client_count == 0)


def test_a_web_port_in_use_fails_the_start_whole(
    serve: Callable[..., VncServer], screen: Screen, novnc: Path
) -> None:
    taken = serve(web_port=0, novnc_dir=novnc)
    assert taken.web is not None
    server = VncServer(screen, port=0, web_port=taken.web.address[1], authenticate=False)
    with pytest.raises(OSError):
        server.start()
    assert not server._running and server.client_count == 0  # nothing left serving
