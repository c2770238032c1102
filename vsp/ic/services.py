"""All four integration services at once, in the order VMMS indexes them."""

from __future__ import annotations

from typing import Any

from vmbus.errors import UsageError
from vsp.ic.device import HeartbeatVsp, IcVsp, ShutdownVsp, TimeSyncVsp
from vsp.ic.kvp import KvpVsp

__all__ = ["SERVICES", "integration_services"]

SERVICES: dict[str, type[IcVsp]] = {
    "heartbeat": HeartbeatVsp,
    "shutdown": ShutdownVsp,
    "timesync": TimeSyncVsp,
    "kvp": KvpVsp,
}


def integration_services(**options: dict[str, Any]) -> list[IcVsp]:
    """Heartbeat, shutdown, time sync and KVP, in that order (their indices
    in `Host.start`'s devices, when they come first); `options` are each
    service's keyword arguments: heartbeat={"interval": 0.5}."""
    unknown = set(options) - set(SERVICES)
    if unknown:
        raise UsageError(f"no integration service named {sorted(unknown)}")
    return [kind(**options.get(name, {})) for name, kind in SERVICES.items()]
