"""The device front ends (VSCs), run in child programs. Nothing is imported
here; a child imports the driver it binds (`Guest.register`):

- `vsc.echo`: `EchoVsc`, the template for a new device;
- `vsc.input`: `Keyboard`, `Mouse` (blocking, poll or asyncio events);
- `vsc.net`: the network front end;
- `vsc.storage`: the storage front end (a SCSI disk);
- `vsc.video`: the synthetic video front end (a framebuffer).
"""

__all__: list[str] = []
