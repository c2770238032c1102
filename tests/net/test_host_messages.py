"""The VSC takes the short messages real hosts send: the type field and
the one union member, at the minimum sizes Linux's netvsc checks
(netvsc_send_completion, netvsc_receive in drivers/net/hyperv/netvsc.c:
sizeof(struct nvsp_message_header) + sizeof(the member)); one byte less is
refused."""

from __future__ import annotations

import pytest

from vmbus.protocols.net import vsc
from vmbus.protocols.net import wire as nvsp
from vmbus.wire import WireStruct

# Each completion a host sends, in its exact short form, and Linux's minimum.
SHORT_COMPLETIONS = [
    (nvsp.NvspInitComplete(negotiated_protocol_ver=0x60001, status=1), 16),
    (
        nvsp.SendReceiveBufferComplete(
            status=1, num_sections=1, sub_alloc_size=1728, num_sub_allocs=600, end_offset=1036800
        ),
        28,
    ),
    (nvsp.SendSendBufferComplete(status=1, section_size=6144), 12),
    (nvsp.SendRndisPacketComplete(status=1), 8),
    (nvsp.SubChannelComplete(status=1, num_subchannels=0), 12),
]


@pytest.mark.parametrize(
    ("message", "size"), SHORT_COMPLETIONS, ids=lambda v: type(v).__name__ if v else ""
)
def test_vsc_accepts_each_completion_at_linuxs_minimum_size(message: WireStruct, size: int) -> None:
    short = message.pack()
    assert len(short) == size
    assert vsc.decode_completion(short) == message
    with pytest.raises(nvsp.NvspError):
        vsc.decode_completion(short[:-1])


def test_vsc_accepts_the_16_byte_send_rndis_packet_of_a_receive() -> None:
    message = nvsp.SendRndisPacket(channel_type=nvsp.RndisChannel.DATA)
    assert vsc.decode_receive(message.pack()) == message
    with pytest.raises(nvsp.NvspError):
        vsc.decode_receive(message.pack()[:15])


def test_vsc_sends_the_8_byte_receive_completion() -> None:
    done = vsc.receive_completion()
    assert done == bytes.fromhex("6c000000 01000000")  # type 108, status SUCCESS


def test_nvsp_client_initializes_on_short_replies_from_a_host() -> None:
    """The whole NVSP initialization against a host that sends each reply
    in its short form (it refused them below 32 bytes)."""
    client = vsc.NvspClient(0x10, 1 << 20, 0x20, 1 << 20, versions=[0x60001])
    client.start()
    init = nvsp.NvspInitComplete(negotiated_protocol_ver=0x60001, status=1).pack()
    (*_, receive_buffer) = client.receive(init)
    assert nvsp.decode(receive_buffer.payload, nvsp.SendReceiveBuffer).gpadl_handle == 0x10
    recv = nvsp.SendReceiveBufferComplete(
        status=1, num_sections=1, sub_alloc_size=1728, num_sub_allocs=606, end_offset=606 * 1728
    )
    (send_buffer,) = client.receive(recv.pack())
    assert nvsp.decode(send_buffer.payload, nvsp.SendSendBuffer).gpadl_handle == 0x20
    assert client.receive(nvsp.SendSendBufferComplete(status=1, section_size=6144).pack()) == []
    assert client.ready and client.send_buffer is not None
    assert client.send_buffer.section_count == (1 << 20) // 6144


def test_vsc_refuses_a_completion_it_never_expects() -> None:
    with pytest.raises(nvsp.NvspError):
        vsc.decode_completion(nvsp.NvspInit().pack())
    with pytest.raises(nvsp.NvspError):
        vsc.decode_completion(b"\x6c\x00")  # no room for a type field
