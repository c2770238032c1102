"""Channels: sending with flow control, receiving with interrupt
suppression, completions matched by transaction id, sync and asyncio."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading

import pytest

from vmbus._ringpacket import Packet
from vmbus.channel import COMPLETION_REQUESTED, VM_PKT_COMP, Channel, ChannelTimeout
from vmbus.memory import GuestMemory
from vmbus.ring import HEADER_SIZE, init_ring
from vmbus.testing import channel_pair, ring_buffer
from vmbus.transport import Signal


def echo_completions(channel: Channel, count: int) -> None:
    """Answer `count` requests with a completion carrying the payload."""
    for _ in range(count):
        packet = channel.receive(timeout=10)
        assert packet.flags & COMPLETION_REQUESTED
        channel.send_completion(packet.trans_id, bytes(packet.payload))


def test_request_gets_its_completion() -> None:
    guest, host = channel_pair()
    peer = threading.Thread(target=echo_completions, args=(host, 3))
    peer.start()
    for i in range(3):
        reply = guest.request(b"ping %d" % i, timeout=10)
        assert reply.type == VM_PKT_COMP
        assert bytes(reply.payload).rstrip(b"\0") == b"ping %d" % i
    peer.join()


def test_completions_out_of_order_reach_their_requests() -> None:
    guest, host = channel_pair()
    first = next(guest.ids)
    second = next(guest.ids)
    guest.send(b"a", flags=COMPLETION_REQUESTED, trans_id=first)
    guest.send(b"b", flags=COMPLETION_REQUESTED, trans_id=second)
    host.send(b"unsolicited")  # trans_id 0: not a completion, kept for receive
    host.send_completion(second, b"B")
    host.send_completion(first, b"A")
    assert bytes(guest.wait_completion(first, timeout=1).payload)[:1] == b"A"
    assert bytes(guest.wait_completion(second, timeout=1).payload)[:1] == b"B"
    assert bytes(guest.receive(timeout=1).payload).rstrip(b"\0") == b"unsolicited"


def test_full_ring_blocks_sender_until_receiver_drains() -> None:
    guest, host = channel_pair(data_size=4096)
    total = 500  # far more than 4 KiB holds
    received: list[int] = []

    def drain() -> None:
        while len(received) < total:
            received.append(int(bytes(host.receive(timeout=10).payload).rstrip(b"\0")))

    peer = threading.Thread(target=drain)
    peer.start()
    for i in range(total):
        guest.send(b"%d" % i, timeout=10)
    peer.join()
    assert received == list(range(total))


def test_send_times_out_when_peer_never_reads() -> None:
    guest, _ = channel_pair(data_size=1024)
    with pytest.raises(ChannelTimeout):
        for _ in range(100):
            guest.send(bytes(100), timeout=0.05)


def test_receive_times_out_on_a_silent_peer() -> None:
    guest, _ = channel_pair()
    with pytest.raises(ChannelTimeout):
        guest.receive(timeout=0.05)


def test_streaming_sends_few_signals() -> None:
    """Interrupt suppression: a draining receiver is masked, so a stream of
    packets costs a small fraction of a signal per packet."""
    guest, host = channel_pair(data_size=256 * 1024, spin_seconds=1e-3)
    total = 20_000
    done = threading.Event()

    def drain() -> None:
        count = 0
        while count < total:
            count += host.drain(lambda packet: None) or 0
            if count < total:
                host.wait(None)
        done.set()

    peer = threading.Thread(target=drain)
    peer.start()
    for _ in range(total):
        guest.send(bytes(64), timeout=10)
    peer.join(timeout=30)
    assert done.is_set()
    assert guest.signals_sent < total // 10


def test_packet_lost_before_open_is_still_seen() -> None:
    """Each side checks its inbound ring once: a packet written before the
    reader started waiting (its signal gone) is still received."""
    guest, host = channel_pair()
    guest.send(b"early")
    host.wake_me.clear()  # the signal is lost
    assert bytes(host.receive(timeout=1).payload).rstrip(b"\0") == b"early"


def test_async_request_and_receive() -> None:
    guest, host = channel_pair()
    peer = threading.Thread(target=echo_completions, args=(host, 20))
    peer.start()

    async def main() -> list[bytes]:
        from vmbus.channel import AsyncChannel

        channel = AsyncChannel(guest)
        try:
            replies = await asyncio.gather(*(channel.request(b"%d" % i) for i in range(20)))
            host.send(b"event")
            event = await asyncio.wait_for(channel.receive(), 5)
            return [bytes(r.payload).rstrip(b"\0") for r in replies] + [bytes(event.payload)]
        finally:
            channel.close()

    result = asyncio.run(asyncio.wait_for(main(), 20))
    peer.join()
    assert result[:20] == [b"%d" % i for i in range(20)]
    assert result[20].rstrip(b"\0") == b"event"


def test_async_send_waits_for_space() -> None:
    guest, host = channel_pair(data_size=2048)
    received: list[bytes] = []

    def slow_reader() -> None:
        while len(received) < 200:
            received.append(bytes(host.receive(timeout=10).payload))

    peer = threading.Thread(target=slow_reader)
    peer.start()

    async def main() -> None:
        from vmbus.channel import AsyncChannel

        channel = AsyncChannel(guest)
        try:
            for i in range(200):
                await channel.send(b"%08d" % i)
        finally:
            channel.close()

    asyncio.run(asyncio.wait_for(main(), 20))
    peer.join()
    assert received == [b"%08d" % i for i in range(200)]


def child_echo(fd: int, size: int, ring_size: int, fds: tuple[int, int]) -> None:
    memory = GuestMemory.from_fd(fd, size)
    try:
        outbound = memory.view(0, ring_size)
        inbound = memory.view(ring_size, ring_size)
        channel = Channel(inbound, outbound, Signal(fds[0]), Signal(fds[1]))
        echo_completions(channel, 1000)
        del channel, outbound, inbound
    finally:
        memory.close()


def test_channel_between_processes_in_guest_memory() -> None:
    ring_size = HEADER_SIZE + 64 * 1024
    memory = GuestMemory.create(2 * ring_size + 4096 - (2 * ring_size) % 4096)
    outbound, inbound = memory.view(0, ring_size), memory.view(ring_size, ring_size)
    init_ring(outbound)
    init_ring(inbound)
    to_host, to_guest = Signal(), Signal()
    fd = os.dup(memory.fileno())
    child = multiprocessing.get_context("fork").Process(
        target=child_echo, args=(fd, memory.size, ring_size, (to_guest.fd, to_host.fd))
    )
    child.start()
    try:
        guest = Channel(outbound, inbound, to_host, to_guest)
        for i in range(1000):
            payload = os.urandom(i % 300)
            reply = guest.request(payload, timeout=10)
            assert bytes(reply.payload)[: len(payload)] == payload
        child.join(timeout=10)
        assert child.exitcode == 0
        del guest
    finally:
        if child.is_alive():
            child.kill()
        os.close(fd)
        del outbound, inbound
        memory.close()


def test_service_takes_requests_only_while_replies_fit() -> None:
    """A guest floods requests and does not read replies: the host stops taking
    requests before its replies would overflow, and resumes once they are read."""
    guest, host = asymmetric_pair(request_ring=64 * 1024, reply_ring=4096)
    for i in range(200):
        guest.send(b"%d" % i, flags=COMPLETION_REQUESTED, trans_id=i + 1)
    served: list[int] = []

    def reply(packet: Packet) -> None:
        served.append(packet.trans_id)
        assert host.try_send(bytes(64), type=VM_PKT_COMP, trans_id=packet.trans_id)

    reserve = 16 + 64 + 8  # one reply with its trailer
    first = host.service(reply, reserve=reserve)
    assert 0 < first < 200
    replies = 0
    while guest.poll() is not None:
        replies += 1
    assert replies == first
    assert host.wake_me.wait(1)  # the guest's reading signalled the host
    second = host.service(reply, reserve=reserve)
    assert second > 0
    assert served == list(range(1, first + second + 1))


def asymmetric_pair(request_ring: int, reply_ring: int) -> tuple[Channel, Channel]:
    requests, replies = ring_buffer(request_ring), ring_buffer(reply_ring)
    to_host, to_guest = Signal(), Signal()
    guest = Channel(requests, replies, to_host, to_guest)
    host = Channel(replies, requests, to_guest, to_host)
    return guest, host
