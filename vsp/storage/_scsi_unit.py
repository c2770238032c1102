"""What every logical unit shares: decoding a CDB against its layout, the
pending unit attention, the initiator's data buffer, the CHECK CONDITION
path, and the commands any LU answers (REQUEST SENSE, REPORT LUNS).

Private to vsp.storage.scsi, which documents the behaviour.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

from vmbus.protocols.storage import scsi_data as d
from vmbus.protocols.storage import scsi_wire as w
from vmbus.protocols.storage.scsi_wire import DataDirection, Opcode, Sense
from vmbus.wire import WireStruct
from vsp.storage.changes import changed

__all__ = [
    "GOOD_RESULT",
    "Buffer",
    "Check",
    "LogicalUnit",
    "ScsiResult",
    "backend_errors",
    "invalid_if",
]


@dataclass(frozen=True)
class ScsiResult:
    """A completed command: SAM status, sense data when CHECK CONDITION
    (18 bytes, fixed format) and the bytes actually moved."""

    status: int
    sense: bytes = b""
    transferred: int = 0


GOOD_RESULT = ScsiResult(w.GOOD)


class Check(Exception):  # noqa: N818 - control flow that never leaves execute()
    """Ends the command with CHECK CONDITION and this sense."""

    def __init__(self, sense: Sense) -> None:
        self.sense = sense


def invalid_if(condition: object) -> None:
    if condition:
        raise Check(w.INVALID_FIELD_IN_CDB)


@contextmanager
def backend_errors(sense: Sense) -> Iterator[None]:
    """A backend OSError fails this command only, with `sense`."""
    try:
        yield
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise Check(w.SPACE_ALLOCATION_FAILED_WRITE_PROTECT) from None
        raise Check(sense) from None


class Buffer:
    """The initiator's data buffer: scatter segments and declared direction."""

    def __init__(self, data: Sequence[memoryview], direction: int) -> None:
        self.segments = [v for v in (memoryview(s).cast("B") for s in data) if len(v)]
        self.size = sum(len(v) for v in self.segments)
        self.direction = direction
        self.writable = not any(v.readonly for v in self.segments)

    def expect(self, direction: DataDirection, nbytes: int) -> None:
        """Allow a data phase of `nbytes`: all or nothing (see vsp.storage.scsi)."""
        if nbytes and (
            direction != self.direction
            or nbytes > self.size
            or (direction == DataDirection.IN and not self.writable)
        ):
            raise Check(w.INVALID_FIELD_IN_CDB)

    def first(self, nbytes: int) -> list[memoryview]:
        """Views of the first `nbytes` of the buffer, across segments."""
        views = []
        for segment in self.segments:
            if nbytes <= 0:
                break
            views.append(segment[:nbytes])
            nbytes -= len(views[-1])
        return views

    def gather(self, nbytes: int) -> bytes:
        self.expect(DataDirection.OUT, nbytes)
        return b"".join(self.first(nbytes))

    def fill(self, payload: bytes, allocation_length: int) -> ScsiResult:
        """Return parameter data, cut to the allocation length and buffer."""
        nbytes = min(len(payload), allocation_length, self.size)
        self.expect(DataDirection.IN, nbytes)
        position = 0
        for view in self.first(nbytes):
            view[:] = payload[position : position + len(view)]
            position += len(view)
        return ScsiResult(w.GOOD, b"", nbytes)


_Handler = Callable[[Any, Any, Buffer], ScsiResult]
# SPC-4 §5.14: these run and keep a pending unit attention (REQUEST SENSE
# returns it as its data).
_UNIT_ATTENTION_EXEMPT = (Opcode.INQUIRY, Opcode.REPORT_LUNS, Opcode.REQUEST_SENSE)


class LogicalUnit:
    """Decoding, unit attention and the commands every logical unit has."""

    COMMANDS: ClassVar[Mapping[Opcode, tuple[type[WireStruct], _Handler]]]
    UNSUPPORTED: ClassVar[Sense] = w.INVALID_COMMAND_OPERATION_CODE
    IDLE_SENSE: ClassVar[Sense] = w.NO_SENSE

    def __init__(self) -> None:
        self.unit_attention: Sense | None = None
        self.check_conditions = 0
        # Several threads run commands on one unit (a controller's channels
        # on threads of their own, the I/O pool): the unit attention is
        # taken by exactly one command, and no CHECK CONDITION goes uncounted.
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]  # a lock does not pickle: the worker's copy makes its own
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def raise_unit_attention(self, sense: Sense) -> None:
        """The next command that is not exempt reports `sense` (once)."""
        with self._lock:
            self.unit_attention = sense
        changed()  # the compiled path stops serving this disk

    def take_unit_attention(self) -> Sense | None:
        """The pending unit attention, cleared; None if there is none."""
        if self.unit_attention is None:  # the steady state: no lock
            return None
        with self._lock:
            sense, self.unit_attention = self.unit_attention, None
        changed()  # the compiled path may serve this disk again
        return sense

    def execute(
        self,
        cdb: bytes,
        data: Sequence[memoryview] = (),
        direction: int = DataDirection.NONE,
    ) -> ScsiResult:
        """Run one command; `data` is the guest's buffer as scatter segments."""
        cdb = bytes(cdb)
        code = w.opcode(cdb[0]) if cdb else -1
        try:
            if code not in _UNIT_ATTENTION_EXEMPT:
                sense = self.take_unit_attention()
                if sense is not None:
                    raise Check(sense)
            if not isinstance(code, Opcode) or code not in self.COMMANDS:
                raise Check(self.UNSUPPORTED)
            layout, handler = self.COMMANDS[code]
            invalid_if(len(cdb) < layout.SIZE)
            invalid_if(cdb[layout.SIZE - 1] & (w.CONTROL_NACA | w.CONTROL_LINK))
            return handler(self, layout.unpack_from(cdb), Buffer(data, direction))
        except Check as check:
            with self._lock:
                self.check_conditions += 1
            return ScsiResult(w.CHECK_CONDITION, check.sense.fixed())

    def lun_list(self) -> list[int]:
        return [0]

    def _good(self, cdb: object, buf: Buffer) -> ScsiResult:
        return GOOD_RESULT

    def _request_sense(self, cdb: w.RequestSenseCdb, buf: Buffer) -> ScsiResult:
        invalid_if(cdb.flags & w.REQUEST_SENSE_DESC)  # descriptor format unsupported
        sense = self.take_unit_attention() or self.IDLE_SENSE
        return buf.fill(sense.fixed(), cdb.allocation_length)

    def _report_luns(self, cdb: w.ReportLunsCdb, buf: Buffer) -> ScsiResult:
        selects = (w.SELECT_ALL_LUNS, w.SELECT_WELL_KNOWN, w.SELECT_ALL_BUT_WELL_KNOWN)
        invalid_if(cdb.select_report not in selects or cdb.allocation_length < 16)
        luns = [] if cdb.select_report == w.SELECT_WELL_KNOWN else self.lun_list()
        entries = b"".join(
            d.LunEntry(lun if lun < 256 else d.FLAT_SPACE_ADDRESSING | lun).pack() for lun in luns
        )
        payload = d.ReportLunsHeader(len(entries)).pack() + entries
        return buf.fill(payload, cdb.allocation_length)
