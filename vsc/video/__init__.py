"""The guest's synthetic video driver: a `Framebuffer` to draw into."""

from vsc.video.device import RING_SIZE, Framebuffer

__all__ = ["RING_SIZE", "Framebuffer"]
