"""4 KiB aliasing: is a copy slow when destination and source are a few bytes
apart modulo 4096, and do the ring's copies land there?

    python -m benchmarks.aliasing

1. glibc memcpy (through ctypes) GB/s against (dst - src) mod 4096.
2. The Cython ring in one process: ns per write() and read_into() of 64 KiB
   payloads. A VMBus payload starts 16 bytes after its packet; with a
   payload of 65512 bytes every packet is 65536 bytes long, so every payload
   sits at page offset 16 and the copy phase never moves. Source and
   destination buffers at page offset 0 or 32 put the writer's copy
   (dst - src = 16) or the reader's (dst - src = 32 - 16 = 16) in the window.
3. Across processes, interleaved: ring and C ring at 64 KiB (phase moving)
   against constant-phase sizes, page-aligned buffers as in benchmarks.compare.

Run it with GLIBC_TUNABLES=glibc.cpu.x86_rep_movsb_threshold=0x100000000 to
see whether glibc's `rep movsb` path is what is slow.
"""

from __future__ import annotations

import ctypes
import mmap
import statistics
import time

from benchmarks import ipc, native
from benchmarks.harness import padded, page_buffer

DELTAS = (0, 8, 16, 24, 32, 48, 56, 64, 128, 4096 - 64, 4096 - 16, 4096 - 8)


def _address(buf: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def memcpy_sweep(size: int, deltas: tuple[int, ...] = DELTAS) -> dict[int, float]:
    """GB/s of memcpy(dst, src, size) for each (dst - src) mod 4096 (best of 5)."""
    libc = ctypes.CDLL(None)
    libc.memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    src_buf, dst_buf = page_buffer(size + 8192), page_buffer(size + 8192)
    src, dst = _address(src_buf) + 4096, _address(dst_buf)
    reps = max(20, (32 << 20) // size)
    result = {}
    for delta in deltas:
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(reps):
                libc.memcpy(dst + delta, src, size)
            best = min(best, time.perf_counter() - start)
        result[delta] = size * reps / best / 1e9
    del src_buf, dst_buf  # exported buffers must go before the maps close
    return result


def ring_copy_ns(
    size: int, src_offset: int, dst_offset: int, packets: int = 4000
) -> tuple[float, float]:
    """Median ns of one write() and one read_into() (each with its commit)."""
    from vmbus import _cring

    ring = mmap.mmap(-1, 4096 + ipc.RING_DATA_BYTES)
    _cring.init_ring(ring)
    writer, reader = _cring.RingWriter(ring), _cring.RingReader(ring)
    src_buf, dst_buf = page_buffer(size + 4096), page_buffer(padded(size) + 4096)
    src = memoryview(src_buf)[src_offset : src_offset + size]
    dst = memoryview(dst_buf)[dst_offset : dst_offset + padded(size)]
    writes, reads = [], []
    clock = time.perf_counter_ns
    for _ in range(packets):
        t0 = clock()
        writer.write(src)
        writer.commit()
        t1 = clock()
        reader.read_into(dst)
        reader.commit()
        t2 = clock()
        writes.append(t1 - t0)
        reads.append(t2 - t1)
    src.release()
    dst.release()
    return statistics.median(writes), statistics.median(reads)


def cross_process(rounds: int = 5) -> dict[str, list[float]]:
    """MB/s, interleaved: constant copy phase against moving phase."""
    from vmbus import _cring

    cases = {
        "ring single 65536 B (phase moves)": (ipc.ring_single(_cring), 65536),
        "ring single 65512 B (payload always at page offset 16)": (ipc.ring_single(_cring), 65512),
        "ring batch 65536 B (phase moves)": (ipc.ring_batch(_cring), 65536),
        "ring batch 65512 B (payload always at page offset 16)": (ipc.ring_batch(_cring), 65512),
    }
    try:
        binary = native.build()
        cases["C ring 65536 B (phase moves)"] = (native.c_ring(binary), 65536)
        cases["C ring 65528 B (payload always at page offset 8)"] = (native.c_ring(binary), 65528)
    except RuntimeError as error:
        print(f"C ring skipped: {error}")
    results: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (method, size) in cases.items():
            results[name].append(method(100000, size) * size / 1e6)
    return results


def main() -> None:
    print("1. glibc memcpy GB/s by (dst - src) mod 4096")
    for size in (16384, 65536, 1 << 20):
        sweep = memcpy_sweep(size)
        print(f"  {size:>8} B  " + "  ".join(f"{d}:{g:.0f}" for d, g in sweep.items()))
    print("2. Cython ring in one process, 64 KiB-class payloads, ns per call (median)")
    for size, src_off, dst_off in (
        (65536, 0, 0),
        (65512, 0, 0),
        (65512, 32, 32),
        (65512, 32, 0),
    ):
        write_ns, read_ns = ring_copy_ns(size, src_off, dst_off)
        print(
            f"  payload {size} B, src at page+{src_off}, dst at page+{dst_off}: "
            f"write {write_ns:,.0f} ns ({size / write_ns:.0f} GB/s), "
            f"read_into {read_ns:,.0f} ns ({size / read_ns:.0f} GB/s)"
        )
    print("3. across processes, page-aligned buffers, MB/s (median of 5, interleaved)")
    for name, values in cross_process().items():
        print(f"  {name:<55} {statistics.median(values):>9,.0f}")


if __name__ == "__main__":
    main()
