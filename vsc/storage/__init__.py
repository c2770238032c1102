"""storvsc, the storage VSC: a block device for child programs over
enlightened SCSI (`BlockDevice`, its asyncio form `AsyncBlockDevice`), the
controller its LUNs share (`StorageController`), the zero-copy buffers in
guest memory it reads into and writes from (`GuestBuffer`, from
`BlockDevice.buffer(n)`), and the requests of a batch (`Read`, `Write`,
`Flush`, for `BlockDevice.submit_many`)."""

from vsc.storage._fast import GuestBuffer
from vsc.storage.controller import ScsiError, StorageController
from vsc.storage.device import (
    AsyncBlockDevice,
    BlockDevice,
    DiscardLimits,
    Flush,
    Read,
    Request,
    Write,
)

__all__ = [
    "AsyncBlockDevice",
    "BlockDevice",
    "DiscardLimits",
    "Flush",
    "GuestBuffer",
    "Read",
    "Request",
    "ScsiError",
    "StorageController",
    "Write",
]
