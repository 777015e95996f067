"""The poller and the dispatcher: the part of the exporter that keeps the state true to libvirt.

Split as nova's libvirt host module is: ``libvirt_events`` (event loop, callbacks),
``libvirt_conn`` (main connection), ``libvirt_readers`` (``blockJobInfo`` on reader threads), this
module (inventory, scheduling, resync) and ``libvirt_actions`` (what the enforcing policy does).

Two threads here. The dispatcher applies, in order, every record on one queue: the events, and
what the poller read (``_post``), which libvirt's event loop puts behind the events that arrived
before it; it is the one place outcomes come from, and it tells the outcome listeners. The poller
owns the main connection (connect, resync, reconnect), refreshes the inventory, reads the disks'
jobs and runs the post-cycle hook (the policy engine).

What is read when: a disk with a job, every poll interval. The other disks are only read to find
jobs that someone else started (``BLOCK_JOB_2`` counts every end, even of a job never seen), so
they are swept round-robin with what the call budget (calls per second) leaves: small hosts still
get every disk every interval, large ones a longer discovery interval (exported). The domain XML,
re-read for what sends no event (a snapshot's new layer), is paid from the same budget, spread
over the cycles, so the calls per second stay bounded whatever the host runs. Whatever hints at
a new job has its domain's disks read at once: a block-job or lifecycle event, a changed domain
XML, a pull the policy starts. A resync and the policy's decisions read every disk.

Safety: the only per-domain calls are ``XMLDesc``, ``blockJobInfo`` and, when the policy enforces,
``blockPull``/``blockRebase``/``blockJobAbort``. Never ``virDomainGetBlockInfo`` or the BLOCK stats
group: on QEMU 7.2 the ``query-named-block-nodes`` they send can segfault QEMU as a pull finishes.
"""

from __future__ import annotations

import bisect
import heapq
import logging
import math
import queue
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Callable, Iterator

import libvirt

from .domain_xml import parse_disks
from .libvirt_actions import Actions
from .libvirt_conn import Connection
from .libvirt_events import EventLoop, ensure_event_loop, instance_of, silence_libvirt_stderr
from .libvirt_readers import DOMAIN_GONE_ERRORS, JobReaders, Target, job_info_from_libvirt
from .logsetup import RateLimitedLog
from .model import BlockJobEvent, ConnectionEvent, DiskInfo, DomainInstance, LifecycleEvent, OutcomeRecord, PollAnswer
from .selfstats import SelfStats
from .state import State

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Ordered:
    """A state change from the poller, applied by the dispatcher in line with the events."""

    apply: Callable[[], tuple[OutcomeRecord, ...]]
    done: threading.Event


