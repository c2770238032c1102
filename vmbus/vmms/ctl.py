"""`vmbus serve` and `vmbus ctl`: the management service and its command
line. ctl prints a table (list, status) or the service's JSON (--json),
and exits 1 with the service's reason when it refuses."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from vmbus.vmms.client import ApiError, Client, default_socket
from vmbus.vmms.config import ConfigError, load, parse_device

__all__ = ["add_commands", "run"]


def add_commands(commands: Any) -> None:
    """The `serve` and `ctl` subcommands, on the `vmbus` parser."""
    serve = commands.add_parser("serve", help="run the management service (VMMS)")
    serve.add_argument("--socket", type=Path, help="the API socket (default: see vmbus ctl -h)")
    serve.add_argument("--state-dir", type=Path, help="keep the VM definitions here")
    ctl = commands.add_parser("ctl", help="the management service's command line")
    ctl.add_argument("--socket", type=Path, help="the API socket ($VMBUS_SOCKET, or the default)")
    ctl.add_argument("--json", action="store_true", help="print the service's JSON")
    verbs = ctl.add_subparsers(dest="verb", required=True)
    verbs.add_parser("list", help="the VMs and their states")
    create = verbs.add_parser("create", help="define a VM from a TOML or JSON file")
    create.add_argument("file", type=Path)
    for verb, text in (
        ("delete", "forget a VM that is not running"),
        ("status", "a VM's state, devices and their counters"),
        ("kill", "kill a VM at once"),
        ("console", "a VM's console address"),
    ):
        verbs.add_parser(verb, help=text).add_argument("vm")
    start = verbs.add_parser("start", help="start a VM")
    start.add_argument("vm")
    start.add_argument(
        "--wait-devices",
        type=float,
        default=10.0,
        metavar="S",
        help="return once the guest has opened its devices (seconds, 0: at once; 10)",
    )
    stop = verbs.add_parser("stop", help="stop a VM (SIGTERM, then SIGKILL)")
    stop.add_argument("vm")
    stop.add_argument("--timeout", type=float, default=5.0, metavar="S")
    shutdown = verbs.add_parser("shutdown", help="ask the guest to shut down")
    shutdown.add_argument("vm")
    shutdown.add_argument("--reboot", action="store_true")
    shutdown.add_argument("--reason", default="vmbus ctl shutdown")
    shutdown.add_argument("--wait", type=float, default=30.0, metavar="S")
    add = verbs.add_parser("add-device", help="hot add a device: a TOML/JSON file or JSON text")
    add.add_argument("vm")
    add.add_argument("device")
    remove = verbs.add_parser("remove-device", help="hot remove a device by name")
    remove.add_argument("vm")
    remove.add_argument("device")
    kvp = verbs.add_parser("kvp", help="read or write the guest's key/value pairs")
    kvp.add_argument("vm")
    kvp.add_argument("op", choices=("list", "get", "set", "delete"))
    kvp.add_argument("key", nargs="?", default="")
    kvp.add_argument("value", nargs="?", default="")
    kvp.add_argument("--pool", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    path = args.socket or default_socket()
    if args.command == "serve":
        from vmbus.vmms.api import serve  # the service's imports: the devices, aiohttp

        serve(path, args.state_dir, ready=lambda: print(f"vmbus serve: API on {path}", flush=True))
        return 0
    try:
        with Client(path) as client:
            answer = _call(client, args)
    except ApiError as error:
        print(f"vmbus ctl: {error.reason} (HTTP {error.status})", file=sys.stderr)
        return 1
    except ConfigError as error:
        print(f"vmbus ctl: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(
            f"vmbus ctl: no service on {path} ({error.strerror}): run vmbus serve", file=sys.stderr
        )
        return 1
    print(json.dumps(answer, indent=2) if args.json else _text(args.verb, answer))
    return 0


def _call(client: Client, args: argparse.Namespace) -> Any:
    verb = args.verb
    if verb == "list":
        return client.list()
    if verb == "create":
        return client.create(load(args.file).to_json())
    if verb == "start":
        return client.start(args.vm, args.wait_devices)
    if verb == "stop":
        return client.stop(args.vm, args.timeout)
    if verb == "shutdown":
        return client.shutdown(args.vm, args.reboot, args.reason, args.wait)
    if verb == "add-device":
        return client.add_device(args.vm, _device(args.device))
    if verb == "remove-device":
        return client.remove_device(args.vm, args.device)
    if verb == "kvp":
        return client.kvp(args.vm, args.op, args.key, args.value, args.pool)
    if verb == "console":
        return client.status(args.vm)["console"]
    return {"delete": client.delete, "status": client.status, "kill": client.kill}[verb](args.vm)


def _device(text: str) -> dict[str, Any]:
    """A device from a file (TOML or JSON) or from JSON text, checked here."""
    path = Path(text)
    if not text.lstrip().startswith("{") and path.exists():
        import tomllib

        raw = path.read_text()
        data = tomllib.loads(raw) if path.suffix == ".toml" else json.loads(raw)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"the device is neither a file nor JSON: {error}") from None
    return parse_device(data).to_json()


def _text(verb: str, answer: Any) -> str:
    if verb == "list":
        rows = [f"{'NAME':<24} STATE"] + [f"{vm['name']:<24} {vm['state']}" for vm in answer]
        return "\n".join(rows)
    if verb in ("status", "start", "stop", "kill") and isinstance(answer, dict):
        return _status_text(answer)
    if verb == "console":
        return "no console" if answer is None else f"{answer['vnc']}  password {answer['password']}"
    return json.dumps(answer)


def _status_text(status: dict[str, Any]) -> str:
    lines = [f"{status['name']}: {status['state']}"]
    for key in ("pid", "worker_pid", "exitcode", "uptime_s", "heartbeat", "starts"):
        if status.get(key) is not None:
            lines.append(f"  {key}: {status[key]}")
    if status.get("console"):
        lines.append(f"  console: {status['console']['vnc']}")
    for device in status.get("devices", []):
        counters = device.get("counters", {})
        shown = ", ".join(
            f"{k}={v}" for k, v in counters.items() if k != "device" and not isinstance(v, dict)
        )
        lines.append(f"  {device['name']} ({device['kind']}): {shown or '-'}")
    if "worker" in status:
        lines.append(f"  worker: {json.dumps(status['worker'])}")
    return "\n".join(lines)
