"""The guest side of the VMBus control protocol: negotiate a version, take
the host's offers, bind VSC drivers to them by class GUID (as Linux's vmbus
driver core does), and open channels in guest memory through GPADLs.

A reader thread takes the host's messages off the port; calls that wait for
an answer (version, GPADL_CREATED, OPENCHANNEL_RESULT, ...) block on it.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from vmbus import messages as m
from vmbus.channel import DEFAULT_SPIN_SECONDS, Channel
from vmbus.errors import VmbusError
from vmbus.memory import PAGE_SIZE, GuestMemory, MappedRegion, PageAllocator, map_channel_rings
from vmbus.ring import init_ring
from vmbus.transport import MessagePort, PortClosed, Signal

log = logging.getLogger(__name__)

FIRST_GPADL = 0xE1E10  # where Linux starts its GPADL handles
DEFAULT_RING_SIZE = 64 * 1024  # bytes per direction, header page included
DEFAULT_TIMEOUT = 10.0


class GuestError(VmbusError):
    """The host refused or did not answer a control request."""


Driver = Callable[["GuestDevice"], Any]


@dataclass
class GuestDevice:
    """An offer from the host, with the driver bound to it (if any)."""

    guest: Guest
    offer: m.OfferChannel
    driver: Any = None
    rescinded: bool = False
    channels: list[GuestChannel] = field(default_factory=list)  # open ones

    @property
    def relid(self) -> int:
        return self.offer.child_relid

    @property
    def class_id(self) -> UUID:
        return self.offer.if_type

    @property
    def instance_id(self) -> UUID:
        return self.offer.if_instance

    @property
    def sub_channel_index(self) -> int:
        return self.offer.sub_channel_index

    def open(
        self,
        send_size: int = DEFAULT_RING_SIZE,
        receive_size: int = DEFAULT_RING_SIZE,
        userdata: bytes = b"",
        spin_seconds: float = DEFAULT_SPIN_SECONDS,
    ) -> GuestChannel:
        """Grant ring memory through a GPADL and open the channel."""
        return self.guest.open_channel(self, send_size, receive_size, userdata, spin_seconds)


class GuestChannel(Channel):
    """An open channel in guest memory; `close()` gives the memory back."""

    def __init__(
        self,
        device: GuestDevice,
        gpadl: int,
        pfns: list[int],
        rings: tuple[MappedRegion, MappedRegion],
        signals: tuple[Signal, Signal],
        spin_seconds: float,
    ) -> None:
        self.device, self.gpadl, self.pfns, self.rings = device, gpadl, pfns, rings
        self.views = [region.view() for region in rings]
        super().__init__(
            self.views[0], self.views[1], *signals, mirrored=True, spin_seconds=spin_seconds
        )
        self.closed = False

    def close(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """CLOSECHANNEL, then tear down the ring GPADL and free its pages."""
        if self.closed:
            return
        self.closed = True
        device, guest = self.device, self.device.guest
        if not device.rescinded:
            guest.post(m.CloseChannel(child_relid=device.relid))
        try:
            guest.teardown_gpadl(device.relid, self.gpadl, timeout)
        finally:
            del self.writer, self.reader  # release the ring buffers before unmapping
            for view in self.views:
                view.release()
            for region in self.rings:
                region.close()
            self.notify_peer.close()
            self.wake_me.close()
            guest.allocator.free(self.pfns)
            guest.channel_closed(self)


class Guest:
    """The VMBus client of one child partition."""

    def __init__(self, port: MessagePort, memory: GuestMemory) -> None:
        self.port = port
        self.memory = memory
        self.allocator = PageAllocator(memory)
        self.drivers: dict[UUID, Driver] = {}
        self.devices: dict[int, GuestDevice] = {}
        self.version: int | None = None
        self._gpadl_ids = itertools.count(FIRST_GPADL)
        self._answers: dict[object, tuple[m.Message, list[int]]] = {}
        self._arrived = threading.Condition()
        self._closed = False
        self._closing = False
        # Set when the host closes the port (it died or dropped us), not when we do.
        self.host_gone = threading.Event()
        self._reader = threading.Thread(target=self._read_messages, daemon=True, name="vmbus")
        self._reader.start()

    # --- messages ---

    def post(self, message: m.Message) -> None:
        self.port.post(m.encode(message))

    def _read_messages(self) -> None:
        try:
            while True:
                received = self.port.receive()
                if received is not None:
                    self._dispatch(*received)
        except PortClosed:
            if not self._closing:
                self.host_gone.set()
        finally:
            with self._arrived:
                self._closed = True
                self._arrived.notify_all()

    def _dispatch(self, payload: bytes, fds: list[int]) -> None:
        try:
            message = m.decode(payload)
        except m.MessageError as error:
            log.warning("host sent a bad message: %s", str(error))
            return
        if isinstance(message, m.OfferChannel):
            self._offered(message)
        elif isinstance(message, m.RescindChannelOffer):
            self._rescinded(message.child_relid)
        key = _answer_key(message)
        if key is not None:
            with self._arrived:
                self._answers[key] = (message, fds)
                self._arrived.notify_all()

    def _wait(self, key: object, timeout: float) -> tuple[m.Message, list[int]]:
        with self._arrived:
            if not self._arrived.wait_for(lambda: key in self._answers or self._closed, timeout):
                raise GuestError(f"no answer from the host for {key}")
            if key not in self._answers:
                raise GuestError("the host closed the connection")
            return self._answers.pop(key)

    # --- connection and offers ---

    def register(self, class_id: UUID, driver: Driver) -> None:
        """Bind `driver(device)` to every offer of this class, now and later."""
        self.drivers[class_id] = driver
        for device in self.devices.values():
            if device.class_id == class_id and device.driver is None:
                device.driver = driver(device)

    def connect(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Negotiate the newest version the host accepts, then take its offers."""
        for version in m.GUEST_VERSION_ORDER:
            self.post(m.InitiateContact(vmbus_version_requested=version, interrupt_page=2))
            response, _ = self._wait(m.VersionResponse, timeout)
            assert isinstance(response, m.VersionResponse)
            if response.version_supported:
                self.version = version
                break
        else:
            raise GuestError("the host accepts none of our VMBus versions")
        self.post(m.RequestOffers())
        self._wait(m.AllOffersDelivered, timeout)
        for device in list(self.devices.values()):
            self._bind(device)
        return version

    def _offered(self, offer: m.OfferChannel) -> None:
        device = GuestDevice(self, offer)
        self.devices[offer.child_relid] = device
        if self.version is not None:  # a late offer, e.g. a sub-channel
            self._bind(device)

    def _bind(self, device: GuestDevice) -> None:
        driver = self.drivers.get(device.class_id)
        if driver is not None and device.driver is None:
            device.driver = driver(device)

    def _rescinded(self, relid: int) -> None:
        """The host removed a device. As Linux's vmbus core does, tell its
        driver (`on_rescind`, if it has one), make a wait on its channels
        raise DeviceRemoved, and release the relid once no channel of it is
        open: the driver closes them."""
        device = self.devices.get(relid)
        if device is None or device.rescinded:
            log.warning("host rescinded relid %d, which it does not offer", relid)
            return
        device.rescinded = True
        for channel in list(device.channels):
            channel.remove()
        on_rescind = getattr(device.driver, "on_rescind", None)
        if on_rescind is not None:
            try:
                on_rescind()
            except Exception:  # the driver's bug: the bus goes on
                log.exception("the driver of relid %d failed on its removal", relid)
        if not device.channels:
            self._release(device)

    def channel_closed(self, channel: GuestChannel) -> None:
        device = channel.device
        if channel in device.channels:
            device.channels.remove(channel)
        if device.rescinded and not device.channels:
            self._release(device)

    def _release(self, device: GuestDevice) -> None:
        if self.devices.pop(device.relid, None) is device:  # once, whichever thread is first
            self.post(m.RelidReleased(child_relid=device.relid))

    def unload(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.post(m.Unload())
        self._wait(m.UnloadResponse, timeout)

    def close(self) -> None:
        self._closing = True
        self.port.close()
        if self._reader is not threading.current_thread():
            self._reader.join(1.0)  # it sees the close and ends

    # --- channels ---

    def open_channel(
        self,
        device: GuestDevice,
        send_size: int,
        receive_size: int,
        userdata: bytes,
        spin_seconds: float,
    ) -> GuestChannel:
        for size in (send_size, receive_size):
            if size % PAGE_SIZE or size < 2 * PAGE_SIZE:
                raise ValueError(f"ring size {size} is not a multiple of 4 KiB of 2+ pages")
        send_pages = send_size // PAGE_SIZE
        pfns = self.allocator.alloc(send_pages + receive_size // PAGE_SIZE, contiguous=False)
        try:
            rings = map_channel_rings(self.memory, pfns, send_pages)
        except BaseException:
            self.allocator.free(pfns)
            raise
        try:
            for region in rings:
                view = region.view()
                init_ring(view)
                view.release()
            gpadl = self.create_gpadl(device.relid, pfns)
            self.post(
                m.OpenChannel(
                    child_relid=device.relid,
                    openid=device.relid,
                    ringbuffer_gpadlhandle=gpadl,
                    downstream_ringbuffer_pageoffset=send_pages,
                    userdata=userdata,
                )
            )
            result, fds = self._wait((m.OpenChannelResult, device.relid), DEFAULT_TIMEOUT)
            assert isinstance(result, m.OpenChannelResult)
            if result.status or len(fds) != 2:
                raise GuestError(f"host refused to open relid {device.relid}: {result.status:#x}")
        except BaseException:
            for region in rings:
                region.close()
            self.allocator.free(pfns)
            raise
        wake_me, notify_host = Signal(fds[0]), Signal(fds[1])
        channel = GuestChannel(device, gpadl, pfns, rings, (notify_host, wake_me), spin_seconds)
        device.channels.append(channel)
        return channel

    def create_gpadl(self, relid: int, pfns: list[int], timeout: float = DEFAULT_TIMEOUT) -> int:
        """Grant pages to the host; its handle once the host created it."""
        handle = next(self._gpadl_ids)
        for message in m.gpadl_messages(relid, handle, len(pfns) * PAGE_SIZE, pfns):
            self.post(message)
        created, _ = self._wait((m.GpadlCreated, handle), timeout)
        assert isinstance(created, m.GpadlCreated)
        if created.creation_status:
            raise GuestError(f"host refused GPADL {handle:#x}: {created.creation_status:#x}")
        return handle

    def teardown_gpadl(self, relid: int, handle: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.post(m.GpadlTeardown(child_relid=relid, gpadl=handle))
        self._wait((m.GpadlTorndown, handle), timeout)


def _answer_key(message: m.Message) -> object | None:
    """How a waiter names the answer it waits for."""
    if isinstance(message, m.GpadlCreated):
        return (m.GpadlCreated, message.gpadl)
    if isinstance(message, m.GpadlTorndown):
        return (m.GpadlTorndown, message.gpadl)
    if isinstance(message, m.OpenChannelResult):
        return (m.OpenChannelResult, message.child_relid)
    if isinstance(message, m.VersionResponse | m.AllOffersDelivered | m.UnloadResponse):
        return type(message)
    return None
