"""Input and video end to end: a child draws into its Framebuffer and reads
its Keyboard and Mouse; a real VNC client (vncdotool's `vncdo`, a separate
process) watches the screen and types into it through the parent's console."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vmbus import guid
from vmbus.guest import Guest, GuestDevice
from vmbus.memory import PAGE_SIZE
from vmbus.partition import Host, wait_until
from vsc.input import Keyboard, Mouse
from vsc.video import Framebuffer
from vsp.input import KeyboardVsp, MouseVsp
from vsp.video import VideoVsp
from vsp.video.screen import Screen
from vsp.video.vnc import VncServer

VNCDO = Path(sys.executable).parent / "vncdo"
WIDTH, HEIGHT = 320, 240


def pattern(width: int, height: int, seed: int) -> np.ndarray:
    """A frame no two pixels of which are alike: XRGB, byte 0 blue."""
    y, x = np.mgrid[0:height, 0:width]
    frame = np.zeros((height, width, 4), np.uint8)
    frame[..., 0] = (x * 7 + seed) % 256
    frame[..., 1] = (y * 5 + seed) % 256
    frame[..., 2] = (x + y + seed * 3) % 256
    return frame


def bound(guest: Guest) -> dict[object, GuestDevice]:
    devices: dict[object, GuestDevice] = {}
    for class_id in (guid.SYNTHVID, guid.KEYBOARD, guid.MOUSE):
        guest.register(class_id, lambda d, c=class_id: devices.setdefault(c, d))
    return devices


def desktop_child(guest: Guest, workdir: str) -> None:
    """Child: draw, report, take input, change mode, draw again."""
    out = Path(workdir)
    devices = bound(guest)
    screen = Framebuffer(devices[guid.SYNTHVID], WIDTH, HEIGHT)
    keyboard, mouse = Keyboard(devices[guid.KEYBOARD]), Mouse(devices[guid.MOUSE])
    screen.wait_ready()
    screen.pixels[:] = pattern(WIDTH, HEIGHT, 1)
    screen.update()
    (out / "drawn").write_text("1")
    keys = [keyboard.next_event(timeout=30) for _ in range(2)]
    clicks = []
    while len(clicks) < 2:
        event = mouse.next_event(timeout=30)
        if event.buttons or clicks:
            clicks.append(event)
    (out / "input.json").write_text(
        json.dumps(
            {
                "keys": [[k.scan_code, k.pressed, k.e0] for k in keys],
                "clicks": [[e.x, e.y, e.buttons] for e in clicks],
            }
        )
    )
    screen.set_mode(2 * WIDTH, 2 * HEIGHT)
    screen.pixels[:] = pattern(2 * WIDTH, 2 * HEIGHT, 2)
    screen.update()
    (out / "resized").write_text("1")
    time.sleep(30)


def vncdo(server: VncServer, *commands: str) -> None:
    """vncdo with the password the server made for this run (it makes one by default)."""
    assert server.password is not None
    port = server.address[1]
    subprocess.run(
        [str(VNCDO), "-s", f"127.0.0.1::{port}", "-p", server.password, "-t", "20", *commands],
        check=True,
        timeout=60,
        capture_output=True,
    )


def captured(server: VncServer, path: Path) -> np.ndarray:
    from PIL import Image

    vncdo(server, "--nocursor", "capture", str(path))
    return np.asarray(Image.open(path).convert("RGB"))


def rgb(frame: np.ndarray) -> np.ndarray:
    return frame[..., 2::-1]  # XRGB little-endian (B, G, R, X) to R, G, B


@pytest.mark.skipif(not VNCDO.exists(), reason="vncdotool is not installed (test extra)")
def test_vnc_client_sees_the_child_draw_and_types_into_it(tmp_path: Path) -> None:
    screen = Screen(WIDTH, HEIGHT)
    keyboard, mouse, video = KeyboardVsp(), MouseVsp(), VideoVsp(screen)
    server = VncServer(
        screen,
        port=0,
        on_key=keyboard.key,
        on_pointer=lambda x, y, b: mouse.pointer(x, y, b, screen.width, screen.height),
    )
    with server, Host() as host:
        child = host.start(desktop_child, devices=[video, keyboard, mouse], args=(str(tmp_path),))
        assert wait_until(lambda: (tmp_path / "drawn").exists(), 30), child.state

        # The VSPs run in the VM's worker process: their counters come from there.
        def frames() -> int:
            return int(child.device_stats()[0]["frames"])

        assert wait_until(lambda: frames() >= 1, 10)
        shot = captured(server, tmp_path / "first.png")
        assert shot.shape == (HEIGHT, WIDTH, 3)
        assert np.array_equal(shot, rgb(pattern(WIDTH, HEIGHT, 1)))
        screen.snapshot_png(tmp_path / "snapshot.png")  # the parent's own PNG backend

        vncdo(server, "key", "a", "move", "100", "50", "click", "1")
        assert wait_until(lambda: (tmp_path / "input.json").exists(), 30)
        got = json.loads((tmp_path / "input.json").read_text())
        assert got["keys"] == [[0x1E, True, False], [0x1E, False, False]]  # 'a' make, break
        x, y = 100 * 32767 // (WIDTH - 1), 50 * 32767 // (HEIGHT - 1)
        assert got["clicks"] == [[x, y, 1], [x, y, 0]]

        assert wait_until(lambda: (tmp_path / "resized").exists(), 30)
        assert wait_until(lambda: screen.width == 2 * WIDTH and frames() >= 2, 10)
        shot = captured(server, tmp_path / "second.png")
        assert np.array_equal(shot, rgb(pattern(2 * WIDTH, 2 * HEIGHT, 2)))
        video_stats, keyboard_stats, mouse_stats = child.device_stats()
        assert video_stats["errors"] == {}
        assert not keyboard_stats.get("errors") and not mouse_stats.get("errors"), (
            keyboard_stats,
            mouse_stats,
        )


def async_input_child(guest: Guest, workdir: str) -> None:
    """Child: read injected input with the asyncio form."""
    import asyncio

    from vsc.input import events

    devices = bound(guest)
    keyboard, mouse = Keyboard(devices[guid.KEYBOARD]), Mouse(devices[guid.MOUSE])

    async def collect() -> dict[str, list[list[int]]]:
        keys = [[e.scan_code, e.pressed, e.e0] async for e in _take(events(keyboard), 3)]
        moves = [[e.x, e.y, e.buttons, e.wheel] async for e in _take(events(mouse), 2)]
        return {"keys": keys, "moves": moves}

    result = asyncio.run(asyncio.wait_for(collect(), 30))
    (Path(workdir) / "async.json").write_text(json.dumps(result))


async def _take(stream, count):  # type: ignore[no-untyped-def]
    taken = 0
    async for item in stream:
        yield item
        taken += 1
        if taken == count:
            break


def test_injected_input_reaches_asyncio_streams(tmp_path: Path) -> None:
    keyboard, mouse = KeyboardVsp(), MouseVsp()
    with Host() as host:
        # worker="thread": the test reads the VSPs' own state (negotiated, ready).
        child = host.start(
            async_input_child, devices=[keyboard, mouse], args=(str(tmp_path),), worker="thread"
        )
        assert wait_until(lambda: keyboard.server.negotiated and mouse.server.ready, 30)
        keyboard.press(0x48, down=True, e0=True)  # up arrow
        keyboard.press(0x48, down=False, e0=True)
        keyboard.key(0xFF0D, down=True)  # Return, as a VNC keysym
        mouse.move(1000, 2000, buttons=2)
        mouse.move(0, 32767, wheel=-1)
        assert child.wait(timeout=30) == 0
        got = json.loads((tmp_path / "async.json").read_text())
        assert got["keys"] == [[0x48, True, True], [0x48, False, True], [0x1C, True, False]]
        assert got["moves"] == [[1000, 2000, 2, 0], [0, 32767, 0, -1]]


def vram_outside_its_grant(guest: Guest, workdir: str) -> None:
    """Child: points VRAM at memory it never granted, and asks for a mode
    bigger than VRAM; then behaves."""
    from vmbus.protocols import video as sv

    device = bound(guest)[guid.SYNTHVID]
    channel = device.open(256 * 1024, 256 * 1024)
    client = sv.SynthvidClient()
    channel.send(client.start())
    while client.version is None or not client.resolutions:
        for reply in client.receive(channel.receive(10).payload):
            channel.send(reply)
    channel.send(client.vram_location(guest.memory.size - PAGE_SIZE))  # not granted, too short
    channel.send(client.situation_update(4000, 4000))  # larger than VRAM
    channel.send(client.dirt((0, 0, 10, 10)))  # before any mode
    time.sleep(0.5)
    assert channel.poll() is None, "the host acknowledged a VRAM it must refuse"
    (Path(workdir) / "done").write_text("1")
    channel.close()


def test_guest_places_vram_outside_its_grant(tmp_path: Path) -> None:
    video = VideoVsp(Screen(64, 64))
    with Host() as host:
        # worker="thread": the test reads the VSP's own state after the child is gone.
        child = host.start(
            vram_outside_its_grant, devices=[video], args=(str(tmp_path),), worker="thread"
        )
        assert child.wait(timeout=30) == 0
        assert video.vram is None and video.frames == 0
        assert video.errors.total() >= 3
        assert video.screen.width == 64  # the bad mode was not applied
