"""Confinement of child partitions: a child reaches nothing but its own
guest memory and its message port.

`spawn` starts a child's interpreter in layers, each named in
`ConfinedProcess.confinement`:
- bubblewrap (`bwrap`, Debian's `bubblewrap`, the engine Flatpak uses) puts
  it in user, PID, mount, network, IPC and UTS namespaces of its own, with
  no capabilities, no_new_privs, no further user namespaces, a session of
  its own and SIGKILL when the parent dies. Its file system holds only
  read-only binds of /usr, the Python install and the import path, a few
  files of /etc, a private /dev, /tmp and /dev/shm, /proc of its own PID
  namespace, and the policy's writable paths. bwrap is the process the
  parent waits for; `pid` is the interpreter inside (pid 1 there).
- a seccomp allow-list (below), compiled by libseccomp through ctypes and
  loaded by bwrap before the interpreter starts: any other system call
  fails with EPERM (other ABIs kill the process).
- the child itself (vmbus._child calls `confine_self`): not dumpable, a
  parent-death signal, and an exit within a second when its port hangs up.
- stdout and stderr: one pipe per child, read by one thread of the parent
  at a bounded rate and copied to the parent's stderr, each line prefixed
  with the child's name. A child that floods it is slowed down, not the
  parent.
Where bwrap is missing or cannot run here, the child confines itself as far
as it can without privileges (no_new_privs, the same seccomp filter with
signals and rlimits limited to itself, not dumpable, parent-death signal);
a warning says once which layers are missing.
"""

from __future__ import annotations

import contextlib
import ctypes
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
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from vmbus.errors import VmbusError

log = logging.getLogger(__name__)

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
ALL_LAYERS = (
    *NAMESPACES,
    NO_CAPABILITIES,
    NO_NESTED_USER_NAMESPACES,
    NO_NEW_PRIVS,
    SECCOMP,
    NOT_DUMPABLE,
    DIES_WITH_PARENT,
    STDIO,
)

MODE_VARIABLE = "VMBUS_CONFINEMENT"  # tells the child which engine confined it
PARENT_VARIABLE = "VMBUS_PARENT_PID"


class SandboxError(VmbusError, OSError):
    """The sandbox could not start a child."""


@dataclass(frozen=True)
class Policy:
    """What a confined child may touch besides its memory and its port.

    `writable` paths are bound read-write. By default that is the parent's
    temporary directory, which programs (and this project's tests) use to
    hand files to and from children; `Policy(writable=())` gives a child
    nothing to write but its private /tmp. `readable` adds read-only paths
    to the Python install, the import path and /usr."""

    enabled: bool = True
    writable: tuple[str, ...] = field(default_factory=lambda: (tempfile.gettempdir(),))
    readable: tuple[str, ...] = ()
    output_rate: int = 256 * 1024  # bytes a second of a child's output, sustained
    output_burst: int = 1024 * 1024


def policy_from_environment(environ: Mapping[str, str] = os.environ) -> Policy:
    """VMBUS_SANDBOX=off runs children unconfined (as before); VMBUS_SANDBOX_WRITABLE
    is a colon-separated list of writable paths (empty: none)."""
    enabled = environ.get("VMBUS_SANDBOX", "on").lower() not in ("0", "off", "no", "false")
    writable = environ.get("VMBUS_SANDBOX_WRITABLE")
    if writable is None:
        return Policy(enabled=enabled)
    return Policy(enabled=enabled, writable=tuple(p for p in writable.split(":") if p))


policy = policy_from_environment()  # the default for every Host.start


# --- the seccomp allow-list -------------------------------------------------

