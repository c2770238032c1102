"""A channel served by a thread of its own (`ChannelHandler.own_thread`):
the worker's main loop hands it over at the open and takes it back at the
close; the thread only serves packets, never the control plane."""

from __future__ import annotations

import os
import selectors
import threading
from typing import Protocol

from vmbus.channel import Channel
from vmbus.device import ChannelHandler

__all__ = ["POLL_SECONDS", "ChannelThread", "OpenChannel", "serve_channel"]

POLL_SECONDS = 0.5  # how often a worker notices a stop request or a stuck thread


class OpenChannel(Protocol):
    channel: Channel
    handler: ChannelHandler


class FailureSink(Protocol):
    name: str

    def fail(self, relid: int, reason: str) -> None: ...


def serve_channel(open_channel: OpenChannel) -> int | str:
    """Serve a channel's packets: the count consumed, or why it failed."""
    try:
        handler = open_channel.handler
        fast = handler.fast_served
        count = open_channel.channel.service(handler.on_packet, handler.admission)
        handler.on_signal()
        return count + handler.fast_served - fast
    except Exception as error:
        return str(error)  # not the exception: its traceback pins views of the ring


class ChannelThread:
    """A channel served by a thread of its own (`ChannelHandler.own_thread`),
    so the compiled paths of several channels run at once. It waits on the
    channel's doorbell, never spins on a stuck peer, and hands a failure to
    the main loop, which alone talks to the control plane."""

    def __init__(self, worker: FailureSink, relid: int, open_channel: OpenChannel) -> None:
        self.worker, self.relid, self.open_channel = worker, relid, open_channel
        self._stop = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread = threading.Thread(
            target=self._run, name=f"vmwp-{worker.name}-{relid}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        wake = self.open_channel.channel.wake_me.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(wake, selectors.EVENT_READ)
            selector.register(self._stop, selectors.EVENT_READ)
            while True:
                failure = serve_channel(self.open_channel)
                if isinstance(failure, str):
                    self.worker.fail(self.relid, failure)
                    return
                ready = selector.select(POLL_SECONDS)
                if any(key.fd == self._stop for key, _ in ready):
                    return

    def stop(self) -> None:
        os.eventfd_write(self._stop, 1)
        self._thread.join()
        os.close(self._stop)
