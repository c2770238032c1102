"""Every example under examples/ runs and does what it says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


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