# What a CPython child running numpy, threads, asyncio and this library
# needs (taken from strace of the test suite's children). Not on it, among
# others: socket (no new connections, not even to a Unix socket in a
# shared directory), connect, bind, ptrace, process_vm_*, mount, pivot_root,
# chroot, unshare, setns, bpf, perf_event_open, userfaultfd, io_uring_*,
# keyctl, memfd_create, pidfd_*, *_module, kexec_*, personality.
_ALLOWED_GROUPS = (
    # descriptors and files (the mount namespace decides which files)
    "read write readv writev pread64 pwrite64 preadv pwritev preadv2 pwritev2 lseek",
    "close close_range dup dup2 dup3 fcntl ioctl flock fsync fdatasync ftruncate",
    "fallocate sendfile copy_file_range pipe pipe2 eventfd2",
    "open openat openat2 creat stat fstat lstat newfstatat statx statfs fstatfs",
    "access faccessat faccessat2 readlink readlinkat getdents64 getcwd chdir fchdir",
    "mkdir mkdirat rmdir unlink unlinkat rename renameat renameat2 link linkat",
    "symlink symlinkat chmod fchmod fchmodat umask utimensat",
    "getxattr lgetxattr fgetxattr listxattr llistxattr flistxattr",
    # its own memory
    "mmap munmap mprotect mremap madvise brk msync mincore",
    "mbind get_mempolicy set_mempolicy",
    # signals, waiting, time
    "rt_sigaction rt_sigprocmask rt_sigreturn rt_sigpending rt_sigtimedwait",
    "rt_sigsuspend sigaltstack restart_syscall pause alarm getitimer setitimer",
    "poll ppoll select pselect6 epoll_create epoll_create1 epoll_ctl epoll_wait",
    "epoll_pwait epoll_pwait2 timerfd_create timerfd_settime timerfd_gettime signalfd4",
    "nanosleep clock_nanosleep clock_gettime clock_getres gettimeofday time times",
    # threads and processes of its own
    "futex futex_waitv set_robust_list set_tid_address arch_prctl rseq sched_yield",
    "sched_getaffinity sched_getparam sched_getscheduler sched_get_priority_max",
    "sched_get_priority_min getcpu wait4 waitid exit exit_group execve execveat",
    "fork vfork getrusage getpid getppid gettid getuid geteuid getgid getegid",
    "getgroups getresuid getresgid getpgrp getpgid getsid setsid setpgid capget",
    "uname sysinfo getrlimit getrandom getpriority",
    # its port (and socketpairs: asyncio), never a new socket
    "socketpair sendmsg recvmsg sendto recvfrom sendmmsg recvmmsg shutdown",
    "getsockopt setsockopt getsockname getpeername",
)
ALLOWED_SYSCALLS = frozenset(name for group in _ALLOWED_GROUPS for name in group.split())

_NEW_NAMESPACE_FLAGS = 0x7E020000  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
_SAFE_PRCTL = (
    1,  # PR_SET_PDEATHSIG
    2,  # PR_GET_PDEATHSIG
    3,  # PR_GET_DUMPABLE
    15,  # PR_SET_NAME
    16,  # PR_GET_NAME
    38,  # PR_SET_NO_NEW_PRIVS
    39,  # PR_GET_NO_NEW_PRIVS
    0x53564D41,  # PR_SET_VMA (glibc names its mappings)
)
PR_SET_PDEATHSIG, PR_GET_DUMPABLE, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 3, 4, 38

_ACT_ALLOW = 0x7FFF0000
_EPERM, _ENOSYS = 1, 38
_CMP_EQ, _CMP_MASKED_EQ = 4, 7


def _act_errno(errno: int) -> int:
    return 0x00050000 | errno


class _ArgCmp(ctypes.Structure):
    _fields_ = [  # noqa: RUF012 - ctypes wants a list
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def _libseccomp() -> Any:
    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def seccomp_filter(own_pid: int | None) -> bytes:
    """The allow-list as a BPF program (what `bwrap --seccomp` and
    `load_seccomp` take). With `own_pid` (a child without a PID namespace of
    its own), signals, rlimits and CPU affinity reach only itself; else
    any process of its own PID namespace. Raises OSError without libseccomp."""
    lib = _libseccomp()
    ctx = lib.seccomp_init(_act_errno(_EPERM))
    if not ctx:
        raise OSError("seccomp_init failed")
    try:

        def rule(name: str, action: int = _ACT_ALLOW, *cmps: tuple[int, int, int, int]) -> None:
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number < 0:
                return  # not a system call of this architecture
            array = (_ArgCmp * max(1, len(cmps)))(*(_ArgCmp(*c) for c in cmps))
            if lib.seccomp_rule_add_array(ctx, action, number, len(cmps), array) < 0:
                raise OSError(f"seccomp: cannot add a rule for {name}")

        for name in sorted(ALLOWED_SYSCALLS):
            rule(name)
        rule("clone", _ACT_ALLOW, (0, _CMP_MASKED_EQ, _NEW_NAMESPACE_FLAGS, 0))
        rule("clone3", _act_errno(_ENOSYS))  # its flags are out of reach: glibc falls back to clone
        for option in _SAFE_PRCTL:
            rule("prctl", _ACT_ALLOW, (0, _CMP_EQ, option, 0))
        rule("prctl", _ACT_ALLOW, (0, _CMP_EQ, PR_SET_DUMPABLE, 0), (1, _CMP_EQ, 0, 0))
        for target in (0, own_pid) if own_pid is not None else (0,):
            rule("prlimit64", _ACT_ALLOW, (0, _CMP_EQ, target, 0))
            rule("sched_setaffinity", _ACT_ALLOW, (0, _CMP_EQ, target, 0))
        if own_pid is None:
            for name in ("kill", "tgkill", "tkill"):
                rule(name)
        else:
            rule("kill", _ACT_ALLOW, (0, _CMP_EQ, own_pid, 0))
            rule("kill", _ACT_ALLOW, (0, _CMP_EQ, 0, 0))  # its own process group
            rule("tgkill", _ACT_ALLOW, (0, _CMP_EQ, own_pid, 0))
        fd = os.memfd_create("vmbus-seccomp")
        try:
            if lib.seccomp_export_bpf(ctx, fd) < 0:
                raise OSError("seccomp_export_bpf failed")
            size = os.lseek(fd, 0, os.SEEK_CUR)
            return os.pread(fd, size, 0)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]  # noqa: RUF012


