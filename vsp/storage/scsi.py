"""The enlightened-SCSI disk target: a CDB and the guest's data buffer in,
SAM status, sense data and the bytes moved out. It does the I/O, through
its `BlockBackend`; only the VSP side executes CDBs, so it lives here.

`ScsiDisk.execute(cdb, data, direction)` runs one command against a
`BlockBackend`; `ScsiTarget` holds disks by LUN, answers REPORT LUNS for all
of them and commands to LUNs without a disk. Nothing here knows rings,
GPADLs or threads: the storage VSP maps the guest pages of a request to
memoryviews and passes them as `data`, and the file backend moves bytes
straight between those views and the image file.

Choices where SPC-4/SBC-3 leave room:

- Nothing raises for any CDB or buffer: a bad request completes with CHECK
  CONDITION and 18 bytes of fixed-format sense (current error, INFORMATION
  and the sense-key-specific field not used), and `check_conditions` counts
  it.
- A CDB shorter than its opcode's layout, or with NACA or LINK set in the
  CONTROL byte, is INVALID FIELD IN CDB; bytes past the layout (storvsc's
  16-byte cdb field) are ignored. Reserved fields are not checked.
- The target writes only into a buffer declared IN and reads only from one
  declared OUT; an unknown direction allows no data phase.
- READ/WRITE-type transfers are all or nothing: a buffer shorter than the
  transfer, a data phase against the declared direction, or a transfer over
  the disk's max_transfer_bytes is INVALID FIELD IN CDB and moves nothing; a longer
  buffer leaves a residual. Commands with an ALLOCATION LENGTH return as much
  as fits in both it and the buffer (SPC-4 §4.2.5.6).
- Checks run in this order: unit attention, opcode, CDB fields, caps, data
  buffer, LBA range, write protection, then the backend.
- A backend OSError fails that one command: MEDIUM ERROR (UNRECOVERED READ
  ERROR for reads, WRITE ERROR for writes, flushes and discards), except
  ENOSPC/EDQUOT, which is DATA PROTECT / SPACE ALLOCATION FAILED WRITE
  PROTECT as for a full thin-provisioned LU (SBC-3 §4.7.3.6).
- FUA writes are followed by `backend.flush()` (the backend has one cache,
  so this is how it learns of FUA); FUA on reads needs nothing.
- VERIFY supports BYTCHK=0 only. WRITE SAME needs a non-zero length (WSNZ=1
  in VPD 0xB0); NDOB (WRITE SAME 16) writes zeros. Discarded blocks read as
  zeros, so LBPRZ is set, and an all-zero WRITE SAME with UNMAP discards.
- Logical block provisioning (LBPME, UNMAP, WRITE SAME with UNMAP) is
  offered on every writable backend; a read-only one reports WP in MODE
  SENSE and DATA PROTECT for writes. No reset or power-on unit attention.
- REPORT LUNS is a target command: `ScsiTarget` answers it with its LUNs;
  a `ScsiDisk` used alone reports itself as LUN 0.
"""

from __future__ import annotations

import uuid
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from vmbus.errors import UsageError
from vmbus.protocols.storage import scsi_data as d
from vmbus.protocols.storage import scsi_wire as w
from vmbus.protocols.storage.scsi_wire import DataDirection, Opcode
from vsp.storage._scsi_unit import (
    GOOD_RESULT,
    Buffer,
    Check,
    LogicalUnit,
    ScsiResult,
    backend_errors,
    invalid_if,
)
from vsp.storage.backends import BlockBackend
from vsp.storage.changes import changed
from vsp.storage.pages import DiskIdentity, Limits, block_descriptor, mode_pages

__all__ = [
    "LIMITS",
    "MAX_TRANSFER_BYTES",
    "MAX_UNMAP_BYTES",
    "MAX_UNMAP_DESCRIPTORS",
    "MAX_WRITE_SAME_BYTES",
    "DataDirection",
    "DiskIdentity",
    "Limits",
    "ScsiDisk",
    "ScsiResult",
    "ScsiTarget",
]

