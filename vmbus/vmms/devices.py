"""A VM definition's devices, built: each DeviceSpec becomes the Vsp that
serves it. A fresh Vsp every start (a device's state is its run's)."""

from __future__ import annotations

from vmbus.device import Vsp
from vmbus.vmms.config import DeviceSpec
from vsp.echo import EchoVsp
from vsp.ic import HeartbeatVsp, KvpVsp, ShutdownVsp, TimeSyncVsp
from vsp.input import KeyboardVsp, MouseVsp
from vsp.net import LearningSwitch, NetVsp, TapBackend
from vsp.storage import RamBackend, RawFileBackend, StorVsp
from vsp.video import Screen, VideoVsp

__all__ = ["build"]

MiB = 1 << 20


def build(spec: DeviceSpec, switch: LearningSwitch) -> Vsp:
    """The Vsp of `spec`; OSError if its backend cannot be opened (a disk
    image that is not there, a TAP device without the right)."""
    options = spec.options
    if spec.kind == "disk":
        size = options.get("size_mb")
        backend = RawFileBackend(
            options["path"],
            size=None if size is None else size * MiB,
            create=size is not None,
            read_only=options["read_only"],
        )
        return StorVsp([backend])
    if spec.kind == "ramdisk":
        return StorVsp([RamBackend(options["size_mb"] * MiB)])
    if spec.kind == "net":
        if options["backend"] == "tap":
            tap = TapBackend(options["tap"], address=options.get("address"), vnet_hdr=True)
            return NetVsp(tap)
        return NetVsp(switch.port())
    if spec.kind == "video":
        return VideoVsp(Screen(options["width"], options["height"]))
    if spec.kind == "heartbeat":
        return HeartbeatVsp(interval=options["interval"])
    if spec.kind == "timesync":
        return TimeSyncVsp(interval=options["interval"])
    simple: dict[str, type[Vsp]] = {
        "keyboard": KeyboardVsp,
        "mouse": MouseVsp,
        "shutdown": ShutdownVsp,
        "kvp": KvpVsp,
        "echo": EchoVsp,
    }
    return simple[spec.kind]()
