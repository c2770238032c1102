"""A Hyper-V-style VMBus paravirtual device stack with a Cython core.

`import vmbus` loads nothing else; an embedder imports the submodule it
needs:

- `vmbus.partition`: `Host` (start child partitions, or `attach` a guest an
  emulator runs) and `ChildPartition`, the parent's record of one child;
- `vmbus.guest`: `Guest`, the VMBus client a child program runs, and
  `GuestDevice` / `GuestChannel`;
- `vmbus.device`: the device contract (`Vsp`, `ChannelHandler`,
  `OpenContext`) a new back end implements;
- `vmbus.errors`: `VmbusError`, `UsageError`, `PeerError`;
- `vmbus.channel`, `vmbus.ring`, `vmbus.memory`, `vmbus.packet`,
  `vmbus.transport`, `vmbus.messages`, `vmbus.host`, `vmbus.wire`,
  `vmbus.guid`: the bus core, layer by layer;
- `vmbus.protocols.<device>`: each device's wire format and sans-I/O state
  machines (echo, input, net, storage, video);
- `vmbus.testing`: the harness and loopback for testing a VSP or VSC.

The devices themselves are in the sibling packages `vsp` (back ends) and
`vsc` (front ends).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
