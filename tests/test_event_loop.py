"""The event-loop gate: a poll cycle holds libvirt's loop still, and never starves it.

Runs libvirt's real default event loop in this process (no connection needed): a repeating libvirt
timer stands in for event delivery, because the loop dispatches both the same way.
"""

from __future__ import annotations

import threading
import time

import pytest

libvirt = pytest.importorskip("libvirt")

from exporter.libvirt_events import ensure_event_loop  # noqa: E402


@pytest.fixture
def ticks():
    """A libvirt timer firing every 10 ms on the loop thread; yields its running count."""
    loop = ensure_event_loop()
    count = [0]

    def tick(_timer, _opaque):
        count[0] += 1

    timer = libvirt.virEventAddTimeout(10, tick, None)
    time.sleep(0.1)
    try:
        yield loop, count
    finally:
        libvirt.virEventRemoveTimeout(timer)


def test_a_held_loop_dispatches_nothing_and_resumes_after(ticks):
    loop, count = ticks
    with loop.held():
        before = count[0]
        time.sleep(0.3)
        during = count[0] - before
    time.sleep(0.3)
    after = count[0] - before - during
    assert during <= 1  # at most the iteration that was under way when the hold began
    assert after >= 10


def test_back_to_back_holds_still_let_the_loop_run(ticks):
    """A poll interval shorter than a cycle means the next hold starts as the last one ends;
    events must still be delivered between them (this starved the loop before the fix)."""
    loop, count = ticks
    stop = threading.Event()
    holds = [0]

    def cycles():
        while not stop.is_set():
            with loop.held():
                time.sleep(0.02)
            holds[0] += 1

    worker = threading.Thread(target=cycles)
    before = count[0]
    worker.start()
    time.sleep(1.0)
    stop.set()
    worker.join(5)
    assert holds[0] >= 20
    # One loop turn per release; each turn fires the overdue timer.
    assert count[0] - before >= holds[0] // 2


def test_holds_nest_across_threads(ticks):
    loop, count = ticks
    entered = threading.Event()
    release = threading.Event()

    def other():
        with loop.held():
            entered.set()
            release.wait(5)

    thread = threading.Thread(target=other)
    thread.start()
    assert entered.wait(5)
    with loop.held():
        pass  # this holder leaves; the other still holds
    before = count[0]
    time.sleep(0.2)
    assert count[0] - before <= 1
    release.set()
    thread.join(5)
    time.sleep(0.2)
    assert count[0] - before >= 5


def test_call_soon_runs_in_order_after_a_whole_iteration_and_keeps_nothing():
    """Each function runs once, in call order, behind a timer armed before it (the stand-in for a
    connection's event dispatch), and nothing it holds stays alive: libvirt-python never frees
    the callback of a removed timer, so a timer per call leaked every poll's answers."""
    import gc
    import weakref

    loop = ensure_event_loop()
    order: list[object] = []
    dispatched = threading.Event()

    def dispatch(timer, _opaque):  # what libvirt's client does with an event it read
        libvirt.virEventUpdateTimeout(timer, -1)
        order.append("event")
        dispatched.set()

    event_timer = libvirt.virEventAddTimeout(-1, dispatch, None)
    loop.renew_soon_timer()  # as after a connection registers its callbacks
    try:
        class Answer:
            pass

        kept: list[weakref.ref] = []
        for round_ in range(200):
            answer = Answer()
            kept.append(weakref.ref(answer))
            libvirt.virEventUpdateTimeout(event_timer, 0)  # an event is in the queue
            loop.call_soon(lambda answer=answer, n=round_: order.append(n))
        deadline = time.monotonic() + 5
        while len([x for x in order if x != "event"]) < 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        answers = [x for x in order if x != "event"]
        assert answers == list(range(200))
        assert order[0] == "event"  # the first answer came after the event armed before it
        del answer
        gc.collect()
        assert sum(1 for ref in kept if ref() is not None) == 0
    finally:
        libvirt.virEventRemoveTimeout(event_timer)
