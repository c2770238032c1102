"""The VSP side of synthvid, sans-I/O: `SynthvidServer.receive` takes one
guest message and returns what to send back and what happened (events for
the device to act on: VRAM placed, mode set, rectangles dirty, pointer).

Choices where the sources leave room (docs/protocol.md §8):
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
- A viewer's size (`prefer`) becomes the default of the resolution list,
  and a FEATURE_CHANGE asking for the situation tells the guest: Linux only
  re-sends its mode, a guest that follows the host (vsc.video's
  Framebuffer(follow_host=True)) asks for the list again and takes the new
  default. The synthvid protocol has no host-set mode; this is the nearest
  message sequence it allows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vmbus.errors import UsageError
from vmbus.memory import PAGE_SIZE
from vmbus.protocols.video.wire import (
    BYTES_PER_PIXEL,
    CURSOR_COMPLETE,
    CURSOR_MAX,
    DEPTH,
    MAX_DIRT_RECTS,
    MAX_GUEST_PAYLOAD,
    MAX_RESOLUTION_COUNT,
    MAX_VIDEO_OUTPUTS,
    STANDARD_RESOLUTIONS,
    SYNTHVID_VERSION_WIN10,
    VSP_VERSIONS,
    Buffer,
    HvdScreenInfo,
    MessageType,
    Rect,
    SynthvidAck,
    SynthvidDirt,
    SynthvidFeatureChange,
    SynthvidPointerPosition,
    SynthvidPointerShape,
    SynthvidResolutionReq,
    SynthvidResolutionResp,
    SynthvidSituationUpdate,
    SynthvidVersionReq,
    SynthvidVersionResp,
    SynthvidVramLocation,
    VideoOutputSituation,
    decode_message,
    edid_block,
    encode_message,
    version_tuple,
)
from vmbus.wire import WireError


class SynthvidConfigError(UsageError):
    """A SynthvidServer configured with modes or versions it cannot serve."""


@dataclass(frozen=True)
class VramLocation:
    gpa: int  # guest physical address of VRAM (vram_ok said it is granted memory)


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


MIN_PREFERRED = 64  # the smallest side a viewer's size becomes


def _clip(rect: Rect, width: int, height: int) -> tuple[int, int, int, int] | None:
    x1, y1 = max(rect.x1, 0), max(rect.y1, 0)
    x2, y2 = min(rect.x2, width), min(rect.y2, height)
    return (x1, y1, x2, y2) if x1 < x2 and y1 < y2 else None


class SynthvidServer:
    """The VSP side of one synthetic video device. `receive` takes one inband
    payload and returns (payloads to send, events for the I/O layer); a bad
    message is dropped and counted in `errors` (the reason in `last_error`).
    Every payload sent is an answer to the message received (at most one)."""

    def __init__(
        self,
        vram_size: int,
        resolutions: Sequence[tuple[int, int]] = STANDARD_RESOLUTIONS,
        default: tuple[int, int] = (1024, 768),
        *,
        versions: Sequence[int] = VSP_VERSIONS,
    ) -> None:
        if not 1 <= len(resolutions) <= MAX_RESOLUTION_COUNT or default not in resolutions:
            raise SynthvidConfigError(f"1..64 resolutions including the default {default}")
        for w, h in resolutions:
            if not (0 < w <= 0xFFFF and 0 < h <= 0xFFFF and w * h * BYTES_PER_PIXEL <= vram_size):
                raise SynthvidConfigError(f"{w}x{h} does not fit {vram_size} bytes of VRAM")
        if not versions or not set(versions) <= set(VSP_VERSIONS):
            raise SynthvidConfigError(f"versions {versions!r}: this VSP implements {VSP_VERSIONS}")
        self.vram_size = vram_size
        self.resolutions = tuple(resolutions)
        self.default = default
        self.versions = tuple(versions)
        self.max_width = max(w for w, _ in resolutions)
        self.max_height = max(h for _, h in resolutions)
        self._viewer_size: tuple[int, int] | None = None  # the entry `prefer` added
        self.version: int | None = None
        self.vram_gpa: int | None = None
        self.mode: ModeSet | None = None
        self.errors: Counter[str] = Counter()
        self.last_error: str | None = None
        self._handlers: dict[int, Callable[[memoryview, VramCheck], Result]] = {
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
        """vram_ok(gpa, size) says whether [gpa, gpa + size) is VRAM the guest
        granted. `payload` is copied once (unless it is bytes already) and
        decoded from that copy only."""
        size = memoryview(payload).nbytes
        if size > MAX_GUEST_PAYLOAD:
            return self._drop("oversize", f"{size}-byte message, cap {MAX_GUEST_PAYLOAD}")
        private = payload if isinstance(payload, bytes) else bytes(payload)
        try:
            msg_type, body = decode_message(private)
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

    def prefer(self, width: int, height: int) -> bytes | None:
        """Make width x height (clamped to the largest offered mode and to
        the VRAM) the default resolution; the FEATURE_CHANGE to post, or None
        if nothing changed."""
        width = max(MIN_PREFERRED, min(width, self.max_width))
        height = max(MIN_PREFERRED, min(height, self.max_height))
        height = max(1, min(height, self.vram_size // (width * BYTES_PER_PIXEL)))
        wanted = (width, height)
        if wanted == self.default:
            return None
        offered = [r for r in self.resolutions if r != self._viewer_size]
        if wanted not in offered:
            offered = [wanted, *offered[: MAX_RESOLUTION_COUNT - 1]]
            self._viewer_size = wanted
        self.resolutions, self.default = tuple(offered), wanted
        return self.feature_change(dirt=True, situation=True)

    def _version(self, body: memoryview, vram_ok: VramCheck) -> Result:
        version = SynthvidVersionReq.unpack(body).version
        accepted = version in self.versions
        self.version = version if accepted else None
        self.vram_gpa = self.mode = None
        reply = SynthvidVersionResp(version, int(accepted), MAX_VIDEO_OUTPUTS).pack()
        return [encode_message(MessageType.VERSION_RESPONSE, reply)], []

    def _resolutions(self, body: memoryview, vram_ok: VramCheck) -> Result:
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

    def _vram_location(self, body: memoryview, vram_ok: VramCheck) -> Result:
        location = SynthvidVramLocation.unpack(body)
        gpa = location.vram_gpa
        if not location.is_vram_gpa_specified:
            return self._drop("bad_vram", "VRAM_LOCATION without a GPA")
        if gpa % PAGE_SIZE or gpa + self.vram_size > 1 << 64 or not vram_ok(gpa, self.vram_size):
            return self._drop("bad_vram", f"VRAM at {gpa:#x} is not {self.vram_size} granted bytes")
        self.vram_gpa = gpa
        ack = SynthvidAck(location.user_ctx).pack()
        return [encode_message(MessageType.VRAM_LOCATION_ACK, ack)], [VramLocation(gpa)]

    def _situation(self, body: memoryview, vram_ok: VramCheck) -> Result:
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

    def _pointer_position(self, body: memoryview, vram_ok: VramCheck) -> Result:
        position = SynthvidPointerPosition.unpack(body)
        if position.video_output >= MAX_VIDEO_OUTPUTS:
            return self._drop("bad_output", f"pointer on output {position.video_output}")
        event = PointerPosition(bool(position.is_visible), position.image_x, position.image_y)
        return [], [event]

    def _pointer_shape(self, body: memoryview, vram_ok: VramCheck) -> Result:
        shape = SynthvidPointerShape.unpack(body)
        if shape.part_idx != CURSOR_COMPLETE or not shape.is_argb:
            return self._drop("unsupported", "pointer shape in parts or not ARGB")
        if shape.width > CURSOR_MAX or shape.height > CURSOR_MAX:
            return self._drop("bad_pointer", f"{shape.width}x{shape.height} pointer")
        size = shape.width * shape.height * 4
        data = bytes(body[SynthvidPointerShape.SIZE : SynthvidPointerShape.SIZE + size])
        if len(data) < size:
            return self._drop("malformed", f"pointer data of {len(data)} bytes, needs {size}")
        return [], [PointerShape(shape.width, shape.height, shape.hot_x, shape.hot_y, data)]

    def _dirt(self, body: memoryview, vram_ok: VramCheck) -> Result:
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
