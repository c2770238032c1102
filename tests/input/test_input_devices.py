"""The keyboard and mouse VSPs on real rings (the harness plays the worker),
and the VSCs against them in-process: injection, a guest that reads slowly,
a hostile guest, and descriptors released on close."""

from __future__ import annotations

import gc
import os
from uuid import UUID

import pytest

from vmbus import handoff
from vmbus.channel import COMPLETION_REQUESTED, VM_PKT_DATA_INBAND
from vmbus.errors import UsageError
from vmbus.guest import Guest, GuestDevice
from vmbus.guid import KEYBOARD, MOUSE
from vmbus.partition import wait_until
from vmbus.protocols.input import KeyboardClient, KeyEvent, MouseClient, MouseEvent
from vmbus.testing import VspHarness, loopback
from vsc.input import Keyboard, Mouse
from vsp.input import KeyboardHandler, KeyboardVsp, MouseHandler, MouseVsp

RING = 40 * 1024  # what the VSC opens


def negotiate_keyboard(harness: VspHarness) -> KeyboardClient:
    client = KeyboardClient()
    harness.guest.send(client.request(), flags=COMPLETION_REQUESTED, trans_id=1)
    harness.pump()
    answer = harness.guest.poll()
    assert answer is not None and answer.type == VM_PKT_DATA_INBAND  # never a completion
    assert answer.trans_id == 1
    client.receive(bytes(answer.payload))
    assert client.accepted
    return client


def negotiate_mouse(harness: VspHarness) -> MouseClient:
    client = MouseClient()
    harness.guest.send(client.request(), flags=COMPLETION_REQUESTED, trans_id=1)
    harness.pump()
    while (packet := harness.guest.poll()) is not None:
        assert packet.type == VM_PKT_DATA_INBAND
        replies, _ = client.receive(bytes(packet.payload))
        for reply in replies:
            harness.guest.send(reply)
    harness.pump()
    assert client.approved and client.report_descriptor is not None
    return client


def read_all(harness: VspHarness) -> list[bytes]:
    """The guest reads at last: everything that waited comes through."""
    received = []
    while True:
        harness.pump()
        packet = harness.guest.poll()
        if packet is None:
            return received
        received.append(bytes(packet.payload))


