"""Cross-process throughput comparison of the VMBus ring with the alternatives.

    python -m benchmarks.compare [--quick] [--sizes 64 1K ...] [--repeat N]
                                 [--markdown FILE] [--only TEXT ...]
                                 [--target SECONDS] [--wait-quiet SECONDS] [--strict]

Methods run interleaved: every round measures every (size, method) once, in a
rotated order, so the host's slow and fast phases hit all methods alike. The
table gives medians over the rounds; ratios are medians of per-round ratios
(each against the reference measured in the same round). Message counts adapt
so that each measurement takes about --target seconds. "others" is how many
CPUs other processes (and the host, as steal) used during the measurements
(median): busy-polling pairs need both vCPUs, so above ~0.2 the figures say
more about the scheduler than about the methods.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from benchmarks import ipc, native
from benchmarks.harness import Method, cpu_snapshot, others_cpu

REFERENCES = ("os.pipe", "mp.Queue", "C ring")
DEFAULT_SIZES = (64, 1024, 16384, 65536)


@dataclass
class Entry:
    name: str
    method: Method
    rate: float  # expected msgs/s for small payloads, to size the first run
    mbps: float  # expected MB/s ceiling for big payloads
    results: dict[int, list[float | None]] = field(default_factory=dict)
    others: dict[int, list[float]] = field(default_factory=dict)  # CPUs others used
    failures: list[str] = field(default_factory=list)  # errors other than timeouts
    last: dict[int, float] = field(default_factory=dict)  # last msgs/s measured per size

    def count(self, size: int, target: float) -> int:
        """Messages for a run of about `target` seconds."""
        rate = self.last.get(size) or min(self.rate, self.mbps * 1e6 / size)
        return max(50, min(10**9, int(rate * target)))


def methods() -> tuple[list[Entry], list[str]]:
    """The methods this machine can run, and why the others are skipped."""
    entries = [
        Entry("mp.Queue", ipc.mp_queue, 3e5, 2e3),
        Entry("mp.Pipe", ipc.mp_pipe, 6e5, 2e3),
        Entry("os.pipe", ipc.os_pipe, 6e5, 2e3),
    ]
    skipped = []
    try:
        import faster_fifo  # noqa: F401

        entries.append(Entry("faster-fifo", ipc.faster_fifo_queue, 3e5, 6e3))
    except ImportError as error:
        skipped.append(f"faster-fifo: {error}")
    try:
        from vmbus import _cring

        entries.append(Entry("ring single (cython)", ipc.ring_single(_cring), 8e6, 5e4))
        single_commit = ipc.ring_single(_cring, signalled=True)
        entries.append(Entry("ring single, commit (cython)", single_commit, 6e6, 5e4))
        entries.append(Entry("ring batch (cython)", ipc.ring_batch(_cring), 8e7, 5e4))
    except ImportError as error:
        skipped.append(f"Cython ring: {error}")
    from vmbus import _pyring

    entries.append(Entry("ring single (python)", ipc.ring_single(_pyring), 3e5, 8e3))
    entries.append(Entry("ring batch (python)", ipc.ring_batch(_pyring), 4e5, 1e4))
    try:
        binary = native.build()
        entries.append(Entry("C ring", native.c_ring(binary), 3e7, 5e4))
        entries.append(Entry("C ring, batched", native.c_ring(binary, batched=True), 1e8, 6e4))
    except (RuntimeError, OSError) as error:
        skipped.append(f"C ring: {error}")
    entries.append(Entry("memcpy (np.copyto)", ipc.memcpy, 5e6, 8e4))
    return entries, skipped


QUIET_CPU = 0.3  # others' CPU use below which a measurement counts as undisturbed


def wait_quiet(limit: float) -> None:
    """Wait (at most `limit` seconds) until other processes use less than
    QUIET_CPU over 2 s: on a shared machine, measure between others' jobs."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = cpu_snapshot()
        time.sleep(2.0)
        busy = others_cpu(before, cpu_snapshot())
        if busy < QUIET_CPU:
            return
        print(f"  waiting for a quiet machine: others use {busy:.2f} CPU", file=sys.stderr)


def measure(
    entries: list[Entry], sizes: Sequence[int], rounds: int, target: float, quiet: float = 0.0
) -> None:
    """Fill each entry's results: one value (None = failed) per round and size.
    With `quiet` > 0, a measurement disturbed by other processes is retried
    (twice at most) once the machine is quiet again, waiting up to `quiet` s."""
    for entry in entries:
        entry.results = {size: [] for size in sizes}
        entry.others = {size: [] for size in sizes}
    for r in range(rounds):
        order = entries[r % len(entries) :] + entries[: r % len(entries)]
        for size in sizes:
            wait_quiet(quiet)
            for entry in order:
                for attempt in range(3 if quiet else 1):
                    if attempt:
                        wait_quiet(quiet)
                    rate, others = _measure_once(entry, size, target)
                    if others < QUIET_CPU:
                        break
                entry.results[size].append(rate)
                entry.others[size].append(others)
                if rate:
                    shown = f"{_si(rate)} msgs/s, others {others:.2f} CPU"
                    print(
                        f"  round {r + 1}/{rounds} {size:>6} B {entry.name:<22} {shown}",
                        file=sys.stderr,
                    )


