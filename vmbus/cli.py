"""The `vmbus` command line: `demo`, `bench`, `serve` (the management
service), `ctl` (its client) and `info`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import vmbus
from vmbus import ring


def count(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {text}")
        return value

    return parse


def positive_seconds(text: str) -> float:
    value = float(text)
    if not 0 < value <= 60:
        raise argparse.ArgumentTypeError(f"seconds must be in (0, 60], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmbus", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="host child partitions with every device and show their figures"
    )
    demo.add_argument("--seconds", type=positive_seconds, default=5.0, help="run time (default 5)")
    demo.add_argument("--children", type=count(1, 8), default=2, help="child partitions (2)")
    demo.add_argument("--disk-mb", type=count(4, 65536), default=64, help="disk size, MiB (64)")
    demo.add_argument(
        "--net",
        choices=("switch", "tap"),
        default="switch",
        help="network backend: the in-memory switch, or a TAP device (root)",
    )
    demo.add_argument(
        "--vnc-port",
        type=count(0, 65535),
        default=5900,
        help="VNC console port on 127.0.0.1 (5900; 0 picks one)",
    )
    demo.add_argument(
        "--ring-only", action="store_true", help="only the ring throughput between two processes"
    )
    bench = commands.add_parser("bench", help="every comparison benchmark, one report")
    bench.add_argument("--quick", action="store_true", help="short runs (about 3 minutes)")
    bench.add_argument(
        "--only",
        action="append",
        default=[],
        choices=("ring", "channels", "storage", "network", "net-stack", "video", "scale", "vmms"),
        help="run only this one (repeatable)",
    )
    bench.add_argument("--markdown", type=Path, help="write the tables here (else stdout)")
    bench.add_argument("--plot", type=Path, help="save a PNG chart of the ratios")
    commands.add_parser("info", help="version and build")
    from vmbus.vmms import ctl

    ctl.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo" and args.ring_only:
        try:
            from demo import ring as ring_demo
        except ModuleNotFoundError as error:
            return checkout_only(error, "demo")

        ring_demo.main(args.seconds)
    elif args.command == "bench":
        try:
            from benchmarks import bench
        except ModuleNotFoundError as error:
            return checkout_only(error, "bench")

        return bench.main(quick=args.quick, only=args.only, markdown=args.markdown, plot=args.plot)
    elif args.command == "demo":
        try:
            from demo import parent as demo
        except ModuleNotFoundError as error:
            return checkout_only(error, "demo")

        options = demo.Options(args.seconds, args.children, args.disk_mb, args.net, args.vnc_port)
        return demo.main(options)
    elif args.command in ("serve", "ctl"):
        from vmbus.vmms import ctl

        return ctl.run(args)
    else:
        print(info())
    return 0


def checkout_only(error: ModuleNotFoundError, command: str) -> int:
    """`demo` and `bench` run from the source checkout; a wheel has neither package."""
    if error.name not in ("demo", "benchmarks"):
        raise error
    what = "the demo ships" if command == "demo" else "the benchmarks ship"
    print(
        f"vmbus {command}: {what} with the source checkout: run ./run {command} there",
        file=sys.stderr,
    )
    return 2


def info() -> str:
    """Version, build, and what the stack speaks."""
    from vmbus import guid, messages
    from vmbus.protocols import storage
    from vmbus.protocols import video as synthvid
    from vmbus.protocols.input import SYNTH_KBD_VERSION, SYNTHHID_INPUT_VERSION
    from vmbus.protocols.net import NVSP_VERSIONS

    def versions(values: Iterable[int], fmt: Callable[[int], str]) -> str:
        return ", ".join(fmt(int(v)) for v in values)

    dotted = messages.format_version
    rows = [
        f"vmbus {vmbus.__version__}, {ring.IMPLEMENTATION} ring "
        f"(set VMBUS_RING=python for the reference ring)",
        f"VMBus versions (host): {versions(messages.HOST_SUPPORTED_VERSIONS, dotted)}",
        "devices:",
        f"  storage   {guid.SCSI}  VSTOR {versions(storage.VSP_VERSIONS, _minor8)}",
        f"  network   {guid.NETWORK}  NVSP {versions(NVSP_VERSIONS, dotted)}, RNDIS 1.0",
        f"  keyboard  {guid.KEYBOARD}  {dotted(SYNTH_KBD_VERSION)}",
        f"  mouse     {guid.MOUSE}  HID {dotted(SYNTHHID_INPUT_VERSION)}",
        f"  video     {guid.SYNTHVID}  synthvid "
        + ", ".join("{}.{}".format(*synthvid.version_tuple(v)) for v in synthvid.VSP_VERSIONS),
    ]
    return "\n".join(rows)


def _minor8(version: int) -> str:
    return f"{version >> 8}.{version & 0xFF}"


if __name__ == "__main__":
    sys.exit(main())
