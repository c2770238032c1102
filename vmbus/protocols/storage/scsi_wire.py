"""SCSI wire formats for the enlightened-SCSI disk target: opcodes, CDB
layouts and their fields, status and sense data, each declared once (the
parameter data a command returns or takes is in scsi_data).

Source: T10 SPC-4 (primary commands, sense data, VPD and mode pages) and
SBC-3 (block commands), as Linux sd and storvsc use them; docs/protocol.md §5
for the storvsc side (data_in values, 20-byte sense buffer).

SCSI fields are big-endian (SPC-4 §3.5). `be_struct` is vmbus.wire's
`wire_struct` with the byte order flipped, so these layouts get the same
pack/unpack and import-time size checks as the VMBus structs. Each CDB
layout ends with the CONTROL byte, so `layout.SIZE` is also the CDB length.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Annotated, TypeVar

from vmbus.wire import U8, U16, U32, U64, Bytes, WireStruct, wire_struct

__all__ = [
    "BYTCHK_MASK",
    "CAPACITY_DATA_HAS_CHANGED",
    "CHECK_CONDITION",
    "CONTROL_LINK",
    "CONTROL_NACA",
    "FUA",
    "GOOD",
    "INQUIRY_CMDDT",
    "INQUIRY_EVPD",
    "INVALID_COMMAND_OPERATION_CODE",
    "INVALID_FIELD_IN_CDB",
    "INVALID_FIELD_IN_PARAMETER_LIST",
    "LBA_OUT_OF_RANGE",
    "LOGICAL_UNIT_NOT_SUPPORTED",
    "MODE_PAGE_ALL",
    "MODE_SENSE_DBD",
    "MODE_SUBPAGE_ALL",
    "NO_SENSE",
    "PARAMETER_LIST_LENGTH_ERROR",
    "PC_CHANGEABLE",
    "PC_CURRENT",
    "PC_DEFAULT",
    "PC_SAVED",
    "PROTECT_MASK",
    "READ_CAPACITY_PMI",
    "REQUEST_SENSE_DESC",
    "SAVING_PARAMETERS_NOT_SUPPORTED",
    "SA_READ_CAPACITY_16",
    "SELECT_ALL_BUT_WELL_KNOWN",
    "SELECT_ALL_LUNS",
    "SELECT_WELL_KNOWN",
    "SPACE_ALLOCATION_FAILED_WRITE_PROTECT",
    "UNMAP_ANCHOR",
    "UNRECOVERED_READ_ERROR",
    "WRITE_ERROR",
    "WRITE_PROTECTED",
    "WS_ANCHOR",
    "WS_LBDATA_PBDATA",
    "WS_NDOB",
    "WS_UNMAP",
    "Cdb6",
    "DataDirection",
    "FixedSense",
    "InquiryCdb",
    "ModeSense10Cdb",
    "ModeSense6Cdb",
    "Opcode",
    "ReadCapacity10Cdb",
    "ReportLunsCdb",
    "RequestSenseCdb",
    "Rw10Cdb",
    "Rw12Cdb",
    "Rw16Cdb",
    "Rw6Cdb",
    "Sense",
    "SenseKey",
    "ServiceActionIn16Cdb",
    "UnmapCdb",
    "be_struct",
    "opcode",
]

T = TypeVar("T", bound=WireStruct)


def be_struct(size: int) -> Callable[[type[T]], type[T]]:
    """`wire_struct`, big-endian."""

    def apply(cls: type[T]) -> type[T]:
        cls = wire_struct(size)(cls)
        cls._struct = struct.Struct(">" + cls._struct.format[1:])
        return cls

    return apply


# SAM-5 status codes (the only two this target returns).
GOOD = 0x00
CHECK_CONDITION = 0x02


class DataDirection(IntEnum):
    """The initiator's declared data phase. The values are those of
    vmscsi_request.data_in (§5.4), so VSTOR's field passes straight through."""

    OUT = 0  # WRITE_TYPE: the buffer holds data for the target
    IN = 1  # READ_TYPE: the target fills the buffer
    NONE = 2  # UNKNOWN_TYPE: no data


