"""VM definitions: what a person writes down (TOML or JSON) for the
management service to run. Parsed once, strictly: an unknown key, a wrong
type or a value out of range is an error that names where it is.

    name = "web"
    memory_mb = 64
    program = "vmbus.vmms.agent:run" # module:function the child runs
    [console]
    vnc = true                       # a VNC console on 127.0.0.1 (port 0: any)
    [[devices]]
    kind = "disk"
    path = "/srv/vm/web.img"
    size_mb = 256
    [[devices]]
    kind = "net"                     # on the service's switch, or backend = "tap"
    [[devices]]
    kind = "integration"             # heartbeat, shutdown, timesync and kvp
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import tomllib

from vmbus.errors import UsageError

__all__ = [
    "DEVICE_OPTIONS",
    "ConfigError",
    "ConsoleSpec",
    "DeviceSpec",
    "VmDefinition",
    "load",
    "parse_device",
    "parse_vm",
]

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
DEFAULT_PROGRAM = "vmbus.vmms.agent:run"
INTEGRATION = ("heartbeat", "shutdown", "timesync", "kvp")

# Each device kind and its options: (type, default). A default of None is
# optional; REQUIRED must be given.
REQUIRED = object()
DEVICE_OPTIONS: dict[str, dict[str, tuple[type, Any]]] = {
    "disk": {"path": (str, REQUIRED), "size_mb": (int, None), "read_only": (bool, False)},
    "ramdisk": {"size_mb": (int, 16)},
    "net": {"backend": (str, "switch"), "tap": (str, None), "address": (str, None)},
    "keyboard": {},
    "mouse": {},
    "video": {"width": (int, 1024), "height": (int, 768)},  # until the guest sets its mode
    "heartbeat": {"interval": (float, 1.0)},
    "shutdown": {},
    "timesync": {"interval": (float, 5.0)},
    "kvp": {},
    "echo": {},
}
LIMITS = {"size_mb": (1, 1 << 22), "width": (64, 4096), "height": (64, 4096)}


class ConfigError(UsageError, ValueError):
    """A VM definition that cannot run: the message says where and why."""


@dataclass(frozen=True)
class DeviceSpec:
    kind: str
    name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, **self.options}


@dataclass(frozen=True)
class ConsoleSpec:
    vnc: bool = False
    port: int = 0  # on 127.0.0.1; 0 picks a free one
    password: str | None = None  # None: a password per start, shown by status


@dataclass(frozen=True)
class VmDefinition:
    name: str
    memory_mb: int = 32
    program: str = DEFAULT_PROGRAM
    args: tuple[Any, ...] = ()
    devices: tuple[DeviceSpec, ...] = ()
    console: ConsoleSpec = ConsoleSpec()

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "memory_mb": self.memory_mb,
            "program": self.program,
            "args": list(self.args),
            "devices": [device.to_json() for device in self.devices],
            "console": {"vnc": self.console.vnc, "port": self.console.port},
        }


def load(path: str | Path) -> VmDefinition:
    """A definition file: TOML (.toml) or JSON (anything else)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{path}: {error.strerror}") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(
            f"{path}: not valid {path.suffix.lstrip('.') or 'JSON'}: {error}"
        ) from None
    return parse_vm(data, where=str(path))


def parse_vm(data: Any, where: str = "vm") -> VmDefinition:
    """A definition from its parsed TOML or JSON."""
    table = _table(data, where)
    _known(table, {"name", "memory_mb", "program", "args", "devices", "console"}, where)
    name = _name(table.get("name", REQUIRED), f"{where}: name")
    where = f"vm {name!r}"
    memory_mb = _int(table.get("memory_mb", 32), f"{where}: memory_mb", 4, 65536)
    program = table.get("program", DEFAULT_PROGRAM)
    if not isinstance(program, str) or not re.fullmatch(r"[\w.]+:[\w.]+", program):
        raise ConfigError(f"{where}: program must be 'module:function', not {program!r}")
    args = table.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str | int | float | bool) for a in args):
        raise ConfigError(f"{where}: args must be a list of strings, numbers or booleans")
    devices_data = table.get("devices", [])
    if not isinstance(devices_data, list):
        raise ConfigError(f"{where}: devices must be a list")
    devices: list[DeviceSpec] = []
    for index, item in enumerate(devices_data):
        devices += _expand(item, f"{where}: devices[{index}]", devices)
    return VmDefinition(
        name, memory_mb, program, tuple(args), tuple(devices), _console(table, where)
    )


