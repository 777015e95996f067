"""The policy's decisions, as a pure function of (snapshot, policy, clock, history).

Nothing here touches libvirt, files or the real clock (space comes from an injected function, time
from ``now``, past actions from ``History``), so every safety rule is testable without VMs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Callable, Mapping

from exporter.durations import format_duration
from exporter.model import BackingImage, DiskInfo, DiskKey, Snapshot

from .config import Policy, Rule, format_bytes

# The `reason` label values of libvirt_blockjob_policy_deferred; a start has reason "start".
DEFER_REASONS = ("window", "concurrency", "fleet", "space", "backoff", "active_job", "gave_up", "dry_run")
Verdict = tuple[str, str, str, str | None]  # a Decision's (action, reason, detail, would)


@dataclass(frozen=True)
class DiskSpace:
    bytes_to_copy: int  # upper bound of the data the pull writes into the overlay
    free_bytes: int  # available to us on the overlay's filesystem


SpaceFn = Callable[[DiskInfo, "str | None"], "DiskSpace | None"]


@dataclass(frozen=True)
class DiskHistory:
    """What this policy did to one disk. Only pulls the policy itself started appear here."""

    rule: str  # rule of the latest policy pull on the disk
    running_since: float | None = None  # wall time of a start whose outcome is not known yet
    failures: int = 0  # consecutive failed attempts (start errors, failed or foreign-canceled jobs)
    last_failure_wall: float | None = None
    last_error: str = ""
    # Chain the last completed policy pull started from: while the inventory still shows exactly
    # this chain it has not caught up with the completion, and pulling again would be pointless.
    completed_chain: tuple[BackingImage, ...] | None = None
    started_chain: tuple[BackingImage, ...] | None = None  # chain when the running pull started
    aborting: bool = False  # the policy asked libvirt to abort the running pull

    @property
    def running(self) -> bool:
        return self.running_since is not None


@dataclass(frozen=True)
class History:
    disks: Mapping[DiskKey, DiskHistory] = field(default_factory=lambda: MappingProxyType({}))

    @staticmethod
    def empty() -> "History":
        return History()


@dataclass(frozen=True)
class FleetView:
    """The fleet budget as last read from ZooKeeper (``policy.fleet``); the engine's, or plan's, view."""

    usable: bool  # connected, session alive and (enforcing) this host's identity held
    max_concurrent: int
    in_use: int  # leases taken across the fleet, this host's included
    detail: str = ""  # why it is not usable


@dataclass(frozen=True)
class Candidate:
    """A disk that a rule matches (first matching rule wins)."""

    disk: DiskInfo
    rule_index: int
    rule: Rule
    match_reason: str
    base_path: str | None  # keep_base: the image that stays as the new backing file


@dataclass(frozen=True)
class NoMatch:
    """A disk a rule's globs selected but whose conditions failed, when no rule matched it."""

    domain: str
    disk: str
    rule: str
    reason: str


@dataclass(frozen=True)
class Decision:
    domain: str
    disk: str
    rule: str
    action: str  # "start" | "defer" | "abort": what the engine does now
    reason: str  # "start" for starts, the deferral reason otherwise, "window" for aborts
    match_reason: str
    bandwidth_bytes: int = 0
    base_path: str | None = None  # keep_base: call blockRebase onto this image
    detail: str = ""
    would: str | None = None  # dry run: "start" or "abort", the action enforcement would take
    error: str | None = None  # set by the engine when the libvirt call failed

    @property
    def key(self) -> DiskKey:
        return (self.domain, self.disk)


@dataclass(frozen=True)
class Plan:
    decisions: tuple[Decision, ...]
    candidates: Mapping[str, int]  # rule -> matching disks (every rule of the policy, 0 included)
    deferred: Mapping[tuple[str, str], int]  # (rule, reason) -> candidates not started; non-zero only
    unmatched: tuple[NoMatch, ...]
    enforcing: bool
    now: datetime
    in_window: bool
    active_jobs: int  # active jobs on the host before this evaluation (foreign + policy pending)
    max_concurrent: int
    connected: bool = True
    fleet: FleetView | None = None  # the budget decided on; None without a fleet section

    @property
    def starts(self) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if d.action == "start")


@dataclass(frozen=True)
class Matches:
    """Rule matching depends only on (policy, snapshot disks); the engine caches it per version."""

    candidates: tuple[Candidate, ...]
    unmatched: tuple[NoMatch, ...]


