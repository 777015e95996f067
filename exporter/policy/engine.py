"""The thin, stateful layer around ``decide.evaluate``: it starts pulls and remembers outcomes.

It keeps the history the pure function needs, makes the host calls of its decisions (when
enforcing) and exports what happened. Its only I/O is the injected space estimator and the host.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from datetime import datetime
from types import MappingProxyType
from typing import Callable, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from exporter.durations import format_duration
from exporter.model import DiskKey, Snapshot

from .config import Policy, PolicyError, load_policy
from .decide import DEFER_REASONS, Decision, DiskHistory, History, Matches, Plan, SpaceFn, evaluate, match_disks
from .space import estimate_space

log = logging.getLogger("exporter.policy")


class PolicyHost(Protocol):
    """What the engine needs from ``LibvirtHost``; each call raises on failure."""

    def start_pull(self, domain: str, disk: str, bandwidth_bytes: int) -> None: ...
    def start_rebase(self, domain: str, disk: str, base_path: str, bandwidth_bytes: int) -> None: ...
    def abort_job(self, domain: str, disk: str) -> None: ...
    def fresh_snapshot(self) -> Snapshot: ...


class PolicyEngine:
    """Runs one policy file against successive snapshots. Thread-safe.

    ``evaluate_and_act`` calls are serialized so two triggers (poll cycle, job end) never fill the
    same concurrency slot; the other methods take a short state lock, never waiting on libvirt.
    """

    def __init__(self, policy_path: str, enforcing: bool, host: PolicyHost | None,
                 clock: Callable[[], float] = time.time, now: Callable[[], datetime] | None = None,
                 space: SpaceFn = estimate_space, lost_after: float = 600.0, host_id: str | None = None,
                 on_fleet_change: Callable[[], None] | None = None, fleet_client=None):
        if enforcing and host is None:
            raise ValueError("an enforcing policy engine needs a host")
        self._path = policy_path
        self._enforcing = bool(enforcing)
        self._host = host
        self._clock = clock
        # Derived from the clock by default so an injected clock moves windows and backoff together.
        self._now = now or (lambda: datetime.fromtimestamp(clock()).astimezone())
        self._space = space
        self._lost_after = lost_after
        self._lock = threading.Lock()  # state below
        self._act_lock = threading.Lock()  # one evaluation (and its libvirt calls) at a time
        self._policy: Policy = load_policy(policy_path)  # PolicyError propagates to the CLI
        self._reload_ok = True
        self._reload_time = clock()
        self._history: dict[DiskKey, DiskHistory] = {}
        self._started: dict[str, int] = dict.fromkeys(self._policy.rule_names, 0)
        self._errors: dict[str, int] = dict.fromkeys(self._policy.rule_names, 0)
        self._last_plan: Plan | None = None
        self._logged: dict[DiskKey, tuple] = {}
        self._match_cache: tuple[Policy, object, int, frozenset, Matches] | None = None
        self._fleet = None
        self._starting: set[DiskKey] = set()  # disks whose fleet lease is being taken for a start
        self._adopted_generation = 0  # the fleet identity generation whose leases were taken back
        # Pulls found running without a lease when the fleet identity was (re)gained -> wall time
        # found: they hold a lease until they end but stay foreign (they may be an operator's).
        self._unleased: dict[DiskKey, float] = {}
        self._fleet_pulls = 0  # of _fleet_counted(), those the last snapshot shows running
        if self._policy.fleet is not None:
            import socket

            from .fleet import FleetBudget

            self._fleet = FleetBudget(self._policy.fleet, host_id or socket.gethostname(), self._enforcing,
                                      needs=self._fleet_needs, on_change=on_fleet_change, client=fleet_client)
        log.info("policy %s loaded (%d rules, %s)", policy_path, len(self._policy.rules),
                 "enforcing" if enforcing else "dry run")

    @property
    def policy(self) -> Policy:
        with self._lock:
            return self._policy

    @property
    def last_reload_successful(self) -> bool:
        with self._lock:
            return self._reload_ok

    @property
    def enforcing(self) -> bool:
        return self._enforcing

    @property
    def last_plan(self) -> Plan | None:
        """What the last evaluation decided (None before the first): the status page shows it."""
        with self._lock:
            return self._last_plan

    @property
    def fleet(self):
        """The FleetBudget of the policy's ``fleet`` section, or None."""
        return self._fleet

    def start(self) -> None:
        """Start talking to ZooKeeper (with a ``fleet`` section); no-op otherwise."""
        if self._fleet is not None:
            self._fleet.start()

    def stop(self) -> None:
        if self._fleet is not None:
            self._fleet.stop()

    def _fleet_counted(self) -> frozenset:
        """Disks whose running pull the fleet budget must count (call with the state lock held)."""
        return frozenset(k for k, h in self._history.items() if h.running).union(self._unleased)

    def _fleet_needs(self) -> tuple[int, frozenset, frozenset]:
        """For the fleet's sync: which of this host's leases must stay (see FleetBudget)."""
        with self._lock:
            return self._adopted_generation, self._fleet_counted(), frozenset(self._starting)

    def _take_back(self) -> None:
        """After this host's fleet identity is (re)gained: the pulls its leases cover that still run
        are this policy's again (their outcome counts, then the lease goes); the others' leases go.

        A pull running on a disk a rule matches with no lease (reaped while this exporter was away
        longer than host_lost_after) gets one, over the budget if need be: it runs whatever we do,
        and the budget must count it. It may be an operator's, so it is never adopted, aborted or
        counted as an outcome; its lease goes when it ends. This errs on counting too many."""
        adoption = self._fleet.adoption() if self._fleet is not None and self._enforcing else None
        if adoption is None or adoption[0] == self._adopted_generation:
            return
        generation, leases = adoption
        snapshot = self._host.fresh_snapshot()  # every disk's job as it is now
        if not snapshot.connected:
            return  # libvirt down: try again on the next evaluation
        matched = {c.disk.key for c in self._matches(snapshot, self.policy).candidates}
        found = self._clock()
        with self._lock:
            unleased = sorted(k for k, job in snapshot.jobs.items() if job.job_type in ("pull", "unknown")
                              and k in matched and k not in leases and k not in self._fleet_counted())
            self._unleased.update(dict.fromkeys(unleased, found))
            for key, lease in sorted(leases.items()):
                h = self._history.get(key)
                job = snapshot.jobs.get(key)
                if (h is not None and h.running) or job is None or job.job_type not in ("pull", "unknown"):
                    continue
                disk = snapshot.disks.get(key)
                rule = lease.rule or (h.rule if h else "")
                self._history[key] = replace(h or DiskHistory(rule=rule), rule=rule, running_since=lease.started,
                                             aborting=False, started_chain=disk.backing_chain if disk else None)
                log.info("policy: took back the running pull on %s/%s (rule %s) and its fleet lease", key[0], key[1],
                         rule)
            self._adopted_generation = generation
        for key in unleased:
            log.warning("policy: the pull on %s/%s runs without a fleet lease (released while this exporter was "
                        "away, or someone else's); taking one for it, over the budget if need be, until it ends",
                        key[0], key[1])
        ended = [k for k in leases if k not in snapshot.jobs]
        if ended:
            log.info("policy: %d fleet leases of this host cover no running pull any more; releasing them",
                     len(ended))

    def history(self) -> History:
        with self._lock:
            return History(MappingProxyType(dict(self._history)))

    def evaluate_and_act(self, snapshot: Snapshot) -> Plan:
        with self._act_lock:
            self._take_back()
            plan, policy = self._evaluate(snapshot)
            if self._enforcing and plan.starts:
                # max_concurrent counts every job on the host: decide again on the jobs as they
                # are now, not as the last poll saw them (someone may have started one since).
                snapshot = self._host.fresh_snapshot()
                plan, policy = self._evaluate(snapshot)
            if self._enforcing:
                decisions = tuple(self._act(d, snapshot, policy) for d in plan.decisions)
                deferred = dict(plan.deferred)
                for before, d in zip(plan.decisions, decisions):  # starts the fleet refused at the last moment
                    if before.action == "start" and d.action == "defer":
                        deferred[(d.rule, d.reason)] = deferred.get((d.rule, d.reason), 0) + 1
                plan = replace(plan, decisions=decisions, deferred=MappingProxyType(deferred))
            with self._lock:
                self._last_plan = plan
                if snapshot.connected:
                    self._fleet_pulls = sum(1 for k in self._fleet_counted() if k in snapshot.jobs)
            self._log_changes(plan)
            if self._fleet is not None:
                self._fleet.wake()  # release the leases of pulls that ended, at once
            return plan

    def _evaluate(self, snapshot: Snapshot) -> tuple[Plan, Policy]:
        with self._lock:
            policy = self._policy
            self._reconcile(snapshot, policy)
            history = History(MappingProxyType(dict(self._history)))
        fleet = self._fleet.view() if self._fleet is not None else None
        plan = evaluate(snapshot, policy, self._now(), history, self._space, self._enforcing,
                        self._matches(snapshot, policy), fleet=fleet)
        return plan, policy

    def _matches(self, snapshot: Snapshot, policy: Policy) -> Matches:
        # Matching depends only on the policy, the disks and the running domains. Snapshot mappings are
        # immutable, so identity means same content; so does an equal non-zero version (bumped on change).
        c = self._match_cache
        if c is not None and c[0] is policy and c[3] == snapshot.running_domains and (
                c[1] is snapshot.disks or (snapshot.version and c[2] == snapshot.version)):
            return c[4]
        m = match_disks(snapshot, policy)
        self._match_cache = (policy, snapshot.disks, snapshot.version, snapshot.running_domains, m)
        return m

    def _act(self, d: Decision, snapshot: Snapshot, policy: Policy) -> Decision:
        """Make the host call a decision asks for; the decision, with the error if the call failed."""
        if d.action == "abort":
            return self._abort(d)
        return self._start(d, snapshot, policy) if d.action == "start" else d

    def _abort(self, d: Decision) -> Decision:
        # Marked before the call: libvirt's abort is synchronous, so the "canceled" event can reach
        # on_outcome before abort_job returns, and must not look like an operator's cancel (a
        # failed attempt with backoff).
        self._set_aborting(d.key, True)
        log.info("policy: aborting pull on %s/%s (rule %s): window closed", d.domain, d.disk, d.rule)
        try:
            self._host.abort_job(d.domain, d.disk)
        except Exception as e:  # the host raises libvirtError and friends
            log.warning("policy: aborting pull on %s/%s failed: %s", d.domain, d.disk, e)
            self._set_aborting(d.key, False)  # the next evaluation tries again
            return replace(d, error=str(e) or type(e).__name__)
        log.info("policy: aborted pull on %s/%s (rule %s): window closed", d.domain, d.disk, d.rule)
        return d

    def _start(self, d: Decision, snapshot: Snapshot, policy: Policy) -> Decision:
        if self._fleet is None:
            return self._start_pull(d, snapshot, policy)
        with self._lock:
            self._starting.add(d.key)  # the fleet's sync must not release the lease being taken
        try:
            ok, why = self._fleet.acquire(d.key, d.rule)
            if not ok:
                return replace(d, action="defer", reason="fleet", detail=why)
            return self._start_pull(d, snapshot, policy)  # a failed start's lease goes at the next sync
        finally:
            with self._lock:
                self._starting.discard(d.key)

    def _start_pull(self, d: Decision, snapshot: Snapshot, policy: Policy) -> Decision:
        started = self._clock()
        try:
            if d.base_path:
                self._host.start_rebase(d.domain, d.disk, d.base_path, d.bandwidth_bytes)
            else:
                self._host.start_pull(d.domain, d.disk, d.bandwidth_bytes)
        except Exception as e:
            error = str(e) or type(e).__name__
            log.warning("policy: starting pull on %s/%s (rule %s) failed: %s", d.domain, d.disk, d.rule, error)
            with self._lock:
                self._errors[d.rule] = self._errors.get(d.rule, 0) + 1
                prev = self._history.get(d.key) or DiskHistory(rule=d.rule)
                self._record_failure(d.key, replace(prev, rule=d.rule), self._clock(), error, policy)
            return replace(d, error=error)
        what = f"pull down to {d.base_path}" if d.base_path else "pull"
        log.info("policy: started %s on %s/%s (rule %s, bandwidth %s): %s", what, d.domain, d.disk, d.rule,
                 d.bandwidth_bytes or "unlimited", d.match_reason)
        disk = snapshot.disks.get(d.key)
        with self._lock:
            self._started[d.rule] = self._started.get(d.rule, 0) + 1
            prev = self._history.get(d.key) or DiskHistory(rule=d.rule)
            self._history[d.key] = replace(prev, rule=d.rule, running_since=started, aborting=False,
                                           started_chain=disk.backing_chain if disk else None)
        return d

    def _set_aborting(self, key: DiskKey, aborting: bool) -> None:
        with self._lock:
            h = self._history.get(key)
            if h is not None and h.running:
                self._history[key] = replace(h, aborting=aborting)

    def on_outcome(self, domain: str, disk: str, job_type: str, outcome: str, wall: float) -> None:
        """A block job ended; only pulls this engine started (and still waits for) are affected, but
        a pull found running without a lease (see _take_back) gives its lease up."""
        key = (domain, disk)
        with self._lock:
            found = self._unleased.get(key)
            if found is not None and job_type in ("pull", "unknown") and wall >= found:
                del self._unleased[key]
                log.info("policy: the pull on %s/%s that held a fleet lease without being this policy's ended (%s); "
                         "its lease goes", domain, disk, outcome)
            h = self._history.get(key)
            if h is None or h.running_since is None or job_type not in ("pull", "unknown") or wall < h.running_since:
                return  # not our pull, or a job that ended before ours started
            if outcome == "completed":
                log.info("policy: pull on %s/%s (rule %s) completed", domain, disk, h.rule)
                self._history[key] = replace(h, running_since=None, aborting=False, failures=0, last_error="",
                                             last_failure_wall=None, completed_chain=h.started_chain)
            elif outcome == "canceled" and h.aborting:
                self._history[key] = replace(h, running_since=None, aborting=False)
            elif outcome == "canceled":
                # Someone canceled our pull: back off like a failure instead of fighting them.
                log.warning("policy: pull on %s/%s (rule %s) was canceled by someone else", domain, disk, h.rule)
                self._record_failure(key, h, wall, "canceled by someone else", self._policy)
            else:
                log.warning("policy: pull on %s/%s (rule %s) failed", domain, disk, h.rule)
                self._errors[h.rule] = self._errors.get(h.rule, 0) + 1
                self._record_failure(key, h, wall, "job failed", self._policy)

    def _reconcile(self, snapshot: Snapshot, policy: Policy) -> None:
        """Forget disks that are gone and owe us nothing; give up on a pull that vanished without an outcome."""
        for key in [k for k, h in self._history.items() if snapshot.connected
                    and k not in snapshot.disks and not h.running and not h.failures]:
            del self._history[key]
        if not snapshot.taken_wall:
            return
        for key in [k for k, found in self._unleased.items()
                    if k not in snapshot.jobs and snapshot.taken_wall - found > self._lost_after]:
            del self._unleased[key]  # ended without a reported outcome
        lost = [(k, h) for k, h in self._history.items() if h.running_since is not None and k not in snapshot.jobs
                and snapshot.taken_wall - h.running_since > self._lost_after]
        for key, h in lost:
            if h.aborting:
                self._history[key] = replace(h, running_since=None, aborting=False)
            else:
                log.warning("policy: pull on %s/%s (rule %s) is gone without a reported outcome; counting it as "
                            "failed", key[0], key[1], h.rule)
                self._record_failure(key, h, snapshot.taken_wall, "job vanished without an outcome", policy)

    def _record_failure(self, key: DiskKey, h: DiskHistory, wall: float, error: str, policy: Policy) -> None:
        failures = h.failures + 1
        self._history[key] = replace(h, running_since=None, aborting=False, failures=failures,
                                     last_failure_wall=wall, last_error=error)
        limits = policy.limits
        if failures >= limits.max_attempts:
            log.error("policy: giving up on %s/%s (rule %s) after %d failed attempts (max_attempts %d); "
                      "restart the exporter to try again", key[0], key[1], h.rule, failures, limits.max_attempts)
        else:
            log.info("policy: %s/%s attempt %d of %d failed; next try not before %s from now",
                     key[0], key[1], failures, limits.max_attempts, format_duration(limits.retry_after))

    def reload(self) -> bool:
        """Re-read the policy file (SIGHUP). Any failure, even unforeseen, keeps the old policy and reports 0."""
        try:
            new = load_policy(self._path)
            if new.fleet != self._policy.fleet:
                raise PolicyError([f"{self._path}: the fleet section cannot change on reload (its leases are "
                                   "held under the running one); restart the exporter to apply it"])
        except Exception as e:  # PolicyError, and anything the loader failed to foresee
            problems = e.problems if isinstance(e, PolicyError) else [f"{self._path}: {type(e).__name__}: {e}"]
            for problem in problems:
                log.error("policy reload failed, keeping the previous policy: %s", problem)
            with self._lock:
                self._reload_ok = False
            return False
        with self._lock:
            self._policy = new
            self._reload_ok = True
            self._reload_time = self._clock()
            for name in new.rule_names:
                self._started.setdefault(name, 0)
                self._errors.setdefault(name, 0)
        log.info("policy %s reloaded (%d rules)", self._path, len(new.rules))
        return True

    def metric_families(self) -> list:
        with self._lock:
            policy, plan = self._policy, self._last_plan
            started, errors = dict(self._started), dict(self._errors)
            fleet_pulls = self._fleet_pulls
            reload_ok, reload_time = self._reload_ok, self._reload_time
        candidates = GaugeMetricFamily("libvirt_blockjob_policy_candidates", "Disks matching the rule now",
                                       labels=["rule"])
        deferred = GaugeMetricFamily("libvirt_blockjob_policy_deferred", "Candidates not started now, by reason",
                                     labels=["rule", "reason"])
        for rule in policy.rule_names:
            candidates.add_metric([rule], float(plan.candidates.get(rule, 0) if plan else 0))
            for reason in DEFER_REASONS:
                deferred.add_metric([rule, reason], float(plan.deferred.get((rule, reason), 0) if plan else 0))
        counters = [
            CounterMetricFamily("libvirt_blockjob_policy_started", "Pulls the policy started", labels=["rule"]),
            CounterMetricFamily("libvirt_blockjob_policy_errors", "Pulls the policy failed to start or that failed",
                                labels=["rule"]),
        ]
        for family, counts in zip(counters, (started, errors)):
            for rule in sorted(counts):
                family.add_metric([rule], float(counts[rule]))
        fleet = []
        if self._fleet is not None:
            view = self._fleet.view()
            fleet = [
                GaugeMetricFamily("libvirt_blockjob_policy_fleet_connected",
                                  "1 while the fleet budget in ZooKeeper can be used (connected, session alive, "
                                  "this host's identity held)", value=1.0 if view.usable else 0.0),
                GaugeMetricFamily("libvirt_blockjob_policy_fleet_leases",
                                  "Fleet leases this host holds (as last read from ZooKeeper)",
                                  value=float(self._fleet.held())),
                GaugeMetricFamily("libvirt_blockjob_policy_fleet_pulls_running",
                                  "Pulls running on this host that its fleet leases are for: the policy's own, and "
                                  "those found running without a lease when the host's fleet identity was regained",
                                  value=float(fleet_pulls)),
                GaugeMetricFamily("libvirt_blockjob_policy_fleet_leases_in_use",
                                  "Fleet leases held by every host sharing the budget (as last read)",
                                  value=float(view.in_use)),
                GaugeMetricFamily("libvirt_blockjob_policy_fleet_max_concurrent",
                                  "Size of the fleet-wide pull budget enforced: the smaller of fleet.max_concurrent "
                                  "and the value in ZooKeeper", value=float(view.max_concurrent)),
            ]
        return [
            GaugeMetricFamily("libvirt_blockjob_policy_enforcing", "1 with --policy.enforce, 0 in dry run",
                              value=1.0 if self._enforcing else 0.0),
            candidates,
            deferred,
            *counters,
            GaugeMetricFamily("libvirt_blockjob_policy_last_reload_successful",
                              "1 if the last policy (re)load succeeded", value=1.0 if reload_ok else 0.0),
            GaugeMetricFamily("libvirt_blockjob_policy_last_reload_success_timestamp_seconds",
                              "Unix time of the last successful policy (re)load", value=reload_time),
            *fleet,
        ]

    def _log_changes(self, plan: Plan) -> None:
        """Log a disk's decision when it changes, not on every evaluation."""
        current: dict[DiskKey, tuple] = {}
        for d in plan.decisions:
            sig = (d.rule, d.action, d.reason, d.would, d.error)
            current[d.key] = sig
            if self._logged.get(d.key) == sig or d.action in ("start", "abort"):
                continue  # starts and aborts are logged where they happen
            if d.would:
                log.info("policy (dry run): would %s on %s/%s (rule %s; %s): %s",
                         d.would, d.domain, d.disk, d.rule, d.match_reason, d.detail)
            else:
                log.info("policy: %s/%s (rule %s) deferred, %s: %s", d.domain, d.disk, d.rule, d.reason, d.detail)
        self._logged = current



