"""Benchmarks: pytest-benchmark suites and the comparison runner."""
