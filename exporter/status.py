"""The status page's and the ``status`` command's view of the host: one bounded JSON document.

It is built only from what the exporter already holds (a state snapshot, ``SelfStats``, the policy
engine's last plan), never from a libvirt call, so a look at the page costs what a scrape costs
and cannot reach a guest however often it is reloaded. The ``status`` command builds the same
document from its own read of libvirt, so the page, the command and ``--output json`` agree.

Bounded, because a hypervisor can hold thousands of disks and whoever made a domain chose its
name: a fixed number of rows per section, every name, path and text cut to a fixed length, so the
document stays under ``MAX_BYTES`` (a test feeds it the worst case); totals say what was left out.
Names are data, never markup: the page puts them in the DOM as text, the command escapes them.
"""

from __future__ import annotations

import heapq
import json
import threading
import time
from typing import Any, Callable

from .model import OUTCOMES, ActiveJob, DiskInfo, Snapshot
from .selfstats import SelfStats, SelfStatsSnapshot

MAX_JOBS = 100
MAX_OUTCOMES = 20
MAX_CHAINS = 10
MAX_RULES = 50
MAX_DEFERRED = 20
MAX_UNRESPONSIVE = 20
MAX_ERROR_METHODS = 20
MAX_NAME_CHARS = 128  # domain, disk and rule names
MAX_PATH_CHARS = 256
MAX_TEXT_CHARS = 256  # policy details and reasons
MAX_BYTES = 512 * 1024  # the bounds above keep the worst case well under it (tests/test_status.py)
STALL_MIN_SECONDS = 5.0  # a cursor still this long (and 3 poll intervals) shows as stalled
CACHE_SECONDS = 0.5  # however many clients look, the document is built at most twice a second


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _name(text: str) -> str:
    return _cut(text, MAX_NAME_CHARS)


def _job(job: ActiveJob, now: float, stall_after: float) -> dict[str, Any]:
    still = now - job.cursor_changed_time
    stalled = not job.ready and still > stall_after
    rate = 0.0 if stalled and job.rate is not None else job.rate
    remaining = max(0, job.end - job.cur)
    eta = remaining / rate if rate and not job.ready else (0.0 if job.ready else None)
    return {
        "domain": _name(job.domain), "disk": _name(job.disk), "type": job.job_type,
        "cur": job.cur, "end": job.end,
        "percent": round(100.0 * job.progress_ratio, 2),
        "bandwidth": job.bandwidth,  # bytes/s, 0 = unlimited
        "rate": None if rate is None else round(rate, 1),  # bytes/s; None until the cursor moved once
        "eta_seconds": None if eta is None else round(eta, 1),
        "started": job.start_time, "cursor_moved": job.cursor_changed_time,
        "ready": job.ready, "stalled": stalled,
    }


def _chain(disk: DiskInfo) -> dict[str, Any]:
    chain = disk.backing_chain
    return {"domain": _name(disk.domain), "disk": _name(disk.disk), "depth": len(chain),
            "source": _cut(disk.source, MAX_PATH_CHARS),
            "base": _cut(chain[-1].path, MAX_PATH_CHARS) if chain else ""}


def _outcomes(snap: Snapshot) -> dict[str, Any]:
    totals = dict.fromkeys(OUTCOMES, 0)
    for (_domain, _disk, _type, outcome), count in snap.outcomes.items():
        totals[outcome] = totals.get(outcome, 0) + count
    return {
        "recent": [{"domain": _name(o.domain), "disk": _name(o.disk), "type": o.job_type, "outcome": o.outcome,
                    "inferred": o.inferred, "time": o.wall} for o in snap.recent_outcomes[:MAX_OUTCOMES]],
        "totals": totals,  # of the series held (--state.retention), since the exporter started
    }


