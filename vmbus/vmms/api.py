"""The management service's REST API: JSON over HTTP on a unix socket,
owner-only (Firecracker's and Cloud Hypervisor's API sockets are the
models), served by aiohttp. `vmbus serve` runs it; `vmbus ctl` talks to it.

    GET    /vms                      the VMs and their states
    POST   /vms                      create one (body: its definition)
    GET    /vms/NAME                 status, with per-device counters
    DELETE /vms/NAME                 forget a VM that is not running
    POST   /vms/NAME/start           {"wait_devices": seconds}
    POST   /vms/NAME/stop            {"timeout": seconds}
    POST   /vms/NAME/kill
    POST   /vms/NAME/shutdown        {"reboot": false, "reason": "", "wait": seconds}
    POST   /vms/NAME/devices         hot add (body: the device)
    DELETE /vms/NAME/devices/DEV     hot remove
    GET    /vms/NAME/kvp             the guest's pairs (?pool=N)
    GET|PUT|DELETE /vms/NAME/kvp/KEY a pair (PUT body: {"value": ...})

Errors are {"error": {"reason": ..., "type": ...}} with the HTTP status
that fits: 400 a bad request, 404 no such VM or device, 409 the VM's state
forbids it, 504 the guest or worker did not answer in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import socket
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiohttp import web

from vmbus.child_partition import ControlError, WorkerFailed
from vmbus.errors import UsageError
from vmbus.vmms.service import Conflict, NotFound, Vmms

__all__ = ["make_app", "serve"]

log = logging.getLogger(__name__)

API_THREADS = 8  # blocking calls at once (starts, stops, status); others queue
BODY_MAX = 1 << 20
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _status_of(error: BaseException) -> int:
    if isinstance(error, NotFound):
        return 404
    if isinstance(error, Conflict):
        return 409
    if isinstance(error, TimeoutError):
        return 504
    if isinstance(error, WorkerFailed):
        return 502
    if isinstance(error, UsageError | ControlError | ValueError | OSError):
        return 400
    return 500


def _error(status: int, reason: str, kind: str) -> web.Response:
    return web.json_response({"error": {"reason": reason, "type": kind}}, status=status)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure as JSON with a reason: ours, and aiohttp's own (an
    unknown path, a wrong method, a body too large)."""
    try:
        return await handler(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return _error(error.status, error.reason, type(error).__name__)
    except Exception as error:
        status = _status_of(error)
        if status == 500:
            log.exception("vmms: %s %s failed", request.method, request.path)
        if isinstance(error, OSError) and error.strerror:
            reason = f"{error.strerror}: {error.filename}" if error.filename else error.strerror
        else:
            reason = str(error) or type(error).__name__
        return _error(status, reason, type(error).__name__)


class Api:
    def __init__(self, vmms: Vmms, pool: ThreadPoolExecutor) -> None:
        self.vmms, self.pool = vmms, pool

    async def call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, functools.partial(function, *args, **kwargs))

    async def body(self, request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        try:
            data = await request.json()
        except json.JSONDecodeError as error:
            raise UsageError(f"the body is not JSON: {error}") from None
        if not isinstance(data, dict):
            raise UsageError("the body must be a JSON object")
        return data

    def routes(self) -> list[web.RouteDef]:
        vm = "/vms/{name}"
        return [
            web.get("/", self.index),
            web.get("/vms", self.list),
            web.post("/vms", self.create),
            web.get(vm, self.status),
            web.delete(vm, self.delete),
            web.post(vm + "/start", self.start),
            web.post(vm + "/stop", self.stop),
            web.post(vm + "/kill", self.kill),
            web.post(vm + "/shutdown", self.shutdown),
            web.post(vm + "/devices", self.add_device),
            web.delete(vm + "/devices/{device}", self.remove_device),
            web.get(vm + "/kvp", self.kvp_list),
            web.get(vm + "/kvp/{key}", self.kvp_get),
            web.put(vm + "/kvp/{key}", self.kvp_set),
            web.delete(vm + "/kvp/{key}", self.kvp_delete),
        ]

    async def index(self, request: web.Request) -> web.Response:
        return web.json_response({"service": "vmbus vmms", "vms": len(self.vmms.vms)})

    async def list(self, request: web.Request) -> web.Response:
        return web.json_response({"vms": await self.call(self.vmms.names)})

    async def create(self, request: web.Request) -> web.Response:
        created = await self.call(self.vmms.create, await self.body(request))
        return web.json_response(created, status=201)

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(await self.call(self.vmms.status, request.match_info["name"]))

    async def delete(self, request: web.Request) -> web.Response:
        await self.call(self.vmms.delete, request.match_info["name"])
        return web.json_response({"deleted": request.match_info["name"]})

    async def start(self, request: web.Request) -> web.Response:
        wait = _seconds(await self.body(request), "wait_devices", 0.0)
        status = await self.call(self.vmms.start, request.match_info["name"], wait)
        return web.json_response(status)

    async def stop(self, request: web.Request) -> web.Response:
        timeout = _seconds(await self.body(request), "timeout", 5.0)
        return web.json_response(
            await self.call(self.vmms.stop, request.match_info["name"], timeout)
        )

    async def kill(self, request: web.Request) -> web.Response:
        return web.json_response(await self.call(self.vmms.kill, request.match_info["name"]))

    async def shutdown(self, request: web.Request) -> web.Response:
        body = await self.body(request)
        reboot, reason = body.get("reboot", False), body.get("reason", "")
        if not isinstance(reboot, bool) or not isinstance(reason, str):
            raise UsageError("'reboot' is true or false and 'reason' a string")
        answer = await self.call(
            self.vmms.shutdown,
            request.match_info["name"],
            reboot,
            reason,
            _seconds(body, "wait", 0.0),
        )
        return web.json_response(answer)

    async def add_device(self, request: web.Request) -> web.Response:
        body = await self.body(request)
        added = await self.call(self.vmms.add_device, request.match_info["name"], body)
        return web.json_response(added, status=201)

    async def remove_device(self, request: web.Request) -> web.Response:
        name, device = request.match_info["name"], request.match_info["device"]
        await self.call(self.vmms.remove_device, name, device)
        return web.json_response({"removed": device})

    async def _kvp(self, request: web.Request, op: str, **fields: Any) -> web.Response:
        try:
            pool = int(request.query.get("pool", "0"))
        except ValueError:
            raise UsageError(f"pool must be a number, not {request.query['pool']!r}") from None
        message = {"op": op, "pool": pool, **fields}
        if "key" in request.match_info:
            message["key"] = request.match_info["key"]
        answer = await self.call(self.vmms.ask, request.match_info["name"], "kvp", message)
        return web.json_response(answer)

    async def kvp_list(self, request: web.Request) -> web.Response:
        return await self._kvp(request, "enumerate")

    async def kvp_get(self, request: web.Request) -> web.Response:
        return await self._kvp(request, "get")

    async def kvp_set(self, request: web.Request) -> web.Response:
        value = (await self.body(request)).get("value")
        if not isinstance(value, str):
            raise UsageError('the body must be {"value": "..."}')
        return await self._kvp(request, "set", value=value)

    async def kvp_delete(self, request: web.Request) -> web.Response:
        return await self._kvp(request, "delete")


def _seconds(body: dict[str, Any], key: str, default: float) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 600:
        raise UsageError(f"{key!r} must be a number of seconds in [0, 600], not {value!r}")
    return float(value)


def make_app(vmms: Vmms, pool: ThreadPoolExecutor) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=BODY_MAX)
    app.add_routes(Api(vmms, pool).routes())
    return app


