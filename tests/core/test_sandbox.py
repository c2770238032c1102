"""The sandbox, tried from inside real child processes the way a hostile
guest would: each child program attempts the attack and fails (exit code
1, with its traceback on our stderr) if the attack works."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from vmbus import _output, sandbox
from vmbus._child import EXIT_PARENT_GONE, PARENT_GONE
from vmbus.guest import Guest, GuestError
from vmbus.memory import GuestMemory
from vmbus.partition import ChildPartition, Host, wait_until
from vmbus.protocols.echo import ECHO_CLASS_ID
from vmbus.transport import LocalPort, SocketPort
from vsc.echo import EchoVsc
from vsp.echo import EchoVsp

PR_GET_DUMPABLE = 3
PTRACE_TRACEME = 0
CLONE_NEWUSER = 0x10000000
PARENT_USERNS = os.readlink("/proc/self/ns/user")


# What bwrap alone gives (namespaces): a child without it confines itself
# with no PID or mount namespace of its own.
needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None,
    reason="needs bubblewrap (apt-get install bubblewrap): PID and mount namespaces",
)


def linger(guest: Guest) -> None:
    time.sleep(600)


def running(child: ChildPartition) -> bool:
    return wait_until(lambda: child.state == "running", 30)


def start(host: Host, *args: Any, **kwargs: Any) -> ChildPartition:
    """A child spawned by a worker thread of this process: the sandbox is the
    same whoever spawns, and here the test reaches the child's process
    object and the sandbox's log. (Worker processes: test_hostile_child.)"""
    return host.start(*args, worker="thread", **kwargs)


def confined(child: ChildPartition) -> sandbox.ConfinedProcess:
    assert isinstance(child.process, sandbox.ConfinedProcess)
    return child.process


def memfd_number(pid: int, name: str) -> int:
    """The descriptor of a process that holds the memfd called `name`."""
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        if f"memfd:{name}" in os.readlink(f"{fd_dir}/{fd}"):
            return int(fd)
    raise LookupError(f"{pid} holds no memfd {name}")


def refused(path: str) -> bool:
    try:
        with open(path, "rb") as file:
            file.read(1)
    except OSError:
        return True
    return False


# --- a sibling's memory, the parent ------------------------------------------


def try_to_reach_a_sibling(
    guest: Guest, sibling: int, sibling_fd: int, parent: int, parent_fd: int, marker: str
) -> None:
    """Child: every way to a sibling's guest memory it can name."""
    paths = [
        f"/proc/{sibling}/mem",
        f"/proc/{sibling}/fd/{sibling_fd}",
        f"/proc/{sibling}/map_files",
        f"/proc/{parent}/mem",
        f"/proc/{parent}/fd/{parent_fd}",
        f"/dev/shm/{marker}",
    ]
    opened = [path for path in paths if not refused(path)]
    assert not opened, f"opened {opened}"
    assert marker not in os.listdir("/dev/shm")


@pytest.mark.requires_root
@needs_bwrap
def test_child_cannot_open_a_siblings_memory() -> None:
    marker = Path(f"/dev/shm/vmbus-test-{os.getpid()}")
    marker.write_bytes(b"the parent's")
    try:
        with Host() as host:
            sibling = start(host, linger, devices=[EchoVsp()])
            assert running(sibling)
            sibling_fd = memfd_number(sibling.pid, f"vmbus-{sibling.name}")
            attacker = start(
                host,
                try_to_reach_a_sibling,
                args=(sibling.pid, sibling_fd, os.getpid(), sibling.memory.fileno(), marker.name),
            )
            assert attacker.wait(60) == 0
            assert sandbox.PID_NAMESPACE in confined(attacker).confinement
            assert sandbox.MOUNT_NAMESPACE in confined(attacker).confinement
            assert sibling.state == "running"  # and the sibling never noticed
    finally:
        marker.unlink()


def try_to_signal_the_parent(guest: Guest, parent: int) -> None:
    """Child: signal 0 probes exactly the permission a real signal needs."""
    with pytest.raises((ProcessLookupError, PermissionError)):
        os.kill(parent, 0)
    with pytest.raises((ProcessLookupError, PermissionError)):
        os.kill(-1, 0)  # every process it may signal but itself
    if os.getpid() == 1:  # a PID namespace of its own: the parent is not even there
        assert not os.path.exists(f"/proc/{parent}")


@pytest.mark.requires_root
@needs_bwrap
def test_child_cannot_signal_the_parent() -> None:
    with Host() as host:
        child = start(host, try_to_signal_the_parent, args=(os.getpid(),))
        assert child.wait(60) == 0
        assert sandbox.PID_NAMESPACE in confined(child).confinement


# --- the parent dies, the port hangs up -----------------------------------------


