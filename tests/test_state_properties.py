"""Property test of ``exporter.state.State``: hypothesis drives a simulated libvirt and checks that
every job end is counted exactly once and that no job outlives its domain's run.

The simulation has three parts:

* the world: two domains with two disks each, their runs (a start gives a new runtime id, a
  recreation a new UUID), their backing chains and their block jobs, each with an identity
  (``WJob``) that the exporter never sees;
* the host, as ``libvirt_host`` drives the state: libvirt's events go straight onto the
  dispatcher's queue (``main``) when libvirt sends them; what the poller reads (poll answers, a
  resync, a domain refresh, the inventory, ``expire``) is posted (``posted``) and joins the queue
  later, behind the events that arrived meanwhile (``flush``). Either queue is applied in order.
  A refresh that finds the domain inactive posts a "stopped" that names no run, as the host does;
  the ordering guarantee the state's docstring relies on is the only one;
* the checks, made after every applied record against the job identities: a record that counts
  an end names a job that has ended in the world and was not counted before; an end libvirt
  reported (``BLOCK_JOB_2``) for a job not yet counted is counted then, not inferred, with libvirt's
  outcome; an end counted any other way is in ``inferred_outcomes``; a tracked job never vanishes
  uncounted; the counters equal the records and never decrease unless the domain has been gone
  for the retention; no active job belongs to a run the state was told has ended. A ``quiesce``
  step then gives the state every chance to learn the truth (reconnect, refresh, poll every disk,
  let the pending grace pass) and checks that every job it tracked, or whose end libvirt reported,
  was counted exactly once, and that its active jobs are the world's.

Where the rules make an outcome ambiguous the generator, not the checks, gives way (each is named
where it is enforced):

* A1 A job's end event is sent when the job ends, or a little later but before ``pending_grace``
  (libvirt's worker lags QEMU by milliseconds) and before a new job can start on the disk (libvirt
  frees the disk in the same worker): past the grace, an event after a poll lost the job is taken
  for another job's.
* A2 A new job never starts on a disk while the state may still take the previous job of the same
  run for a running one: the previous job's end event has been sent, or the state has counted it,
  or the state never saw it and nothing in flight shows it. Otherwise a job of the same type in
  the next sample is, for the state, the same job (the rules say so: a job that reappears within
  the grace is the same job), and an event ends whichever job is tracked.
* A3 libvirt re-reports an end that happened while the exporter was disconnected at most once,
  only for a job of the run still running and only when no newer job took the disk, and the
  re-report arrives with the reconnect: before the resync is applied or right after it, within
  ``settle``. A later one is indistinguishable from a new job's end, which is why the window
  exists. No new job starts on a disk within ``settle`` after a resync inferred an end there.
* A4 The clock moves only while the dispatcher's queue is empty (it applies records within
  milliseconds), and by more than a poll interval only when nothing is in flight at all.
* A5 The connection is not lost again before the resync after a reconnect is applied: the poller
  waits for it, and everything posted before it, to be applied before it goes on (a stale
  listing of an older run applied after a newer run's events would look like a restart).
* A6 A destroy whose event names the run only as id -1 does not overtake a read (resync, refresh,
  listing) that names that run: the state knows a run has ended from a stop event only when it
  can tell which run, and a -1 cannot name a run the state has not seen yet.
* A7 A domain's stop event may lag the stop (libvirtd drops the domain from its lists first, so a
  listing, refresh or poll can find it gone before the event arrives), by less than
  ``pending_grace`` and never past the domain's next start. The state holds the jobs of a run that
  ended with no event; the checks follow a held job until it is counted.
"""

from __future__ import annotations

import itertools
import sys
from collections import Counter, deque
from dataclasses import dataclass, field, replace

from hypothesis import event as coverage, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from exporter.model import (
    OUTCOMES,
    BackingImage,
    BlockJobEvent,
    ConnectionEvent,
    DiskInfo,
    DomainInstance,
    JobInfo,
    LifecycleEvent,
    PollAnswer,
)
from exporter.state import State

