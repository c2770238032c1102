"""A VM's console through the service: the address and password that
`vmbus ctl console` shows let a real VNC client (vncdotool's vncdo) see the
guest's screen and type into the guest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from vmms_support import Service, wait_for

VNCDO = Path(sys.executable).with_name("vncdo")


@pytest.mark.skipif(not VNCDO.exists(), reason="vncdotool is not installed (test extra)")
def test_the_console_shows_the_guest_and_takes_its_keys(service: Service, tmp_path: Path) -> None:
    from PIL import Image

    client = service.client
    client.create(
        {
            "name": "desk",
            "devices": [
                {"kind": "video", "width": 640, "height": 480},
                {"kind": "keyboard"},
                {"kind": "mouse"},
            ],
            "console": {"vnc": True},
        }
    )
    status = client.start("desk", wait_devices=30)
    assert status["bus"]["channels"] == 3, status  # the guest opened all three
    console = status["console"]
    assert console["vnc"].startswith("127.0.0.1::") and console["password"]

    def vncdo(*commands: str) -> None:
        server = ["-s", console["vnc"], "-p", console["password"], "-t", "20"]
        subprocess.run(
            [str(VNCDO), *server, *commands], check=True, timeout=60, capture_output=True
        )

    shot = tmp_path / "desk.png"
    vncdo("--nocursor", "capture", str(shot))
    assert Image.open(shot).size == (1024, 768)  # the mode the guest's framebuffer set

    def keyboard_events() -> int:
        devices = client.status("desk")["devices"]
        return int(next(d for d in devices if d["kind"] == "keyboard")["counters"]["events"])

    before = keyboard_events()
    vncdo("key", "a")
    assert wait_for(lambda: keyboard_events() >= before + 2)  # make and break reached the guest
    client.stop("desk")
    assert client.status("desk")["console"] is None  # closed with the VM
