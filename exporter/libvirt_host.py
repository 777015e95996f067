"""The only module that talks to libvirt: connection, event loop, reconnect, polling, actions.

Three threads, each with one job:

* the libvirt event loop (``virEventRunDefaultImpl``): callbacks only build an immutable record and
  put it on a queue; no logging, no locks held for long, no libvirt calls;
* the dispatcher: applies those records to the state and tells outcome listeners;
* the poller: owns the connection (connect, resync, reconnect with backoff), refreshes the disk
  inventory, polls ``blockJobInfo`` once per disk per interval and runs the post-cycle hook (the
  policy engine), so every libvirt call of ours is made from one thread, in order.

Safety: the only per-domain calls are ``XMLDesc``, ``blockJobInfo`` and, when the policy enforces,
``blockPull``/``blockRebase``/``blockJobAbort``. Never ``virDomainGetBlockInfo`` or the BLOCK stats
group: on QEMU 7.2 the ``query-named-block-nodes`` they send can segfault QEMU as a pull finishes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator

import libvirt

from .domain_xml import parse_disks
from .model import (
    BlockJobEvent,
    ConnectionEvent,
    DiskInfo,
    DiskKey,
    DomainInstance,
    JobInfo,
    LifecycleEvent,
    OutcomeRecord,
    PollAnswer,
    Snapshot,
)
from .libvirt_readers import JobReaders, Target
from .selfstats import SelfStats
from .state import State

log = logging.getLogger(__name__)

_JOB_TYPES = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_UNKNOWN: "unknown",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL: "pull",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY: "copy",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT: "commit",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT: "active_commit",
    getattr(libvirt, "VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP", 5): "backup",
}
_JOB_STATUSES = {
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
_DOMAIN_GONE_ERRORS = (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID)

def _silence_libvirt_stderr(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; we log the ones we care about instead."""


class _EventLoop:
    """libvirt's default event loop on its own thread, which a poll cycle can hold still.

    While the loop thread waits in ``poll()``, every RPC that another thread makes wakes it two or
    three times: libvirt switches the connection's watch off and on around each call and re-arms
    the keepalive timer on every reply. At 200 disks a second that was 1.2 % of a core spent on
    nothing (bench: 2.85 % for a bare ``blockJobInfo`` loop beside a running loop, 1.67 % with the
    loop held). libvirt only interrupts a loop that is inside an iteration, so a poll cycle parks
    the loop thread between iterations; events that arrive meanwhile wait in libvirt's queue and
    are delivered as soon as the cycle ends (a delay of at most one cycle, ~0.1 s at 200 disks).
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

    def start(self) -> None:
        libvirt.registerErrorHandler(_silence_libvirt_stderr, None)
        libvirt.virEventRegisterDefaultImpl()
        # A disabled timer: arming it ends the loop's current iteration, so it can park.
        self._kick_timer = libvirt.virEventAddTimeout(-1, self._on_kick, None)
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

    @staticmethod
    def call_soon(fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread after every event that had reached this host's sockets.

        libvirt's client queues each event it reads and arms a zero timer to dispatch it; the
        loop fires due timers in the order they were added, before it reads the sockets that
        poll() found readable. So ``fn`` waits one whole iteration (which reads every event
        already in a socket) and then fires behind the timers that dispatch them: poll answers,
        read on the readers' own connections, are applied behind every event libvirtd sent
        before them.
        """
        def fire(timer: int, hops: list[int]) -> None:
            libvirt.virEventRemoveTimeout(timer)
            if hops[0]:
                hops[0] -= 1
                libvirt.virEventAddTimeout(0, fire, hops)
            else:
                fn()

        libvirt.virEventAddTimeout(0, fire, [1])

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
_event_loop: _EventLoop | None = None


def ensure_event_loop() -> _EventLoop:
    """Start libvirt's default event loop once per process, before any connection is opened.

    Opening a connection first means no event is ever delivered on it.
    """
    global _event_loop
    with _event_loop_lock:
        if _event_loop is None:
            loop = _EventLoop()
            loop.start()
            _event_loop = loop
        return _event_loop