def _shown(text: str) -> str:
    """``text`` with non-printables escaped as in a Python literal: names come from whoever made the
    domain, and a newline or terminal escape in one must not forge rows or rewrite the terminal."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    rows = [header, *(tuple(_shown(c) for c in r) for r in rows)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    return ["  ".join([c.ljust(w) for c, w in zip(r, widths)] + [r[-1]]).rstrip() for r in rows]


def format_plan_table(plan: Plan) -> str:
    """The ``policy plan`` output: every matching disk, the decision now, and why."""
    mode = "enforcing" if plan.enforcing else "dry run"
    window = "inside a start window" if plan.in_window else "outside the start windows"
    lines = [
        f"Policy plan at {plan.now:%Y-%m-%d %H:%M:%S %z} ({mode}; {window}; "
        f"{plan.active_jobs} active job{'s' if plan.active_jobs != 1 else ''}, max_concurrent {plan.max_concurrent})"
    ]
    if plan.fleet is not None:
        f = plan.fleet
        lines.append(f"Fleet budget: {f.in_use} of {f.max_concurrent} leases taken across the fleet, "
                     f"{max(0, f.max_concurrent - f.in_use)} free (read now; no lease taken)" if f.usable
                     else f"Fleet budget: unavailable ({_shown(f.detail)}): nothing would start")
    if not plan.connected:
        return "\n".join([*lines, "Not connected to libvirt: no decisions."]) + "\n"
    rows = [(d.domain, d.disk, d.rule, f"would {d.would}" if d.would else f"{d.action} FAILED" if d.error else d.action,
             d.reason, d.detail + (f"; error: {d.error}" if d.error else "")) for d in plan.decisions]
    table = _table(("DOMAIN", "DISK", "RULE", "DECISION", "REASON", "DETAIL"), rows)
    lines.append(table[0] if rows else "No disk matches any rule.")
    for row, d in zip(table[1:], plan.decisions):
        lines += [row, f"    matched: {_shown(d.match_reason)}"]  # match reasons (paths) can be long
    if plan.unmatched:
        lines += ["", "Disks selected by a rule's globs whose conditions did not hold:"]
        rows = [(n.domain, n.disk, n.rule, n.reason) for n in plan.unmatched]
        lines += _table(("DOMAIN", "DISK", "RULE", "WHY NOT"), rows)
    return "\n".join(lines) + "\n"
