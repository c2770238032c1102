"""Type stub of storvsc's compiled steady state; _fast.pyx documents each call."""

from collections.abc import Callable, Iterator
from typing import Any, Self

from vmbus._cring import RingReader, RingWriter
from vmbus.protocols.storage.vsc import SrbCompletion

def build_srb(
    cdb: bytes | bytearray | memoryview,
    lun: int,
    direction: int,
    transfer_length: int,
    sense_info_length: int | None = None,
    *,
    target_id: int = 0,
    path_id: int = 0,
    port_number: int = 0,
    srb_flags: int | None = None,
    time_out_value: int = 60,
    version: int = 0x0602,
) -> bytes: ...
def build_rw16(
    lun: int,
    write: bool,
    fua: bool,
    lba: int,
    blocks: int,
    transfer_length: int,
    version: int = 0x0602,
) -> bytes: ...
def gpa_header(gpa: int, length: int) -> bytes: ...
def completed(payload: Any) -> int: ...
def parse_completion(payload: Any) -> SrbCompletion: ...
def guest_span(obj: Any, base: int, size: int, writable: bool) -> tuple[int, int]: ...
def address_of(obj: Any) -> int: ...
def rw_command(
    obj: Any,
    write: bool,
    fua: bool,
    offset: int,
    lun: int,
    block_size: int,
    capacity: int,
    max_io: int,
    version: int,
    base: int,
    size: int,
    index: int,
) -> tuple[bytes, int, int, memoryview, bool, int] | None: ...
def copy(dst: Any, src: Any, n: int) -> None: ...
def reap(
    reader: RingReader,
    flight: dict[int, Any],
    free: list[Any],
    failures: list[tuple[int, Any]],
    finish: Callable[[Any, Any, bytes], Any],
) -> int: ...

class GuestBuffer:
    pfns: tuple[int, ...]
    gpa: int
    nbytes: int
    def __init__(
        self, memory_view: memoryview, pfns: Any, gpa: int, nbytes: int, on_free: Any
    ) -> None: ...
    def __buffer__(self, flags: int) -> memoryview: ...
    def __len__(self) -> int: ...
    @property
    def released(self) -> bool: ...
    def __getitem__(self, index: Any) -> Any: ...
    def __setitem__(self, index: Any, value: Any) -> None: ...
    def release(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> None: ...

def submit(
    writer: RingWriter,
    pending: Iterator[Any],
    stalled: Any,
    flight: dict[int, Any],
    free: list[Any],
    spare: int,
    ids: Iterator[int],
) -> tuple[Any, bool, int]: ...
