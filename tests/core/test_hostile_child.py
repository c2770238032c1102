"""A hostile child, in a real process: whatever it writes into its rings or
sends as messages, the parent keeps serving it where the protocol allows,
fails only the offending channel, and its siblings never notice."""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import time
from pathlib import Path

import pytest

from vmbus import messages as m
from vmbus.channel import COMPLETION_REQUESTED, Channel
from vmbus.device import OpenContext
from vmbus.guest import Guest, GuestError
from vmbus.partition import Host, wait_until
from vmbus.protocols.echo import ECHO_CLASS_ID
from vmbus.transport import SYNIC_HEADER
from vsc.echo import EchoVsc
from vsp.echo import EchoHandler, EchoVsp


def bind_echo(guest: Guest) -> list[EchoVsc]:
    drivers: list[EchoVsc] = []
    guest.register(ECHO_CLASS_ID, lambda device: drivers.append(EchoVsc(device)))
    return drivers


def corrupt_one_ring(guest: Guest) -> None:
    """Child: of two echo channels, corrupt the first one's outbound ring;
    the host must rescind it and keep serving the second."""
    bad, good = bind_echo(guest)
    bad_channel, good_channel = bad.open(), good.open()
    assert bad.echo(b"fine").startswith(b"fine")
    struct.pack_into("<I", bad_channel.views[0], 0, 12)  # misaligned write_index
    bad_channel.notify_peer.set()
    deadline = time.monotonic() + 10
    while not bad.device.rescinded:
        assert time.monotonic() < deadline, "the host did not rescind the corrupt channel"
        time.sleep(0.01)
    for i in range(100):
        assert good.echo(b"%d" % i).startswith(b"%d" % i)
    good_channel.close()


def corrupt_one_ring_while_polled(guest: Guest) -> None:
    """Child: corrupt a ring without signalling, so only the parent's poll
    loop can notice; it must rescind that channel alone, not let the error
    end its worker (which took every channel of the child down)."""
    bad, good = bind_echo(guest)
    bad_channel, good_channel = bad.open(), good.open()
    assert bad.echo(b"fine").startswith(b"fine")
    struct.pack_into("<I", bad_channel.views[0], 0, 12)  # misaligned write_index, no doorbell
    deadline = time.monotonic() + 10
    while not bad.device.rescinded:
        assert time.monotonic() < deadline, "the poll loop did not rescind the corrupt channel"
        time.sleep(0.01)
    for i in range(100):
        assert good.echo(b"%d" % i).startswith(b"%d" % i)
    good_channel.close()


def fill_the_eventfd_the_parent_signals(guest: Guest) -> None:
    """Child: keep the counter of the eventfd the parent rings at its maximum
    (a second thread refills it), so the parent's doorbells would fail;
    service must go on."""
    driver, _ = bind_echo(guest)
    # No spinning: every reply needs the parent's doorbell.
    channel = driver.channel = driver.device.open(64 << 10, 64 << 10, spin_seconds=0)
    done = threading.Event()

    def refill() -> None:
        while not done.is_set():
            with contextlib.suppress(BlockingIOError):  # already full
                os.eventfd_write(channel.wake_me.fileno(), 0xFFFF_FFFF_FFFF_FFFE)

    filler = threading.Thread(target=refill)
    filler.start()
    try:
        for i in range(300):
            assert driver.echo(b"%d" % i).startswith(b"%d" % i)
    finally:
        done.set()
        filler.join()
    channel.close()


