"""The zygote: `python -m vmbus._zygote CONTROL_FD PARENT_PID`, one per Host
process, that forks VM workers ready-made, as multiprocessing's forkserver
does. A worker started by exec spends a third of a second importing the
bus and the device packages; one forked from here has them already.

The zygote is single-threaded (fork copies only the calling thread, so it
must hold no other) and keeps no VM state. Over its control socket
(SOCK_SEQPACKET) the parent sends `fork` with four descriptors: the new
worker's control socket, the read end of the pipe its VM arrives on, and
the parent's stdout and stderr of the moment (the worker's own, as an
exec'd worker's would be); the zygote forks, answers `pid N`, and when a
worker ends reaps it and reports
`exit N CODE` (only a process's parent can read its exit status). It dies
with the parent; its workers die with it.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import pickle
import queue
import selectors
import signal
import socket
import subprocess
import sys
import threading

from vmbus import _seccomp as sc
from vmbus import _worker, sandbox

REQUEST_MAX = 64
FORK_FDS = 4  # a worker's control socket, its VM's pipe, stdout, stderr
ENABLE_VARIABLE = "VMBUS_WORKER_ZYGOTE"  # "0": every worker is exec'd afresh
FORK_SECONDS = 30.0
log = logging.getLogger("vmbus.partition")


def _fork(control: socket.socket, fds: list[int], ours: list[int]) -> None:
    """Fork a worker on `fds` (its control socket, its VM's pipe, and the
    parent's stdout and stderr as they are now, which it takes as its own,
    as an exec'd worker would); `ours` are the zygote's, which it closes."""
    worker_control, boot, stdout, stderr = fds
    zygote = os.getpid()
    pid = os.fork()
    if pid == 0:  # the worker
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for fd in ours:
                os.close(fd)
            for fd, onto in ((stdout, 1), (stderr, 2)):
                os.dup2(fd, onto)
                os.close(fd)
            os.setsid()  # a scheduling group of its own (autogroup), as an exec'd worker
            with os.fdopen(boot, "rb") as boot_file:
                code = _worker.run(worker_control, boot_file, zygote)
        except BaseException:
            logging.getLogger("vmbus.partition").exception("a forked worker failed")
        finally:
            os._exit(code)
    for fd in fds:
        os.close(fd)
    control.send(b"pid %d" % pid)


def _reap(control: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        control.send(b"exit %d %d" % (pid, os.waitstatus_to_exitcode(status)))


def main() -> int:
    control_fd, parent_pid = int(sys.argv[1]), int(sys.argv[2])
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        return _worker.EXIT_PARENT_GONE
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(format=_worker.LOG_FORMAT, level=logging.WARNING)
    path, modules = pickle.loads(sys.stdin.buffer.read())
    sys.path[:0] = [entry for entry in path if entry not in sys.path]
    # What the parent's devices are made of, imported once for every worker
    # (by name: the bus core imports no device package itself).
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as error:  # a worker imports it again and says why
            logging.getLogger("vmbus.partition").debug("zygote: %s: %s", name, error)
    control = socket.socket(fileno=control_fd)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # the wake-up fd is written
    with selectors.DefaultSelector() as selector:
        selector.register(control, selectors.EVENT_READ)
        selector.register(wake_r, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                if key.fd == wake_r:
                    while True:
                        try:
                            if not os.read(wake_r, 512):
                                break
                        except BlockingIOError:
                            break
                    _reap(control)
                    continue
                message, fds, _, _ = socket.recv_fds(control, REQUEST_MAX, FORK_FDS)
                if not message:
                    return 0  # the parent is gone: our workers follow by their signal
                if message == b"fork" and len(fds) == FORK_FDS:
                    _fork(control, fds, [control_fd, wake_r, wake_w, selector.fileno()])
                else:
                    for fd in fds:
                        os.close(fd)


if __name__ == "__main__":
    sys.exit(main())


# --- the parent's side ---------------------------------------------------------


class ForkedWorker:
    """A worker the zygote forked, as much of a Popen as ProcessPartition
    uses: its exit status comes from the zygote, which reaped it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._ended = threading.Event()
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except OSError:  # already reaped: its exit is on the way
            self._pidfd = None

    def end(self, code: int) -> None:
        self.returncode = code
        self._ended.set()
        if self._pidfd is not None:
            fd, self._pidfd = self._pidfd, None
            os.close(fd)

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, signo: int) -> None:
        fd = self._pidfd
        if fd is not None and self.returncode is None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(fd, signo)


class Zygote:
    """The parent's handle on its zygote; `Zygote.shared()` starts it once."""

    _shared: Zygote | None = None
    _lock = threading.Lock()

    @classmethod
    def shared(cls) -> Zygote | None:
        """This process's zygote (started on first use, again if it died);
        None where it is turned off or cannot start (workers are exec'd)."""
        if os.environ.get(ENABLE_VARIABLE, "1") == "0":
            return None
        with cls._lock:
            if cls._shared is None or not cls._shared.alive:
                try:
                    cls._shared = Zygote()
                except OSError as error:
                    log.warning("no zygote (%s): workers start by exec", error)
                    return None
            return cls._shared

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        modules = sorted(
            name for name in list(sys.modules) if name.split(".")[0] in ("vsp", "vmbus")
        )
        argv = [sys.executable, "-m", "vmbus._zygote", str(theirs.fileno()), str(os.getpid())]
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}  # numpy's pool: no thread to fork
        try:
            self.process = sandbox.on_lasting_thread(  # its death signal follows that thread
                lambda: subprocess.Popen(
                    argv, stdin=subprocess.PIPE, pass_fds=(theirs.fileno(),), env=env
                )
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        assert self.process.stdin is not None
        self.process.stdin.write(pickle.dumps((list(sys.path), modules)))
        self.process.stdin.close()
        self.sock = ours
        self.alive = True
        self._forks: queue.Queue[ForkedWorker | None] = queue.Queue()
        self._fork_lock = threading.Lock()
        self._workers: dict[int, ForkedWorker] = {}
        threading.Thread(target=self._read, name="vmbus-zygote", daemon=True).start()

    def fork(self, control: socket.socket, boot: int) -> ForkedWorker:
        """A worker on `control` (its end of the control socket) that reads
        its VM from the pipe end `boot`."""
        with self._fork_lock:
            # stdout and stderr as they are now: a worker's output goes where
            # ours does (a zygote keeps those it was started with).
            socket.send_fds(self.sock, [b"fork"], [control.fileno(), boot, 1, 2])
            try:
                worker = self._forks.get(timeout=FORK_SECONDS)
            except queue.Empty:
                worker = None
        if worker is None:
            raise OSError("the zygote did not fork a worker")
        return worker

    def _read(self) -> None:
        try:
            while message := self.sock.recv(REQUEST_MAX):
                words = message.split()
                if words[0] == b"pid":
                    worker = ForkedWorker(int(words[1]))
                    self._workers[worker.pid] = worker
                    self._forks.put(worker)
                elif words[0] == b"exit" and int(words[1]) in self._workers:
                    self._workers.pop(int(words[1])).end(int(words[2]))
        except (OSError, ValueError, IndexError) as error:
            log.warning("the zygote's report makes no sense: %s", error)
        finally:  # it died: so did every worker it forked
            self.alive = False
            for worker in self._workers.values():
                worker.end(-signal.SIGKILL)
            self._forks.put(None)
            self.sock.close()
            self.process.wait()