class Opcode(IntEnum):
    """Operation codes this target knows (SPC-4 / SBC-3)."""

    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    READ_6 = 0x08
    WRITE_6 = 0x0A
    INQUIRY = 0x12
    MODE_SENSE_6 = 0x1A
    START_STOP_UNIT = 0x1B
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    VERIFY_10 = 0x2F
    SYNCHRONIZE_CACHE_10 = 0x35
    WRITE_SAME_10 = 0x41
    UNMAP = 0x42
    MODE_SENSE_10 = 0x5A
    READ_16 = 0x88
    WRITE_16 = 0x8A
    VERIFY_16 = 0x8F
    SYNCHRONIZE_CACHE_16 = 0x91
    WRITE_SAME_16 = 0x93
    SERVICE_ACTION_IN_16 = 0x9E
    REPORT_LUNS = 0xA0
    READ_12 = 0xA8
    WRITE_12 = 0xAA


def opcode(value: int) -> Opcode | int:
    """Open enum: the Opcode member for a known value, else the plain int."""
    try:
        return Opcode(value)
    except ValueError:
        return value


# SERVICE ACTION IN (16) service actions (SBC-3 §5.16).
SA_READ_CAPACITY_16 = 0x10

# CONTROL byte (SAM-5 §5.2): NACA and the obsolete LINK, neither supported.
CONTROL_NACA = 0x04
CONTROL_LINK = 0x01

# Byte 1 of READ/WRITE/VERIFY/WRITE SAME/SYNCHRONIZE CACHE (SBC-3 §5).
PROTECT_MASK = 0xE0  # RDPROTECT/WRPROTECT/VRPROTECT: no protection information
FUA = 0x08
BYTCHK_MASK = 0x06  # VERIFY
WS_ANCHOR = 0x10  # WRITE SAME
WS_UNMAP = 0x08
WS_LBDATA_PBDATA = 0x06  # obsolete in SBC-3
WS_NDOB = 0x01  # SBC-4: no Data-Out buffer, write zeros

INQUIRY_EVPD = 0x01
INQUIRY_CMDDT = 0x02  # obsolete
REQUEST_SENSE_DESC = 0x01
MODE_SENSE_DBD = 0x08
UNMAP_ANCHOR = 0x01
READ_CAPACITY_PMI = 0x01

# Page codes in INQUIRY and MODE SENSE CDBs (SPC-4 §6.6, §6.13).
MODE_PAGE_ALL = 0x3F
MODE_SUBPAGE_ALL = 0xFF
PC_CURRENT, PC_CHANGEABLE, PC_DEFAULT, PC_SAVED = range(4)  # PAGE CONTROL

# REPORT LUNS SELECT REPORT (SPC-4 §6.33).
SELECT_ALL_LUNS = 0x00
SELECT_WELL_KNOWN = 0x01
SELECT_ALL_BUT_WELL_KNOWN = 0x02


class SenseKey(IntEnum):
    """SPC-4 §4.5.6 table 27."""

    NO_SENSE = 0x0
    MEDIUM_ERROR = 0x3
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7


@dataclass(frozen=True)
class Sense:
    """A sense key with its additional sense code and qualifier."""

    key: SenseKey
    asc: int
    ascq: int = 0

    def fixed(self) -> bytes:
        """Fixed-format sense data, current error (SPC-4 §4.5.3)."""
        return FixedSense(sense_key=self.key, asc=self.asc, ascq=self.ascq).pack()


