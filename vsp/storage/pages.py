"""What this disk target serves about itself: its identity (INQUIRY, VPD
0x80/0x83), the limits it advertises in VPD 0xB0 and enforces, and the
mode pages and block descriptor MODE SENSE returns. The layouts are
vmbus.protocols.storage.scsi_data; the choices are the target's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from vmbus.errors import UsageError
from vmbus.memory import PAGE_SIZE
from vmbus.protocols.storage.scsi_data import (
    CACHING_WCE,
    CODE_SET_ASCII,
    CODE_SET_BINARY,
    DESIGNATOR_NAA,
    DESIGNATOR_T10_VENDOR,
    LBP_LBPRZ,
    LBP_LBPU,
    LBP_LBPWS,
    LBP_LBPWS10,
    MODE_PAGE_CACHING,
    MODE_PAGE_CONTROL,
    NAA_LOCALLY_ASSIGNED,
    PROVISIONING_THIN,
    VPD_BLOCK_CHARACTERISTICS,
    VPD_BLOCK_LIMITS,
    VPD_DEVICE_ID,
    VPD_LOGICAL_BLOCK_PROVISIONING,
    VPD_SUPPORTED_PAGES,
    VPD_UNIT_SERIAL,
    BlockCharacteristicsPage,
    BlockDescriptor,
    BlockLimitsPage,
    CachingPage,
    ControlPage,
    Designator,
    ProvisioningPage,
    StandardInquiry,
    VpdHeader,
)

__all__ = [
    "MAX_SERIAL_LENGTH",
    "UNMAP_GRANULARITY_BYTES",
    "VPD_PAGES",
    "DiskIdentity",
    "Limits",
    "block_descriptor",
    "block_limits",
    "mode_pages",
]

# A T10 vendor designator (8-byte vendor + serial) must fit its one-byte length.
MAX_SERIAL_LENGTH = 64
# Unmapping less than a host page frees nothing in a file or in RAM.
UNMAP_GRANULARITY_BYTES = PAGE_SIZE


def _ascii(text: str, width: int) -> bytes:
    """An SPC ASCII field: left-aligned, space-padded, printable."""
    raw = text.encode("ascii", "replace")  # "?" for the rest: refused below only if long
    if not text.isascii() or len(raw) > width or not all(0x20 <= c < 0x7F for c in raw):
        raise UsageError(f"{text!r} is not printable ASCII of at most {width} characters")
    return raw.ljust(width)


@dataclass(frozen=True)
class Limits:
    """What VPD 0xB0 and 0xB2 advertise; the target enforces the same numbers."""

    max_transfer_bytes: int
    max_write_same_bytes: int
    max_unmap_bytes: int
    max_unmap_descriptors: int


@dataclass(frozen=True)
class DiskIdentity:
    """The names a disk answers INQUIRY with. `device_id` (60 bits) is the
    NAA designator in VPD 0x83; by default a hash of the serial."""

    serial: str
    vendor: str = "VMBUSPY"
    product: str = "VirtualDisk"
    revision: str = "0001"
    device_id: int | None = None

    def __post_init__(self) -> None:
        for text, width in ((self.vendor, 8), (self.product, 16), (self.revision, 4)):
            _ascii(text, width)
        if not self.serial.strip():
            raise UsageError("the serial must not be blank")
        _ascii(self.serial, MAX_SERIAL_LENGTH)
        if self.device_id is not None and not 0 <= self.device_id < 1 << 60:
            raise UsageError("device_id must fit 60 bits")

    @property
    def naa_id(self) -> int:
        device_id = self.device_id
        if device_id is None:
            digest = hashlib.sha256(self.serial.encode("ascii")).digest()
            device_id = int.from_bytes(digest[:8], "big") & ((1 << 60) - 1)
        return NAA_LOCALLY_ASSIGNED << 60 | device_id

    def standard_inquiry(self) -> bytes:
        return StandardInquiry(
            peripheral=0x00,  # connected direct-access block device
            vendor=_ascii(self.vendor, 8),
            product=_ascii(self.product, 16),
            revision=_ascii(self.revision, 4),
        ).pack()

    def vpd_page(self, code: int, block_size: int, thin: bool, limits: Limits) -> bytes | None:
        """The VPD page `code` with its header, or None if not supported."""
        if code == VPD_SUPPORTED_PAGES:
            body = bytes(sorted(VPD_PAGES))
        elif code == VPD_UNIT_SERIAL:
            body = self.serial.encode("ascii")
        elif code == VPD_DEVICE_ID:
            t10 = _ascii(self.vendor, 8) + self.serial.encode("ascii")
            body = (
                Designator(CODE_SET_BINARY, DESIGNATOR_NAA, 0, 8).pack()
                + self.naa_id.to_bytes(8, "big")
                + Designator(CODE_SET_ASCII, DESIGNATOR_T10_VENDOR, 0, len(t10)).pack()
                + t10
            )
        elif code == VPD_BLOCK_LIMITS:
            return block_limits(block_size, thin, limits)
        elif code == VPD_BLOCK_CHARACTERISTICS:
            return BlockCharacteristicsPage(0, code, 0x3C, rotation_rate=1).pack()
        elif code == VPD_LOGICAL_BLOCK_PROVISIONING:
            flags = LBP_LBPU | LBP_LBPWS | LBP_LBPWS10 | LBP_LBPRZ
            return ProvisioningPage(
                0, code, 4, 0, flags if thin else 0, PROVISIONING_THIN if thin else 0
            ).pack()
        else:
            return None
        return VpdHeader(0, code, len(body)).pack() + body


VPD_PAGES = (
    VPD_SUPPORTED_PAGES,
    VPD_UNIT_SERIAL,
    VPD_DEVICE_ID,
    VPD_BLOCK_LIMITS,
    VPD_BLOCK_CHARACTERISTICS,
    VPD_LOGICAL_BLOCK_PROVISIONING,
)


def block_limits(block_size: int, thin: bool, limits: Limits) -> bytes:
    """VPD 0xB0: the limits in blocks of `block_size`."""
    unmap_blocks = limits.max_unmap_bytes // block_size if thin else 0
    return BlockLimitsPage(
        peripheral=0,
        page_code=VPD_BLOCK_LIMITS,
        page_length=0x3C,
        wsnz=1,
        max_compare_write=0,
        optimal_granularity=0,
        max_transfer_length=limits.max_transfer_bytes // block_size,
        optimal_transfer_length=0,
        max_prefetch_length=0,
        max_unmap_lba_count=unmap_blocks,
        max_unmap_descriptor_count=limits.max_unmap_descriptors if thin else 0,
        optimal_unmap_granularity=max(1, UNMAP_GRANULARITY_BYTES // block_size) if thin else 0,
        unmap_granularity_alignment=0,
        max_write_same_length=limits.max_write_same_bytes // block_size,
    ).pack()


def mode_pages() -> dict[int, bytes]:
    """Current (= default) values of the mode pages, by page code, ascending."""
    return {
        # Write cache on: the backend has a cache that SYNCHRONIZE CACHE flushes.
        MODE_PAGE_CACHING: CachingPage(MODE_PAGE_CACHING, 0x12, CACHING_WCE).pack(),
        # Queue algorithm modifier 1: commands may be reordered.
        MODE_PAGE_CONTROL: ControlPage(MODE_PAGE_CONTROL, 0x0A, queueing=0x10).pack(),
    }


def block_descriptor(block_count: int, block_size: int) -> bytes:
    """The short LBA block descriptor; the count saturates (SBC-3 §6.4.2)."""
    return BlockDescriptor(
        min(block_count, 0xFFFFFFFF), 0, block_size >> 16, block_size & 0xFFFF
    ).pack()
