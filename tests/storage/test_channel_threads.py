"""Sub-channels served by threads of their own: what the channels of one
controller share stays consistent when two run at once (a disk's unit
attention and counters, the protocol), sub-channels are asked for on the
primary only, an I/O pool can ring a channel's own doorbell, and a child's
I/O over sub-channels on threads matches a model, through the real worker."""

from __future__ import annotations

import errno
import functools
import os
import random
import select
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from vmbus import guid, handoff
from vmbus.errors import UsageError
from vmbus.guest import Guest, GuestDevice
from vmbus.partition import Host
from vmbus.protocols.storage import (
    CreateSubChannels,
    StorvscProtocol,
    StorvspProtocol,
    VstorPacket,
)
from vmbus.protocols.storage.scsi_wire import CAPACITY_DATA_HAS_CHANGED, CHECK_CONDITION, GOOD
from vmbus.protocols.storage.vsp import Reply
from vmbus.protocols.storage.wire import STATUS_INVALID_DEVICE_STATE
from vsc.storage import StorageController
from vsp.storage import DirectBackend, RamBackend, RawFileBackend, ScsiDisk, StorVsp
from vsp.storage.device import (
    StorvspChannel,
    StorvspSubChannel,
    StorvspThreadedPrimary,
)
from vsp.storage.offers import SubChannelOffers
from vsp.storage.pool import IoPool

MIB = 1 << 20
TEST_UNIT_READY = bytes(6)
UNSUPPORTED = bytes([0xFF]) + bytes(5)  # no such opcode: CHECK CONDITION every time


