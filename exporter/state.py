"""What the exporter knows about disks and block jobs, behind one lock.

Events are hints and polls are samples; ``resync`` after every (re)connect is the truth. The hard
part is counting every outcome exactly once when the same end can be seen up to four ways: a
``BLOCK_JOB_2`` event, a poll that no longer finds the job, a lifecycle event for the domain, and
a resync after a reconnect. The rules:

* Only ``BLOCK_JOB_2`` events count outcomes; ``BLOCK_JOB`` is the same outcome named by path.
* A poll that no longer finds a job parks it as *pending* for ``pending_grace`` seconds, because
  the event that names the outcome may still be on its way. If none comes, the outcome is
  inferred from the disk (see ``infer_outcome``).
* A poll result for a disk whose job ended after that poll's call began is stale and ignored, so
  an in-flight poll cannot resurrect a job an event just ended.
* An event for a disk with no known job counts (the job ran between two polls) unless an outcome
  was inferred for that disk within ``dedup_window`` seconds: libvirt re-emits events for jobs that
  ended while it was down, and we may already have counted those at resync.
"""

from __future__ import annotations

import threading
import time
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
    JobInfo,
    LifecycleEvent,
    OutcomeRecord,
    Snapshot,
)

_RECENT_OUTCOMES_KEPT = 256


@dataclass(frozen=True)
class _Tracked:
    """Per-job facts the snapshot does not show but outcome inference needs."""

    chain_at_start: tuple[str, ...]
    source_at_start: str


@dataclass(frozen=True)
class _Ended:
    monotonic: float
    inferred: bool


