"""Synthetic video (synthvid): wire structs, the VSP state machine (sans-I/O)
and a VSC that follows Linux's sequence.

Source: PROTOCOL-FACTS §8 (drivers/video/fbdev/hyperv_fb.c,
drivers/gpu/drm/hyperv/hyperv_drm_proto.c). Every message is the pipe header
(declared once, in vmbus.protocols.input.hid), a synthvid header whose size counts
itself and the body, then the body. Both sides send inband without
completions. Pixels are 32 bpp XRGB8888, little-endian.

Choices where the sources leave room:
- Versions WIN10 (3.5) and WIN8 (3.2) are accepted; WIN7 (3.0) is refused:
  Linux removed it, and it means 16 bpp, which this VSP does not scan out.
  So depth 32 is the only depth a SITUATION_UPDATE may set.
- A VERSION_REQUEST starts over (a resuming guest renegotiates): VRAM
  location and mode are forgotten.
- A mode is checked against vram_size, so SITUATION_UPDATE may come before
  VRAM_LOCATION. An accepted mode is acknowledged (Linux ignores the ACK).
- VRAM_LOCATION without a GPA (host-chosen VRAM) is refused: there is none.
- DIRT with more than MAX_DIRT_RECTS rects dirties the whole screen.
- POINTER_SHAPE only as one complete ARGB part (as Linux sends it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Annotated

from vmbus.protocols.input.hid import PIPE_HEADER_SIZE, PIPE_MESSAGE_DATA, Buffer, PipeHeader
from vmbus.wire import I32, U8, U16, U32, U64, Bytes, WireError, WireStruct, open_enum, wire_struct


def synthvid_version(major: int, minor: int) -> int:
    """SYNTHVID_VERSION(major, minor): minor in the high half, unlike VMBus."""
    return (minor << 16) | major


def version_tuple(version: int) -> tuple[int, int]:
    """(major, minor), which orders versions."""
    return version & 0xFFFF, version >> 16


SYNTHVID_VERSION_WIN7 = synthvid_version(3, 0)
SYNTHVID_VERSION_WIN8 = synthvid_version(3, 2)
SYNTHVID_VERSION_WIN10 = synthvid_version(3, 5)  # adds RESOLUTION_REQUEST
VSP_VERSIONS = (SYNTHVID_VERSION_WIN10, SYNTHVID_VERSION_WIN8)
VSC_VERSIONS = VSP_VERSIONS  # newest first, as Linux tries them

# Formats and sizes (§8).
SYNTHVID_HEADER_SIZE = 8
DEPTH = 32  # bits per pixel, XRGB8888
BYTES_PER_PIXEL = DEPTH // 8
WIN8_MAX_SIZE = (1600, 1200)  # what a WIN8 guest assumes without a resolution list
EDID_BLOCK_SIZE = 128
MAX_RESOLUTION_COUNT = 64
CURSOR_MAX = 96  # pointer width and height
CURSOR_COMPLETE = 0xFF  # part_idx of a one-part shape (-1 as s8)
MAX_VIDEO_OUTPUTS = 1
STANDARD_RESOLUTIONS = (  # each fits 8 MiB, the WIN8 framebuffer size, at 32 bpp
    (1024, 768),
    (1152, 864),
    (1280, 720),
    (1280, 1024),
    (1600, 1200),
    (1920, 1080),
)

# Caps on what the guest controls.
MAX_HOST_PAYLOAD = 4096 - 16  # default max_pkt_size less the packet descriptor
MAX_DIRT_RECTS = 64  # past this a whole-screen update is cheaper than the list
PAGE_SIZE = 4096  # VRAM is mapped in pages


class MessageType(IntEnum):
    """enum synthvid_msg_type (§8). Open: unknown values stay ints."""

    ERROR = 0
    VERSION_REQUEST = 1
    VERSION_RESPONSE = 2
    VRAM_LOCATION = 3
    VRAM_LOCATION_ACK = 4
    SITUATION_UPDATE = 5
    SITUATION_UPDATE_ACK = 6
    POINTER_POSITION = 7
    POINTER_SHAPE = 8
    FEATURE_CHANGE = 9
    DIRT = 10
    RESOLUTION_REQUEST = 13
    RESOLUTION_RESPONSE = 14


def message_type(value: int) -> MessageType | int:
    """Open enum: the MessageType member for a known value, else the int."""
    return open_enum(MessageType, value)


@wire_struct(size=SYNTHVID_HEADER_SIZE)
@dataclass(frozen=True)
class SynthvidHeader(WireStruct):
    """struct synthvid_msg_hdr { u32 type; u32 size; /* header + body */ } __packed;"""

    type: Annotated[int, U32]
    size: Annotated[int, U32]


@wire_struct(size=4)
@dataclass(frozen=True)
class SynthvidVersionReq(WireStruct):
    """struct synthvid_version_req { u32 version; } __packed;"""

    version: Annotated[int, U32]


@wire_struct(size=6)
@dataclass(frozen=True)
class SynthvidVersionResp(WireStruct):
    """struct synthvid_version_resp { u32 version; u8 is_accepted; u8 max_video_outputs; }"""

    version: Annotated[int, U32]
    is_accepted: Annotated[int, U8]
    max_video_outputs: Annotated[int, U8] = MAX_VIDEO_OUTPUTS


@wire_struct(size=17)
@dataclass(frozen=True)
class SynthvidVramLocation(WireStruct):
    """struct synthvid_vram_location { u64 user_ctx; u8 is_vram_gpa_specified; u64 vram_gpa; }"""

    user_ctx: Annotated[int, U64]
    is_vram_gpa_specified: Annotated[int, U8]
    vram_gpa: Annotated[int, U64]


@wire_struct(size=8)
@dataclass(frozen=True)
class SynthvidAck(WireStruct):
    """struct synthvid_vram_location_ack and struct synthvid_situation_update_ack
    (identical): { u64 user_ctx; } __packed;"""

    user_ctx: Annotated[int, U64]


@wire_struct(size=9)
@dataclass(frozen=True)
class SynthvidSituationUpdate(WireStruct):
    """struct synthvid_situation_update { u64 user_ctx; u8 video_output_count;
    struct video_output_situation video_output[1]; } (without the outputs)"""

    user_ctx: Annotated[int, U64]
    video_output_count: Annotated[int, U8] = 1


@wire_struct(size=18)
@dataclass(frozen=True)
class VideoOutputSituation(WireStruct):
    """struct video_output_situation { u8 active; u32 vram_offset; u8 depth_bits;
    u32 width_pixels; u32 height_pixels; u32 pitch_bytes; } __packed;"""

    active: Annotated[int, U8]
    vram_offset: Annotated[int, U32]
    depth_bits: Annotated[int, U8]
    width_pixels: Annotated[int, U32]
    height_pixels: Annotated[int, U32]
    pitch_bytes: Annotated[int, U32]


@wire_struct(size=10)
@dataclass(frozen=True)
class SynthvidPointerPosition(WireStruct):
    """struct synthvid_pointer_position { u8 is_visible; u8 video_output; s32 image_x;
    s32 image_y; }"""

    is_visible: Annotated[int, U8]
    video_output: Annotated[int, U8]
    image_x: Annotated[int, I32]
    image_y: Annotated[int, I32]


@wire_struct(size=18)
@dataclass(frozen=True)
class SynthvidPointerShape(WireStruct):
    """struct synthvid_pointer_shape { u8 part_idx; u8 is_argb; u32 width; u32 height;
    u32 hot_x; u32 hot_y; u8 data[4]; } (without data: width*height*4 ARGB bytes follow)"""

    part_idx: Annotated[int, U8]
    is_argb: Annotated[int, U8]
    width: Annotated[int, U32]
    height: Annotated[int, U32]
    hot_x: Annotated[int, U32]
    hot_y: Annotated[int, U32]


@wire_struct(size=4)
@dataclass(frozen=True)
class SynthvidFeatureChange(WireStruct):
    """struct synthvid_feature_change { u8 is_dirt_needed; u8 is_ptr_pos_needed;
    u8 is_ptr_shape_needed; u8 is_situ_needed; } __packed;"""

    is_dirt_needed: Annotated[int, U8]
    is_ptr_pos_needed: Annotated[int, U8] = 0
    is_ptr_shape_needed: Annotated[int, U8] = 0
    is_situ_needed: Annotated[int, U8] = 0


@wire_struct(size=2)
@dataclass(frozen=True)
class SynthvidDirt(WireStruct):
    """struct synthvid_dirt { u8 video_output; u8 dirt_count; struct rect rect[1]; }
    (without the rects)"""

    video_output: Annotated[int, U8]
    dirt_count: Annotated[int, U8]


@wire_struct(size=16)
@dataclass(frozen=True)
class Rect(WireStruct):
    """struct rect { s32 x1, y1; /* top left */ s32 x2, y2; /* bottom right, exclusive */ }"""

    x1: Annotated[int, I32]
    y1: Annotated[int, I32]
    x2: Annotated[int, I32]
    y2: Annotated[int, I32]


@wire_struct(size=1)
@dataclass(frozen=True)
class SynthvidResolutionReq(WireStruct):
    """struct synthvid_supported_resolution_req { u8 maximum_resolution_count; }"""

    maximum_resolution_count: Annotated[int, U8] = MAX_RESOLUTION_COUNT


@wire_struct(size=EDID_BLOCK_SIZE + 3)
@dataclass(frozen=True)
class SynthvidResolutionResp(WireStruct):
    """struct synthvid_supported_resolution_resp { u8 edid_block[128]; u8 resolution_count;
    u8 default_resolution_index; u8 is_standard; struct hvd_screen_info
    supported_resolution[64]; } (without the list, which is always sent whole)"""

    edid_block: Annotated[bytes, Bytes(EDID_BLOCK_SIZE)]
    resolution_count: Annotated[int, U8]
    default_resolution_index: Annotated[int, U8]
    is_standard: Annotated[int, U8] = 0

    def __post_init__(self) -> None:
        if len(self.edid_block) != EDID_BLOCK_SIZE:  # struct would pad or cut it silently
            raise WireError(f"an EDID block is {EDID_BLOCK_SIZE} bytes")


@wire_struct(size=4)
@dataclass(frozen=True)
class HvdScreenInfo(WireStruct):
    """struct hvd_screen_info { u16 width; u16 height; } __packed;"""

    width: Annotated[int, U16]
    height: Annotated[int, U16]


RESOLUTION_RESPONSE_BODY = SynthvidResolutionResp.SIZE + MAX_RESOLUTION_COUNT * HvdScreenInfo.SIZE
MAX_GUEST_PAYLOAD = (  # the largest guest message, a full pointer shape, plus ring padding
    PIPE_HEADER_SIZE + SYNTHVID_HEADER_SIZE + SynthvidPointerShape.SIZE + CURSOR_MAX**2 * 4 + 7
)


def encode_message(msg_type: int, body: bytes) -> bytes:
    """Pipe header, synthvid header, body; both sizes count header and body."""
    size = SYNTHVID_HEADER_SIZE + len(body)
    return PipeHeader(PIPE_MESSAGE_DATA, size).pack() + SynthvidHeader(msg_type, size).pack() + body


def decode_message(payload: Buffer) -> tuple[MessageType | int, bytes]:
    """(type, body); bytes past the declared size (ring padding) are ignored.
    WireError when the framing does not add up."""
    view = memoryview(payload).cast("B")
    pipe = PipeHeader.unpack_from(view)
    header = SynthvidHeader.unpack_from(view, PIPE_HEADER_SIZE)
    if pipe.type != PIPE_MESSAGE_DATA:
        raise WireError(f"pipe message type {pipe.type}, not DATA")
    if not SYNTHVID_HEADER_SIZE <= header.size <= pipe.size <= len(view) - PIPE_HEADER_SIZE:
        raise WireError(f"sizes {header.size}/{pipe.size} in a {len(view)}-byte payload")
    return message_type(header.type), bytes(view[16 : PIPE_HEADER_SIZE + header.size])


def edid_block(name: bytes = b"Hyper-V Video") -> bytes:
    """A minimal EDID 1.3 block: header, vendor "MSF", a monitor-name
    descriptor, checksum. Linux ignores it; a guest that parses EDID sees a
    valid block and takes its modes from the resolution list."""
    vendor = (ord("M") - 64) << 10 | (ord("S") - 64) << 5 | (ord("F") - 64)
    block = bytearray(EDID_BLOCK_SIZE)
    block[0:8] = b"\x00\xff\xff\xff\xff\xff\xff\x00"
    block[8:10] = vendor.to_bytes(2, "big")
    block[18:21] = bytes([1, 3, 0x80])  # EDID 1.3, digital input
    block[38:54] = b"\x01" * 16  # no standard timings
    block[54:72] = bytes([0, 0, 0, 0xFC, 0]) + name[:13].ljust(13, b"\n")
    for at in (72, 90, 108):
        block[at : at + 5] = bytes([0, 0, 0, 0x10, 0])  # dummy descriptors
    block[127] = -sum(block) & 0xFF
    return bytes(block)


# --- The VSP side -----------------------------------------------------------


@dataclass(frozen=True)
class VramLocation:
    gpa: int  # guest physical address of VRAM (vram_ok said it is guest memory)


@dataclass(frozen=True)
class ModeSet:
    width: int
    height: int
    depth: int
    pitch: int
    vram_offset: int
    active: bool = True


@dataclass(frozen=True)
class Dirty:
    rects: tuple[tuple[int, int, int, int], ...]  # (x1, y1, x2, y2) on the screen, x2/y2 exclusive


@dataclass(frozen=True)
class PointerPosition:
    visible: bool
    x: int
    y: int


@dataclass(frozen=True)
class PointerShape:
    width: int
    height: int
    hot_x: int
    hot_y: int
    argb: bytes  # width * height * 4 bytes


Event = VramLocation | ModeSet | Dirty | PointerPosition | PointerShape
Result = tuple[list[bytes], list[Event]]
VramCheck = Callable[[int, int], bool]

_MIN_BODY: dict[int, int] = {  # the guest's messages and their fixed part
    MessageType.VERSION_REQUEST: SynthvidVersionReq.SIZE,
    MessageType.VRAM_LOCATION: SynthvidVramLocation.SIZE,
    MessageType.SITUATION_UPDATE: SynthvidSituationUpdate.SIZE + VideoOutputSituation.SIZE,
    MessageType.POINTER_POSITION: SynthvidPointerPosition.SIZE,
    MessageType.POINTER_SHAPE: SynthvidPointerShape.SIZE,
    MessageType.DIRT: SynthvidDirt.SIZE,
    MessageType.RESOLUTION_REQUEST: SynthvidResolutionReq.SIZE,
}


def _clip(rect: Rect, width: int, height: int) -> tuple[int, int, int, int] | None:
    x1, y1 = max(rect.x1, 0), max(rect.y1, 0)
    x2, y2 = min(rect.x2, width), min(rect.y2, height)
    return (x1, y1, x2, y2) if x1 < x2 and y1 < y2 else None


class SynthvidServer:
    """The VSP side of one synthetic video device. `receive` takes one inband
    payload and returns (payloads to send, events for the I/O layer); a bad
    message is dropped and counted in `errors` (the reason in `last_error`)."""

    def __init__(
        self,
        vram_size: int,
        resolutions: Sequence[tuple[int, int]] = STANDARD_RESOLUTIONS,
        default: tuple[int, int] = (1024, 768),
        *,
        versions: Sequence[int] = VSP_VERSIONS,
    ) -> None:
        if not 1 <= len(resolutions) <= MAX_RESOLUTION_COUNT or default not in resolutions:
            raise ValueError(f"1..64 resolutions including the default {default}")
        for w, h in resolutions:
            if not (0 < w <= 0xFFFF and 0 < h <= 0xFFFF and w * h * BYTES_PER_PIXEL <= vram_size):
                raise ValueError(f"{w}x{h} does not fit {vram_size} bytes of VRAM")
        if not versions or not set(versions) <= set(VSP_VERSIONS):
            raise ValueError(f"versions {versions!r}: this VSP implements {VSP_VERSIONS}")
        self.vram_size = vram_size
        self.resolutions = tuple(resolutions)
        self.default = default
        self.versions = tuple(versions)
        self.max_width = max(w for w, _ in resolutions)
        self.max_height = max(h for _, h in resolutions)
        self.version: int | None = None
        self.vram_gpa: int | None = None
        self.mode: ModeSet | None = None
        self.errors: Counter[str] = Counter()
        self.last_error: str | None = None
        self._handlers: dict[int, Callable[[bytes, VramCheck], Result]] = {
            MessageType.VERSION_REQUEST: self._version,
            MessageType.RESOLUTION_REQUEST: self._resolutions,
            MessageType.VRAM_LOCATION: self._vram_location,
            MessageType.SITUATION_UPDATE: self._situation,
            MessageType.POINTER_POSITION: self._pointer_position,
            MessageType.POINTER_SHAPE: self._pointer_shape,
            MessageType.DIRT: self._dirt,
        }

    def _drop(self, kind: str, reason: str) -> Result:
        self.errors[kind] += 1
        self.last_error = reason
        return [], []

    def receive(self, payload: Buffer, *, vram_ok: VramCheck) -> Result:
        """vram_ok(gpa, size) says whether [gpa, gpa + size) is guest memory."""
        view = memoryview(payload).cast("B")
        if len(view) > MAX_GUEST_PAYLOAD:
            return self._drop("oversize", f"{len(view)}-byte message, cap {MAX_GUEST_PAYLOAD}")
        try:
            msg_type, body = decode_message(view)
        except WireError as error:
            return self._drop("malformed", str(error))
        handler = self._handlers.get(msg_type)
        if handler is None:
            return self._drop("unsupported", f"message type {msg_type!r} from a guest")
        if len(body) < _MIN_BODY[msg_type]:
            return self._drop("malformed", f"{msg_type!r} body of {len(body)} bytes")
        if self.version is None and msg_type != MessageType.VERSION_REQUEST:
            return self._drop("before_version", f"{msg_type!r} before VERSION_REQUEST")
        return handler(body, vram_ok)

    def feature_change(
        self,
        dirt: bool = True,
        pointer_position: bool = False,
        pointer_shape: bool = False,
        situation: bool = False,
    ) -> bytes:
        """FEATURE_CHANGE: what the VSP wants the guest to send. Linux sends
        DIRT only after one with dirt set, and then re-sends pointer and mode."""
        flags = (dirt, pointer_position, pointer_shape, situation)
        body = SynthvidFeatureChange(*map(int, flags))
        return encode_message(MessageType.FEATURE_CHANGE, body.pack())

    def _version(self, body: bytes, vram_ok: VramCheck) -> Result:
        version = SynthvidVersionReq.unpack(body).version
        accepted = version in self.versions
        self.version = version if accepted else None
        self.vram_gpa = self.mode = None
        reply = SynthvidVersionResp(version, int(accepted), MAX_VIDEO_OUTPUTS).pack()
        return [encode_message(MessageType.VERSION_RESPONSE, reply)], []

    def _resolutions(self, body: bytes, vram_ok: VramCheck) -> Result:
        assert self.version is not None  # receive checked
        if version_tuple(self.version) < version_tuple(SYNTHVID_VERSION_WIN10):
            return self._drop("out_of_order", "RESOLUTION_REQUEST before WIN10")
        room = SynthvidResolutionReq.unpack(body).maximum_resolution_count
        offered = self.resolutions[:room]
        if room and self.default not in offered:  # keep the default in a short list
            offered = (self.default, *offered[: room - 1])
        index = offered.index(self.default) if offered else 0
        head = SynthvidResolutionResp(edid_block(), len(offered), index)
        entries = b"".join(HvdScreenInfo(w, h).pack() for w, h in offered)
        reply = head.pack() + entries.ljust(MAX_RESOLUTION_COUNT * HvdScreenInfo.SIZE, b"\0")
        return [encode_message(MessageType.RESOLUTION_RESPONSE, reply)], []

    def _vram_location(self, body: bytes, vram_ok: VramCheck) -> Result:
        location = SynthvidVramLocation.unpack(body)
        gpa = location.vram_gpa
        if not location.is_vram_gpa_specified:
            return self._drop("bad_vram", "VRAM_LOCATION without a GPA")
        if gpa % PAGE_SIZE or gpa + self.vram_size > 1 << 64 or not vram_ok(gpa, self.vram_size):
            return self._drop("bad_vram", f"VRAM at {gpa:#x} is not {self.vram_size} bytes of RAM")
        self.vram_gpa = gpa
        ack = SynthvidAck(location.user_ctx).pack()
        return [encode_message(MessageType.VRAM_LOCATION_ACK, ack)], [VramLocation(gpa)]

    def _situation(self, body: bytes, vram_ok: VramCheck) -> Result:
        update = SynthvidSituationUpdate.unpack(body)
        if update.video_output_count < 1:  # outputs past the first are ignored: we offer one
            return self._drop("malformed", "SITUATION_UPDATE without an output")
        out = VideoOutputSituation.unpack_from(body, SynthvidSituationUpdate.SIZE)
        w, h, pitch = out.width_pixels, out.height_pixels, out.pitch_bytes
        if out.depth_bits != DEPTH:
            return self._drop("bad_mode", f"depth {out.depth_bits}, not {DEPTH}")
        if not (0 < w <= self.max_width and 0 < h <= self.max_height):
            return self._drop("bad_mode", f"{w}x{h} is over {self.max_width}x{self.max_height}")
        if pitch < w * BYTES_PER_PIXEL:
            return self._drop("bad_pitch", f"pitch {pitch} is under {w} pixels")
        if out.vram_offset + pitch * h > self.vram_size:
            end = out.vram_offset + pitch * h
            return self._drop("mode_exceeds_vram", f"mode ends at {end}, VRAM {self.vram_size}")
        self.mode = ModeSet(w, h, DEPTH, pitch, out.vram_offset, bool(out.active))
        ack = SynthvidAck(update.user_ctx).pack()
        return [encode_message(MessageType.SITUATION_UPDATE_ACK, ack)], [self.mode]

    def _pointer_position(self, body: bytes, vram_ok: VramCheck) -> Result:
        position = SynthvidPointerPosition.unpack(body)
        if position.video_output >= MAX_VIDEO_OUTPUTS:
            return self._drop("bad_output", f"pointer on output {position.video_output}")
        event = PointerPosition(bool(position.is_visible), position.image_x, position.image_y)
        return [], [event]

    def _pointer_shape(self, body: bytes, vram_ok: VramCheck) -> Result:
        shape = SynthvidPointerShape.unpack(body)
        if shape.part_idx != CURSOR_COMPLETE or not shape.is_argb:
            return self._drop("unsupported", "pointer shape in parts or not ARGB")
        if shape.width > CURSOR_MAX or shape.height > CURSOR_MAX:
            return self._drop("bad_pointer", f"{shape.width}x{shape.height} pointer")
        size = shape.width * shape.height * 4
        data = body[SynthvidPointerShape.SIZE : SynthvidPointerShape.SIZE + size]
        if len(data) < size:
            return self._drop("malformed", f"pointer data of {len(data)} bytes, needs {size}")
        return [], [PointerShape(shape.width, shape.height, shape.hot_x, shape.hot_y, data)]

    def _dirt(self, body: bytes, vram_ok: VramCheck) -> Result:
        dirt = SynthvidDirt.unpack(body)
        count = dirt.dirt_count
        if dirt.video_output >= MAX_VIDEO_OUTPUTS:
            return self._drop("bad_output", f"DIRT on output {dirt.video_output}")
        if len(body) < SynthvidDirt.SIZE + count * Rect.SIZE:
            return self._drop("malformed", f"DIRT of {count} rects in {len(body)} bytes")
        if self.mode is None:
            return self._drop("dirt_outside", "DIRT before a mode is set")
        w, h = self.mode.width, self.mode.height
        if count > MAX_DIRT_RECTS:
            self.errors["too_many_rects"] += 1
            return [], [Dirty(((0, 0, w, h),))]
        rects = []
        for i in range(count):
            clipped = _clip(Rect.unpack_from(body, SynthvidDirt.SIZE + i * Rect.SIZE), w, h)
            if clipped is None:
                self._drop("dirt_outside", f"rect {i} is outside the {w}x{h} screen or empty")
            else:
                rects.append(clipped)
        return [], [Dirty(tuple(rects))] if rects else []


# --- The VSC side -----------------------------------------------------------


class SynthvidProtocolError(ValueError):
    """The VSP answered wrongly (a remote error)."""


class SynthvidClient:
    """The VSC side, in Linux's order: `start()` (VERSION_REQUEST, newest
    first); `receive` returns what to send next (RESOLUTION_REQUEST after a
    WIN10 answer, the next version after a refusal); then `vram_location`,
    `hide_pointer`, `situation_update`, and `dirt` once `dirt_needed`."""

    def __init__(self, versions: Sequence[int] = VSC_VERSIONS) -> None:
        self.versions = tuple(versions)
        self._tried = 0
        self.version: int | None = None
        self.resolutions: tuple[tuple[int, int], ...] = ()
        self.preferred: tuple[int, int] | None = None
        self.max_size = WIN8_MAX_SIZE
        self.vram_gpa: int | None = None
        self.vram_acked = False
        self.features: SynthvidFeatureChange | None = None
        self.mode: tuple[int, int, int] | None = None  # width, height, pitch

    @property
    def dirt_needed(self) -> bool:
        return bool(self.features and self.features.is_dirt_needed)

    def start(self) -> bytes:
        self._tried = 0
        return self._version_request()

    def _version_request(self) -> bytes:
        body = SynthvidVersionReq(self.versions[self._tried]).pack()
        return encode_message(MessageType.VERSION_REQUEST, body)

    def receive(self, payload: Buffer) -> list[bytes]:
        try:
            msg_type, body = decode_message(payload)
            if msg_type == MessageType.VERSION_RESPONSE:
                return self._version_response(SynthvidVersionResp.unpack(body))
            if msg_type == MessageType.RESOLUTION_RESPONSE:
                self._resolution_response(body)
                return []
            if msg_type == MessageType.VRAM_LOCATION_ACK:
                if SynthvidAck.unpack(body).user_ctx != self.vram_gpa:
                    raise SynthvidProtocolError("VRAM_LOCATION_ACK for another location")
                self.vram_acked = True
                return []
            if msg_type == MessageType.SITUATION_UPDATE_ACK:
                return []
            if msg_type == MessageType.FEATURE_CHANGE:  # as hyperv_fb: re-send pointer and mode
                self.features = SynthvidFeatureChange.unpack(body)
                if self.mode is None:
                    return self.hide_pointer()
                width, height, pitch = self.mode
                return [*self.hide_pointer(), self.situation_update(width, height, pitch=pitch)]
        except WireError as error:
            raise SynthvidProtocolError(str(error)) from None
        raise SynthvidProtocolError(f"unexpected message type {msg_type!r}")

    def _version_response(self, response: SynthvidVersionResp) -> list[bytes]:
        asked = self.versions[self._tried]
        if response.version != asked:
            raise SynthvidProtocolError(f"answer for version {response.version:#x}, not {asked:#x}")
        if not response.is_accepted:
            self._tried += 1
            if self._tried == len(self.versions):
                raise SynthvidProtocolError(f"the VSP accepts none of {self.versions}")
            return [self._version_request()]
        self.version = asked
        if version_tuple(asked) >= version_tuple(SYNTHVID_VERSION_WIN10):
            request = SynthvidResolutionReq().pack()
            return [encode_message(MessageType.RESOLUTION_REQUEST, request)]
        return []

    def _resolution_response(self, body: bytes) -> None:
        head = SynthvidResolutionResp.unpack(body)
        count, index = head.resolution_count, head.default_resolution_index
        if not 0 < count <= MAX_RESOLUTION_COUNT or index >= count:
            raise SynthvidProtocolError(f"{count} resolutions, default index {index}")
        at = SynthvidResolutionResp.SIZE
        entries = [
            HvdScreenInfo.unpack_from(body, at + i * HvdScreenInfo.SIZE) for i in range(count)
        ]
        self.resolutions = tuple((e.width, e.height) for e in entries)
        self.preferred = self.resolutions[index]
        self.max_size = (max(w for w, _ in self.resolutions), max(h for _, h in self.resolutions))

    def vram_location(self, gpa: int) -> bytes:
        """VRAM_LOCATION with user_ctx = gpa, as Linux sends it."""
        self.vram_gpa, self.vram_acked = gpa, False
        body = SynthvidVramLocation(gpa, 1, gpa).pack()
        return encode_message(MessageType.VRAM_LOCATION, body)

    def hide_pointer(self) -> list[bytes]:
        """Linux's hyperv_hide_hw_ptr: visible at (0, 0), a 1x1 shape."""
        position = SynthvidPointerPosition(1, 0, 0, 0).pack()
        shape = SynthvidPointerShape(CURSOR_COMPLETE, 1, 1, 1, 0, 0).pack() + b"\x00\x01\x01\x01"
        return [
            encode_message(MessageType.POINTER_POSITION, position),
            encode_message(MessageType.POINTER_SHAPE, shape),
        ]

    def situation_update(
        self, width: int, height: int, *, pitch: int | None = None, active: bool = True
    ) -> bytes:
        """SITUATION_UPDATE for one output at VRAM offset 0, depth 32."""
        pitch = width * BYTES_PER_PIXEL if pitch is None else pitch
        self.mode = (width, height, pitch)
        output = VideoOutputSituation(int(active), 0, DEPTH, width, height, pitch)
        body = SynthvidSituationUpdate(0, 1).pack() + output.pack()
        return encode_message(MessageType.SITUATION_UPDATE, body)

    def dirt(self, *rects: tuple[int, int, int, int]) -> bytes:
        """DIRT for output 0; each rect (x1, y1, x2, y2), x2/y2 exclusive."""
        if len(rects) > 0xFF:
            raise ValueError(f"{len(rects)} rects do not fit dirt_count")
        body = SynthvidDirt(0, len(rects)).pack() + b"".join(Rect(*r).pack() for r in rects)
        return encode_message(MessageType.DIRT, body)
