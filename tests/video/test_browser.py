"""The console in a real browser: headless Chromium runs the system's noVNC
against the VNC server's WebSocket; the child (served by its worker process)
follows the browser's size, what Chromium shows is what the child drew, and
a click and a typed key arrive in the child."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vmbus import guid
from vmbus.guest import Guest, GuestDevice
from vmbus.partition import Host, wait_until
from vsc.input import Keyboard, Mouse
from vsc.video import Framebuffer
from vsp.input import KeyboardVsp, MouseVsp
from vsp.video import VideoVsp
from vsp.video.screen import Screen
from vsp.video.vnc import VncServer

pytest.importorskip("websockets", reason="the websockets library is not installed")
from websockets.sync.client import connect as ws_connect  # noqa: E402

from vsp.video.web import find_novnc  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)"
    ),
    pytest.mark.skipif(
        find_novnc() is None, reason="noVNC is not installed (apt-get install novnc)"
    ),
]
WINDOW = (800, 600)  # the browser's; the child starts at 640x480 and follows it


def picture(width: int, height: int) -> np.ndarray:
    """Four coloured quadrants and a grey ramp: easy to recognise through JPEG."""
    frame = np.zeros((height, width, 4), np.uint8)
    frame[: height // 2, : width // 2, 2] = 220  # red
    frame[: height // 2, width // 2 :, 1] = 200  # green
    frame[height // 2 :, : width // 2, 0] = 230  # blue
    frame[height // 2 :, width // 2 :, :3] = 250  # white
    ramp = (np.arange(width) * 255 // max(1, width - 1)).astype(np.uint8)
    frame[height // 2 - 20 : height // 2 + 20, :, :3] = ramp[None, :, None]
    return frame


def browser_child(guest: Guest, workdir: str) -> None:
    """Child: draw, follow the host's size, report the size and the input."""
    out = Path(workdir)
    devices: dict[object, GuestDevice] = {}
    for class_id in (guid.SYNTHVID, guid.KEYBOARD, guid.MOUSE):
        guest.register(class_id, lambda d, c=class_id: devices.setdefault(c, d))
    fb = Framebuffer(devices[guid.SYNTHVID], 640, 480, follow_host=True)
    keyboard, mouse = Keyboard(devices[guid.KEYBOARD]), Mouse(devices[guid.MOUSE])
    fb.wait_ready()
    keys: list[list[Any]] = []
    clicks: list[list[int]] = []

    def draw() -> None:
        fb.pixels[:] = picture(fb.width, fb.height)
        fb.update()
        (out / "size.json").write_text(json.dumps([fb.width, fb.height]))

    draw()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out / "done").exists():
        if fb.poll():
            draw()
        changed = False
        while (key := keyboard.poll()) is not None:
            keys.append([key.scan_code, key.pressed])
            changed = True
        while (move := mouse.poll()) is not None:
            if move.buttons or clicks:
                clicks.append([move.x, move.y, move.buttons])
                changed = True
        if changed:
            (out / "input.json").write_text(json.dumps({"keys": keys, "clicks": clicks}))
        time.sleep(0.005)  # a child's idle loop, not a test's synchronisation


