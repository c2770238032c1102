"""The RFB handshake of `vsp.video.vnc.VncServer`: versions 3.3, 3.7 and
3.8, security None or VNC Authentication (with the login backoff per
source and the client limit), and ClientInit / ServerInit.

A mixin: the server's state (password, backoff, limits, screen, name) is
the server's; this only keeps the handshake's steps in a file of their own.
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import re
import struct

from vsp.video import rfb
from vsp.video.access import LoginBackoff
from vsp.video.screen import Screen
from vsp.video.session import Drop, Session

__all__ = ["SEC_NONE", "SEC_VNC_AUTH", "Handshake"]

log = logging.getLogger("vsp.video.vnc")

SEC_NONE, SEC_VNC_AUTH = 1, 2
_VERSION_RE = re.compile(rb"RFB (\d{3})\.(\d{3})\n")
_U32 = struct.Struct(">I")


class Handshake:
    """The handshake steps; `VncServer` provides the attributes below."""

    password: str | None
    backoff: LoginBackoff
    max_clients: int
    name: bytes
    screen: Screen

    @property
    def admitted_count(self) -> int:
        raise NotImplementedError

    def _handshake(self, client: Session, buf: memoryview) -> int | None:
        """Handles one handshake message at the head of `buf`: its length, 0
        if incomplete, None past the handshake (a normal message)."""
        state = client.state
        if state == "version":
            if len(buf) < 12:
                return 0
            m = _VERSION_RE.fullmatch(bytes(buf[:12]))
            if m is None or int(m[1]) != 3:
                raise Drop("not an RFB 3.x client")
            minor = int(m[2])
            client.minor = 8 if minor >= 8 else 7 if minor == 7 else 3
            refusal = self._refusal(client)
            if refusal is not None:
                self._refuse(client, refusal)
                return 12
            sec = SEC_VNC_AUTH if self.password is not None else SEC_NONE
            if client.minor == 3:  # the server chooses
                client.send(_U32.pack(sec))
                self._start_security(client, sec)
            else:
                client.send(bytes([1, sec]))
                client.state = "security"
            return 12
        if state == "security":
            sec = SEC_VNC_AUTH if self.password is not None else SEC_NONE
            if buf[0] != sec:
                self._fail(client, "unsupported security type")
            else:
                self._start_security(client, sec)
            return 1
        if state == "auth":
            if len(buf) < 16:
                return 0
            assert self.password is not None
            if self.backoff.wait(client.source) > 0:  # a guess made in parallel: not checked
                self._fail(client, "too many authentication failures")
            elif not hmac.compare_digest(
                bytes(buf[:16]), rfb.vnc_auth_response(self.password, client.challenge)
            ):
                delay = self.backoff.failed(client.source)
                self._fail(client, "authentication failed")
                log.info("vnc: %s waits %.1f s before its next login", client.source, delay)
            elif self.admitted_count >= self.max_clients:
                self._fail(client, f"too many clients (at most {self.max_clients})")
            else:
                self.backoff.succeeded(client.source)
                client.send(_U32.pack(0))
                client.state = "init"
            return 16
        if state == "init":  # ClientInit: the shared flag; every session is shared
            gen, w, h = self.screen.geometry()
            client.generation, client.width, client.height = gen, w, h
            client.send(struct.pack(">HH", w, h) + client.encoder.fmt.pack())
            client.send(_U32.pack(len(self.name)) + self.name)
            client.state = "normal"
            return 1
        return None

    def _fail(self, client: Session, reason: str) -> None:
        """SecurityResult failed (with a reason from 3.8 on), then disconnect."""
        client.send(_U32.pack(1) + (_U32.pack(len(reason)) + reason.encode()) * (client.minor >= 8))
        client.closing = True
        log.info("vnc: %s: %s", client.source, reason)

    def _refuse(self, client: Session, reason: str) -> None:
        """No security types (3.3: security type 0) and the reason, then disconnect."""
        zero = _U32.pack(0) if client.minor == 3 else b"\0"
        client.send(zero + _U32.pack(len(reason)) + reason.encode())
        client.closing = True
        log.info("vnc: refusing %s: %s", client.source, reason)

    def _refusal(self, client: Session) -> str | None:
        """Why `client` may not log in now, if it may not."""
        if self.admitted_count >= self.max_clients:
            return f"too many clients (at most {self.max_clients})"
        wait = self.backoff.wait(client.source) if self.password is not None else 0.0
        if wait > 0:
            return f"too many authentication failures: retry in {math.ceil(wait)} s"
        return None

    def _start_security(self, client: Session, sec: int) -> None:
        if sec == SEC_VNC_AUTH:
            client.challenge = os.urandom(16)
            client.send(client.challenge)
            client.state = "auth"
        elif self.admitted_count >= self.max_clients:  # another got in meanwhile
            if client.minor >= 8:
                self._fail(client, f"too many clients (at most {self.max_clients})")
            else:  # 3.3 and 3.7 have no SecurityResult for None: no way to say why
                client.closing = True
        else:
            if client.minor >= 8:  # 3.3 and 3.7 send no SecurityResult for None
                client.send(_U32.pack(0))
            client.state = "init"
