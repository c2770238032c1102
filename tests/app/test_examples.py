"""Every example under examples/ runs and does what it says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_echo_partition_example() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "echo_partition.py")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "child: echo came back" in result.stdout
    assert "parent: child exit code 0" in result.stdout


def run_example(name: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_embedding_example() -> None:
    out = run_example("embed_vsp.py")
    assert "negotiated VMBus 5.3; echo: b'from the emulated guest'" in out
    assert "stopped: stopped" in out


def test_property_testing_example() -> None:
    out = run_example("property_test_framing.py")
    assert out.count(": passed") == 3
