"""The integration services' VSPs: `HeartbeatVsp`, `ShutdownVsp`,
`TimeSyncVsp` and `KvpVsp` (one channel each, the host asking), and
`integration_services()`, all four in VMMS's order."""

from vsp.ic.device import HeartbeatVsp, IcHandler, IcVsp, ShutdownVsp, TimeSyncVsp
from vsp.ic.kvp import KvpVsp
from vsp.ic.services import SERVICES, integration_services

__all__ = [
    "SERVICES",
    "HeartbeatVsp",
    "IcHandler",
    "IcVsp",
    "KvpVsp",
    "ShutdownVsp",
    "TimeSyncVsp",
    "integration_services",
]
