"""Ring layout constants and the ring's exception, shared by both ring
implementations (`vmbus._cring` in Cython, `vmbus._pyring` in Python).

Layout: ../shared/docs/protocol.md §1.1 (struct hv_ring_buffer) and §2.1
(struct vmpacket_descriptor).
"""

from __future__ import annotations

from vmbus.errors import PeerError

# struct hv_ring_buffer: the control page, one 4 KiB page on x86.
HEADER_SIZE = 4096
WRITE_INDEX_OFFSET = 0
READ_INDEX_OFFSET = 4
INTERRUPT_MASK_OFFSET = 8
PENDING_SEND_SZ_OFFSET = 12
FEATURE_BITS_OFFSET = 64
FEAT_PENDING_SEND_SZ = 0x1

# struct vmpacket_descriptor { u16 type, offset8, len8, flags; u64 trans_id; }
DESCRIPTOR_SIZE = 16
TRAILER_SIZE = 8  # u64: (write index at the packet's start) << 32
ALIGNMENT = 8
MIN_OFFSET8 = DESCRIPTOR_SIZE // 8

# Packet types a peer may legally put on a ring (enum vmbus_packet_type,
# VM_PKT_SYNCH .. VM_PKT_ADDITIONAL_DATA); 0 is VM_PKT_INVALID.
MIN_PACKET_TYPE = 0x1
MAX_PACKET_TYPE = 0xD
VM_PKT_DATA_INBAND = 0x6
# The only defined flag: VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED.
KNOWN_FLAGS = 0x1

# Smallest data area we attach to: one descriptor plus trailer must fit with
# the ring-never-full rule, and indices are 8-aligned.
MIN_DATA_SIZE = 32


class RingCorrupt(PeerError):
    """The peer left the ring's shared memory in a state no correct peer can
    produce (bad index, bad descriptor). Fail the channel; the ring never
    reads or writes outside its buffer."""


def ring_buffer_size(data_size: int) -> int:
    """Bytes of buffer needed for a ring whose data area is `data_size`."""
    check_data_size(data_size)
    return HEADER_SIZE + data_size


def check_data_size(data_size: int) -> None:
    if data_size < MIN_DATA_SIZE or data_size % ALIGNMENT or data_size >= 1 << 31:
        raise ValueError(
            f"ring data area must be a multiple of {ALIGNMENT} bytes in "
            f"[{MIN_DATA_SIZE}, 2 GiB), got {data_size}"
        )


def data_size_of(buffer_len: int, mirrored: bool) -> int:
    """Data-area size of a ring attached to a buffer of `buffer_len` bytes.
    A mirrored buffer maps the data area twice back to back after the header."""
    body = buffer_len - HEADER_SIZE
    if mirrored:
        if body % 2:
            raise ValueError(f"mirrored ring buffer has odd data length {body}")
        body //= 2
    check_data_size(body)
    return body
