"""Property-testing VMBus framing with the strategies vmbus.testing ships:
every packet survives a ring, every control message round-trips, and no
hostile bytes make the host's control-plane server raise.

Run with pytest (`pytest examples/property_test_framing.py`) or directly."""

import logging

from hypothesis import given, settings

from vmbus import messages as m
from vmbus.host import VmbusServer
from vmbus.ring import HEADER_SIZE, RingReader, RingWriter, init_ring
from vmbus.testing import strategies as vs


@given(vs.ring_packets())
def test_packets_survive_a_ring(packet: vs.RingPacket) -> None:
    buffer = bytearray(HEADER_SIZE + 4096)
    init_ring(buffer)
    writer, reader = RingWriter(buffer), RingReader(buffer)
    assert writer.write(packet.payload, packet.type, packet.flags, packet.trans_id, packet.header)
    writer.commit()
    got = reader.read()
    assert got is not None
    assert (got.type, got.flags, got.trans_id) == (packet.type, packet.flags, packet.trans_id)
    assert bytes(got.header) == packet.header
    assert bytes(got.payload) == packet.payload + bytes(-len(packet.payload) % 8)


@given(vs.control_messages())
def test_control_messages_round_trip(message: m.Message) -> None:
    assert m.decode(m.encode(message)) == message


@settings(max_examples=300)
@given(vs.hostile_bytes())
def test_host_never_raises_on_hostile_bytes(data: bytes) -> None:
    server = VmbusServer([], memory_pages=256)
    server.receive(m.encode(m.InitiateContact(vmbus_version_requested=m.VmbusVersion.WIN10_V5_3)))
    server.receive(data)  # answered, or dropped and counted: never an exception


if __name__ == "__main__":
    logging.disable(logging.WARNING)  # the host logs each hostile message it drops
    for test in (
        test_packets_survive_a_ring,
        test_control_messages_round_trip,
        test_host_never_raises_on_hostile_bytes,
    ):
        test()
        print(f"{test.__name__}: passed")
