"""Network backends for the network VSP: a TAP device and null, behind
`NetBackend` (the learning switch is in `vsp.net.switch`, the
pcap-capturing wrapper in `vsp.net.pcap`).

The interface (`NetBackend`):

- `fileno()`: a descriptor for `OpenContext.watch`, readable while received
  frames wait (level-triggered), so the child's worker calls back until drained;
- `receive(max_frames)`: never blocks; up to `max_frames` waiting frames, as bytes;
- `send(frames)`: a batch of whole Ethernet frames (14-byte header, no FCS),
  as bytes or byte-format views valid during the call only (they are copied
  or written out before it returns); returns how many the medium accepted.
  A full medium, a link that is down or a malformed frame is a drop: counted
  in `drops`, never raised;
- `transmit(frames)`: `send` with flow control, for the VSP: returns
  `Sent(taken, refused)`. frames[:taken] were taken, `refused` of them
  dropped (the VSP reports those to the guest); frames[taken:] were not
  taken because the medium is congested (a full switch port): offer them
  again once `space_fileno()` is readable. A medium that never holds back
  (TAP, null) takes everything and has no space descriptor (-1);
- `mac` (a suggested MAC for the guest NIC, or None), `mtu`, `link_up`;
- `set_link(up)`, and `on_link_change`: a callback the VSP sets, called with
  the new state from the thread that calls `set_link`, when the state changes;
- `close()`; counters `frames_in` (frames handed out by `receive`),
  `frames_out` (frames `send` accepted) and `drops`;
- `link_fileno()` and `poll_link()`: a descriptor, readable when the link
  state was changed from another process (the parent, after the backend was
  handed to a VM's worker), and the call that picks the change up (it calls
  `on_link_change`); -1 when there is none.

Handing over (`vmbus.handoff`): the backends here pickle with their
descriptors as `SharedFd`s (the TAP device's, the capture file's), so the
worker's copy works the device the parent opened. The link state crosses in
a `LinkCell` (a memfd and an eventfd): the parent's `set_link` writes it,
the worker's copy reads it in `poll_link`. Counters count where the frames
move (the worker): the parent reads them through `Vsp.stats`.

An optional faster interface, `fast_fd()`: a descriptor on which each
write(2)/writev(2) is one whole frame and each read(2) returns one (a TAP
device); the VSP's compiled path then moves frames itself and adds to the
counters. -1 (the default) keeps the VSP on `transmit`/`receive`. With
`vnet_hdr` (a TAP made with IFF_VNET_HDR) each of those frames is preceded
by a 10-byte virtio_net_hdr, and `send_offloaded` takes frames with their
headers (checksum offload, large sends that the kernel segments). `receive`
then drops (counted) a frame the kernel queued while receive offloads were
on (`set_receive_offload`) and hands over too long or with a partial
checksum: read as a whole frame it would arrive cut short or unsummed.

Each backend is served by one thread (its child's worker), except that the
switch's ports are served by different workers: the switch locks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import struct
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol, TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as _netns  # not `netns`: TapBackend's argument of that name

from vmbus.errors import UsageError
from vmbus.handoff import SharedFd
from vmbus.protocols.net.offload import (
    GSO_NONE,
    VNET_HDR_SIZE,
    VNET_NEEDS_CSUM,
    ZERO_HEADER,
    VnetFrame,
)

__all__ = [
    "DEFAULT_MTU",
    "LinkCell",
    "NetBackend",
    "NullBackend",
    "Sent",
    "TapBackend",
    "max_frame",
]

Frame = bytes | bytearray | memoryview  # a byte-format buffer
LinkCallback = Callable[[bool], None]
_C = TypeVar("_C", bound="_Closing")

ETH_HLEN = 14  # destination, source, EtherType
VLAN_HLEN = 4  # one 802.1Q tag, which the MTU does not count
DEFAULT_MTU = 1500
MAX_MTU = 65535 - ETH_HLEN - VLAN_HLEN  # the largest frame a pcap snaplen or a TAP read holds


def max_frame(mtu: int) -> int:
    """The longest frame a medium with this MTU carries (checked: 68 is IPv4's minimum)."""
    if not 68 <= mtu <= MAX_MTU:
        raise UsageError(f"MTU {mtu} is outside 68..{MAX_MTU}")
    return ETH_HLEN + VLAN_HLEN + mtu


class Sent(NamedTuple):
    """What `transmit` did: the first `taken` frames were taken, `refused`
    of them dropped; the rest wait for room (see `space_fileno`)."""

    taken: int
    refused: int


class NetBackend(Protocol):
    """What the network VSP needs of a backend; see the module doc."""

    on_link_change: LinkCallback | None  # set by the VSP; the rest are read only
    mac: bytes | None
    mtu: int
    link_up: bool
    frames_in: int
    frames_out: int
    drops: int

    def fileno(self) -> int: ...
    def link_fileno(self) -> int: ...
    def poll_link(self) -> None: ...
    def fast_fd(self) -> int: ...
    def receive(self, max_frames: int) -> list[bytes]: ...
    def send(self, frames: Sequence[Frame]) -> int: ...
    def transmit(self, frames: Sequence[Frame]) -> Sent: ...
    def space_fileno(self) -> int: ...
    def set_link(self, up: bool) -> None: ...
    def close(self) -> None: ...


class _Closing:
    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class LinkCell:
    """A link state shared across processes: one byte in a memfd (1 = up)
    and an eventfd rung after each change. The writer (the parent) stores
    the state, then rings; the reader (the worker's copy) clears the ring,
    then loads the state, so it never misses the last change."""

    def __init__(self, up: bool = True) -> None:
        self._memfd = os.memfd_create("vmbus-net-link", os.MFD_CLOEXEC)
        self._ring = -1
        self._map: mmap.mmap | None = None
        try:
            os.ftruncate(self._memfd, 8)
            self._ring = _eventfd()
            self._map = mmap.mmap(self._memfd, 8)
        except BaseException:
            self.close()
            raise
        self._map[0] = int(up)

    def __getstate__(self) -> dict[str, Any]:
        return {"memfd": SharedFd(self._memfd), "ring": SharedFd(self._ring)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._memfd, self._ring = state["memfd"].take(), state["ring"].take()
        self._map = mmap.mmap(self._memfd, 8)

    def fileno(self) -> int:
        return self._ring

    def store(self, up: bool) -> None:
        assert self._map is not None, "a closed LinkCell"
        self._map[0] = int(up)
        os.eventfd_write(self._ring, 1)

    def load(self) -> bool:
        """The latest state (the ring cleared first); anything but 0 is up."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._ring)
        return self._map is not None and self._map[0] != 0

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        for fd in (self._memfd, self._ring):
            if fd >= 0:
                os.close(fd)
        self._memfd = self._ring = -1


class _Backend(_Closing):
    """Counters, link state and the descriptor shared by the backends."""

    def __init__(self, mac: bytes | None, mtu: int, fd: int = -1) -> None:
        if mac is not None and len(mac) != 6:
            raise UsageError(f"a MAC is 6 bytes, not {len(mac)}")
        self._link: LinkCell | None = None
        self._fd = fd
        self.vnet_hdr = False  # fast_fd's frames carry a virtio_net_hdr
        self.mac = mac
        self.mtu = mtu
        self._max_frame = max_frame(mtu)
        self.link_up = True
        self.on_link_change: LinkCallback | None = None
        self.frames_in = 0
        self.frames_out = 0
        self.drops = 0

    def __getstate__(self) -> dict[str, Any]:
        """For `vmbus.handoff`: the descriptor crosses as a SharedFd; the
        link callback belongs to the VSP that set it; the link state is
        shared from here on (a LinkCell, made now if not yet)."""
        if self._link is None:
            self._link = LinkCell(self.link_up)
        state = self.__dict__.copy()
        state["_fd"] = SharedFd(self._fd) if self._fd >= 0 else None
        state["on_link_change"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        fd = state.pop("_fd")
        self.__dict__.update(state)
        self._fd = -1 if fd is None else fd.take()

    def fileno(self) -> int:
        return self._fd

    def fast_fd(self) -> int:
        return -1  # frames move through transmit and receive

    def link_fileno(self) -> int:
        return -1 if self._link is None else self._link.fileno()

    def poll_link(self) -> None:
        """Pick up a link change made in another process (see LinkCell)."""
        if self._link is None:
            return
        up = self._link.load()
        if up != self.link_up:
            self.link_up = up
            self._link_changed(up)

    def _share_link(self, up: bool) -> None:
        if self._link is not None:
            self._link.store(up)

    def send(self, frames: Sequence[Frame]) -> int:
        raise NotImplementedError

    def transmit(self, frames: Sequence[Frame]) -> Sent:
        """A medium without flow control takes every frame."""
        return Sent(len(frames), len(frames) - self.send(frames))

    def space_fileno(self) -> int:
        return -1  # never holds frames back

    def set_link(self, up: bool) -> None:
        if up != self.link_up:
            self.link_up = up
            self._share_link(up)
            self._link_changed(up)

    def _link_changed(self, up: bool) -> None:
        if self.on_link_change is not None:
            self.on_link_change(up)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._link is not None:
            self._link.close()
            self._link = None


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


class NullBackend(_Backend):
    """A sink: accepts every frame sent (while the link is up) and discards
    it; never receives. Its fileno is an eventfd that is never signalled."""

    def __init__(self, mac: bytes | None = None, mtu: int = DEFAULT_MTU) -> None:
        super().__init__(mac, mtu, _eventfd())

    def receive(self, max_frames: int) -> list[bytes]:
        return []

    def send(self, frames: Sequence[Frame]) -> int:
        if not self.link_up:
            self.drops += len(frames)
            return 0
        self.frames_out += len(frames)
        return len(frames)


# --- TAP device ---

# linux/if_tun.h, with the asm-generic _IOW encoding (x86, arm; not ppc, mips).
TUNSETIFF = 0x400454CA
TUNSETCARRIER = 0x400454E2
TUNSETOFFLOAD = 0x400454D0
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000  # frames only: no 4-byte packet information before each
IFF_VNET_HDR = 0x4000  # each frame preceded by a virtio_net_hdr
GSO_MAX_FRAME = 0xFFFF + ETH_HLEN + VLAN_HLEN  # a GSO frame: what an IPv4 length holds
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
IFNAMSIZ = 16
# A write fails with these when the kernel drops the frame (no memory, the
# device going down, a frame it rejects); anything else is our own misuse.
_TAP_DROPS = frozenset((errno.EAGAIN, errno.ENOBUFS, errno.ENOMEM, errno.EIO, errno.EINVAL))


class TapBackend(_Backend):
    """A TAP device (IFF_TAP | IFF_NO_PI): frames the guest sends enter the
    kernel's network stack there, and frames the kernel sends out of it are
    received. The device exists while this object's descriptor is open.

    With `netns`, the device (created in our own namespace, where the
    descriptor is opened) is moved into that network namespace, created
    first if `create_netns` and removed again by `close()`. The MTU, the
    up state and `address` (e.g. "10.200.1.1/24") are set there.
    `set_link(False)` sets the interface down and its carrier off.
    """

    rx_offload = 0  # the TUN_F_* flags the kernel may use toward us (set_receive_offload)

    def __init__(
        self,
        name: str | None = None,
        *,
        netns: str | None = None,
        address: str | None = None,
        mtu: int = DEFAULT_MTU,
        create_netns: bool = False,
        vnet_hdr: bool = False,
    ) -> None:
        super().__init__(None, mtu)
        self.vnet_hdr = vnet_hdr
        encoded = (name or "").encode()
        if len(encoded) >= IFNAMSIZ:
            raise UsageError(f"interface name {name!r} is longer than {IFNAMSIZ - 1} bytes")
        self.netns = netns
        self.index: int = -1
        self._created_netns = False
        try:
            if netns is not None and create_netns:
                _netns.create(netns)
                self._created_netns = True
            self._fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
            ifreq = struct.pack("16sH22x", encoded, flags)
            answer = fcntl.ioctl(self._fd, TUNSETIFF, ifreq)  # the kernel fills in a name
            if vnet_hdr:  # frames to us stay whole and checksummed: no GSO, no partial sums
                fcntl.ioctl(self._fd, TUNSETOFFLOAD, 0)
            self.name = answer[:IFNAMSIZ].rstrip(b"\0").decode()
            if netns is not None:
                with IPRoute(groups=0) as ipr:
                    (index,) = ipr.link_lookup(ifname=self.name)
                    ipr.link("set", index=index, net_ns_fd=netns)
            with self._iproute() as ipr:
                (self.index,) = ipr.link_lookup(ifname=self.name)
                ipr.link("set", index=self.index, mtu=mtu, state="up")
                if address is not None:
                    ip, _, prefix = address.partition("/")
                    ipr.addr("add", index=self.index, address=ip, prefixlen=int(prefix or 32))
        except BaseException:
            self.close()
            raise

    def _iproute(self) -> Any:
        """An RTNL socket in the device's namespace, opened per use: set_link is
        rare, and a socket kept open would pin the namespace and collect events."""
        if self.netns is None:
            return IPRoute(groups=0)
        return IPRoute(groups=0, netns=self.netns, flags=0)  # flags=0: never create it

    def receive(self, max_frames: int) -> list[bytes]:
        frames: list[bytes] = []
        read, fd, size = os.read, self._fd, self._max_frame
        skip = VNET_HDR_SIZE if self.vnet_hdr else 0
        for _ in range(max_frames):
            try:
                data = read(fd, size + skip)
            except BlockingIOError:
                break
            if skip and len(data) >= skip and (data[1] != GSO_NONE or data[0] & VNET_NEEDS_CSUM):
                self.drops += 1  # offloaded before the guest turned offloads off
                continue
            frames.append(data[skip:])
        self.frames_in += len(frames)
        return frames

    def set_receive_offload(self, flags: int) -> None:
        """What the kernel may hand over (TUNSETOFFLOAD: TUN_F_CSUM partial
        checksums, TUN_F_TSO4/6 TCP GSO frames of up to GSO_MAX_FRAME
        bytes); 0 for whole, checksummed frames (vnet_hdr only)."""
        if not self.vnet_hdr:
            raise UsageError("receive offloads need a TAP device with vnet_hdr")
        if flags != self.rx_offload:
            fcntl.ioctl(self._fd, TUNSETOFFLOAD, flags)
            self.rx_offload = flags

    def receive_offloaded(self, max_frames: int) -> list[tuple[bytes, bytes]]:
        """Up to `max_frames` waiting frames with their virtio_net_hdr
        (vnet_hdr only): (header, frame), a GSO frame whole."""
        frames: list[tuple[bytes, bytes]] = []
        read, fd = os.read, self._fd
        size = VNET_HDR_SIZE + (GSO_MAX_FRAME if self.rx_offload else self._max_frame)
        for _ in range(max_frames):
            try:
                data = read(fd, size)
            except BlockingIOError:
                break
            frames.append((data[:VNET_HDR_SIZE], data[VNET_HDR_SIZE:]))
        self.frames_in += len(frames)
        return frames

    def send_offloaded(self, frames: Sequence[VnetFrame]) -> int:
        """Frames with their virtio_net_hdr (vnet_hdr only): a large send
        (gso_type set) may be up to GSO_MAX_FRAME bytes, one write each."""
        if not self.link_up or not self.vnet_hdr:
            self.drops += len(frames)
            return 0
        sent = 0
        for header, frame in frames:
            largest = self._max_frame if header[1] == 0 else GSO_MAX_FRAME
            if self._write(header, frame, largest):
                sent += 1
        self.frames_out += sent
        return sent

    def _write(self, header: bytes, frame: Frame, largest: int) -> bool:
        if not ETH_HLEN <= len(frame) <= largest:
            self.drops += 1
            return False
        try:
            if self.vnet_hdr:
                os.writev(self._fd, (header, frame))
            else:
                os.write(self._fd, frame)  # the kernel processes the frame before returning
        except OSError as error:
            if error.errno not in _TAP_DROPS:
                raise
            self.drops += 1
            return False
        return True

    def send(self, frames: Sequence[Frame]) -> int:
        if not self.link_up:
            self.drops += len(frames)
            return 0
        sent = 0
        if self.vnet_hdr:
            for frame in frames:
                sent += self._write(ZERO_HEADER, frame, self._max_frame)
            self.frames_out += sent
            return sent
        write, fd, largest = os.write, self._fd, self._max_frame
        for frame in frames:  # the common case, without a call per frame
            if not ETH_HLEN <= len(frame) <= largest:
                self.drops += 1
                continue
            try:
                write(fd, frame)  # the kernel processes the frame before returning
            except OSError as error:
                if error.errno not in _TAP_DROPS:
                    raise
                self.drops += 1
                continue
            sent += 1
        self.frames_out += sent
        return sent

    def set_link(self, up: bool) -> None:
        if up == self.link_up:
            return
        with self._iproute() as ipr:
            if up:  # carrier first, so the interface comes up with its link
                fcntl.ioctl(self._fd, TUNSETCARRIER, struct.pack("i", 1))
            ipr.link("set", index=self.index, state="up" if up else "down")
            if not up:
                fcntl.ioctl(self._fd, TUNSETCARRIER, struct.pack("i", 0))
        self.link_up = up
        self._share_link(up)
        self._link_changed(up)

    def fast_fd(self) -> int:
        """Each write is one frame, each read returns one: the compiled path may
        drive the descriptor itself (while the link is up)."""
        return self._fd

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._created_netns = False  # the parent's to remove: it made it

    def close(self) -> None:
        """Closing the descriptor deletes the (non-persistent) device (once
        every copy, the parent's and a worker's, is closed)."""
        super().close()
        if self._created_netns and self.netns is not None:
            self._created_netns = False
            _netns.remove(self.netns)
