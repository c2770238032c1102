"""SCSI parameter data: the layouts of what commands return or take (UNMAP
list, READ CAPACITY, INQUIRY and VPD pages, mode pages, REPORT LUNS), each
declared once. What a disk fills them with is the target's (vsp.storage.pages).

Source: SPC-4 §6.6.2 (standard INQUIRY), §7.8 (VPD), §7.5 (mode pages),
§6.33 (REPORT LUNS); SBC-3 §5.16, §5.28, §6.4, §6.6 (block device data).
All big-endian, as the CDBs in scsi_wire.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from vmbus.protocols.storage.scsi_wire import be_struct
from vmbus.wire import U8, U16, U32, U64, Bytes, WireStruct

__all__ = [
    "CACHING_WCE",
    "CODE_SET_ASCII",
    "CODE_SET_BINARY",
    "DESIGNATOR_NAA",
    "DESIGNATOR_T10_VENDOR",
    "FLAT_SPACE_ADDRESSING",
    "LBP_LBPRZ",
    "LBP_LBPU",
    "LBP_LBPWS",
    "LBP_LBPWS10",
    "MAX_FLAT_LUN",
    "MODE_DPOFUA",
    "MODE_PAGE_CACHING",
    "MODE_PAGE_CONTROL",
    "MODE_WP",
    "NAA_LOCALLY_ASSIGNED",
    "PROVISIONING_THIN",
    "RC16_LBPME",
    "RC16_LBPRZ",
    "VPD_BLOCK_CHARACTERISTICS",
    "VPD_BLOCK_LIMITS",
    "VPD_DEVICE_ID",
    "VPD_LOGICAL_BLOCK_PROVISIONING",
    "VPD_SUPPORTED_PAGES",
    "VPD_UNIT_SERIAL",
    "BlockCharacteristicsPage",
    "BlockDescriptor",
    "BlockLimitsPage",
    "CachingPage",
    "ControlPage",
    "Designator",
    "LunEntry",
    "ModeHeader10",
    "ModeHeader6",
    "ProvisioningPage",
    "ReadCapacity10Data",
    "ReadCapacity16Data",
    "ReportLunsHeader",
    "StandardInquiry",
    "UnmapDescriptor",
    "UnmapHeader",
    "VpdHeader",
]

# Identifies an NAA 3 ("locally assigned") designator: no IEEE OUI needed.
NAA_LOCALLY_ASSIGNED = 0x3

# Designation descriptor header values (SPC-4 §7.8.6).
CODE_SET_BINARY = 0x1
CODE_SET_ASCII = 0x2
DESIGNATOR_T10_VENDOR = 0x1  # association 0: the logical unit
DESIGNATOR_NAA = 0x3


# READ CAPACITY (16) bytes 14-15 (SBC-3 §5.16.2).
RC16_LBPME = 0x8000  # logical block provisioning (UNMAP) enabled
RC16_LBPRZ = 0x4000  # unmapped blocks read as zeros

# VPD page codes (SPC-4 §7.8, SBC-3 §6.6).
VPD_SUPPORTED_PAGES = 0x00
VPD_UNIT_SERIAL = 0x80
VPD_DEVICE_ID = 0x83
VPD_BLOCK_LIMITS = 0xB0
VPD_BLOCK_CHARACTERISTICS = 0xB1
VPD_LOGICAL_BLOCK_PROVISIONING = 0xB2

# Logical block provisioning VPD byte 5 and byte 6 (SBC-3 §6.6.4).
LBP_LBPU = 0x80  # UNMAP supported
LBP_LBPWS = 0x40  # WRITE SAME (16) with UNMAP supported
LBP_LBPWS10 = 0x20  # WRITE SAME (10) with UNMAP supported
LBP_LBPRZ = 0x04  # unmapped blocks read as zeros
PROVISIONING_THIN = 0x02

# Mode pages (SPC-4 §7.5, SBC-3 §6.4).
MODE_PAGE_CACHING = 0x08
MODE_PAGE_CONTROL = 0x0A
MODE_WP = 0x80  # device-specific parameter: write protected
MODE_DPOFUA = 0x10  # device-specific parameter: DPO and FUA supported
CACHING_WCE = 0x04  # write cache enabled: SYNCHRONIZE CACHE is meaningful

# Single-level LUNs (SAM-5 §4.7): peripheral addressing up to 255, flat to 16383.
FLAT_SPACE_ADDRESSING = 0x4000
MAX_FLAT_LUN = 0x3FFF


@be_struct(size=8)
@dataclass(frozen=True)
class UnmapHeader(WireStruct):
    """UNMAP parameter list header (SBC-3 §5.28.2)."""

    data_length: Annotated[int, U16]  # bytes after this field
    descriptor_length: Annotated[int, U16]  # bytes of block descriptors
    reserved: Annotated[int, U32]


@be_struct(size=16)
@dataclass(frozen=True)
class UnmapDescriptor(WireStruct):
    """UNMAP block descriptor."""

    lba: Annotated[int, U64]
    blocks: Annotated[int, U32]
    reserved: Annotated[int, U32] = 0


@be_struct(size=8)
@dataclass(frozen=True)
class ReadCapacity10Data(WireStruct):
    """READ CAPACITY (10) parameter data; last_lba saturates at 0xFFFFFFFF."""

    last_lba: Annotated[int, U32]
    block_size: Annotated[int, U32]


@be_struct(size=32)
@dataclass(frozen=True)
class ReadCapacity16Data(WireStruct):
    """READ CAPACITY (16) parameter data."""

    last_lba: Annotated[int, U64]
    block_size: Annotated[int, U32]
    protection: Annotated[int, U8] = 0  # P_TYPE, PROT_EN
    exponents: Annotated[int, U8] = 0  # P_I_EXPONENT, LBPPBE
    provisioning: Annotated[int, U16] = 0  # LBPME, LBPRZ, LOWEST ALIGNED LBA
    reserved: Annotated[bytes, Bytes(16)] = b""


@be_struct(size=36)
@dataclass(frozen=True)
class StandardInquiry(WireStruct):
    """Standard INQUIRY data (SPC-4 §6.6.2), the 36 bytes every initiator reads."""

    peripheral: Annotated[int, U8]  # qualifier (7-5), device type (4-0)
    rmb: Annotated[int, U8] = 0
    version: Annotated[int, U8] = 0x06  # SPC-4
    response_format: Annotated[int, U8] = 0x12  # HISUP, format 2
    additional_length: Annotated[int, U8] = 31  # bytes after this one
    flags5: Annotated[int, U8] = 0
    flags6: Annotated[int, U8] = 0
    flags7: Annotated[int, U8] = 0x02  # CMDQUE
    vendor: Annotated[bytes, Bytes(8)] = b""
    product: Annotated[bytes, Bytes(16)] = b""
    revision: Annotated[bytes, Bytes(4)] = b""


@be_struct(size=4)
@dataclass(frozen=True)
class VpdHeader(WireStruct):
    """The header of every VPD page (SPC-4 §7.8.1)."""

    peripheral: Annotated[int, U8]
    page_code: Annotated[int, U8]
    page_length: Annotated[int, U16]  # bytes after the header


@be_struct(size=4)
@dataclass(frozen=True)
class Designator(WireStruct):
    """Device identification VPD designation descriptor header (SPC-4 §7.8.6)."""

    code_set: Annotated[int, U8]  # PROTOCOL IDENTIFIER (7-4), CODE SET (3-0)
    designator_type: Annotated[int, U8]  # PIV, ASSOCIATION (5-4), TYPE (3-0)
    reserved: Annotated[int, U8]
    length: Annotated[int, U8]


@be_struct(size=64)
@dataclass(frozen=True)
class BlockLimitsPage(WireStruct):
    """Block Limits VPD page 0xB0 (SBC-3 §6.6.3); lengths are in blocks."""

    peripheral: Annotated[int, U8]
    page_code: Annotated[int, U8]
    page_length: Annotated[int, U16]
    wsnz: Annotated[int, U8]  # WRITE SAME with zero blocks is refused
    max_compare_write: Annotated[int, U8]
    optimal_granularity: Annotated[int, U16]
    max_transfer_length: Annotated[int, U32]
    optimal_transfer_length: Annotated[int, U32]
    max_prefetch_length: Annotated[int, U32]
    max_unmap_lba_count: Annotated[int, U32]
    max_unmap_descriptor_count: Annotated[int, U32]
    optimal_unmap_granularity: Annotated[int, U32]
    unmap_granularity_alignment: Annotated[int, U32]
    max_write_same_length: Annotated[int, U64]
    reserved: Annotated[bytes, Bytes(20)] = b""


@be_struct(size=64)
@dataclass(frozen=True)
class BlockCharacteristicsPage(WireStruct):
    """Block Device Characteristics VPD page 0xB1 (SBC-3 §6.6.2)."""

    peripheral: Annotated[int, U8]
    page_code: Annotated[int, U8]
    page_length: Annotated[int, U16]
    rotation_rate: Annotated[int, U16]  # 1 = non-rotating medium
    product_type: Annotated[int, U8] = 0
    form_factor: Annotated[int, U8] = 0
    flags: Annotated[int, U8] = 0
    reserved: Annotated[bytes, Bytes(55)] = b""


@be_struct(size=8)
@dataclass(frozen=True)
class ProvisioningPage(WireStruct):
    """Logical Block Provisioning VPD page 0xB2 (SBC-3 §6.6.4)."""

    peripheral: Annotated[int, U8]
    page_code: Annotated[int, U8]
    page_length: Annotated[int, U16]
    threshold_exponent: Annotated[int, U8]
    flags: Annotated[int, U8]  # LBPU, LBPWS, LBPWS10, LBPRZ, ANC_SUP, DP
    provisioning_type: Annotated[int, U8]
    reserved: Annotated[int, U8] = 0


@be_struct(size=4)
@dataclass(frozen=True)
class ModeHeader6(WireStruct):
    """Mode parameter header (6) (SPC-4 §7.5.5)."""

    mode_data_length: Annotated[int, U8]  # bytes after this field
    medium_type: Annotated[int, U8]
    device_specific: Annotated[int, U8]  # WP, DPOFUA
    block_descriptor_length: Annotated[int, U8]


@be_struct(size=8)
@dataclass(frozen=True)
class ModeHeader10(WireStruct):
    """Mode parameter header (10) (SPC-4 §7.5.5)."""

    mode_data_length: Annotated[int, U16]
    medium_type: Annotated[int, U8]
    device_specific: Annotated[int, U8]
    long_lba: Annotated[int, U8]
    reserved: Annotated[int, U8]
    block_descriptor_length: Annotated[int, U16]


@be_struct(size=8)
@dataclass(frozen=True)
class BlockDescriptor(WireStruct):
    """Short LBA mode parameter block descriptor (SBC-3 §6.4.2)."""

    blocks: Annotated[int, U32]  # saturates at 0xFFFFFFFF
    reserved: Annotated[int, U8]
    block_size_high: Annotated[int, U8]  # the block length is 24 bits
    block_size_low: Annotated[int, U16]


@be_struct(size=20)
@dataclass(frozen=True)
class CachingPage(WireStruct):
    """Caching mode page 0x08 (SBC-3 §6.4.5)."""

    page_code: Annotated[int, U8]
    page_length: Annotated[int, U8]  # 0x12
    flags: Annotated[int, U8] = 0  # WCE, RCD, ...
    retention: Annotated[int, U8] = 0
    disable_prefetch_length: Annotated[int, U16] = 0
    min_prefetch: Annotated[int, U16] = 0
    max_prefetch: Annotated[int, U16] = 0
    max_prefetch_ceiling: Annotated[int, U16] = 0
    flags12: Annotated[int, U8] = 0
    cache_segments: Annotated[int, U8] = 0
    cache_segment_size: Annotated[int, U16] = 0
    reserved: Annotated[int, U8] = 0
    obsolete: Annotated[bytes, Bytes(3)] = b""


@be_struct(size=12)
@dataclass(frozen=True)
class ControlPage(WireStruct):
    """Control mode page 0x0A (SPC-4 §7.5.8)."""

    page_code: Annotated[int, U8]
    page_length: Annotated[int, U8]  # 0x0A
    flags2: Annotated[int, U8] = 0  # TST, TMF_ONLY, D_SENSE, GLTSD, RLEC
    queueing: Annotated[int, U8] = 0  # QUEUE ALGORITHM MODIFIER (7-4), QERR
    flags4: Annotated[int, U8] = 0
    flags5: Annotated[int, U8] = 0
    obsolete: Annotated[int, U16] = 0
    busy_timeout: Annotated[int, U16] = 0
    self_test_time: Annotated[int, U16] = 0


@be_struct(size=8)
@dataclass(frozen=True)
class ReportLunsHeader(WireStruct):
    """REPORT LUNS parameter data header."""

    lun_list_length: Annotated[int, U32]  # bytes of LUN entries
    reserved: Annotated[int, U32] = 0


@be_struct(size=8)
@dataclass(frozen=True)
class LunEntry(WireStruct):
    """One single-level LUN (SAM-5 §4.7): peripheral or flat addressing."""

    address: Annotated[int, U16]
    reserved: Annotated[bytes, Bytes(6)] = b""