def open_echo(guest: Guest) -> EchoVsc:
    drivers: list[EchoVsc] = []
    guest.register(ECHO_CLASS_ID, lambda device: drivers.append(EchoVsc(device)))
    drivers[0].open()
    return drivers[0]


def linger_listening(guest: Guest) -> None:
    open_echo(guest)  # tells the parent we are ready
    time.sleep(600)


def linger_deaf(guest: Guest) -> None:
    """Child: stops listening for its port's hang-up (the watcher waits on
    an event that will never be set), so only the parent-death signal ends it."""
    guest.host_gone = threading.Event()
    open_echo(guest)
    time.sleep(600)


def serve_a_lingering_child(target: str) -> None:
    """An intermediate parent for the test below: prints its child's pid
    once the child's program runs."""
    with Host() as host:
        vsp = EchoVsp()
        program = {"listening": linger_listening, "deaf": linger_deaf}[target]
        child = start(host, program, devices=[vsp])
        assert wait_until(lambda: bool(vsp.handlers), 60)
        print(child.pid, flush=True)
        child.wait()


@pytest.mark.parametrize("target", ["listening", "deaf"])
def test_child_dies_with_its_parent(target: str) -> None:
    parent = subprocess.Popen(
        [sys.executable, __file__, "serve", target], stdout=subprocess.PIPE, start_new_session=True
    )
    pidfd = -1
    try:
        assert parent.stdout is not None
        ready = select.select([parent.stdout], [], [], 60)[0]
        assert ready, "the intermediate parent did not start its child"
        child = int(parent.stdout.readline())
        pidfd = os.pidfd_open(child)
        parent.kill()  # SIGKILL: no cleanup of its own
        parent.wait(10)
        # A pidfd is readable once its process is gone.
        assert select.select([pidfd], [], [], 10)[0], f"child {child} outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)  # if it did outlive it
            os.close(pidfd)


def test_child_started_from_a_thread_that_ends_outlives_that_thread() -> None:
    """The parent-death signal follows the thread that forked: children
    are forked by a lasting thread, not by a caller's passing one."""
    with Host() as host:
        vsp = EchoVsp()
        started: list[ChildPartition] = []
        starter = threading.Thread(
            target=lambda: started.append(start(host, linger_listening, devices=[vsp]))
        )
        starter.start()
        starter.join(60)
        assert wait_until(lambda: bool(vsp.handlers), 60)
        (child,) = started
        with pytest.raises(subprocess.TimeoutExpired):  # alive after its starter ended
            confined(child).wait(1)
        assert child.state == "running"


def wait_for_a_packet_forever(guest: Guest) -> None:
    """Child: blocks on a channel's signal that will never come."""
    drivers: list[EchoVsc] = []
    guest.register(ECHO_CLASS_ID, lambda device: drivers.append(EchoVsc(device)))
    channel = drivers[0].open()
    channel.receive()  # the echo device sends nothing unasked


def test_child_notices_a_dead_parent_port(capfd: pytest.CaptureFixture[str]) -> None:
    with Host() as host:
        vsp = EchoVsp()
        child = start(host, wait_for_a_packet_forever, devices=[vsp])
        assert wait_until(lambda: bool(vsp.handlers), 30)
        assert isinstance(child.port, SocketPort)
        child.port.sock.shutdown(socket.SHUT_RDWR)  # what the child sees when we die
        assert child.wait(30) == EXIT_PARENT_GONE
        assert child.state == "crashed"
        assert confined(child).output_closed.wait(10)
    assert PARENT_GONE in capfd.readouterr().err


def test_guest_knows_the_host_is_gone_and_a_waiting_call_raises() -> None:
    host_end, guest_end = LocalPort.pair()
    with GuestMemory.create(1 << 20, name="vmbus-host-gone") as memory:
        guest = Guest(guest_end, memory)
        failures: list[BaseException] = []

        def connect() -> None:
            try:
                guest.connect(timeout=60)
            except BaseException as error:  # noqa: BLE001 - the test looks at it
                failures.append(error)

        waiter = threading.Thread(target=connect)
        waiter.start()
        assert host_end.receive(timeout=30) is not None  # its INITIATE_CONTACT
        host_end.close()  # and no answer: the host is gone
        waiter.join(30)
        assert guest.host_gone.is_set()
        assert len(failures) == 1 and isinstance(failures[0], GuestError)
        assert "closed the connection" in str(failures[0])
        guest.close()


def test_guest_that_closes_its_own_port_is_not_told_the_host_is_gone() -> None:
    host_end, guest_end = LocalPort.pair()
    with GuestMemory.create(1 << 20, name="vmbus-own-close") as memory:
        guest = Guest(guest_end, memory)
        guest.close()
        assert not guest.host_gone.is_set()
        host_end.close()