def infer_outcome(job: ActiveJob, tracked: _Tracked | None, disk_now: DiskInfo | None,
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
        elif job.job_type in ("copy", "active_commit"):
            if disk_now.source != tracked.source_at_start or chain_now != tracked.chain_at_start:
                return "completed"
            if job.ready:
                return "canceled"
    return "failed"


class State:
    def __init__(self, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 pending_grace: float = 3.0, dedup_window: float = 60.0) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._monotonic = monotonic
        self._pending_grace = pending_grace
        self._dedup_window = dedup_window
        self._connected = False
        self._running: set[str] = set()
        self._disks: dict[DiskKey, DiskInfo] = {}
        self._jobs: dict[DiskKey, ActiveJob] = {}
        self._tracked: dict[DiskKey, _Tracked] = {}
        self._pending: dict[DiskKey, float] = {}  # key -> monotonic time the poll lost the job
        self._ended: dict[DiskKey, _Ended] = {}
        self._outcomes: dict[tuple[str, str, str, str], int] = {}
        self._inferred: dict[tuple[str, str, str, str], int] = {}
        self._recent: list[OutcomeRecord] = []
        self._version = 0
        self._snapshot: Snapshot | None = None

    # ----------------------------------------------------------------- readers

    def snapshot(self) -> Snapshot:
        """An immutable view; cached until the next change so scrapes cost no copying."""
        with self._lock:
            if self._snapshot is None:
                self._snapshot = Snapshot(
                    connected=self._connected,
                    disks=MappingProxyType(dict(self._disks)),
                    jobs=MappingProxyType(dict(self._jobs)),
                    outcomes=MappingProxyType(dict(self._outcomes)),
                    inferred_outcomes=MappingProxyType(dict(self._inferred)),
                    running_domains=frozenset(self._running),
                    version=self._version,
                    taken_monotonic=self._monotonic(),
                    taken_wall=self._clock(),
                    recent_outcomes=tuple(self._recent),
                )
            return self._snapshot

    def job_cursor_times(self) -> dict[DiskKey, float]:
        """When each active job's cursor last moved, without building a snapshot."""
        with self._lock:
            return {key: job.cursor_changed_time for key, job in self._jobs.items()}

    def has_pending(self) -> bool:
        with self._lock:
            return bool(self._pending)

    # ----------------------------------------------------------------- writers

    def apply(self, event: BlockJobEvent | LifecycleEvent | ConnectionEvent) -> tuple[OutcomeRecord, ...]:
        """Apply one event; returns the outcomes it counted (for notifiers and the policy)."""
        with self._lock:
            if isinstance(event, BlockJobEvent):
                result = self._apply_block_job(event)
            elif isinstance(event, LifecycleEvent):
                result = self._apply_lifecycle(event)
            elif isinstance(event, ConnectionEvent):
                if self._connected != event.connected:
                    self._connected = event.connected
                    self._changed()
                result = ()
            else:  # pragma: no cover - programming error
                raise TypeError(f"unknown event {event!r}")
            return result

    def apply_poll(self, domain: str, disk: str, info: JobInfo | None, call_started: float) -> None:
        """Apply one ``blockJobInfo`` answer; ``call_started`` is monotonic time before the call."""
        self.apply_polls(((domain, disk, info, call_started),))

    def apply_polls(self, answers: Iterable[tuple[str, str, JobInfo | None, float]]) -> None:
        """Apply a poll cycle's answers under one lock; most are "no job" and cost a lookup."""
        with self._lock:
            jobs, now = self._jobs, None
            for domain, disk, info, call_started in answers:
                key = (domain, disk)
                job = jobs.get(key)
                if info is None and job is None:
                    continue
                ended = self._ended.get(key)
                if ended is not None and ended.monotonic >= call_started:
                    continue  # an event ended this job while the call was in flight
                if domain not in self._running:
                    continue  # the domain stopped while the call was in flight
                if info is None:
                    if key not in self._pending:
                        self._pending[key] = self._monotonic()
                    continue
                self._pending.pop(key, None)
                if now is None:
                    now = self._clock()
                if job is not None and job.job_type != info.job_type:
                    # A different job took the disk between two polls without any event for the
                    # old one: the old one ended, the new one starts now.
                    self._end_job(key, infer_outcome(job, self._tracked.get(key), self._disks.get(key), True),
                                  inferred=True, job_type=job.job_type)
                    job = None
                if job is None:
                    self._start_job(key, info, now)
                else:
                    self._update_job(key, job, info, now)

    def expire_pending(self) -> tuple[OutcomeRecord, ...]:
        """Infer outcomes for jobs the poll lost longer than the grace ago with no event."""
        with self._lock:
            if not self._pending:
                return ()
            deadline = self._monotonic() - self._pending_grace
            records = []
            for key, lost_at in list(self._pending.items()):
                if lost_at > deadline:
                    continue
                job = self._jobs[key]
                outcome = infer_outcome(job, self._tracked.get(key), self._disks.get(key),
                                        key[0] in self._running)
                records.append(self._end_job(key, outcome, inferred=True))
            return tuple(records)

    def update_domain(self, domain: str, disks: Iterable[DiskInfo]) -> None:
        """Replace one running domain's disks (after a lifecycle or block-job event)."""
        with self._lock:
            if domain not in self._running:
                self._running.add(domain)
                self._changed()
            self._replace_disks(lambda key: key[0] == domain, {d.key: d for d in disks})

    def replace_inventory(self, disks: Mapping[str, Iterable[DiskInfo]]) -> tuple[OutcomeRecord, ...]:
        """Replace the disk inventory; jobs of domains no longer running end (inferred)."""
        with self._lock:
            self._set_inventory(disks)
            records = []
            for key in [k for k in self._jobs if k[0] not in self._running]:
                outcome = infer_outcome(self._jobs[key], self._tracked.get(key), None, False)
                records.append(self._end_job(key, outcome, inferred=True))
            self._changed()
            return tuple(records)

    def resync(self, disks: Mapping[str, Iterable[DiskInfo]], jobs: Mapping[DiskKey, JobInfo],
               call_started: float, jobs_complete: bool = True) -> tuple[OutcomeRecord, ...]:
        """Replace everything with what libvirt says now, counting jobs that ended unseen.

        ``disks`` maps every running domain to its disks; ``jobs`` holds every active job found.
        ``jobs_complete`` is False when some disks could not be polled: their jobs then stay as
        they were rather than being counted as ended.
        """
        with self._lock:
            self._set_inventory(disks)
            records = []
            for key in list(self._jobs):
                if key in jobs:
                    continue
                if not jobs_complete and key[0] in self._running and key in self._disks:
                    continue
                ended = self._ended.get(key)
                if ended is not None and ended.monotonic >= call_started:
                    continue
                job = self._jobs[key]
                outcome = infer_outcome(job, self._tracked.get(key), self._disks.get(key),
                                        key[0] in self._running)
                records.append(self._end_job(key, outcome, inferred=True))
            now = self._clock()
            for key, info in jobs.items():
                ended = self._ended.get(key)
                if ended is not None and ended.monotonic >= call_started:
                    continue
                job = self._jobs.get(key)
                self._pending.pop(key, None)
                if job is None or job.job_type != info.job_type:
                    if job is not None:
                        records.append(self._end_job(key, "failed", inferred=True))
                    self._start_job(key, info, now)
                else:
                    self._update_job(key, job, info, now)
            self._changed()
            return tuple(records)

    # ----------------------------------------------------------------- internals (lock held)

    def _changed(self) -> None:
        self._version += 1
        self._snapshot = None

    def _set_inventory(self, disks: Mapping[str, Iterable[DiskInfo]]) -> None:
        self._running = set(disks)
        new_disks = {d.key: d for domain_disks in disks.values() for d in domain_disks}
        self._replace_disks(lambda key: True, new_disks)

    def _update_job(self, key: DiskKey, job: ActiveJob, info: JobInfo, now: float) -> None:
        """A new sample of a known job; the cursor's change time moves only when it moves."""
        if (info.cur == job.cur and info.end == job.end and info.bandwidth == job.bandwidth
                and (job.ready or not info.ready)):
            return  # the usual case: nothing to record
        updated = replace(
            job,
            cur=info.cur,
            end=info.end,
            bandwidth=info.bandwidth,
            ready=job.ready or info.ready,
            cursor_changed_time=now if info.cur != job.cur else job.cursor_changed_time,
        )
        if updated != job:
            self._jobs[key] = updated
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
        if changed:
            self._changed()

    def _start_job(self, key: DiskKey, info: JobInfo, now: float) -> None:
        domain, disk = key
        self._jobs[key] = ActiveJob(
            domain=domain, disk=disk, job_type=info.job_type, cur=info.cur, end=info.end,
            bandwidth=info.bandwidth, ready=info.ready, start_time=now, cursor_changed_time=now)
        current = self._disks.get(key)
        self._tracked[key] = _Tracked(
            chain_at_start=tuple(i.path for i in current.backing_chain) if current else (),
            source_at_start=current.source if current else "")
        for outcome in OUTCOMES:
            self._outcomes.setdefault((domain, disk, info.job_type, outcome), 0)
        self._changed()

    def _end_job(self, key: DiskKey, outcome: str, inferred: bool, job_type: str | None = None) -> OutcomeRecord:
        job = self._jobs.pop(key, None)
        self._tracked.pop(key, None)
        self._pending.pop(key, None)
        job_type = job_type or (job.job_type if job else "unknown")
        return self._count(key, job_type, outcome, inferred)

    def _count(self, key: DiskKey, job_type: str, outcome: str, inferred: bool) -> OutcomeRecord:
        domain, disk = key
        for each in OUTCOMES:
            self._outcomes.setdefault((domain, disk, job_type, each), 0)
        self._outcomes[(domain, disk, job_type, outcome)] += 1
        if inferred:
            counter_key = (domain, disk, job_type, outcome)
            self._inferred[counter_key] = self._inferred.get(counter_key, 0) + 1
        self._ended[key] = _Ended(monotonic=self._monotonic(), inferred=inferred)
        record = OutcomeRecord(domain=domain, disk=disk, job_type=job_type, outcome=outcome,
                               inferred=inferred, wall=self._clock())
        self._recent.append(record)
        if len(self._recent) > _RECENT_OUTCOMES_KEPT:
            del self._recent[: len(self._recent) - _RECENT_OUTCOMES_KEPT]
        self._changed()
        return record

    def _apply_block_job(self, event: BlockJobEvent) -> tuple[OutcomeRecord, ...]:
        if event.event_id != "block_job_2":
            return ()  # same outcome as BLOCK_JOB_2, named by path: never counted
        key = (event.domain, event.disk)
        job = self._jobs.get(key)
        if event.status == "ready":
            if job is not None and not job.ready:
                self._jobs[key] = replace(job, ready=True)
                self._changed()
            return ()
        if event.status not in OUTCOMES:
            return ()
        if job is not None:
            # The tracked type labels the series the gauges used; libvirt's event agrees with it.
            return (self._end_job(key, event.status, inferred=False, job_type=job.job_type),)
        ended = self._ended.get(key)
        if ended is not None and ended.inferred and event.monotonic - ended.monotonic <= self._dedup_window:
            return ()  # re-emitted by libvirt for an end we already inferred at resync
        return (self._count(key, event.job_type, event.status, inferred=False),)

    def _apply_lifecycle(self, event: LifecycleEvent) -> tuple[OutcomeRecord, ...]:
        if event.kind not in ("stopped", "crashed", "undefined"):
            return ()
        if event.domain not in self._running and not any(k[0] == event.domain for k in self._jobs):
            return ()
        self._running.discard(event.domain)
        records = []
        for key in [k for k in self._jobs if k[0] == event.domain]:
            outcome = infer_outcome(self._jobs[key], self._tracked.get(key), None, False,
                                    domain_crashed=event.kind == "crashed")
            records.append(self._end_job(key, outcome, inferred=True))
        for key in [k for k in self._disks if k[0] == event.domain]:
            del self._disks[key]
        self._changed()
        return tuple(records)