def _measure_once(entry: Entry, size: int, target: float) -> tuple[float | None, float]:
    """Messages/s (None if the run failed) and the CPUs others used meanwhile."""
    timeout = max(2.0, 20 * target)
    rate: float | None = None
    before, count = cpu_snapshot(), entry.count(size, target)
    try:
        rate = entry.method(count, size, timeout)
        entry.last[size] = rate
    except TimeoutError:  # a busy machine, most likely: not an error
        print(f"  {entry.name} {size} B timed out ({timeout} s)", file=sys.stderr)
        entry.last[size] = count / timeout  # an upper bound: run fewer next time
    except Exception as error:  # report, keep measuring the others
        print(f"  {entry.name} {size} B FAILED: {error!r}", file=sys.stderr)
        entry.failures.append(f"{entry.name}, {_size(size)}: {error!r}")
    return rate, others_cpu(before, cpu_snapshot())


def table(entries: list[Entry], sizes: Sequence[int]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: medians, spread and per-round ratios to the references."""
    header = [
        "size",
        "method",
        "msgs/s",
        "MB/s",
        "spread",
        "others",
        *(f"× {r}" for r in REFERENCES),
    ]
    refs = {e.name: e for e in entries if e.name in REFERENCES}
    rows = []
    for size in sizes:
        for entry in entries:
            values = [v for v in entry.results[size] if v]
            if not values:
                rows.append([_size(size), entry.name, "FAILED", *[""] * (3 + len(REFERENCES))])
                continue
            median = statistics.median(values)
            spread = (max(values) - min(values)) / median
            ratios = [_ratio(entry, refs.get(name), size) for name in REFERENCES]
            mbps = f"{median * size / 1e6:,.0f}"
            runs = len(entry.results[size])
            spread_text = f"{spread:.0%}" + (
                f" ({len(values)}/{runs} runs)" if len(values) < runs else ""
            )
            others = f"{statistics.median(entry.others[size]):.2f}"
            rows.append([_size(size), entry.name, _si(median), mbps, spread_text, others, *ratios])
    return header, rows


def _ratio(entry: Entry, ref: Entry | None, size: int) -> str:
    if ref is None:
        return "n/a"
    pairs = zip(entry.results[size], ref.results[size], strict=True)
    ratios = [a / b for a, b in pairs if a and b]
    return f"{statistics.median(ratios):.3g}" if ratios else "n/a"


def _si(value: float) -> str:
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g}"


def _size(size: int) -> str:
    return f"{size // 1024} KiB" if size % 1024 == 0 else f"{size} B"


def render_text(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in [header, *rows]
    ]
    return "\n".join(lines)


def render_markdown(header: list[str], rows: list[list[str]], notes: list[str]) -> str:
    lines = [f"| {' | '.join(header)} |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join([*notes, "", *lines, ""])


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            pairs = [line.split(":", 1) for line in info if ":" in line]
    except OSError:
        return platform.machine()
    fields = {key.strip(): value.strip() for key, value in pairs}
    return f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')})"


def _parse_size(text: str) -> int:
    scale = 1024 if text[-1:].upper() == "K" else 1
    return int(text.rstrip("kK")) * scale


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="2 short rounds (under ~20 s)")
    parser.add_argument("--sizes", nargs="+", type=_parse_size, default=list(DEFAULT_SIZES))
    parser.add_argument("--repeat", type=int, help="rounds (default 5, quick 2)")
    parser.add_argument("--target", type=float, help="seconds per measurement (0.4, quick 0.05)")
    parser.add_argument("--only", nargs="+", help="methods whose name contains one of these")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each size of each round, and before retrying a measurement others "
        "disturbed, wait up to this long for other processes to go idle",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 if any measurement failed (not timeouts)"
    )
    args = parser.parse_args(argv)
    rounds = args.repeat or (2 if args.quick else 5)
    target = args.target or (0.05 if args.quick else 0.4)

    entries, skipped = methods()
    if args.only:
        entries = [e for e in entries if any(o.lower() in e.name.lower() for o in args.only)]
    for reason in skipped:
        print(f"skipped {reason}", file=sys.stderr)
    started, load = time.time(), os.getloadavg()[0]
    if not args.quick:  # a short unrecorded round sizes the message counts
        measure(entries, args.sizes, 1, target / 4, args.wait_quiet)
    measure(entries, args.sizes, rounds, target, args.wait_quiet)
    header, rows = table(entries, args.sizes)
    print(render_text(header, rows))
    notes = [
        f"- {time.strftime('%Y-%m-%d %H:%M %Z', time.localtime(started))}, "
        f"{os.cpu_count()} vCPU {_cpu()}, Python {platform.python_version()}, "
        f"load average {load:.2f} at start",
        f"- {rounds} rounds of ~{target} s per measurement, ring data area "
        f"{ipc.RING_DATA_BYTES // 1024} KiB, {time.time() - started:.0f} s in total",
        *(f"- skipped {reason}" for reason in skipped),
        *(f"- FAILED {failure}" for e in entries for failure in e.failures),
    ]
    if args.markdown:
        with open(args.markdown, "w") as out:
            out.write(render_markdown(header, rows, notes))
    print(f"done in {time.time() - started:.1f} s", file=sys.stderr)
    return 1 if args.strict and any(e.failures for e in entries) else 0


if __name__ == "__main__":
    sys.exit(main())
