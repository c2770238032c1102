"""storvsp, the storage VSP: a synthetic SCSI controller (`StorVsp`), the
SCSI disk target it runs CDBs on (`ScsiDisk`, `ScsiTarget`), what a disk
serves about itself (`DiskIdentity`, `Limits`), and the disk backends
behind it (`BlockBackend` and its implementations)."""

from vsp.storage.backends import (
    BlockBackend,
    FaultyBackend,
    NullBackend,
    RamBackend,
    RawFileBackend,
    ReadOnlyBackend,
)
from vsp.storage.device import DEFAULT_MAX_TRANSFER, StorVsp, StorvspChannel
from vsp.storage.direct import DirectBackend
from vsp.storage.pages import DiskIdentity, Limits
from vsp.storage.scsi import ScsiDisk, ScsiResult, ScsiTarget

__all__ = [
    "DEFAULT_MAX_TRANSFER",
    "BlockBackend",
    "DirectBackend",
    "DiskIdentity",
    "FaultyBackend",
    "Limits",
    "NullBackend",
    "RamBackend",
    "RawFileBackend",
    "ReadOnlyBackend",
    "ScsiDisk",
    "ScsiResult",
    "ScsiTarget",
    "StorVsp",
    "StorvspChannel",
]
