"""Wire structs declared once, as field tables.

A wire struct is a frozen dataclass whose fields are annotated with their
wire format; `@wire_struct(size=N)` derives the packing, checks at import
that the layout is exactly N bytes, and adds `pack`, `pack_into`, `unpack`
and `unpack_from`. All integers are little-endian and structs are packed.

    @wire_struct(size=12)
    @dataclass(frozen=True)
    class Rescind(WireStruct):
        '''struct vmbus_channel_rescind_offer { header; u32 child_relid; }'''
        msgtype: Annotated[int, U32]
        padding: Annotated[int, U32] = 0
        child_relid: Annotated[int, U32] = 0
"""

from __future__ import annotations

import dataclasses
import operator
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar, TypeVar, get_type_hints

from vmbus.errors import PeerError


class WireError(PeerError, ValueError):
    """Bytes that cannot be decoded as the struct asked for (too short), or a
    value that cannot be encoded (out of range for its field)."""


@dataclass(frozen=True)
class Fmt:
    """How one field sits on the wire: a `struct` code plus conversions."""

    code: str
    to_wire: Callable[[Any], Any] | None = None
    from_wire: Callable[[Any], Any] | None = None


U8 = Fmt("B")
U16 = Fmt("H")
U32 = Fmt("I")
U64 = Fmt("Q")
I32 = Fmt("i")
# GUIDs in Windows order: u32, u16, u16 little-endian, then 8 bytes (§4).
GUID = Fmt("16s", lambda u: u.bytes_le, lambda b: uuid.UUID(bytes_le=b))


def Bytes(n: int) -> Fmt:  # noqa: N802 - reads as a type in annotations
    """A fixed-size byte field; shorter values are zero-padded."""
    return Fmt(f"{n}s")


T = TypeVar("T", bound="WireStruct")
E = TypeVar("E", bound=IntEnum)


def open_enum(enum: type[E], value: int) -> E | int:
    """Open enums for values read off the wire: the member for a known
    value, the plain int for an unknown one (which the protocol then
    answers as unrecognized)."""
    try:
        return enum(value)
    except ValueError:
        return value


class WireStruct:
    """Base of all wire structs; see the module doc."""

    SIZE: ClassVar[int]
    _struct: ClassVar[struct.Struct]
    _fmts: ClassVar[tuple[Fmt, ...]]
    _values: ClassVar[Callable[[Any], tuple[Any, ...]]]  # the fields, in wire order
    _to_wire: ClassVar[tuple[tuple[int, Callable[[Any], Any]], ...]]  # (index, conversion)
    _from_wire: ClassVar[tuple[tuple[int, Callable[[Any], Any]], ...]]

    def pack(self) -> bytes:
        try:
            return self._struct.pack(*self._wire_values())
        except struct.error as error:
            raise WireError(f"{type(self).__name__}: {error}") from None

    def pack_into(self, buffer: Any, offset: int = 0) -> None:
        try:
            self._struct.pack_into(buffer, offset, *self._wire_values())
        except struct.error as error:
            raise WireError(f"{type(self).__name__}: {error}") from None

    def _wire_values(self) -> tuple[Any, ...] | list[Any]:
        values = type(self)._values(self)
        if not self._to_wire:
            return values
        converted = list(values)
        for index, convert in self._to_wire:
            converted[index] = convert(converted[index])
        return converted

    @classmethod
    def unpack_from(cls: type[T], buffer: Any, offset: int = 0) -> T:
        """Decode SIZE bytes at `offset`; bytes after them are ignored."""
        try:
            if offset < 0:
                raise struct.error("negative offset")
            raw = cls._struct.unpack_from(buffer, offset)
        except struct.error:
            available = max(memoryview(buffer).nbytes - max(offset, 0), 0)
            raise WireError(f"{cls.__name__} needs {cls.SIZE} bytes, got {available}") from None
        if cls._from_wire:
            values = list(raw)
            for index, convert in cls._from_wire:
                values[index] = convert(values[index])
            return cls(*values)
        return cls(*raw)

    @classmethod
    def unpack(cls: type[T], buffer: Any) -> T:
        return cls.unpack_from(buffer, 0)


def wire_struct(size: int) -> Callable[[type[T]], type[T]]:
    """Derive the packing of a dataclass from its annotations; check `size`."""

    def apply(cls: type[T]) -> type[T]:
        hints = get_type_hints(cls, include_extras=True)
        fmts = []
        for field in dataclasses.fields(cls):  # type: ignore[arg-type]
            meta = [m for m in getattr(hints[field.name], "__metadata__", ()) if isinstance(m, Fmt)]
            if len(meta) != 1:
                raise TypeError(f"{cls.__name__}.{field.name} needs one wire format")
            fmts.append(meta[0])
        packer = struct.Struct("<" + "".join(f.code for f in fmts))
        if packer.size != size:
            raise TypeError(f"{cls.__name__} is {packer.size} bytes on the wire, declared {size}")
        names = [field.name for field in dataclasses.fields(cls)]  # type: ignore[arg-type]
        getter = operator.attrgetter(*names)
        cls._struct = packer
        cls._fmts = tuple(fmts)
        # staticmethod: a plain function as a class attribute would bind to instances
        cls._values = staticmethod((lambda obj: (getter(obj),)) if len(names) == 1 else getter)
        cls._to_wire = tuple((i, f.to_wire) for i, f in enumerate(fmts) if f.to_wire)
        cls._from_wire = tuple((i, f.from_wire) for i, f in enumerate(fmts) if f.from_wire)
        cls.SIZE = size
        return cls

    return apply
