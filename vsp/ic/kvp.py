"""The KVP exchange VSP: the parent reads and writes the guest's key/value
pools through `control` (GET, SET, DELETE, and ENUMERATE, which walks a
pool index by index until the guest answers that there is no more)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from vmbus.errors import UsageError
from vmbus.protocols.ic import KVP_VERSIONS, IcAnswer, IcProtocolError, MessageType, Status
from vmbus.protocols.ic.wire import (
    KVP_MAX_KEY_SIZE,
    KVP_MAX_VALUE_SIZE,
    KVP_POOLS,
    KvpHeader,
    KvpOp,
    decode_utf16,
    encode_kvp_body,
    encode_utf16,
    kvp_value_at,
    kvp_value_text,
)
from vsp.ic.device import DEFAULT_TIMEOUT, IcHandler, IcVsp

__all__ = ["MAX_ENUMERATE", "KvpVsp"]

MAX_ENUMERATE = 1024  # items one enumerate collects: a guest cannot keep it going forever
Reply = Callable[[dict[str, Any]], None]
OPS = {"get": KvpOp.GET, "set": KvpOp.SET, "delete": KvpOp.DELETE, "enumerate": KvpOp.ENUMERATE}


class KvpVsp(IcVsp):
    """The KVP exchange (docs/protocol.md §11.7)."""

    msgtype = MessageType.KVP_EXCHANGE
    versions = KVP_VERSIONS
    name = "KVP"

    def __init__(self, instance_id: uuid.UUID | None = None, *, timeout: float = DEFAULT_TIMEOUT):
        super().__init__(instance_id, timeout=timeout)
        self.operations = dict.fromkeys(OPS, 0)

    def control(self, request: dict[str, Any], reply: Reply) -> None:
        """{"op": "get"|"set"|"delete"|"enumerate", "pool": 0..4, "key": str,
        "value": str} -> get {"value": str | None, "status": int}; set and
        delete {"ok": bool, "status": int}; enumerate {"items": [[k, v], ...]}."""
        op_name = request.get("op")
        if op_name not in OPS:
            raise UsageError(f"a KVP op is one of {sorted(OPS)}, not {op_name!r}")
        op = OPS[op_name]
        pool = request.get("pool", 0)
        if not isinstance(pool, int) or isinstance(pool, bool) or not 0 <= pool < KVP_POOLS:
            raise UsageError(f"a KVP pool is 0..{KVP_POOLS - 1}, not {pool!r}")
        key, value = request.get("key", ""), request.get("value", "")
        if not isinstance(key, str) or not isinstance(value, str):
            raise UsageError("a KVP key and value are strings")
        if op != KvpOp.ENUMERATE:
            if not key:
                raise UsageError(f"KVP {op_name} needs a key")
            encode_utf16(key, KVP_MAX_KEY_SIZE, "key")  # UsageError: too long, or a NUL
        if op == KvpOp.SET:
            encode_utf16(value, KVP_MAX_VALUE_SIZE, "value")
        handler = self.ready_handler()
        self.operations[op_name] += 1
        if op == KvpOp.ENUMERATE:
            self._enumerate(handler, pool, 0, [], reply)
            return
        body = encode_kvp_body(op, pool, key, value)
        handler.ask(body, lambda answer, error: self._answered(op, pool, answer, error, reply))

    def _answered(
        self, op: int, pool: int, answer: IcAnswer | None, error: str | None, reply: Reply
    ) -> None:
        if answer is None:
            reply({"error": error})
            return
        _check_header(answer, op, pool)
        if op != KvpOp.GET:
            reply({"ok": answer.status == Status.S_OK, "status": answer.status})
            return
        text = kvp_value_text(kvp_value_at(answer.body, op)) if answer.status == 0 else None
        reply({"value": text, "status": answer.status})

    def _enumerate(
        self, handler: IcHandler, pool: int, index: int, items: list[list[str]], reply: Reply
    ) -> None:
        def done(answer: IcAnswer | None, error: str | None) -> None:
            if answer is None:
                reply({"error": error})  # only the reason: the caller gets a ControlError
                return
            _check_header(answer, KvpOp.ENUMERATE, pool)
            if answer.status != Status.S_OK:  # HV_S_CONT: past the pool's end
                reply({"items": items})
                return
            data = kvp_value_at(answer.body, KvpOp.ENUMERATE)
            items.append([decode_utf16(data.key, data.key_size, "key"), kvp_value_text(data)])
            if len(items) >= MAX_ENUMERATE or handler.closed:
                reply({"items": items, "truncated": len(items) >= MAX_ENUMERATE})
                return
            self._enumerate(handler, pool, index + 1, items, reply)

        handler.ask(encode_kvp_body(KvpOp.ENUMERATE, pool, index=index), done)

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "operations": dict(self.operations)}


def _check_header(answer: IcAnswer, op: int, pool: int) -> None:
    """A guest answers in place: the operation and pool it was asked."""
    header = KvpHeader.unpack_from(answer.body)
    if (header.operation, header.pool) != (op, pool):
        raise IcProtocolError(
            f"KVP answer for op {header.operation} pool {header.pool}, asked {op} {pool}"
        )
