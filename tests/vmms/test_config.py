"""VM definitions: every valid one survives its round trip through JSON,
TOML and JSON files read the same, and anything else is a ConfigError
that says where (never another exception)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmbus.vmms.config import ConfigError, load, parse_device, parse_vm

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)
devices = st.one_of(
    st.fixed_dictionaries({"kind": st.just("ramdisk"), "size_mb": st.integers(1, 64)}),
    st.fixed_dictionaries(
        {"kind": st.just("disk"), "path": st.text(min_size=1, max_size=20)},
        optional={"size_mb": st.integers(1, 1024), "read_only": st.booleans()},
    ),
    st.fixed_dictionaries({"kind": st.sampled_from(["echo", "keyboard", "mouse", "net"])}),
    st.fixed_dictionaries(
        {"kind": st.just("video")},
        optional={"width": st.integers(64, 4096), "height": st.integers(64, 4096)},
    ),
)
definitions = st.fixed_dictionaries(
    {"name": names},
    optional={
        "memory_mb": st.integers(4, 65536),
        "args": st.lists(st.one_of(st.text(max_size=5), st.integers(), st.booleans()), max_size=3),
        "devices": st.lists(devices, max_size=6),
        "console": st.fixed_dictionaries({"vnc": st.booleans(), "port": st.integers(0, 65535)}),
    },
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(definitions)
def test_a_valid_definition_survives_its_round_trip(data: dict[str, Any]) -> None:
    definition = parse_vm(data)
    assert parse_vm(json.loads(json.dumps(definition.to_json()))) == definition
    assert [d.name for d in definition.devices] == list(
        dict.fromkeys(d.name for d in definition.devices)
    )


@given(json_values)
def test_anything_else_is_a_config_error(data: Any) -> None:
    with contextlib.suppress(ConfigError):
        parse_vm(data)


@given(st.dictionaries(st.sampled_from(["kind", "name", "size_mb", "path", "x"]), json_values))
def test_a_device_is_parsed_or_refused_with_a_config_error(data: dict[str, Any]) -> None:
    try:
        spec = parse_device(data)
    except ConfigError:
        return
    assert parse_device(spec.to_json()) == spec


def test_toml_and_json_files_define_the_same_vm(tmp_path: Path) -> None:
    toml = tmp_path / "vm.toml"
    toml.write_text(
        'name = "web"\nmemory_mb = 64\n[console]\nvnc = true\n'
        '[[devices]]\nkind = "ramdisk"\nsize_mb = 8\n[[devices]]\nkind = "integration"\n'
    )
    from_toml = load(toml)
    (tmp_path / "vm.json").write_text(json.dumps(from_toml.to_json()))
    assert load(tmp_path / "vm.json") == from_toml
    assert [d.kind for d in from_toml.devices] == [
        "ramdisk",
        "heartbeat",
        "shutdown",
        "timesync",
        "kvp",
    ]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("name = ", "not valid toml"),
        ('name = "a"\nmemory_mb = "lots"', "memory_mb must be an integer"),
        ('name = "a"\n[[devices]]\nkind = "kvp"\n[[devices]]\nkind = "kvp"', "one kvp service"),
        ('name = "a"\n[[devices]]\nkind = "net"\nbackend = "tap"', "needs tap"),
        ('name = "a"\n[console]\npassword = "much too long"', "1 to 8 characters"),
    ],
)
def test_a_bad_file_says_where_and_why(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "vm.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=reason):
        load(path)
    with pytest.raises(ConfigError, match="No such file"):
        load(tmp_path / "missing.toml")