# Additional sense codes (SPC-4 Annex D).
NO_SENSE = Sense(SenseKey.NO_SENSE, 0x00)
WRITE_ERROR = Sense(SenseKey.MEDIUM_ERROR, 0x0C)
UNRECOVERED_READ_ERROR = Sense(SenseKey.MEDIUM_ERROR, 0x11)
PARAMETER_LIST_LENGTH_ERROR = Sense(SenseKey.ILLEGAL_REQUEST, 0x1A)
INVALID_COMMAND_OPERATION_CODE = Sense(SenseKey.ILLEGAL_REQUEST, 0x20)
LBA_OUT_OF_RANGE = Sense(SenseKey.ILLEGAL_REQUEST, 0x21)
INVALID_FIELD_IN_CDB = Sense(SenseKey.ILLEGAL_REQUEST, 0x24)
LOGICAL_UNIT_NOT_SUPPORTED = Sense(SenseKey.ILLEGAL_REQUEST, 0x25)
INVALID_FIELD_IN_PARAMETER_LIST = Sense(SenseKey.ILLEGAL_REQUEST, 0x26)
SAVING_PARAMETERS_NOT_SUPPORTED = Sense(SenseKey.ILLEGAL_REQUEST, 0x39)
CAPACITY_DATA_HAS_CHANGED = Sense(SenseKey.UNIT_ATTENTION, 0x2A, 0x09)
WRITE_PROTECTED = Sense(SenseKey.DATA_PROTECT, 0x27)
SPACE_ALLOCATION_FAILED_WRITE_PROTECT = Sense(SenseKey.DATA_PROTECT, 0x27, 0x07)


@be_struct(size=18)
@dataclass(frozen=True)
class FixedSense(WireStruct):
    """Fixed-format sense data (SPC-4 §4.5.3); fits storvsc's 20-byte buffer."""

    response_code: Annotated[int, U8] = 0x70  # current error, INFORMATION not valid
    obsolete: Annotated[int, U8] = 0
    sense_key: Annotated[int, U8] = 0  # FILEMARK/EOM/ILI bits always zero here
    information: Annotated[int, U32] = 0
    additional_length: Annotated[int, U8] = 10  # bytes after this one
    command_specific: Annotated[int, U32] = 0
    asc: Annotated[int, U8] = 0
    ascq: Annotated[int, U8] = 0
    fru_code: Annotated[int, U8] = 0
    sense_key_specific: Annotated[bytes, Bytes(3)] = b""


# --- CDB layouts -----------------------------------------------------------


@be_struct(size=6)
@dataclass(frozen=True)
class Cdb6(WireStruct):
    """A six-byte CDB read only for its length and CONTROL byte: TEST UNIT
    READY, START STOP UNIT."""

    opcode: Annotated[int, U8]
    byte1: Annotated[int, U8]
    byte2: Annotated[int, U8]
    byte3: Annotated[int, U8]
    byte4: Annotated[int, U8]
    control: Annotated[int, U8]


@be_struct(size=6)
@dataclass(frozen=True)
class RequestSenseCdb(WireStruct):
    """REQUEST SENSE (SPC-4 §6.39)."""

    opcode: Annotated[int, U8]
    flags: Annotated[int, U8]  # DESC
    reserved: Annotated[int, U16]
    allocation_length: Annotated[int, U8]
    control: Annotated[int, U8]


@be_struct(size=6)
@dataclass(frozen=True)
class InquiryCdb(WireStruct):
    """INQUIRY (SPC-4 §6.6)."""

    opcode: Annotated[int, U8]
    flags: Annotated[int, U8]  # EVPD, CMDDT
    page_code: Annotated[int, U8]
    allocation_length: Annotated[int, U16]
    control: Annotated[int, U8]


@be_struct(size=6)
@dataclass(frozen=True)
class ModeSense6Cdb(WireStruct):
    """MODE SENSE (6) (SPC-4 §6.13)."""

    opcode: Annotated[int, U8]
    flags: Annotated[int, U8]  # DBD
    page: Annotated[int, U8]  # PC (bits 7-6), PAGE CODE (bits 5-0)
    subpage: Annotated[int, U8]
    allocation_length: Annotated[int, U8]
    control: Annotated[int, U8]


