"""Shared fixtures, and the CI rule that what CI provides is never skipped
there: tests needing root, and tests that skip for want of a Debian package
(their reason says "apt-get install"), which .ci/run installs."""

from __future__ import annotations

import os
from types import ModuleType

import pytest

from vmbus import _pyring

try:
    from vmbus import _cring
except ImportError:  # pragma: no cover - the build step makes it
    _cring = None  # type: ignore[assignment]

RING_IMPLEMENTATIONS = {"python": _pyring, "cython": _cring}


@pytest.fixture(params=sorted(RING_IMPLEMENTATIONS))
def ring_impl(request: pytest.FixtureRequest) -> ModuleType:
    """Each ring test runs against both implementations."""
    module = RING_IMPLEMENTATIONS[request.param]
    if module is None:
        pytest.fail("the Cython ring is not built: run ./run test")
    return module


_root_skips: list[str] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`@pytest.mark.requires_root` tests skip, with the reason, unless root."""
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (TAP devices, network namespaces); CI runs it")
    for item in items:
        if "requires_root" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not report.skipped:
        return
    reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""
    if "requires_root" in report.keywords or "apt-get install" in reason:
        _root_skips.append(f"{report.nodeid} ({reason})")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # In CI (as root, with .ci/run's packages) such a skip hides a broken capability.
    if os.environ.get("CI") and _root_skips:
        print(f"\nCI: {len(_root_skips)} test(s) that CI must run were skipped:")
        for nodeid in _root_skips:
            print(f"  {nodeid}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
