"""Integration components (heartbeat, shutdown, time sync, KVP): the IC
message framing and version negotiation Linux's hv_utils speaks.

- `wire`: the pipe and IC headers, the negotiation, each service's body,
  KVP's message and its UTF-16 fields, versions, statuses, class GUIDs;
- `vsp`: `IcServer`, the host side of one service (the host initiates);
- `vsc`: `IcClient`, the guest side, answering in place as Linux does.
"""

from vmbus.protocols.ic.vsc import IcClient, IcClientError, IcRequest
from vmbus.protocols.ic.vsp import IcAnswer, IcProtocolError, IcServer, IcState
from vmbus.protocols.ic.wire import (
    CLASS_IDS,
    FRAMEWORK_VERSIONS,
    HEARTBEAT_VERSIONS,
    KVP_VERSIONS,
    SHUTDOWN_VERSIONS,
    TIMESYNC_VERSIONS,
    IcFlags,
    IcHeader,
    KvpOp,
    KvpPool,
    MessageType,
    ShutdownFlags,
    Status,
    TimeSyncFlags,
    Version,
    choose_version,
)

__all__ = [
    "CLASS_IDS",
    "FRAMEWORK_VERSIONS",
    "HEARTBEAT_VERSIONS",
    "KVP_VERSIONS",
    "SHUTDOWN_VERSIONS",
    "TIMESYNC_VERSIONS",
    "IcAnswer",
    "IcClient",
    "IcClientError",
    "IcFlags",
    "IcHeader",
    "IcProtocolError",
    "IcRequest",
    "IcServer",
    "IcState",
    "KvpOp",
    "KvpPool",
    "MessageType",
    "ShutdownFlags",
    "Status",
    "TimeSyncFlags",
    "Version",
    "choose_version",
]
