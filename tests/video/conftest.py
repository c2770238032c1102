"""Fixtures of the VNC tests: a screen with a pattern, a server factory
(security None unless a test sets a password), the input it forwards."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from vnc_client import Events, H, W, pattern

from vsp.video.screen import Screen
from vsp.video.vnc import VncServer


@pytest.fixture
def screen() -> Screen:
    s = Screen(W, H)
    s.update(pattern(H, W))
    return s


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def serve(screen: Screen, events: Events) -> Iterator[Callable[..., VncServer]]:
    servers: list[VncServer] = []

    def make(**kwargs: Any) -> VncServer:
        # Security None unless the test sets a password (the default is tested on its own).
        kwargs.setdefault("authenticate", kwargs.get("password") is not None)
        kwargs.setdefault("on_key", events.on_key)
        kwargs.setdefault("on_pointer", events.on_pointer)
        server = VncServer(kwargs.pop("screen", screen), port=0, name="test-console", **kwargs)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def server(serve: Callable[..., VncServer]) -> VncServer:
    return serve()
