"""The worker loop's timers (vmbus.timers) against a model: a list of
(due, order, name) that is sorted and filtered by brute force."""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from vmbus.timers import Timer, TimerQueue


class TimersAgainstAModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.queue = TimerQueue(clock=lambda: self.now)
        self.model: dict[int, tuple[float, int | None]] = {}  # name: (due, owner)
        self.timers: dict[int, Timer] = {}
        self.fired: list[int] = []
        self.names = 0

    @rule(delay=st.floats(-1, 5), owner=st.sampled_from([None, 1, 2]))
    def add(self, delay: float, owner: int | None) -> None:
        name = self.names
        self.names += 1
        self.timers[name] = self.queue.add(delay, lambda: self.fired.append(name), owner)
        self.model[name] = (self.now + max(0.0, delay), owner)

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        if self.timers:
            name = data.draw(st.sampled_from(sorted(self.timers)))
            self.timers[name].cancel()
            self.model.pop(name, None)

    @rule(owner=st.sampled_from([1, 2]))
    def close_channel(self, owner: int) -> None:
        self.queue.cancel_owned(owner)
        self.model = {n: (due, o) for n, (due, o) in self.model.items() if o != owner}

    @rule(step=st.floats(0, 3))
    def advance(self, step: float) -> None:
        self.now += step
        expected = sorted((due, n) for n, (due, _) in self.model.items() if due <= self.now)
        self.fired.clear()
        for timer in self.queue.due():
            timer.callback()
        assert self.fired == [n for _, n in expected]
        for _, name in expected:
            del self.model[name]

    @invariant()
    def agrees(self) -> None:
        assert len(self.queue) == len(self.model)
        soonest = min((due for due, _ in self.model.values()), default=None)
        timeout = self.queue.timeout(10.0)
        if soonest is None:
            assert timeout == 10.0
        else:
            assert timeout == min(10.0, max(0.0, soonest - self.now))


TestTimersAgainstAModel = TimersAgainstAModel.TestCase


def test_setting_and_cancelling_forever_holds_a_bounded_heap() -> None:
    queue = TimerQueue(clock=lambda: 0.0)
    for _ in range(10_000):
        queue.add(60.0, lambda: None).cancel()
    assert len(queue._heap) <= 128 and len(queue) == 0
