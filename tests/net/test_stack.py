"""A real Linux network stack in a child: its NetAdapter handed to the
kernel as a TAP device in the child's own network namespace
(vsc.net.stack), the host side a TAP device in a namespace the test
creates; unmodified ping and iperf3 run between the two, both ways."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from vmbus import guid, sandbox
from vmbus.guest import Guest, GuestDevice
from vmbus.partition import Host, wait_until
from vsc.net import NetAdapter
from vsp.net import NetVsp, TapBackend

MAC = bytes.fromhex("02000000ac02")
HOST_IP, CHILD_IP = "10.210.0.1", "10.210.0.2"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: TAP devices and namespaces"),
    pytest.mark.skipif(
        shutil.which("bwrap") is None,
        reason="needs bubblewrap (apt-get install bubblewrap): the child's own network namespace",
    ),
    pytest.mark.skipif(
        shutil.which("ping") is None, reason="needs ping (apt-get install iputils-ping)"
    ),
]


def adapter(guest: Guest) -> NetAdapter:
    devices: list[GuestDevice] = []
    guest.register(guid.NETWORK, devices.append)
    return NetAdapter(devices[0])


def run(argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def stack_child(guest: Guest, workdir: str, iperf: bool) -> None:
    """Ping the host and run iperf3 against it, both ways; then wait for
    the host's ping before leaving."""
    from vsc.net.stack import LinuxStack

    work = Path(workdir)
    with LinuxStack(adapter(guest), address=f"{CHILD_IP}/24") as stack:
        result: dict[str, object] = {}
        ping = run(["ping", "-c", "3", "-W", "5", HOST_IP])
        result["ping"] = (ping.returncode, ping.stdout[-300:] + ping.stderr[-300:])
        if iperf:
            for name, extra in (("to_host", []), ("from_host", ["-R"])):
                test = run(["iperf3", "-c", HOST_IP, "-t", "1", "-J", *extra])
                result[name] = json.loads(test.stdout) if test.stdout else test.stderr
        (work / "child.json").write_text(json.dumps(result))
        deadline = time.monotonic() + 60
        while not (work / "done").exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # the host pings us meanwhile
        (work / "stack.json").write_text(json.dumps({**stack.stats(), "error": repr(stack.error)}))


@pytest.mark.parametrize("offloads", [False, True], ids=["plain", "offloads"])
def test_ping_and_iperf3_between_the_childs_stack_and_the_host(
    tmp_path: Path, offloads: bool
) -> None:
    """With offloads (the host's TAP has IFF_VNET_HDR), the child's TAP
    takes checksum offload and TSO, and TCP crosses as large sends."""
    iperf = shutil.which("iperf3") is not None  # without it, ping only (and say so below)
    namespace = f"vmbus-stack-{os.getpid()}"
    backend = TapBackend(
        netns=namespace, address=f"{HOST_IP}/24", create_netns=True, vnet_hdr=offloads
    )
    server = None
    try:
        if iperf:
            server = subprocess.Popen(
                ["ip", "netns", "exec", namespace, "iperf3", "-s", "-B", HOST_IP],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        policy = sandbox.Policy(net_admin=True, writable=(str(tmp_path),))
        with Host() as host:
            child = host.start(
                stack_child,
                devices=[NetVsp(backend, mac=MAC)],
                args=(str(tmp_path), iperf),
                policy=policy,
            )
            assert wait_until(
                lambda: (
                    (tmp_path / "child.json").exists() or child.state not in ("starting", "running")
                ),
                60,
            )
            back = run(["ip", "netns", "exec", namespace, "ping", "-c", "3", "-W", "5", CHILD_IP])
            (tmp_path / "done").write_text("1")
            assert child.wait(timeout=30) == 0
        result = json.loads((tmp_path / "child.json").read_text())
        assert result["ping"][0] == 0, result["ping"]
        assert back.returncode == 0, back.stdout + back.stderr
        stats = json.loads((tmp_path / "stack.json").read_text())
        assert stats["error"] == "None" and stats["frames_to_kernel"] > 0
        if iperf:
            for name in ("to_host", "from_host"):
                assert isinstance(result[name], dict), result[name]
                assert result[name]["end"]["sum_received"]["bytes"] > 0
            assert (stats["large_sends"] > 0) == offloads and (stats["offload"] >= 0) == offloads
            # iperf3 -R: the host's TCP segments coalesced (RSC) into frames above the MTU
            assert (stats["coalesced"] > 0) == offloads
    finally:
        if server is not None:
            server.kill()
            server.wait()
        backend.close()
    if not iperf:
        pytest.skip("iperf3 is missing (apt-get install iperf3): ping was tested, iperf3 not")
