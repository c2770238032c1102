"""Transitional: the names synthvid imports from here until it imports them
from `vmbus.protocols.input` (the front door). Delete with that change."""

from vmbus.protocols.input.wire import PIPE_HEADER_SIZE, PIPE_MESSAGE_DATA, Buffer, PipeHeader

__all__ = ["PIPE_HEADER_SIZE", "PIPE_MESSAGE_DATA", "Buffer", "PipeHeader"]