# --- what the child is ------------------------------------------------------------


def check_own_confinement(guest: Guest, layers: tuple[str, ...], parent_userns: str) -> None:
    status = dict(
        line.split(":\t", 1) for line in Path("/proc/self/status").read_text().splitlines()
    )
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2", "no seccomp filter"
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0, "dumpable"
    if sandbox.NO_CAPABILITIES in layers:
        assert int(status["CapEff"], 16) == 0
        assert int(status["CapBnd"], 16) == 0
    if sandbox.USER_NAMESPACE in layers:
        assert os.readlink("/proc/self/ns/user") != parent_userns


def test_child_is_not_dumpable_and_has_no_new_privs() -> None:
    with Host() as host:
        layers = sandbox.engine().layers
        child = start(host, check_own_confinement, args=(layers, PARENT_USERNS))
        assert child.wait(60) == 0
        assert confined(child).confinement == layers
        for layer in (sandbox.NO_NEW_PRIVS, sandbox.NOT_DUMPABLE, sandbox.DIES_WITH_PARENT):
            assert layer in layers


def try_forbidden_syscalls(guest: Guest) -> None:
    with pytest.raises(PermissionError):
        socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # its own network namespace allows it
    with pytest.raises(PermissionError):
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # to connect to a shared socket
    libc = ctypes.CDLL(None, use_errno=True)
    for name, args in (
        ("ptrace", (PTRACE_TRACEME, 0, 0, 0)),  # allowed to anyone without seccomp
        ("unshare", (CLONE_NEWUSER,)),
    ):
        ctypes.set_errno(0)
        assert getattr(libc, name)(*args) == -1, name
        assert ctypes.get_errno() == errno.EPERM, name


def test_seccomp_refuses_a_forbidden_syscall() -> None:
    if sandbox.SECCOMP not in sandbox.engine().layers:
        pytest.skip("libseccomp is missing")
    with Host() as host:
        child = start(host, try_forbidden_syscalls)
        assert child.wait(60) == 0