# One command moves at most this much by default: bounds the memory and time
# of one request (storvsc splits larger I/O; reported in VPD 0xB0). StorVsp
# gives its disks its own max_transfer_bytes, so VPD 0xB0 says what VSTOR allows.
MAX_TRANSFER_BYTES = 1 << 20
# Replicating a WRITE SAME block costs O(length): bound one command's work.
MAX_WRITE_SAME_BYTES = 256 << 20
# Punching holes is cheap, but a backend's write-zeros fallback is O(length).
MAX_UNMAP_BYTES = 1 << 30
# Descriptors in one UNMAP parameter list: all are validated before any runs.
MAX_UNMAP_DESCRIPTORS = 256
LIMITS = Limits(MAX_TRANSFER_BYTES, MAX_WRITE_SAME_BYTES, MAX_UNMAP_BYTES, MAX_UNMAP_DESCRIPTORS)


class ScsiDisk(LogicalUnit):
    """A direct-access block device (SBC-3) over a BlockBackend.

    Pass a stable `serial` so the guest's /dev/disk/by-id names survive
    restarts; `device_id` (60 bits) becomes the NAA designator in VPD 0x83
    and defaults to a hash of the serial. `limits` are advertised in VPD
    0xB0 and enforced, the same numbers.
    """

    def __init__(
        self,
        backend: BlockBackend,
        *,
        vendor: str = "VMBUSPY",
        product: str = "VirtualDisk",
        revision: str = "0001",
        serial: str | None = None,
        device_id: int | None = None,
        limits: Limits = LIMITS,
    ) -> None:
        super().__init__()
        if limits.max_transfer_bytes < backend.block_size:
            raise UsageError(f"max_transfer_bytes {limits.max_transfer_bytes} is under a block")
        self.backend = backend
        self.limits = limits
        serial = serial if serial is not None else uuid.uuid4().hex
        self.identity = DiskIdentity(serial, vendor, product, revision, device_id)
        self._inquiry_data = self.identity.standard_inquiry()

    def notify_capacity_changed(self) -> None:
        """The backend was resized: report it once, on the next command."""
        self.raise_unit_attention(w.CAPACITY_DATA_HAS_CHANGED)

    @property
    def thin(self) -> bool:
        """Logical block provisioning (UNMAP, WRITE SAME with UNMAP) on?"""
        return not self.backend.read_only

    # --- checks shared by the block commands ---

    def _check_range(self, lba: int, blocks: int) -> None:
        if lba + blocks > self.backend.block_count:
            raise Check(w.LBA_OUT_OF_RANGE)

    def _check_writable(self) -> None:
        if self.backend.read_only:
            raise Check(w.WRITE_PROTECTED)

    def _transfer(
        self, buf: Buffer, direction: DataDirection, lba: int, blocks: int, flags: int
    ) -> tuple[int, int]:
        """Validate a READ/WRITE; return its byte offset and length."""
        invalid_if(flags & w.PROTECT_MASK)  # no protection information
        block_size = self.backend.block_size
        invalid_if(blocks * block_size > self.limits.max_transfer_bytes)
        buf.expect(direction, blocks * block_size)
        self._check_range(lba, blocks)
        if direction == DataDirection.OUT:
            self._check_writable()
        return lba * block_size, blocks * block_size

    # --- READ, WRITE, VERIFY, SYNCHRONIZE CACHE ---

    def _read_blocks(self, buf: Buffer, lba: int, blocks: int, flags: int) -> ScsiResult:
        offset, nbytes = self._transfer(buf, DataDirection.IN, lba, blocks, flags)
        if nbytes:
            with backend_errors(w.UNRECOVERED_READ_ERROR):
                self.backend.readv(offset, buf.first(nbytes))
        return ScsiResult(w.GOOD, b"", nbytes)

    def _write_blocks(self, buf: Buffer, lba: int, blocks: int, flags: int) -> ScsiResult:
        offset, nbytes = self._transfer(buf, DataDirection.OUT, lba, blocks, flags)
        if nbytes:
            with backend_errors(w.WRITE_ERROR):
                self.backend.writev(offset, buf.first(nbytes))
                if flags & w.FUA:
                    self.backend.flush()
        return ScsiResult(w.GOOD, b"", nbytes)

    def _read6(self, cdb: w.Rw6Cdb, buf: Buffer) -> ScsiResult:
        lba = (cdb.lba_high & 0x1F) << 16 | cdb.lba_low
        return self._read_blocks(buf, lba, cdb.transfer_length or 256, 0)

    def _write6(self, cdb: w.Rw6Cdb, buf: Buffer) -> ScsiResult:
        lba = (cdb.lba_high & 0x1F) << 16 | cdb.lba_low
        return self._write_blocks(buf, lba, cdb.transfer_length or 256, 0)

    def _read(self, cdb: w.Rw10Cdb | w.Rw12Cdb | w.Rw16Cdb, buf: Buffer) -> ScsiResult:
        return self._read_blocks(buf, cdb.lba, cdb.transfer_length, cdb.flags)

    def _write(self, cdb: w.Rw10Cdb | w.Rw12Cdb | w.Rw16Cdb, buf: Buffer) -> ScsiResult:
        return self._write_blocks(buf, cdb.lba, cdb.transfer_length, cdb.flags)

    def _verify(self, cdb: w.Rw10Cdb | w.Rw16Cdb, buf: Buffer) -> ScsiResult:
        invalid_if(cdb.flags & (w.PROTECT_MASK | w.BYTCHK_MASK))
        self._check_range(cdb.lba, cdb.transfer_length)
        return GOOD_RESULT

    def _synchronize_cache(self, cdb: w.Rw10Cdb | w.Rw16Cdb, buf: Buffer) -> ScsiResult:
        self._check_range(cdb.lba, cdb.transfer_length)  # zero blocks: to the end
        with backend_errors(w.WRITE_ERROR):
            self.backend.flush()
        return GOOD_RESULT

    # --- UNMAP, WRITE SAME ---

    def _unmap(self, cdb: w.UnmapCdb, buf: Buffer) -> ScsiResult:
        invalid_if(cdb.flags & w.UNMAP_ANCHOR)  # ANC_SUP is 0
        length = cdb.parameter_list_length
        if length == 0:  # SBC-3: not an error, nothing to do
            return GOOD_RESULT
        if length < d.UnmapHeader.SIZE:
            raise Check(w.PARAMETER_LIST_LENGTH_ERROR)
        params = buf.gather(length)
        header = d.UnmapHeader.unpack(params)
        if d.UnmapHeader.SIZE + header.descriptor_length > length:
            raise Check(w.INVALID_FIELD_IN_PARAMETER_LIST)
        count = header.descriptor_length // d.UnmapDescriptor.SIZE  # a partial one is ignored
        if count > self.limits.max_unmap_descriptors:
            raise Check(w.INVALID_FIELD_IN_PARAMETER_LIST)
        ranges = [
            d.UnmapDescriptor.unpack_from(params, d.UnmapHeader.SIZE + i * d.UnmapDescriptor.SIZE)
            for i in range(count)
        ]
        block_size = self.backend.block_size
        if sum(r.blocks for r in ranges) * block_size > self.limits.max_unmap_bytes:
            raise Check(w.INVALID_FIELD_IN_PARAMETER_LIST)
        for r in ranges:  # all are checked before any is applied
            self._check_range(r.lba, r.blocks)
        self._check_writable()
        with backend_errors(w.WRITE_ERROR):
            for r in ranges:
                if r.blocks:
                    self.backend.discard(r.lba * block_size, r.blocks * block_size)
        return ScsiResult(w.GOOD, b"", length)

    def _write_same(self, cdb: w.Rw10Cdb | w.Rw16Cdb, buf: Buffer) -> ScsiResult:
        block_size, blocks = self.backend.block_size, cdb.transfer_length
        invalid_if(cdb.flags & (w.PROTECT_MASK | w.WS_ANCHOR | w.WS_LBDATA_PBDATA))
        invalid_if(blocks == 0 or blocks * block_size > self.limits.max_write_same_bytes)
        no_data = cdb.opcode == Opcode.WRITE_SAME_16 and cdb.flags & w.WS_NDOB
        consumed = 0 if no_data else block_size
        buf.expect(DataDirection.OUT, consumed)
        self._check_range(cdb.lba, blocks)
        self._check_writable()
        block = buf.gather(consumed) if consumed else bytes(block_size)
        offset, length = cdb.lba * block_size, blocks * block_size
        with backend_errors(w.WRITE_ERROR):
            if block.count(0) != block_size:
                self._replicate(memoryview(block), offset, blocks)
            elif cdb.flags & w.WS_UNMAP:  # zeros are what unmapped blocks read
                self.backend.discard(offset, length)
            else:
                self.backend.write_zeroes(offset, length)
        return ScsiResult(w.GOOD, b"", consumed)

    def _replicate(self, block: memoryview, offset: int, blocks: int) -> None:
        per_call = max(1, self.limits.max_transfer_bytes // len(block))
        for done in range(0, blocks, per_call):
            count = min(per_call, blocks - done)
            self.backend.writev(offset + done * len(block), [block] * count)

    # --- READ CAPACITY, INQUIRY, MODE SENSE ---

    def _last_lba(self) -> int:
        return max(self.backend.block_count - 1, 0)

    def _read_capacity10(self, cdb: w.ReadCapacity10Cdb, buf: Buffer) -> ScsiResult:
        invalid_if(cdb.lba and not cdb.pmi & w.READ_CAPACITY_PMI)
        last = min(self._last_lba(), 0xFFFFFFFF)  # saturated: "use READ CAPACITY (16)"
        payload = d.ReadCapacity10Data(last, self.backend.block_size).pack()
        return buf.fill(payload, len(payload))

    def _service_action_in(self, cdb: w.ServiceActionIn16Cdb, buf: Buffer) -> ScsiResult:
        invalid_if(cdb.service_action & 0x1F != w.SA_READ_CAPACITY_16)
        invalid_if(cdb.lba and not cdb.pmi & w.READ_CAPACITY_PMI)
        payload = d.ReadCapacity16Data(
            last_lba=self._last_lba(),
            block_size=self.backend.block_size,
            provisioning=d.RC16_LBPME | d.RC16_LBPRZ if self.thin else 0,
        ).pack()
        return buf.fill(payload, cdb.allocation_length)

    def _inquiry(self, cdb: w.InquiryCdb, buf: Buffer) -> ScsiResult:
        invalid_if(cdb.flags & w.INQUIRY_CMDDT)
        if not cdb.flags & w.INQUIRY_EVPD:
            invalid_if(cdb.page_code)
            return buf.fill(self._inquiry_data, cdb.allocation_length)
        page = self.identity.vpd_page(
            cdb.page_code, self.backend.block_size, self.thin, self.limits
        )
        if page is None:
            raise Check(w.INVALID_FIELD_IN_CDB)
        return buf.fill(page, cdb.allocation_length)

    def _mode_sense6(self, cdb: w.ModeSense6Cdb, buf: Buffer) -> ScsiResult:
        descriptor, pages = self._mode_data(cdb.page, cdb.subpage, cdb.flags)
        header = d.ModeHeader6(
            3 + len(descriptor) + len(pages), 0, self._device_specific(), len(descriptor)
        )
        return buf.fill(header.pack() + descriptor + pages, cdb.allocation_length)

    def _mode_sense10(self, cdb: w.ModeSense10Cdb, buf: Buffer) -> ScsiResult:
        descriptor, pages = self._mode_data(cdb.page, cdb.subpage, cdb.flags)
        header = d.ModeHeader10(
            6 + len(descriptor) + len(pages), 0, self._device_specific(), 0, 0, len(descriptor)
        )
        return buf.fill(header.pack() + descriptor + pages, cdb.allocation_length)

    def _device_specific(self) -> int:
        return d.MODE_DPOFUA | (d.MODE_WP if self.backend.read_only else 0)

    def _mode_data(self, page: int, subpage: int, flags: int) -> tuple[bytes, bytes]:
        """The block descriptor (unless DBD) and the selected mode pages."""
        control, code = page >> 6, page & 0x3F
        if control == w.PC_SAVED:
            raise Check(w.SAVING_PARAMETERS_NOT_SUPPORTED)
        invalid_if(subpage and (code, subpage) != (w.MODE_PAGE_ALL, w.MODE_SUBPAGE_ALL))
        pages = mode_pages()
        invalid_if(code != w.MODE_PAGE_ALL and code not in pages)
        selected = [p for c, p in pages.items() if code in (c, w.MODE_PAGE_ALL)]
        descriptor = b""
        if not flags & w.MODE_SENSE_DBD:
            descriptor = block_descriptor(self.backend.block_count, self.backend.block_size)
        if control == w.PC_CHANGEABLE:  # nothing is changeable: all-zero masks
            descriptor = bytes(len(descriptor))
            selected = [p[:2] + bytes(len(p) - 2) for p in selected]
        return descriptor, b"".join(selected)

    COMMANDS = {
        Opcode.TEST_UNIT_READY: (w.Cdb6, LogicalUnit._good),
        Opcode.START_STOP_UNIT: (w.Cdb6, LogicalUnit._good),
        Opcode.REQUEST_SENSE: (w.RequestSenseCdb, LogicalUnit._request_sense),
        Opcode.REPORT_LUNS: (w.ReportLunsCdb, LogicalUnit._report_luns),
        Opcode.INQUIRY: (w.InquiryCdb, _inquiry),
        Opcode.MODE_SENSE_6: (w.ModeSense6Cdb, _mode_sense6),
        Opcode.MODE_SENSE_10: (w.ModeSense10Cdb, _mode_sense10),
        Opcode.READ_CAPACITY_10: (w.ReadCapacity10Cdb, _read_capacity10),
        Opcode.SERVICE_ACTION_IN_16: (w.ServiceActionIn16Cdb, _service_action_in),
        Opcode.READ_6: (w.Rw6Cdb, _read6),
        Opcode.READ_10: (w.Rw10Cdb, _read),
        Opcode.READ_12: (w.Rw12Cdb, _read),
        Opcode.READ_16: (w.Rw16Cdb, _read),
        Opcode.WRITE_6: (w.Rw6Cdb, _write6),
        Opcode.WRITE_10: (w.Rw10Cdb, _write),
        Opcode.WRITE_12: (w.Rw12Cdb, _write),
        Opcode.WRITE_16: (w.Rw16Cdb, _write),
        Opcode.VERIFY_10: (w.Rw10Cdb, _verify),
        Opcode.VERIFY_16: (w.Rw16Cdb, _verify),
        Opcode.SYNCHRONIZE_CACHE_10: (w.Rw10Cdb, _synchronize_cache),
        Opcode.SYNCHRONIZE_CACHE_16: (w.Rw16Cdb, _synchronize_cache),
        Opcode.UNMAP: (w.UnmapCdb, _unmap),
        Opcode.WRITE_SAME_10: (w.Rw10Cdb, _write_same),
        Opcode.WRITE_SAME_16: (w.Rw16Cdb, _write_same),
    }


class _TargetUnit(LogicalUnit):
    """The target answering for itself (SPC-4 §4.6.4): REPORT LUNS on any
    LUN, and INQUIRY / REQUEST SENSE on a LUN without a disk; any other
    command there is LOGICAL UNIT NOT SUPPORTED."""

    UNSUPPORTED = w.LOGICAL_UNIT_NOT_SUPPORTED
    IDLE_SENSE = w.LOGICAL_UNIT_NOT_SUPPORTED
    # Peripheral qualifier 011b, type 1Fh: no logical unit here.
    NO_UNIT = d.StandardInquiry(
        peripheral=0x7F, flags7=0, vendor=b" " * 8, product=b" " * 16, revision=b" " * 4
    ).pack()

    def __init__(self, target: ScsiTarget) -> None:
        super().__init__()
        # Weak: the target owns this unit, and a cycle would keep a dropped
        # target's disks (their open files) until the collector ran.
        self._target = weakref.ref(target)

    # The target crosses to the worker with its unit (pickle's memo keeps
    # the one object); the worker's copy holds it weakly again.
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_target"] = self._target()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        target = state.pop("_target")
        super().__setstate__(state)
        self._target = weakref.ref(target)

    def lun_list(self) -> list[int]:
        target = self._target()
        return [] if target is None else sorted(target.disks)

    def _inquiry(self, cdb: w.InquiryCdb, buf: Buffer) -> ScsiResult:
        if cdb.flags & w.INQUIRY_EVPD:
            raise Check(w.LOGICAL_UNIT_NOT_SUPPORTED)
        invalid_if(cdb.flags & w.INQUIRY_CMDDT or cdb.page_code)
        return buf.fill(self.NO_UNIT, cdb.allocation_length)

    COMMANDS = {
        Opcode.INQUIRY: (w.InquiryCdb, _inquiry),
        Opcode.REQUEST_SENSE: (w.RequestSenseCdb, LogicalUnit._request_sense),
        Opcode.REPORT_LUNS: (w.ReportLunsCdb, LogicalUnit._report_luns),
    }


_REPORT_LUNS = bytes((Opcode.REPORT_LUNS,))


class _Disks(dict[int, "ScsiDisk"]):
    """A target's disks by LUN: a dict that says when it changes (the
    compiled path reads it afresh then; vsp.storage.changes)."""

    def __setitem__(self, lun: int, disk: ScsiDisk) -> None:
        changed()
        super().__setitem__(lun, disk)

    def __delitem__(self, lun: int) -> None:
        changed()
        super().__delitem__(lun)

    def pop(self, *args: Any) -> Any:
        changed()
        return super().pop(*args)

    def popitem(self) -> tuple[int, ScsiDisk]:
        changed()
        return super().popitem()

    def clear(self) -> None:
        changed()
        super().clear()

    def update(self, *args: Any, **kwargs: Any) -> None:
        changed()
        super().update(*args, **kwargs)

    def setdefault(self, lun: int, disk: Any = None) -> Any:
        changed()
        return super().setdefault(lun, disk)

    def __ior__(self, other: Any) -> Any:  # type: ignore[misc]
        changed()
        return super().__ior__(other)


class ScsiTarget:
    """Disks by LUN (0..16383; single-level, flat addressing past 255).

    `disks` may change at run time; REPORT LUNS reads it on each call.
    """

    def __init__(self, disks: Mapping[int, ScsiDisk] | None = None) -> None:
        self.disks = dict(disks or {})
        for lun in self.disks:
            if not 0 <= lun <= d.MAX_FLAT_LUN:
                raise UsageError(f"LUN {lun} is outside 0..{d.MAX_FLAT_LUN}")
        self._unit = _TargetUnit(self)

    @property
    def disks(self) -> dict[int, ScsiDisk]:
        return self._disks

    @disks.setter
    def disks(self, disks: Mapping[int, ScsiDisk]) -> None:
        changed()
        self._disks: dict[int, ScsiDisk] = _Disks(disks)

    def execute(
        self,
        lun: int,
        cdb: bytes,
        data: Sequence[memoryview] = (),
        direction: int = DataDirection.NONE,
    ) -> ScsiResult:
        """Run one command on `lun`, as ScsiDisk.execute does. `cdb` is the
        request's private copy: it is decoded once, against its layout."""
        disk = self.disks.get(lun)
        if disk is None or cdb[:1] == _REPORT_LUNS:
            return self._unit.execute(cdb, data, direction)
        return disk.execute(cdb, data, direction)
