"""netvsc: the network front end for child programs."""

from vsc.net.device import NetAdapter

__all__ = ["NetAdapter"]