@pytest.fixture
def fine_switching() -> Iterator[None]:
    """Threads switch as often as CPython lets them: races show up."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def racing(threads: int, work: object) -> None:
    start = threading.Barrier(threads)

    def run() -> None:
        start.wait()
        work()  # type: ignore[operator]

    runners = [threading.Thread(target=run) for _ in range(threads)]
    for runner in runners:
        runner.start()
    for runner in runners:
        runner.join()


@pytest.mark.usefixtures("fine_switching")
def test_a_unit_attention_is_reported_once_to_channels_racing_for_it() -> None:
    disk = ScsiDisk(RamBackend(MIB))
    for _ in range(50):
        disk.notify_capacity_changed()
        results: list[int] = []
        racing(4, lambda out=results: out.append(disk.execute(TEST_UNIT_READY).status))
        assert sorted(results) == [GOOD, GOOD, GOOD, CHECK_CONDITION]
    assert disk.check_conditions == 50
    assert disk.execute(TEST_UNIT_READY).status == GOOD


@pytest.mark.usefixtures("fine_switching")
def test_check_conditions_from_racing_channels_are_all_counted() -> None:
    disk = ScsiDisk(RamBackend(MIB))

    def fail_many() -> None:
        for _ in range(500):
            assert disk.execute(UNSUPPORTED).status == CHECK_CONDITION

    racing(4, fail_many)
    assert disk.check_conditions == 2000


def test_a_disk_with_a_pending_unit_attention_crosses_with_it() -> None:
    disk = ScsiDisk(RamBackend(MIB))
    disk.notify_capacity_changed()
    data, fds = handoff.dumps(disk)
    copy = handoff.loads(data, [os.dup(fd) for fd in fds])
    sense = copy.execute(TEST_UNIT_READY).sense
    assert copy.unit_attention is None and sense == CAPACITY_DATA_HAS_CHANGED.fixed()


def test_sub_channels_asked_for_on_a_sub_channel_are_refused() -> None:
    vsp = StorvspProtocol(0x40000, 4)
    vsc = StorvscProtocol()
    packet: bytes | None = vsc.start()
    while packet is not None:
        event = vsp.receive(packet)
        assert isinstance(event, Reply)
        packet = vsc.receive(event.payload)
    request = vsc.create_sub_channels(2)
    refused = vsp.receive(request, primary=False)
    assert isinstance(refused, Reply) and refused.error
    assert VstorPacket.decode(refused.payload).status == STATUS_INVALID_DEVICE_STATE
    assert vsp.errors == {"bad_sub_channels": 1} and vsp.sub_channels == 0
    assert isinstance(vsp.receive(request), CreateSubChannels)  # on the primary: offered


def test_a_pool_rings_the_doorbell_it_is_given_and_leaves_it_to_the_channel() -> None:
    doorbell = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        pool = IoPool(threads=2, notify=doorbell)
        pool.submit("tag", lambda: 42)
        assert select.select([doorbell], [], [], 30)[0] == [doorbell]
        assert pool.completions() == [("tag", 42, None)] and pool.in_flight == 0
        # Not read by the pool: the channel's thread, woken by it, clears it.
        assert os.eventfd_read(doorbell) == 1
        pool.close()
        os.eventfd_write(doorbell, 1)  # still open: the caller's
    finally:
        os.close(doorbell)


def test_channels_have_threads_of_their_own_where_the_compiled_loop_serves_them() -> None:
    assert StorvspSubChannel.own_thread and StorvspThreadedPrimary.own_thread
    assert not StorvspChannel.own_thread  # channel_threads=False, or no loop to offer for it


def test_a_threaded_primarys_sub_channel_offers_are_made_by_the_loop_it_wakes() -> None:
    """CREATE_SUB_CHANNELS on a primary served by its own thread: that
    thread only asks; the offers are made when the worker's loop runs the
    callback of the descriptor it watches (the loop alone talks to the
    control plane), each sub-channel once."""
    watched: dict[int, Any] = {}
    offered: list[int] = []
    context = SimpleNamespace(
        watch=watched.__setitem__,
        unwatch=watched.pop,
        add_offer=lambda offer: offered.append(offer.sub_channel_index),
    )
    vsp = StorVsp([RamBackend(MIB)], channels=4)
    offer = functools.partial(vsp.offer_sub_channels, context=context)
    offers = SubChannelOffers(offer, context)  # type: ignore[arg-type]
    asker = threading.Thread(target=offers.request, args=(2,))
    asker.start()
    asker.join()
    assert offered == [] and list(watched) == [offers.fd]
    assert select.select([offers.fd], [], [], 5)[0]  # the loop is woken
    watched[offers.fd]()
    offers.request(3)
    watched[offers.fd]()
    watched[offers.fd]()  # woken with nothing asked: nothing more
    assert offered == [1, 2, 3]
    offers.close()
    assert watched == {} and offers.fd == -1


def test_a_primary_where_nothing_can_be_watched_stays_on_the_callers_thread() -> None:
    def no_watch(fd: int, callback: Any) -> None:
        raise UsageError("this context has no worker to watch descriptors")

    context = SimpleNamespace(watch=no_watch)
    assert SubChannelOffers(print, context).fd == -1  # type: ignore[arg-type]


def spread_io(guest: Guest, seed: int, luns: int) -> None:
    """Child: random batches over a controller with 3 sub-channels, every
    read checked against a model of each disk."""
    devices: list[GuestDevice] = []
    guest.register(guid.SCSI, devices.append)
    (device,) = [d for d in devices if d.sub_channel_index == 0]
    controller = StorageController(device, queue_depth=16, max_io_bytes=64 << 10)
    assert controller.create_sub_channels(3) == 3
    rng = random.Random(seed)
    for lun in range(luns):
        disk = controller.disk(lun)
        model = bytearray(disk.capacity)
        for _ in range(6):
            writes = []
            for slot in rng.sample(range(disk.capacity // (64 << 10)), 12):
                offset = slot * (64 << 10) + rng.randrange(16) * 4096
                writes.append((offset, rng.randbytes(rng.randint(1, 8) * 4096)))
            disk.write_many(writes)
            for offset, data in writes:
                model[offset : offset + len(data)] = data
            reads = [(offset, bytearray(len(data))) for offset, data in writes]
            disk.read_many(reads)
            for offset, buffer in reads:
                assert buffer == model[offset : offset + len(buffer)], f"LUN {lun} at {offset}"
        whole = bytearray(disk.capacity)
        disk.read_into(0, whole)
        assert whole == model
    controller.close()


def test_io_over_sub_channels_on_their_own_threads_matches_a_model(tmp_path: Path) -> None:
    backends: list[object] = [
        RawFileBackend(tmp_path / "raw.img", size=4 * MIB),
        RamBackend(4 * MIB),
    ]
    try:
        backends.append(DirectBackend(tmp_path / "direct.img", size=4 * MIB))  # overlapped
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise
    try:
        with Host() as host:
            vsp = StorVsp(backends, channels=4)  # type: ignore[arg-type]
            child = host.start(spread_io, devices=[vsp], args=(7, len(backends)))
            assert child.wait(timeout=120) == 0
            (stats,) = child.device_stats()
        assert stats["errors"] == 0 and stats["open_channels"] == 0
        served = stats["requests_by_channel"]
        assert sorted(served) == ["0", "1", "2", "3"] and all(served.values())
        assert stats["fast_path_requests"] > 0
        if len(backends) == 3:
            assert stats["overlapped_requests"] > 0  # the pools of channel threads
    finally:
        for backend in backends:
            close = getattr(backend, "close", None)
            if close is not None:
                close()