@be_struct(size=10)
@dataclass(frozen=True)
class ModeSense10Cdb(WireStruct):
    """MODE SENSE (10) (SPC-4 §6.14)."""

    opcode: Annotated[int, U8]
    flags: Annotated[int, U8]  # LLBAA, DBD
    page: Annotated[int, U8]
    subpage: Annotated[int, U8]
    reserved: Annotated[bytes, Bytes(3)]
    allocation_length: Annotated[int, U16]
    control: Annotated[int, U8]


@be_struct(size=6)
@dataclass(frozen=True)
class Rw6Cdb(WireStruct):
    """READ (6) / WRITE (6) (SBC-3 §5.7): a 21-bit LBA; length 0 means 256."""

    opcode: Annotated[int, U8]
    lba_high: Annotated[int, U8]  # bits 4-0
    lba_low: Annotated[int, U16]
    transfer_length: Annotated[int, U8]
    control: Annotated[int, U8]


@be_struct(size=10)
@dataclass(frozen=True)
class Rw10Cdb(WireStruct):
    """READ/WRITE/VERIFY/WRITE SAME/SYNCHRONIZE CACHE (10) (SBC-3 §5)."""

    opcode: Annotated[int, U8]
    flags: Annotated[int, U8]
    lba: Annotated[int, U32]
    group: Annotated[int, U8]
    transfer_length: Annotated[int, U16]
    control: Annotated[int, U8]


@be_struct(size=12)
@dataclass(frozen=True)
class Rw12Cdb(WireStruct):
    """READ (12) / WRITE (12) (SBC-3 §5.9, §5.33)."""

    opcode: Annotated[int, U8]
    flags: Annotated[int, U8]
    lba: Annotated[int, U32]
    transfer_length: Annotated[int, U32]
    group: Annotated[int, U8]
    control: Annotated[int, U8]


@be_struct(size=16)
@dataclass(frozen=True)
class Rw16Cdb(WireStruct):
    """READ/WRITE/VERIFY/WRITE SAME/SYNCHRONIZE CACHE (16) (SBC-3 §5)."""

    opcode: Annotated[int, U8]
    flags: Annotated[int, U8]
    lba: Annotated[int, U64]
    transfer_length: Annotated[int, U32]
    group: Annotated[int, U8]
    control: Annotated[int, U8]


@be_struct(size=10)
@dataclass(frozen=True)
class ReadCapacity10Cdb(WireStruct):
    """READ CAPACITY (10) (SBC-3 §5.15)."""

    opcode: Annotated[int, U8]
    flags: Annotated[int, U8]
    lba: Annotated[int, U32]  # must be zero unless PMI (SBC-3)
    reserved: Annotated[int, U16]
    pmi: Annotated[int, U8]
    control: Annotated[int, U8]


@be_struct(size=16)
@dataclass(frozen=True)
class ServiceActionIn16Cdb(WireStruct):
    """SERVICE ACTION IN (16); READ CAPACITY (16) is action 0x10 (SBC-3 §5.16)."""

    opcode: Annotated[int, U8]
    service_action: Annotated[int, U8]  # bits 4-0
    lba: Annotated[int, U64]
    allocation_length: Annotated[int, U32]
    pmi: Annotated[int, U8]
    control: Annotated[int, U8]


@be_struct(size=10)
@dataclass(frozen=True)
class UnmapCdb(WireStruct):
    """UNMAP (SBC-3 §5.28)."""

    opcode: Annotated[int, U8]
    flags: Annotated[int, U8]  # ANCHOR
    reserved: Annotated[int, U32]
    group: Annotated[int, U8]
    parameter_list_length: Annotated[int, U16]
    control: Annotated[int, U8]


@be_struct(size=12)
@dataclass(frozen=True)
class ReportLunsCdb(WireStruct):
    """REPORT LUNS (SPC-4 §6.33)."""

    opcode: Annotated[int, U8]
    reserved1: Annotated[int, U8]
    select_report: Annotated[int, U8]
    reserved2: Annotated[bytes, Bytes(3)]
    allocation_length: Annotated[int, U32]
    reserved3: Annotated[int, U8]
    control: Annotated[int, U8]
