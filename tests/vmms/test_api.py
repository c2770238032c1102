"""The API through its real socket: the VM's life, and every bad request a
clear JSON error with the status that fits."""

from __future__ import annotations

import json
import os
import socket
import stat

import pytest
from vmms_support import Service, define, requests_of, wait_for

from vmbus.vmms.client import ApiError


def test_a_vm_lives_through_the_api(service: Service) -> None:
    client = service.client
    define(client, "web")
    assert client.list() == [{"name": "web", "state": "defined"}]
    status = client.start("web", wait_devices=30)
    assert status["state"] == "running" and status["pid"] > 0
    assert status["bus"]["channels"] == status["bus"]["offered"] == 5  # disk and 4 services
    assert wait_for(lambda: requests_of(client, "web") > 100)
    assert wait_for(lambda: client.status("web").get("heartbeat") == "ok")
    stopped = client.stop("web")
    assert stopped["state"] == "stopped"
    started = client.start("web", wait_devices=30)
    assert started["starts"] == 2 and started["state"] == "running"
    client.kill("web")
    assert client.status("web")["state"] == "stopped"
    client.delete("web")
    assert client.list() == []


def test_the_guest_shuts_down_when_asked_and_kvp_goes_both_ways(service: Service) -> None:
    client = service.client
    define(client, "db")
    client.start("db", wait_devices=30)
    assert client.kvp("db", "set", "role", "primary") == {"ok": True, "status": 0}
    assert client.kvp("db", "get", "role")["value"] == "primary"
    assert ["role", "primary"] in client.kvp("db", "list")["items"]
    answer = client.shutdown("db", reason="maintenance", wait=30)
    assert answer["accepted"] and answer["state"] == "exited"
    assert client.status("db")["exitcode"] == 0


def test_the_socket_is_the_owners_only(service: Service) -> None:
    mode = os.stat(service.socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_definitions_outlive_the_service(service: Service, tmp_path: object) -> None:
    define(service.client, "kept")
    saved = json.loads((service.state_dir / "kept.json").read_text())
    assert saved["name"] == "kept" and saved["devices"][0]["kind"] == "ramdisk"


@pytest.mark.parametrize(
    ("call", "status", "reason"),
    [
        (lambda c: c.status("nobody"), 404, "no VM named 'nobody'"),
        (lambda c: c.start("nobody"), 404, "no VM named 'nobody'"),
        (lambda c: c.create({"name": "x", "memory_mb": 1}), 400, "memory_mb must be an integer in"),
        (lambda c: c.create({"name": "x", "colour": "red"}), 400, "unknown key 'colour'"),
        (lambda c: c.create({"name": "../etc"}), 400, "name must be 1-63 letters"),
        (
            lambda c: c.create({"name": "x", "devices": [{"kind": "floppy"}]}),
            400,
            "kind must be one of",
        ),
        (
            lambda c: c.create({"name": "x", "devices": [{"kind": "disk"}]}),
            400,
            "disk needs path",
        ),
        (lambda c: c.create({"name": "vm"}), 409, "a VM named 'vm' exists"),
        (lambda c: c.stop("vm"), 409, "vm is defined"),
        (lambda c: c.remove_device("vm", "tape"), 404, "vm has no device 'tape'"),
        (lambda c: c.add_device("vm", {"kind": "ramdisk", "size_mb": 0}), 400, "size_mb must"),
        (lambda c: c.shutdown("vm"), 409, "vm is defined"),
        (lambda c: c.request("GET", "/nowhere"), 404, "Not Found"),
        (lambda c: c.request("PATCH", "/vms"), 405, "Method Not Allowed"),
        (lambda c: c.request("POST", "/vms", [1, 2]), 400, "must be a JSON object"),
    ],
)
def test_a_bad_request_is_a_clear_error(
    service: Service, call: object, status: int, reason: str
) -> None:
    define(service.client, "vm")
    with pytest.raises(ApiError) as error:
        call(service.client)  # type: ignore[operator]
    assert error.value.status == status
    assert reason in error.value.reason


def test_a_body_that_is_not_json_is_a_clear_error(service: Service) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(service.socket))
        body = b"{not json"
        sock.sendall(
            b"POST /vms HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert "not JSON" in json.loads(payload)["error"]["reason"]


def test_a_disk_image_that_is_not_there_fails_the_start_with_the_reason(service: Service) -> None:
    client = service.client
    client.create({"name": "d", "devices": [{"kind": "disk", "path": "/nonexistent/d.img"}]})
    with pytest.raises(ApiError) as error:
        client.start("d")
    assert error.value.status == 400 and "No such file" in error.value.reason
    assert client.status("d")["state"] == "defined"
