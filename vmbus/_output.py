"""The output of child partitions: a pipe for each child's stdout and one
for its stderr, read by one thread of the parent at a bounded rate and
copied to the parent's stdout and stderr line by line, each line prefixed
with the child's name."""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class _Child:
    streams: int  # not yet read to their end
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Stream:
    fd: int
    target: int  # our descriptor it is copied to
    prefix: bytes
    rate: float
    burst: float
    tokens: float
    stamp: float
    child: _Child
    partial: bytearray = field(default_factory=bytearray)
    resume_at: float | None = None  # while held back


class OutputPump:
    """One thread copies every child's output to ours, line by line,
    each line prefixed with the child's name. A stream that has used up its
    budget is not read until it refills, so a flooding child blocks on its
    own writes and costs the parent nothing; once the child is gone, what
    it left in the pipe is dropped (and said so)."""

    CHUNK = 64 * 1024
    LONGEST_LINE = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._new: list[_Stream] = []
        self._wake = os.eventfd(0, os.EFD_NONBLOCK)
        self._streams: dict[int, _Stream] = {}
        self._epoll = select.epoll()
        self._epoll.register(self._wake, select.EPOLLIN)
        threading.Thread(target=self._run, name="vmbus-child-output", daemon=True).start()

    def add(
        self, pipes: Sequence[tuple[int, int]], name: str, rate: int, burst: int
    ) -> threading.Event:
        """Take over each (pipe's read end, our descriptor to copy it to),
        each read at `rate` bytes a second after a `burst`; the event is set
        once all are read to their end."""
        burst = max(burst, self.LONGEST_LINE)
        child = _Child(len(pipes))
        prefix, now = f"[{name}] ".encode(), time.monotonic()
        streams = [_Stream(fd, to, prefix, rate, burst, burst, now, child) for fd, to in pipes]
        with self._lock:
            self._new += streams
        os.eventfd_write(self._wake, 1)
        return child.done

    def _run(self) -> None:
        while True:
            held = [s.resume_at for s in self._streams.values() if s.resume_at is not None]
            timeout = max(0.0, min(held) - time.monotonic()) if held else -1
            for fd, events in self._epoll.poll(timeout):
                if fd == self._wake:
                    self._take_new()
                    continue
                stream = self._streams[fd]
                if stream.resume_at is None:
                    self._read(stream)
                elif events & (select.EPOLLHUP | select.EPOLLERR):
                    self._drop_the_rest(stream)  # held back, and its writer is gone
            now = time.monotonic()
            for stream in list(self._streams.values()):
                if stream.resume_at is not None and stream.resume_at <= now:
                    stream.resume_at = None
                    self._epoll.modify(stream.fd, select.EPOLLIN)

    def _take_new(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake)
        with self._lock:
            new, self._new = self._new, []
        for stream in new:
            self._streams[stream.fd] = stream
            self._epoll.register(stream.fd, select.EPOLLIN)

    def _read(self, stream: _Stream) -> None:
        now = time.monotonic()
        stream.tokens = min(stream.burst, stream.tokens + (now - stream.stamp) * stream.rate)
        stream.stamp = now
        try:
            data = os.read(stream.fd, max(1, min(self.CHUNK, int(stream.tokens))))
        except OSError:
            data = b""
        if not data:
            self._close(stream)
            return
        stream.tokens -= len(data)
        self._emit(stream, data)
        if stream.tokens < self.LONGEST_LINE:  # held back until a line's worth refills
            stream.resume_at = now + (self.LONGEST_LINE - stream.tokens) / stream.rate
            self._epoll.modify(stream.fd, 0)  # still tells us of a hang-up

    def _drop_the_rest(self, stream: _Stream) -> None:
        dropped = 0
        with contextlib.suppress(OSError):
            while chunk := os.read(stream.fd, self.CHUNK):
                dropped += len(chunk)
        self._emit(stream, f"\n({dropped} more bytes of output dropped)\n".encode())
        self._close(stream)

    def _close(self, stream: _Stream) -> None:
        self._emit(stream, b"\n" if stream.partial else b"")
        self._epoll.unregister(stream.fd)
        del self._streams[stream.fd]
        os.close(stream.fd)
        stream.child.streams -= 1
        if not stream.child.streams:
            stream.child.done.set()

    def _emit(self, stream: _Stream, data: bytes) -> None:
        stream.partial += data
        *lines, rest = bytes(stream.partial).split(b"\n")
        if len(rest) > self.LONGEST_LINE:
            lines.append(rest)
            rest = b""
        stream.partial = bytearray(rest)
        if lines:
            out = b"".join(stream.prefix + line + b"\n" for line in lines)
            with contextlib.suppress(OSError):
                while out:
                    out = out[os.write(stream.target, out) :]


_pump: OutputPump | None = None
_lock = threading.Lock()


def pump() -> OutputPump:
    """The process's one pump, started on first use."""
    global _pump
    with _lock:
        if _pump is None:
            _pump = OutputPump()
        return _pump


def _forget() -> None:
    global _pump, _lock
    _pump, _lock = None, threading.Lock()  # a forked child has none of our threads


os.register_at_fork(after_in_child=_forget)
