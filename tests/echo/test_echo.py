"""The echo template, in process: the VSP through the harness, and the VSC
against it through the loopback."""

from __future__ import annotations

from vmbus.channel import COMPLETION_REQUESTED
from vmbus.guest import Guest
from vmbus.protocols.echo import ECHO_CLASS_ID, ECHO_MAX_PAYLOAD
from vmbus.testing import PumpedDevice, VspHarness, loopback
from vsc.echo import EchoVsc
from vsp.echo import EchoHandler, EchoVsp


def test_echo_completes_a_request_with_its_payload() -> None:
    with VspHarness(EchoVsp()) as harness:
        harness.guest.send(b"ping----", flags=COMPLETION_REQUESTED, trans_id=7)
        harness.pump()
        reply = harness.guest.poll()
        assert reply is not None
        assert (reply.type, reply.trans_id, bytes(reply.payload)) == (0xB, 7, b"ping----")


def test_guest_that_never_reads_loses_nothing_and_wedges_nothing() -> None:
    """Unsolicited echoes wait in the bounded backlog while the guest's ring
    is full; past the limit they are dropped and counted, never blocking."""
    with VspHarness(EchoVsp(), ring_size=8 << 10) as harness:
        handler = harness.handler
        assert isinstance(handler, EchoHandler)
        sent = 0
        for _ in range(2000):
            if not harness.guest.try_send(bytes(64), trans_id=sent):
                harness.pump()
                continue
            sent += 1
            harness.pump()
        assert handler.packets == sent
        waiting = len(handler.backlog)
        assert 0 < waiting <= handler.backlog_limit and handler.dropped > 0
        received = _drain(harness)  # the guest reads at last: the backlog follows
        assert received >= waiting and not handler.backlog
        assert handler.dropped + received == sent


def _drain(harness: VspHarness) -> int:
    received = 0
    while True:
        harness.pump()
        packet = harness.guest.poll()
        if packet is None:
            return received
        received += 1


def test_oversize_echo_is_refused_and_counted() -> None:
    with VspHarness(EchoVsp(), ring_size=64 << 10) as harness:
        harness.guest.send(bytes(ECHO_MAX_PAYLOAD + 8), flags=COMPLETION_REQUESTED, trans_id=1)
        harness.pump()
        assert harness.guest.poll() is None
        assert harness.context.peer_log.count == 1


def test_echo_vsc_in_process() -> None:
    drivers: list[EchoVsc] = []

    def register(guest: Guest) -> None:
        guest.register(ECHO_CLASS_ID, lambda device: drivers.append(EchoVsc(device)))

    with loopback([EchoVsp()], register):
        assert drivers[0].echo(b"in-process").startswith(b"in-process")


def test_echo_vsc_pumped_in_one_thread() -> None:
    """PumpedDevice: the VSC's waits serve the VSP, so one thread runs both."""
    device = PumpedDevice(EchoVsp())
    driver = EchoVsc(device)  # type: ignore[arg-type]  # a GuestDevice stand-in
    for i in range(100):
        assert driver.echo(b"%d" % i).startswith(b"%d" % i)
    assert device.handler is not None and device.handler.packets == 100  # type: ignore[attr-defined]


def test_a_guest_that_reopens_its_channel_again_and_again_grows_nothing() -> None:
    """Each close forgets the channel's handler and keeps what it counted."""
    vsp = EchoVsp(count=2)
    for opened in range(200):
        with VspHarness(vsp, offer=vsp.offers()[opened % 2]) as harness:
            harness.guest.send(b"ping", flags=COMPLETION_REQUESTED, trans_id=opened)
            harness.pump()
            assert len(vsp.handlers) == 1
        assert vsp.handlers == []
    assert vsp.stats() == {"packets": [100, 100], "refused": 0}
