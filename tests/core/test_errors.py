"""The error split and the rate-limited log of a peer's errors."""

from __future__ import annotations

import logging

import pytest

from vmbus import errors
from vmbus.device import BadGpaRanges
from vmbus.errors import PeerError, PeerLog, UsageError, VmbusError
from vmbus.memory import DoubleFree, OutOfBounds
from vmbus.messages import MessageError
from vmbus.packet import PacketError
from vmbus.partition import Host
from vmbus.ring import RingCorrupt
from vmbus.transport import SYNIC_HEADER, MalformedMessage
from vmbus.wire import WireError
from vsp.echo import EchoVsp


@pytest.mark.parametrize(
    "cls",
    [
        RingCorrupt,
        PacketError,
        WireError,
        MessageError,
        MalformedMessage,
        OutOfBounds,
        BadGpaRanges,
    ],
)
def test_what_the_peer_broke_is_a_peer_error(cls: type[Exception]) -> None:
    assert issubclass(cls, PeerError) and issubclass(cls, VmbusError)
    assert not issubclass(cls, UsageError)


def test_what_the_caller_misused_is_a_usage_error_and_still_a_value_error() -> None:
    assert issubclass(DoubleFree, UsageError) and issubclass(UsageError, ValueError)
    assert not issubclass(DoubleFree, PeerError)


def test_peer_that_errs_in_a_loop_gets_a_bounded_number_of_log_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("test.peer")
    peer_log = PeerLog(logger, "child-x", burst=5, period=3600)
    with caplog.at_level(logging.WARNING, logger="test.peer"):
        for i in range(10_000):
            peer_log("bad message %d", i)
    assert peer_log.count == 10_000
    assert len(caplog.records) == 5
    assert all(record.getMessage().startswith("child-x: bad message") for record in caplog.records)


def test_suppressed_lines_are_summed_up_in_the_next_window(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [0.0]
    monkeypatch.setattr(errors.time, "monotonic", lambda: now[0])
    peer_log = PeerLog(logging.getLogger("test.peer"), "child-y", burst=2, period=10)
    with caplog.at_level(logging.WARNING, logger="test.peer"):
        for _ in range(7):
            peer_log("garbage")
        now[0] = 11.0
        peer_log("garbage")
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "child-y: garbage",
        "child-y: garbage",
        "child-y: garbage (and 5 more not logged)",
    ]


def flood_the_port(guest: object) -> None:
    """Child: 2,000 datagrams shorter than a SynIC header."""
    sock = guest.port.sock  # type: ignore[attr-defined]
    for _ in range(2000):
        sock.send(b"\x01")
    sock.send(SYNIC_HEADER.pack(1, 200, 0, 0, 0) + bytes(8))  # and one that lies about its size


def test_child_that_floods_its_port_cannot_flood_the_parents_log(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """The worker process logs to the parent's stderr: at most a dozen lines."""
    with Host() as host:
        child = host.start(flood_the_port, devices=[EchoVsp()])
        assert child.wait(timeout=60) == 0
        errors_seen = child.status()["protocol_errors"]
    lines = [line for line in capfd.readouterr().err.splitlines() if f"{child.name}: " in line]
    assert errors_seen >= 2000
    assert 1 <= len(lines) <= 12, f"{len(lines)} log lines for {errors_seen} bad datagrams"