def send_garbage_messages(guest: Guest) -> None:
    """Child: bad frames and bad messages, then normal service."""
    sock = guest.port.sock  # type: ignore[attr-defined]
    sock.send(b"\x01")  # shorter than a SynIC header
    sock.send(SYNIC_HEADER.pack(1, 200, 0, 0, 0) + bytes(8))  # lies about its size
    sock.send(SYNIC_HEADER.pack(1, 240, 0, 0, 0) + bytes(400))  # oversized
    guest.port.post(struct.pack("<II", 99, 0))  # unknown message type
    guest.port.post(b"\x05\x00")  # OPENCHANNEL cut short
    guest.post(m.OfferChannel())  # host-to-guest direction
    guest.post(m.CloseChannel(child_relid=77))  # nothing open
    guest.post(m.RelidReleased(child_relid=1))  # nothing rescinded
    guest.post(m.InitiateContact(vmbus_version_requested=m.VmbusVersion.WIN10_V5_3))
    drivers = bind_echo(guest)
    assert drivers[0].echo(b"still served").startswith(b"still served")


def misuse_gpadls_and_opens(guest: Guest) -> None:
    """Child: a GPADL beyond its memory, a reused handle, an open of an
    unknown relid; each refused with the protocol's status."""
    device = next(iter(guest.devices.values()))
    beyond = guest.memory.page_count + 5
    with pytest.raises(GuestError, match="refused GPADL"):
        guest.create_gpadl(device.relid, [1, 2, beyond])
    handle = guest.create_gpadl(device.relid, guest.allocator.alloc(4))
    for message in m.gpadl_messages(device.relid, handle, 4096, [3]):
        guest.post(message)  # the same handle again
    created, _ = guest._wait((m.GpadlCreated, handle), 10)
    assert isinstance(created, m.GpadlCreated) and created.creation_status != 0
    guest.post(m.OpenChannel(child_relid=4242, openid=4242, ringbuffer_gpadlhandle=handle))
    result, _ = guest._wait((m.OpenChannelResult, 4242), 10)
    assert isinstance(result, m.OpenChannelResult) and result.status != 0
    guest.post(
        m.OpenChannel(
            child_relid=device.relid,
            openid=1,
            ringbuffer_gpadlhandle=handle,
            downstream_ringbuffer_pageoffset=3,
        )
    )  # leaves a 1-page ring
    result, _ = guest._wait((m.OpenChannelResult, device.relid), 10)
    assert isinstance(result, m.OpenChannelResult) and result.status != 0
    assert EchoVsc(device).echo(b"ok").startswith(b"ok")


def echo_steadily(guest: Guest, count: int) -> None:
    (driver,) = bind_echo(guest)
    for i in range(count):
        assert driver.echo(b"%d" % i).startswith(b"%d" % i)


@pytest.mark.parametrize(
    ("target", "expected_errors", "channels_left"),
    [
        (corrupt_one_ring, 0, 1),
        (corrupt_one_ring_while_polled, 0, 1),
        (fill_the_eventfd_the_parent_signals, 0, 2),
        (send_garbage_messages, 8, 2),
        (misuse_gpadls_and_opens, 4, 2),
    ],
)
def test_hostile_child_fails_alone(
    target: object, expected_errors: int, channels_left: int
) -> None:
    with Host() as host:
        sibling_vsp = EchoVsp()
        sibling = host.start(echo_steadily, devices=[sibling_vsp], args=(3000,))
        hostile = host.start(target, devices=[EchoVsp(count=2)])  # type: ignore[arg-type]
        assert hostile.wait(timeout=60) == 0, "the hostile child's own checks failed"
        assert hostile.server.protocol_errors >= expected_errors
        # A corrupt ring costs that channel (rescinded, then released) only.
        assert len(hostile.server.channels) == channels_left
        assert sibling.wait(timeout=60) == 0
        assert sibling_vsp.handlers[0].packets == 3000
        assert sibling.server.protocol_errors == 0


def linger(guest: Guest) -> None:
    time.sleep(30)


