"""`vmbus bench`: every comparison benchmark in turn — the ring against
Python's IPC, a C ring and memcpy; channels; storage against fio and
os.preadv; network against raw TAP writes; video — with each runner's own
progress, then one Markdown document of all their tables (for
BENCHMARKS.md), and optionally a PNG chart of every ratio.

An application module. The runners live in the checkout's `benchmarks/`
package and each runs in a process of its own, so one that fails or lacks a
tool (fio, root for TAP) is reported and skipped, not fatal.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNNERS = {
    "ring": "benchmarks.compare",
    "channels": "benchmarks.channel_bench",
    "storage": "benchmarks.storage_bench",
    "network": "benchmarks.net_bench",
    "net-stack": "benchmarks.net_stack_bench",
    "video": "benchmarks.video_bench",
    "scale": "benchmarks.scale_bench",
    "vmms": "benchmarks.vmms_bench",
}
CHECKOUT = Path(__file__).resolve().parent.parent


def main(*, quick: bool, only: list[str], markdown: Path | None, plot: Path | None) -> int:
    if not (CHECKOUT / "benchmarks" / "__init__.py").exists():
        print(
            "vmbus bench: the benchmarks ship with the source checkout; run it there",
            file=sys.stderr,
        )
        return 2
    names = only or list(RUNNERS)
    sections, failed = [], []
    with tempfile.TemporaryDirectory(prefix="vmbus-bench-") as scratch:
        for number, name in enumerate(names, 1):
            print(f"[{number}/{len(names)}] {name} ({RUNNERS[name]})", file=sys.stderr, flush=True)
            table = Path(scratch) / f"{name}.md"
            started = time.monotonic()
            command = [sys.executable, "-m", RUNNERS[name], "--markdown", str(table)]
            result = subprocess.run([*command, *(["--quick"] if quick else [])], cwd=CHECKOUT)
            took = time.monotonic() - started
            if result.returncode != 0 or not table.exists():
                print(f"    {name}: failed (exit {result.returncode}); skipped", file=sys.stderr)
                failed.append(name)
                continue
            print(f"    {name}: done in {took:.0f} s", file=sys.stderr)
            sections.append(f"## {name}\n\n{table.read_text().strip()}\n")
    document = "\n".join(sections)
    if markdown is None:
        print(document)
    else:
        markdown.write_text(document)
        print(f"tables written to {markdown}", file=sys.stderr)
    if plot is not None:
        _plot(document, plot)
    return 1 if failed and not sections else 0


def ratios(document: str) -> list[tuple[str, float]]:
    """Every ratio in the tables: columns whose heading holds "×"."""
    found: list[tuple[str, float]] = []
    header: list[str]
    section, header = "", []
    for line in document.splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        if not line.startswith("|"):
            header = []
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not header:
            header = cells
            continue
        for heading, cell in zip(header, cells, strict=False):
            number = re.fullmatch(r"\**([0-9][0-9.,]*)\**", cell)
            if "×" in heading and number:
                found.append(
                    (f"{section}: {cells[0]} {heading}", float(number[1].replace(",", "")))
                )
    return found


def _plot(document: str, path: Path) -> None:
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        print("vmbus bench: --plot needs Pillow (pip install pillow); no chart", file=sys.stderr)
        return
    bars = ratios(document)[:80]
    width, row = 1100, 16
    image = Image.new("RGB", (width, 40 + row * len(bars)), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), "ratios (bar to the line = 1.0; log scale)", fill="black")
    scale = 120  # pixels per decade
    one = 720
    draw.line([(one, 30), (one, 40 + row * len(bars))], fill="gray")
    for i, (label, value) in enumerate(bars):
        y = 36 + i * row
        end = one + int(scale * math.log10(max(value, 1e-3)))
        draw.rectangle(
            [min(one, end), y, max(one, end), y + row - 4],
            fill="seagreen" if value >= 1 else "indianred",
        )
        draw.text((10, y), f"{label[:95]} {value:g}", fill="black")
    image.save(path)
    print(f"chart saved as {path}", file=sys.stderr)
