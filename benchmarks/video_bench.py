"""Video benchmarks: a child partition's Framebuffer streaming to the parent's
VideoVsp and Screen at 1024x768x32, a VNC client watching it, and a numpy
copy of the same frames in one process as the reference, in one run.

    python -m benchmarks.video_bench [--quick] [--repeats N] [--seconds S]
                                     [--only MEASURE ...] [--markdown FILE]

Every measurement is a window [t0, t1] on the shared monotonic clock: each
process (the child partition, the parent, the VNC client) counts what it did
inside it. Each round runs every measurement, alternating the order
(A B … B A …); the table gives medians over rounds and ratios taken within
each round (see /work/shared/BENCHMARKING.md). The Host stops the child
partition, and the VNC client process and server go, on any exit.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import platform
import random
import shlex
import signal
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import astuple, dataclass, field, replace
from multiprocessing.connection import Connection

import numpy as np
import numpy.typing as npt

from benchmarks.harness import CHILD_POLICY, render_table
from vmbus import guid
from vmbus._ringdefs import DESCRIPTOR_SIZE, TRAILER_SIZE
from vmbus.guest import Guest, GuestDevice
from vmbus.partition import ChildPartition, Host, wait_until
from vmbus.protocols import video as sv
from vsc.video import Framebuffer
from vsp.video import VideoVsp, rfb
from vsp.video.encodings import ENC_TIGHT
from vsp.video.screen import Rect, Screen
from vsp.video.vnc import VncServer

WIDTH, HEIGHT = 1024, 768
FRAME_BYTES = WIDTH * HEIGHT * 4
TILE = 64  # the small rectangles' side
BATCH = 64  # rectangles per update() in the batched measurement: one DIRT
CHILD_TARGET = "benchmarks.video_bench:video_child"  # importable even as __main__
TIMEOUT = 60.0
MIN_UPDATES = 3  # a VNC window lasts until the client has had at least this many
Pixels = npt.NDArray[np.uint8]

REFERENCE = "numpy copyto, one process"
FULL, RECT, RECTS = "full frames", "64×64 rects, 1 per update()", "64×64 rects, 64 per update()"
RAW, ZRLE = "VNC client, Raw", "VNC client, ZRLE"
TIGHT_JPEG, TIGHT_ZLIB = "VNC client, Tight-JPEG", "VNC client, Tight-zlib"
SENDALL = "loopback TCP sendall of a Raw update's bytes"
SENDALL_BUSY = SENDALL + ", child animating"
RAW_UPDATE_BYTES = 4 + 12 + FRAME_BYTES  # a FramebufferUpdate of one Raw full frame
QUALITY_6 = -26  # noVNC's default JPEG quality level
STATIC = "VNC client, Raw, idle child, full requests"
UNHOOKED = ", VNC server unhooked"
PER_DIRT = {FULL: 1, RECT: 1, RECTS: BATCH}  # items (frames or rectangles) per DIRT
ITEM_BYTES = {FULL: FRAME_BYTES, RECT: TILE * TILE * 4, RECTS: TILE * TILE * 4}


@dataclass(frozen=True)
class Settings:
    repeats: int
    seconds: float  # the measured window
    warmup: float  # from a measurement's start to its window
    tail: float = 0.1  # the child streams this long after the window
    child_nice: int = CHILD_POLICY.nice  # the child's CPU weight below the root (Policy.nice)


QUICK = Settings(repeats=3, seconds=0.5, warmup=0.2)
FULL_RUN = Settings(repeats=7, seconds=2.0, warmup=0.5)


@dataclass(frozen=True)
class Window:
    """A measurement's marks on time.monotonic(), the same clock in every process."""

    t0: float
    t1: float
    end: float

    @classmethod
    def starting(cls, settings: Settings) -> Window:
        t0 = time.monotonic() + settings.warmup
        return cls(t0, t0 + settings.seconds, t0 + settings.seconds + settings.tail)


@dataclass
class Tally:
    items: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class Reading:
    """What one process counted in the window, per second; CPU in cores busy."""

    items: float
    bytes: float
    cpu: float
    new: float | None = None  # the VNC client's Raw full frames with a new stamp, /s
    torn: float | None = None  # the share of them whose corner stamps differ


