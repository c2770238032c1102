"""Echo's wire format: a packet that asks for a completion is completed with
the same payload; any other packet comes back as an in-band packet with the
same transaction id. The payload is opaque."""

from __future__ import annotations

import uuid

ECHO_CLASS_ID = uuid.UUID("6c0ac8a2-7e1d-4d8e-9b0a-2f3f8e0c0e10")
ECHO_MAX_PAYLOAD = 4096  # bytes; a larger request is dropped and counted
