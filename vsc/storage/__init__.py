"""storvsc, the storage VSC: a block device for child programs over
enlightened SCSI (`BlockDevice`, its asyncio form `AsyncBlockDevice`), and
the controller its LUNs share (`StorageController`)."""

from vsc.storage.device import (
    AsyncBlockDevice,
    BlockDevice,
    DiscardLimits,
    ScsiError,
    StorageController,
)

__all__ = [
    "AsyncBlockDevice",
    "BlockDevice",
    "DiscardLimits",
    "ScsiError",
    "StorageController",
]
