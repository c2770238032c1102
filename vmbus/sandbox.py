"""Confinement of child partitions: a child reaches nothing but its own
guest memory and its message port.

`spawn` starts a child's interpreter in layers, each named in
`ConfinedProcess.confinement`:
- bubblewrap (`bwrap`, Debian's `bubblewrap`, the engine Flatpak uses) puts
  it in user, PID, mount, network, IPC and UTS namespaces of its own, with
  no capabilities, no_new_privs, no further user namespaces, a session of
  its own and SIGKILL when the parent dies. Its file system holds only
  read-only binds of /usr, the Python install and whatever the parent
  imports from, a few files of /etc, a private /dev, /dev/shm and /tmp,
  /proc of its own PID namespace, and the policy's writable paths. bwrap
  is the process the parent waits for; `pid` is the interpreter inside
  (pid 1 there).
- a seccomp allow-list (vmbus._seccomp) loaded by bwrap before the
  interpreter starts: any other system call fails with EPERM.
- the child itself (vmbus._child calls `confine_self`): not dumpable, a
  parent-death signal, and an exit within a second when its port hangs up.
- stdout and stderr: pipes copied to the parent's stdout and stderr at a
  bounded rate (vmbus._output): a flooding child is slowed, not the parent.
- the environment, less credentials and the like.
Where bwrap is missing or cannot run here, the child confines itself as far
as it can: no capabilities, no_new_privs, the same filter with signals and
rlimits limited to itself, not dumpable, parent-death signal; a warning
says once which layers are missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from vmbus import _output
from vmbus import _seccomp as sc
from vmbus.errors import UsageError, VmbusError

log = logging.getLogger(__name__)

T = TypeVar("T")

# The layers, as `ConfinedProcess.confinement` names them.
USER_NAMESPACE = "user-namespace"
PID_NAMESPACE = "pid-namespace"
MOUNT_NAMESPACE = "mount-namespace"
NETWORK_NAMESPACE = "network-namespace"
IPC_NAMESPACE = "ipc-namespace"
UTS_NAMESPACE = "uts-namespace"
NO_CAPABILITIES = "no-capabilities"
NO_NESTED_USER_NAMESPACES = "no-nested-user-namespaces"
NO_NEW_PRIVS = "no-new-privs"
SECCOMP = "seccomp"
NOT_DUMPABLE = "not-dumpable"
DIES_WITH_PARENT = "dies-with-parent"
STDIO = "stdio-pumped"
NAMESPACES = (
    USER_NAMESPACE,
    PID_NAMESPACE,
    MOUNT_NAMESPACE,
    NETWORK_NAMESPACE,
    IPC_NAMESPACE,
    UTS_NAMESPACE,
)

MODE_VARIABLE = "VMBUS_CONFINEMENT"  # tells the child which engine confined it
PARENT_VARIABLE = "VMBUS_PARENT_PID"
UNIX_VARIABLE = "VMBUS_SANDBOX_UNIX_SOCKETS"
NICE_VARIABLE = "VMBUS_CHILD_NICE"
# CFS weighs nice 10 at 110 against 1,024 for nice 0: a child busy on every
# CPU still gets all the time the root leaves idle, and a tenth of the rest.
CHILD_NICE = 10
GROUP_NICE_PATIENCE = 30.0  # seconds a child keeps asking for its turn to set it


class SandboxError(VmbusError, OSError):
    """The sandbox could not start a child."""


class ParentGone(SystemExit):
    """The parent died (or dropped us) before or while this child ran."""


@dataclass(frozen=True)
class Policy:
    """What a confined child may touch besides its memory and its port.

    `writable` paths are bound read-write. By default that is the parent's
    temporary directory, which programs (and this project's tests) use to
    hand files to and from children; `Policy(writable=())` leaves a child
    only its private /tmp. `readable` adds read-only paths. `unix_sockets`
    lets a child connect to Unix sockets it can see (trusted programs that
    report to their parent that way, like the benchmarks): never for a
    guest you do not trust, since the shared directories may hold any.
    `net_admin` lets a child run a Linux network stack in its own network
    namespace (`vsc.net.stack`): CAP_NET_ADMIN and CAP_NET_RAW inside its
    user namespace, /dev/net/tun, and sockets of any family and ioctls in
    its filter. It needs bwrap (a network namespace of the child's own).
    `nice` is the child's CPU weight below the root's: the nice value of
    its scheduling group (the autogroup of its session) and threads, so a
    guest spinning its CPU yields to the VSPs and consoles that serve it
    and its siblings, as a host runs vCPUs below its I/O threads (0: an
    equal share; a hostile child can raise its own weight back to that,
    never above)."""

    enabled: bool = True
    writable: tuple[str, ...] = field(default_factory=lambda: (tempfile.gettempdir(),))
    readable: tuple[str, ...] = ()
    unix_sockets: bool = False
    net_admin: bool = False
    output_rate: int = 256 * 1024  # bytes a second of a child's output, sustained
    output_burst: int = 1024 * 1024
    nice: int = CHILD_NICE

    def __post_init__(self) -> None:
        if not 0 <= self.nice <= 19:
            raise UsageError(
                f"a child's nice is 0 to 19 (below the root, or its equal), not {self.nice}"
            )


def policy_from_environment(environ: Mapping[str, str] = os.environ) -> Policy:
    """VMBUS_SANDBOX=off runs children unconfined (as before);
    VMBUS_SANDBOX_WRITABLE is a colon-separated list of writable paths
    (empty: none); VMBUS_SANDBOX_UNIX_SOCKETS=1 sets `unix_sockets`."""

    def yes(name: str, default: str) -> bool:
        return environ.get(name, default).lower() not in ("", "0", "off", "no", "false")

    chosen = Policy(enabled=yes("VMBUS_SANDBOX", "on"), unix_sockets=yes(UNIX_VARIABLE, "0"))
    writable = environ.get("VMBUS_SANDBOX_WRITABLE")
    if writable is None:
        return chosen
    return dataclasses.replace(chosen, writable=tuple(p for p in writable.split(":") if p))


policy = policy_from_environment()  # the default for every Host.start


# --- choosing the engine, once per parent -----------------------------------


@dataclass(frozen=True)
class Engine:
    bwrap: str | None  # its path, or None: the child confines itself
    layers: tuple[str, ...]
    bwrap_flags: tuple[str, ...] = ()
    seccomp: bytes | None = None  # the filter bwrap loads


_BWRAP_FLAGS = (
    "--unshare-user",
    "--unshare-pid",
    "--unshare-net",
    "--unshare-ipc",
    "--unshare-uts",
    "--unshare-cgroup-try",
    "--disable-userns",
    "--die-with-parent",
    "--new-session",
    "--as-pid-1",
    "--cap-drop",
    "ALL",
)
_engine: Engine | None = None
_lock = threading.Lock()


def engine() -> Engine:
    """How this process confines its children (chosen on first use)."""
    global _engine
    with _lock:
        if _engine is None:
            _engine = _choose_engine()
        return _engine


def use_engine(chosen: Engine) -> None:
    """Confine this process's children as `chosen` says: a VM's worker takes
    the parent's choice rather than probing (and warning) again."""
    global _engine
    with _lock:
        _engine = chosen


def _choose_engine() -> Engine:
    missing: list[str] = []
    seccomp: bytes | None = None
    try:
        seccomp = sc.build_filter(own_pid=None)  # it has a PID namespace of its own
    except OSError as error:
        missing.append(f"{SECCOMP} (libseccomp: {error})")
    bwrap = shutil.which("bwrap")
    reason = "bwrap is not installed (Debian: apt-get install bubblewrap)"
    if bwrap is not None:
        for flags in (_BWRAP_FLAGS, tuple(f for f in _BWRAP_FLAGS if f != "--disable-userns")):
            failure = _probe(bwrap, flags)
            if failure is None:
                layers = [*NAMESPACES, NO_CAPABILITIES, NO_NEW_PRIVS]
                if "--disable-userns" in flags:
                    layers.append(NO_NESTED_USER_NAMESPACES)
                else:
                    missing.append(f"{NO_NESTED_USER_NAMESPACES} (bwrap --disable-userns failed)")
                if seccomp is not None:
                    layers.append(SECCOMP)
                layers += [NOT_DUMPABLE, DIES_WITH_PARENT, STDIO]
                _warn(missing)
                return Engine(bwrap, tuple(layers), flags, seccomp)
            reason = f"bwrap cannot run here: {failure}"
    missing.append(
        f"{', '.join(NAMESPACES)} ({reason}; a child sees every process and file"
        " its user may, and the parent's memory in /proc unless Yama forbids it)"
    )
    _warn(missing)
    layers = [NO_CAPABILITIES, NO_NEW_PRIVS, *([SECCOMP] if seccomp else [])]
    return Engine(None, (*layers, NOT_DUMPABLE, DIES_WITH_PARENT, STDIO))


def _warn(missing: list[str]) -> None:
    if missing:
        log.warning("child partitions run without: %s", "; ".join(missing))


def _probe(bwrap: str, flags: Sequence[str]) -> str | None:
    """None if bwrap starts our interpreter with these flags, else why not."""
    argv = [bwrap, *flags, *_file_system(Policy(writable=())), "--", sys.executable, "-c", ""]
    try:
        result = subprocess.run(argv, capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return str(error)
    if result.returncode == 0:
        return None
    return result.stderr.decode(errors="replace").strip() or f"exit code {result.returncode}"


# --- the child's file system and environment -----------------------------------

_ETC_FILES = ("ld.so.cache", "localtime", "passwd", "group", "nsswitch.conf")


def _outermost(paths: set[str]) -> list[str]:
    chosen: list[str] = []
    for path in sorted(paths, key=len):
        if not any(path == c or path.startswith(c.rstrip("/") + "/") for c in chosen):
            chosen.append(path)
    return sorted(chosen)


def _readable_paths(extra: Sequence[str]) -> list[str]:
    """The Python install, the import path, and where every top-level
    module the parent imported comes from (editable installs too)."""
    paths = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}
    paths.add(os.path.dirname(os.path.realpath(sys.executable)))
    paths.update(os.path.abspath(entry or os.curdir) for entry in sys.path)
    for name, module in list(sys.modules.items()):
        if "." in name or module is None:
            continue
        for location in getattr(module, "__path__", None) or ():  # a package
            paths.add(os.path.dirname(os.path.abspath(location)))
        file = getattr(module, "__file__", None)
        if file and not hasattr(module, "__path__"):
            paths.add(os.path.dirname(os.path.abspath(file)))
    paths.update(os.path.abspath(p) for p in extra)
    paths.discard("/")
    return _outermost(paths)


def _file_system(policy: Policy) -> list[str]:
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = f"/{name}"
        if os.path.islink(path):  # merged /usr: keep the symlink
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for name in _ETC_FILES:
        args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    readable = _readable_paths(policy.readable)
    writable = [os.path.abspath(p) for p in policy.writable]
    args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/dev/shm"]
    # Mounts in order of depth, so that one inside another (a checkout in
    # /tmp) lands on top of it rather than being hidden by it.
    mounts = [(path, "--ro-bind-try") for path in readable]
    mounts += [(path, "--bind-try") for path in writable]
    if "/tmp" not in writable:
        mounts.append(("/tmp", "--tmpfs"))
    for path, kind in sorted(mounts, key=lambda mount: mount[0].rstrip("/").count("/")):
        args += [kind, path] if kind == "--tmpfs" else [kind, path, path]
    cwd = os.getcwd()
    inside = any(cwd == p or cwd.startswith(p.rstrip("/") + "/") for p in readable + writable)
    return [*args, "--chdir", cwd if inside else "/"]


_KEPT_VARIABLES = ("PATH", "LANG", "LANGUAGE", "TZ", "TERM", "TMPDIR", "HOME", "CI", "NO_COLOR")
_KEPT_PREFIXES = ("PYTHON", "LC_", "VMBUS_", "COV_CORE_", "COVERAGE_")


def child_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The parent's environment less what a child has no business reading
    (credentials and the like): locale, paths, Python's and ours."""
    return {
        name: value
        for name, value in environ.items()
        if name in _KEPT_VARIABLES or name.startswith(_KEPT_PREFIXES)
    }


# --- the process ---------------------------------------------------------------


_NO_OUTPUT = threading.Event()
_NO_OUTPUT.set()


class ConfinedProcess(subprocess.Popen[bytes]):
    """A confined child. `pid` is its interpreter (as this process sees it);
    under bwrap, `monitor_pid` is bwrap, the process waited for, which exits
    with the interpreter and reports its death by signal n as exit code
    128+n, read back here as -n (as Popen reports a signal). `wait` returns
    once the child's output has been read to its end, too."""

    confinement: tuple[str, ...] = ()
    monitor_pid: int = 0
    output_closed: threading.Event = _NO_OUTPUT

    def wait(self, timeout: float | None = None) -> int:
        code = super().wait(timeout)
        self.output_closed.wait(1.0)  # a grandchild may hold the pipe: not for long
        return code

    def _try_wait(self, wait_flags: int) -> tuple[int, int]:
        try:
            pid, status = os.waitpid(self.monitor_pid, wait_flags)
        except ChildProcessError:
            return self.pid, 0
        return (self.pid if pid == self.monitor_pid else pid), status

    def _internal_poll(self, _deadstate: int | None = None, *_: object, **__: object) -> int | None:
        lock: threading.Lock = getattr(self, "_waitpid_lock")  # noqa: B009 - Popen's own
        if self.returncode is None and lock.acquire(False):
            try:
                if self.returncode is None:
                    pid, status = self._try_wait(os.WNOHANG)
                    if pid == self.pid:
                        self._handle_exitstatus(status)
            except OSError:
                if _deadstate is not None:
                    self.returncode = _deadstate
            finally:
                lock.release()
        return self.returncode

    def _handle_exitstatus(self, status: int, *_: object, **__: object) -> None:
        code = os.waitstatus_to_exitcode(status)
        if self.monitor_pid != self.pid and 128 < code <= 128 + signal.NSIG:
            code = 128 - code  # bwrap's report of a death by signal
        self.returncode = code


def spawn(
    argv: Sequence[str], *, pass_fds: Sequence[int], name: str, policy: Policy | None = None
) -> subprocess.Popen[bytes]:
    """Start a child partition's interpreter (`argv`), confined by `policy`
    (default: this module's `policy`), with `pass_fds` inherited and a pipe
    on its stdin. Off the main thread, a thread that lasts as long as this
    process starts it: the parent-death signal follows the thread that
    forked, and Host.start may be called from one that ends."""
    chosen = policy if policy is not None else globals()["policy"]
    if not chosen.enabled:
        env = {**os.environ, NICE_VARIABLE: str(chosen.nice)}
        return subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, pass_fds=tuple(pass_fds), env=env
        )
    return on_lasting_thread(functools.partial(_spawn, list(argv), tuple(pass_fds), name, chosen))


_spawner_pool: ThreadPoolExecutor | None = None


def on_lasting_thread(start: Callable[[], T]) -> T:
    """`start()` (which forks) on a thread that lasts as long as this
    process: a child's parent-death signal follows the thread that forked
    it, and the caller's thread may end first."""
    if threading.current_thread() is threading.main_thread():
        return start()
    return _spawner().submit(start).result()


def _spawner() -> ThreadPoolExecutor:
    global _spawner_pool
    with _lock:
        if _spawner_pool is None:
            _spawner_pool = ThreadPoolExecutor(1, thread_name_prefix="vmbus-spawner")
        return _spawner_pool


def _forget() -> None:
    global _spawner_pool, _lock
    _spawner_pool, _lock = None, threading.Lock()  # a forked child has none of our threads


os.register_at_fork(after_in_child=_forget)


def _spawn(
    argv: list[str], pass_fds: tuple[int, ...], name: str, policy: Policy
) -> ConfinedProcess:
    chosen = engine()
    env = child_environment()
    env[NICE_VARIABLE] = str(policy.nice)
    pipes = [os.pipe(), os.pipe()]  # its stdout, its stderr
    ends = (pipes[0][1], pipes[1][1])
    try:
        if chosen.bwrap is None:
            if policy.net_admin:
                raise SandboxError("net_admin needs bwrap: a network namespace of the child's own")
            env[UNIX_VARIABLE] = "1" if policy.unix_sockets else "0"
            process = _spawn_self(argv, pass_fds, env, ends)
        else:
            process = _spawn_bwrap(chosen, policy, argv, pass_fds, env, ends)
    except BaseException:
        for read_end, _ in pipes:
            os.close(read_end)
        raise
    finally:
        for end in ends:
            os.close(end)
    process.confinement = chosen.layers
    process.output_closed = _output.pump().add(
        [(pipes[0][0], 1), (pipes[1][0], 2)], name, policy.output_rate, policy.output_burst
    )
    return process


def _spawn_self(
    argv: list[str], pass_fds: tuple[int, ...], env: dict[str, str], output: tuple[int, int]
) -> ConfinedProcess:
    env[MODE_VARIABLE], env[PARENT_VARIABLE] = "self", str(os.getpid())
    process = ConfinedProcess(
        argv,
        stdin=subprocess.PIPE,
        stdout=output[0],
        stderr=output[1],
        pass_fds=pass_fds,
        env=env,
        start_new_session=True,
    )
    process.monitor_pid = process.pid
    return process


def _spawn_bwrap(
    chosen: Engine,
    policy: Policy,
    argv: list[str],
    pass_fds: tuple[int, ...],
    env: dict[str, str],
    output: tuple[int, int],
) -> ConfinedProcess:
    assert chosen.bwrap is not None
    env[MODE_VARIABLE] = "bwrap"
    info, info_write = os.pipe()
    inherited = [info_write]
    try:
        flags = chosen.bwrap_flags
        if policy.net_admin:
            # --disable-userns puts the child in a nested user namespace, which
            # does not own its network namespace: no CAP_NET_ADMIN there. The
            # filter refuses unshare and namespace clones all the same.
            flags = tuple(flag for flag in flags if flag != "--disable-userns")
        wrapper = [chosen.bwrap, *flags, *_file_system(policy)]
        if policy.net_admin:  # after --cap-drop ALL: these two come back, in its namespaces only
            wrapper += ["--cap-add", "CAP_NET_ADMIN", "--cap-add", "CAP_NET_RAW"]
            wrapper += ["--dev-bind", "/dev/net/tun", "/dev/net/tun"]
        if chosen.seccomp is not None:
            seccomp = chosen.seccomp
            if policy.net_admin:
                seccomp = _network_filter()
            elif policy.unix_sockets:
                seccomp = _unix_filter()
            program, program_write = os.pipe()
            inherited.append(program)
            os.write(program_write, seccomp)  # a few KiB: fits in the pipe
            os.close(program_write)
            wrapper += ["--seccomp", str(program)]
        process = ConfinedProcess(
            [*wrapper, "--info-fd", str(info_write), "--", *argv],
            stdin=subprocess.PIPE,
            stdout=output[0],
            stderr=output[1],
            pass_fds=(*pass_fds, *inherited),
            env=env,
        )
    except BaseException:
        os.close(info)
        raise
    finally:
        for fd in inherited:
            os.close(fd)
    process.monitor_pid = process.pid
    process.pid = _interpreter_pid(info, process)
    return process


@functools.cache
def _unix_filter() -> bytes:
    return sc.build_filter(own_pid=None, unix_sockets=True)


@functools.cache
def _network_filter() -> bytes:
    return sc.build_filter(own_pid=None, network=True)


def _interpreter_pid(info: int, process: ConfinedProcess) -> int:
    """bwrap's report of the pid of its child (our interpreter)."""
    data = b""
    try:
        while select.select([info], [], [], 30)[0]:
            chunk = os.read(info, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(info)
    try:
        return int(json.loads(data)["child-pid"])
    except (ValueError, KeyError, TypeError):
        process.kill()
        process.wait()
        raise SandboxError(
            f"bwrap did not start the child (exit code {process.returncode})"
        ) from None


# --- inside the child ------------------------------------------------------------


def confine_self(port_fd: int) -> tuple[str, ...]:
    """The layers a child applies to itself, first thing after exec: the
    parent-death signal (then a check that the parent did not die before
    it was set), not dumpable, and without bwrap no capabilities,
    no_new_privs and the seccomp filter. The layers applied; none if the
    child was not confined."""
    mode = os.environ.pop(MODE_VARIABLE, "")
    parent = os.environ.pop(PARENT_VARIABLE, "")
    if not mode:
        return ()
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
    if (mode == "self" and str(os.getppid()) != parent) or _hung_up(port_fd):
        raise ParentGone("vmbus child: the parent died before the child started")
    sc.prctl(sc.PR_SET_DUMPABLE, 0)
    layers = [NOT_DUMPABLE, DIES_WITH_PARENT]
    if mode == "self":
        sc.drop_capabilities()
        sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
        layers += [NO_CAPABILITIES, NO_NEW_PRIVS]
        with contextlib.suppress(OSError):  # no libseccomp: the parent warned
            unix = os.environ.pop(UNIX_VARIABLE, "0") == "1"
            sc.load_filter(sc.build_filter(own_pid=os.getpid(), unix_sockets=unix))
            layers.append(SECCOMP)
    elif os.getpid() == 1:
        # pid 1 of its namespace ignores signals it has no handler for,
        # and the parent stops a child with SIGTERM.
        signal.signal(signal.SIGTERM, lambda *_: os._exit(128 + signal.SIGTERM))
    return tuple(layers)


def lower_priority() -> int:
    """The child's first step: its threads, and its scheduling group if
    it leads a session of its own (unconfined, it shares the parent's), at
    the nice value the parent chose (`Policy.nice`). The value set."""
    try:
        nice = min(max(int(os.environ.pop(NICE_VARIABLE, "0")), 0), 19)
    except ValueError:
        return 0
    if nice:
        with contextlib.suppress(OSError):  # bwrap's filter refuses it: the group decides
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        if os.getsid(0) == os.getpid() and not _set_group_nice(nice):
            threading.Thread(
                target=_retry_group_nice, args=(nice,), name="vmbus-nice", daemon=True
            ).start()
    return nice


def _set_group_nice(nice: int) -> bool:
    """Set this session's autogroup nice: False if the kernel said to come
    back later (it takes one such change per 0.1 s, system-wide, from a
    process without CAP_SYS_ADMIN: children starting together collide)."""
    try:
        fd = os.open("/proc/self/autogroup", os.O_WRONLY)
    except OSError:  # a kernel without autogroups
        return True
    try:
        os.write(fd, str(nice).encode())
    except BlockingIOError:
        return False
    except OSError:
        pass
    finally:
        os.close(fd)
    return True


def _retry_group_nice(nice: int) -> None:
    deadline = time.monotonic() + GROUP_NICE_PATIENCE
    while not _set_group_nice(nice) and time.monotonic() < deadline:
        time.sleep(0.03)


def _hung_up(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLHUP | select.POLLRDHUP)
    return any(events & (select.POLLHUP | select.POLLRDHUP) for _, events in poller.poll(0))