def job_info_from_libvirt(raw: dict) -> JobInfo | None:
    if not raw:
        return None
    return JobInfo(
        job_type=_JOB_TYPES.get(raw.get("type", 0), "unknown"),
        cur=int(raw.get("cur", 0)),
        end=int(raw.get("end", 0)),
        bandwidth=int(raw.get("bandwidth", 0)),
    )


class _RateLimitedLog:
    """One warning per (what) per interval, so a flapping domain cannot flood the log."""

    def __init__(self, interval: float = 60.0) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}

    def warning(self, what: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(what, -self._interval) >= self._interval:
            self._last[what] = now
            log.warning(message, *args)
        else:
            log.debug(message, *args)


def _instance_of(dom: libvirt.virDomain) -> DomainInstance:
    # Both are kept in the handle (no RPC): libvirt sends name, UUID and id with every domain.
    return DomainInstance(dom.UUIDString(), dom.ID())


@dataclass(frozen=True)
class _Ordered:
    """A state change from the poller, applied by the dispatcher in line with the events."""

    apply: Callable[[], tuple[OutcomeRecord, ...]]
    done: threading.Event


class LibvirtHost:
    _POST_WAIT = 5.0  # how long the poller waits for the dispatcher to apply what it read

    def __init__(
        self,
        uri: str,
        state: State,
        stats: SelfStats,
        poll_interval: float = 1.0,
        inventory_interval: float = 30.0,
        read_only: bool = True,
        on_outcomes: Callable[[tuple[OutcomeRecord, ...]], None] | None = None,
        after_cycle: Callable[[], None] | None = None,
        reconnect_max_delay: float = 2.0,
    ) -> None:
        self.uri = uri
        self.read_only = read_only
        self._state = state
        self._stats = stats
        self._poll_interval = poll_interval
        self._inventory_interval = inventory_interval
        self._on_outcomes = on_outcomes
        self._after_cycle = after_cycle
        self._reconnect_max_delay = reconnect_max_delay
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._refresh_lock = threading.Lock()
        self._refresh_domains: set[str] = set()
        self._conn: libvirt.virConnect | None = None
        self._callback_ids: list[int] = []
        self._domains: dict[str, libvirt.virDomain] = {}
        self._parsed_xml: dict[str, tuple[str, tuple[DiskInfo, ...]]] = {}
        self._disks_by_domain: dict[str, tuple[str, ...]] = {}
        self._targets: list[Target] | None = None  # None = rebuild
        self._ever_connected = False
        self._last_inventory = 0.0
        self._threads: list[threading.Thread] = []
        self._warn = _RateLimitedLog()
        self._event_loop: _EventLoop | None = None
        self._readers = JobReaders(uri or None, stats, call_timeout=max(1.0, 2 * poll_interval),
                                   patience=max(0.05, poll_interval / 10), on_unresponsive=state.set_unresponsive,
                                   wake=self._wake.set)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._event_loop = ensure_event_loop()
        for name, target in (("dispatcher", self._dispatch_loop), ("poller", self._poll_loop)):
            thread = threading.Thread(target=target, name=f"blockjob-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self._events.put(None)
        for thread in self._threads:
            thread.join(timeout)
        self._disconnect()

    def set_after_cycle(self, hook: Callable[[], None] | None) -> None:
        self._after_cycle = hook

    def request_cycle(self) -> None:
        """Ask the poller to run the post-cycle hook soon (e.g. after a policy reload)."""
        self._wake.set()

    # ------------------------------------------------------------------ event loop thread

    def _on_block_job(self, _conn, dom, path, job_type, status, _opaque) -> None:
        self._events.put(BlockJobEvent(dom.name(), path, _JOB_TYPES.get(job_type, "unknown"),
                                       _JOB_STATUSES.get(status, "unknown"), "block_job",
                                       time.monotonic(), time.time(), _instance_of(dom)))

    def _on_block_job_2(self, _conn, dom, disk, job_type, status, _opaque) -> None:
        self._events.put(BlockJobEvent(dom.name(), disk, _JOB_TYPES.get(job_type, "unknown"),
                                       _JOB_STATUSES.get(status, "unknown"), "block_job_2",
                                       time.monotonic(), time.time(), _instance_of(dom)))

    def _on_lifecycle(self, _conn, dom, event, detail, _opaque) -> None:
        kind = _LIFECYCLE.get(event, "other")
        if kind == "stopped" and detail in _STOPPED_BY_FAILURE:
            kind = "crashed"
        self._events.put(LifecycleEvent(dom.name(), kind, time.monotonic(), time.time(), _instance_of(dom)))

    def _on_close(self, _conn, _reason, _opaque) -> None:
        self._lost.set()
        self._wake.set()

    # ------------------------------------------------------------------ dispatcher thread

    def _dispatch_loop(self) -> None:
        while True:
            record = self._events.get()
            if record is None:
                return
            try:
                self._dispatch(record)
            except Exception:  # a bug here must not stop event handling
                log.exception("failed to apply %r", record)

    def _dispatch(self, record: BlockJobEvent | LifecycleEvent | _Ordered) -> None:
        if isinstance(record, _Ordered):
            try:
                outcomes = record.apply()
            finally:
                record.done.set()
            self._notify(outcomes)
            return
        self._stats.event(record.event_id if isinstance(record, BlockJobEvent) else "lifecycle")
        outcomes = self._state.apply(record)
        if isinstance(record, BlockJobEvent) or record.kind in ("started", "resumed", "stopped",
                                                                 "crashed", "undefined"):
            with self._refresh_lock:
                self._refresh_domains.add(record.domain)
            self._wake.set()
        self._notify(outcomes)

    def _notify(self, outcomes: tuple[OutcomeRecord, ...]) -> None:
        if not outcomes:
            return
        for outcome in outcomes:
            if outcome.inferred:
                log.info("block job %s on %s/%s ended without a libvirt event; counted as %s",
                         outcome.job_type, outcome.domain, outcome.disk, outcome.outcome)
            else:
                log.info("block job %s on %s/%s %s: counted", outcome.job_type, outcome.domain, outcome.disk,
                         outcome.outcome)
        if self._on_outcomes is not None:
            try:
                self._on_outcomes(outcomes)
            except Exception:
                log.exception("outcome listener failed")

    def _post(self, apply: Callable[[], tuple[OutcomeRecord, ...]], wait: bool = False) -> None:
        """Hand a state change to the dispatcher behind every event libvirt has delivered so far.

        Events that libvirt sent before the answers just read are applied first, so an answer can
        never overtake the event that explains it (a job ended, a domain stopped or restarted).
        With ``wait`` it returns once applied; never call it so while holding the event loop.
        """
        item = _Ordered(apply, threading.Event())
        if not self._threads:  # not started (one-shot readers and tests): apply at once
            self._dispatch(item)
            return
        loop = self._event_loop
        if loop is None:
            self._events.put(item)
        else:
            loop.call_soon(lambda: self._events.put(item))
        if wait and not item.done.wait(self._POST_WAIT):
            self._warn.warning("post", "the dispatcher has not applied a poll for %.0fs", self._POST_WAIT)

    # ------------------------------------------------------------------ poller thread

    def _poll_loop(self) -> None:
        delay = 0.5
        next_poll = time.monotonic()
        while not self._stop.is_set():
            if self._lost.is_set() or self._conn is None:
                if self._conn is not None:
                    log.warning("lost the connection to %s; reconnecting", self.uri)
                    self._disconnect()
                if not self._connect():
                    self._stop.wait(delay)
                    delay = min(delay * 2, self._reconnect_max_delay)
                    continue
                delay = 0.5
                next_poll = time.monotonic() + self._poll_interval
            try:
                self._cycle(next_poll)
            except libvirt.libvirtError as err:
                if not self._connection_alive():
                    self._lost.set()
                    continue
                self._warn.warning("cycle", "poll cycle failed: %s", err)
            except Exception:
                log.exception("poll cycle failed")
            now = time.monotonic()
            if now >= next_poll:
                next_poll = max(next_poll + self._poll_interval, now)
            self._wake.wait(max(0.0, next_poll - time.monotonic()))
            self._wake.clear()

    def _cycle(self, next_poll: float) -> None:
        """Event-driven refreshes, then the poll, then the slow inventory refresh: the poll starts
        on time every cycle, so a job's progress is read at the same point of each interval."""
        with self._refresh_lock:
            domains, self._refresh_domains = self._refresh_domains, set()
        for name in sorted(domains):
            try:
                self._refresh_domain(name)
            except libvirt.libvirtError as err:
                if not self._connection_alive():
                    raise
                self._warn.warning(f"xml:{name}", "cannot refresh %s: %s", name, err)
        if time.monotonic() >= next_poll:
            started = time.monotonic()
            self._poll_jobs()
            # Waits for the cycle's answers too: the post-cycle hook decides on them.
            self._post(self._state.expire, wait=True)
            self._stats.poll_cycle(time.monotonic() - started, time.time())
        if time.monotonic() - self._last_inventory >= self._inventory_interval:
            with self._holding_event_loop():  # one XMLDesc per domain: the same wakeups as a poll
                inventory, instances = self._list_inventory()
            self._post(lambda: self._state.replace_inventory(inventory, instances))
        if self._after_cycle is not None and not self._lost.is_set():
            try:
                self._after_cycle()
            except Exception:
                log.exception("post-cycle hook failed")

    def _connection_alive(self) -> bool:
        conn = self._conn
        if conn is None:
            return False
        try:
            return bool(conn.isAlive())
        except libvirt.libvirtError:
            return False

    def _connect(self) -> bool:
        try:
            conn = libvirt.openReadOnly(self.uri) if self.read_only else libvirt.open(self.uri)
            self._stats.calls("open")
        except libvirt.libvirtError as err:
            self._stats.calls("open", errors=1)
            self._warn.warning("connect", "cannot connect to %s: %s (retrying)", self.uri, str(err).strip())
            return False
        self._lost.clear()
        self._conn = conn
        try:
            try:
                conn.setKeepAlive(5, 3)
            except libvirt.libvirtError:
                pass  # not every driver supports keepalive; the close callback still works
            conn.registerCloseCallback(self._on_close, None)
            for event_id, callback in (
                (libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, self._on_block_job_2),
                (libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB, self._on_block_job),
                (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle),
            ):
                self._callback_ids.append(conn.domainEventRegisterAny(None, event_id, callback, None))
            self._resync()
        except libvirt.libvirtError as err:
            self._warn.warning("connect", "connected to %s but setting up failed: %s", self.uri, err)
            self._disconnect()
            return False
        if self._ever_connected:
            self._stats.reconnected()
            log.info("reconnected to %s", self.uri)
        else:
            log.info("connected to %s (%s)", self.uri, "read-only" if self.read_only else "read-write")
        self._ever_connected = True
        self._state.apply(ConnectionEvent(True, time.monotonic(), time.time()))
        return True

    def _disconnect(self) -> None:
        self._readers.close()
        conn, self._conn = self._conn, None
        self._state.apply(ConnectionEvent(False, time.monotonic(), time.time()))
        if conn is None:
            return
        for callback_id in self._callback_ids:
            try:
                conn.domainEventDeregisterAny(callback_id)
            except libvirt.libvirtError:
                pass
        self._callback_ids = []
        try:
            conn.unregisterCloseCallback()
        except libvirt.libvirtError:
            pass
        try:
            conn.close()
        except libvirt.libvirtError:
            pass
        self._domains = {}
        self._disks_by_domain = {}
        self._targets = None
        self._parsed_xml = {}

    def _list_inventory(self) -> tuple[dict[str, tuple[DiskInfo, ...]], dict[str, DomainInstance]]:
        conn = self._conn
        assert conn is not None
        domains = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        self._stats.calls("listAllDomains")
        inventory: dict[str, tuple[DiskInfo, ...]] = {}
        handles: dict[str, libvirt.virDomain] = {}
        errors = 0
        for dom in domains:
            name = dom.name()
            try:
                xml = dom.XMLDesc(0)
            except libvirt.libvirtError as err:
                errors += 1
                self._warn.warning(f"xml:{name}", "cannot read the XML of %s: %s", name, err)
                continue
            handles[name] = dom
            inventory[name] = self._parse_disks(name, xml)
        self._stats.calls("XMLDesc", len(domains), errors)
        self._parsed_xml = {name: parsed for name, parsed in self._parsed_xml.items() if name in handles}
        self._domains = handles
        self._disks_by_domain = {name: tuple(d.disk for d in disks) for name, disks in inventory.items()}
        self._targets = None
        self._last_inventory = time.monotonic()
        return inventory, {name: _instance_of(dom) for name, dom in handles.items()}

    def _resync(self) -> None:
        """Full truth after (re)connect: every running domain's disks and every active job."""
        with self._refresh_lock:
            self._refresh_domains.clear()
        call_started = time.monotonic()
        inventory, instances = self._list_inventory()
        jobs, complete = self._collect_jobs()
        self._post(lambda: self._state.resync(inventory, jobs, call_started, jobs_complete=complete,
                                              instances=instances), wait=True)

    def _refresh_domain(self, name: str) -> None:
        conn = self._conn
        assert conn is not None
        try:
            dom = conn.lookupByName(name)
            self._stats.calls("lookupByName")
            active = dom.isActive()
            self._stats.calls("isActive")
            if not active:
                raise _DomainGone()
            xml = dom.XMLDesc(0)
            self._stats.calls("XMLDesc")
        except (_DomainGone, libvirt.libvirtError) as err:
            if isinstance(err, libvirt.libvirtError):
                if err.get_error_code() not in _DOMAIN_GONE_ERRORS:
                    self._stats.calls("XMLDesc", 0, errors=1)
                    raise
            self._domains.pop(name, None)
            self._disks_by_domain.pop(name, None)
            self._targets = None
            self._parsed_xml.pop(name, None)
            gone = LifecycleEvent(name, "stopped", time.monotonic(), time.time())
            self._post(lambda: self._state.apply(gone))
            return
        disks = self._parse_disks(name, xml)
        disk_names = tuple(d.disk for d in disks)
        if self._domains.get(name) is not dom or self._disks_by_domain.get(name) != disk_names:
            self._targets = None
        self._domains[name] = dom
        self._disks_by_domain[name] = disk_names
        instance = _instance_of(dom)
        self._post(lambda: self._state.update_domain(name, disks, instance))

    def _parse_disks(self, name: str, xml: str) -> tuple[DiskInfo, ...]:
        """Parses a domain's disks, reusing the last result while its XML is unchanged: the slow
        refresh re-reads every domain, and most have not changed."""
        cached = self._parsed_xml.get(name)
        if cached is not None and cached[0] == xml:
            return cached[1]
        disks = tuple(parse_disks(name, xml))
        self._parsed_xml[name] = (xml, disks)
        return disks

    def _collect_jobs(self) -> tuple[dict[DiskKey, JobInfo], bool]:
        """Every disk's job now; False when some disk could not be read (its job is unknown)."""
        with_job, without_job = self._poll_targets()
        with self._holding_event_loop():
            answers, complete = self._read_answers(with_job + without_job)
        return {(a.domain, a.disk): a.info for a in answers if a.info is not None}, complete

    def _poll_jobs(self) -> None:
        """Disks with a job are read and applied first, so that their progress is read at the
        same point of every cycle and shows at once, not after every other disk's call."""
        with_job, without_job = self._poll_targets()
        for batch in (with_job, without_job):
            if batch:
                with self._holding_event_loop():
                    answers, _complete = self._read_answers(batch)
                self._post(lambda answers=answers: self._state.apply_polls(answers))

    def _holding_event_loop(self):
        return self._event_loop.held() if self._event_loop is not None else nullcontext()

    def _poll_targets(self) -> tuple[list[Target], list[Target]]:
        """(disks with a job, the most recently moving first; every other disk) of the running
        domains."""
        targets = self._targets
        if targets is None:
            targets = self._targets = [Target(name, dom, disk, _instance_of(dom))
                                       for name, dom in self._domains.items()
                                       for disk in self._disks_by_domain.get(name, ())]
        moved = self._state.job_cursor_times()
        if not moved:
            return [], targets
        with_job = [t for t in targets if t.key in moved]
        with_job.sort(key=lambda t: -moved[t.key])
        return with_job, [t for t in targets if t.key not in moved]

    def _read_answers(self, targets: list[Target]) -> tuple[list[PollAnswer], bool]:
        """One ``blockJobInfo`` call per target (see ``libvirt_readers``): (the answers, whether
        every target answered; a hung or failing domain's jobs are unknown, not ended)."""
        calls = errors = 0
        gone: list[str] = []
        answers: list[PollAnswer] = []
        reads, complete = self._readers.read(targets)
        try:
            for read in reads:
                calls += 1
                target, result = read.target, read.result
                if result.__class__ is dict:
                    answers.append(PollAnswer(target.domain, target.disk, target.instance,
                                              job_info_from_libvirt(result) if result else None, read.call_started))
                    continue
                errors += 1
                complete = False
                if result.get_error_code() in _DOMAIN_GONE_ERRORS:
                    if target.domain not in gone:
                        log.info("domain %s went away during the poll; skipping it", target.domain)
                        gone.append(target.domain)
                    continue
                if result.get_error_domain() == libvirt.VIR_FROM_RPC:
                    # A reader's own connection broke (libvirtd restarting, say): its readers go,
                    # and the main connection says whether to reconnect.
                    self._readers.close()
                    if not self._connection_alive():
                        raise result
                    continue
                if not self._connection_alive():
                    raise result
                self._warn.warning(f"job:{target.domain}:{target.disk}", "blockJobInfo(%s, %s) failed: %s",
                                   target.domain, target.disk, result)
        finally:
            self._stats.calls("blockJobInfo", calls, errors)
            if gone:
                with self._refresh_lock:
                    self._refresh_domains.update(gone)
                self._wake.set()
        return answers, complete

    # ------------------------------------------------------------------ actions (policy, enforcing)

    def fresh_snapshot(self) -> Snapshot:
        """Every disk's job read now and applied: for a decision that must count every job on the
        host, including one started by someone else since the last poll."""
        with_job, without_job = self._poll_targets()
        with self._holding_event_loop():
            answers, _complete = self._read_answers(with_job + without_job)
        self._post(lambda: self._state.apply_polls(answers), wait=True)
        return self._state.snapshot()

    def _writable_domain(self, domain: str) -> libvirt.virDomain:
        if self.read_only or self._conn is None:
            raise PermissionError("the libvirt connection is read-only (policy not enforcing) or down")
        return self._conn.lookupByName(domain)

    def start_pull(self, domain: str, disk: str, bandwidth_bytes: int) -> None:
        dom = self._writable_domain(domain)
        try:
            dom.blockPull(disk, bandwidth_bytes, libvirt.VIR_DOMAIN_BLOCK_PULL_BANDWIDTH_BYTES)
        finally:
            self._stats.calls("blockPull")
        self._poll_one(domain, disk, dom)

    def start_rebase(self, domain: str, disk: str, base_path: str, bandwidth_bytes: int) -> None:
        dom = self._writable_domain(domain)
        try:
            dom.blockRebase(disk, base_path, bandwidth_bytes, libvirt.VIR_DOMAIN_BLOCK_REBASE_BANDWIDTH_BYTES)
        finally:
            self._stats.calls("blockRebase")
        self._poll_one(domain, disk, dom)

    def abort_job(self, domain: str, disk: str) -> None:
        dom = self._writable_domain(domain)
        try:
            dom.blockJobAbort(disk, 0)
        finally:
            self._stats.calls("blockJobAbort")

    def _poll_one(self, domain: str, disk: str, dom: libvirt.virDomain) -> None:
        """Make a job we just started visible at once, so the next decision counts it."""
        started = time.monotonic()
        try:
            raw = dom.blockJobInfo(disk, libvirt.VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES)
            self._stats.calls("blockJobInfo")
        except libvirt.libvirtError:
            self._stats.calls("blockJobInfo", errors=1)
            return
        answer = PollAnswer(domain, disk, _instance_of(dom), job_info_from_libvirt(raw), started)
        self._post(lambda: self._state.apply_polls((answer,)), wait=True)


class _DomainGone(Exception):
    pass


def open_read_only_for_plan(uri: str) -> "PlanReader":
    """A one-shot reader for ``policy plan``: inventory and jobs, no events."""
    return PlanReader(uri)


class PlanReader:
    def __init__(self, uri: str) -> None:
        libvirt.registerErrorHandler(_silence_libvirt_stderr, None)
        self._uri = uri
        self._conn = libvirt.openReadOnly(uri)

    def read(self, state: State) -> None:
        host = LibvirtHost(uri=self._uri, state=state, stats=SelfStats())
        host._conn = self._conn
        try:
            host._resync()
        finally:
            host._readers.close()
        state.apply(ConnectionEvent(True, time.monotonic(), time.time()))

    def close(self) -> None:
        self._conn.close()
