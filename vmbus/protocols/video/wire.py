"""Synthvid's wire format: versions, message types, the structs (declared
once with `vmbus.wire`), the framing, and the caps on what a guest controls.

Source: docs/protocol.md §8 (drivers/video/fbdev/hyperv_fb.c,
drivers/gpu/drm/hyperv/hyperv_drm_proto.c). Every message is the pipe header
(declared once, in vmbus.protocols.input), a synthvid header whose size
counts itself and the body, then the body. Both sides send inband without
completions. Pixels are 32 bpp XRGB8888, little-endian.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Annotated

from vmbus._ringdefs import DESCRIPTOR_SIZE
from vmbus.memory import PAGE_SIZE
from vmbus.protocols.input.wire import PIPE_HEADER_SIZE, PIPE_MESSAGE_DATA, PipeHeader
from vmbus.wire import I32, U8, U16, U32, U64, Bytes, WireError, WireStruct, open_enum, wire_struct

Buffer = bytes | bytearray | memoryview


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
MESSAGE_HEADER_SIZE = PIPE_HEADER_SIZE + SYNTHVID_HEADER_SIZE  # where a body starts
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
MAX_PKT_SIZE = PAGE_SIZE  # Linux keeps the channel's default max_pkt_size: one page
MAX_HOST_PAYLOAD = MAX_PKT_SIZE - DESCRIPTOR_SIZE  # a host message must fit it
MAX_DIRT_RECTS = 64  # past this a whole-screen update is cheaper than the list


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
# The largest host message (RESOLUTION_RESPONSE): the VSP's max_reply.
MAX_HOST_MESSAGE = MESSAGE_HEADER_SIZE + RESOLUTION_RESPONSE_BODY
MAX_GUEST_PAYLOAD = (  # the largest guest message, a full pointer shape, plus ring padding
    MESSAGE_HEADER_SIZE + SynthvidPointerShape.SIZE + CURSOR_MAX**2 * 4 + 7
)


def encode_message(msg_type: int, body: bytes) -> bytes:
    """Pipe header, synthvid header, body; both sizes count header and body."""
    size = SYNTHVID_HEADER_SIZE + len(body)
    return PipeHeader(PIPE_MESSAGE_DATA, size).pack() + SynthvidHeader(msg_type, size).pack() + body


def decode_message(payload: Buffer) -> tuple[MessageType | int, memoryview]:
    """(type, body) of one message: the body is a view of `payload` (pass a
    private copy, not shared memory); bytes past the declared size (ring
    padding) are left out. WireError when the framing does not add up."""
    view = memoryview(payload).cast("B")
    pipe = PipeHeader.unpack_from(view)
    header = SynthvidHeader.unpack_from(view, PIPE_HEADER_SIZE)
    if pipe.type != PIPE_MESSAGE_DATA:
        raise WireError(f"pipe message type {pipe.type}, not DATA")
    if not SYNTHVID_HEADER_SIZE <= header.size <= pipe.size <= len(view) - PIPE_HEADER_SIZE:
        raise WireError(f"sizes {header.size}/{pipe.size} in a {len(view)}-byte payload")
    return message_type(header.type), view[MESSAGE_HEADER_SIZE : PIPE_HEADER_SIZE + header.size]


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
