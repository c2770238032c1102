"""A client of the management service's API (what `vmbus ctl` uses):
HTTP/1.1 over the unix socket, one connection per client, JSON both ways."""

from __future__ import annotations

import http.client
import json
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import quote

__all__ = ["ApiError", "Client", "default_socket"]

TIMEOUT = 120.0  # a start that waits for devices, a stop that waits for the guest


def default_socket() -> Path:
    """$VMBUS_SOCKET, or /run/vmbus/vmms.sock as root, else under
    $XDG_RUNTIME_DIR (or /tmp/vmbus-UID)."""
    if "VMBUS_SOCKET" in os.environ:
        return Path(os.environ["VMBUS_SOCKET"])
    if os.geteuid() == 0:
        return Path("/run/vmbus/vmms.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/vmbus-{os.geteuid()}"
    return Path(runtime) / "vmbus" / "vmms.sock"


class ApiError(RuntimeError):
    """The service refused a request: its HTTP status and reason."""

    def __init__(self, status: int, reason: str, kind: str = "") -> None:
        super().__init__(reason)
        self.status, self.reason, self.kind = status, reason, kind


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Client:
    def __init__(self, path: Path, timeout: float = TIMEOUT) -> None:
        self.path = path
        self._connection = _UnixConnection(path, timeout)

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """The decoded answer; ApiError for an error status, OSError if no
        service listens."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            self._connection.request(method, path, body=data, headers=headers)
            response = self._connection.getresponse()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            self._connection.close()  # the service closed an idle connection: once more
            self._connection.request(method, path, body=data, headers=headers)
            response = self._connection.getresponse()
        raw = response.read()
        try:
            answer = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            raise ApiError(response.status, f"not JSON: {raw[:200]!r}") from None
        if response.status >= 400:
            error = answer.get("error", {}) if isinstance(answer, dict) else {}
            raise ApiError(
                response.status, str(error.get("reason", raw)), str(error.get("type", ""))
            )
        return answer

    # The API, one call each.
    def list(self) -> Any:
        return self.request("GET", "/vms")["vms"]

    def create(self, definition: dict[str, Any]) -> Any:
        return self.request("POST", "/vms", definition)

    def delete(self, name: str) -> Any:
        return self.request("DELETE", f"/vms/{quote(name)}")

    def status(self, name: str) -> Any:
        return self.request("GET", f"/vms/{quote(name)}")

    def start(self, name: str, wait_devices: float = 0.0) -> Any:
        return self.request("POST", f"/vms/{quote(name)}/start", {"wait_devices": wait_devices})

    def stop(self, name: str, timeout: float = 5.0) -> Any:
        return self.request("POST", f"/vms/{quote(name)}/stop", {"timeout": timeout})

    def kill(self, name: str) -> Any:
        return self.request("POST", f"/vms/{quote(name)}/kill")

    def shutdown(self, name: str, reboot: bool = False, reason: str = "", wait: float = 0.0) -> Any:
        body = {"reboot": reboot, "reason": reason, "wait": wait}
        return self.request("POST", f"/vms/{quote(name)}/shutdown", body)

    def add_device(self, name: str, device: dict[str, Any]) -> Any:
        return self.request("POST", f"/vms/{quote(name)}/devices", device)

    def remove_device(self, name: str, device: str) -> Any:
        return self.request("DELETE", f"/vms/{quote(name)}/devices/{quote(device)}")

    def kvp(self, name: str, op: str, key: str = "", value: str = "", pool: int = 0) -> Any:
        path = f"/vms/{quote(name)}/kvp" + (f"/{quote(key, safe='')}" if key else "")
        method = {"list": "GET", "get": "GET", "set": "PUT", "delete": "DELETE"}[op]
        body = {"value": value} if op == "set" else None
        return self.request(method, f"{path}?pool={pool}", body)