GRACE, SETTLE, RETENTION = 3.0, 0.25, 60.0
WALL = 1_700_000_000.0
DOMAINS = ("a", "b")
DISKS = ("vda", "vdb")
KEYS = tuple((d, k) for d in DOMAINS for k in DISKS)
JOB_TYPES = ("pull", "copy", "commit", "active_commit")
STEPS = 60  # rules per example; the example count is the profile's (tests/conftest.py)
EVENT_LAG = 1.0  # A1: a delayed end event is sent within this (< GRACE)


@dataclass(eq=False)
class WJob:
    """A block job as the world knows it."""

    jid: int
    domain: str
    disk: str
    job_type: str
    run: DomainInstance
    cur: int = 0
    end: int = 1000
    ready: bool = False
    outcome: str | None = None  # set when it ends
    event_sent: bool = False  # its BLOCK_JOB_2 end is on (or through) the dispatcher's queue
    lost_event: bool = False  # it ended while the exporter was disconnected
    rereported: bool = False
    tracked_ever: bool = False
    event_applied: bool = False
    counted: str | None = None  # "reported" or "inferred"

    @property
    def key(self):
        return (self.domain, self.disk)

    @property
    def info(self) -> JobInfo:
        cur = self.end if self.ready else self.cur
        return JobInfo(self.job_type, cur, self.end, 0)

    def __repr__(self) -> str:
        return f"J{self.jid}({self.job_type} {self.domain}/{self.disk} run {self.run.id}, {self.outcome or 'running'})"


@dataclass(eq=False)
class Item:
    """One record for the dispatcher."""

    kind: str  # event, lifecycle, polls, resync, update, inventory, expire
    event: BlockJobEvent | LifecycleEvent | None = None
    job: WJob | None = None  # the job a block-job event is about
    answers: tuple[PollAnswer, ...] = ()
    shown: dict = field(default_factory=dict)  # key -> the WJob an answer or the resync showed
    args: tuple = ()
    ends_runs: frozenset = frozenset()  # runs this record tells the state have ended
    then: list = field(default_factory=list)  # events that arrive right after it (A3)

    def __repr__(self) -> str:
        what = self.event if self.event is not None else self.args or self.answers
        return f"<{self.kind} {what!r}>"


def _identity(job):
    return (job.job_type, job.instance, job.start_time)


class StateMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.state = State(clock=lambda: self.now + WALL, monotonic=lambda: self.now,
                           pending_grace=GRACE, settle=SETTLE, retention=RETENTION)
        # the world
        self._ids = itertools.count(1)
        self._jids = itertools.count(1)
        self._uuids = itertools.count(1)
        self.uuid = {d: f"{d}-uuid-{next(self._uuids)}" for d in DOMAINS}
        self.run: dict[str, DomainInstance | None] = {d: DomainInstance(self.uuid[d], next(self._ids)) for d in DOMAINS}
        self.runs_seen: dict[str, list[DomainInstance]] = {d: [self.run[d]] for d in DOMAINS}
        self.depth = {k: 2 for k in KEYS}
        self.source = {k: f"/img/{k[0]}-{k[1]}-0.qcow2" for k in KEYS}
        self._sources = itertools.count(1)
        self.jobs: dict = {}  # key -> running WJob
        self.last_job: dict = {}  # key -> latest WJob on the disk
        self.all_jobs: list[WJob] = []
        self.delayed: list[WJob] = []  # ended, end event not sent yet (A1)
        self.delayed_until: dict[int, float] = {}
        self.lagged: list[tuple[float, str, list]] = []  # (send at, domain, [(event, job)]) (A7)
        self.connected = True
        # the host
        self.main: deque[Item] = deque()
        self.posted: deque[Item] = deque()
        self.handles: dict[str, DomainInstance] = {}
        self.resyncing = 0  # resyncs posted, not applied yet
        # the checks' bookkeeping
        self.tracked: dict = {}  # key -> (WJob, identity of the state's ActiveJob)
        self.held: dict = {}  # (key, identity) -> WJob: a job of an ended run awaiting its stop event
        self.expected: Counter = Counter()
        self.expected_inferred: Counter = Counter()
        self.told_ended: set[DomainInstance] = set()
        self.settle_until: dict = {}
        self.running_seen: dict[str, float] = {}
        self.prev_outcomes: dict = {}
        self.prev_inferred: dict = {}
        self.applied = 0
        # connect: the first resync
        self._resync(complete=True, rereports_before=(), rereports_after=())
        self._drain()

    # ------------------------------------------------------------------ world helpers

    def _disk(self, key) -> DiskInfo:
        chain = tuple(BackingImage(f"/img/{key[0]}-{key[1]}-b{i}.qcow2", "qcow2") for i in range(self.depth[key]))
        return DiskInfo(key[0], key[1], self.source[key], "qcow2", chain)

    def _disks_of(self, domain) -> list[DiskInfo]:
        return [self._disk((domain, k)) for k in DISKS]

    def _running(self) -> list[str]:
        return [d for d in DOMAINS if self.run[d] is not None]

    def _send(self, event, job=None) -> None:
        """libvirt sends an event: it is on the queue at once, or lost while disconnected."""
        if self.connected:
            self.main.append(Item("event" if isinstance(event, BlockJobEvent) else "lifecycle", event=event, job=job,
                                  ends_runs=self._ends_runs_of(event)))

    def _ends_runs_of(self, event) -> frozenset:
        if isinstance(event, LifecycleEvent) and event.kind in ("stopped", "crashed"):
            run = event.instance
            if run is None or run.id < 0:
                return frozenset(r for r in self.runs_seen[event.domain]
                                 if run is None or r.uuid == run.uuid)
            return frozenset({run})
        if isinstance(event, LifecycleEvent) and event.kind == "started":
            return frozenset(r for r in self.runs_seen[event.domain] if r != event.instance)
        return frozenset()

    def _end_event(self, job: WJob, status: str, monotonic: float | None = None) -> BlockJobEvent:
        return BlockJobEvent(job.domain, job.disk, job.job_type, status, "block_job_2",
                             self.now if monotonic is None else monotonic, self.now + WALL, job.run)

    def _send_end(self, job: WJob, twin: bool = False) -> None:
        if not self.connected:
            job.lost_event = True
            return
        job.event_sent = True
        if twin:  # BLOCK_JOB names the same end by path; never counted
            self._send(BlockJobEvent(job.domain, self.source[job.key], job.job_type, job.outcome, "block_job",
                                     self.now, self.now + WALL, job.run))
        self._send(self._end_event(job, job.outcome), job)

    def _emit_delayed(self, upto: float) -> None:
        for job in list(self.delayed):
            if self.delayed_until[job.jid] <= upto:
                self._flush_delayed(job)
        for lag in [lag for lag in self.lagged if lag[0] <= upto]:
            self._flush_lagged(lag)

    def _flush_lagged(self, lag) -> None:
        self.lagged.remove(lag)
        for event, job in lag[2]:
            if job is None:
                self._send(event)
            else:
                self._send_end(job)

    def _flush_delayed(self, job: WJob) -> None:
        self.delayed.remove(job)
        self._send_end(job)

    def _in_flight_shows(self, job: WJob) -> bool:
        return any(job in item.shown.values() for item in itertools.chain(self.main, self.posted))

    def _read_in_flight_names(self, run) -> bool:
        for item in itertools.chain(self.main, self.posted):
            if item.kind == "update" and item.args[2] == run:
                return True
            if item.kind in ("resync", "inventory") and run in item.args[-1].values():
                return True
        return False

    def can_start(self, key) -> bool:
        domain = key[0]
        if self.run[domain] is None or key in self.jobs:
            return False
        if self.settle_until.get(key, -1.0) >= self.now:
            return False  # A3
        prev = self.last_job.get(key)
        if prev is None or prev.run != self.run[domain]:
            return True  # the state learns of the new run before it can see the new job
        if prev in self.delayed:
            return False  # A1: libvirt sends the end before the disk is free
        # A2
        if prev.event_sent or prev.counted is not None:
            return True
        tracked = self.tracked.get(key)
        return (tracked is None or tracked[0] is not prev) and not self._in_flight_shows(prev)

    # ------------------------------------------------------------------ world rules

    @initialize(data=st.data())
    def some_jobs(self, data):
        """Jobs on some disks to begin with, seen by a first poll or not."""
        for key in data.draw(st.sets(st.sampled_from(KEYS)), label="jobs on"):
            self._start(key, data.draw(st.sampled_from(JOB_TYPES), label="type"), 1000)
        if data.draw(st.booleans(), label="polled"):
            self.cycle(inventory=False)

    @rule(data=st.data(), job_type=st.sampled_from(JOB_TYPES))
    def start_job(self, data, job_type):
        keys = [k for k in KEYS if self.can_start(k)]
        if job_type in ("pull", "commit", "active_commit"):
            keys = [k for k in keys if self.depth[k] > 0]
        if not keys:
            return
        key = data.draw(st.sampled_from(keys), label="start on")
        self._start(key, job_type, data.draw(st.integers(1, 10_000), label="end"))

    def _start(self, key, job_type, end) -> None:
        job = WJob(next(self._jids), key[0], key[1], job_type, self.run[key[0]], end=end)
        self.jobs[key] = self.last_job[key] = job
        self.all_jobs.append(job)
        note(f"start {job!r}")

    start_another_job = start_job

    @rule(data=st.data())
    def progress(self, data):
        if self.jobs:
            job = self.jobs[data.draw(st.sampled_from(sorted(self.jobs)))]
            job.cur = min(job.end - 1, job.cur + data.draw(st.integers(1, 5000)))

    @rule(data=st.data())
    def ready(self, data):
        mirrors = [k for k, j in sorted(self.jobs.items()) if j.job_type in ("copy", "active_commit") and not j.ready]
        if mirrors:
            job = self.jobs[data.draw(st.sampled_from(mirrors))]
            job.ready = True
            self._send(BlockJobEvent(job.domain, job.disk, job.job_type, "ready", "block_job_2", self.now,
                                     self.now + WALL, job.run))

    @rule(data=st.data(), outcome=st.sampled_from(OUTCOMES),
          how=st.sampled_from(("event", "event", "twin", "delayed", "silent")))
    def end_job(self, data, outcome, how):
        """A job ends; libvirt sends its end at once, a little later, or (a lost event) never."""
        if not self.jobs:
            return
        key = data.draw(st.sampled_from(sorted(self.jobs)), label="end on")
        job = self.jobs.pop(key)
        job.outcome = outcome
        note(f"end {job!r} ({how})")
        if outcome == "completed":
            if job.job_type == "pull":
                self.depth[key] = 0
            elif job.job_type == "commit":
                self.depth[key] -= 1
            else:
                self.source[key] = f"/img/{key[0]}-{key[1]}-{next(self._sources)}.qcow2"
                if job.job_type == "active_commit":
                    self.depth[key] -= 1
        if how == "silent":
            return
        if how == "delayed" and self.connected:
            self.delayed.append(job)
            self.delayed_until[job.jid] = self.now + EVENT_LAG
            return
        self._send_end(job, twin=how == "twin")

    end_another_job = end_job

    @rule(data=st.data())
    def snapshot_disk(self, data):
        """virsh snapshot-create adds a layer (no event the exporter follows)."""
        keys = [k for k in KEYS if k not in self.jobs and self.run[k[0]] is not None]
        if keys:
            self.depth[data.draw(st.sampled_from(keys))] += 1

    @rule(data=st.data(), recreate=st.booleans())
    def domain_start(self, data, recreate):
        stopped = [d for d in DOMAINS if self.run[d] is None]
        if not stopped:
            return
        domain = data.draw(st.sampled_from(stopped), label="start domain")
        for lag in [lag for lag in self.lagged if lag[1] == domain]:
            self._flush_lagged(lag)  # A7
        if recreate:
            self.uuid[domain] = f"{domain}-uuid-{next(self._uuids)}"
        run = self.run[domain] = DomainInstance(self.uuid[domain], next(self._ids))
        self.runs_seen[domain].append(run)
        note(f"start domain {domain} run {run}")
        self._send(LifecycleEvent(domain, "started", self.now, self.now + WALL, run))

    @rule(data=st.data(), kind=st.sampled_from(("stopped", "crashed")), id_minus_one=st.booleans(),
          lag=st.sampled_from((0.0, 0.0, 0.05, 0.5, EVENT_LAG)))
    def domain_stop(self, data, kind, id_minus_one, lag):
        """Shut down, destroyed (the event says id -1) or crashed. libvirt may report its jobs' ends
        before the lifecycle event, after it (late: not counted again) or not at all; the lifecycle
        event and what follows it may lag (A7)."""
        running = self._running()
        if not running:
            return
        domain = data.draw(st.sampled_from(running), label="stop domain")
        run = self.run[domain]
        self.run[domain] = None
        for job in list(self.delayed):
            if job.domain == domain:
                self._flush_delayed(job)
        before, after = [], []
        for key in [k for k in sorted(self.jobs) if k[0] == domain]:
            job = self.jobs.pop(key)
            job.outcome = data.draw(st.sampled_from(("failed", "canceled")), label=f"{job!r} ends")
            when = data.draw(st.sampled_from(("before", "after", "never")), label="its event")
            if when == "before":
                before.append(job)
            elif when == "after":
                after.append(job)
            elif not self.connected:
                job.lost_event = True
        if id_minus_one and self._read_in_flight_names(run):
            id_minus_one = False  # A6
        note(f"stop domain {domain} run {run} ({kind}, id -1: {id_minus_one}, lag {lag})")
        seen_as = DomainInstance(run.uuid, -1) if id_minus_one else run
        sent = [(None, job) for job in before]
        sent += [(LifecycleEvent(domain, kind, self.now, self.now + WALL, seen_as), None)]
        sent += [(None, job) for job in after]
        if lag and self.connected:
            self.lagged.append((self.now + lag, domain, sent))
        else:
            for event, job in sent:
                self._send(event) if job is None else self._send_end(job)

    @rule(domain=st.sampled_from(DOMAINS), kind=st.sampled_from(("suspended", "resumed", "defined", "other")))
    def other_lifecycle(self, domain, kind):
        if self.run[domain] is not None:
            self._send(LifecycleEvent(domain, kind, self.now, self.now + WALL, self.run[domain]))

    @precondition(lambda self: self.connected and not self.resyncing)  # A5
    @rule()
    def disconnect(self):
        """The exporter's connection drops (or libvirtd stops): events sent meanwhile are lost."""
        for job in list(self.delayed):
            self.delayed.remove(job)
            job.lost_event = True
        for _, _, sent in self.lagged:
            for _, job in sent:
                if job is not None:
                    job.lost_event = True
        self.lagged = []
        self.connected = False
        note("disconnect")
        self.state.apply(ConnectionEvent(False, self.now, self.now + WALL))

    @precondition(lambda self: not self.connected)
    @rule(data=st.data(), complete=st.booleans())
    def reconnect(self, data, complete):
        """Reconnect and resync; libvirt may re-report an end that happened while it was down (A3)."""
        eligible = [j for j in self.all_jobs if j.lost_event and not j.rereported and j.event_applied is False
                    and self.run[j.domain] == j.run and self.last_job.get(j.key) is j]
        before, after = [], []
        for job in eligible:
            where = data.draw(st.sampled_from(("no", "before", "after")), label=f"re-report {job!r}")
            if where != "no":
                job.rereported = True
                (before if where == "before" else after).append(job)
        for job in self.all_jobs:
            job.lost_event = False  # libvirt re-reports at the reconnect right after, or never
        unread = ()
        if not complete:
            unread = tuple(data.draw(st.sets(st.sampled_from(KEYS), min_size=1), label="unread disks"))
        self.connected = True
        note(f"reconnect (unread {unread}, re-reports {before} / {after})")
        self._resync(complete=complete, rereports_before=before, rereports_after=after, unread=unread)

    # ------------------------------------------------------------------ host rules

    def _read(self) -> float:
        self.now += 0.001  # a call takes time: it starts after whatever was applied before it
        return self.now

    def _post(self, item: Item) -> None:
        self.posted.append(item)

    def _resync(self, complete, rereports_before, rereports_after, unread=()) -> None:
        for job in rereports_before:
            job.event_sent = True
            self.main.append(Item("event", event=self._end_event(job, job.outcome), job=job))
        call_started = self._read()
        running = self._running()
        inventory = {d: self._disks_of(d) for d in running}
        instances = {d: self.run[d] for d in running}
        jobs, shown = {}, {}
        for key, job in self.jobs.items():
            if key not in unread:
                jobs[key] = job.info
                shown[key] = job
        ends = frozenset(r for d in DOMAINS for r in self.runs_seen[d] if r != self.run[d])
        item = Item("resync", args=(inventory, jobs, call_started, not unread, instances), shown=shown,
                    ends_runs=ends)
        for job in rereports_after:  # sent when they reach the queue (flush)
            item.then.append(Item("event", event=self._end_event(job, job.outcome), job=job))
        self.handles = dict(instances)
        self.resyncing += 1
        self._post(item)

    @precondition(lambda self: self.connected)
    @rule(data=st.data())
    def poll(self, data):
        """blockJobInfo on some disks of the domains the host knows, through its handles."""
        targets = [k for k in KEYS if k[0] in self.handles]
        if not targets:
            return
        chosen = data.draw(st.lists(st.sampled_from(targets), min_size=1, unique=True), label="poll")
        self._poll(chosen)

    def _poll(self, keys) -> None:
        answers, shown = [], {}
        for key in keys:
            handle = self.handles[key[0]]
            run = self.run[key[0]]
            if run is None or run.uuid != handle.uuid:
                continue  # VIR_ERR_NO_DOMAIN / not running: no answer
            job = self.jobs.get(key)
            answers.append(PollAnswer(key[0], key[1], handle, job.info if job else None, self._read()))
            shown[key] = job
        if answers:
            self._post(Item("polls", answers=tuple(answers), shown={k: j for k, j in shown.items() if j}))

    @precondition(lambda self: self.connected)
    @rule(domain=st.sampled_from(DOMAINS))
    def refresh(self, domain):
        """After an event or a lost job: the domain's XML, or a "stopped" if it is not running."""
        self._refresh(domain)

    def _refresh(self, domain) -> None:
        self._read()
        run = self.run[domain]
        if run is None:
            self.handles.pop(domain, None)
            self._post(Item("lifecycle", event=LifecycleEvent(domain, "stopped", self.now, self.now + WALL, None),
                            ends_runs=frozenset(self.runs_seen[domain])))
        else:
            self.handles[domain] = run
            self._post(Item("update", args=(domain, self._disks_of(domain), run),
                            ends_runs=frozenset(r for r in self.runs_seen[domain] if r != run)))

    @precondition(lambda self: self.connected)
    @rule()
    def inventory(self):
        self._inventory()

    def _inventory(self) -> None:
        self._read()
        running = self._running()
        instances = {d: self.run[d] for d in running}
        ends = frozenset(r for d in DOMAINS for r in self.runs_seen[d] if r != self.run[d])
        self.handles = dict(instances)
        self._post(Item("inventory", args=({d: self._disks_of(d) for d in running}, instances), ends_runs=ends))

    @precondition(lambda self: self.connected)
    @rule()
    def expire(self):
        self._post(Item("expire"))

    # ------------------------------------------------------------------ the dispatcher and time

    @precondition(lambda self: self.posted)
    @rule()
    def flush(self):
        """A posted record joins the queue, behind the events that arrived before it."""
        item = self.posted.popleft()
        self.main.append(item)
        for event in item.then:
            event.event = replace(event.event, monotonic=self.now)
            event.job.event_sent = True
            self.main.append(event)

    @precondition(lambda self: self.main)
    @rule(n=st.integers(1, 4))
    def dispatch(self, n):
        for _ in range(min(n, len(self.main))):
            self._apply_next()

    @precondition(lambda self: not self.main)  # A4
    @rule(dt=st.sampled_from((0.01, 0.1, 0.3, 1.0)))
    def tick(self, dt):
        self._emit_delayed(self.now + dt)
        self.now += dt

    @precondition(lambda self: not self.main and not self.posted and not self.delayed and not self.lagged)  # A4
    @rule(dt=st.sampled_from((SETTLE + 0.01, GRACE + 0.01, 10.0, RETENTION + 6)))
    def jump(self, dt):
        self.now += dt

    @precondition(lambda self: self.connected)
    @rule(inventory=st.booleans())
    def cycle(self, inventory):
        """One quiet poll interval of the host: time passes, jobs move, every disk is read and
        applied, then ``expire`` (and maybe the inventory)."""
        self._drain()
        self.tick(1.0)
        self._drain()
        for job in self.jobs.values():
            job.cur = min(job.end - 1, job.cur + 100)
        self._poll([k for k in KEYS if k[0] in self.handles])
        self._post(Item("expire"))
        if inventory:
            self._inventory()
        self._drain()

    @rule()
    def quiesce(self):
        """Let the state learn everything, then check it counted every job it knew of exactly once."""
        self._emit_delayed(float("inf"))
        if not self.connected:
            self.connected = True
            for job in self.all_jobs:
                job.lost_event = False
            self._resync(complete=True, rereports_before=(), rereports_after=())
        self._drain()
        for domain in DOMAINS:
            self._refresh(domain)
        self._inventory()
        self._drain()
        self._poll([k for k in KEYS if k[0] in self.handles])
        self._drain()
        self.now += GRACE + 0.01
        self._post(Item("expire"))
        self._drain()
        self._poll([k for k in KEYS if k[0] in self.handles])
        self._drain()
        snap = self.state.snapshot()
        world = {k: j for k, j in self.jobs.items()}
        assert {k: (j.job_type, j.instance) for k, j in snap.jobs.items()} == \
            {k: (j.job_type, j.run) for k, j in world.items()}, "after quiescing, the active jobs are the world's"
        assert snap.running_domains == frozenset(self._running())
        for job in self.all_jobs:
            if job.outcome is None:
                assert job.counted is None and self.tracked[job.key][0] is job, f"{job!r} is tracked as itself"
            elif job.tracked_ever or job.event_applied:
                assert job.counted is not None, f"{job!r} ended and the state knew of it, but it was never counted"

    def _drain(self) -> None:
        while self.main or self.posted:
            if self.main:
                self._apply_next()
            else:
                self.flush()

    # ------------------------------------------------------------------ applying one record, and the checks

    def _apply_next(self) -> None:
        item = self.main.popleft()
        self.applied += 1
        before = dict(self.tracked)
        st_ = self.state
        if item.kind in ("event", "lifecycle"):
            records = st_.apply(item.event)
        elif item.kind == "polls":
            records = st_.apply_polls(item.answers)
        elif item.kind == "resync":
            inventory, jobs, call_started, complete, instances = item.args
            records = st_.resync(inventory, jobs, call_started, jobs_complete=complete, instances=instances)
            st_.apply(ConnectionEvent(True, self.now, self.now + WALL))
            self.resyncing -= 1
        elif item.kind == "update":
            records = st_.update_domain(*item.args)
        elif item.kind == "inventory":
            records = st_.replace_inventory(*item.args)
        elif item.kind == "expire":
            records = st_.expire()
        else:  # pragma: no cover
            raise AssertionError(item.kind)
        self.told_ended |= item.ends_runs
        snap = st_.snapshot()
        note(f"applied {item!r} -> {records}")
        self._attribute(item, records, before, snap)
        self._check_counters(snap)

    def _attribute(self, item: Item, records, before, snap) -> None:
        reported = [r for r in records if not r.inferred]
        inferred = [r for r in records if r.inferred]
        ended_by_event = None
        event = item.event
        if item.kind == "event" and event.event_id == "block_job_2" and event.status in OUTCOMES:
            job = item.job
            job.event_applied = True
            if job.counted is None:
                assert len(reported) == 1, f"libvirt reported the end of {job!r}, not counted before, and " \
                                           f"the state did not count it: {records}"
                r = reported[0]
                assert (r.domain, r.disk, r.job_type, r.outcome) == (job.domain, job.disk, job.job_type, job.outcome)
                job.counted = "reported"
                ended_by_event = job
                coverage("an end counted from its event" + (" (re-reported)" if job.rereported else ""))
            else:
                assert not reported, f"{job!r} was counted ({job.counted}) and its event counted it again"
                coverage("an event for an end already counted, ignored" + (" (re-reported)" if job.rereported else ""))
        else:
            assert not reported, f"only a BLOCK_JOB_2 end counts a reported outcome: {item!r} -> {records}"

        active = {(k, _identity(j)) for k, j in snap.jobs.items()}
        held_now = {(t.job.key, _identity(t.job)) for t in self.state.tracked_jobs()[1]} - active
        held_before, self.held = self.held, {}
        for key, job, ident in [(k, j, i) for k, (j, i) in before.items()] + \
                [(k, j, i) for (k, i), j in held_before.items()]:
            if (key, ident) in active:
                continue
            if (key, ident) in held_now:
                assert job.outcome is not None, f"the state holds {job!r}, which still runs"
                if (key, ident) not in held_before:
                    coverage(f"a job held on {item.kind}")
                self.held[(key, ident)] = job
                continue
            if job is ended_by_event:
                if (key, ident) in held_before:
                    coverage("a held job counted from its event")
                continue
            mine = [r for r in inferred if (r.domain, r.disk, r.job_type) == (key[0], key[1], job.job_type)]
            assert mine, f"tracked {job!r} left the state without being counted ({item!r} -> {records})"
            r = mine[0]
            inferred.remove(r)
            if (key, ident) in held_before:
                coverage(f"a held job inferred on {item.kind}")
            assert r.job_type == job.job_type
            assert job.outcome is not None, f"the state inferred the end of {job!r}, which still runs"
            assert job.counted is None, f"{job!r} was counted ({job.counted}) and inferred again"
            job.counted = "inferred"
            coverage(f"an end inferred on {item.kind}")
            if item.kind == "lifecycle" and job.run in item.ends_runs:
                want = "failed" if item.event.kind == "crashed" else "canceled"
                assert r.outcome == want, f"a {item.event.kind} run's jobs end {want}"
            if item.kind == "resync" and key not in item.args[1]:
                self.settle_until[key] = self.now + SETTLE
        assert not inferred, f"inferred ends of no tracked job: {inferred}"
        if item.kind == "lifecycle" and event.instance is not None and event.kind in ("stopped", "crashed"):
            left = [job for job in self.held.values() if job.run in item.ends_runs]
            assert not left, f"{item!r} ended their run, yet {left} are still held"

        self.tracked = {}
        for key, cur in snap.jobs.items():
            prev = before.get(key)
            if prev is not None and _identity(cur) == prev[1]:
                self.tracked[key] = prev
                continue
            shown = item.shown.get(key)
            assert shown is not None, f"{cur!r} appeared though {item!r} showed no job there"
            assert (shown.job_type, shown.run) == (cur.job_type, cur.instance), f"{cur!r} is not {shown!r}"
            assert shown.counted is None, f"{shown!r} was counted and is tracked again"
            shown.tracked_ever = True
            if shown.outcome is not None:
                coverage("a job tracked after it ended")
            self.tracked[key] = (shown, _identity(cur))

        for r in records:
            series = (r.domain, r.disk, r.job_type, r.outcome)
            self.expected[series] += 1
            if r.inferred:
                self.expected_inferred[series] += 1

        for key, cur in snap.jobs.items():
            assert cur.domain in snap.running_domains, f"{cur!r} outlives its domain"
            assert cur.instance not in self.told_ended, f"{cur!r} outlives its run"

    def _check_counters(self, snap) -> None:
        for d in snap.running_domains:
            self.running_seen[d] = self.now
        outcomes, inferred = dict(snap.outcomes), dict(snap.inferred_outcomes)
        for prev, cur in ((self.prev_outcomes, outcomes), (self.prev_inferred, inferred)):
            for series, value in prev.items():
                if series in cur:
                    assert cur[series] >= value, f"{series} went down from {value} to {cur[series]}"
                    continue
                domain = series[0]
                assert domain not in snap.running_domains and \
                    self.now - self.running_seen.get(domain, -1e9) >= RETENTION, \
                    f"{series} dropped while {domain} is retained"
                for table in (self.expected, self.expected_inferred):
                    for k in [k for k in table if k[0] == domain]:
                        del table[k]
        assert {k: v for k, v in outcomes.items() if v} == {k: v for k, v in self.expected.items() if v}
        assert {k: v for k, v in inferred.items() if v} == {k: v for k, v in self.expected_inferred.items() if v}
        self.prev_outcomes, self.prev_inferred = outcomes, inferred

    def teardown(self) -> None:
        coverage(f"jobs started: {min(len(self.all_jobs), 8)}")
        # Every run ends with a full quiesce (unless a step already failed), so that every case is
        # checked against the world at least once.
        if sys.exc_info()[0] is None:
            self.quiesce()


TestStateMachine = StateMachine.TestCase
TestStateMachine.settings = settings(stateful_step_count=STEPS)
