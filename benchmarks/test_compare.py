"""Smoke test of the comparison runner: a tiny cross-process run end to end."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from benchmarks import compare


def test_compare_runs_and_writes_markdown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "table.md"
    args = [
        "--quick",
        "--strict",
        "--repeat",
        "1",
        "--sizes",
        "64",
        "64K",
        "--markdown",
        str(report),
    ]
    assert compare.main([*args, "--only", "os.pipe", "ring single (cython)", "C ring"]) == 0
    table = capsys.readouterr().out
    assert "ring single (cython)" in table and "os.pipe" in table
    assert report.read_text().count("| 64 KiB |") >= 2
    assert not multiprocessing.active_children()
