"""The `vmbus` command line: `demo` and `info`."""

from __future__ import annotations

import argparse
import sys

import vmbus
from vmbus import ring


def positive_seconds(text: str) -> float:
    value = float(text)
    if not 0 < value <= 60:
        raise argparse.ArgumentTypeError(f"seconds must be in (0, 60], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmbus", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="stream packets between processes through a ring")
    demo.add_argument(
        "--seconds", type=positive_seconds, default=0.5, help="length of each run (default 0.5)"
    )
    commands.add_parser("info", help="version and build")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from vmbus import demo

        demo.main(args.seconds)
    else:
        print(f"vmbus {vmbus.__version__}, {ring.IMPLEMENTATION} ring")
    return 0


if __name__ == "__main__":
    sys.exit(main())