def load_seccomp(program: bytes) -> None:
    """Install a BPF program on this thread (and the threads it starts)."""
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(buffer))
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    _prctl(22, 2, ctypes.addressof(fprog))  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


def _prctl(option: int, arg: int = 0, arg3: int = 0) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, *[ctypes.c_ulong] * 4]
    result = int(libc.prctl(option, arg, arg3, 0, 0))
    if result < 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl({option}): {os.strerror(error)}")
    return result


# --- choosing the engine, once per parent -------------------------------------


@dataclass(frozen=True)
class _Engine:
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
_engine: _Engine | None = None
_engine_lock = threading.Lock()


def engine() -> _Engine:
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = _choose_engine()
        return _engine


def _choose_engine() -> _Engine:
    missing: list[str] = []
    seccomp: bytes | None = None
    try:
        seccomp = seccomp_filter(own_pid=None)  # it has a PID namespace of its own
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
                return _Engine(bwrap, tuple(layers), flags, seccomp)
            reason = f"bwrap cannot run here: {failure}"
    layers = [NO_NEW_PRIVS, NOT_DUMPABLE, DIES_WITH_PARENT, STDIO]
    if seccomp is not None:
        layers.insert(1, SECCOMP)
    missing.append(f"{', '.join((*NAMESPACES, NO_CAPABILITIES))} ({reason})")
    _warn(missing)
    return _Engine(None, tuple(layers))


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


# --- the child's file system --------------------------------------------------

_ETC_FILES = ("ld.so.cache", "localtime", "passwd", "group", "nsswitch.conf")


def _readable_paths(extra: Sequence[str]) -> list[str]:
    """The Python install, the import path, our own packages' roots."""
    paths = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}
    paths.add(os.path.dirname(os.path.realpath(sys.executable)))
    paths.update(os.path.abspath(entry or os.curdir) for entry in sys.path)
    for package in ("vmbus", "vsp", "vsc"):
        module = sys.modules.get(package)
        for location in (
            getattr(getattr(module, "__spec__", None), "submodule_search_locations", None) or ()
        ):
            paths.add(os.path.dirname(os.path.abspath(location)))
    paths.update(os.path.abspath(p) for p in extra)
    paths.discard("/")
    # Only the outermost of nested paths; binds of the same path in order.
    chosen: list[str] = []
    for path in sorted(paths, key=len):
        if not any(path == c or path.startswith(c.rstrip("/") + "/") for c in chosen):
            chosen.append(path)
    return sorted(chosen)


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
    for path in _readable_paths(policy.readable):
        args += ["--ro-bind-try", path, path]
    args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/dev/shm"]
    writable = [os.path.abspath(p) for p in policy.writable]
    if "/tmp" not in writable:
        args += ["--tmpfs", "/tmp"]
    for path in writable:
        args += ["--bind-try", path, path]
    return args


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


# --- the process ------------------------------------------------------------


