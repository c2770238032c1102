"""pytest-benchmark tests of an in-process `channel_pair`: request/response
and streaming, in one thread (the CPU cost of the channel code) and with the
other side on a thread (doorbells and wake-ups within one process).

    .venv/bin/pytest benchmarks/test_bench_channel.py --benchmark-enable -p no:cacheprovider

The cross-process figures are `python -m benchmarks.channel_bench`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from benchmarks import channel_bench
from vmbus._ringpacket import Packet
from vmbus.channel import COMPLETION_REQUESTED, DEFAULT_SPIN_SECONDS, Channel
from vmbus.testing import channel_pair

PAYLOAD = bytes(64)
STREAM_PACKETS = 5000


class Responder:
    """The host side on a thread, event-driven like the Host worker: sleep
    on the doorbell, service() the ring, complete what asks for it."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.packets = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def handle(self, packet: Packet) -> None:
        self.packets += 1
        if packet.flags & COMPLETION_REQUESTED:
            self.channel.send_completion(packet.trans_id, packet.payload)

    def serve(self) -> None:
        while not self.stop.is_set():
            self.channel.service(self.handle)
            self.channel.wake_me.wait(0.1)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


Threaded = tuple[Channel, Responder]  # the guest's end, and the host's on its thread


@pytest.fixture(params=[0.0, DEFAULT_SPIN_SECONDS], ids=["spin0", "spin-default"])
def threaded(request: pytest.FixtureRequest) -> Iterator[Threaded]:
    guest, host = channel_pair(spin_seconds=request.param)
    responder = Responder(host)
    yield guest, responder
    responder.close()


def test_request_response_one_thread(benchmark) -> None:  # type: ignore[no-untyped-def]
    """Both sides in one thread: the channel code's cost per round trip."""
    guest, host = channel_pair(spin_seconds=0.0)

    def round_trip() -> bytes:
        trans_id = next(guest.ids)
        guest.send(PAYLOAD, flags=COMPLETION_REQUESTED, trans_id=trans_id)
        packet = host.poll()
        assert packet is not None
        host.send_completion(packet.trans_id, packet.payload)
        return bytes(guest.wait_completion(trans_id).payload)

    assert benchmark(round_trip) == PAYLOAD
    assert guest.signals_sent == host.signals_sent == 0  # nobody slept: no doorbell


def test_request_response_threaded(benchmark, threaded: Threaded) -> None:  # type: ignore[no-untyped-def]
    """Channel.request against an event-driven responder thread. Its poll
    budget spins holding the GIL, which the responder needs to answer."""
    guest, responder = threaded
    reply = benchmark(lambda: guest.request(PAYLOAD, timeout=10))
    assert bytes(reply.payload) == PAYLOAD
    benchmark.extra_info["doorbells_per_rt"] = (
        guest.signals_sent + responder.channel.signals_sent
    ) / responder.packets


@pytest.mark.parametrize("size", [64, 1024])
def test_stream_one_thread(benchmark, size: int) -> None:  # type: ignore[no-untyped-def]
    """Fill half the ring, drain it: the per-packet cost of send + drain."""
    guest, host = channel_pair(spin_seconds=0.0)
    payload = bytes(size)
    batch = (64 * 1024 // 2) // (size + 24)
    received: list[int] = []

    def fill_and_drain() -> int:
        for _ in range(batch):
            guest.send(payload)
        return host.drain(lambda packet: received.append(len(packet.payload)))

    assert benchmark(fill_and_drain) == batch
    assert set(received) == {size}
    assert guest.signals_sent == 0  # the receiver's ring stays masked: suppressed
    benchmark.extra_info["packets_per_call"] = batch


@pytest.mark.parametrize("size", [64, 1024])
def test_stream_threaded(benchmark, threaded: Threaded, size: int) -> None:  # type: ignore[no-untyped-def]
    """STREAM_PACKETS sends, then one request: it returns once the responder
    thread has drained them all. Doorbells per packet go in extra_info."""
    guest, responder = threaded
    payload = bytes(size)

    def stream() -> int:
        start = responder.packets
        for _ in range(STREAM_PACKETS):
            guest.send(payload, timeout=10)
        guest.request(PAYLOAD, timeout=10)
        return responder.packets - start

    assert benchmark(stream) == STREAM_PACKETS + 1
    benchmark.extra_info["packets_per_call"] = STREAM_PACKETS
    benchmark.extra_info["data_doorbells_per_packet"] = guest.signals_sent / responder.packets
    benchmark.extra_info["space_doorbells_per_packet"] = (
        responder.channel.signals_sent / responder.packets
    )


def test_runner_measures_every_method() -> None:
    """One tiny round of the cross-process runner: every row, no stray child."""
    settings = channel_bench.Settings(repeats=1, round_trips=50, packets={64: 500})
    text, markdown = channel_bench.report(settings, "smoke")
    placements = len(channel_bench.PLACEMENTS)
    assert markdown.count("| channel, spin 0 |") == placements
    assert markdown.count("| full stack echo, child spin 50 µs |") == placements
    assert markdown.count("| channel, poll 50 µs |") == len(
        [p for p in channel_bench.PLACEMENTS if p != "same"]
    )
    assert "one thread" in text
