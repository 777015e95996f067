"""What the exporter knows about disks and block jobs, behind one lock.

Events are hints and polls are samples; ``resync`` after every (re)connect is the truth. Writers
are applied in the order libvirt sent them: ``libvirt_host`` queues poll answers, refreshes and
resyncs behind every event libvirt delivered before the answer. The hard part is counting every
outcome exactly once when the same end can be seen four ways (a ``BLOCK_JOB_2`` event, a poll that
no longer finds the job, a lifecycle event, a resync) and a domain of the same name can be another
run of it. The rules:

* Only ``BLOCK_JOB_2`` events count outcomes; ``BLOCK_JOB`` is the same outcome named by path.
* A job belongs to one run of its domain (``DomainInstance``: UUID and runtime id). An answer or
  event from another run never updates, ends or stands in for it. When a run ends (stopped,
  crashed, or a later run seen) its jobs end, inferred (after the hold below), and later events
  for them are not counted: their ends were counted when the run ended. A later event of that run
  for a disk whose job was not known then counts: that job ran between two polls.
* A refresh, listing or resync that names a run a lifecycle event said has ended was read before
  that event and applied after it (an event can overtake what the poller read): that domain is
  taken as not running, so that the run and its jobs do not come back. Only an event tells this:
  a listing that misses a domain may itself predate the domain's start.
* A poll that no longer finds a job parks it as *pending* for ``pending_grace`` seconds; if no event
  names the outcome by then, it is inferred from the disk (see ``infer_outcome``).
* A run that ends with no lifecycle event yet (a listing or refresh no longer finds it, a later run
  is seen, or a job restored from the state file is of a run no longer there) holds its jobs for
  ``pending_grace`` seconds before they are inferred canceled: libvirtd drops a domain from its
  lists before its event reaches us, and that event (or a block-job event of the run) still tells
  crashed from destroyed. Held jobs are no longer active but stay in the state file.
* A poll answer for a disk whose job ended after that poll's call began is stale and ignored.
* An event for a disk with no known job counts (the job ran between two polls), except the first
  one within ``settle`` seconds after a resync inferred the end of a job of the same run on that
  disk: that is libvirt re-reporting an end that happened while it was down. It queues the report
  before answering the resync's read, but its event thread can lag its RPC worker, so the report
  may arrive just after the resync; the window is short so that a job started right after a
  reconnect still counts. Every event that is not counted is logged with the reason.
* Series of a domain that is gone are dropped after ``retention`` seconds; a domain that comes back
  within it keeps its counters.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Callable, Iterable, Mapping

from .model import (
    OUTCOMES,
    ActiveJob,
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

log = logging.getLogger(__name__)

_ENDED_KEPT_SECONDS = 300.0  # an in-flight poll answer is never older than this
_STOPPED_RUNS_KEPT = 4096
RECENT_OUTCOMES = 50  # outcome records kept for the status page and CLI
# A job's rate follows its cursor with this time constant: long enough to smooth QEMU's chunked
# progress seen through a fast poll, short enough that a new bandwidth cap shows within seconds.
RATE_SMOOTHING_SECONDS = 2.0


@dataclass(frozen=True)
class TrackedJob:
    """An active job with the facts outcome inference needs; what the state file keeps."""

    job: ActiveJob
    chain_at_start: tuple[str, ...]
    source_at_start: str
    held: bool = False  # its run has ended; awaiting the stop event that tells how


@dataclass(frozen=True)
class _Held:
    """A job of a run that ended with no lifecycle event yet, awaiting one until ``until``."""

    tracked: TrackedJob
    until: float  # monotonic


@dataclass(frozen=True)
class _Settling:
    """The end of a job a resync inferred; libvirt may still re-report it just after."""

    instance: DomainInstance | None
    job_type: str
    outcome: str
    until: float  # monotonic


def _same_run(a: DomainInstance | None, b: DomainInstance | None) -> bool:
    """Whether two sightings can be the same run; None is unknown, and id -1 (what libvirt says of
    a domain once it has stopped, e.g. in the event for a destroy) is any run of that UUID."""
    if a is None or b is None or a == b:
        return True
    return (a.id < 0 or b.id < 0) and a.uuid == b.uuid


def infer_outcome(job: ActiveJob, tracked: TrackedJob | None, disk_now: DiskInfo | None,
                  domain_running: bool, domain_crashed: bool = False) -> str:
    """Tell how a job ended when libvirt never said.

    Evidence in order: the domain died (crash -> failed, otherwise canceled); the disk changed the
    way only success changes it (a pull or commit removed backing images, a copy or active commit
    pivoted to a new source); a mirroring job that was ready and left the disk as it was was
    aborted (canceled). Anything else cannot be told from the outside and is counted as failed, so
    that the failure alert surfaces it rather than hiding a real failure.
    """
    if not domain_running:
        return "failed" if domain_crashed else "canceled"
    if tracked is not None and disk_now is not None:
        chain_now = tuple(image.path for image in disk_now.backing_chain)
        if job.job_type in ("pull", "commit"):
            if len(chain_now) < len(tracked.chain_at_start):
                return "completed"
            if job.job_type == "pull" and not tracked.chain_at_start and not chain_now:
                # No pull runs on a flat disk: the chain read at its start predates a new layer,
                # and the disk is flat now, so the pull flattened it.
                return "completed"
        elif job.job_type in ("copy", "active_commit"):
            if disk_now.source != tracked.source_at_start or chain_now != tracked.chain_at_start:
                return "completed"
            if job.ready:
                return "canceled"
    return "failed"


def _rate(job: ActiveJob, cur: int, now: float) -> float | None:
    """The job's rate after its cursor moved to ``cur`` at ``now``: the bytes since the last move
    over the time since it, averaged with the rate before by how long that took (a move after a
    long stall weighs fully). A cursor that went back is a new measurement (None)."""
    elapsed = now - job.cursor_changed_time
    if cur < job.cur:
        return None
    if elapsed <= 0:
        return job.rate
    latest = (cur - job.cur) / elapsed
    if job.rate is None:
        return latest
    return job.rate + (latest - job.rate) * (1.0 - math.exp(-elapsed / RATE_SMOOTHING_SECONDS))


class State:
    def __init__(self, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 pending_grace: float = 3.0, settle: float = 0.25, retention: float = 3600.0) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._monotonic = monotonic
        self._pending_grace = pending_grace
        self._settle = settle
        self._retention = retention
        self._connected = False
        self._running: set[str] = set()
        self._instances: dict[str, DomainInstance] = {}  # running domain -> its current run
        self._unresponsive: frozenset[str] = frozenset()
        self._stopped_runs: dict[DomainInstance, float] = {}  # run -> monotonic time it ended
        self._ended_with_run: dict[DomainInstance, set[str]] = {}  # stopped run -> disks whose job ended with it
        self._said_ended: dict[DomainInstance, float] = {}  # runs a lifecycle event ended -> monotonic
        self._gone_since: dict[str, float] = {}  # domain with series, not running -> monotonic
        self._disks: dict[DiskKey, DiskInfo] = {}
        self._jobs: dict[DiskKey, ActiveJob] = {}
        self._tracked: dict[DiskKey, TrackedJob] = {}
        self._pending: dict[DiskKey, float] = {}  # key -> monotonic time the poll lost the job
        # (disk, run, start time) -> a job of an ended run
        self._held: dict[tuple[DiskKey, DomainInstance | None, float], _Held] = {}
        # disk -> run -> monotonic time the last job of that run ended on it. Per run: the end of an
        # earlier run's job, inferred when a resync finds the new run, must not hide a later end.
        self._ended: dict[DiskKey, dict[DomainInstance | None, float]] = {}
        self._settling: dict[DiskKey, _Settling] = {}
        self._outcomes: dict[tuple[str, str, str, str], int] = {}
        self._inferred: dict[tuple[str, str, str, str], int] = {}
        self._recent: deque[OutcomeRecord] = deque(maxlen=RECENT_OUTCOMES)
        self._version = 0
        self._jobs_generation = 0  # bumps when a job starts or ends (not when it moves)
        self._last_prune = 0.0
        self._snapshot: Snapshot | None = None

    # ----------------------------------------------------------------- readers

    def snapshot(self) -> Snapshot:
        """An immutable view; cached until the next change so scrapes cost no copying."""
        with self._lock:
            if self._snapshot is None:
                series_disks = {(k[0], k[1]) for k in self._outcomes}
                series_disks.update(self._disks)
                self._snapshot = Snapshot(
                    connected=self._connected, disks=MappingProxyType(dict(self._disks)),
                    jobs=MappingProxyType(dict(self._jobs)), outcomes=MappingProxyType(dict(self._outcomes)),
                    inferred_outcomes=MappingProxyType(dict(self._inferred)), running_domains=frozenset(self._running),
                    version=self._version, taken_wall=self._clock(),
                    tracked_domains=len(self._running.union(k[0] for k in series_disks)),
                    tracked_disks=len(series_disks), unresponsive_domains=self._unresponsive,
                    recent_outcomes=tuple(reversed(self._recent)))
            return self._snapshot

    def job_cursor_times(self) -> dict[DiskKey, float]:
        """When each active job's cursor last moved, without building a snapshot."""
        with self._lock:
            return {key: job.cursor_changed_time for key, job in self._jobs.items()}

    def jobs_generation(self) -> int:
        """Changes when ``tracked_jobs`` would: lets the state file skip building them every cycle."""
        return self._jobs_generation

    def tracked_jobs(self) -> tuple[int, tuple[TrackedJob, ...]]:
        """(generation, jobs as they are now): the generation changes when a job starts, ends or
        becomes ready (an abort of a ready mirror is a cancel, of one not ready a failure)."""
        with self._lock:
            active = tuple(replace(self._tracked[key], job=job) for key, job in self._jobs.items() if key in self._tracked)
            return self._jobs_generation, active + tuple(replace(h.tracked, held=True) for h in self._held.values())

    # ----------------------------------------------------------------- writers

    def set_unresponsive(self, domains: frozenset[str]) -> None:
        """The domains whose ``blockJobInfo`` has not answered (a hung QEMU), as the poller sees them."""
        with self._lock:
            if domains != self._unresponsive:
                self._unresponsive = domains
                self._changed()

    def apply(self, event: BlockJobEvent | LifecycleEvent | ConnectionEvent) -> tuple[OutcomeRecord, ...]:
        """Apply one event; returns the outcomes it counted (for notifiers and the policy)."""
        with self._lock:
            if isinstance(event, BlockJobEvent):
                return self._apply_block_job(event)
            if isinstance(event, LifecycleEvent):
                return self._apply_lifecycle(event)
            if isinstance(event, ConnectionEvent):
                if self._connected != event.connected:
                    self._connected = event.connected
                    self._changed()
                return ()
            raise TypeError(f"unknown event {event!r}")  # pragma: no cover - programming error

    def apply_poll(self, domain: str, disk: str, info: JobInfo | None, call_started: float,
                   instance: DomainInstance | None = None) -> tuple[OutcomeRecord, ...]:
        """Apply one ``blockJobInfo`` answer; ``call_started`` is monotonic time before the call."""
        return self.apply_polls((PollAnswer(domain, disk, instance, info, call_started),))

    def apply_polls(self, answers: Iterable[PollAnswer]) -> tuple[OutcomeRecord, ...]:
        """Apply a batch of answers under one lock; most are "no job" and cost a lookup."""
        records: list[OutcomeRecord] = []
        with self._lock:
            now = None
            for answer in answers:
                key = (answer.domain, answer.disk)
                job = self._jobs.get(key)
                if answer.info is None and job is None:
                    continue
                if answer.domain not in self._running:
                    continue  # the domain stopped while the call was in flight
                current = self._instances.get(answer.domain)
                if not _same_run(answer.instance, current):
                    continue  # answered through the handle of an earlier run of the domain
                if self._ended_since(key, answer.call_started, current):
                    continue  # an event ended this job while the call was in flight
                if answer.info is None:
                    if key not in self._pending:
                        self._pending[key] = self._monotonic()
                    continue
                if now is None:
                    now = self._clock()
                if job is not None and not _same_run(job.instance, current):
                    # The run the job belonged to ended unseen; this is a job of the new run.
                    self._hold_run_jobs(answer.domain, job.instance)
                records.extend(self._sample(key, answer.info, now, current or answer.instance))
        return tuple(records)

    def expire(self) -> tuple[OutcomeRecord, ...]:
        """Infer outcomes of jobs the poll lost, and of jobs held for their run's stop event, over the
        grace ago with no event; drop series past the retention."""
        with self._lock:
            now = self._monotonic()
            records = []
            deadline = now - self._pending_grace
            for key in [k for k, lost_at in self._pending.items() if lost_at <= deadline]:
                running = key[0] in self._running and _same_run(self._jobs[key].instance, self._instances.get(key[0]))
                records.append(self._end_inferred(key, running))
            for held_key in [k for k, held in self._held.items() if held.until <= now]:
                records.append(self._end_held(held_key, crashed=False))
            self._forget_gone(now)
            return tuple(records)

    def update_domain(self, domain: str, disks: Iterable[DiskInfo],
                      instance: DomainInstance | None = None) -> tuple[OutcomeRecord, ...]:
        """Replace one running domain's disks (after a lifecycle or block-job event)."""
        with self._lock:
            if instance is not None and instance in self._said_ended:
                log.debug("refresh of %s read before run %d ended: ignored", domain, instance.id)
                return ()
            self._set_run(domain, instance)
            if domain not in self._running:
                self._running.add(domain)
                self._gone_since.pop(domain, None)
                self._changed()
            self._replace_disks(lambda key: key[0] == domain, {d.key: d for d in disks})
            return ()

    def replace_inventory(self, disks: Mapping[str, Iterable[DiskInfo]],
                          instances: Mapping[str, DomainInstance] | None = None) -> tuple[OutcomeRecord, ...]:
        """Replace the disk inventory; jobs of domains no longer running (or of an earlier run) are held
        for their stop event, then inferred (``expire``)."""
        with self._lock:
            self._set_inventory(disks, instances or {})
            self._changed()
            return ()

    def resync(self, disks: Mapping[str, Iterable[DiskInfo]], jobs: Mapping[DiskKey, JobInfo],
               call_started: float, jobs_complete: bool = True,
               instances: Mapping[str, DomainInstance] | None = None) -> tuple[OutcomeRecord, ...]:
        """Replace everything with what libvirt says now, counting jobs that ended unseen. ``disks`` maps
        every running domain to its disks, ``jobs`` holds every active job found. ``jobs_complete`` is
        False when some disks could not be polled: a job missing from ``jobs`` then ends only if its disk is gone."""
        with self._lock:
            self._set_inventory(disks, instances or {})
            records = []
            now_m = self._monotonic()
            for key, job in list(self._jobs.items()):
                if key in jobs or (not jobs_complete and key in self._disks):
                    continue
                if self._ended_since(key, call_started, None):
                    continue
                record = self._end_inferred(key)
                records.append(record)
                self._settling[key] = _Settling(job.instance, job.job_type, record.outcome, now_m + self._settle)
            now = self._clock()
            for key, info in jobs.items():
                if key[0] not in self._running:
                    continue  # read before its run ended
                if self._ended_since(key, call_started, self._instances.get(key[0])):
                    continue
                records.extend(self._sample(key, info, now, self._instances.get(key[0])))
            self._changed()
            return tuple(records)

    def restore(self, tracked: Iterable[TrackedJob]) -> None:
        """Jobs a previous process tracked (the state file); the first resync tells which still run, which ended."""
        with self._lock:
            until = self._monotonic() + self._pending_grace
            for entry in tracked:
                key = entry.job.key
                if entry.held:  # its stop event, if any, went to the previous process
                    self._held[(key, entry.job.instance, entry.job.start_time)] = _Held(replace(entry, held=False), until)
                else:
                    self._jobs[key] = entry.job
                    self._tracked[key] = entry
                for outcome in OUTCOMES:
                    self._outcomes.setdefault((key[0], key[1], entry.job.job_type, outcome), 0)
            self._jobs_generation += 1
            self._changed()

    # ----------------------------------------------------------------- internals (lock held)

    def _changed(self) -> None:
        self._version += 1
        self._snapshot = None

    def _ended_since(self, key: DiskKey, since: float, run: DomainInstance | None) -> bool:
        """Whether a job that can be of ``run`` ended on the disk at or after ``since``."""
        ends = self._ended.get(key)
        return ends is not None and any(at >= since and _same_run(ended, run) for ended, at in ends.items())

    def _set_run(self, domain: str, instance: DomainInstance | None) -> None:
        """Record the current run of a domain; the jobs of an earlier run are held (it has ended)."""
        if instance is None:
            return
        current = self._instances.get(domain)
        self._instances[domain] = instance
        if current is not None and current != instance:
            self._hold_run_jobs(domain, current)  # marks ``current`` stopped

    def _end_run_jobs(self, domain: str, run: DomainInstance | None, crashed: bool) -> tuple[OutcomeRecord, ...]:
        """A lifecycle event ended one run of a domain (every run, when ``run`` is None): its jobs,
        and those held since a listing missed it, end with it."""
        self._hold_run_jobs(domain, run)
        return tuple(self._end_held(k, crashed) for k in list(self._held)
                     if k[0][0] == domain and _same_run(k[1], run))

    def _hold_run_jobs(self, domain: str, run: DomainInstance | None) -> None:
        """One run of a domain (every run, when ``run`` is None) has ended with no lifecycle event
        yet: its jobs stop being active and wait ``pending_grace`` for the event that tells how."""
        now = self._monotonic()
        if run is not None:
            self._stopped_runs[run] = now
        for key, job in [(k, j) for k, j in self._jobs.items() if k[0] == domain and _same_run(j.instance, run)]:
            if job.instance is not None:
                self._stopped_runs[job.instance] = now
            owner = job.instance or run
            if owner is not None:
                self._ended_with_run.setdefault(owner, set()).add(key[1])
            tracked = self._tracked.pop(key, None) or TrackedJob(job, (), "")
            self._held[(key, owner, job.start_time)] = _Held(replace(tracked, job=self._jobs.pop(key)),
                                                            now + self._pending_grace)
            self._pending.pop(key, None)
            self._ended.setdefault(key, {})[job.instance] = now
            self._jobs_generation += 1
            self._changed()

    def _end_held(self, held_key: tuple[DiskKey, DomainInstance | None, float], crashed: bool,
                  outcome: str | None = None) -> OutcomeRecord:
        """Count a held job: with the outcome a block-job event named, else inferred from how its run ended."""
        tracked = self._held.pop(held_key).tracked
        self._jobs_generation += 1
        inferred = outcome is None
        if outcome is None:
            outcome = infer_outcome(tracked.job, tracked, None, domain_running=False, domain_crashed=crashed)
        return self._count(held_key[0], tracked.job.job_type, outcome, inferred, tracked.job.instance)

    def _set_inventory(self, disks: Mapping[str, Iterable[DiskInfo]],
                       instances: Mapping[str, DomainInstance]) -> None:
        now = self._monotonic()
        stale = {name for name, run in instances.items() if run in self._said_ended}
        if stale:
            log.debug("listing read before %s stopped: taken as not running", ", ".join(sorted(stale)))
            disks = {name: d for name, d in disks.items() if name not in stale}
            instances = {name: run for name, run in instances.items() if name not in stale}
        running = set(disks)
        for name in self._running - running:
            self._gone_since[name] = now
            run = self._instances.pop(name, None)
            if run is not None:
                self._stopped_runs[run] = now
        for name in running:
            self._gone_since.pop(name, None)
        self._running = running
        for name, run in instances.items():
            self._set_run(name, run)
        for name in {k[0] for k in self._jobs if k[0] not in running}:
            self._hold_run_jobs(name, None)
        for key, job in list(self._jobs.items()):  # a job restored from the state file, of a run now gone
            if key in self._jobs and not _same_run(job.instance, instances.get(key[0])):
                self._hold_run_jobs(key[0], job.instance)
        new_disks = {d.key: d for domain_disks in disks.values() for d in domain_disks}
        self._replace_disks(lambda key: True, new_disks)

    def _update_job(self, key: DiskKey, job: ActiveJob, info: JobInfo, now: float) -> None:
        """A new sample of a known job; the cursor's change time moves only when it moves."""
        if (info.cur == job.cur and info.end == job.end and info.bandwidth == job.bandwidth
                and (job.ready or not info.ready)):
            return  # the usual case: nothing to record
        moved = info.cur != job.cur
        self._jobs[key] = replace(job, cur=info.cur, end=info.end, bandwidth=info.bandwidth,
                                  ready=job.ready or info.ready,
                                  cursor_changed_time=now if moved else job.cursor_changed_time,
                                  rate=_rate(job, info.cur, now) if moved else job.rate)
        if info.ready and not job.ready:
            self._jobs_generation += 1
        self._changed()

    def _replace_disks(self, selected: Callable[[DiskKey], bool], new: dict[DiskKey, DiskInfo]) -> None:
        changed = False
        for key in [k for k in self._disks if selected(k) and k not in new]:
            del self._disks[key]
            changed = True
        for key, info in new.items():
            if self._disks.get(key) != info:
                self._disks[key] = info
                changed = True
                tracked = self._tracked.get(key)
                if tracked is not None and len(info.backing_chain) > len(tracked.chain_at_start):
                    # The job started on a disk read before a new layer was added (a snapshot sends
                    # no event we follow). No block job lengthens a chain, and none can start while
                    # one runs, so the longer chain is the one the job started from.
                    self._tracked[key] = replace(tracked, chain_at_start=tuple(i.path for i in info.backing_chain),
                                                 source_at_start=info.source)
        if changed:
            self._changed()

    def _sample(self, key: DiskKey, info: JobInfo, now: float,
                instance: DomainInstance | None) -> tuple[OutcomeRecord, ...]:
        """A poll's or resync's answer naming a job on the disk. A job of another type there means a
        new job took the disk between two samples without any event for the old one: it ended."""
        self._pending.pop(key, None)
        job = self._jobs.get(key)
        if job is not None and job.job_type == info.job_type:
            self._update_job(key, job, info, now)
            return ()
        records = () if job is None else (self._end_inferred(key),)
        self._start_job(key, info, now, instance)
        return records

    def _start_job(self, key: DiskKey, info: JobInfo, now: float, instance: DomainInstance | None) -> None:
        domain, disk = key
        job = self._jobs[key] = ActiveJob(
            domain=domain, disk=disk, job_type=info.job_type, cur=info.cur, end=info.end,
            bandwidth=info.bandwidth, ready=info.ready, start_time=now, cursor_changed_time=now,
            instance=instance)
        current = self._disks.get(key)
        self._tracked[key] = TrackedJob(job, tuple(i.path for i in current.backing_chain) if current else (),
                                        current.source if current else "")
        self._settling.pop(key, None)
        for outcome in OUTCOMES:
            self._outcomes.setdefault((domain, disk, info.job_type, outcome), 0)
        self._jobs_generation += 1
        self._changed()

    def _end_inferred(self, key: DiskKey, running: bool = True, crashed: bool = False) -> OutcomeRecord:
        outcome = infer_outcome(self._jobs[key], self._tracked.get(key), self._disks.get(key), running, crashed)
        return self._end_job(key, outcome, inferred=True)

    def _end_job(self, key: DiskKey, outcome: str, inferred: bool) -> OutcomeRecord:
        job = self._jobs.pop(key)
        self._tracked.pop(key, None)
        self._pending.pop(key, None)
        self._jobs_generation += 1
        return self._count(key, job.job_type, outcome, inferred, job.instance)

    def _count(self, key: DiskKey, job_type: str, outcome: str, inferred: bool,
               instance: DomainInstance | None) -> OutcomeRecord:
        domain, disk = key
        for each in OUTCOMES:
            self._outcomes.setdefault((domain, disk, job_type, each), 0)
        series = (domain, disk, job_type, outcome)
        self._outcomes[series] += 1
        if inferred:
            self._inferred[series] = self._inferred.get(series, 0) + 1
        self._ended.setdefault(key, {})[instance] = self._monotonic()
        if domain not in self._running:
            self._gone_since.setdefault(domain, self._monotonic())
        record = OutcomeRecord(domain=domain, disk=disk, job_type=job_type, outcome=outcome,
                               inferred=inferred, wall=self._clock())
        self._recent.append(record)
        self._changed()
        return record

    def _not_counted(self, event: BlockJobEvent, why: str) -> None:
        log.info("block job %s on %s/%s %s: not counted, %s", event.job_type, event.domain, event.disk,
                 event.status, why)

    def _apply_block_job(self, event: BlockJobEvent) -> tuple[OutcomeRecord, ...]:
        if event.event_id != "block_job_2":
            return ()  # same outcome as BLOCK_JOB_2, named by path: never counted
        key = (event.domain, event.disk)
        job = self._jobs.get(key)
        same_run = job is not None and _same_run(job.instance, event.instance)
        if event.status == "ready":
            if same_run and not job.ready:
                self._jobs[key] = replace(job, ready=True)
                self._jobs_generation += 1
                self._changed()
            return ()
        if event.status not in OUTCOMES:
            return ()
        if same_run:
            # The tracked type labels the series the gauges used; libvirt's event agrees with it.
            return (self._end_job(key, event.status, inferred=False),)
        run = event.instance
        held = next((k for k in self._held if k[0] == key and _same_run(k[1], run)), None)
        if held is not None:  # its run ended before libvirt said how: this says
            return (self._end_held(held, crashed=False, outcome=event.status),)
        if (run is not None and run.id >= 0 and run in self._stopped_runs
                and event.disk in self._ended_with_run.get(run, ())):
            self._not_counted(event, f"it reports the job of run {run.id} of the domain on this disk, "
                                     "counted when that run ended")
            return ()
        if job is not None and not _same_run(job.instance, self._instances.get(event.domain)):
            # A job of an earlier run is still tracked: that run has ended.
            self._hold_run_jobs(event.domain, job.instance)
        settling = self._settling.pop(key, None)
        if (settling is not None and _same_run(settling.instance, run) and event.monotonic <= settling.until
                and settling.job_type in (event.job_type, "unknown")):
            self._not_counted(event, f"libvirt re-reported the end of the {settling.job_type} job that the "
                                     f"resync after reconnecting counted as {settling.outcome} (inferred)")
            return ()
        return (self._count(key, event.job_type, event.status, inferred=False, instance=run),)

    def _apply_lifecycle(self, event: LifecycleEvent) -> tuple[OutcomeRecord, ...]:
        name, run = event.domain, event.instance
        current = self._instances.get(name)
        now = self._monotonic()
        if event.kind == "started":
            if current is not None and run is not None and current != run:
                self._said_ended[current] = now
            self._set_run(name, run)
            return ()
        if event.kind not in ("stopped", "crashed"):
            return ()
        crashed = event.kind == "crashed"
        if run is not None:  # None: a refresh found the domain inactive, as stale as any read
            if run.id >= 0:
                self._said_ended[run] = now
            elif current is not None and current.uuid == run.uuid:
                self._said_ended[current] = now
        if not _same_run(run, current):
            # The end of an earlier run, reported after a later run was seen.
            return self._end_run_jobs(name, run, crashed)
        self._instances.pop(name, None)
        for ended in (run, current):
            if ended is not None:
                self._stopped_runs[ended] = self._monotonic()
        if (name not in self._running and not any(k[0] == name for k in self._jobs)
                and not any(k[0][0] == name for k in self._held)):
            return ()
        self._running.discard(name)
        self._gone_since[name] = self._monotonic()
        if run is None:  # a read found the domain inactive; libvirt's own event still tells how it ended
            self._hold_run_jobs(name, current)
            records: tuple[OutcomeRecord, ...] = ()
        else:
            records = self._end_run_jobs(name, run, crashed)
        for key in [k for k in self._disks if k[0] == name]:
            del self._disks[key]
        self._changed()
        return records

    def _forget_gone(self, now: float) -> None:
        """Drop the series of domains gone longer than the retention, and bookkeeping no answer
        or event can need any more. Runs at most every few seconds: it walks the tables."""
        if now - self._last_prune < min(5.0, self._retention):
            return
        self._last_prune = now
        expired = {name for name, since in self._gone_since.items()
                   if now - since >= self._retention and name not in self._running}
        if expired:
            for table in (self._outcomes, self._inferred):
                for key in [k for k in table if k[0] in expired]:
                    del table[key]
            for name in expired:
                del self._gone_since[name]
            self._changed()
        for key, ends in list(self._ended.items()):
            for run in [run for run, at in ends.items() if now - at > _ENDED_KEPT_SECONDS]:
                del ends[run]
            if not ends or key[0] in expired:
                del self._ended[key]
        for key in [k for k, s in self._settling.items() if now > s.until]:
            del self._settling[key]
        kept = max(self._retention, _ENDED_KEPT_SECONDS)
        for run in [run for run, at in self._stopped_runs.items() if now - at > kept]:
            del self._stopped_runs[run]
        while len(self._stopped_runs) > _STOPPED_RUNS_KEPT:  # dicts keep insertion order: oldest first
            del self._stopped_runs[next(iter(self._stopped_runs))]
        for run in [run for run in self._ended_with_run if run not in self._stopped_runs]:
            del self._ended_with_run[run]
        for run in [run for run, at in self._said_ended.items() if now - at > kept]:
            del self._said_ended[run]
        while len(self._said_ended) > _STOPPED_RUNS_KEPT:
            del self._said_ended[next(iter(self._said_ended))]
