"""netvsp, the network VSP, and its backends: a TAP device, the learning
switch between children, null, and a pcap-capturing wrapper."""

from vsp.net.backends import NetBackend, NullBackend, Sent, TapBackend
from vsp.net.device import NetVsp, NetvspChannel, random_mac, section_sizes
from vsp.net.pcap import PcapCapture
from vsp.net.switch import LearningSwitch, PortStats, SwitchPort

__all__ = [
    "LearningSwitch",
    "NetBackend",
    "NetVsp",
    "NetvspChannel",
    "NullBackend",
    "PcapCapture",
    "PortStats",
    "Sent",
    "SwitchPort",
    "TapBackend",
    "random_mac",
    "section_sizes",
]
