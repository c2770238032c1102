"""Fixtures of the network tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from pyroute2 import netns

from vsp.net import TapBackend


@pytest.fixture
def tap() -> Iterator[TapBackend]:
    """A TAP device in a network namespace of its own (root), both removed after."""
    name = f"nbt{os.getpid()}"
    try:
        with TapBackend(netns=name, address="10.203.0.1/24", create_netns=True) as backend:
            yield backend
    finally:
        if name in netns.listnetns():
            netns.remove(name)
