"""The pure decision function: matching, ordering and every safety rule, without libvirt."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from types import MappingProxyType

import pytest

from exporter.model import ActiveJob, BackingImage, DiskInfo, Snapshot
from exporter.policy.config import parse_policy
from exporter.policy.decide import (
    DEFER_REASONS,
    DiskHistory,
    DiskSpace,
    History,
    evaluate,
    match_disks,
)

GiB = 1024**3
MONDAY_2AM = datetime(2025, 1, 6, 2, 0, tzinfo=timezone.utc)  # inside mon-fri 01:00-05:00


def disk(domain: str, target: str = "vda", chain: tuple[str, ...] = ("/img/base.qcow2",)) -> DiskInfo:
    return DiskInfo(
        domain=domain,
        disk=target,
        source=f"/img/{domain}-{target}.qcow2",
        format="qcow2",
        backing_chain=tuple(BackingImage(p, "qcow2") for p in chain),
    )


def job(domain: str, target: str = "vda", job_type: str = "pull") -> ActiveJob:
    return ActiveJob(domain, target, job_type, cur=1, end=10, bandwidth=0, ready=False,
                     start_time=0.0, cursor_changed_time=0.0)


def snap(disks=(), jobs=(), running=None, connected=True, taken_wall=0.0) -> Snapshot:
    disks = list(disks)
    if running is None:
        running = {d.domain for d in disks} | {j.domain for j in jobs}
    return Snapshot(
        connected=connected,
        disks=MappingProxyType({d.key: d for d in disks}),
        jobs=MappingProxyType({j.key: j for j in jobs}),
        outcomes=MappingProxyType({}),
        inferred_outcomes=MappingProxyType({}),
        running_domains=frozenset(running),
        version=1,
        taken_wall=taken_wall,
    )


def policy(rules: str, limits: str = "") -> object:
    text = "rules:\n" + rules + ("limits:\n" + limits if limits else "")
    return parse_policy(text, "test.yaml")


ALL = "  - name: all\n    action: {pull: {}}\n"
ALL_LIMITS = "  max_concurrent: {n}\n"


class Space:
    """Fake space estimator that records which disks it was asked about."""

    def __init__(self, to_copy: int = GiB, free: int = 100 * GiB, per_disk=None):
        self.to_copy, self.free, self.per_disk = to_copy, free, per_disk or {}
        self.calls: list[tuple[str, str, str | None]] = []

    def __call__(self, d: DiskInfo, base: str | None):
        self.calls.append((d.domain, d.disk, base))
        if d.key in self.per_disk:
            return self.per_disk[d.key]
        return DiskSpace(self.to_copy, self.free)


def run(s, p, now=MONDAY_2AM, history=None, space=None, enforcing=True):
    return evaluate(s, p, now, history or History.empty(), space or Space(), enforcing)


def by_key(plan):
    return {(d.domain, d.disk): d for d in plan.decisions}


# ------------------------------------------------------------------ matching


def test_depth_zero_never_matches():
    p = policy(ALL)
    plan = run(snap([disk("a", chain=()), disk("b")]), p)
    assert [d.domain for d in plan.decisions] == ["b"]
    assert plan.candidates == {"all": 1}
    assert plan.decisions[0].match_reason == "depth 1 >= 1"


def test_globs_and_min_depth():
    p = policy(
        '  - name: deep\n    match: {domain: "web-*", disk: "vd*"}\n    when: {min_backing_depth: 2}\n'
        "    action: {pull: {bandwidth: 50MiB/s}}\n"
    )
    s = snap([
        disk("web-1", chain=("/i/a", "/i/b")),
        disk("web-2", chain=("/i/a",)),
        disk("db-1", chain=("/i/a", "/i/b")),
        disk("web-3", "sda", chain=("/i/a", "/i/b")),
    ])
    plan = run(s, p)
    assert [(d.domain, d.disk) for d in plan.decisions] == [("web-1", "vda")]
    d = plan.decisions[0]
    assert d.match_reason == "depth 2 >= 2"
    assert d.bandwidth_bytes == 50 * 1024**2 and d.base_path is None
    assert [(n.domain, n.reason) for n in plan.unmatched] == [("web-2", "depth 1 < 2")]


def test_backing_file_matches_any_image_in_chain():
    p = policy('  - name: old\n    when: {backing_file: "/img/base-2023-*.qcow2"}\n    action: {pull: {}}\n')
    s = snap([
        disk("a", chain=("/img/mid.qcow2", "/img/base-2023-01.qcow2")),
        disk("b", chain=("/img/base-2024-01.qcow2",)),
    ])
    plan = run(s, p)
    assert [d.domain for d in plan.decisions] == ["a"]
    assert plan.decisions[0].match_reason == (
        "backing image /img/base-2023-01.qcow2 matches '/img/base-2023-*.qcow2'"
    )
    assert plan.unmatched[0].reason == "no backing image matches '/img/base-2023-*.qcow2'"


def test_keep_base_picks_first_matching_image_top_down():
    p = policy('  - name: kb\n    action:\n      pull: {keep_base: "/img/base-*.qcow2"}\n')
    chain = ("/img/snap2.qcow2", "/img/snap1.qcow2", "/img/base-2025.qcow2", "/img/base-2023.qcow2")
    space = Space()
    plan = run(snap([disk("a", chain=chain)]), p, space=space)
    d = plan.decisions[0]
    assert d.action == "start" and d.base_path == "/img/base-2025.qcow2"
    assert d.match_reason == "keep_base /img/base-2025.qcow2: 2 layers above it"
    assert space.calls == [("a", "vda", "/img/base-2025.qcow2")]


def test_keep_base_not_in_chain_does_not_match_and_says_why():
    p = policy('  - name: kb\n    action:\n      pull: {keep_base: "/img/base-2025-*.qcow2"}\n')
    plan = run(snap([disk("a", chain=("/img/snap.qcow2", "/img/base-2023.qcow2"))]), p)
    assert plan.decisions == () and plan.candidates == {"kb": 0}
    assert plan.unmatched[0].reason == "no backing image matches keep_base '/img/base-2025-*.qcow2'"


def test_keep_base_directly_under_active_layer_does_not_match():
    p = policy('  - name: kb\n    action:\n      pull: {keep_base: "/img/base-*.qcow2"}\n')
    plan = run(snap([disk("a", chain=("/img/base-1.qcow2", "/img/older.qcow2"))]), p)
    assert plan.decisions == ()
    assert plan.unmatched[0].reason == "keep_base /img/base-1.qcow2 is already directly under the active layer"


def test_first_matching_rule_wins_and_later_rules_do_not_count_the_disk():
    p = policy(
        '  - name: first\n    match: {domain: "web-*"}\n    action: {pull: {bandwidth: 1MiB/s}}\n'
        "  - name: second\n    action: {pull: {}}\n"
    )
    plan = run(snap([disk("web-1"), disk("db-1")]), p, enforcing=False)
    rules = {d.domain: d.rule for d in plan.decisions}
    assert rules == {"web-1": "first", "db-1": "second"}
    assert plan.candidates == {"first": 1, "second": 1}


def test_disks_of_domains_not_running_are_ignored():
    plan = run(snap([disk("a"), disk("b")], running={"a"}), policy(ALL))
    assert [d.domain for d in plan.decisions] == ["a"]


def test_order_is_rule_order_then_domain_then_disk():
    p = policy('  - name: r1\n    match: {domain: "z*"}\n    action: {pull: {}}\n' + ALL, "  max_concurrent: 10\n")
    s = snap([disk("b", "vdb"), disk("a", "vdb"), disk("b", "vda"), disk("zz"), disk("a", "vda")])
    plan = run(s, p)
    assert [(d.rule, d.domain, d.disk) for d in plan.decisions] == [
        ("r1", "zz", "vda"), ("all", "a", "vda"), ("all", "a", "vdb"), ("all", "b", "vda"), ("all", "b", "vdb"),
    ]


# ------------------------------------------------------------------ concurrency and active jobs


def test_foreign_jobs_count_towards_max_concurrent():
    p = policy(ALL, "  max_concurrent: 2\n")
    s = snap([disk("a"), disk("b"), disk("c")], jobs=[job("other", "vda", "copy")])
    plan = run(s, p)
    assert [d.action for d in plan.decisions] == ["start", "defer", "defer"]
    assert [d.reason for d in plan.decisions] == ["start", "concurrency", "concurrency"]
    assert plan.active_jobs == 1
    assert plan.deferred == {("all", "concurrency"): 2}
    assert plan.decisions[1].detail == "2 active jobs >= max_concurrent 2"


@pytest.mark.parametrize("max_concurrent,foreign", [(1, 0), (2, 0), (3, 1), (5, 2), (4, 4), (2, 5)])
def test_max_concurrent_never_exceeded_in_one_evaluation(max_concurrent, foreign):
    p = policy(ALL, f"  max_concurrent: {max_concurrent}\n")
    disks = [disk(f"d{i:02d}", t) for i in range(10) for t in ("vda", "vdb")]
    jobs = [job(f"f{i}", "vda", "backup") for i in range(foreign)]
    plan = run(snap(disks, jobs), p)
    starts = len(plan.starts)
    assert starts == max(0, max_concurrent - foreign)
    assert foreign + starts <= max(max_concurrent, foreign)


def test_disk_with_active_job_is_deferred_and_counts_once():
    p = policy(ALL, "  max_concurrent: 2\n")
    s = snap([disk("a"), disk("b"), disk("c")], jobs=[job("a", "vda", "backup")])
    space = Space()
    plan = run(s, p, space=space)
    d = by_key(plan)
    assert d[("a", "vda")].reason == "active_job"
    assert d[("a", "vda")].detail == "backup job active (started by someone else)"
    assert d[("b", "vda")].action == "start"
    assert d[("c", "vda")].reason == "concurrency"
    assert ("a", "vda", None) not in space.calls


def test_policy_pull_not_yet_in_snapshot_counts_as_active():
    # The engine started a pull on b a moment ago; the snapshot predates it.
    p = policy(ALL, "  max_concurrent: 1\n")
    hist = History(MappingProxyType({("b", "vda"): DiskHistory(rule="all", running_since=1.0)}))
    plan = run(snap([disk("a"), disk("b")]), p, history=hist)
    d = by_key(plan)
    assert d[("b", "vda")].reason == "active_job"
    assert "not yet visible" in d[("b", "vda")].detail
    assert d[("a", "vda")].reason == "concurrency"
    assert plan.active_jobs == 1


def test_space_only_called_for_disks_that_would_start():
    p = policy(ALL, "  max_concurrent: 1\n")
    space = Space()
    run(snap([disk("a"), disk("b"), disk("c")]), p, space=space)
    assert space.calls == [("a", "vda", None)]


# ------------------------------------------------------------------ space


def test_space_deferral_and_next_candidate_takes_the_slot():
    p = policy(ALL, "  max_concurrent: 1\n  min_free_space_ratio: 1.2\n")
    space = Space(per_disk={
        ("a", "vda"): DiskSpace(bytes_to_copy=10 * GiB, free_bytes=11 * GiB),  # 11 < 12
        ("b", "vda"): DiskSpace(bytes_to_copy=10 * GiB, free_bytes=12 * GiB),
    })
    plan = run(snap([disk("a"), disk("b"), disk("c")]), p, space=space)
    d = by_key(plan)
    assert d[("a", "vda")].reason == "space"
    assert d[("a", "vda")].detail == "needs 1.2 x 10.0 GiB, 11.0 GiB free"
    assert d[("b", "vda")].action == "start"
    assert d[("c", "vda")].reason == "concurrency"


def test_unknown_space_defers():
    p = policy(ALL)
    space = Space(per_disk={("a", "vda"): None})
    d = run(snap([disk("a")]), p, space=space).decisions[0]
    assert (d.action, d.reason) == ("defer", "space")
    assert d.detail == "cannot estimate the space the pull needs"


def test_default_ratio_has_a_margin():
    p = policy(ALL)
    space = Space(per_disk={("a", "vda"): DiskSpace(100, 100)})
    assert run(snap([disk("a")]), p, space=space).decisions[0].reason == "space"
    space = Space(per_disk={("a", "vda"): DiskSpace(100, 111)})
    assert run(snap([disk("a")]), p, space=space).decisions[0].reason == "start"


# ------------------------------------------------------------------ windows

WEEKNIGHTS = '  windows:\n    - days: [mon, tue, wed, thu, fri]\n      start: "01:00"\n      end: "05:00"\n'
FRIDAY_LATE = '  windows:\n    - days: [fri]\n      start: "22:00"\n      end: "02:00"\n'


@pytest.mark.parametrize(
    "limits,now,expected",
    [
        (WEEKNIGHTS, datetime(2025, 1, 6, 2, 0, tzinfo=timezone.utc), "start"),  # mon 02:00
        (WEEKNIGHTS, datetime(2025, 1, 6, 5, 0, tzinfo=timezone.utc), "window"),  # mon 05:00, end exclusive
        (WEEKNIGHTS, datetime(2025, 1, 11, 2, 0, tzinfo=timezone.utc), "window"),  # sat 02:00
        (FRIDAY_LATE, datetime(2025, 1, 10, 23, 0, tzinfo=timezone.utc), "start"),  # fri 23:00
        (FRIDAY_LATE, datetime(2025, 1, 11, 1, 0, tzinfo=timezone.utc), "start"),  # sat 01:00
        (FRIDAY_LATE, datetime(2025, 1, 11, 2, 0, tzinfo=timezone.utc), "window"),  # sat 02:00
        (FRIDAY_LATE, datetime(2025, 1, 10, 1, 0, tzinfo=timezone.utc), "window"),  # fri 01:00
        (FRIDAY_LATE, datetime(2025, 1, 11, 23, 0, tzinfo=timezone.utc), "window"),  # sat 23:00
        ("  max_concurrent: 1\n", datetime(2025, 1, 12, 15, 0, tzinfo=timezone.utc), "start"),  # no windows
    ],
)
def test_windows(limits, now, expected):
    d = run(snap([disk("a")]), policy(ALL, limits), now=now).decisions[0]
    assert d.reason == expected


def test_window_uses_local_wall_clock_of_now():
    # 00:30 UTC on Monday is 01:30 in UTC+1: inside the 01:00-05:00 window.
    now = datetime(2025, 1, 6, 1, 30, tzinfo=timezone(timedelta(hours=1)))
    assert now.astimezone(timezone.utc).hour == 0
    assert run(snap([disk("a")]), policy(ALL, WEEKNIGHTS), now=now).decisions[0].reason == "start"


def test_window_deferral_says_when_it_opens_and_skips_space():
    space = Space()
    friday_6am = datetime(2025, 1, 10, 6, 0, tzinfo=timezone.utc)
    d = run(snap([disk("a")]), policy(ALL, WEEKNIGHTS), now=friday_6am, space=space).decisions[0]
    assert d.detail == "outside the start windows; next opens Mon 2025-01-13 01:00"
    assert space.calls == []


def test_naive_now_is_rejected():
    with pytest.raises(ValueError):
        run(snap([disk("a")]), policy(ALL), now=datetime(2025, 1, 6, 2, 0))


# ------------------------------------------------------------------ backoff and give-up

HOUR = 3600.0


def test_backoff_until_retry_after():
    p = policy(ALL, "  retry_after: 1h\n")
    failed_at = MONDAY_2AM.timestamp() - 30 * 60
    hist = History(MappingProxyType({
        ("a", "vda"): DiskHistory(rule="all", failures=1, last_failure_wall=failed_at, last_error="job failed"),
    }))
    d = run(snap([disk("a")]), p, history=hist).decisions[0]
    assert (d.action, d.reason) == ("defer", "backoff")
    assert d.detail == "attempt 1 of 3 failed (job failed); retry in 30m"
    later = MONDAY_2AM + timedelta(minutes=31)
    assert run(snap([disk("a")]), p, now=later, history=hist).decisions[0].action == "start"


def test_gave_up_after_max_attempts():
    p = policy(ALL, "  retry_after: 1h\n  max_attempts: 2\n")
    long_ago = MONDAY_2AM.timestamp() - 100 * HOUR
    hist = History(MappingProxyType({
        ("a", "vda"): DiskHistory(rule="all", failures=2, last_failure_wall=long_ago, last_error="ENOSPC"),
        ("b", "vda"): DiskHistory(rule="all", failures=1, last_failure_wall=long_ago),
    }))
    plan = run(snap([disk("a"), disk("b")]), p, history=hist)
    d = by_key(plan)
    assert d[("a", "vda")].reason == "gave_up"
    assert d[("a", "vda")].detail == "2 failed attempts (max_attempts 2); last error: ENOSPC"
    assert d[("b", "vda")].action == "start"
    assert plan.deferred == {("all", "gave_up"): 1}


def test_completed_pull_is_not_repeated_while_inventory_is_stale():
    p = policy(ALL)
    a = disk("a", chain=("/img/s.qcow2", "/img/b.qcow2"))
    hist = History(MappingProxyType({
        ("a", "vda"): DiskHistory(rule="all", completed_chain=a.backing_chain, started_chain=a.backing_chain),
    }))
    d = run(snap([a]), p, history=hist).decisions[0]
    assert (d.action, d.reason) == ("defer", "backoff")
    # Once the inventory shows a different chain (new layers added later), the disk is fair game.
    a2 = replace(a, backing_chain=(BackingImage("/img/new.qcow2", "qcow2"),))
    assert run(snap([a2]), p, history=hist).decisions[0].action == "start"


# ------------------------------------------------------------------ dry run


def test_dry_run_reports_would_start_and_simulates_concurrency():
    p = policy(ALL, "  max_concurrent: 2\n")
    plan = run(snap([disk("a"), disk("b"), disk("c")]), p, enforcing=False)
    assert plan.starts == ()
    assert [(d.action, d.reason, d.would) for d in plan.decisions] == [
        ("defer", "dry_run", "start"),
        ("defer", "dry_run", "start"),
        ("defer", "concurrency", None),
    ]
    assert plan.decisions[0].detail.startswith("dry run, would pull; 1.0 GiB to copy")
    assert plan.deferred == {("all", "dry_run"): 2, ("all", "concurrency"): 1}
    assert plan.enforcing is False


# ------------------------------------------------------------------ abort outside window

ABORT = WEEKNIGHTS + "  abort_outside_window: true\n"
MONDAY_6AM = datetime(2025, 1, 6, 6, 0, tzinfo=timezone.utc)


def _running(key=("a", "vda"), **kw):
    return History(MappingProxyType({key: DiskHistory(rule="all", running_since=1.0, **kw)}))


def test_abort_outside_window_aborts_only_policy_pulls():
    s = snap([disk("a"), disk("b")], jobs=[job("a"), job("b")])
    plan = run(s, policy(ALL, ABORT), now=MONDAY_6AM, history=_running())
    d = by_key(plan)
    assert (d[("a", "vda")].action, d[("a", "vda")].reason) == ("abort", "window")
    assert (d[("b", "vda")].action, d[("b", "vda")].reason) == ("defer", "active_job")  # foreign


def test_no_abort_inside_window_or_when_disabled():
    s = snap([disk("a")], jobs=[job("a")])
    assert run(s, policy(ALL, ABORT), now=MONDAY_2AM, history=_running()).decisions[0].reason == "active_job"
    assert run(s, policy(ALL, WEEKNIGHTS), now=MONDAY_6AM, history=_running()).decisions[0].reason == "active_job"
    assert run(s, policy(ALL, "  abort_outside_window: true\n"), now=MONDAY_6AM,
               history=_running()).decisions[0].reason == "active_job"  # no windows = always inside


def test_abort_not_repeated_and_not_for_other_job_types():
    s = snap([disk("a")], jobs=[job("a")])
    d = run(s, policy(ALL, ABORT), now=MONDAY_6AM, history=_running(aborting=True)).decisions[0]
    assert (d.action, d.reason) == ("defer", "window")
    s = snap([disk("a")], jobs=[job("a", job_type="copy")])
    d = run(s, policy(ALL, ABORT), now=MONDAY_6AM, history=_running()).decisions[0]
    assert (d.action, d.reason) == ("defer", "active_job")


def test_abort_applies_to_policy_pulls_no_rule_matches_any_more():
    s = snap([disk("a", chain=())], jobs=[job("a")])  # inventory already shows a flat chain
    plan = run(s, policy(ALL, ABORT), now=MONDAY_6AM, history=_running())
    assert [(d.domain, d.action, d.rule) for d in plan.decisions] == [("a", "abort", "all")]
    assert plan.candidates == {"all": 0} and plan.deferred == {}


def test_abort_in_dry_run_is_only_reported():
    s = snap([disk("a")], jobs=[job("a")])
    d = run(s, policy(ALL, ABORT), now=MONDAY_6AM, history=_running(), enforcing=False).decisions[0]
    assert (d.action, d.reason, d.would) == ("defer", "dry_run", "abort")


# ------------------------------------------------------------------ misc


def test_disconnected_snapshot_decides_nothing():
    plan = run(snap([disk("a")], connected=False), policy(ALL))
    assert plan.decisions == () and plan.connected is False and plan.candidates == {"all": 0}


def test_deferred_reasons_are_the_documented_label_values():
    assert DEFER_REASONS == ("window", "concurrency", "fleet", "space", "backoff", "active_job", "gave_up", "dry_run")


def test_matches_can_be_precomputed():
    p = policy(ALL)
    s = snap([disk("a"), disk("b")])
    m = match_disks(s, p)
    plan = evaluate(s, p, MONDAY_2AM, History.empty(), Space(), True, matches=m)
    assert plan == run(s, p)


# ------------------------------------------------------------------ fleet budget

FLEET = "fleet:\n  zookeeper: zk1:2181\n  path: /pulls\n  max_concurrent: {n}\n"


def fleet_policy(n: int, local: int = 10):
    return parse_policy("rules:\n" + ALL + "limits:\n" + ALL_LIMITS.format(n=local) + FLEET.format(n=n), "t.yml")


@pytest.mark.parametrize("enforcing", [True, False])
def test_the_fleet_budget_caps_starts_and_would_starts_after_the_local_cap(enforcing):
    from exporter.policy.decide import FleetView

    s = snap([disk(f"d{i}") for i in range(5)])
    p = fleet_policy(3)
    plan = evaluate(s, p, MONDAY_2AM, History.empty(), Space(), enforcing, fleet=FleetView(True, 3, 1))
    reasons = [d.reason for d in plan.decisions]
    assert reasons == ["start" if enforcing else "dry_run"] * 2 + ["fleet"] * 3
    assert plan.decisions[2].detail == "3 fleet leases taken >= fleet max_concurrent 3"
    assert plan.deferred[("all", "fleet")] == 3
    # The local cap still comes first.
    plan = evaluate(s, fleet_policy(3, local=1), MONDAY_2AM, History.empty(), Space(), enforcing,
                    fleet=FleetView(True, 3, 0))
    assert [d.reason for d in plan.decisions][1:] == ["concurrency"] * 4


def test_an_unusable_or_unknown_fleet_budget_starts_nothing():
    from exporter.policy.decide import FleetView

    s = snap([disk("a")])
    down = evaluate(s, fleet_policy(3), MONDAY_2AM, History.empty(), Space(), True,
                    fleet=FleetView(False, 3, 0, "connection to ZooKeeper lost; reconnecting"))
    assert [(d.action, d.reason) for d in down.decisions] == [("defer", "fleet")]
    assert "connection to ZooKeeper lost" in down.decisions[0].detail
    unknown = evaluate(s, fleet_policy(3), MONDAY_2AM, History.empty(), Space(), True)
    assert [(d.action, d.reason) for d in unknown.decisions] == [("defer", "fleet")]
    # Without a fleet section a view is ignored.
    assert run(s, policy(ALL)).decisions[0].action == "start"
