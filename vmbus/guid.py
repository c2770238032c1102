"""Device class GUIDs (the `if_type` of an offer) and their wire form.

Source: docs/protocol.md §4 (include/linux/hyperv.h). On the wire a GUID is in
Windows order: u32, u16, u16 little-endian, then 8 bytes as written, which is
`uuid.UUID.bytes_le`.
"""

from __future__ import annotations

import uuid

__all__ = [
    "AVMA1",
    "AVMA2",
    "CLASS_NAMES",
    "DYNAMIC_MEMORY",
    "FCOPY",
    "HEARTBEAT",
    "IDE",
    "IMC",
    "KEYBOARD",
    "KVP",
    "MOUSE",
    "NETWORK",
    "NETWORK_DIRECT",
    "PCI",
    "RDV",
    "SCSI",
    "SHUTDOWN",
    "SYNTHFC",
    "SYNTHVID",
    "TIMESYNC",
    "VMBUS_SERVICE",
    "VSS",
    "class_name",
    "guid_from_wire",
    "guid_to_wire",
]

# Device class GUIDs, include/linux/hyperv.h (HV_*_GUID).
SCSI = uuid.UUID("ba6163d9-04a1-4d29-b605-72e2ffb1dc7f")
IDE = uuid.UUID("32412632-86cb-44a2-9b5c-50d1417354f5")
NETWORK = uuid.UUID("f8615163-df3e-46c5-913f-f2d2f965ed0e")
KEYBOARD = uuid.UUID("f912ad6d-2b17-48ea-bd65-f927a61c7684")
MOUSE = uuid.UUID("cfa8b69e-5b4a-4cc0-b98b-8ba1a1f3f95a")
SYNTHVID = uuid.UUID("da0a7802-e377-4aac-8e77-0558eb1073f8")
SYNTHFC = uuid.UUID("2f9bcc4a-0069-4af3-b76b-6fd0be528cda")
HEARTBEAT = uuid.UUID("57164f39-9115-4e78-ab55-382f3bd5422d")
KVP = uuid.UUID("a9a0f4e7-5a45-4d96-b827-8a841e8c03e6")
SHUTDOWN = uuid.UUID("0e0b6031-5213-4934-818b-38d90ced39db")
TIMESYNC = uuid.UUID("9527e630-d0ae-497b-adce-e80ab0175caf")
VSS = uuid.UUID("35fa2e29-ea23-4236-96ae-3a6ebacba440")
DYNAMIC_MEMORY = uuid.UUID("525074dc-8985-46e2-8057-a307dc18a502")
PCI = uuid.UUID("44c4f61d-4444-4400-9d52-802e27ede19f")
FCOPY = uuid.UUID("34d14be3-dee4-41c8-9ae7-6b174977c192")
NETWORK_DIRECT = uuid.UUID("8c2eaf3d-32a7-4b09-ab99-bd1f1c86b501")
# Offered by Hyper-V but without a Linux driver.
AVMA1 = uuid.UUID("f8e65716-3cb3-4a06-9a60-1889c5cccab5")
AVMA2 = uuid.UUID("3375baf4-9e15-4b30-b765-67acb10d607b")
RDV = uuid.UUID("276aacf4-ac15-426c-98dd-7521ad3f01fe")
IMC = uuid.UUID("c376c1c3-d276-48d2-90a9-c04748072c60")
# The VMBus's own service id (old drivers/hv/hyperv_vmbus.h); not a device class.
VMBUS_SERVICE = uuid.UUID("628180b8-308d-4c5e-b7db-1beb62e62ef4")

CLASS_NAMES: dict[uuid.UUID, str] = {
    SCSI: "SCSI",
    IDE: "IDE",
    NETWORK: "network",
    KEYBOARD: "keyboard",
    MOUSE: "mouse",
    SYNTHVID: "synthetic video",
    SYNTHFC: "synthetic Fibre Channel",
    HEARTBEAT: "heartbeat",
    KVP: "KVP",
    SHUTDOWN: "shutdown",
    TIMESYNC: "time sync",
    VSS: "VSS",
    DYNAMIC_MEMORY: "dynamic memory",
    PCI: "PCI pass-through",
    FCOPY: "file copy",
    NETWORK_DIRECT: "NetworkDirect",
    AVMA1: "AVMA 1",
    AVMA2: "AVMA 2",
    RDV: "remote desktop virtualization",
    IMC: "VMBus file system",
    VMBUS_SERVICE: "VMBus service",
}

GUID_SIZE = 16


def class_name(guid: uuid.UUID) -> str:
    """A display name for a device class; the GUID itself when unknown."""
    return CLASS_NAMES.get(guid, str(guid))


def guid_to_wire(guid: uuid.UUID) -> bytes:
    return guid.bytes_le


def guid_from_wire(data: bytes) -> uuid.UUID:
    if len(data) != GUID_SIZE:
        raise ValueError(f"a GUID is {GUID_SIZE} bytes on the wire, got {len(data)}")
    return uuid.UUID(bytes_le=bytes(data))
