"""The C ring (cring.c): compiled with `cc -O2` into a cache directory on
first use, run as a subprocess that forks its own producer and consumer."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from benchmarks.harness import TIMEOUT, Method
from benchmarks.ipc import RING_DATA_BYTES, batch_count

SOURCE = Path(__file__).with_name("cring.c")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vmbus-bench"


def build() -> Path:
    """Path of the compiled C ring; compiles it if the source changed.
    Raises RuntimeError when there is no C compiler or the build fails."""
    source = SOURCE.read_bytes()
    binary = cache_dir() / f"cring-{hashlib.sha256(source).hexdigest()[:12]}"
    if binary.exists():
        return binary
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc) found")
    binary.parent.mkdir(parents=True, exist_ok=True)
    partial = binary.with_suffix(f".{os.getpid()}.tmp")
    done = subprocess.run(
        [compiler, "-O2", "-std=c11", "-o", str(partial), str(SOURCE)],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"compiling {SOURCE.name} failed:\n{done.stderr}")
    partial.replace(binary)
    for stale in binary.parent.glob("cring-*"):  # builds of older sources
        if stale != binary and not stale.name.endswith(".tmp"):
            stale.unlink(missing_ok=True)
    return binary


def run(binary: Path, messages: int, size: int, batch: int = 1, timeout: float = TIMEOUT) -> float:
    """Messages/s of one C ring run (timed by its consumer, as in harness)."""
    args = [str(binary), str(messages), str(size), str(RING_DATA_BYTES), str(batch)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as error:
        raise TimeoutError(f"no result after {timeout:.0f} s") from error
    finally:
        if proc.poll() is None:
            proc.kill()  # its children die with it (PR_SET_PDEATHSIG)
            proc.wait()
    if proc.returncode:
        raise RuntimeError(f"cring exited with code {proc.returncode}")
    return messages / float(out.split()[2])


def c_ring(binary: Path, batched: bool = False) -> Method:
    """The C ring publishing after every message, or after batch_count(size)."""

    def method(messages: int, size: int, timeout: float = TIMEOUT) -> float:
        return run(binary, messages, size, batch_count(size) if batched else 1, timeout)

    return method