class DevTools:
    """Just enough of the Chrome DevTools protocol: commands, in order."""

    def __init__(self, url: str) -> None:
        self.connection = ws_connect(url, max_size=64 << 20)
        self.ws = self.connection.__enter__()
        self.ids = count(1)

    def __call__(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self.ids)
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=30))
            if message.get("id") == ident:
                assert "error" not in message, message
                return dict(message.get("result", {}))

    def evaluate(self, expression: str) -> Any:
        return self("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get(
            "value"
        )

    def close(self) -> None:
        self.connection.__exit__(None, None, None)


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[DevTools]:
    assert CHROMIUM is not None
    process = subprocess.Popen(
        [
            CHROMIUM,
            "--headless=new",
            "--no-sandbox",  # we are root
            "--disable-gpu",
            "--no-first-run",
            "--remote-debugging-port=0",
            f"--user-data-dir={tmp_path / 'chromium'}",
            f"--window-size={WINDOW[0]},{WINDOW[1]}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        port = None
        for line in process.stderr:
            if m := re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line):
                port = int(m[1])
                break
        assert port is not None, "Chromium did not start its DevTools endpoint"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            pages = [t for t in json.load(r) if t["type"] == "page"]
        tools = DevTools(pages[0]["webSocketDebuggerUrl"])
        yield tools
        tools.close()
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def screenshot(tools: DevTools) -> np.ndarray:
    from PIL import Image

    data = base64.b64decode(tools("Page.captureScreenshot", format="png")["data"])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_novnc_in_chromium_shows_the_child_and_types_into_it(
    tmp_path: Path, chromium: DevTools
) -> None:
    screen = Screen(640, 480)
    keyboard, mouse, video = KeyboardVsp(), MouseVsp(), VideoVsp(screen)
    server = VncServer(
        screen,
        port=0,
        web_port=0,
        on_key=keyboard.key,
        on_pointer=lambda x, y, b: mouse.pointer(x, y, b, screen.width, screen.height),
    )
    work = tmp_path / "child"
    work.mkdir()
    with server, Host() as host:
        host.start(browser_child, devices=[video, keyboard, mouse], args=(str(work),))
        assert wait_until(lambda: (work / "size.json").exists(), 30)
        chromium("Page.enable")
        chromium("Page.navigate", url=server.url)

        # noVNC asks for the browser's size; the child follows and redraws.
        def followed() -> bool:
            size = json.loads((work / "size.json").read_text() or "[0, 0]")
            return size != [640, 480] and screen.geometry()[1:] == tuple(size)

        assert wait_until(followed, 30), (screen.geometry(), (work / "size.json").read_text())
        width, height = json.loads((work / "size.json").read_text())
        container = chromium.evaluate(
            "[document.getElementById('noVNC_container').clientWidth,"
            " document.getElementById('noVNC_container').clientHeight]"
        )
        assert [width, height] == container  # the browser's size, as noVNC asked

        rect_js = (
            "JSON.stringify(document.querySelector('#noVNC_container canvas')"
            "?.getBoundingClientRect())"
        )
        expected = picture(width, height)[..., 2::-1].astype(np.int16)

        def shown() -> bool:
            box = chromium.evaluate(rect_js)
            if not box:
                return False
            r = json.loads(box)
            x, y = round(r["x"]), round(r["y"])
            if (round(r["width"]), round(r["height"])) != (width, height):
                return False
            shot = screenshot(chromium)[y : y + height, x : x + width].astype(np.int16)
            if shot.shape != expected.shape:
                return False
            # Tight JPEG at noVNC's default quality: close, not exact. The
            # control bar's handle may cover a strip at the left edge.
            return float(np.abs(shot[:, 40:] - expected[:, 40:]).mean()) < 6

        assert wait_until(shown, 30), "Chromium never showed what the child drew"

        # A click in the canvas (which also focuses noVNC), then a typed key.
        box = json.loads(chromium.evaluate(rect_js))
        cx, cy = 300, 200
        for kind, buttons in (("mousePressed", 1), ("mouseReleased", 0)):
            chromium(
                "Input.dispatchMouseEvent",
                type=kind,
                x=box["x"] + cx,
                y=box["y"] + cy,
                button="left",
                buttons=buttons,
                clickCount=1,
            )
        for kind in ("keyDown", "keyUp"):
            chromium(
                "Input.dispatchKeyEvent",
                type=kind,
                key="a",
                code="KeyA",
                text="a" if kind == "keyDown" else "",
                windowsVirtualKeyCode=65,
                nativeVirtualKeyCode=65,
            )

        def typed() -> dict[str, Any] | None:
            if not (work / "input.json").exists():
                return None
            got = json.loads((work / "input.json").read_text() or "{}")
            return (
                got if len(got.get("keys", [])) >= 2 and len(got.get("clicks", [])) >= 2 else None
            )

        assert wait_until(lambda: typed() is not None, 30), (work / "input.json").exists()
        got = typed()
        assert got is not None
        assert got["keys"][:2] == [[0x1E, True], [0x1E, False]]  # 'a' make, break
        x, y = cx * 32767 // (width - 1), cy * 32767 // (height - 1)
        assert got["clicks"][0] == [x, y, 1] and got["clicks"][1][2] == 0
        (work / "done").write_text("1")