class ConfinedProcess(subprocess.Popen[bytes]):
    """A confined child. `pid` is its interpreter (as this process sees it);
    under bwrap, `monitor_pid` is bwrap, the process waited for, which exits
    with the interpreter and reports its death by signal n as exit code
    128+n, read back here as -n (as Popen reports a signal)."""

    confinement: tuple[str, ...] = ()
    monitor_pid: int = 0
    output_closed: threading.Event

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
    (default: the module's `policy`), with `pass_fds` inherited and a pipe on
    its stdin. Started by a thread that lasts as long as this process, so
    the parent-death signal follows the process, not the calling thread."""
    chosen = policy if policy is not None else globals()["policy"]
    if not chosen.enabled:
        return subprocess.Popen(list(argv), stdin=subprocess.PIPE, pass_fds=tuple(pass_fds))
    start = functools.partial(_spawn, list(argv), tuple(pass_fds), name, chosen)
    if threading.current_thread() is threading.main_thread():
        return start()
    return _spawner().submit(start).result()


_spawner_pool: ThreadPoolExecutor | None = None


def _spawner() -> ThreadPoolExecutor:
    global _spawner_pool
    with _engine_lock:
        if _spawner_pool is None:
            _spawner_pool = ThreadPoolExecutor(1, thread_name_prefix="vmbus-spawner")
        return _spawner_pool


def _spawn(
    argv: list[str], pass_fds: tuple[int, ...], name: str, policy: Policy
) -> ConfinedProcess:
    chosen = engine()
    env = child_environment()
    output_read, output_write = os.pipe()
    closing = [output_write]
    try:
        if chosen.bwrap is None:
            env[MODE_VARIABLE], env[PARENT_VARIABLE] = "self", str(os.getpid())
            process = ConfinedProcess(
                argv,
                stdin=subprocess.PIPE,
                stdout=output_write,
                stderr=subprocess.STDOUT,
                pass_fds=pass_fds,
                env=env,
                start_new_session=True,
            )
            process.monitor_pid = process.pid
        else:
            env[MODE_VARIABLE] = "bwrap"
            info_read, info_write = os.pipe()
            closing.append(info_write)
            extra = [info_write]
            wrapper = [chosen.bwrap, *chosen.bwrap_flags, *_file_system(policy)]
            if os.path.isdir(os.getcwd()) and any(
                os.getcwd() == p or os.getcwd().startswith(p + "/")
                for p in _readable_paths(policy.readable)
            ):
                wrapper += ["--chdir", os.getcwd()]
            else:
                wrapper += ["--chdir", "/"]
            if chosen.seccomp is not None:
                seccomp_read, seccomp_write = os.pipe()
                os.write(seccomp_write, chosen.seccomp)  # a few KiB: fits the pipe
                os.close(seccomp_write)
                closing.append(seccomp_read)
                extra.append(seccomp_read)
                wrapper += ["--seccomp", str(seccomp_read)]
            wrapper += ["--info-fd", str(info_write), "--"]
            try:
                process = ConfinedProcess(
                    wrapper + argv,
                    stdin=subprocess.PIPE,
                    stdout=output_write,
                    stderr=subprocess.STDOUT,
                    pass_fds=(*pass_fds, *extra),
                    env=env,
                )
            except BaseException:
                os.close(info_read)
                raise
            for fd in closing[1:]:
                os.close(fd)
            closing = [output_write]
            process.monitor_pid = process.pid
            process.pid = _interpreter_pid(info_read, process)
    except BaseException:
        os.close(output_read)
        raise
    finally:
        for fd in closing:
            os.close(fd)
    process.confinement = chosen.layers
    process.output_closed = _pump().add(output_read, name, policy)
    return process


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


# --- the child's output -------------------------------------------------------


@dataclass
class _Stream:
    fd: int
    prefix: bytes
    rate: float
    burst: float
    tokens: float
    stamp: float
    done: threading.Event = field(default_factory=threading.Event)
    partial: bytearray = field(default_factory=bytearray)
    resume_at: float | None = None  # while held back


class _OutputPump:
    """One thread copies every child's output to our stderr, line by line,
    each line prefixed with the child's name. A stream that has used up its
    budget is not read until it refills, so a flooding child blocks on its
    own writes and costs the parent nothing; once the child is gone, what
    it left in the pipe is dropped (and said so)."""

    CHUNK = 64 * 1024
    LONGEST_LINE = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._new: list[_Stream] = []
        self._wake = os.eventfd(0, os.EFD_NONBLOCK)
        self._streams: dict[int, _Stream] = {}
        self._epoll = select.epoll()
        self._epoll.register(self._wake, select.EPOLLIN)
        threading.Thread(target=self._run, name="vmbus-child-output", daemon=True).start()

    def add(self, fd: int, name: str, policy: Policy) -> threading.Event:
        burst = max(policy.output_burst, self.LONGEST_LINE)
        stream = _Stream(
            fd, f"[{name}] ".encode(), policy.output_rate, burst, burst, time.monotonic()
        )
        with self._lock:
            self._new.append(stream)
        os.eventfd_write(self._wake, 1)
        return stream.done

    def _run(self) -> None:
        while True:
            held = [s.resume_at for s in self._streams.values() if s.resume_at is not None]
            timeout = max(0.0, min(held) - time.monotonic()) if held else -1
            for fd, events in self._epoll.poll(timeout):
                if fd == self._wake:
                    self._take_new()
                    continue
                stream = self._streams[fd]
                if stream.resume_at is None:
                    self._read(stream)
                elif events & (select.EPOLLHUP | select.EPOLLERR):
                    self._drop_the_rest(stream)  # held back, and its writer is gone
            now = time.monotonic()
            for stream in list(self._streams.values()):
                if stream.resume_at is not None and stream.resume_at <= now:
                    stream.resume_at = None
                    self._epoll.modify(stream.fd, select.EPOLLIN)

    def _take_new(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake)
        with self._lock:
            new, self._new = self._new, []
        for stream in new:
            self._streams[stream.fd] = stream
            self._epoll.register(stream.fd, select.EPOLLIN)

    def _read(self, stream: _Stream) -> None:
        now = time.monotonic()
        stream.tokens = min(stream.burst, stream.tokens + (now - stream.stamp) * stream.rate)
        stream.stamp = now
        try:
            data = os.read(stream.fd, max(1, min(self.CHUNK, int(stream.tokens))))
        except OSError:
            data = b""
        if not data:
            self._close(stream)
            return
        stream.tokens -= len(data)
        self._emit(stream, data)
        if stream.tokens < self.LONGEST_LINE:  # held back until a line's worth refills
            stream.resume_at = now + (self.LONGEST_LINE - stream.tokens) / stream.rate
            self._epoll.modify(stream.fd, 0)  # still tells us of a hang-up

    def _drop_the_rest(self, stream: _Stream) -> None:
        dropped = 0
        with contextlib.suppress(OSError):
            while chunk := os.read(stream.fd, self.CHUNK):
                dropped += len(chunk)
        self._emit(stream, f"\n({dropped} more bytes of output dropped)\n".encode())
        self._close(stream)

    def _close(self, stream: _Stream) -> None:
        self._emit(stream, b"\n" if stream.partial else b"")
        self._epoll.unregister(stream.fd)
        del self._streams[stream.fd]
        os.close(stream.fd)
        stream.done.set()

    def _emit(self, stream: _Stream, data: bytes) -> None:
        stream.partial += data
        *lines, rest = bytes(stream.partial).split(b"\n")
        if len(rest) > self.LONGEST_LINE:
            lines.append(rest)
            rest = b""
        stream.partial = bytearray(rest)
        if lines:
            out = b"".join(stream.prefix + line + b"\n" for line in lines)
            with contextlib.suppress(OSError):
                while out:
                    out = out[os.write(2, out) :]


_pump_instance: _OutputPump | None = None


def _pump() -> _OutputPump:
    global _pump_instance
    with _engine_lock:
        if _pump_instance is None:
            _pump_instance = _OutputPump()
        return _pump_instance


# --- inside the child -----------------------------------------------------------


class ParentGone(SystemExit):
    """The parent died (or dropped us) before or while this child ran."""


def confine_self(port_fd: int) -> tuple[str, ...]:
    """The layers a child applies to itself, first thing after exec: the
    parent-death signal (checked against a parent that died before it was
    set), not dumpable, and without bwrap no_new_privs and the seccomp
    filter. The layers applied; nothing if the child was not confined."""
    mode = os.environ.pop(MODE_VARIABLE, "")
    parent = os.environ.pop(PARENT_VARIABLE, "")
    if not mode:
        return ()
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if (mode == "self" and str(os.getppid()) != parent) or _hung_up(port_fd):
        raise ParentGone("vmbus child: the parent died before the child started")
    _prctl(PR_SET_DUMPABLE, 0)
    layers = [NOT_DUMPABLE, DIES_WITH_PARENT]
    if mode == "self":
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        layers.append(NO_NEW_PRIVS)
        with contextlib.suppress(OSError):  # no libseccomp: the parent warned
            load_seccomp(seccomp_filter(own_pid=os.getpid()))
            layers.append(SECCOMP)
    elif os.getpid() == 1:
        # pid 1 of its namespace ignores signals it has no handler for,
        # and the parent stops a child with SIGTERM.
        signal.signal(signal.SIGTERM, lambda *_: os._exit(128 + signal.SIGTERM))
    return tuple(layers)


def _hung_up(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLHUP | select.POLLRDHUP)
    return any(events & (select.POLLHUP | select.POLLRDHUP) for _, events in poller.poll(0))
