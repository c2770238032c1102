"""IC wire formats: golden bytes for each struct (docs/protocol.md §11), and
Hypothesis round trips of every codec."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmbus.errors import UsageError
from vmbus.protocols.ic import HEARTBEAT_VERSIONS, IcClient, IcServer, MessageType
from vmbus.protocols.ic import wire as w
from vmbus.wire import WireError, WireStruct

STRUCTS: list[type[WireStruct]] = [
    w.PipeHeader,
    w.IcHeader,
    w.NegotiateHeader,
    w.IcVersion,
    w.HeartbeatData,
    w.ShutdownData,
    w.TimeSyncData,
    w.TimeSyncRefData,
    w.KvpHeader,
    w.KvpValue,
    w.KvpDelete,
]


def test_sizes_are_linuxs() -> None:
    sizes = {cls.__name__: cls.SIZE for cls in STRUCTS}
    assert sizes == {
        "PipeHeader": 8,  # vmbuspipe_hdr
        "IcHeader": 20,  # icmsg_hdr
        "NegotiateHeader": 8,  # icmsg_negotiate without its versions
        "IcVersion": 4,
        "HeartbeatData": 40,
        "ShutdownData": 2060,
        "TimeSyncData": 25,
        "TimeSyncRefData": 22,
        "KvpHeader": 4,
        "KvpValue": 2572,  # hv_kvp_exchg_msg_value
        "KvpDelete": 516,
    }
    assert w.ICMSG_HDR == 28 and w.KVP_MESSAGE_SIZE == 7430


GOLDEN: list[tuple[WireStruct, str]] = [
    (w.PipeHeader(1, 44), "01000000 2c000000"),
    (
        w.IcHeader(3, 0, 1, 3, 0, 40, 0x80004005, 7, 3),
        "0300 0000 0100 0300 0000 2800 05400080 07 03 0000",
    ),
    (w.NegotiateHeader(2, 3), "0200 0300 00000000"),
    (w.IcVersion(3, 2), "0300 0200"),
    (w.HeartbeatData(0x0102030405060708), "0807060504030201" + "00" * 32),
    (
        w.ShutdownData(0x80000000, 30, 2, "hi".encode("utf-16-le")),
        "00000080 1e000000 02000000 6800 6900" + "00" * 2044,
    ),
    (w.TimeSyncData(0x11, 0x22, 0x33, 2), "1100000000000000 2200000000000000 3300000000000000 02"),
    (w.TimeSyncRefData(0x11, 0x22, 1, -1, 3), "1100000000000000 2200000000000000 01 ff 03 000000"),
    (w.KvpHeader(1, 2), "01 02 0000"),
    (
        w.KvpValue(1, 4, 6, b"a\0", b"bc"),
        "01000000 04000000 06000000 6100" + "00" * 510 + "6263" + "00" * 2046,
    ),
    (w.KvpDelete(4, b"a\0"), "04000000 6100" + "00" * 510),
]


@pytest.mark.parametrize(("value", "golden"), GOLDEN, ids=lambda v: type(v).__name__)
def test_golden_bytes(value: WireStruct, golden: str) -> None:
    data = bytes.fromhex(golden.replace(" ", ""))
    assert value.pack() == data
    assert type(value).unpack(data).pack() == data  # byte fields come back zero-padded


def test_golden_negotiation_and_linuxs_answer() -> None:
    """The host's first heartbeat message, and the answer Linux writes over it
    (vmbus_prep_negotiate_resp: counts 1 and 1, the chosen versions, icmsgsize
    16, TRANSACTION | RESPONSE, the rest of the bytes as they were)."""
    trans_id, request = IcServer(MessageType.HEARTBEAT, HEARTBEAT_VERSIONS).negotiate()
    assert request == bytes.fromhex(
        "01000000 2c000000"  # pipe: data, 44 bytes follow
        "0000 0000 0000 0000 0000 1800 00000000 01 03 0000"  # negotiate, 24 bytes, id 1
        "0200 0200 00000000"  # two framework versions, two message versions
        "0300 0000 0100 0000 0300 0000 0100 0000".replace(" ", "")
    )
    answer, _ = IcClient(MessageType.HEARTBEAT, HEARTBEAT_VERSIONS).receive(request)
    assert answer == bytes.fromhex(
        "01000000 2c000000"
        "0000 0000 0000 0000 0000 1000 00000000 01 05 0000"
        "0100 0100 00000000"
        "0300 0000 0300 0000 0300 0000 0100 0000".replace(" ", "")
    )
    assert trans_id == 1


def field_strategy(fmt: w.Fmt, field: dataclasses.Field[Any]) -> st.SearchStrategy[Any]:
    code = fmt.code
    if code.endswith("s"):
        return st.binary(min_size=int(code[:-1]), max_size=int(code[:-1]))
    bits = {"B": 8, "H": 16, "I": 32, "Q": 64, "b": 8}[code]
    if code == "b":
        return st.integers(-128, 127)
    return st.integers(0, (1 << bits) - 1)


def struct_strategy(cls: type[WireStruct]) -> st.SearchStrategy[WireStruct]:
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    return st.builds(cls, *(field_strategy(f, d) for f, d in zip(cls._fmts, fields, strict=True)))


@pytest.mark.parametrize("cls", STRUCTS, ids=lambda c: c.__name__)
@given(data=st.data())
def test_every_struct_round_trips(cls: type[WireStruct], data: st.DataObject) -> None:
    value = data.draw(struct_strategy(cls))
    assert cls.unpack(value.pack()) == value


versions = st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)), max_size=8)


@given(versions, versions)
def test_negotiate_body_round_trips(frameworks: list[w.Version], messages: list[w.Version]) -> None:
    assert w.decode_negotiate(w.encode_negotiate(frameworks, messages)) == (frameworks, messages)


@given(st.binary(max_size=64))
def test_negotiate_body_that_lies_about_its_counts_is_refused(body: bytes) -> None:
    try:
        frameworks, messages = w.decode_negotiate(body)
    except WireError:
        return
    assert len(body) >= 8 + 4 * (len(frameworks) + len(messages))


@given(struct_strategy(w.IcHeader), st.binary(max_size=256))
def test_message_round_trips(header: Any, body: bytes) -> None:
    header = dataclasses.replace(header, msgsize=len(body))
    decoded, rest = w.decode_message(w.encode_message(header, body))
    assert decoded == header and rest == body


@given(st.binary(max_size=96))
def test_any_bytes_decode_or_raise_wire_error(data: bytes) -> None:
    try:
        header, body = w.decode_message(data)
    except WireError:
        return
    assert header.msgsize <= len(body) == len(data) - w.ICMSG_HDR


keys = st.text(st.characters(blacklist_characters="\0", blacklist_categories=["Cs"]), max_size=40)


@given(keys.filter(bool), keys)
def test_kvp_bodies_round_trip(key: str, value: str) -> None:
    for op in (w.KvpOp.GET, w.KvpOp.SET):
        body = w.encode_kvp_body(op, w.KvpPool.GUEST, key, value)
        assert len(body) == w.KVP_MESSAGE_SIZE
        assert w.KvpHeader.unpack(body[:4]) == w.KvpHeader(op, w.KvpPool.GUEST)
        data = w.kvp_value_at(body, op)
        assert w.decode_utf16(data.key, data.key_size, "key") == key
        assert w.kvp_value_text(data) == value
    delete = w.KvpDelete.unpack_from(w.encode_kvp_body(w.KvpOp.DELETE, 0, key), w.KVP_BODY)
    assert w.decode_utf16(delete.key, delete.key_size, "key") == key


@given(st.integers(0, (1 << 32) - 1))
def test_kvp_enumerate_index_round_trips(index: int) -> None:
    assert w.kvp_index(w.encode_kvp_body(w.KvpOp.ENUMERATE, 0, index=index)) == index


def test_kvp_sizes_are_checked_against_the_wire_limits() -> None:
    w.encode_utf16("k" * 255, w.KVP_MAX_KEY_SIZE, "key")  # 255 units and the NUL: 512 bytes
    with pytest.raises(UsageError, match="at most 255"):
        w.encode_utf16("k" * 256, w.KVP_MAX_KEY_SIZE, "key")
    with pytest.raises(UsageError, match="at most 255"):
        w.encode_utf16("😀" * 128, w.KVP_MAX_KEY_SIZE, "key")  # two units each
    with pytest.raises(UsageError, match="at most 1023"):
        w.encode_utf16("v" * 1024, w.KVP_MAX_VALUE_SIZE, "value")
    with pytest.raises(UsageError, match="NUL"):
        w.encode_utf16("a\0b", w.KVP_MAX_KEY_SIZE, "key")


def test_kvp_numbers_are_read_as_linux_hands_them_to_its_daemon() -> None:
    number = w.KvpValue(w.RegType.U32, 4, 4, b"", (7).to_bytes(4, "little"))
    assert w.kvp_value_text(number) == "7"
    wide = w.KvpValue(w.RegType.U64, 4, 8, b"", (1 << 40).to_bytes(8, "little"))
    assert w.kvp_value_text(wide) == str(1 << 40)


@pytest.mark.parametrize(
    "value",
    [
        w.KvpValue(w.RegType.SZ, 4, 4096, b"", b""),  # a size past the field
        w.KvpValue(w.RegType.SZ, 4, 3, b"", b"abc"),  # odd: not UTF-16
        w.KvpValue(w.RegType.SZ, 4, 2, b"", b"\x00\xd8"),  # a lone surrogate
        w.KvpValue(99, 4, 2, b"", b""),  # no such type
    ],
)
def test_kvp_values_a_guest_cannot_mean_are_wire_errors(value: w.KvpValue) -> None:
    with pytest.raises(WireError):
        w.kvp_value_text(value)


@given(versions, st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), max_size=6))
def test_choose_version_is_our_first_that_was_offered(
    offered: list[w.Version], ours: list[w.Version]
) -> None:
    chosen = w.choose_version(offered, tuple(ours))
    if chosen is None:
        assert not set(offered) & set(ours)
    else:
        assert chosen in offered and ours.index(chosen) == min(
            ours.index(v) for v in ours if v in offered
        )