def run_window(
    step: Callable[[Tally], None], window: Window, stop: float, min_items: int = 1
) -> tuple[int, Reading]:
    """Call `step` until `stop`: (items in all, rates between the first step
    boundaries at or after t0 and after t1 with `min_items` done in between)."""
    tally = Tally()
    marks: list[tuple[float, int, int, float]] = []  # (time, items, bytes, CPU seconds)
    while True:
        now = time.monotonic()
        first = not marks and now >= window.t0
        if first or len(marks) == 1 and now >= window.t1 and tally.items - marks[0][1] >= min_items:
            marks.append((now, tally.items, tally.bytes, time.process_time()))
        if len(marks) == 2 and now >= stop:
            break
        step(tally)
    (a, ia, ba, ca), (b, ib, bb, cb) = marks
    return tally.items, Reading((ib - ia) / (b - a), (bb - ba) / (b - a), (cb - ca) / (b - a))


def frames(width: int, height: int) -> list[Pixels]:
    """Two different full frames, their stamp pixels (two corners) black."""
    y, x = np.mgrid[0:height, 0:width]
    out = []
    for seed in (1, 2):
        frame = np.zeros((height, width, 4), np.uint8)
        frame[..., 0] = (x * 7 + seed) % 256
        frame[..., 1] = (y * 5 + seed * 40) % 256
        frame[..., 2] = (x + y + seed * 3) % 256
        frame[0, 0] = frame[-1, -1] = 0
        out.append(frame)
    return out


# --- the child partition ---------------------------------------------------------


class Streamer:
    """The child's drawing: each step draws and sends one DIRT."""

    def __init__(self, fb: Framebuffer, seed: int = 1) -> None:
        self.fb, self.frames = fb, frames(fb.width, fb.height)
        self.words = fb.pixels.view(np.uint32)[..., 0]  # (h, w) pixels as numbers
        self.tiles = [np.full((TILE, TILE, 4), c, np.uint8) for c in (0x40, 0xC0)]
        rng = random.Random(seed)
        self.places = [
            (rng.randrange(fb.width - TILE), rng.randrange(fb.height - TILE)) for _ in range(4096)
        ]
        self.count = 0

    def full(self, tally: Tally) -> None:
        """A new frame, stamped with its number in two opposite corners."""
        self.count += 1
        np.copyto(self.fb.pixels, self.frames[self.count & 1])
        self.words[0, 0] = self.words[-1, -1] = self.count
        self.fb.update()
        tally.items += 1
        tally.bytes += FRAME_BYTES

    def rects(self, n: int) -> Callable[[Tally], None]:
        def step(tally: Tally) -> None:
            rects = []
            for _ in range(n):
                self.count += 1
                x, y = self.places[self.count % len(self.places)]
                self.fb.pixels[y : y + TILE, x : x + TILE] = self.tiles[self.count & 1]
                rects.append((x, y, x + TILE, y + TILE))
            self.fb.update(*rects)
            tally.items += n
            tally.bytes += n * TILE * TILE * 4

        return step


def video_child(guest: Guest, address: str) -> None:
    """Child partition: run each (measurement, window, hold) the parent sends,
    past the window's end until the parent says so if `hold`; answer (items
    sent in all, its Reading)."""
    devices: list[GuestDevice] = []
    guest.register(guid.SYNTHVID, devices.append)
    fb = Framebuffer(devices[0], WIDTH, HEIGHT)
    fb.wait_ready()
    streamer = Streamer(fb)
    steps = {FULL: streamer.full, RECT: streamer.rects(1), RECTS: streamer.rects(BATCH)}
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(address)
    control = Connection(sock.detach())
    with contextlib.suppress(EOFError):
        for name, marks, hold in iter(control.recv, None):
            window, more = Window(*marks), Tally()
            sent, reading = run_window(steps[name], window, window.end)
            while hold and not control.poll():
                steps[name](more)
            if hold:
                control.recv()
            control.send((sent + more.items, astuple(reading)))
    fb.close()
    guest.unload()


# --- the VNC client (a process of its own) ---------------------------------------