def match_rule(disk: DiskInfo, rule: Rule) -> tuple[bool, str, str | None]:
    """(matches, why, keep_base path) for one disk against one rule's match/when/keep_base."""
    if not (rule.match.domain.matches(disk.domain) and rule.match.disk.matches(disk.disk)):
        return False, "globs do not match", None
    depth = disk.backing_depth
    if depth == 0:
        return False, "no backing image (depth 0)", None
    why: list[str] = []
    w = rule.when
    if w.min_backing_depth is not None:
        if depth < w.min_backing_depth:
            return False, f"depth {depth} < {w.min_backing_depth}", None
        why.append(f"depth {depth} >= {w.min_backing_depth}")
    if w.backing_file is not None:
        hit = next((b.path for b in disk.backing_chain if b.path and w.backing_file.matches(b.path)), None)
        if hit is None:
            return False, f"no backing image matches {w.backing_file.pattern!r}", None
        why.append(f"backing image {hit} matches {w.backing_file.pattern!r}")
    base_path = None
    kb = rule.pull.keep_base
    if kb is not None:
        index = next((i for i, b in enumerate(disk.backing_chain) if b.path and kb.matches(b.path)), None)
        if index is None:
            return False, f"no backing image matches keep_base {kb.pattern!r}", None
        base_path = disk.backing_chain[index].path
        if index == 0:
            return False, f"keep_base {base_path} is already directly under the active layer", None
        why.append(f"keep_base {base_path}: {index} layer{'s' if index > 1 else ''} above it")
    if not why:
        why.append(f"depth {depth} >= 1")
    return True, "; ".join(why), base_path


def match_disks(snapshot: Snapshot, policy: Policy) -> Matches:
    candidates: list[Candidate] = []
    unmatched: list[NoMatch] = []
    for _, disk in sorted(snapshot.disks.items()):
        if disk.domain not in snapshot.running_domains or disk.backing_depth == 0:
            continue
        misses: list[NoMatch] = []
        for i, rule in enumerate(policy.rules):
            ok, why, base = match_rule(disk, rule)
            if ok:
                candidates.append(Candidate(disk, i, rule, why, base))
                break
            if why != "globs do not match":
                misses.append(NoMatch(disk.domain, disk.disk, rule.name, why))
        else:
            unmatched.extend(misses)
    candidates.sort(key=lambda c: (c.rule_index, c.disk.domain, c.disk.disk))
    return Matches(tuple(candidates), tuple(unmatched))


