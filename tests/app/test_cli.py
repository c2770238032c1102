"""The `vmbus` command end to end, as a user runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import cast

import numpy as np


def vmbus(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmbus", *args], capture_output=True, text=True, timeout=300
    )


def test_info_names_version_and_build() -> None:
    result = vmbus("info")
    assert result.returncode == 0
    assert "vmbus 0.1.0" in result.stdout
    assert "cython ring" in result.stdout
    assert "VMBus versions (host): 2.4, 3.0, 4.0, 4.1, 5.0, 5.1, 5.2, 5.3" in result.stdout
    for device in ("storage", "network", "keyboard", "mouse", "video"):
        assert f"  {device} " in result.stdout


def test_demo_streams_every_size_with_both_apis() -> None:
    result = vmbus("demo", "--ring-only", "--seconds", "0.05")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[2:]]
    assert [(row[0], row[1]) for row in rows] == [
        (api, size) for size in ("64", "1024", "16384", "65536") for api in ("single", "batch")
    ]
    assert all(float(row[2].replace(",", "")) > 0 for row in rows)


def test_bad_arguments_fail_with_a_clear_message() -> None:
    result = vmbus("demo", "--seconds", "-1")
    assert result.returncode == 2
    assert "seconds must be in (0, 60]" in result.stderr
    assert vmbus("frobnicate").returncode == 2


def test_full_demo_runs_every_device(tmp_path: Path) -> None:
    # No writable path by default: the demo gives its confined children the
    # one directory they report to (under ~/.cache they could not write).
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "VMBUS_SANDBOX_WRITABLE": ""}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vmbus",
            "demo",
            "--seconds",
            "1",
            "--children",
            "1",
            "--vnc-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("| child-1 |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    ios, verified, mismatches, sent, received, video = map(int, cells[1:7])
    assert ios > 0 and verified > 0 and mismatches == 0 and sent > 0 and video > 0
    console = next(line for line in result.stdout.splitlines() if "VNC console" in line)
    # Behind a password made for the run, which the demo prints.
    assert re.fullmatch(r"VNC console of child-1: 127\.0\.0\.1::\d+ .*password \S{8}", console)
    assert (tmp_path / "vmbus-demo" / "screen.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "vmbus-demo" / "disk-1.img").stat().st_size == 64 << 20


def test_demo_children_up_to_the_flags_maximum_draw_in_colours_of_their_own() -> None:
    """`vmbus demo --children 8` once died with an OverflowError: child 7's
    colour (40 * 7) did not fit a byte."""
    from demo import child
    from vmbus.cli import build_parser
    from vsc.video import Framebuffer

    most = 8
    assert build_parser().parse_args(["demo", "--children", str(most)]).children == most

    class Screen:
        width, height = child.WIDTH, child.HEIGHT
        pixels = np.zeros((child.HEIGHT, child.WIDTH, 4), np.uint8)

        def update(self, *rects: tuple[int, int, int, int]) -> None:
            pass

    reds = set()
    for index in range(1, most + 1):
        screen = Screen()
        for seq in (1, 2):
            child._draw(cast(Framebuffer, screen), seq, index)
        reds.add(int(screen.pixels[0, -1, 2]))
    assert len(reds) == most


def test_demo_arguments_are_checked() -> None:
    result = vmbus("demo", "--children", "0")
    assert result.returncode == 2 and "must be in [1, 8]" in result.stderr
    result = vmbus("demo", "--net", "carrier-pigeon")
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_bench_ratios_are_read_from_the_tables() -> None:
    from benchmarks.bench import ratios

    document = (
        "## ring\n\n| method | msgs/s | × os.pipe |\n|---|---:|---:|\n"
        "| vmbus single | 2,100,000 | **2.10** |\n| os.pipe | 1,000,000 | 1.00 |\n\nprose\n"
        "## storage\n\n| workload | stack × fio |\n|---|---:|\n| 4k QD1 | 0.006 |\n"
    )
    assert ratios(document) == [
        ("ring: vmbus single × os.pipe", 2.10),
        ("ring: os.pipe × os.pipe", 1.00),
        ("storage: 4k QD1 stack × fio", 0.006),
    ]


def test_bench_runs_a_quick_comparison(tmp_path: Path) -> None:
    report, chart = tmp_path / "bench.md", tmp_path / "bench.png"
    result = vmbus(
        "bench", "--only", "ring", "--quick", "--markdown", str(report), "--plot", str(chart)
    )
    assert result.returncode == 0, result.stderr
    assert "[1/1] ring" in result.stderr
    text = report.read_text()
    assert text.startswith("## ring") and "|" in text
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