def _policy(engine) -> dict[str, Any] | None:
    """The policy engine's state: mode, and its last plan's candidates and deferrals."""
    if engine is None:
        return None
    plan = engine.last_plan
    doc: dict[str, Any] = {"enforcing": engine.enforcing, "reload_ok": engine.last_reload_successful,
                           "evaluated": None}
    if plan is None:
        return doc
    rules = []
    for rule, count in list(plan.candidates.items())[:MAX_RULES]:
        rules.append({"name": _name(rule), "candidates": count,
                      "deferred": {reason: n for (r, reason), n in sorted(plan.deferred.items()) if r == rule and n}})
    deferred = [d for d in plan.decisions if d.action == "defer"]
    doc.update({
        "evaluated": plan.now.timestamp(), "in_window": plan.in_window, "active_jobs": plan.active_jobs,
        "max_concurrent": plan.max_concurrent, "rules": rules, "rules_total": len(plan.candidates),
        "starting": sum(1 for d in plan.decisions if d.action == "start"),
        "deferred_total": len(deferred),
        "deferred": [{"domain": _name(d.domain), "disk": _name(d.disk), "rule": _name(d.rule),
                      "reason": _cut(d.reason, MAX_TEXT_CHARS), "would": d.would,
                      "detail": _cut(d.detail + (f"; error: {d.error}" if d.error else ""), MAX_TEXT_CHARS)}
                     for d in deferred[:MAX_DEFERRED]],
    })
    return doc


def _exporter(stats: SelfStatsSnapshot | None, poll_interval: float) -> dict[str, Any] | None:
    if stats is None:
        return None
    errors = sorted(((m, n) for m, n in stats.errors.items() if n), key=lambda item: (-item[1], item[0]))
    return {
        "poll_interval": poll_interval, "poll_cycles": stats.poll_cycles,
        "last_poll_duration": stats.last_poll_duration, "last_poll_time": stats.last_poll_timestamp or None,
        "discovery_interval": stats.discovery_interval, "reconnects": stats.reconnects,
        "libvirt_calls": sum(stats.calls.values()), "libvirt_errors_total": sum(n for _m, n in errors),
        "libvirt_errors": {_name(m): n for m, n in errors[:MAX_ERROR_METHODS]},
        "events": sum(stats.events.values()),
    }


def build_status(snap: Snapshot, *, now: float, uri: str, read_only: bool, poll_interval: float,
                 version: str = "", stats: SelfStatsSnapshot | None = None, policy=None) -> dict[str, Any]:
    """The document; ``stats`` and ``policy`` (a ``PolicyEngine``) are None where there are none."""
    stall_after = max(STALL_MIN_SECONDS, 3 * poll_interval)
    jobs = sorted(snap.jobs.values(), key=lambda j: (j.domain, j.disk))
    backed = [d for d in snap.disks.values() if d.backing_chain]
    deepest = heapq.nsmallest(MAX_CHAINS, backed, key=lambda d: (-d.backing_depth, d.domain, d.disk))
    unresponsive = sorted(snap.unresponsive_domains)
    return {
        "version": version,
        "now": now,
        "refresh_seconds": min(10.0, max(1.0, poll_interval)),
        "connection": {
            "connected": snap.connected, "uri": _cut(uri, MAX_PATH_CHARS),
            "mode": "read-only" if read_only else "read-write",
            "domains": len(snap.running_domains), "disks": len(snap.disks),
            "unresponsive": [_name(d) for d in unresponsive[:MAX_UNRESPONSIVE]],
            "unresponsive_total": len(unresponsive),
        },
        "jobs": {"total": len(jobs), "shown": [_job(j, now, stall_after) for j in jobs[:MAX_JOBS]]},
        "outcomes": _outcomes(snap),
        "chains": {"with_backing": len(backed), "deepest": [_chain(d) for d in deepest]},
        "policy": _policy(policy),
        "exporter": _exporter(stats, poll_interval),
    }


def to_json(doc: dict[str, Any]) -> bytes:
    # Not ASCII-escaped: a non-ASCII character costs at most 4 bytes instead of 12 (a surrogate pair).
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace")


class StatusSource:
    """``/status.json`` of a running exporter: the document of its state, stats and policy now."""

    def __init__(self, state, stats: SelfStats, *, uri: str, read_only: bool, poll_interval: float,
                 version: str = "", policy=None, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._state, self._stats, self._policy = state, stats, policy
        self._fixed = {"uri": uri, "read_only": read_only, "poll_interval": poll_interval, "version": version}
        self._clock, self._monotonic = clock, monotonic
        self._lock = threading.Lock()
        self._cached: tuple[float, bytes] | None = None  # (monotonic time built, body)

    def document(self) -> dict[str, Any]:
        return build_status(self._state.snapshot(), now=self._clock(), stats=self._stats.snapshot(),
                            policy=self._policy, **self._fixed)

    def json(self) -> bytes:
        with self._lock:
            now = self._monotonic()
            if self._cached is None or now - self._cached[0] >= CACHE_SECONDS:
                self._cached = (now, to_json(self.document()))
            return self._cached[1]
