"""The integration services for child programs: `IntegrationServices(guest)`
binds `Heartbeat`, `Shutdown`, `TimeSync` and `Kvp` to the guest's offers;
each answers the host from a thread of its own."""

from vsc.ic.device import (
    Heartbeat,
    IcService,
    IntegrationServices,
    Kvp,
    KvpStore,
    Shutdown,
    ShutdownRequest,
    TimeSync,
)

__all__ = [
    "Heartbeat",
    "IcService",
    "IntegrationServices",
    "Kvp",
    "KvpStore",
    "Shutdown",
    "ShutdownRequest",
    "TimeSync",
]