def bind(path: Path) -> socket.socket:
    """The API socket at `path`, owner-only (mode 0600 from its creation,
    in a directory only we can enter if we made it). A live service there
    already is an error; a stale socket file is replaced."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # nobody answers: a service that died left it
        else:
            raise UsageError(f"a service is already listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # no window in which others may connect
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(128)
    return sock


async def _serve(vmms: Vmms, sock: socket.socket, ready: Callable[[], None]) -> None:
    pool = ThreadPoolExecutor(API_THREADS, thread_name_prefix="vmms-api")
    # Every thread of the pool starts now, so the service's thread count is
    # fixed from the start, not grown by a request that came in a busy moment.
    started = threading.Barrier(API_THREADS + 1)
    for _ in range(API_THREADS):
        pool.submit(started.wait)
    started.wait()
    runner = web.AppRunner(make_app(vmms, pool), access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signo in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signo, stopping.set)
    ready()
    try:
        await stopping.wait()
    finally:
        await runner.cleanup()
        await loop.run_in_executor(pool, vmms.close)
        pool.shutdown()


def serve(
    path: Path, state_dir: Path | None = None, ready: Callable[[], None] = lambda: None
) -> None:
    """Run the service until SIGTERM or SIGINT; then stop every VM."""
    sock = bind(path)
    vmms = Vmms(state_dir)
    try:
        asyncio.run(_serve(vmms, sock, ready))
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
