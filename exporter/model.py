"""Immutable records shared by every layer.

libvirt callbacks, the poller, the state and the collector exchange only these, so nothing
outside ``libvirt_host`` needs to know libvirt's integer constants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

JOB_TYPES = ("pull", "copy", "commit", "active_commit", "backup", "unknown")
OUTCOMES = ("completed", "failed", "canceled")

DiskKey = tuple[str, str]  # (domain name, disk target such as "vda")


@dataclass(frozen=True)
class DomainInstance:
    """One run of a domain. A domain gets a new runtime id each time it starts (and one recreated
    from XML usually a new UUID), so a job of a restarted domain is never the job of the run before
    it, even under the same name."""

    uuid: str
    id: int


@dataclass(frozen=True)
class BackingImage:
    """One image below the active layer, as the live domain XML names it."""

    path: str  # file path, or "" for a non-file source (network, block device without path)
    format: str  # "qcow2", "raw", ... or "" when libvirt did not say


@dataclass(frozen=True)
class DiskInfo:
    domain: str
    disk: str  # target dev, e.g. "vda"
    source: str  # path of the active layer ("" if not a file)
    format: str
    backing_chain: tuple[BackingImage, ...]  # top-down, excluding the active layer

    @property
    def key(self) -> DiskKey:
        return (self.domain, self.disk)

    @property
    def backing_depth(self) -> int:
        return len(self.backing_chain)


@dataclass(frozen=True)
class JobInfo:
    """What one ``virDomainGetBlockJobInfo`` call said about an active job."""

    job_type: str  # one of JOB_TYPES
    cur: int
    end: int
    bandwidth: int  # bytes per second, 0 = unlimited

    @property
    def ready(self) -> bool:
        # libvirt holds cur at end-1 until a pull is gone; only mirroring jobs reach cur == end.
        return self.job_type in ("copy", "active_commit") and self.end > 0 and self.cur == self.end


@dataclass(frozen=True)
class ActiveJob:
    domain: str
    disk: str
    job_type: str
    cur: int
    end: int
    bandwidth: int
    ready: bool
    start_time: float  # Unix time the exporter first saw the job
    cursor_changed_time: float  # Unix time cur last moved (start_time until it does)
    instance: DomainInstance | None = None  # the run of the domain the job belongs to
    # Bytes per second, smoothed over the cursor's recent moves (State._update_job); None until
    # the cursor has moved once since the job was first seen.
    rate: float | None = None

    @property
    def key(self) -> DiskKey:
        return (self.domain, self.disk)

    @property
    def progress_ratio(self) -> float:
        return self.cur / self.end if self.end > 0 else 0.0


@dataclass(frozen=True)
class BlockJobEvent:
    """A ``VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2`` (or ``BLOCK_JOB``) delivery, built in the event-loop thread."""

    domain: str
    disk: str  # the target for BLOCK_JOB_2, a file path for BLOCK_JOB
    job_type: str
    status: str  # one of OUTCOMES or "ready"
    event_id: str  # "block_job_2" or "block_job"
    monotonic: float
    wall: float
    instance: DomainInstance | None = None  # None: not known (matches any run)


@dataclass(frozen=True)
class LifecycleEvent:
    domain: str
    kind: str  # "started", "stopped", "crashed", "undefined", "defined", "suspended", "resumed", "other"
    monotonic: float
    wall: float
    instance: DomainInstance | None = None


@dataclass(frozen=True)
class ConnectionEvent:
    """The link to libvirtd went up or down (posted by the connection manager, not libvirt)."""

    connected: bool
    monotonic: float
    wall: float


@dataclass(frozen=True)
class PollAnswer:
    """One ``blockJobInfo`` answer, applied in the order libvirt sent it relative to events."""

    domain: str
    disk: str
    instance: DomainInstance | None  # the run the poller's domain handle was opened for
    info: JobInfo | None  # None: no job on the disk
    call_started: float  # monotonic time before the call


@dataclass(frozen=True)
class OutcomeRecord:
    domain: str
    disk: str
    job_type: str
    outcome: str  # one of OUTCOMES
    inferred: bool  # True when told from the disk/domain rather than by a libvirt event
    wall: float


@dataclass(frozen=True)
class Snapshot:
    """Everything a reader (collector, policy engine) may know, as of one instant."""

    connected: bool
    disks: Mapping[DiskKey, DiskInfo]
    jobs: Mapping[DiskKey, ActiveJob]
    # (domain, disk, job_type, outcome) -> count; an entry exists once a job was seen on that disk.
    outcomes: Mapping[tuple[str, str, str, str], int]
    inferred_outcomes: Mapping[tuple[str, str, str, str], int]
    running_domains: frozenset[str]
    version: int  # bumps on every change; lets readers cache work derived from a snapshot
    taken_wall: float = 0.0
    tracked_domains: int = 0  # domains with series: running, or gone within the retention
    tracked_disks: int = 0  # disks with series
    unresponsive_domains: frozenset[str] = frozenset()  # whose blockJobInfo has not answered
    recent_outcomes: tuple[OutcomeRecord, ...] = ()  # the last few counted, newest first