def test_guest_that_stops_reading_while_10000_keys_are_injected_keeps_its_channel() -> None:
    vsp = KeyboardVsp()
    with VspHarness(vsp, ring_size=RING) as harness:
        client = negotiate_keyboard(harness)
        handler = harness.handler
        assert isinstance(handler, KeyboardHandler)
        sent = []
        for i in range(10_000):
            code, down = 1 + i % 0x7F, (i // 0x7F) % 2 == 0
            vsp.press(code, down=down)
            sent.append(KeyEvent(code, down))
            if i % 50 == 0:
                harness.pump()  # the worker keeps up; the guest does not read
        harness.pump()
        # Renegotiating meanwhile is answered at once: the reserve stayed free.
        harness.guest.send(client.request(), flags=COMPLETION_REQUESTED, trans_id=2)
        harness.pump()
        assert handler.backlog and handler.dropped > 0 and not handler.closed
        events = [client.receive(payload) for payload in read_all(harness)]
        keys = [event for event in events if event is not None]
        assert len(events) - len(keys) == 1  # the second PROTOCOL_RESPONSE
        assert keys == sent[: len(keys)]  # in order; only the newest were lost
        assert len(keys) + handler.dropped + vsp.overflow == len(sent)
        vsp.press(0x1E, down=True)  # and the channel serves on
        (payload,) = read_all(harness)
        assert client.receive(payload) == KeyEvent(0x1E, True)


def test_pointer_moves_coalesce_while_the_guest_is_slow() -> None:
    vsp = MouseVsp()
    with VspHarness(vsp, ring_size=RING) as harness:
        client = negotiate_mouse(harness)
        handler = harness.handler
        assert isinstance(handler, MouseHandler)
        for i in range(10_000):
            vsp.move(i % 32768, 7)
            if i == 5000:
                vsp.move(1, 2, buttons=1)  # a click: never merged away
            if i % 50 == 0:
                harness.pump()
        harness.pump()
        assert handler.coalesced > 0 and handler.dropped == 0 and len(handler.backlog) <= 3
        events = [client.receive(payload)[1] for payload in read_all(harness)]
        assert MouseEvent(1, 2, 1) in events
        assert events[-1] == MouseEvent(9999, 7, 0)  # the latest position wins


def test_key_injected_before_the_guest_opens_is_discarded_and_counted() -> None:
    vsp = KeyboardVsp()
    assert vsp.press(0x1E, down=True)  # queued: the parent cannot know there is no channel
    with VspHarness(vsp, ring_size=RING) as harness:
        negotiate_keyboard(harness)
        harness.pump()
        assert harness.guest.poll() is None  # stale: never delivered
        assert vsp.stats() == {"open": True, "events": 0, "unopened": 1, "dropped": 0}


def test_injection_into_a_worker_that_stopped_taking_events_is_refused_and_counted() -> None:
    vsp = KeyboardVsp()
    accepted = sum(vsp.press(0x1E, down=True) for _ in range(100_000))
    assert 0 < accepted < 100_000 and vsp.overflow == 100_000 - accepted


def test_the_worker_copy_receives_what_the_parent_injects() -> None:
    vsp = KeyboardVsp()
    copy = handoff.loads(*handoff.dumps(vsp))  # what a worker process gets
    with pytest.raises(UsageError):
        copy.press(0x1E, down=True)  # injection is the parent's
    assert vsp.press(0x1E, down=True)
    with VspHarness(copy, ring_size=RING) as harness:
        client = negotiate_keyboard(harness)
        assert vsp.press(0x1F, down=False)
        (payload,) = read_all(harness)
        assert client.receive(payload) == KeyEvent(0x1F, False)
        assert copy.stats()["unopened"] == 1


def test_keys_injected_before_negotiation_are_dropped_and_counted() -> None:
    vsp = KeyboardVsp()
    with VspHarness(vsp, ring_size=RING) as harness:
        vsp.press(0x1E, down=True)
        harness.pump()
        assert harness.guest.poll() is None and vsp.server.dropped_keystrokes == 1


def test_bad_injection_is_the_callers_error() -> None:
    keyboard, mouse = KeyboardVsp(), MouseVsp()
    with pytest.raises(UsageError):
        keyboard.press(0x80, down=True)  # bit 7 is the break bit
    with pytest.raises(UsageError):
        mouse.move(32768, 0)


@pytest.mark.parametrize("vsp_class", [KeyboardVsp, MouseVsp])
def test_guest_sends_garbage_and_is_counted_not_answered(vsp_class: type) -> None:
    with VspHarness(vsp_class(), ring_size=RING) as harness:
        harness.guest.send(b"\xff" * 20, flags=COMPLETION_REQUESTED, trans_id=3)
        harness.pump()
        assert harness.guest.poll() is None
        assert harness.context.peer_log.count == 1


def open_fds() -> int:
    gc.collect()  # earlier tests' devices hold socket pairs until collected
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("vsp_class", [KeyboardVsp, MouseVsp])
def test_open_close_cycles_leak_no_descriptor(vsp_class: type) -> None:
    vsp = vsp_class()
    with VspHarness(vsp):  # a first cycle: lazy imports, caches
        pass
    baseline = open_fds()
    for _ in range(20):
        with VspHarness(vsp) as harness:
            assert len(harness.watched) == 1  # the injection socket
        assert not harness.watched
    assert open_fds() == baseline


def test_keyboard_and_mouse_vscs_in_process() -> None:
    keyboard_vsp, mouse_vsp = KeyboardVsp(), MouseVsp()
    devices: dict[UUID, GuestDevice] = {}

    def register(guest: Guest) -> None:
        for class_id in (KEYBOARD, MOUSE):
            guest.register(class_id, lambda device: devices.setdefault(device.class_id, device))

    with loopback([keyboard_vsp, mouse_vsp], register):
        keyboard, mouse = Keyboard(devices[KEYBOARD]), Mouse(devices[MOUSE])
        assert keyboard_vsp.server.negotiated
        assert keyboard_vsp.key(0xFF52, down=True)  # Up, as a VNC keysym
        assert keyboard.next_event(timeout=30) == KeyEvent(0x48, True, e0=True)
        assert wait_until(lambda: mouse_vsp.server.ready, 30)  # the worker took the ACK
        assert mouse_vsp.pointer(1023, 0, 0x08 | 1, width=1024, height=768)  # click + wheel
        assert mouse.next_event(timeout=30) == MouseEvent(32767, 0, 1, 1)
        assert keyboard_vsp.server.errors.total() == mouse_vsp.server.errors.total() == 0
        keyboard.close()
        mouse.close()


def test_guest_vsc_that_stops_reading_while_10000_keys_are_injected_keeps_its_channel() -> None:
    """The same through the parent's real worker: nothing it sends waits or
    fails, so the channel is never rescinded."""
    vsp = KeyboardVsp()
    devices: dict[UUID, GuestDevice] = {}

    def register(guest: Guest) -> None:
        guest.register(KEYBOARD, lambda device: devices.setdefault(device.class_id, device))

    with loopback([vsp], register) as (_, partition):
        keyboard = Keyboard(devices[KEYBOARD])  # negotiates, then stops reading
        handler = vsp.handler
        assert isinstance(handler, KeyboardHandler)
        sent = [KeyEvent(1 + i % 0x7F, (i // 0x7F) % 2 == 0) for i in range(10_000)]
        for event in sent:
            vsp.press(event.scan_code, down=event.pressed)
        # the worker took them all
        assert wait_until(lambda: handler.taken + vsp.overflow == len(sent), 30)
        keyboard.channel.send(keyboard.client.request())  # renegotiating meanwhile
        lost = handler.dropped + vsp.overflow
        assert lost < len(sent)
        keys = [keyboard.next_event(timeout=30) for _ in range(len(sent) - lost)]
        assert keys == sent[: len(keys)]  # in order; only the newest were lost
        assert keyboard.client.accepted and len(partition.channels) == 1  # not rescinded
        keyboard.close()
