"""Network: NVSP carrying RNDIS, wire formats and sans-I/O state machines.

`wire` declares the NVSP messages and their codec, `rndis_wire` the RNDIS
messages, `rndis_data` the OIDs and info-buffer objects; `vsp` holds the
VSP's state machines (`NvspServer`, `ReceiveSections`, `RndisDevice`),
`vsc` the VSC's (`NvspClient`, `RndisClient`); `offload` the checksum and
LSOv2 offloads, `rsc` receive coalescing and checksum info toward the guest
(`rsc.Reassembly`, the guest's joining of fragments). The names below are what a
VSP or a VSC uses; the codecs stay in their modules, e.g.
`from vmbus.protocols.net import wire as nvsp`.
"""

from vmbus.protocols.net.rndis_wire import RndisError, RndisMessageType, RndisStatus
from vmbus.protocols.net.vsc import Completion, Indication, NvspClient, RndisClient
from vmbus.protocols.net.vsp import (
    AllocateSubChannels,
    BufferEstablished,
    BufferRevoked,
    Event,
    NoReply,
    NvspServer,
    ReceiveSections,
    Reply,
    RndisDevice,
    RndisPacket,
)
from vmbus.protocols.net.wire import (
    NVSP_VERSIONS,
    Buffer,
    BufferKind,
    NvspError,
    NvspMessageType,
    NvspStatus,
    RndisChannel,
)

__all__ = [
    "NVSP_VERSIONS",
    "AllocateSubChannels",
    "Buffer",
    "BufferEstablished",
    "BufferKind",
    "BufferRevoked",
    "Completion",
    "Event",
    "Indication",
    "NoReply",
    "NvspClient",
    "NvspError",
    "NvspMessageType",
    "NvspServer",
    "NvspStatus",
    "ReceiveSections",
    "Reply",
    "RndisChannel",
    "RndisClient",
    "RndisDevice",
    "RndisError",
    "RndisMessageType",
    "RndisPacket",
    "RndisStatus",
]
