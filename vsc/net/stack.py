"""A real Linux network stack behind a child's NIC: the child hands its
`NetAdapter` to the kernel as a TAP device in its own network namespace,
and frames are bridged both ways, so unmodified programs (ping, curl,
iperf3, a DHCP client) run "inside" the child over netvsc/netvsp.

    nic = NetAdapter(device)
    with LinuxStack(nic, address="10.210.0.2/24") as stack:
        subprocess.run(["ping", "-c", "3", "10.210.0.1"], check=True)

The TAP device takes the NIC's MAC (the host pins it: frames from another
address would be refused) and its MTU. One thread of the child runs the
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
from vsc.net.device import NetAdapter

__all__ = ["LinuxStack", "open_tap"]

# linux/if_tun.h (the asm-generic _IOW encoding: x86, arm).
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
BATCH = 64  # frames taken from the kernel per pass
FRAME_MAX = 65535
# A write the kernel refuses (no memory, the device going down): the frame is lost, counted.
_TAP_DROPS = frozenset((errno.EAGAIN, errno.ENOBUFS, errno.ENOMEM, errno.EIO, errno.EINVAL))


def open_tap(name: str) -> tuple[int, str]:
    """A TAP device (frames only, no packet information) in this process's
    network namespace: its descriptor (non-blocking) and the kernel's name."""
    encoded = name.encode()
    if len(encoded) >= IFNAMSIZ:
        raise UsageError(f"interface name {name!r} is longer than {IFNAMSIZ - 1} bytes")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        answer = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", encoded, IFF_TAP | IFF_NO_PI))
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
        self.error: BaseException | None = None  # what stopped the bridge, if not stop()
        self._fd, self.name = open_tap(name)
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
            ipr.link("set", index=self.index, address=mac, mtu=self.nic.mtu, state="up")
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
        nic, fd, write = self.nic, self._fd, os.write
        count = 0
        frame = nic.poll()  # takes in what the channel holds (completions free sections too)
        while frame is not None:
            try:
                write(fd, frame)
            except OSError as error:
                if error.errno not in _TAP_DROPS:
                    raise
                self.drops += 1
            count += 1
            frame = nic.poll()
        self.frames_to_kernel += count
        return count

    def stats(self) -> dict[str, Any]:
        return {
            "frames_to_kernel": self.frames_to_kernel,
            "frames_from_kernel": self.frames_from_kernel,
            "drops": self.drops,
        }
