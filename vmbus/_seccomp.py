"""The seccomp allow-list of a child partition, compiled by libseccomp.

libseccomp is the kernel's reference filter compiler and on every Debian
system (libseccomp2); we call its stable C API through ctypes (six
functions) rather than take a dependency on a Python binding or write BPF
by hand. The filter's default is EPERM; system calls of another ABI (i386,
x32) kill the process.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from typing import Any

# What a CPython child running numpy, threads, asyncio and this library
# needs (from strace of the test suite's children). Not on it, among
# others: socket (no new connections, not even to a Unix socket in a
# shared directory), connect, bind, ptrace, process_vm_*, mount, pivot_root,
# chroot, unshare, setns, bpf, perf_event_open, userfaultfd, io_uring_*,
# keyctl, memfd_create, pidfd_*, rt_sigqueueinfo, *_module, kexec_*.
_ALLOWED_GROUPS = (
    # descriptors and files (the mount namespace decides which files)
    "read write readv writev pread64 pwrite64 preadv pwritev preadv2 pwritev2 lseek",
    "close close_range dup dup2 dup3 flock fsync fdatasync ftruncate fallocate",
    "sendfile copy_file_range pipe pipe2 eventfd2",
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

# Allowed by argument. Not F_SETOWN/F_SETSIG nor FIOSETOWN/TIOCSPGRP: they
# would have the kernel signal another process for us.
_FCNTL = (0, 1, 2, 3, 4, 5, 6, 7, 9, 11, 36, 37, 38, 1030, 1031, 1032, 1033, 1034)
_IOCTL = (
    0x5401,  # TCGETS (isatty)
    0x802C542A,  # TCGETS2
    0x540F,  # TIOCGPGRP
    0x5413,  # TIOCGWINSZ
    0x541B,  # FIONREAD
    0x5421,  # FIONBIO
    0x5450,  # FIONCLEX
    0x5451,  # FIOCLEX
)
PR_SET_PDEATHSIG, PR_GET_DUMPABLE, PR_SET_DUMPABLE = 1, 3, 4
PR_CAPBSET_DROP, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS = 24, 22, 38
_PRCTL = (
    PR_SET_PDEATHSIG,
    2,  # PR_GET_PDEATHSIG
    PR_GET_DUMPABLE,
    15,  # PR_SET_NAME
    16,  # PR_GET_NAME
    PR_SET_NO_NEW_PRIVS,
    39,  # PR_GET_NO_NEW_PRIVS
    0x53564D41,  # PR_SET_VMA (glibc names its mappings)
)
_NEW_NAMESPACES = 0x7E020000  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET

_ALLOW = 0x7FFF0000
_EPERM, _ENOSYS = 1, 38
_EQ, _MASKED_EQ = 4, 7


def _errno(number: int) -> int:
    return 0x00050000 | number


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


# A child that runs a network stack of its own (sandbox.Policy.net_admin),
# in its own network namespace: sockets of any family, and the calls servers,
# ping and ip(8) make on them.
# ping(8) drops its capabilities with capset, PR_SET_KEEPCAPS and setuid
# to the uid it has (its user namespace maps no other).
_NETWORK_SYSCALLS = frozenset(
    "socket connect bind listen accept accept4 ioctl capset setuid setgid".split()  # noqa: SIM905
)
_NETWORK_PRCTL = (7, 8, 23)  # PR_GET_KEEPCAPS, PR_SET_KEEPCAPS, PR_CAPBSET_READ


def build_filter(own_pid: int | None, unix_sockets: bool = False, network: bool = False) -> bytes:
    """The allow-list as a BPF program (what `bwrap --seccomp` and
    `load_filter` take). With `own_pid` (a child without a PID namespace
    of its own), signals, rlimits and CPU affinity reach only itself; with
    None, anything in its own PID namespace. `unix_sockets` lets it create
    and connect Unix sockets (to any it can see); `network`, sockets of any
    family and any ioctl (for a child in a network namespace of its own).
    OSError without libseccomp."""
    lib = _libseccomp()
    ctx = lib.seccomp_init(_errno(_EPERM))
    if not ctx:
        raise OSError("seccomp_init failed")

    def rule(name: str, action: int = _ALLOW, *cmps: tuple[int, int, int, int]) -> None:
        number = lib.seccomp_syscall_resolve_name(name.encode())
        if number < 0:
            return  # not a system call of this architecture
        array = (_ArgCmp * max(1, len(cmps)))(*(_ArgCmp(*c) for c in cmps))
        if lib.seccomp_rule_add_array(ctx, action, number, len(cmps), array) < 0:
            raise OSError(f"seccomp: cannot add a rule for {name}")

    try:
        for name in sorted(ALLOWED_SYSCALLS):
            rule(name)
        for command in _FCNTL:
            rule("fcntl", _ALLOW, (1, _EQ, command, 0))
        for request in () if network else _IOCTL:
            rule("ioctl", _ALLOW, (1, _EQ, request, 0))
        for option in _PRCTL:
            rule("prctl", _ALLOW, (0, _EQ, option, 0))
        rule("prctl", _ALLOW, (0, _EQ, PR_SET_DUMPABLE, 0), (1, _EQ, 0, 0))  # never back to 1
        rule("clone", _ALLOW, (0, _MASKED_EQ, _NEW_NAMESPACES, 0))
        rule("clone3", _errno(_ENOSYS))  # its flags are out of reach: glibc falls back to clone
        if network:
            for name in sorted(_NETWORK_SYSCALLS):
                rule(name)
            for option in _NETWORK_PRCTL:
                rule("prctl", _ALLOW, (0, _EQ, option, 0))
        elif unix_sockets:
            rule("socket", _ALLOW, (0, _EQ, 1, 0))  # AF_UNIX
            rule("connect")
        for target in (0,) if own_pid is None else (0, own_pid):
            rule("prlimit64", _ALLOW, (0, _EQ, target, 0))
            rule("sched_setaffinity", _ALLOW, (0, _EQ, target, 0))
        if own_pid is None:
            for name in ("kill", "tgkill", "tkill"):
                rule(name)
        else:
            rule("kill", _ALLOW, (0, _EQ, own_pid, 0))
            rule("kill", _ALLOW, (0, _EQ, 0, 0))  # its own process group (its own session)
            rule("tgkill", _ALLOW, (0, _EQ, own_pid, 0))
        fd = os.memfd_create("vmbus-seccomp")
        try:
            if lib.seccomp_export_bpf(ctx, fd) < 0:
                raise OSError("seccomp_export_bpf failed")
            return os.pread(fd, os.lseek(fd, 0, os.SEEK_CUR), 0)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]  # noqa: RUF012


def load_filter(program: bytes) -> None:
    """Install a BPF program on this thread and the threads it starts."""
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(buffer))
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    prctl(PR_SET_SECCOMP, 2, ctypes.addressof(fprog))  # SECCOMP_MODE_FILTER


def drop_capabilities() -> None:
    """Give up every capability, for good (a root child without bwrap)."""
    with open("/proc/sys/kernel/cap_last_cap") as file:
        last = int(file.read())
    for capability in range(last + 1):
        with contextlib.suppress(PermissionError):  # not ours to drop: nor to gain
            prctl(PR_CAPBSET_DROP, capability)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable: none, twice 32 bits
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.capset(header, data) < 0:
        raise OSError(ctypes.get_errno(), "capset")


def prctl(option: int, arg: int = 0, arg3: int = 0) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, *[ctypes.c_ulong] * 4]
    result = int(libc.prctl(option, arg, arg3, 0, 0))
    if result < 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl({option}): {os.strerror(error)}")  # PermissionError: EPERM
    return result
