"""The echo device's protocol: the template for a new device's wire format.

A real device declares its structs in `wire.py` (with `vmbus.wire`) and its
sans-I/O state machines in `vsp.py` and `vsc.py`; echo has only a class GUID
and one rule, so all of it fits in `wire.py`."""

from vmbus.protocols.echo.wire import ECHO_CLASS_ID, ECHO_MAX_PAYLOAD

__all__ = ["ECHO_CLASS_ID", "ECHO_MAX_PAYLOAD"]
