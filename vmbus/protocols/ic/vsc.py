"""The guest side of one IC channel, sans-I/O, as Linux's hv_utils answers.

`IcClient.receive` takes one host message: a negotiation is answered at
once (`vmbus_prep_negotiate_resp`: the first of our versions, newest first,
that the host offers, or counts of 0 when there is none); a service
request comes back as an `IcRequest` for the driver, whose `answer` writes
the reply in place: the request's bytes and length, TRANSACTION |
RESPONSE, the status, and the body the driver changed. A message the
guest cannot use raises IcClientError (a PeerError); Linux drops those.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmbus.errors import PeerError
from vmbus.protocols.ic.wire import (
    FRAMEWORK_VERSIONS,
    ICMSG_HDR,
    NEGOTIATE_RESPONSE_SIZE,
    PIPE_HEADER_SIZE,
    RESPONSE_FLAGS,
    Buffer,
    IcHeader,
    IcVersion,
    MessageType,
    NegotiateHeader,
    Status,
    Version,
    choose_version,
    decode_message,
    decode_negotiate,
)
from vmbus.wire import WireError

__all__ = ["IcClient", "IcClientError", "IcRequest"]


class IcClientError(PeerError, ValueError):
    """The host sent something an IC guest cannot use."""


@dataclass(frozen=True)
class IcRequest:
    """A service request of the host: its header, its body and the raw
    message the answer is written over."""

    header: IcHeader
    body: bytes
    raw: bytes

    def answer(self, status: int = Status.S_OK, body: Buffer | None = None) -> bytes:
        """The reply: this message with RESPONSE flags, `status`, and `body`
        (written at the body's start, the rest kept) if given."""
        reply = bytearray(self.raw)
        if body is not None:
            data = bytes(body)
            if len(data) > len(reply) - ICMSG_HDR:
                raise IcClientError(f"an answer of {len(data)} bytes past the request's end")
            reply[ICMSG_HDR : ICMSG_HDR + len(data)] = data
        _rewrite_header(reply, status=status)
        return bytes(reply)


def _rewrite_header(reply: bytearray, *, status: int, msgsize: int | None = None) -> None:
    old = IcHeader.unpack_from(reply, PIPE_HEADER_SIZE)
    new = IcHeader(
        old.framework_major,
        old.framework_minor,
        old.msgtype,
        old.message_major,
        old.message_minor,
        old.msgsize if msgsize is None else msgsize,
        status,
        old.transaction_id,
        RESPONSE_FLAGS,
        old.reserved,
    )
    new.pack_into(reply, PIPE_HEADER_SIZE)


class IcClient:
    """The guest side of one IC service: the versions it speaks (newest
    first) and, after the negotiation, the ones chosen."""

    def __init__(
        self,
        msgtype: MessageType,
        message_versions: tuple[Version, ...],
        framework_versions: tuple[Version, ...] = FRAMEWORK_VERSIONS,
        receive_limit: int = 1 << 16,
    ) -> None:
        self.msgtype = msgtype
        self.message_versions = message_versions
        self.framework_versions = framework_versions
        self.receive_limit = receive_limit  # Linux's receive buffer of this service
        self.framework: Version | None = None
        self.message: Version | None = None
        self.negotiations = 0

    def receive(self, payload: Buffer) -> tuple[bytes | None, IcRequest | None]:
        """(an answer to send now, a request for the driver); one is None."""
        raw = bytes(payload)  # one private copy: the host cannot change it under us
        if len(raw) > self.receive_limit:
            raise IcClientError(f"a {len(raw)}-byte message, limit {self.receive_limit}")
        try:
            header, body = decode_message(raw)
        except WireError as error:
            raise IcClientError(str(error)) from None
        if header.msgtype == MessageType.NEGOTIATE:
            return self._negotiate(raw, body), None
        if header.msgtype != self.msgtype:
            raise IcClientError(f"message type {header.msgtype} on the {self.msgtype.name} channel")
        return None, IcRequest(header, body, raw)

    def _negotiate(self, raw: bytes, body: bytes) -> bytes:
        try:
            frameworks, messages = decode_negotiate(body)
        except WireError as error:
            raise IcClientError(f"negotiation: {error}") from None
        if len(body) < NEGOTIATE_RESPONSE_SIZE:  # no room for the two chosen versions
            raise IcClientError(f"negotiation body of {len(body)} bytes")
        framework = choose_version(frameworks, self.framework_versions)
        message = choose_version(messages, self.message_versions)
        self.negotiations += 1
        chosen = framework is not None and message is not None
        self.framework, self.message = (framework, message) if chosen else (None, None)
        reply = bytearray(raw)
        counts = NegotiateHeader(1, 1) if chosen else NegotiateHeader(0, 0)
        counts.pack_into(reply, ICMSG_HDR)
        at = ICMSG_HDR + NegotiateHeader.SIZE
        for version in (framework, message) if chosen else ():
            assert version is not None
            IcVersion(*version).pack_into(reply, at)
            at += IcVersion.SIZE
        _rewrite_header(reply, status=Status.S_OK, msgsize=NEGOTIATE_RESPONSE_SIZE)
        return bytes(reply)
