"""Property test of the policy's decision function (``exporter.policy.decide.evaluate``).

Hypothesis builds random policies (rules, globs, limits, windows), snapshots (domains, disks,
chains, active jobs of any type, on running domains or not), histories (running pulls, failures,
completed chains) and space estimates, and checks the safety rules of docs/policy.md on every
plan, against oracles written here rather than the product's helpers:

* no start while disconnected, in a dry run (which only reports ``would``), outside every window
  (a window oracle over minutes of the week), or onto a disk with an active job or a pull this
  policy started and has not seen end;
* the active jobs on the host (every job of the snapshot, whoever started it, plus this policy's
  pending pulls) plus the starts never exceed ``max_concurrent``; a dry run's would-starts take
  the same slots. The policy format has no per-rule cap (``Rule`` has none), so the host-wide cap
  is the only one;
* no start onto a disk in backoff (a failure less than ``retry_after`` ago, ``max_attempts``
  failures, or the chain a completed policy pull started from still shown), nor onto one whose
  space estimate is missing or short of ``min_free_space_ratio``;
* a start is on a running domain's disk with a backing chain, that its rule matches and that no
  earlier rule matches; at most one decision per disk;
* an abort only ever targets a pull this policy started, outside the windows, with
  ``abort_outside_window``.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import MappingProxyType

from hypothesis import event, given
from hypothesis import strategies as st

from exporter.model import ActiveJob, BackingImage, DiskInfo, Snapshot
from exporter.policy.config import Glob, Limits, Match, Policy, PullAction, Rule, When, Window
from exporter.policy.decide import DiskHistory, DiskSpace, History, evaluate, match_rule

DOMAINS = ("web-1", "web-2", "db-1")
DISKS = ("vda", "vdb")
IMAGES = ("/img/base-2023.qcow2", "/img/base-2025.qcow2", "/img/snap-1.qcow2", "/img/snap-2.qcow2", "")
JOB_TYPES = ("pull", "copy", "commit", "active_commit", "backup", "unknown")
DOMAIN_GLOBS = ("*", "*", "web-*", "db-?", "*-1", "[wd]*", "nothing")  # "*" often: most disks match
DISK_GLOBS = ("*", "*", "vd*", "vd[a]", "vdb", "sd*")
IMAGE_GLOBS = ("/img/base-2023*", "/img/base-*", "*snap*", "/img/*", "*2025*")
BASE = datetime(2025, 1, 6, tzinfo=timezone.utc)  # a Monday
MINUTES_PER_WEEK = 7 * 1440


# ------------------------------------------------------------------ strategies

windows = st.builds(
    lambda days, start, length: Window(days, start, (start + length) % 1440),
    st.sets(st.integers(0, 6), min_size=1).map(lambda s: tuple(sorted(s))),
    st.integers(0, 1439),
    st.integers(1, 1439),
)

limits = st.builds(
    Limits,
    max_concurrent=st.integers(1, 6),
    windows=st.none() | st.lists(windows, min_size=1, max_size=3).map(tuple),
    abort_outside_window=st.booleans(),
    retry_after=st.sampled_from((0.0, 60.0, 3600.0, 86400.0)),
    min_free_space_ratio=st.sampled_from((1.0, 1.1, 2.0, 100.0)),
    max_attempts=st.integers(1, 4),
)

rules = st.lists(
    st.builds(
        Rule,
        name=st.just(""),  # named below: names are unique
        match=st.builds(Match, domain=st.sampled_from(DOMAIN_GLOBS).map(Glob),
                        disk=st.sampled_from(DISK_GLOBS).map(Glob)),
        when=st.builds(When, min_backing_depth=st.sampled_from((None, None, 1, 2, 3)),
                       backing_file=st.sampled_from((None, None, None) + IMAGE_GLOBS).map(lambda g: g and Glob(g))),
        pull=st.builds(PullAction, bandwidth_bytes=st.sampled_from((0, 1024, 50 * 1024**2)),
                       keep_base=st.sampled_from((None,) * 6 + IMAGE_GLOBS).map(lambda g: g and Glob(g))),
    ),
    min_size=1, max_size=4,
).map(lambda rs: tuple(Rule(f"rule-{i}", r.match, r.when, r.pull) for i, r in enumerate(rs)))

policies = st.builds(Policy, rules=rules, limits=limits)


@st.composite
def worlds(draw):
    """(snapshot, history, space estimates by disk, now)."""
    now = BASE + timedelta(minutes=draw(st.integers(0, 2 * MINUTES_PER_WEEK)), seconds=draw(st.integers(0, 59)))
    now = now.astimezone(timezone(timedelta(hours=draw(st.integers(-12, 14)))))
    now_wall = now.timestamp()
    often = st.sampled_from((True, True, True, True, False))
    disks = {}
    for domain in DOMAINS:
        for target in DISKS:
            if draw(often):
                depth = draw(st.sampled_from((1, 1, 2, 2, 3, 4, 0)))
                chain = tuple(BackingImage(draw(st.sampled_from(IMAGES)), "qcow2") for _ in range(depth))
                disks[(domain, target)] = DiskInfo(domain, target, f"/img/{domain}-{target}.qcow2", "qcow2", chain)
    running = frozenset(d for d in DOMAINS if draw(often))
    job_keys = draw(st.sets(st.sampled_from([(d, k) for d in DOMAINS for k in DISKS]), max_size=3))
    jobs = {key: ActiveJob(key[0], key[1], draw(st.sampled_from(JOB_TYPES)), 1, 10, 0, False, 0.0, 0.0)
            for key in job_keys}
    snapshot = Snapshot(connected=draw(st.sampled_from((True,) * 9 + (False,))),
                        disks=MappingProxyType(disks), jobs=MappingProxyType(jobs), outcomes=MappingProxyType({}),
                        inferred_outcomes=MappingProxyType({}), running_domains=running, version=1,
                        taken_wall=now_wall)
    history = {}
    for key in draw(st.sets(st.sampled_from([(d, k) for d in DOMAINS for k in DISKS]), max_size=3)):
        chain = disks[key].backing_chain if key in disks else ()
        history[key] = DiskHistory(
            rule=draw(st.sampled_from(("rule-0", "rule-1", "gone-rule"))),
            running_since=draw(st.none() | st.just(now_wall - 10)),
            failures=draw(st.integers(0, 5)),
            last_failure_wall=draw(st.none() | st.floats(now_wall - 100_000, now_wall)),
            last_error=draw(st.sampled_from(("", "ENOSPC"))),
            completed_chain=draw(st.none() | st.just(chain) | st.just(())),
            aborting=draw(st.booleans()),
        )
    space = {key: draw(st.sampled_from((None, "short", "room", "room", "room")).flatmap(
        lambda kind: st.none() if kind is None else st.builds(
            DiskSpace, st.integers(0, 10**12), st.integers(0, 10**9) if kind == "short" else st.just(10**15))))
        for key in disks}
    return snapshot, History(MappingProxyType(history)), space, now


# ------------------------------------------------------------------ oracles


def in_window_oracle(lim: Limits, now: datetime) -> bool:
    """Minutes of the week the windows cover: a window crossing midnight belongs to its start day."""
    if lim.windows is None:
        return True
    minute = now.weekday() * 1440 + now.hour * 60 + now.minute
    for w in lim.windows:
        length = (w.end_minute - w.start_minute) % 1440
        for day in w.days:
            start = day * 1440 + w.start_minute
            if (minute - start) % MINUTES_PER_WEEK < length:
                return True
    return False


def in_backoff(h: DiskHistory | None, disk: DiskInfo, lim: Limits, now_wall: float) -> bool:
    if h is None:
        return False
    if h.failures >= lim.max_attempts:
        return True
    if h.failures and h.last_failure_wall is not None and now_wall < h.last_failure_wall + lim.retry_after:
        return True
    return h.completed_chain is not None and h.completed_chain == disk.backing_chain


# ------------------------------------------------------------------ the property


@given(policy=policies, world=worlds(), enforcing=st.booleans())
def test_evaluate_never_breaks_a_safety_rule(policy, world, enforcing):
    snapshot, history, space, now = world
    asked = []

    def space_fn(disk, base):
        asked.append(disk.key)
        return space[disk.key]

    plan = evaluate(snapshot, policy, now, history, space_fn, enforcing)
    lim = policy.limits
    pending = {k for k, h in history.disks.items() if h.running}
    active = set(snapshot.jobs) | pending
    window_open = in_window_oracle(lim, now)
    assert plan.in_window == window_open
    if not snapshot.connected:
        assert plan.decisions == () and not asked, "nothing is decided on a stale inventory"
        return
    assert plan.active_jobs == len(active)

    starts = [d for d in plan.decisions if d.action == "start"]
    would = [d for d in plan.decisions if d.would == "start"]
    event(f"starts (or would-starts): {min(len(starts) + len(would), 3)}")
    event(f"deferred for {sorted({d.reason for d in plan.decisions if d.action == 'defer'})}")
    keys = [d.key for d in plan.decisions]
    assert len(keys) == len(set(keys)), "one decision per disk"

    if not enforcing:
        assert not starts and all(d.action == "defer" for d in plan.decisions), "a dry run acts on nothing"
    # The cap counts every active job on the host; a dry run's would-starts take the same slots.
    assert len(active) + len(starts) + len(would) <= max(lim.max_concurrent, len(active))
    if len(active) >= lim.max_concurrent:
        assert not starts and not would
    if not window_open:
        assert not starts and not would, "no start outside the windows"

    for d in starts + would:
        disk = snapshot.disks[d.key]
        assert d.key not in active, "never onto a disk with an active job"
        assert disk.domain in snapshot.running_domains and disk.backing_depth > 0
        assert not in_backoff(history.disks.get(d.key), disk, lim, now.timestamp()), "never onto a disk in backoff"
        est = space[d.key]
        assert est is not None and est.free_bytes >= est.bytes_to_copy * lim.min_free_space_ratio, \
            "never onto a disk short of space"
        index = policy.rule_names.index(d.rule)
        assert match_rule(disk, policy.rules[index])[0]
        assert not any(match_rule(disk, r)[0] for r in policy.rules[:index]), "the first matching rule decides"
        if d.base_path is not None:
            assert d.base_path in [b.path for b in disk.backing_chain]
    assert len(set(asked)) == len(asked), "space is estimated once per disk"
    for key in asked:
        disk = snapshot.disks[key]
        assert key not in active and not in_backoff(history.disks.get(key), disk, lim, now.timestamp())

    for d in plan.decisions:
        if d.action == "abort" or d.would == "abort":
            h = history.disks.get(d.key)
            assert lim.abort_outside_window and not window_open
            assert h is not None and h.running and not h.aborting, "only a pull this policy started is aborted"
            assert snapshot.jobs[d.key].job_type == "pull"
        assert d.reason in ("start", "window", "concurrency", "space", "backoff", "active_job", "gave_up", "dry_run")


@given(lim=limits, now=st.integers(0, 2 * MINUTES_PER_WEEK))
def test_next_opening_is_the_first_time_a_window_opens(lim, now):
    now = BASE + timedelta(minutes=now)
    nxt = lim.next_opening(now)
    if lim.windows is None:
        assert nxt is None
        return
    openings = [datetime.combine(now.date() + timedelta(days=offset), datetime.min.time(), now.tzinfo)
                + timedelta(minutes=w.start_minute)
                for w in lim.windows for offset in range(9)
                if (now.date() + timedelta(days=offset)).weekday() in w.days]
    assert nxt == min(t for t in openings if t > now)
    assert in_window_oracle(lim, nxt)
