"""libvirt's event loop and the callbacks that turn its events into records.

The loop runs on its own thread (``virEventRunDefaultImpl``). Callbacks only build a small
immutable record and put it on the dispatcher's queue: no logging, no locks held for long, no
libvirt calls. A poll cycle can hold the loop still (``held``), and ``call_soon`` orders the
poller's answers behind the events that arrived before them.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterator

import libvirt

from .model import BlockJobEvent, DomainInstance, LifecycleEvent

JOB_TYPES = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_UNKNOWN: "unknown",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL: "pull",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY: "copy",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT: "commit",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT: "active_commit",
    getattr(libvirt, "VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP", 5): "backup",
}
_STATUSES = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED: "completed",
    libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED: "failed",
    libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED: "canceled",
    libvirt.VIR_DOMAIN_BLOCK_JOB_READY: "ready",
}
_LIFECYCLE = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
}
_STOPPED_BY_FAILURE = (libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED, libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED)


def silence_libvirt_stderr(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; we log the ones we care about instead."""


class EventLoop:
    """libvirt's default event loop on its own thread, which a poll cycle can hold still.

    While the loop thread waits in ``poll()``, every RPC another thread makes wakes it (libvirt
    switches the connection's watch off and on around each call and re-arms the keepalive timer on
    every reply): CPU spent on nothing, per call. So a poll cycle parks the loop thread between
    iterations; events that arrive meanwhile wait in libvirt's queue until the cycle ends.
    """

    _PARK_WAIT = 0.05  # a loop busy in a callback parks right after it; never wait longer

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._holders = 0
        self._parked = False
        # Set when the last holder lets go: the loop then runs at least one iteration before it
        # parks again, so back-to-back cycles (a poll interval shorter than a cycle) cannot
        # starve event delivery.
        self._turn_owed = False
        self._kick_timer = -1
        self._soon_lock = threading.Lock()
        self._soon: deque[list] = deque()  # [iterations still to wait, fn], oldest first
        self._soon_timer = -1

    def start(self) -> None:
        libvirt.registerErrorHandler(silence_libvirt_stderr, None)
        libvirt.virEventRegisterDefaultImpl()
        # A disabled timer: arming it ends the loop's current iteration, so it can park.
        self._kick_timer = libvirt.virEventAddTimeout(-1, self._on_kick, None)
        self.renew_soon_timer()
        threading.Thread(target=self._run, name="libvirt-event-loop", daemon=True).start()

    def _run(self) -> None:
        run_once = libvirt.virEventRunDefaultImpl
        cond = self._cond
        while True:
            if self._holders:
                with cond:
                    while self._holders and not self._turn_owed:
                        self._parked = True
                        cond.notify_all()
                        cond.wait()
                    self._parked = False
                    self._turn_owed = False
            run_once()

    @staticmethod
    def _on_kick(timer: int, _opaque: object) -> None:
        libvirt.virEventUpdateTimeout(timer, -1)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread after every event that had reached this host's sockets.

        libvirt's client queues each event it reads and arms a zero timer to dispatch it; the
        loop fires due timers in the order they were added, before it reads the sockets that
        poll() found readable. So ``fn`` waits one whole iteration (which reads every event
        already in a socket) and then fires from a timer added after every connection's: behind
        the timers that dispatch those events. One timer serves every call: libvirt-python never
        frees the callback of a removed timer, so a timer per call leaks what its closure holds.
        """
        with self._soon_lock:
            self._soon.append([1, fn])
            timer = self._soon_timer
        libvirt.virEventUpdateTimeout(timer, 0)

    def renew_soon_timer(self) -> None:
        """Put ``call_soon``'s timer after every timer there is: call it once a connection has
        registered its event callbacks (which adds that connection's dispatch timer)."""
        with self._soon_lock:
            old = self._soon_timer
            self._soon_timer = libvirt.virEventAddTimeout(0 if self._soon else -1, self._on_soon, None)
        if old >= 0:
            libvirt.virEventRemoveTimeout(old)

    def _on_soon(self, timer: int, _opaque: object) -> None:
        due = []
        with self._soon_lock:
            while self._soon and self._soon[0][0] == 0:
                due.append(self._soon.popleft()[1])
            for entry in self._soon:
                entry[0] = 0
            if not self._soon:
                libvirt.virEventUpdateTimeout(timer, -1)
        for fn in due:
            fn()

    @contextmanager
    def held(self) -> Iterator[None]:
        """Keep the loop parked for the duration (nestable; other threads may hold it too)."""
        with self._cond:
            self._holders += 1
            if not self._parked or self._turn_owed:
                libvirt.virEventUpdateTimeout(self._kick_timer, 0)
                self._cond.wait_for(lambda: self._parked and not self._turn_owed, self._PARK_WAIT)
        try:
            yield
        finally:
            with self._cond:
                self._holders -= 1
                if not self._holders:
                    self._turn_owed = True
                    self._cond.notify_all()


_event_loop_lock = threading.Lock()
_event_loop: EventLoop | None = None


def ensure_event_loop() -> EventLoop:
    """Start libvirt's default event loop once per process, before any connection is opened: a
    connection opened first never delivers an event."""
    global _event_loop
    with _event_loop_lock:
        if _event_loop is None:
            loop = EventLoop()
            loop.start()
            _event_loop = loop
        return _event_loop


def instance_of(dom: libvirt.virDomain) -> DomainInstance:
    # Both are kept in the handle (no RPC): libvirt sends name, UUID and id with every domain.
    return DomainInstance(dom.UUIDString(), dom.ID())


def register_callbacks(conn: libvirt.virConnect, events: queue.SimpleQueue) -> list[int]:
    """Registers the event callbacks on ``conn``; each puts one record on ``events``."""
    def block_job(event_id: str) -> Callable[..., None]:
        def callback(_conn, dom, disk, job_type, status, _opaque) -> None:  # BLOCK_JOB names the disk by path
            events.put(BlockJobEvent(dom.name(), disk, JOB_TYPES.get(job_type, "unknown"),
                                     _STATUSES.get(status, "unknown"), event_id,
                                     time.monotonic(), time.time(), instance_of(dom)))
        return callback

    def lifecycle(_conn, dom, event, detail, _opaque) -> None:
        kind = _LIFECYCLE.get(event, "other")
        if kind == "stopped" and detail in _STOPPED_BY_FAILURE:
            kind = "crashed"
        events.put(LifecycleEvent(dom.name(), kind, time.monotonic(), time.time(), instance_of(dom)))

    return [conn.domainEventRegisterAny(None, event_id, callback, None) for event_id, callback in (
        (libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, block_job("block_job_2")),
        (libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB, block_job("block_job")),
        (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle),
    )]