class RfbClient:
    """A minimal RFB 3.8 viewer: security None, one encoding, the server's 32 bpp."""

    def __init__(self, sock: socket.socket, encodings: Sequence[int]) -> None:
        self.sock = sock
        self.inflate = zlib.decompressobj()  # one zlib stream per connection
        self.tight = [zlib.decompressobj() for _ in range(4)]  # Tight's four streams
        if self.exact(12)[:4] != b"RFB ":
            raise ConnectionError("not an RFB server")
        sock.sendall(b"RFB 003.008\n")
        if 1 not in self.exact(self.exact(1)[0]):
            raise ConnectionError("the server offers no security None")
        sock.sendall(b"\x01")
        if self.exact(4) != bytes(4):
            raise ConnectionError("security failed")
        sock.sendall(b"\x01")  # ClientInit: shared
        self.width, self.height = struct.unpack(">HH", self.exact(4))
        self.exact(16)  # the pixel format: the frame's own XRGB8888, kept
        self.exact(struct.unpack(">I", self.exact(4))[0])  # the desktop's name
        n = len(encodings)
        sock.sendall(struct.pack(f">BxH{n}i", 2, n, *encodings))  # SetEncodings
        self.buffer = memoryview(bytearray(2 * self.width * self.height * 4 + 4096))
        self.frames = self.new = self.torn = self.stamp = 0  # Raw full frames, their stamps

    def exact(self, n: int, into: memoryview | None = None) -> bytes:
        """Read `n` bytes: into `into` (returns b""), or as bytes."""
        view = memoryview(bytearray(n)) if into is None else into[:n]
        got = 0
        while got < n:
            chunk = self.sock.recv_into(view[got:], n - got)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            got += chunk
        return b"" if into is not None else bytes(view)

    def request(self, incremental: bool) -> None:
        self.sock.sendall(struct.pack(">BBHHHH", 3, incremental, 0, 0, self.width, self.height))

    def update(self) -> int:
        """Read one FramebufferUpdate, inflating compressed data; its bytes on the wire."""
        kind, count = struct.unpack(">BxH", self.exact(4))
        if kind != 0:
            raise ConnectionError(f"unexpected server message {kind}")
        wire = 4
        for _ in range(count):
            _, _, w, h, encoding = struct.unpack(">HHHHi", self.exact(12))
            if encoding == rfb.ENC_RAW:
                self.exact(w * h * 4, self.buffer)
                wire += 12 + w * h * 4
                if (w, h) == (WIDTH, HEIGHT):
                    self.stamps()
            elif encoding == ENC_TIGHT:
                wire += 12 + self.tight_rect(w, h)
            else:
                (length,) = struct.unpack(">I", self.exact(4))
                self.exact(length, self.buffer)
                self.inflate.decompress(self.buffer[:length])
                wire += 16 + length
        return wire

    def stamps(self) -> None:
        """Count a Raw full frame: new if its stamp is, torn if its corners differ."""
        words = self.buffer[:FRAME_BYTES].cast("I")
        top, bottom = words[0], words[WIDTH * HEIGHT - 1]
        self.frames += 1
        self.new += bottom != self.stamp
        self.torn += top != bottom
        self.stamp = bottom

    def compact(self) -> tuple[int, int]:
        """Tight's compact length, and the bytes it took."""
        n = 0
        for k, shift in enumerate((0, 7, 14)):
            byte = self.exact(1)[0]
            n |= (byte & (0x7F if shift < 14 else 0xFF)) << shift
            if shift == 14 or not byte & 0x80:
                return n, k + 1
        raise AssertionError("unreachable")

    def tight_rect(self, w: int, h: int) -> int:
        """One Tight rectangle's data (zlib inflated, JPEG read but not decoded); its bytes."""
        control = self.exact(1)[0]
        for stream in range(4):  # the server never resets them, but a client obeys
            if control & (1 << stream):
                self.tight[stream] = zlib.decompressobj()
        kind = control >> 4
        if kind == 8:  # fill: one TPIXEL
            self.exact(3)
            return 4
        if kind != 9 and w * h * 3 < 12:
            self.exact(w * h * 3)
            return 1 + w * h * 3
        length, took = self.compact()
        self.exact(length, self.buffer)
        if kind != 9:
            self.tight[kind & 3].decompress(self.buffer[:length])
        return 1 + took + length


def watch(
    port: int, encodings: Sequence[int], incremental: bool, window: Window
) -> tuple[int, Reading]:
    """One update request at a time until t1 and MIN_UPDATES: (updates, wire Reading)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        client = RfbClient(sock, encodings)
        client.request(incremental=False)

        def step(tally: Tally) -> None:
            tally.bytes += client.update()
            tally.items += 1
            client.request(incremental)

        items, reading = run_window(step, window, window.t1, MIN_UPDATES)
        if not client.frames:
            return items, reading
        new, torn = client.new / client.frames, client.torn / client.frames
        return items, replace(reading, new=reading.items * new, torn=torn)


def copies(window: Window) -> tuple[int, Reading]:
    """The reference: np.copyto of two frames into a third, alternately."""
    pair = frames(WIDTH, HEIGHT)
    target = np.zeros_like(pair[0])

    def step(tally: Tally) -> None:
        np.copyto(target, pair[tally.items & 1])
        tally.items += 1
        tally.bytes += FRAME_BYTES

    return run_window(step, window, window.t1)


def sendall_client(port: int, window: Window) -> tuple[int, Reading]:
    """The baseline's viewer: a 10-byte request, then a Raw update's bytes, read."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        buffer = memoryview(bytearray(RAW_UPDATE_BYTES))
        request = struct.pack(">BBHHHH", 3, 1, 0, 0, WIDTH, HEIGHT)

        def step(tally: Tally) -> None:
            sock.sendall(request)
            got = 0
            while got < RAW_UPDATE_BYTES:
                chunk = sock.recv_into(buffer[got:], RAW_UPDATE_BYTES - got)
                if not chunk:
                    raise ConnectionError("the sender closed")
                got += chunk
            tally.items += 1
            tally.bytes += RAW_UPDATE_BYTES

        return run_window(step, window, window.t1, MIN_UPDATES)