def evaluate(snapshot: Snapshot, policy: Policy, now: datetime, history: History, space: SpaceFn, enforcing: bool,
             matches: Matches | None = None, fleet: FleetView | None = None) -> Plan:
    """Decide, for every disk a rule matches, whether to start a pull now and why (not).

    ``now`` must be timezone-aware local time (windows read its wall clock, backoff its Unix time).
    ``space`` is called only for disks that pass every other check. A dry run simulates enforcing
    (would-starts take slots) and reports would-be starts and aborts as ``defer``/``dry_run``.
    With ``policy.fleet``, a start also needs a free lease of ``fleet`` (a budget not known to be
    usable starts nothing); would-starts take leases in the simulation too.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    limits = policy.limits
    counts = {r.name: 0 for r in policy.rules}
    in_window = limits.in_window(now)
    if policy.fleet is None:
        fleet = None
    elif fleet is None:
        fleet = FleetView(False, policy.fleet.max_concurrent, 0, "the fleet budget has not been read yet")
    if not snapshot.connected:
        # The inventory may be stale and libvirt calls would fail: decide nothing.
        return Plan((), MappingProxyType(counts), MappingProxyType({}), (), enforcing, now, in_window,
                    len(snapshot.jobs), limits.max_concurrent, connected=False, fleet=fleet)
    if matches is None:
        matches = match_disks(snapshot, policy)

    now_wall = now.timestamp()
    # Our own starts may not be in the snapshot yet: count them until their outcome is known.
    pending = {k for k, h in history.disks.items() if h.running}
    busy = set(snapshot.jobs) | pending
    active_before = active = len(busy)
    leases = fleet.in_use if fleet is not None else 0
    abort_now = limits.abort_outside_window and not in_window
    nxt = None if in_window else limits.next_opening(now)
    window_detail = "outside the start windows" + (f"; next opens {nxt:%a %Y-%m-%d %H:%M}" if nxt else "")

    def verdict(c: Candidate) -> Verdict:
        nonlocal active, leases
        disk = c.disk
        key = disk.key
        h = history.disks.get(key)
        if key in busy:
            abort = _abort_verdict(key, snapshot, h, enforcing) if abort_now else None
            if abort is not None:
                return abort
            job = snapshot.jobs.get(key)
            if job is not None:
                whose = "this policy" if h is not None and h.running else "someone else"
                return "defer", "active_job", f"{job.job_type} job active (started by {whose})", None
            return "defer", "active_job", "pull started by this policy, not yet visible in the inventory", None
        if h is not None and h.failures >= limits.max_attempts:
            return ("defer", "gave_up", f"{h.failures} failed attempts (max_attempts {limits.max_attempts}); "
                    f"last error: {h.last_error or 'unknown'}", None)
        if h is not None and h.failures and h.last_failure_wall is not None:
            retry_at = h.last_failure_wall + limits.retry_after
            if now_wall < retry_at:
                return ("defer", "backoff", f"attempt {h.failures} of {limits.max_attempts} failed "
                        f"({h.last_error or 'unknown'}); retry in {format_duration(retry_at - now_wall)}", None)
        if h is not None and h.completed_chain is not None and disk.backing_chain == h.completed_chain:
            return ("defer", "backoff",
                    "a policy pull on this disk completed; the inventory still shows the old chain", None)
        if not in_window:
            return "defer", "window", window_detail, None
        if active >= limits.max_concurrent:
            return "defer", "concurrency", f"{active} active jobs >= max_concurrent {limits.max_concurrent}", None
        if fleet is not None and not fleet.usable:
            return "defer", "fleet", f"fleet budget unavailable: {fleet.detail}", None
        if fleet is not None and leases >= fleet.max_concurrent:
            return ("defer", "fleet", f"{leases} fleet leases taken >= fleet max_concurrent "
                    f"{fleet.max_concurrent}", None)
        est = space(disk, c.base_path)
        if est is None:
            return "defer", "space", "cannot estimate the space the pull needs", None
        if est.free_bytes < est.bytes_to_copy * limits.min_free_space_ratio:
            return ("defer", "space", f"needs {limits.min_free_space_ratio:g} x "
                    f"{format_bytes(est.bytes_to_copy)}, {format_bytes(est.free_bytes)} free", None)
        active += 1
        leases += 1
        what = f"rebase onto {c.base_path}" if c.base_path else "pull"
        detail = f"{what}; {format_bytes(est.bytes_to_copy)} to copy, {format_bytes(est.free_bytes)} free"
        if enforcing:
            return "start", "start", detail, None
        return "defer", "dry_run", f"dry run, would {detail}", "start"

    decisions: list[Decision] = []
    deferred: dict[tuple[str, str], int] = {}
    for c in matches.candidates:
        name = c.rule.name
        counts[name] = counts.get(name, 0) + 1
        action, reason, detail, would = verdict(c)
        decisions.append(Decision(c.disk.domain, c.disk.disk, name, action, reason, c.match_reason,
                                  c.rule.pull.bandwidth_bytes, c.base_path, detail, would))
        if action != "start":
            deferred[(name, reason)] = deferred.get((name, reason), 0) + 1

    # Pulls this policy started on disks no rule matches any more still follow abort_outside_window.
    if abort_now:
        for key in sorted(pending - {d.key for d in decisions}):
            h = history.disks[key]
            v = _abort_verdict(key, snapshot, h, enforcing)
            if v is not None and not h.aborting:
                action, reason, detail, would = v
                decisions.append(Decision(key[0], key[1], h.rule, action, reason, "started by this policy",
                                          detail=detail, would=would))

    return Plan(tuple(decisions), MappingProxyType(counts), MappingProxyType(deferred), matches.unmatched,
                enforcing, now, in_window, active_before, limits.max_concurrent, fleet=fleet)



def _abort_verdict(key: DiskKey, snapshot: Snapshot, h: DiskHistory | None, enforcing: bool) -> Verdict | None:
    """Abort a pull this policy started, once its window has closed; None if not applicable."""
    job = snapshot.jobs.get(key)
    if h is None or not h.running or job is None or job.job_type != "pull":
        return None  # only abort what the inventory shows is our pull
    if h.aborting:
        return "defer", "window", "window closed; abort already requested", None
    detail = "window closed and abort_outside_window is true; aborting the pull this policy started"
    return ("abort", "window", detail, None) if enforcing else ("defer", "dry_run", f"dry run, would {detail}", "abort")