def parse_device(
    data: Any, existing: tuple[DeviceSpec, ...] = (), where: str = "device"
) -> DeviceSpec:
    """One device (a hot add): its name must be new among `existing`."""
    specs = _expand(data, where, list(existing))
    if len(specs) != 1:
        raise ConfigError(f"{where}: add the integration services one by one")
    return specs[0]


def _expand(data: Any, where: str, existing: list[DeviceSpec]) -> list[DeviceSpec]:
    table = _table(data, where)
    kind = table.get("kind")
    if kind == "integration":
        _known(table, {"kind"}, where)
        return [_device({"kind": k}, where, existing) for k in INTEGRATION if _fresh(k, existing)]
    return [_device(table, where, existing)]


def _fresh(kind: str, existing: list[DeviceSpec]) -> bool:
    return not any(spec.kind == kind for spec in existing)


def _device(table: dict[str, Any], where: str, existing: list[DeviceSpec]) -> DeviceSpec:
    kind = table.get("kind")
    if not isinstance(kind, str) or kind not in DEVICE_OPTIONS:
        kinds = ", ".join([*DEVICE_OPTIONS, "integration"])
        raise ConfigError(f"{where}: kind must be one of {kinds}, not {kind!r}")
    schema = DEVICE_OPTIONS[kind]
    _known(table, {"kind", "name", *schema}, where)
    count = sum(1 for spec in existing if spec.kind == kind)
    name = _name(table.get("name", f"{kind}{count}" if count else kind), f"{where}: name")
    if any(spec.name == name for spec in existing):
        raise ConfigError(f"{where}: a device named {name!r} exists already")
    options: dict[str, Any] = {}
    for key, (kind_of, default) in schema.items():
        value: Any = table.get(key, default)
        if value is REQUIRED:
            raise ConfigError(f"{where}: {kind} needs {key}")
        if value is None:
            continue
        if kind_of is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind_of) or (kind_of is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: {key} must be {kind_of.__name__}, not {value!r}")
        if key in LIMITS:
            low, high = LIMITS[key]
            _int(value, f"{where}: {key}", low, high)
        if kind_of is float and not 0.01 <= float(cast(Any, value)) <= 3600:
            raise ConfigError(f"{where}: {key} must be in [0.01, 3600] seconds, not {value}")
        options[key] = value
    if kind == "net":
        if options["backend"] not in ("switch", "tap"):
            raise ConfigError(f"{where}: backend must be 'switch' or 'tap'")
        if options["backend"] == "tap" and "tap" not in options:
            raise ConfigError(f"{where}: a tap backend needs tap (the interface's name)")
    if kind in INTEGRATION and not _fresh(kind, existing):
        raise ConfigError(f"{where}: a VM has one {kind} service")
    return DeviceSpec(kind, name, options)


def _console(table: dict[str, Any], where: str) -> ConsoleSpec:
    data = _table(table.get("console", {}), f"{where}: console")
    _known(data, {"vnc", "port", "password"}, f"{where}: console")
    vnc = data.get("vnc", False)
    if not isinstance(vnc, bool):
        raise ConfigError(f"{where}: console.vnc must be true or false")
    port = _int(data.get("port", 0), f"{where}: console.port", 0, 65535)
    password = data.get("password")
    if password is not None and (not isinstance(password, str) or not 1 <= len(password) <= 8):
        raise ConfigError(f"{where}: console.password must be 1 to 8 characters (VNC's limit)")
    return ConsoleSpec(vnc, port, password)


def _table(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a table (an object), not {type(data).__name__}")
    return data


def _known(table: dict[str, Any], keys: set[str], where: str) -> None:
    unknown = sorted(set(table) - keys)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(keys))})")


def _name(value: Any, where: str) -> str:
    if value is REQUIRED:
        raise ConfigError(f"{where} is missing")
    if not isinstance(value, str) or not NAME.match(value):
        raise ConfigError(f"{where} must be 1-63 letters, digits, '.', '_' or '-', not {value!r}")
    return value


def _int(value: Any, where: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(f"{where} must be an integer in [{low}, {high}], not {value!r}")
    return value