def client_main(control: Connection) -> None:
    """The VNC client's process, which also runs the reference copy: each
    ("watch", port, encoding, incremental, marks) or ("copy", marks) the
    parent sends, answered (items, Reading). The reference runs here so that
    its big temporary arrays do not change the parent's malloc thresholds."""
    with contextlib.suppress(EOFError):
        for kind, *args in iter(control.recv, None):
            if kind == "copy":
                items, reading = copies(Window(*args[0]))
            elif kind == "sendall":
                items, reading = sendall_client(args[0], Window(*args[1]))
            else:
                port, encoding, incremental, marks = args
                items, reading = watch(port, encoding, incremental, Window(*marks))
            control.send((items, astuple(reading)))


# --- the parent ------------------------------------------------------------------


class FrameWatch:
    """A Screen listener: the stamps of each full frame the parent shows.
    Paused while a VNC client watches: the Screen's thread that calls it
    would take the VNC server's CPU and GIL (the client counts stamps then)."""

    def __init__(self, screen: Screen) -> None:
        self.screen, self.last, self.new, self.torn = screen, 0, 0, 0
        self.corners = [(0, 0, 1, 1), (WIDTH - 1, HEIGHT - 1, WIDTH, HEIGHT)]
        screen.add_listener(self)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.screen.remove_listener(self)
        try:
            yield
        finally:
            self.screen.add_listener(self)

    def __call__(self, rects: list[Rect]) -> None:
        if rects != [(0, 0, WIDTH, HEIGHT)]:
            return
        top, bottom = self.screen.capture(self.corners, self.screen.geometry()[0]).pixels
        stamp = int(bottom.view(np.uint32)[0, 0, 0])  # the copy's last pixel: its newest
        self.torn += stamp != int(top.view(np.uint32)[0, 0, 0])
        self.new += stamp != self.last
        self.last = stamp


@dataclass(frozen=True)
class Sample:
    """One measurement: the row's items/s (frames, rectangles or VNC updates),
    the pixel bytes/s they carry, and what else was counted meanwhile."""

    rate: float
    pixels: float
    wire: float | None = None  # VNC bytes/s
    sent: float | None = None  # the child's items/s
    shown: float | None = None  # the parent's items/s
    new: float | None = None  # shown full frames with a new stamp, /s
    torn: float | None = None  # share of shown full frames whose corner stamps differ
    lag: float | None = None  # seconds of showing the DIRTs queued in the ring at t1
    vnc_faults: float | None = None  # the VNC server thread's minor page faults /s
    vnc_sys: float | None = None  # the share of its CPU time spent in the kernel
    cpu: dict[str, float] = field(default_factory=dict)  # cores busy, by role


@dataclass(frozen=True)
class Counters:
    """The parent's counters at one moment."""

    time: float
    frames: int  # DIRTs shown
    new: int
    torn: int
    queued: int  # bytes of packets in the ring from the child
    cpu: dict[str, float]  # CPU seconds by thread
    vnc: tuple[int, int, int]  # the VNC thread's minor faults, user and system CPU ticks

    def rates(self, later: Counters) -> dict[str, float]:
        span = later.time - self.time
        return {role: (later.cpu[role] - self.cpu[role]) / span for role in self.cpu}

    def vnc_rates(self, later: Counters) -> dict[str, float | None]:
        """The VNC thread's faults/s and share of its CPU in the kernel."""
        faults, user, system = (x - y for x, y in zip(later.vnc, self.vnc, strict=True))
        share = system / (user + system) if user + system else None
        return {"vnc_faults": faults / (later.time - self.time), "vnc_sys": share}


def encode_helpers_cpu() -> float:
    """CPU seconds of the VNC server's encoding helpers (Tight's bands), which
    count with its thread: they live as long as the server."""
    total = 0.0
    for thread in threading.enumerate():
        if thread.name.startswith("vnc-encode") and thread.ident is not None:
            with contextlib.suppress(OSError):
                total += time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    return total