def test_child_cannot_see_a_siblings_memory() -> None:
    with Host() as host:
        first = host.start(linger, devices=[EchoVsp()])
        second = host.start(linger, devices=[EchoVsp()])
        assert wait_until(lambda: first.state == "running" and second.state == "running", 30)
        maps = Path(f"/proc/{second.pid}/maps").read_text()
        assert f"vmbus-{second.name}" in maps  # its own guest memory is mapped
        assert f"vmbus-{first.name}" not in maps
        fd_dir = f"/proc/{second.pid}/fd"
        targets = [os.readlink(f"{fd_dir}/{fd}") for fd in os.listdir(fd_dir)]
        assert any(f"vmbus-{second.name}" in t for t in targets)
        assert not any(f"vmbus-{first.name}" in t for t in targets), targets


def die_right_after_asking_to_open(guest: Guest) -> None:
    """Child: grant a ring, ask to open the channel, and die before the answer."""
    device = next(iter(guest.devices.values()))
    pfns = guest.allocator.alloc(8, contiguous=False)
    gpadl = guest.create_gpadl(device.relid, pfns)
    guest.post(
        m.OpenChannel(
            child_relid=device.relid,
            openid=device.relid,
            ringbuffer_gpadlhandle=gpadl,
            downstream_ringbuffer_pageoffset=4,
        )
    )
    os._exit(0)


class SlowToOpenEcho(EchoVsp):
    """Takes its time to open, so the child is surely gone before the reply."""

    def open(self, channel: Channel, context: OpenContext) -> EchoHandler:
        time.sleep(0.2)
        return super().open(channel, context)


def _parent_resources() -> tuple[int, int]:
    """The parent's open descriptors and mappings."""
    fds = len(os.listdir("/proc/self/fd"))
    maps = Path("/proc/self/maps").read_text().count("\n")
    return fds, maps


def test_child_that_dies_right_after_asking_to_open_leaks_nothing() -> None:
    """The open's reply finds the child gone; cleanup must still release the
    channel's rings, signals and the whole partition (it raised KeyError)."""
    with Host() as host:
        warm = host.start(die_right_after_asking_to_open, devices=[SlowToOpenEcho()])
        warm.wait(timeout=30)
        baseline = _parent_resources()
        for _ in range(5):
            child = host.start(die_right_after_asking_to_open, devices=[SlowToOpenEcho()])
            assert child.wait(timeout=30) == 0
            assert child.state == "exited" and not child.channels
            assert child.memory.closed
        fds, maps = _parent_resources()
        assert fds <= baseline[0] + 2, "descriptors leaked"
        assert maps <= baseline[1] + 8, "mappings leaked"


def flood_and_never_read(guest: Guest) -> None:
    """Child: fill both rings (requests it sends, replies it never reads),
    then sit still; the parent must not spin on the requests it cannot take."""
    driver, _ = bind_echo(guest)
    channel = driver.channel = driver.device.open(16 << 10, 16 << 10)
    sent = 0
    while channel.try_send(bytes(256), flags=COMPLETION_REQUESTED, trans_id=sent + 1):
        sent += 1
    assert sent > 10
    time.sleep(0.3)  # the parent takes what fits its reserve, then waits
    while channel.try_send(bytes(256), flags=COMPLETION_REQUESTED, trans_id=sent + 1):
        sent += 1
    print("flooded", flush=True)
    time.sleep(2.0)


def _thread_cpu_seconds(native_id: int) -> float:
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_child_that_floods_and_never_reads_costs_the_worker_no_cpu() -> None:
    """Back-pressure (no room for replies) sends the parent's worker to
    sleep on the guest's signal; in poll mode it used to spin at 100 %."""
    with Host() as host:
        child = host.start(flood_and_never_read, devices=[EchoVsp(count=2)], spin_seconds=50e-6)
        assert wait_until(lambda: bool(child.channels), 30)
        time.sleep(0.8)  # the flood is in; both rings are full
        before = _thread_cpu_seconds(child.worker.native_id)
        time.sleep(1.0)
        used = _thread_cpu_seconds(child.worker.native_id) - before
        assert used < 0.2, f"the worker used {used:.2f} s of CPU in 1 s on a stuck peer"
        assert child.wait(timeout=30) == 0