class LibvirtHost:
    _POST_WAIT = 5.0  # how long the poller waits for the dispatcher to apply what it read

    def __init__(self, uri: str, state: State, stats: SelfStats, poll_interval: float = 1.0,
                 inventory_interval: float = 30.0, read_only: bool = True,
                 on_outcomes: Callable[[tuple[OutcomeRecord, ...]], None] | None = None,
                 after_cycle: Callable[[], None] | None = None, events: bool = True, call_budget: float = 0.0) -> None:
        self._state = state
        self._stats = stats
        self._poll_interval = poll_interval
        self._call_budget = call_budget  # periodic calls per second; 0: every disk every interval
        self._swept_up_to: tuple[str, str] = ("", "")  # the sweep goes on after this disk
        self._inventory_interval = inventory_interval
        self._on_outcomes = on_outcomes
        self._after_cycle = after_cycle
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._refresh_lock = threading.Lock()
        self._refresh_domains: set[str] = set()
        self._connection = Connection(uri, read_only, stats, self._events if events else None, self._on_lost)
        self._forget_domains()
        self._ever_connected = False
        self._last_inventory = 0.0
        self._threads: list[threading.Thread] = []
        self._warn = RateLimitedLog(log)
        self._event_loop: EventLoop | None = None
        self._readers = JobReaders(uri or None, stats, call_timeout=max(1.0, 2 * poll_interval),
                                   patience=max(0.05, poll_interval / 10), on_unresponsive=state.set_unresponsive,
                                   wake=self._wake.set)
        self.actions = Actions(self)

    def _forget_domains(self) -> None:
        """What the poller knows of the running domains on the main connection (poller thread only)."""
        self._domains: dict[str, libvirt.virDomain] = {}
        self._disks_by_domain: dict[str, tuple[str, ...]] = {}
        self._parsed_xml: dict[str, tuple[str, tuple[DiskInfo, ...]]] = {}
        self._xml_read_at: dict[str, float] = {}  # when each domain's XML was last read (monotonic)
        self._targets: list[Target] | None = None  # None = rebuild
        self._read_now: set[str] = set()  # domains whose disks are read at once

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

    def request_cycle(self) -> None:
        """Ask the poller to run the post-cycle hook soon (e.g. after a policy reload)."""
        self._wake.set()

    def _on_lost(self) -> None:  # libvirt's close callback, on the event loop thread
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
        for o in outcomes:
            how = f"ended without a libvirt event; counted as {o.outcome}" if o.inferred else f"{o.outcome}: counted"
            log.info("block job %s on %s/%s %s", o.job_type, o.domain, o.disk, how)
        if outcomes and self._on_outcomes is not None:
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
        if self._event_loop is None:  # not started (one-shot readers and tests): apply at once
            self._dispatch(item)
            return
        self._event_loop.call_soon(lambda: self._events.put(item))
        if wait and not item.done.wait(self._POST_WAIT):
            self._warn.warning("post", "the dispatcher has not applied a poll for %.0fs", self._POST_WAIT)

    # ------------------------------------------------------------------ poller thread

    def _poll_loop(self) -> None:
        next_poll = time.monotonic()
        while not self._stop.is_set():
            if self._lost.is_set() or self._connection.conn is None:
                if self._connection.conn is not None:
                    log.warning("lost the connection to %s; reconnecting", self._connection.uri)
                    self._disconnect()
                if not self._connect():
                    self._stop.wait(self._connection.retry_delay())
                    continue
                next_poll = time.monotonic() + self._poll_interval
            try:
                self._cycle(next_poll)
            except libvirt.libvirtError as err:
                if not self._connection.alive():
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
                if not self._connection.alive():
                    raise
                self._warn.warning(f"xml:{name}", "cannot refresh %s: %s", name, err)
        self._read_hinted()
        if time.monotonic() >= next_poll:
            started = time.monotonic()
            self._poll_jobs()
            # Waits for the cycle's answers too: the post-cycle hook decides on them.
            self._post(self._state.expire, wait=True)
            self._stats.poll_cycle(time.monotonic() - started, time.time())
        if time.monotonic() - self._last_inventory >= self._inventory_interval:
            with self._holding_event_loop():  # XMLDesc only of new domains: the poll re-reads the others
                inventory, instances = self._list_inventory(reread=False)
            self._post(lambda: self._state.replace_inventory(inventory, instances))
            self._read_hinted()
        if self._after_cycle is not None and not self._lost.is_set():
            try:
                self._after_cycle()
            except Exception:
                log.exception("post-cycle hook failed")

    def _connect(self) -> bool:
        self._lost.clear()
        connection = self._connection
        if not connection.open():
            return False
        try:
            self._resync()
        except libvirt.libvirtError as err:
            self._warn.warning("connect", "connected to %s but the first read failed: %s", connection.uri, err)
            self._disconnect()
            return False
        if self._ever_connected:
            self._stats.reconnected()
            log.info("reconnected to %s", connection.uri)
        else:
            log.info("connected to %s (%s)", connection.uri, "read-only" if connection.read_only else "read-write")
        self._ever_connected = True
        self._state.apply(ConnectionEvent(True, time.monotonic(), time.time()))
        return True

    def _disconnect(self) -> None:
        self._readers.close()
        self._connection.close()
        self._state.apply(ConnectionEvent(False, time.monotonic(), time.time()))
        self._forget_domains()

    def _call(self, method: str, call: Callable[..., Any], *args: Any) -> Any:
        """A libvirt call, counted (and its failure) in the exporter's own metrics."""
        try:
            result = call(*args)
        except libvirt.libvirtError:
            self._stats.calls(method, errors=1)
            raise
        self._stats.calls(method)
        return result

    def _domain_disks(self, name: str, dom: libvirt.virDomain, xml: str | None = None) -> tuple[DiskInfo, ...]:
        """Reads a domain's XML (unless given) and keeps its disks as the ones to poll; a changed XML
        is parsed again and its disks are read at once (a new domain, disk or layer may come with a
        new job)."""
        if xml is None:
            xml = self._call("XMLDesc", dom.XMLDesc, 0)
            self._xml_read_at[name] = time.monotonic()
        parsed = self._parsed_xml.get(name)
        if parsed is None or parsed[0] != xml:
            parsed = self._parsed_xml[name] = (xml, tuple(parse_disks(name, xml)))
            self._read_now.add(name)
        disks = tuple(d.disk for d in parsed[1])
        if self._domains.get(name) is not dom or self._disks_by_domain.get(name) != disks:
            self._domains[name], self._disks_by_domain[name] = dom, disks
            self._targets = None
        return parsed[1]

    def _list_inventory(self, reread: bool = True) -> tuple[dict[str, tuple[DiskInfo, ...]], dict[str, DomainInstance]]:
        """The running domains and their disks. Without ``reread``, a domain already known in the
        same run keeps the XML last read (``_reread_xml`` renews it, paid from the call budget)."""
        domains = self._call("listAllDomains", self._connection.conn.listAllDomains,
                             libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        before = self._domains
        self._domains, self._disks_by_domain = {}, {}
        inventory: dict[str, tuple[DiskInfo, ...]] = {}
        for dom in domains:
            name = dom.name()
            known = self._parsed_xml.get(name)
            if not reread and known is not None and name in before and instance_of(before[name]) == instance_of(dom):
                inventory[name] = self._domain_disks(name, dom, known[0])
                continue
            try:
                inventory[name] = self._domain_disks(name, dom)
            except libvirt.libvirtError as err:
                self._warn.warning(f"xml:{name}", "cannot read the XML of %s: %s", name, err)
                known = self._parsed_xml.get(name)
                if known is not None and err.get_error_code() not in DOMAIN_GONE_ERRORS:
                    # Still running, its XML unreadable for now: its disks (and jobs) stay as they were.
                    inventory[name] = self._domain_disks(name, dom, known[0])
        self._parsed_xml = {name: parsed for name, parsed in self._parsed_xml.items() if name in inventory}
        self._xml_read_at = {name: t for name, t in self._xml_read_at.items() if name in inventory}
        self._targets = None
        self._last_inventory = time.monotonic()
        return inventory, {name: instance_of(dom) for name, dom in self._domains.items()}

    def _resync(self) -> None:
        """Full truth after (re)connect: every running domain's disks and every active job."""
        with self._refresh_lock:
            self._refresh_domains.clear()
        call_started = time.monotonic()
        with self._holding_event_loop():
            inventory, instances = self._list_inventory()
            answers, complete = self._read_answers(self._all_targets())
            jobs = {(a.domain, a.disk): a.info for a in answers if a.info is not None}
            # A job that ended while we were away is judged from its disk, so read the disk again
            # now: libvirtd (re)connecting to a QEMU finishes such a job, and updates the XML,
            # before it answers blockJobInfo, but the XML read above may predate that.
            for name in sorted({key[0] for key in self._state.job_cursor_times() if key not in jobs} & set(inventory)):
                try:
                    inventory[name] = self._domain_disks(name, self._domains[name])
                except libvirt.libvirtError:
                    pass  # gone meanwhile: the resync ends its jobs as stopped
        self._post(lambda: self._state.resync(inventory, jobs, call_started, jobs_complete=complete,
                                              instances=instances), wait=True)
        self._read_now = set()  # every disk was just read

    def _refresh_domain(self, name: str) -> None:
        try:
            dom = self._call("lookupByName", self._connection.conn.lookupByName, name)
            disks = self._domain_disks(name, dom) if self._call("isActive", dom.isActive) else None
        except libvirt.libvirtError as err:
            if err.get_error_code() not in DOMAIN_GONE_ERRORS:
                raise
            disks = None
        if disks is None:
            for known in (self._domains, self._disks_by_domain, self._parsed_xml, self._xml_read_at):
                known.pop(name, None)
            self._targets = None
            gone = LifecycleEvent(name, "stopped", time.monotonic(), time.time())
            self._post(lambda: self._state.apply(gone))
            return
        instance = instance_of(dom)
        self._post(lambda: self._state.update_domain(name, disks, instance))
        self._read_now.add(name)

    def _poll_jobs(self) -> None:
        """Disks with a job (the most recently moving first) are read and applied first, so that
        their progress is read at the same point of every cycle and shows at once, not after every
        other disk's call; then the disks the sweep reaches."""
        moved = self._state.job_cursor_times()
        targets = self._all_targets()
        with_job: list[Target] = []
        idle: list[Target] = []
        for t in targets:
            (with_job if t.key in moved else idle).append(t)
        with_job.sort(key=lambda t: -moved[t.key])
        lost = {a.domain for a in self._read(with_job) if a.info is None}
        xml_share = self._xml_share(len(with_job))
        idle = self._sweep(idle, len(with_job) + xml_share)
        found = {a.domain for a in self._read(idle) if a.info is not None}
        self._reread_xml(math.ceil(xml_share))
        # Have the disks read again (the next cycle's refresh) where a job appeared, so that its
        # end is judged against the chain it started from, and where the poll lost one, so that
        # an end without an event is judged from the disk as it is after it.
        with self._refresh_lock:
            self._refresh_domains.update(lost, found)

    def _xml_share(self, busy: int) -> float:
        """The calls per cycle the budget sets aside for XML re-reads: each domain's once per
        inventory interval, spread over the cycles, and at most half of what the disks with a job
        leave (at least one re-read a cycle then); without a budget, every domain."""
        if self._call_budget <= 0:
            return float(len(self._xml_read_at))
        share = len(self._xml_read_at) * self._poll_interval / self._inventory_interval
        return min(share, max(0.5, (self._call_budget * self._poll_interval - busy) / 2))

    def _reread_xml(self, room: int) -> None:
        """Re-read the XML of the domains read longest ago, if older than the inventory interval: a
        new layer (a snapshot) or disk sends no event. A changed disk list goes to the state."""
        limit = time.monotonic() - self._inventory_interval
        due = heapq.nsmallest(room, (n for n, t in self._xml_read_at.items() if t <= limit), key=self._xml_read_at.get)
        if not due:
            return
        with self._holding_event_loop():
            for name in due:
                dom, before = self._domains.get(name), self._parsed_xml.get(name)
                if dom is None:
                    self._xml_read_at.pop(name, None)
                    continue
                try:
                    disks = self._domain_disks(name, dom)
                except libvirt.libvirtError as err:
                    if not self._connection.alive():
                        raise
                    self._xml_read_at[name] = time.monotonic()  # tried: not again at once
                    if err.get_error_code() in DOMAIN_GONE_ERRORS:
                        with self._refresh_lock:
                            self._refresh_domains.add(name)  # the next cycle finds it stopped
                    else:
                        self._warn.warning(f"xml:{name}", "cannot read the XML of %s: %s", name, err)
                    continue
                if self._parsed_xml.get(name) is not before:
                    instance = instance_of(dom)
                    self._post(lambda name=name, disks=disks, instance=instance:
                               self._state.update_domain(name, disks, instance))

    def _sweep(self, idle: list[Target], busy: float) -> list[Target]:
        """The disks without a job to read this cycle: the next ones after the last swept, in key
        order, as many as the budget leaves after the disks with a job and the XML re-reads (at
        least one)."""
        if self._call_budget <= 0 or not idle:
            self._stats.discovery(self._poll_interval)
            return idle
        room = max(1, int(self._call_budget * self._poll_interval - busy))
        self._stats.discovery(math.ceil(len(idle) / room) * self._poll_interval)
        if room >= len(idle):
            return idle
        at = bisect.bisect_right(idle, self._swept_up_to, key=attrgetter("key"))
        batch = (idle[at:] + idle[:at])[:room]
        self._swept_up_to = batch[-1].key
        return batch

    def _read_hinted(self) -> None:
        """Read at once the disks of the domains something hinted at a new job on."""
        names, self._read_now = self._read_now, set()
        if names:
            self._read([t for t in self._all_targets() if t.domain in names])

    def _holding_event_loop(self):
        return self._event_loop.held() if self._event_loop is not None else nullcontext()

    def _all_targets(self) -> list[Target]:
        """Every disk of the running domains, in key order."""
        if self._targets is None:
            self._targets = sorted((Target(name, dom, disk, instance_of(dom))
                                    for name, dom in self._domains.items()
                                    for disk in self._disks_by_domain.get(name, ())), key=lambda t: t.key)
        return self._targets

    def _read(self, targets: list[Target], wait: bool = False) -> list[PollAnswer]:
        """Reads ``targets`` holding the event loop, and has the answers applied in line with the events."""
        if not targets:
            return []
        with self._holding_event_loop():
            answers, _complete = self._read_answers(targets)
        self._post(lambda: self._state.apply_polls(answers), wait)
        return answers

    def _read_answers(self, targets: list[Target]) -> tuple[list[PollAnswer], bool]:
        """One ``blockJobInfo`` call per target (see ``libvirt_readers``): (the answers, whether
        every target answered; a hung or failing domain's jobs are unknown, not ended)."""
        reads, complete = self._readers.read(targets)
        answers = [PollAnswer(r.target.domain, r.target.disk, r.target.instance,
                              job_info_from_libvirt(r.result) if r.result else None, r.call_started)
                   for r in reads if r.result.__class__ is dict]
        failed = [r for r in reads if r.result.__class__ is not dict]
        self._stats.calls("blockJobInfo", len(reads), len(failed))
        gone: set[str] = set()
        for read in failed:
            target, err = read.target, read.result
            if err.get_error_code() in DOMAIN_GONE_ERRORS:
                gone.add(target.domain)
            elif err.get_error_domain() == libvirt.VIR_FROM_RPC:
                # A reader's own connection broke (libvirtd restarting, say): its readers go, and
                # the main connection says whether to reconnect.
                self._readers.close()
                if not self._connection.alive():
                    raise err
            elif not self._connection.alive():
                raise err
            else:
                self._warn.warning(f"job:{target.domain}:{target.disk}", "blockJobInfo(%s, %s) failed: %s",
                                   target.domain, target.disk, err)
        if gone:
            for name in sorted(gone):
                log.info("domain %s went away during the poll; skipping it", name)
            with self._refresh_lock:
                self._refresh_domains.update(gone)
            self._wake.set()
        return answers, complete and not failed


@contextmanager
def reading(uri: str, state: State) -> Iterator[Callable[[], None]]:
    """A read-only connection to ``uri`` without events; each call of the function it yields fills
    ``state`` with the running domains, their disks and jobs as they are now (``XMLDesc`` and
    ``blockJobInfo``, as the poller reads them): what ``policy plan`` and ``status`` show."""
    libvirt.registerErrorHandler(silence_libvirt_stderr, None)
    host = LibvirtHost(uri, state, SelfStats(), events=False)
    if not host._connection.open():
        raise ConnectionError(f"cannot connect to {uri}")

    def read() -> None:
        host._resync()
        state.expire()  # without events, jobs held for a stop event end after the grace
        state.apply(ConnectionEvent(True, time.monotonic(), time.time()))

    try:
        yield read
    finally:
        host._disconnect()


def read_once(uri: str, state: State) -> None:
    """``state`` as ``reading`` fills it once; it still says connected: it is a view of the host."""
    with reading(uri, state) as read:
        read()
    state.apply(ConnectionEvent(True, time.monotonic(), time.time()))
