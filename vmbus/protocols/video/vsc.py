"""The VSC side of synthvid, sans-I/O, in the order Linux's hyperv_fb
follows (docs/protocol.md §8): builds each guest message from the declared
structs and reads the host's answers."""

from __future__ import annotations

from collections.abc import Sequence

from vmbus.errors import PeerError, UsageError
from vmbus.protocols.video.wire import (
    BYTES_PER_PIXEL,
    CURSOR_COMPLETE,
    DEPTH,
    MAX_RESOLUTION_COUNT,
    SYNTHVID_VERSION_WIN10,
    VSC_VERSIONS,
    WIN8_MAX_SIZE,
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
    encode_message,
    version_tuple,
)
from vmbus.wire import WireError

HIDDEN_POINTER = b"\x00\x01\x01\x01"  # the one ARGB pixel Linux's hyperv_hide_hw_ptr sends


class SynthvidProtocolError(PeerError, ValueError):
    """The VSP answered wrongly (a remote error)."""


class SynthvidClient:
    """The VSC side, in Linux's order: `start()` (VERSION_REQUEST, newest
    first); `receive` returns what to send next (RESOLUTION_REQUEST after a
    WIN10 answer, the next version after a refusal); then `vram_location`,
    `hide_pointer`, `situation_update`, and `dirt` once `dirt_needed`."""

    def __init__(
        self, versions: Sequence[int] = VSC_VERSIONS, *, follow_host: bool = False
    ) -> None:
        self.versions = tuple(versions)
        # follow_host: a FEATURE_CHANGE asking for the situation makes us ask
        # for the resolution list again, and its new default is `host_size`
        # (the Framebuffer then switches to it). Linux does not do this.
        self.follow_host = follow_host
        self.host_size: tuple[int, int] | None = None
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

    @property
    def negotiated(self) -> bool:
        """A version is agreed and, from WIN10 on, the resolution list is in."""
        if self.version is None:
            return False
        return version_tuple(self.version) < version_tuple(SYNTHVID_VERSION_WIN10) or bool(
            self.resolutions
        )

    def start(self) -> bytes:
        self._tried = 0
        return self._version_request()

    def _version_request(self) -> bytes:
        body = SynthvidVersionReq(self.versions[self._tried]).pack()
        return encode_message(MessageType.VERSION_REQUEST, body)

    def receive(self, payload: Buffer) -> list[bytes]:
        """One host message (decoded once, from a private copy); what to send next."""
        private = payload if isinstance(payload, bytes) else bytes(payload)
        try:
            msg_type, body = decode_message(private)
            if msg_type == MessageType.VERSION_RESPONSE:
                return self._version_response(SynthvidVersionResp.unpack(body))
            if msg_type == MessageType.RESOLUTION_RESPONSE:
                self._resolution_response(body)
                mode = self.mode
                if self.follow_host and mode is not None and self.preferred not in (None, mode[:2]):
                    self.host_size = self.preferred
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
                again = [self.situation_update(width, height, pitch=pitch)]
                if self.features.is_situ_needed and self.follow_host and self._win10():
                    request = SynthvidResolutionReq().pack()
                    again.append(encode_message(MessageType.RESOLUTION_REQUEST, request))
                return [*self.hide_pointer(), *again]
        except WireError as error:
            raise SynthvidProtocolError(str(error)) from None
        raise SynthvidProtocolError(f"unexpected message type {msg_type!r}")

    def _win10(self) -> bool:
        return self.version is not None and version_tuple(self.version) >= version_tuple(
            SYNTHVID_VERSION_WIN10
        )

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

    def _resolution_response(self, body: memoryview) -> None:
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
        shape = SynthvidPointerShape(CURSOR_COMPLETE, 1, 1, 1, 0, 0).pack() + HIDDEN_POINTER
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
            raise UsageError(f"{len(rects)} rects do not fit dirt_count")
        body = SynthvidDirt(0, len(rects)).pack() + b"".join(Rect(*r).pack() for r in rects)
        return encode_message(MessageType.DIRT, body)
