"""The `service` fixture: a management service of the test's own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from vmms_support import Service, start_service, stop_service


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    running = start_service(tmp_path)
    try:
        yield running
    finally:
        stop_service(running)
