"""Benchmarks: pytest-benchmark suites and the comparison runner."""

import os

# numpy's OpenBLAS starts worker threads at import that spin for a while; on
# a 2-vCPU machine they steal time from the producer/consumer pair.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
