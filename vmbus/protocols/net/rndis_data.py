"""What RNDIS messages carry (docs/protocol.md §6.6): OIDs, their values and
the NDIS objects and config parameters in info buffers. Quoted C comes from
drivers/net/hyperv/hyperv_net.h."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from vmbus.protocols.net.rndis_wire import RndisError
from vmbus.wire import U8, U16, U32, WireStruct, wire_struct

# OIDs (§6.6): plain ints, as the device answers any unknown one NOT_SUPPORTED.
OID_GEN_SUPPORTED_LIST = 0x00010101
OID_GEN_MAXIMUM_FRAME_SIZE = 0x00010106
OID_GEN_LINK_SPEED = 0x00010107
OID_GEN_VENDOR_ID = 0x0001010C
OID_GEN_CURRENT_PACKET_FILTER = 0x0001010E
OID_GEN_MEDIA_CONNECT_STATUS = 0x00010114
OID_GEN_RECEIVE_SCALE_CAPABILITIES = 0x00010203
OID_GEN_RECEIVE_SCALE_PARAMETERS = 0x00010204
OID_GEN_RNDIS_CONFIG_PARAMETER = 0x0001021B
OID_GEN_XMIT_OK = 0x00020101
OID_GEN_RCV_OK = 0x00020102
OID_GEN_FRIENDLY_NAME = 0x00020216
OID_802_3_PERMANENT_ADDRESS = 0x01010101
OID_802_3_CURRENT_ADDRESS = 0x01010102
OID_802_3_MULTICAST_LIST = 0x01010103
OID_TCP_OFFLOAD_PARAMETERS = 0xFC01020C
OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES = 0xFC01020D

# GEN_MEDIA_CONNECT_STATUS values.
MEDIA_STATE_CONNECTED = 0
MEDIA_STATE_DISCONNECTED = 1

# GEN_CURRENT_PACKET_FILTER bits (NDIS_PACKET_TYPE_*); Linux opens with 0x0D.
PACKET_TYPE_DIRECTED = 0x01
PACKET_TYPE_MULTICAST = 0x02
PACKET_TYPE_ALL_MULTICAST = 0x04
PACKET_TYPE_BROADCAST = 0x08
PACKET_TYPE_PROMISCUOUS = 0x20

# NDIS object headers (§6.6).
NDIS_OBJECT_TYPE_DEFAULT = 0x80
NDIS_OBJECT_TYPE_RSS_CAPABILITIES = 0x88
NDIS_OBJECT_TYPE_RSS_PARAMETERS = 0x89
NDIS_OBJECT_TYPE_OFFLOAD = 0xA7
NDIS_OFFLOAD_SIZE_6_0 = 112  # revision 1: the smallest ndis_offload Linux accepts
NDIS_OFFLOAD_SIZE = 156  # revision 3
NDIS_RECEIVE_SCALE_CAPABILITIES_REVISION_2 = 2
RNDIS_CONFIG_PARAM_TYPE_STRING = 2
NETWORK_ADDRESS = "NetworkAddress"  # the config parameter Linux sets to change the MAC


@wire_struct(size=20)
@dataclass(frozen=True)
class ConfigParameterInfo(WireStruct):
    """struct rndis_config_parameter_info { u32 parameter_name_offset;
    u32 parameter_name_length; u32 parameter_type; u32 parameter_value_offset;
    u32 parameter_value_length; }  offsets from this struct; UTF-16LE strings"""

    parameter_name_offset: Annotated[int, U32]
    parameter_name_length: Annotated[int, U32]
    parameter_type: Annotated[int, U32]
    parameter_value_offset: Annotated[int, U32]
    parameter_value_length: Annotated[int, U32]


@wire_struct(size=4)
@dataclass(frozen=True)
class NdisObjectHeader(WireStruct):
    """struct ndis_object_header { u8 type; u8 revision; u16 size; }"""

    type: Annotated[int, U8]
    revision: Annotated[int, U8]
    size: Annotated[int, U16]


@wire_struct(size=18)
@dataclass(frozen=True)
class RecvScaleCapabilities(WireStruct):
    """struct ndis_recv_scale_cap { struct ndis_object_header hdr; u32 cap_flag;
    u32 num_int_msg; u32 num_recv_que; u16 num_indirect_tabent; } __packed;"""

    type: Annotated[int, U8] = NDIS_OBJECT_TYPE_RSS_CAPABILITIES
    revision: Annotated[int, U8] = NDIS_RECEIVE_SCALE_CAPABILITIES_REVISION_2
    size: Annotated[int, U16] = 18
    cap_flag: Annotated[int, U32] = 0
    num_int_msg: Annotated[int, U32] = 1
    num_recv_que: Annotated[int, U32] = 1  # fewer than 2: Linux stays on one channel
    num_indirect_tabent: Annotated[int, U16] = 128  # Linux's ITAB_NUM


# --- Info buffers -------------------------------------------------------------


def u32(value: int) -> bytes:
    return value.to_bytes(4, "little")


def offload_capabilities() -> bytes:
    """TCP_OFFLOAD_HARDWARE_CAPABILITIES: an ndis_offload offering nothing, in
    its smallest form, revision 1 of 112 bytes (Linux and DPDK take revision
    >= 1 and 112 <= size <= what they asked for)."""
    header = NdisObjectHeader(NDIS_OBJECT_TYPE_OFFLOAD, 1, NDIS_OFFLOAD_SIZE_6_0)
    return header.pack().ljust(NDIS_OFFLOAD_SIZE_6_0, b"\0")


@dataclass(frozen=True)
class ConfigParameter:
    name: str
    type: int
    value: bytes  # raw; a string parameter's is UTF-16LE


def _utf16(raw: memoryview) -> str:
    try:
        return bytes(raw).decode("utf-16-le")
    except UnicodeDecodeError as error:
        raise RndisError(f"config parameter string: {error}") from None


def decode_config_parameter(info: Any) -> ConfigParameter:
    """GEN_RNDIS_CONFIG_PARAMETER's info buffer; offsets from its start."""
    view = memoryview(info).cast("B")
    if len(view) < ConfigParameterInfo.SIZE:
        raise RndisError(f"{len(view)}-byte config parameter, needs {ConfigParameterInfo.SIZE}")
    p = ConfigParameterInfo.unpack(view)
    fields = [(p.parameter_name_offset, p.parameter_name_length)]
    fields.append((p.parameter_value_offset, p.parameter_value_length))
    for offset, length in fields:
        if offset < ConfigParameterInfo.SIZE or offset + length > len(view):
            raise RndisError(f"config parameter field of {length} bytes at {offset}")
    name = view[p.parameter_name_offset : p.parameter_name_offset + p.parameter_name_length]
    value = view[p.parameter_value_offset : p.parameter_value_offset + p.parameter_value_length]
    return ConfigParameter(_utf16(name), p.parameter_type, bytes(value))


def encode_config_parameter(name: str, value: str) -> bytes:
    """A string config parameter laid out as Linux lays out NetworkAddress."""
    raw_name, raw_value = name.encode("utf-16-le"), value.encode("utf-16-le")
    start = ConfigParameterInfo.SIZE
    info = ConfigParameterInfo(
        start, len(raw_name), RNDIS_CONFIG_PARAM_TYPE_STRING, start + len(raw_name), len(raw_value)
    )
    return info.pack() + raw_name + raw_value


def network_address(mac: bytes) -> bytes:
    """The SET info buffer with which Linux changes the MAC: 12 lower-case hex digits."""
    return encode_config_parameter(NETWORK_ADDRESS, bytes(mac).hex())
