"""The fake other side, for tests of any VSP or VSC and for users' property
tests: in-process ring and channel pairs (`rings`), a harness that drives a
VSP in this process, a VSP-VSC loopback (`harness`), Hypothesis strategies
(`strategies`, imported on its own: it needs Hypothesis) and hand-built
Ethernet frames (`ethernet`)."""

from vmbus.testing.harness import PumpedDevice, VspHarness, loopback
from vmbus.testing.rings import channel_pair, ring_buffer

__all__ = ["PumpedDevice", "VspHarness", "channel_pair", "loopback", "ring_buffer"]
