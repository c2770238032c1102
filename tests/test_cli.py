"""The `vmbus` command end to end, as a user runs it."""

from __future__ import annotations

import subprocess
import sys


def vmbus(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmbus", *args], capture_output=True, text=True, timeout=120
    )


def test_info_names_version_and_build() -> None:
    result = vmbus("info")
    assert result.returncode == 0
    assert "vmbus 0.1.0" in result.stdout
    assert "cython ring" in result.stdout


def test_demo_streams_every_size_with_both_apis() -> None:
    result = vmbus("demo", "--seconds", "0.05")
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
