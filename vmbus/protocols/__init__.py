"""Device wire formats and sans-I/O state machines, one package per device:
`echo`, `input`, `net`, `storage`, `video`. Each package's front door
(`vmbus.protocols.<device>`) lists in its `__all__` what a VSP, a VSC or a
test imports; `wire.py` declares the structs, `vsp.py` and `vsc.py` the
state machines of each side.

Modules here import only the vmbus core (and their own device's protocol
package), never `vsp`, `vsc`, `vmbus.partition` or `vmbus.testing`.
"""

__all__: list[str] = []