def task_stat(native_id: int) -> tuple[int, int, int]:
    """A thread's minor page faults, user and system CPU ticks, from /proc."""
    with open(f"/proc/self/task/{native_id}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[7]), int(fields[11]), int(fields[12])


def dirt_packet_bytes(rects: int) -> int:
    """A DIRT with `rects` rectangles in the ring: descriptor, payload (8-aligned), trailer."""
    payload = len(sv.SynthvidClient().dirt(*[(0, 0, 1, 1)] * rects))
    return DESCRIPTOR_SIZE + -(-payload // 8) * 8 + TRAILER_SIZE


class Bench:
    """The parent's side: the VideoVsp on a Screen, a VNC server, the child
    partition and the VNC client process, each with a control connection."""

    def __init__(self, host: Host, settings: Settings, workdir: str) -> None:
        self.settings = settings
        self.screen = Screen(WIDTH, HEIGHT)
        self.video = VideoVsp(self.screen)  # served in the VM's worker process
        self.watch = FrameWatch(self.screen)
        self.vnc = VncServer(self.screen, port=0, authenticate=False)  # its viewer speaks None
        self.cleanup = contextlib.ExitStack()  # undone in reverse on close() or a failed start
        try:
            self._start(host, workdir)
        except BaseException:
            self.cleanup.close()
            raise

    def _start(self, host: Host, workdir: str) -> None:
        self.vnc.start()
        self.cleanup.callback(self.vnc.stop)
        spawn = mp.get_context("spawn")
        self.client_control, theirs = spawn.Pipe()
        self.client = spawn.Process(target=client_main, args=(theirs,), daemon=True)
        self.client.start()
        theirs.close()
        self.cleanup.callback(self._end_client)
        address = os.path.join(workdir, "control")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(address)
            listener.listen(1)
            listener.settimeout(TIMEOUT)
            self.child: ChildPartition = host.start(
                CHILD_TARGET,
                devices=[self.video],
                args=(address,),
                policy=replace(CHILD_POLICY, nice=self.settings.child_nice),
            )
            self.cleanup.callback(self._end_child)
            sock, _ = listener.accept()
        sock.settimeout(None)
        self.control = Connection(sock.detach())
        # The VNC server's thread is private; its CPU clock is what we need.
        # The worker is a process: its CPU comes from /proc (worker_cpu).
        assert self.vnc._thread is not None and self.vnc._thread.ident is not None
        self.clocks = {"vnc": time.pthread_getcpuclockid(self.vnc._thread.ident)}
        assert self.vnc._thread is not None and self.vnc._thread.native_id is not None
        self.vnc_tid = self.vnc._thread.native_id

    def counters(self, at: float) -> Counters:
        """Sleep until `at`; the parent's counters then."""
        time.sleep(max(0.0, at - time.monotonic()))
        stats = self.child.device_stats()[0]  # from the worker: a JSON round trip
        cpu = {role: time.clock_gettime(clock) for role, clock in self.clocks.items()}
        cpu["vnc"] += encode_helpers_cpu()
        return Counters(
            time.monotonic(),
            int(stats["frames"]),
            self.watch.new,
            self.watch.torn,
            int(stats.get("queued_bytes", 0)),
            cpu | {"worker": self.child.worker_cpu()},
            task_stat(self.vnc_tid),
        )

    def shown(self) -> int:
        return int(self.child.device_stats()[0]["frames"])

    def stream(self, name: str, unhook_vnc: bool = False) -> Sample:
        """The child streams `name` through a window: what the parent showed.
        `unhook_vnc`: the VNC server hears nothing of the Screen meanwhile."""
        if not unhook_vnc:
            return self._stream(name, Window.starting(self.settings), None)[0]
        self.vnc.hooked = False
        try:
            return self._stream(name, Window.starting(self.settings), None)[0]
        finally:
            self.vnc.hooked = True

    def vnc_stream(self, *encodings: int) -> Sample:
        """The child streams full frames while the VNC client watches."""
        window = Window.starting(self.settings)
        port = self.vnc.address[1]
        self.client_control.send(("watch", port, encodings, True, astuple(window)))
        with self.watch.paused():
            shown, seen = self._stream(FULL, window, self.client_control)
        assert seen is not None
        return replace(
            shown,
            rate=seen.items,
            pixels=seen.items * FRAME_BYTES,
            wire=seen.bytes,
            new=seen.new,
            torn=seen.torn,
            cpu=shown.cpu | {"client": seen.cpu},
        )

    def _stream(
        self, name: str, window: Window, client: Connection | None
    ) -> tuple[Sample, Reading | None]:
        base, per = self.shown(), PER_DIRT[name]
        self.control.send((name, astuple(window), client is not None))
        a, b = self.counters(window.t0), self.counters(window.t1)
        seen = None
        if client is not None:  # the child streams on until the client is done
            seen = receive(client, "the VNC client")[1]
            self.control.send("stop")
        sent, child = receive(self.control, "the child partition")
        if not wait_until(lambda: self.shown() >= base + sent // per, TIMEOUT):
            raise TimeoutError("the parent did not show every update")
        span, full = b.time - a.time, name == FULL
        dirts = (b.frames - a.frames) / span
        return (
            Sample(
                dirts * per,
                dirts * per * ITEM_BYTES[name],
                sent=child.items,
                shown=dirts * per,
                new=(b.new - a.new) / span if full else None,
                torn=(b.torn - a.torn) / max(1, b.frames - a.frames) if full else None,
                lag=b.queued / dirt_packet_bytes(per) / dirts if dirts else None,
                cpu=a.rates(b) | {"child": child.cpu},
                **a.vnc_rates(b),
            ),
            seen,
        )

    def static(self) -> Sample:
        """The VNC client asks for the whole (unchanging) screen, one request at a time."""
        window = Window.starting(self.settings)
        port = self.vnc.address[1]
        self.client_control.send(("watch", port, (rfb.ENC_RAW,), False, astuple(window)))
        a, b = self.counters(window.t0), self.counters(window.t1)
        seen = receive(self.client_control, "the VNC client")[1]
        cpu = a.rates(b) | {"client": seen.cpu}
        return Sample(seen.items, seen.items * FRAME_BYTES, seen.bytes, cpu=cpu, **a.vnc_rates(b))

    def sendall(self, animate: bool = False) -> Sample:
        """The Raw baseline: the same bytes per request (a Raw update of one
        of the child's frames) through a plain loopback TCP socket, sendall
        from a thread of this process, as the VNC server's. `animate`: while
        the child streams full frames, as it does for the VNC rows."""
        window = Window.starting(self.settings)
        frame = frames(WIDTH, HEIGHT)[0].view(np.uint32) | np.uint32(0xFF000000)
        header = struct.pack(">BxHHHHHi", 0, 1, 0, 0, WIDTH, HEIGHT, rfb.ENC_RAW)
        payload = header + frame.tobytes()
        assert len(payload) == RAW_UPDATE_BYTES
        base = self.shown()
        if animate:  # the child streams until the client is done
            self.control.send((FULL, astuple(window), True))
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.settimeout(TIMEOUT)
            self.client_control.send(("sendall", listener.getsockname()[1], astuple(window)))
            sock, _ = listener.accept()
        marks: list[tuple[float, float]] = []  # (time, the thread's CPU) at t0 and t1

        def serve() -> None:
            with sock, contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                while sock.recv(10):
                    now = time.monotonic()
                    if len(marks) < 2 and now >= (window.t0, window.t1)[len(marks)]:
                        marks.append((now, time.thread_time()))
                    sock.sendall(payload)

        sender = threading.Thread(target=serve, name="sendall", daemon=True)
        sender.start()
        seen = receive(self.client_control, "the sendall client")[1]
        sender.join(TIMEOUT)
        cpu = {"client": seen.cpu}
        if animate:
            self.control.send("stop")
            sent, child = receive(self.control, "the child partition")
            cpu["child"] = child.cpu
            if not wait_until(lambda: self.shown() >= base + sent, TIMEOUT):
                raise TimeoutError("the parent did not show every update")
        if len(marks) == 2:
            (t0, c0), (t1, c1) = marks
            cpu["vnc"] = (c1 - c0) / (t1 - t0)
        return Sample(seen.items, seen.items * FRAME_BYTES, seen.bytes, cpu=cpu)

    def reference(self) -> Sample:
        """The numpy copy, in the client's process (nothing else runs meanwhile)."""
        window = Window.starting(self.settings)
        self.client_control.send(("copy", astuple(window)))
        reading = receive(self.client_control, "the reference copy")[1]
        return Sample(reading.items, reading.bytes, cpu={"client": reading.cpu})

    def _end_client(self) -> None:
        with contextlib.suppress(OSError):
            self.client_control.send(None)
        self.client_control.close()
        self.client.join(5)
        if self.client.is_alive():
            self.client.kill()
            self.client.join(5)

    def _end_child(self) -> None:
        control = getattr(self, "control", None)
        if control is not None:
            with contextlib.suppress(OSError):
                control.send(None)
            control.close()
        if self.child.wait(10) is None:
            self.child.stop()

    def close(self) -> None:
        self.cleanup.close()


def receive(control: Connection, who: str) -> tuple[int, Reading]:
    if not control.poll(TIMEOUT):
        raise TimeoutError(f"{who} sent no result")
    items, reading = control.recv()  # plain tuples: classes of __main__ do not unpickle
    return int(items), Reading(*reading)


# --- the runner ------------------------------------------------------------------

Results = dict[str, list[Sample]]  # by measurement, one per round
ALL = [
    REFERENCE,
    FULL,
    FULL + UNHOOKED,
    RECT,
    RECT + UNHOOKED,
    RECTS,
    SENDALL,
    SENDALL_BUSY,
    RAW,
    ZRLE,
    TIGHT_ZLIB,
    TIGHT_JPEG,
    STATIC,
]


def measure(settings: Settings, workdir: str, names: Sequence[str]) -> Results:
    with Host() as host:
        bench = Bench(host, settings, workdir)
        try:
            jobs: dict[str, Callable[[], Sample]] = {
                REFERENCE: bench.reference,
                FULL: lambda: bench.stream(FULL),
                FULL + UNHOOKED: lambda: bench.stream(FULL, unhook_vnc=True),
                RECT: lambda: bench.stream(RECT),
                RECT + UNHOOKED: lambda: bench.stream(RECT, unhook_vnc=True),
                RECTS: lambda: bench.stream(RECTS),
                SENDALL: bench.sendall,
                SENDALL_BUSY: lambda: bench.sendall(animate=True),
                RAW: lambda: bench.vnc_stream(rfb.ENC_RAW),
                ZRLE: lambda: bench.vnc_stream(rfb.ENC_ZRLE),
                TIGHT_ZLIB: lambda: bench.vnc_stream(ENC_TIGHT),
                TIGHT_JPEG: lambda: bench.vnc_stream(ENC_TIGHT, QUALITY_6),
                STATIC: bench.static,
            }
            order = [n for n in ALL if n in names]
            results: Results = {name: [] for name in order}
            for index in range(settings.repeats):
                for name in order if index % 2 == 0 else reversed(order):
                    results[name].append(jobs[name]())
        finally:
            bench.close()
    return results


# --- the table -------------------------------------------------------------------


def median(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def fmt(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


HEADERS = [
    "measure",
    "rate /s",
    "min–max",
    "pixel MB/s",
    "× numpy copy",
    "child sent /s",
    "parent shown /s",
    "new frames /s, torn",
    "queue at t1, ms",
    "wire MB/s",
    "wire KB/update",
    "VNC thread faults/update, sys",
    "CPU % child, worker, VNC, client",
    "CPU µs/item child, parent",
]
LEGEND = (
    "Rate: the parent's DIRTs shown (× rectangles per DIRT), or the VNC client's "
    "FramebufferUpdates received (one request at a time, compressed data inflated), or the "
    "numpy copies. New frames: shown full frames carrying a new stamp (the child numbers "
    "each frame in two corners, the top left first; new: the bottom right one); torn: shown "
    "frames whose two stamps differ (a copy that read the guest's next frame as it drew); "
    "in the VNC "
    "rows, the Raw frames the client received (the parent's own count is paused there: its "
    "listener thread would take the VNC server's CPU). Queue: the "
    "DIRTs waiting in the ring at the window's end, in milliseconds of showing. CPU %: "
    "cores busy in the window (the child partition; the parent's worker and VNC server "
    "threads, the server's encoding helpers with its thread; the VNC client's process, "
    "which also runs the numpy copy); µs/item: CPU per "
    "row item of the child and of the thread that serves the row (the worker, the VNC "
    "server, or the numpy copy's process). Unhooked: "
    "the VNC server's Screen listener removed for the measurement. VNC thread: its minor "
    "page faults per update received, and the share of its CPU time spent in the kernel. "
    "The child's video device is served by the VM's worker process (its CPU is the worker "
    "column); the VNC client inflates zlib data but does not decode JPEG. The sendall row: "
    "the same request and the same bytes as a Raw update, through a plain TCP socket from "
    "a thread of the parent (its CPU is in the VNC column); with the child animating: while "
    "the child streams full frames to the worker, as in the VNC client rows."
)
UNITS = {REFERENCE: "frames", FULL: "frames", RECT: "rects", RECTS: "rects"}
ROLES = ("child", "worker", "vnc", "client")


def per_item(samples: list[Sample], role: str) -> float | None:
    return median(s.cpu[role] / s.rate * 1e6 if role in s.cpu and s.rate else None for s in samples)


def vnc_faults(samples: list[Sample]) -> str:
    faults = median(s.vnc_faults / s.rate if s.vnc_faults is not None else None for s in samples)
    system = median(s.vnc_sys for s in samples)
    return f"{fmt(faults)}, {fmt(system and system * 100)} %"


def row(name: str, samples: list[Sample], reference: list[Sample] | None) -> list[str]:
    rates = [s.rate for s in samples]
    ratio = None
    if reference:
        ratio = median(s.pixels / r.pixels for s, r in zip(samples, reference, strict=True))
    new, torn, lag = (median(getattr(s, k) for s in samples) for k in ("new", "torn", "lag"))
    cpu = [median(s.cpu.get(role) for s in samples) for role in ROLES]
    served_by_vnc = name.startswith("VNC") or name.startswith(SENDALL)
    parent = "client" if name == REFERENCE else "vnc" if served_by_vnc else "worker"
    kind = name.removesuffix(UNHOOKED)
    child = per_item(samples, "child") if kind in PER_DIRT else None
    return [
        name,
        f"{statistics.median(rates):,.0f} {UNITS.get(kind, 'updates')}",
        f"{min(rates):,.0f}–{max(rates):,.0f}",
        fmt(median(s.pixels / 1e6 for s in samples)),
        "—" if ratio is None else f"{ratio:.3g}",
        fmt(median(s.sent for s in samples)),
        fmt(median(s.shown for s in samples)),
        "—" if new is None or torn is None else f"{new:,.0f}, {torn * 100:.1f} %",
        fmt(lag and lag * 1e3, 1),
        fmt(median(s.wire and s.wire / 1e6 for s in samples)),
        fmt(median(s.wire and s.rate and s.wire / s.rate / 1e3 for s in samples), 1),
        vnc_faults(samples) if name.startswith("VNC") else "—",
        ", ".join(fmt(c and c * 100) for c in cpu),
        f"{fmt(child, 1)}, {fmt(per_item(samples, parent), 1)}",
    ]


def render(rows: list[list[str]], markdown: bool) -> str:
    return render_table(HEADERS, rows, markdown, labels=1)


def report(settings: Settings, command: str, names: Sequence[str]) -> tuple[str, str]:
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="video-bench-") as tmp:
        results = measure(settings, tmp, names)
    reference = results.get(REFERENCE)
    rows = [row(name, samples, reference) for name, samples in results.items()]
    notes = []
    for baseline, label in ((SENDALL, ""), (SENDALL_BUSY, ", the child animating in both")):
        if RAW in results and baseline in results:  # within each round, then the median
            ratio = median(
                r.rate / b.rate if b.rate else None
                for r, b in zip(results[RAW], results[baseline], strict=True)
            )
            what = f"plain loopback TCP sendall of the same bytes{label}"
            notes.append(f"Raw updates ÷ {what}: {fmt(ratio, 2)}")
    header = (
        f"`{command}`: {os.cpu_count()} CPUs, Linux {platform.release()}, Python "
        f"{platform.python_version()}, load average {load:.1f} → {os.getloadavg()[0]:.1f}; "
        f"{WIDTH}×{HEIGHT}×32, the child at nice {settings.child_nice}; {settings.repeats} "
        f"interleaved rounds, {settings.seconds:g} s windows; medians, and ratios of pixel "
        "bytes/s to the numpy copy's within each round."
    )
    text, markdown = (
        "\n\n".join([header, render(rows, md), *notes, LEGEND]) for md in (False, True)
    )
    return text, markdown


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short measurements (< 30 s)")
    parser.add_argument("--repeats", type=int, help="rounds (default 3 quick, 7 full)")
    parser.add_argument("--seconds", type=float, help="seconds per measured window")
    parser.add_argument("--only", action="append", choices=ALL, help="these measurements only")
    parser.add_argument(
        "--malloc-warm",
        action="store_true",
        help="free a 16 MiB block first: glibc's malloc then keeps the VNC server's 3 MiB buffers",
    )
    parser.add_argument(
        "--child-nice",
        type=int,
        default=CHILD_POLICY.nice,
        help=f"the child partition's nice value (default {CHILD_POLICY.nice}; 0: the root's share)",
    )
    parser.add_argument("--markdown", metavar="FILE", help="also write the result as Markdown")
    args = parser.parse_args(argv)
    if args.malloc_warm:  # freeing an mmap()ed block raises glibc's mmap and trim thresholds
        np.empty(16 << 20, np.uint8)
    base = QUICK if args.quick else FULL_RUN
    settings = Settings(
        args.repeats or base.repeats,
        args.seconds or base.seconds,
        base.warmup,
        child_nice=args.child_nice,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanups on SIGTERM
    words = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "-m", "benchmarks.video_bench", *words])
    text, markdown = report(settings, command, args.only or ALL)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as out:
            out.write(markdown + "\n")


if __name__ == "__main__":
    main()
