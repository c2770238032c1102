"""The host side of one IC channel, sans-I/O: the host initiates.

`IcServer` first sends the version negotiation (`negotiate`), then, once
the guest has chosen, one request at a time (`request`); `receive` takes
the guest's answer. One request is outstanding at most: the host of the
sources has one KVP transaction in flight, and the others are one message
each. A request the guest leaves unanswered is given up with `expire` (the
device's timeout); its answer, if it comes later, is `late`, not an error.

Anything else a guest sends (an answer nobody asked for, a wrong
transaction id, broken framing, a version we never offered) raises
IcProtocolError: the device counts it and fails the channel.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from enum import Enum

from vmbus.errors import PeerError, UsageError
from vmbus.protocols.ic.wire import (
    FRAMEWORK_VERSIONS,
    REQUEST_FLAGS,
    Buffer,
    IcFlags,
    IcHeader,
    MessageType,
    Version,
    decode_message,
    decode_negotiate,
    encode_message,
    encode_negotiate,
)
from vmbus.wire import WireError

__all__ = ["IcAnswer", "IcProtocolError", "IcServer", "IcState"]


class IcProtocolError(PeerError, ValueError):
    """The guest answered something an IC host cannot take."""


class IcState(Enum):
    NEGOTIATING = "negotiating"
    READY = "ready"
    UNSUPPORTED = "the guest speaks none of our versions"


@dataclass(frozen=True)
class Pending:
    trans_id: int  # the VMBus transaction id
    ic_id: int  # icmsg_hdr.ictransaction_id
    msgtype: int


@dataclass(frozen=True)
class IcAnswer:
    """The guest's answer to the outstanding request: its status and the
    body it wrote back (the request's full length)."""

    msgtype: int
    status: int
    body: bytes


class IcServer:
    """The host side of one IC service (heartbeat, shutdown, time sync, KVP)."""

    def __init__(
        self,
        msgtype: MessageType,
        message_versions: tuple[Version, ...],
        framework_versions: tuple[Version, ...] = FRAMEWORK_VERSIONS,
    ) -> None:
        if not message_versions or not framework_versions:
            raise UsageError("an IC offers at least one version of each kind")
        self.msgtype = msgtype
        self.message_versions = message_versions
        self.framework_versions = framework_versions
        self.state = IcState.NEGOTIATING
        self.framework: Version | None = None
        self.message: Version | None = None
        self.pending: Pending | None = None
        self.expired: Pending | None = None  # the last request given up
        self.late = 0  # answers that came after their request was given up
        self._ids = itertools.count(1)

    @property
    def ready(self) -> bool:
        return self.state == IcState.READY

    def _send(self, header: IcHeader, body: bytes) -> tuple[int, bytes]:
        if self.pending is not None:
            raise UsageError("an IC has one request outstanding at most")
        trans_id = next(self._ids)
        ic_id = trans_id & 0xFF
        header = IcHeader(
            header.framework_major,
            header.framework_minor,
            header.msgtype,
            header.message_major,
            header.message_minor,
            len(body),
            0,
            ic_id,
            REQUEST_FLAGS,
        )
        self.pending = Pending(trans_id, ic_id, header.msgtype)
        return trans_id, encode_message(header, body)

    def negotiate(self) -> tuple[int, bytes]:
        """The version negotiation (the first message): (trans_id, payload).
        Sent again, it starts over (a guest that reopened the channel)."""
        self.state, self.framework, self.message = IcState.NEGOTIATING, None, None
        header = IcHeader(0, 0, MessageType.NEGOTIATE, 0, 0, 0)
        return self._send(header, encode_negotiate(self.framework_versions, self.message_versions))

    def request(self, body: bytes) -> tuple[int, bytes]:
        """A request of this service, in the negotiated versions."""
        if self.framework is None or self.message is None or not self.ready:
            raise UsageError(f"the {self.msgtype.name} service is {self.state.value}")
        header = IcHeader(*self.framework, self.msgtype, *self.message, 0)
        return self._send(header, body)

    def expire(self) -> Pending | None:
        """Give up the outstanding request (it timed out); it, if any."""
        pending, self.pending = self.pending, None
        if pending is not None:
            self.expired = pending
        return pending

    def receive(self, payload: Buffer, trans_id: int) -> IcAnswer | None:
        """The guest's answer: an IcAnswer, or None for a late one (counted
        in `late`) or for the negotiation (see `state`). IcProtocolError for
        anything else."""
        pending = self.pending
        if pending is None or trans_id != pending.trans_id:
            expired = self.expired
            if expired is not None and trans_id == expired.trans_id:
                self.expired = None
                self.late += 1
                return None
            raise IcProtocolError(f"an answer to transaction {trans_id}, which was not asked")
        self.pending = None  # answered, well or badly: the next request may go
        try:
            header, body = decode_message(payload)
        except WireError as error:
            raise IcProtocolError(str(error)) from None
        flags = IcFlags(header.flags & 0x7)
        if IcFlags.RESPONSE not in flags or IcFlags.REQUEST in flags:
            raise IcProtocolError(f"icflags {header.flags:#x} in an answer")
        if header.transaction_id != pending.ic_id or header.msgtype != pending.msgtype:
            raise IcProtocolError(
                f"answer of type {header.msgtype} id {header.transaction_id}, "
                f"asked type {pending.msgtype} id {pending.ic_id}"
            )
        if header.msgtype == MessageType.NEGOTIATE:
            self._negotiated(body)
            return None
        return IcAnswer(header.msgtype, header.status, body)

    def _negotiated(self, body: bytes) -> None:
        """What the guest chose: one version of each, both among those we
        offered; none (counts 0) means it speaks none of them."""
        try:
            frameworks, messages = decode_negotiate(body)
        except WireError as error:
            raise IcProtocolError(f"negotiation answer: {error}") from None
        if not frameworks and not messages:
            self.state = IcState.UNSUPPORTED
            return
        if len(frameworks) != 1 or len(messages) != 1:
            raise IcProtocolError(
                f"negotiation answer with {len(frameworks)} + {len(messages)} versions, not 1 + 1"
            )
        framework, message = frameworks[0], messages[0]
        if framework not in self.framework_versions or message not in self.message_versions:
            raise IcProtocolError(f"the guest chose {framework} / {message}: never offered")
        self.framework, self.message, self.state = framework, message, IcState.READY
