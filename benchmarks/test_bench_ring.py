"""In-process ring round trips with pytest-benchmark, both implementations.

    .venv/bin/pytest benchmarks/ --benchmark-enable

(The project's pytest config disables benchmarks by default: then each test
runs its round trip once, as a plain test.)
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from benchmarks.harness import padded
from benchmarks.ipc import RING_DATA_BYTES, batch_count
from vmbus import _pyring

try:
    from vmbus import _cring
except ImportError:  # pragma: no cover - the build step makes it
    _cring = None  # type: ignore[assignment]

SIZES = [64, 65536]


@pytest.fixture(params=["cython", "python"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    module = {"cython": _cring, "python": _pyring}[request.param]
    if module is None:
        pytest.fail("the Cython ring is not built")
    return module


def _ring(impl: ModuleType) -> tuple[Any, Any]:
    buf = mmap.mmap(-1, 4096 + RING_DATA_BYTES)
    impl.init_ring(buf)
    return impl.RingWriter(buf), impl.RingReader(buf)


@pytest.mark.parametrize("size", SIZES)
def test_single_round_trip(benchmark: Any, impl: ModuleType, size: int) -> None:
    """write + commit, then read_into + commit, of one packet."""
    writer, reader = _ring(impl)
    payload, out = bytes(size), bytearray(padded(size))

    def round_trip() -> int:
        writer.write(payload)
        writer.commit()
        length: int = reader.read_into(out)
        reader.commit()
        return length

    assert _run(benchmark, round_trip) == padded(size)


@pytest.mark.parametrize("size", SIZES)
def test_batch_round_trip(benchmark: Any, impl: ModuleType, size: int) -> None:
    """write_packed + commit, then read_packed + commit, of batch_count(size) packets."""
    writer, reader = _ring(impl)
    count = batch_count(size)
    data = bytes(count * size)
    lengths = np.full(count, size, dtype=np.uint32)
    out, got = bytearray(count * padded(size)), np.zeros(count, dtype=np.uint32)
    benchmark.extra_info["packets_per_call"] = count

    def round_trip() -> int:
        written: int = writer.write_packed(data, lengths)
        writer.commit()
        read: int = reader.read_packed(out, got)
        reader.commit()
        assert written == count
        return read

    assert _run(benchmark, round_trip) == count
    assert (got == padded(size)).all()


def _run(benchmark: Any, round_trip: Callable[[], int]) -> int:
    result: int = benchmark(round_trip)
    return result
