"""The synthetic video VSP and its console: `VideoVsp` serves the guest's
framebuffer onto a `Screen`, which `VncServer` serves to VNC clients and
`Screen.snapshot_png` saves."""

from vsp.video.device import DEFAULT_VRAM_MB, VideoHandler, VideoVsp
from vsp.video.screen import Screen
from vsp.video.vnc import VncServer

__all__ = ["DEFAULT_VRAM_MB", "Screen", "VideoHandler", "VideoVsp", "VncServer"]
