"""A real Linux network stack behind a child's NIC: the child hands its
`NetAdapter` to the kernel as a TAP device in its own network namespace,
and frames are bridged both ways, so unmodified programs (ping, curl,
iperf3, a DHCP client) run "inside" the child over netvsc/netvsp.

    nic = NetAdapter(device)
    with LinuxStack(nic, address="10.210.0.2/24") as stack:
        subprocess.run(["ping", "-c", "3", "10.210.0.1"], check=True)

The TAP device takes the NIC's MAC (the host pins it: frames from another
address would be refused) and its MTU. When the host offers checksum
offload and LSOv2 (a netvsp over a TAP with IFF_VNET_HDR), the device does
too (IFF_VNET_HDR, TUNSETOFFLOAD): the kernel hands over TCP segments of up
to LSO_MAX_SIZE bytes with partial checksums, and each crosses the bus as
one large send (`NetAdapter.send_segment`); the other way it asks for
coalesced receives (RSC, `NetAdapter.coalesce_receives`), and the host's
TCP segments arrive as frames of up to 64 KiB, written to the device as GSO
with a virtio_net_hdr (`rsc.received_vnet_header`). One thread of the child runs the
bridge and is the only one to touch the adapter while the stack runs: it
sleeps on the TAP descriptor and the channel's doorbell together, reads up
to BATCH frames from the kernel per pass and hands them to `send_batch`,
and writes what the host delivered to the TAP.

The child needs CAP_NET_ADMIN in its own user and network namespaces and
/dev/net/tun: `Host.start(..., policy=Policy(net_admin=True))`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import struct
import threading
from typing import Any

from pyroute2 import IPRoute

from vmbus.errors import UsageError
from vmbus.protocols.net import offload as ol
from vmbus.protocols.net import rsc
from vsc.net.device import NetAdapter

__all__ = ["LinuxStack", "open_tap"]

# linux/if_tun.h (the asm-generic _IOW encoding: x86, arm).
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
IFNAMSIZ = 16
BATCH = 64  # frames taken from the kernel per pass
FRAME_MAX = 65535
# A write the kernel refuses (no memory, the device going down): the frame is lost, counted.
_TAP_DROPS = frozenset((errno.EAGAIN, errno.ENOBUFS, errno.ENOMEM, errno.EIO, errno.EINVAL))


def open_tap(name: str, offloads: int = -1) -> tuple[int, str]:
    """A TAP device (frames only, no packet information) in this process's
    network namespace: its descriptor (non-blocking) and the kernel's name.
    With `offloads` (TUN_F_* flags, 0 for none) each frame carries a
    virtio_net_hdr and the kernel may hand over what those flags allow."""
    encoded = name.encode()
    if len(encoded) >= IFNAMSIZ:
        raise UsageError(f"interface name {name!r} is longer than {IFNAMSIZ - 1} bytes")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if offloads >= 0 else 0)
    try:
        answer = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", encoded, flags))
        if offloads >= 0:
            fcntl.ioctl(fd, TUNSETOFFLOAD, offloads)
    except BaseException:
        os.close(fd)
        raise
    return fd, answer[:IFNAMSIZ].rstrip(b"\0").decode()


class LinuxStack:
    """The adapter as a TAP device of this namespace (`name`), bridged both
    ways by a thread of its own. `address` ("10.210.0.2/24") and `gateway`
    are set on it; loopback is brought up too."""

    def __init__(
        self,
        nic: NetAdapter,
        *,
        name: str = "eth0",
        address: str | None = None,
        gateway: str | None = None,
    ) -> None:
        self.nic = nic
        self.frames_to_kernel = 0
        self.frames_from_kernel = 0
        self.drops = 0  # frames the kernel refused
        self.large_sends = 0  # TCP segments sent as one LSOv2 send
        self.error: BaseException | None = None  # what stopped the bridge, if not stop()
        self.offload = _tun_offloads(nic.offloads)
        # Coalesced receives (RSC) need the device's virtio_net_hdr to enter the kernel as GSO.
        self.coalescing = self.offload >= 0 and nic.coalesce_receives()
        self.coalesced = 0  # frames the host coalesced, written to the kernel as one
        self._fd, self.name = open_tap(name, self.offload)
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread: threading.Thread | None = None
        try:
            self._configure(address, gateway)
        except BaseException:
            self._close_fds()
            raise

    def _configure(self, address: str | None, gateway: str | None) -> None:
        with IPRoute() as ipr:
            (loopback,) = ipr.link_lookup(ifname="lo")
            ipr.link("set", index=loopback, state="up")
            (self.index,) = ipr.link_lookup(ifname=self.name)
            mac = self.nic.mac.hex(":")
            ipr.link("set", index=self.index, address=mac, mtu=self.nic.mtu)
            if self.offload & (TUN_F_TSO4 | TUN_F_TSO6):  # a large send fits a send section
                ipr.link("set", index=self.index, gso_max_size=ol.LSO_MAX_SIZE)
            ipr.link("set", index=self.index, state="up")
            if address is not None:
                ip, _, prefix = address.partition("/")
                ipr.addr("add", index=self.index, address=ip, prefixlen=int(prefix or 32))
            if gateway is not None:
                ipr.route("add", dst="default", gateway=gateway)

    # --- running ---

    def start(self) -> LinuxStack:
        if self._thread is not None:
            raise UsageError("the stack is running already")
        self._thread = threading.Thread(target=self._run, name=f"stack-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the bridge (the adapter is the caller's again) and remove the device."""
        thread, self._thread = self._thread, None
        if thread is not None:
            with contextlib.suppress(BlockingIOError):
                os.write(self._stop_w, b"\0")
            thread.join()
        self._close_fds()

    def __enter__(self) -> LinuxStack:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _close_fds(self) -> None:
        for fd in (self._fd, self._stop_r, self._stop_w):
            if fd >= 0:
                os.close(fd)
        self._fd = self._stop_r = self._stop_w = -1

    def _run(self) -> None:
        try:
            self._bridge()
        except BaseException as error:  # the child learns of it through `error`
            self.error = error

    def _bridge(self) -> None:
        nic, fd, stop = self.nic, self._fd, self._stop_r
        channel = nic.channel
        doorbell = channel.wake_me.fileno()
        read, size = os.read, FRAME_MAX
        while True:
            moved = self._to_kernel()
            batch: list[bytes] = []
            for _ in range(BATCH):
                try:
                    batch.append(read(fd, size))
                except BlockingIOError:
                    break
            if batch:
                if self.offload >= 0:
                    self._send_offloaded(batch)
                else:
                    nic.send_batch(batch)
                self.frames_from_kernel += len(batch)
                moved += len(batch)
            if moved:
                continue
            # Nothing either way: sleep on both, unmasked (and looked at once more).
            reader = channel.reader
            reader.end_drain()
            try:
                if not reader.bytes_available and not nic.frames:
                    ready = select.select([fd, doorbell, stop], [], [])[0]
                    if stop in ready:
                        return
                    if doorbell in ready:
                        channel.wake_me.clear()
            finally:
                reader.begin_drain()

    def _to_kernel(self) -> int:
        """What the host delivered, written to the TAP device."""
        nic, fd, mtu = self.nic, self._fd, self.nic.mtu
        count = 0
        vnet = self.offload >= 0
        writev, zero, received, header_for = (
            os.writev,
            ol.ZERO_HEADER,
            rsc.Received,
            rsc.received_vnet_header,
        )
        frame = nic.poll()  # takes in what the channel holds (completions free sections too)
        while frame is not None:
            try:
                if not vnet:
                    os.write(fd, frame)
                elif type(frame) is received:
                    writev(fd, (header_for(frame, frame.checksum_ok, mtu), frame))
                    self.coalesced += frame.coalesced
                else:
                    writev(fd, (zero, frame))
            except OSError as error:
                if error.errno not in _TAP_DROPS:
                    raise
                self.drops += 1
            count += 1
            frame = nic.poll()
        self.frames_to_kernel += count
        return count

    def _send_offloaded(self, batch: list[bytes]) -> None:
        """Frames read with their virtio_net_hdr: a TCP segment goes as one
        large send, a partial checksum as a checksum offload, the rest as
        plain frames (in order: the plain ones before each offloaded one)."""
        nic, plain = self.nic, list[Any]()
        for data in batch:
            flags, gso_type, _, gso_size, start, offset = ol.VNET_HDR.unpack_from(data)
            frame = memoryview(data)[ol.VNET_HDR_SIZE :]
            kind = gso_type & 0x7F  # less the ECN bit
            if kind == ol.GSO_NONE:
                if flags & ol.VNET_NEEDS_CSUM:  # an ACK, mostly: summed here, sent in the batch
                    plain.append(complete_checksum(frame, start, offset))
                else:
                    plain.append(frame)
                continue
            if plain:
                nic.send_batch(plain)
                plain = []
            try:
                if kind in (ol.GSO_TCPV4, ol.GSO_TCPV6):
                    nic.send_segment(frame, mss=gso_size)
                    self.large_sends += 1
                else:
                    self.drops += 1  # UDP fragmentation offload: never enabled
            except UsageError:
                self.drops += 1  # not a frame the host can offload: TCP sends it again
        if plain:
            nic.send_batch(plain)

    def stats(self) -> dict[str, Any]:
        return {
            "frames_to_kernel": self.frames_to_kernel,
            "frames_from_kernel": self.frames_from_kernel,
            "large_sends": self.large_sends,
            "coalesced": self.coalesced,
            "drops": self.drops,
            "offload": self.offload,
        }


complete_checksum = rsc.complete_checksum  # (its old home)


def _tun_offloads(offloads: ol.Offloads) -> int:
    """The TUN_F_* flags the host's offloads allow, or -1 for a device
    without a virtio_net_hdr (no checksum offload both for TCP and UDP)."""
    if not (offloads.tx_tcp4 and offloads.tx_udp4):
        return -1
    flags = TUN_F_CSUM
    if offloads.tx_tcp6 and offloads.tx_udp6:
        flags |= TUN_F_TSO6 if offloads.lso6 else 0
    else:
        return -1  # the kernel would hand over IPv6 partial sums we cannot offload
    return flags | (TUN_F_TSO4 if offloads.lso4 else 0)