def report_over_a_unix_socket(guest: Guest, address: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(address)
        sock.sendall(b"done")


def test_a_policy_with_unix_sockets_lets_a_trusted_child_report_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """How the benchmarks' children send their results."""
    monkeypatch.setattr(sandbox, "policy", sandbox.Policy(unix_sockets=True))
    address = str(tmp_path / "control")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener, Host() as host:
        listener.bind(address)
        listener.listen(1)
        listener.settimeout(60)
        child = start(host, report_over_a_unix_socket, args=(address,))
        connection, _ = listener.accept()
        with connection:
            assert connection.recv(16) == b"done"
        assert child.wait(60) == 0


def check_environment(guest: Guest) -> None:
    assert "VMBUS_TEST_SECRET_TOKEN" not in os.environ
    assert "GITHUB_TOKEN" not in os.environ
    assert os.environ.get("PYTHONHASHSEED") == "7"


def test_child_does_not_inherit_the_parents_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", "secret")
    monkeypatch.setenv("PYTHONHASHSEED", "7")
    with Host() as host:
        child = start(host, check_environment)
        assert child.wait(60) == 0


def flood_the_output(guest: Guest) -> None:
    line = b"x" * 99 + b"\n"
    for _ in range(100_000):  # 10 MB
        os.write(1, line)


def test_child_that_floods_its_output_is_held_back(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    burst = 32 * 1024
    monkeypatch.setattr(sandbox, "policy", sandbox.Policy(output_rate=1, output_burst=burst))
    with Host() as host:
        child = start(host, flood_the_output)
        # Read at one byte a second, it blocks on its own writes.
        assert child.wait(3) is None
        child.kill()
        assert child.wait(30) is not None
        assert confined(child).output_closed.wait(30)
    flooded = capfd.readouterr().out.count("x" * 99)
    assert 0 < flooded * 100 <= burst + _output.OutputPump.LONGEST_LINE


# --- without bubblewrap -----------------------------------------------------------


def test_without_bwrap_a_child_confines_itself_and_the_parent_says_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sandbox, "_engine", None)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    caplog.set_level(logging.WARNING, logger="vmbus.sandbox")
    with Host() as host:
        children = [start(host, try_to_signal_the_parent, args=(os.getpid(),)) for _ in range(2)]
        assert [child.wait(60) for child in children] == [0, 0]
        layers = confined(children[0]).confinement
        assert sandbox.PID_NAMESPACE not in layers and sandbox.NO_NEW_PRIVS in layers
        checked = start(host, check_own_confinement, args=(layers, PARENT_USERNS))
        assert checked.wait(60) == 0
    warnings = [r for r in caplog.records if "bwrap is not installed" in r.getMessage()]
    assert len(warnings) == 1


def check_own_priority(guest: Guest, nice: int, own_group: bool, threads: bool) -> None:
    """`threads`: its threads' nice is checked too (bwrap's filter refuses
    setpriority: there the group alone decides)."""
    if threads:
        assert os.getpriority(os.PRIO_PROCESS, 0) == nice
    want = nice if own_group else PARENT_GROUP_NICE
    # The kernel takes one group change per 0.1 s: a child may wait its turn.
    assert wait_until(lambda: group_nice() == want, 10)


def group_nice() -> int:
    """This process's autogroup nice. The kernel prints nothing for the
    default group (a process whose session was never its own, as CI's
    runner), which weighs as nice 0 and takes no other value."""
    fields = Path("/proc/self/autogroup").read_text().split()
    return int(fields[-1]) if fields else 0


PARENT_GROUP_NICE = group_nice()


@pytest.mark.parametrize("nice", [sandbox.CHILD_NICE, 0])
@pytest.mark.parametrize("engine", ["default", "self", "unconfined"])
def test_a_child_runs_below_the_root(
    engine: str, nice: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A guest spinning its CPU yields to the root: its scheduling group
    (its session's autogroup) runs at Policy.nice, and its threads too where
    it shares the parent's group (unconfined), which keeps its own nice."""
    if engine == "self":
        monkeypatch.setattr(sandbox, "_engine", None)
        monkeypatch.setattr(shutil, "which", lambda name: None)
    policy = sandbox.Policy(enabled=engine != "unconfined", nice=nice)
    own_group = engine != "unconfined"
    threads = not own_group or sandbox.engine().bwrap is None
    with Host() as host:
        child = start(host, check_own_priority, args=(nice, own_group, threads), policy=policy)
        assert child.wait(60) == 0
    assert group_nice() == PARENT_GROUP_NICE


@pytest.mark.parametrize("nice", [-1, 20])
def test_a_policy_that_would_put_a_child_above_the_root_or_out_of_range_is_refused(
    nice: int,
) -> None:
    with pytest.raises(ValueError, match="nice"):
        sandbox.Policy(nice=nice)


def test_children_started_together_all_run_below_the_root() -> None:
    """The kernel refuses a second group change within 0.1 s (EAGAIN) to a
    process without CAP_SYS_ADMIN: the second of two children started
    together kept an equal share, and took four times its sibling's CPU."""
    with Host() as host:
        children = [
            start(host, check_own_priority, args=(sandbox.CHILD_NICE, True, False))
            for _ in range(4)
        ]
        assert [child.wait(60) for child in children] == [0] * 4


def test_policy_from_the_environment() -> None:
    assert not sandbox.policy_from_environment({"VMBUS_SANDBOX": "off"}).enabled
    assert sandbox.policy_from_environment({}).enabled
    strict = sandbox.policy_from_environment({"VMBUS_SANDBOX_WRITABLE": ""})
    assert strict.writable == ()
    shared = sandbox.policy_from_environment({"VMBUS_SANDBOX_WRITABLE": "/a:/b"})
    assert shared.writable == ("/a", "/b")
    assert not sandbox.policy_from_environment({}).unix_sockets
    assert sandbox.policy_from_environment({"VMBUS_SANDBOX_UNIX_SOCKETS": "1"}).unix_sockets


def test_child_environment_keeps_only_what_a_child_needs() -> None:
    kept = sandbox.child_environment(
        {"PATH": "/bin", "PYTHONPATH": "/p", "AWS_SECRET_ACCESS_KEY": "k", "LC_ALL": "C"}
    )
    assert kept == {"PATH": "/bin", "PYTHONPATH": "/p", "LC_ALL": "C"}


def test_unconfined_when_the_policy_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "policy", sandbox.Policy(enabled=False))
    with Host() as host:
        child = start(host, "builtins:print", memory_size=1 << 20)
        assert child.wait(60) == 0
        assert not hasattr(child.process, "confinement")


def test_a_child_killed_by_a_signal_reports_that_signal() -> None:
    with Host() as host:
        child = start(host, linger)
        assert running(child)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    serve_a_lingering_child(sys.argv[2])


def test_a_checkout_under_tmp_stays_visible_to_the_child() -> None:
    """The child's private /tmp is mounted before the paths inside it (a
    clone in /tmp): mounted after, it hid them and bwrap could not start."""
    args = sandbox._file_system(sandbox.Policy(writable=(), readable=("/tmp/ci/checkout",)))
    pairs = list(zip(args, args[1:], strict=False))
    private_tmp = pairs.index(("--tmpfs", "/tmp"))
    checkout = pairs.index(("--ro-bind-try", "/tmp/ci/checkout"))
    assert private_tmp < checkout
