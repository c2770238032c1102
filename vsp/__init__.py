"""The device back ends (VSPs), run in the parent. Nothing is imported
here; an embedder imports the device it serves:

- `vsp.echo`: `EchoVsp`, the template for a new device;
- `vsp.input`: `KeyboardVsp`, `MouseVsp`, with programmatic injection;
- `vsp.net`: the network VSP and its backends;
- `vsp.storage`: the storage VSP, its SCSI target and disk backends;
- `vsp.video`: the synthetic video VSP and its console (screen, VNC, PNG).

Each is a `vmbus.device.Vsp` handed to `vmbus.partition.Host.start`.
"""

__all__: list[str] = []
