"""The engine around the pure function: host calls, outcomes, backoff, reload, metrics, table."""

from __future__ import annotations

import io
import logging
import threading
import time
from dataclasses import replace
from datetime import datetime, timezone
from types import MappingProxyType

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from exporter.model import ActiveJob, BackingImage, DiskInfo, Snapshot
from exporter.policy.commands import policy_plan
from exporter.policy.config import PolicyError
from exporter.policy.decide import DiskSpace
from exporter.policy.engine import PolicyEngine, format_plan_table

GiB = 1024**3
MONDAY_2AM = datetime(2025, 1, 6, 2, 0, tzinfo=timezone.utc).timestamp()
MONDAY_6AM = datetime(2025, 1, 6, 6, 0, tzinfo=timezone.utc).timestamp()
TUESDAY_2AM = datetime(2025, 1, 7, 2, 0, tzinfo=timezone.utc).timestamp()


class Clock:
    def __init__(self, t: float = MONDAY_2AM):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.t, tz=timezone.utc)


class FakeHost:
    def __init__(self, fail=None, delay: float = 0.0):
        self.calls: list[tuple] = []
        self.fail = fail or set()  # method names or (domain, disk) keys that raise
        self.delay = delay
        self._lock = threading.Lock()

    def _call(self, *call):
        if self.delay:
            time.sleep(self.delay)
        with self._lock:
            self.calls.append(call)
        if call[0] in self.fail or (call[1], call[2]) in self.fail:
            raise RuntimeError(f"{call[0]} failed: internal error")

    def start_pull(self, domain, disk, bandwidth_bytes):
        self._call("start_pull", domain, disk, bandwidth_bytes)

    def start_rebase(self, domain, disk, base_path, bandwidth_bytes):
        self._call("start_rebase", domain, disk, base_path, bandwidth_bytes)

    def abort_job(self, domain, disk):
        self._call("abort_job", domain, disk)

    # The host as it is now: the snapshot the engine was given unless a test says otherwise.
    view = None
    given = None
    fresh_reads = 0

    def fresh_snapshot(self):
        self.fresh_reads += 1
        return self.view if self.view is not None else self.given


def disk(domain, target="vda", chain=("/img/base.qcow2",)):
    return DiskInfo(domain, target, f"/img/{domain}.qcow2", "qcow2", tuple(BackingImage(p, "qcow2") for p in chain))


def job(domain, target="vda", job_type="pull"):
    return ActiveJob(domain, target, job_type, 1, 10, 0, False, 0.0, 0.0)


_version = [0]


def snap(disks=(), jobs=(), taken_wall=0.0):
    _version[0] += 1
    disks = list(disks)
    return Snapshot(
        connected=True,
        disks=MappingProxyType({d.key: d for d in disks}),
        jobs=MappingProxyType({j.key: j for j in jobs}),
        outcomes=MappingProxyType({}),
        inferred_outcomes=MappingProxyType({}),
        running_domains=frozenset(d.domain for d in disks) | frozenset(j.domain for j in jobs),
        version=_version[0],
        taken_wall=taken_wall,
    )


def plenty(d, base):
    return DiskSpace(GiB, 100 * GiB)


def write_policy(tmp_path, rules=None, limits="  max_concurrent: 2\n", name="policy.yaml"):
    rules = rules if rules is not None else "  - name: all\n    action:\n      pull: {bandwidth: 1MiB/s}\n"
    f = tmp_path / name
    f.write_text("rules:\n" + rules + "limits:\n" + limits)
    return str(f)


def make(tmp_path, enforcing=True, host=None, clock=None, **kw):
    clock = clock or Clock()
    host = host if host is not None else FakeHost()
    path = kw.pop("path", None) or write_policy(tmp_path, **{k: kw.pop(k) for k in ("rules", "limits") if k in kw})
    engine = PolicyEngine(path, enforcing, host, clock=clock, now=clock.now, space=kw.pop("space", plenty), **kw)
    evaluate_and_act = engine.evaluate_and_act

    def remember_given(snapshot):
        host.given = snapshot
        return evaluate_and_act(snapshot)

    engine.evaluate_and_act = remember_given
    return engine, host, clock


def exposition(engine) -> str:
    class C:
        def collect(self):
            return engine.metric_families()

    reg = CollectorRegistry()
    reg.register(C())
    return generate_latest(reg).decode()


def value(text: str, sample: str) -> float:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    raise KeyError(sample)


# ------------------------------------------------------------------ dry run and starts


def test_dry_run_starts_nothing_but_reports(tmp_path):
    engine, host, _ = make(tmp_path, enforcing=False, host=FakeHost())
    plan = engine.evaluate_and_act(snap([disk("a"), disk("b"), disk("c")]))
    assert host.calls == []
    assert [d.would for d in plan.decisions] == ["start", "start", None]
    text = exposition(engine)
    assert value(text, "libvirt_blockjob_policy_enforcing") == 0
    assert value(text, 'libvirt_blockjob_policy_candidates{rule="all"}') == 3
    assert value(text, 'libvirt_blockjob_policy_deferred{reason="dry_run",rule="all"}') == 2
    assert value(text, 'libvirt_blockjob_policy_deferred{reason="concurrency",rule="all"}') == 1
    assert value(text, 'libvirt_blockjob_policy_started_total{rule="all"}') == 0


def test_dry_run_engine_needs_no_host(tmp_path):
    path = write_policy(tmp_path)
    engine = PolicyEngine(path, False, None, clock=Clock(), now=Clock().now, space=plenty)
    assert engine.evaluate_and_act(snap([disk("a")])).decisions[0].reason == "dry_run"
    with pytest.raises(ValueError):
        PolicyEngine(path, True, None)


def test_invalid_policy_at_startup_raises(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("rules: 5\n")
    with pytest.raises(PolicyError):
        PolicyEngine(str(f), False, None)


def test_enforcing_starts_pulls_and_rebases(tmp_path):
    rules = (
        '  - name: kb\n    match: {domain: "k*"}\n    action:\n      pull: {keep_base: "/img/base*", bandwidth: 2MiB/s}\n'
        "  - name: all\n    action: {pull: {}}\n"
    )
    engine, host, _ = make(tmp_path, rules=rules, limits="  max_concurrent: 5\n")
    plan = engine.evaluate_and_act(snap([disk("k1", chain=("/img/snap", "/img/base-1")), disk("a")]))
    assert [d.action for d in plan.decisions] == ["start", "start"]
    assert host.calls == [
        ("start_rebase", "k1", "vda", "/img/base-1", 2 * 1024**2),
        ("start_pull", "a", "vda", 0),
    ]
    text = exposition(engine)
    assert value(text, "libvirt_blockjob_policy_enforcing") == 1
    assert value(text, 'libvirt_blockjob_policy_started_total{rule="kb"}') == 1
    assert value(text, 'libvirt_blockjob_policy_started_total{rule="all"}') == 1


def test_own_starts_count_until_their_outcome_even_if_snapshot_is_stale(tmp_path):
    engine, host, clock = make(tmp_path)  # max_concurrent 2
    s = snap([disk("a"), disk("b"), disk("c"), disk("d")], jobs=[job("x", "vda", "copy")])
    engine.evaluate_and_act(s)
    assert [c[1] for c in host.calls] == ["a"]
    clock.t += 1
    plan = engine.evaluate_and_act(s)  # same stale snapshot: a's pull is not in it
    assert [c[1] for c in host.calls] == ["a"]
    assert {d.domain: d.reason for d in plan.decisions} == {
        "a": "active_job", "b": "concurrency", "c": "concurrency", "d": "concurrency",
    }


def test_a_job_started_since_the_last_poll_counts_against_the_cap(tmp_path):
    engine, host, clock = make(tmp_path)  # max_concurrent 2
    disks = [disk("a"), disk("b"), disk("c"), disk("hand")]
    host.view = snap(disks, jobs=[job("x", "vda", "copy"), job("hand")])  # started by hand meanwhile
    plan = engine.evaluate_and_act(snap(disks, jobs=[job("x", "vda", "copy")]))  # the last poll's view
    assert host.calls == [] and host.fresh_reads == 1
    assert {d.domain: d.reason for d in plan.decisions} == {"a": "concurrency", "b": "concurrency",
                                                           "c": "concurrency", "hand": "active_job"}


def test_no_fresh_read_when_nothing_would_start(tmp_path):
    engine, host, clock = make(tmp_path)
    engine.evaluate_and_act(snap([disk("a"), disk("b")], jobs=[job("x"), job("y")]))
    assert host.fresh_reads == 0 and host.calls == []


def test_job_end_lets_the_next_candidate_start_at_once(tmp_path):
    engine, host, clock = make(tmp_path)
    disks = [disk("a"), disk("b"), disk("c")]
    engine.evaluate_and_act(snap(disks))
    assert [c[1] for c in host.calls] == ["a", "b"]
    clock.t += 60
    engine.on_outcome("a", "vda", "pull", "completed", clock.t)
    flat_a = disk("a", chain=())
    plan = engine.evaluate_and_act(snap([flat_a, disks[1], disks[2]], jobs=[job("b")]))
    assert [c[1] for c in host.calls] == ["a", "b", "c"]
    assert {d.domain: d.action for d in plan.decisions} == {"b": "defer", "c": "start"}


def test_completed_pull_not_restarted_while_inventory_is_stale(tmp_path):
    engine, host, clock = make(tmp_path)
    s = snap([disk("a")])
    engine.evaluate_and_act(s)
    clock.t += 60
    engine.on_outcome("a", "vda", "pull", "completed", clock.t)
    plan = engine.evaluate_and_act(snap([disk("a")]))  # chain not refreshed yet
    assert len(host.calls) == 1
    assert plan.decisions[0].reason == "backoff"


# ------------------------------------------------------------------ failures, backoff, give-up


def test_failed_pull_backs_off_then_retries_then_gives_up(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="exporter.policy")
    engine, host, clock = make(tmp_path, limits="  retry_after: 1h\n  max_attempts: 3\n")
    s = snap([disk("a")])
    for attempt in range(1, 4):
        engine.evaluate_and_act(s)
        assert len(host.calls) == attempt
        clock.t += 10
        engine.on_outcome("a", "vda", "pull", "failed", clock.t)
        plan = engine.evaluate_and_act(s)
        if attempt < 3:
            assert plan.decisions[0].reason == "backoff"
            clock.t += 3599
            assert engine.evaluate_and_act(s).decisions[0].reason == "backoff"
            clock.t += 1
    assert len(host.calls) == 3
    assert plan.decisions[0].reason == "gave_up"
    clock.t += 100 * 3600
    assert engine.evaluate_and_act(s).decisions[0].reason == "gave_up"
    assert len(host.calls) == 3
    assert any("giving up on a/vda" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    text = exposition(engine)
    assert value(text, 'libvirt_blockjob_policy_errors_total{rule="all"}') == 3
    assert value(text, 'libvirt_blockjob_policy_started_total{rule="all"}') == 3
    assert value(text, 'libvirt_blockjob_policy_deferred{reason="gave_up",rule="all"}') == 1


def test_success_resets_the_failure_count(tmp_path):
    engine, host, clock = make(tmp_path, limits="  retry_after: 1m\n  max_attempts: 2\n")
    engine.evaluate_and_act(snap([disk("a")]))
    clock.t += 10
    engine.on_outcome("a", "vda", "pull", "failed", clock.t)
    clock.t += 61
    engine.evaluate_and_act(snap([disk("a")]))
    clock.t += 10
    engine.on_outcome("a", "vda", "pull", "completed", clock.t)
    assert engine.history().disks[("a", "vda")].failures == 0


def test_start_exception_counts_as_error_and_backs_off(tmp_path):
    engine, host, clock = make(tmp_path, host=FakeHost(fail={("a", "vda")}), limits="  retry_after: 5m\n  max_concurrent: 2\n")
    plan = engine.evaluate_and_act(snap([disk("a"), disk("b")]))
    a = plan.decisions[0]
    assert (a.action, a.error) == ("start", "start_pull failed: internal error")
    assert "start FAILED" in format_plan_table(plan)
    h = engine.history().disks[("a", "vda")]
    assert (h.failures, h.running) == (1, False)
    text = exposition(engine)
    assert value(text, 'libvirt_blockjob_policy_errors_total{rule="all"}') == 1
    assert value(text, 'libvirt_blockjob_policy_started_total{rule="all"}') == 1  # b
    clock.t += 60
    assert engine.evaluate_and_act(snap([disk("a")], jobs=[job("b")])).decisions[0].reason == "backoff"
    clock.t += 241
    engine.evaluate_and_act(snap([disk("a")], jobs=[job("b")]))
    assert host.calls[-1] == ("start_pull", "a", "vda", 1024**2)


def test_outcomes_of_other_jobs_are_ignored(tmp_path):
    engine, host, clock = make(tmp_path)
    engine.on_outcome("a", "vda", "pull", "failed", clock.t)  # never started by us
    assert engine.history().disks == {}
    engine.evaluate_and_act(snap([disk("a")]))
    engine.on_outcome("a", "vda", "pull", "failed", clock.t - 100)  # ended before our start
    engine.on_outcome("a", "vda", "copy", "failed", clock.t + 1)  # not a pull
    assert engine.history().disks[("a", "vda")].running


def test_cancel_by_someone_else_backs_off_like_a_failure(tmp_path):
    engine, host, clock = make(tmp_path)
    engine.evaluate_and_act(snap([disk("a")]))
    clock.t += 5
    engine.on_outcome("a", "vda", "pull", "canceled", clock.t)
    h = engine.history().disks[("a", "vda")]
    assert (h.failures, h.last_error) == (1, "canceled by someone else")
    assert engine.evaluate_and_act(snap([disk("a")])).decisions[0].reason == "backoff"
    assert value(exposition(engine), 'libvirt_blockjob_policy_errors_total{rule="all"}') == 0


def test_pull_that_vanishes_without_outcome_frees_its_slot(tmp_path):
    engine, host, clock = make(tmp_path, limits="  max_concurrent: 1\n  retry_after: 1h\n", lost_after=600)
    engine.evaluate_and_act(snap([disk("a"), disk("b")]))
    clock.t += 300
    plan = engine.evaluate_and_act(snap([disk("a"), disk("b")], taken_wall=clock.t))
    assert plan.decisions[1].reason == "concurrency"
    clock.t += 301
    plan = engine.evaluate_and_act(snap([disk("a"), disk("b")], taken_wall=clock.t))
    assert [(d.domain, d.action, d.reason) for d in plan.decisions] == [("a", "defer", "backoff"), ("b", "start", "start")]


# ------------------------------------------------------------------ abort outside window

WINDOW = '  windows:\n    - {days: [mon], start: "01:00", end: "05:00"}\n  abort_outside_window: true\n'


def test_abort_outside_window_then_restart_next_window(tmp_path):
    engine, host, clock = make(tmp_path, limits=WINDOW + "  max_concurrent: 2\n")
    engine.evaluate_and_act(snap([disk("a")], jobs=[job("x")]))
    assert host.calls == [("start_pull", "a", "vda", 1024**2)]
    clock.t = MONDAY_6AM
    s = snap([disk("a")], jobs=[job("a"), job("x")])
    plan = engine.evaluate_and_act(s)
    assert host.calls[-1] == ("abort_job", "a", "vda")
    assert [(d.domain, d.action, d.reason) for d in plan.decisions] == [("a", "abort", "window")]
    engine.evaluate_and_act(s)  # the job still shows: no second abort
    assert [c[0] for c in host.calls] == ["start_pull", "abort_job"]
    engine.on_outcome("a", "vda", "pull", "canceled", clock.t + 1)
    h = engine.history().disks[("a", "vda")]
    assert (h.failures, h.running) == (0, False)  # our own abort is not a failure
    clock.t = MONDAY_2AM + 7 * 86400
    engine.evaluate_and_act(snap([disk("a")]))
    assert [c[0] for c in host.calls] == ["start_pull", "abort_job", "start_pull"]


def test_cancel_event_arriving_during_our_own_abort_is_not_a_failure(tmp_path):
    # libvirt's blockJobAbort is synchronous: the "canceled" event is dispatched (on another
    # thread) before abort_job returns.
    class EventDuringAbort(FakeHost):
        def abort_job(self, domain, disk):
            super().abort_job(domain, disk)
            engine.on_outcome(domain, disk, "pull", "canceled", clock.t + 0.5)

    engine, host, clock = make(tmp_path, host=EventDuringAbort(), limits=WINDOW)
    engine.evaluate_and_act(snap([disk("a")]))
    clock.t = MONDAY_6AM
    engine.evaluate_and_act(snap([disk("a")], jobs=[job("a")]))
    h = engine.history().disks[("a", "vda")]
    assert (h.failures, h.running, h.aborting) == (0, False, False)
    clock.t += 1
    assert engine.evaluate_and_act(snap([disk("a")])).decisions[0].reason == "window"
    assert value(exposition(engine), 'libvirt_blockjob_policy_errors_total{rule="all"}') == 0


def test_failed_abort_is_retried(tmp_path):
    engine, host, clock = make(tmp_path, host=FakeHost(fail={"abort_job"}), limits=WINDOW)
    engine.evaluate_and_act(snap([disk("a")]))
    clock.t = MONDAY_6AM
    s = snap([disk("a")], jobs=[job("a")])
    assert engine.evaluate_and_act(s).decisions[0].error == "abort_job failed: internal error"
    assert not engine.history().disks[("a", "vda")].aborting
    engine.evaluate_and_act(s)
    assert [c[0] for c in host.calls] == ["start_pull", "abort_job", "abort_job"]


# ------------------------------------------------------------------ reload


def test_reload_keeps_old_policy_on_a_broken_file(tmp_path, caplog):
    engine, host, clock = make(tmp_path)
    path = str(tmp_path / "policy.yaml")
    t0 = value(exposition(engine), "libvirt_blockjob_policy_last_reload_success_timestamp_seconds")
    assert t0 == MONDAY_2AM
    clock.t += 100
    with open(path, "w") as f:
        f.write("rules:\n  - name: new\n    action: {pull: {bandwidth: fast}}\nlimits: {max_concurrent: 0}\n")
    assert engine.reload() is False
    assert engine.policy.rule_names == ("all",)
    assert engine.last_reload_successful is False
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(f"{path}:3:" in m and "bad bandwidth 'fast'" in m for m in errors)
    assert any(f"{path}:4:" in m and "max_concurrent" in m for m in errors)
    text = exposition(engine)
    assert value(text, "libvirt_blockjob_policy_last_reload_successful") == 0
    assert value(text, "libvirt_blockjob_policy_last_reload_success_timestamp_seconds") == t0
    assert engine.evaluate_and_act(snap([disk("a")])).decisions[0].rule == "all"

    clock.t += 100
    with open(path, "w") as f:
        f.write("rules:\n  - name: new\n    action: {pull: {}}\n")
    assert engine.reload() is True
    assert engine.policy.rule_names == ("new",)
    text = exposition(engine)
    assert value(text, "libvirt_blockjob_policy_last_reload_successful") == 1
    assert value(text, "libvirt_blockjob_policy_last_reload_success_timestamp_seconds") == clock.t
    assert value(text, 'libvirt_blockjob_policy_started_total{rule="all"}') == 1  # counters survive
    assert value(text, 'libvirt_blockjob_policy_started_total{rule="new"}') == 0
    assert 'libvirt_blockjob_policy_candidates{rule="all"}' not in text


def test_reload_of_a_deleted_file_keeps_policy(tmp_path):
    engine, _, _ = make(tmp_path)
    (tmp_path / "policy.yaml").unlink()
    assert engine.reload() is False and engine.policy.rule_names == ("all",)


@pytest.mark.parametrize("text,message", [
    # each of these killed the reload thread with last_reload_successful left at 1
    ("rules: []\nlimits: {retry_after: 1" + "0" * 400 + "y}\n",
     ":2: limits.retry_after: bad duration '1000000000000000000000000000000000000...': expected a number and a "
     "unit (ms, s, m, h, d, w, y) from largest to smallest, such as 500ms, 1.5m, 1h30m"),
    ("rules: []\nlimits: {max_attempts: " + "7" * 5000 + "}\n",
     ":2: limits.max_attempts: cannot read value '7777777777777777777777777777777777777...': Exceeds the limit "
     "(4300 digits) for integer string conversion: value has 5000 digits; use sys.set_int_max_str_digits() "
     "to increase the limit"),
    ("rules: " + "[" * 600 + "]" * 600 + "\n", ":1: YAML syntax error: nested deeper than 32 levels"),
])
def test_reload_failing_inside_the_parser_keeps_policy_and_reports_0(tmp_path, caplog, text, message):
    engine, _, _ = make(tmp_path)
    (tmp_path / "policy.yaml").write_text(text)
    assert engine.reload() is False and engine.policy.rule_names == ("all",)
    assert value(exposition(engine), "libvirt_blockjob_policy_last_reload_successful") == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [f"policy reload failed, keeping the previous policy: {tmp_path / 'policy.yaml'}{message}"]


def test_reload_survives_any_exception(tmp_path, caplog, monkeypatch):
    import exporter.policy.engine as engine_module

    engine, _, _ = make(tmp_path)

    def broken(path):
        raise MemoryError("out of memory")

    monkeypatch.setattr(engine_module, "load_policy", broken)
    assert engine.reload() is False and engine.policy.rule_names == ("all",)
    assert value(exposition(engine), "libvirt_blockjob_policy_last_reload_successful") == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [f"policy reload failed, keeping the previous policy: {tmp_path / 'policy.yaml'}: "
                      "MemoryError: out of memory"]


# ------------------------------------------------------------------ metrics and table


def test_metric_families_are_exactly_the_documented_ones(tmp_path):
    engine, _, _ = make(tmp_path)
    names = [f.name for f in engine.metric_families()]
    assert names == [
        "libvirt_blockjob_policy_enforcing",
        "libvirt_blockjob_policy_candidates",
        "libvirt_blockjob_policy_deferred",
        "libvirt_blockjob_policy_started",  # exposed as ..._started_total
        "libvirt_blockjob_policy_errors",
        "libvirt_blockjob_policy_last_reload_successful",
        "libvirt_blockjob_policy_last_reload_success_timestamp_seconds",
    ]
    text = exposition(engine)
    assert "# TYPE libvirt_blockjob_policy_started_total counter" in text
    assert "# TYPE libvirt_blockjob_policy_errors_total counter" in text
    for reason in ("window", "concurrency", "space", "backoff", "active_job", "gave_up", "dry_run"):
        assert value(text, f'libvirt_blockjob_policy_deferred{{reason="{reason}",rule="all"}}') == 0
    assert value(text, 'libvirt_blockjob_policy_candidates{rule="all"}') == 0


def test_plan_table(tmp_path):
    rules = (
        '  - name: deep\n    when: {min_backing_depth: 2}\n    action: {pull: {}}\n'
        '  - name: kb\n    action:\n      pull: {keep_base: "/img/base-2025*"}\n'
    )
    engine, _, _ = make(tmp_path, enforcing=False, rules=rules, limits="  max_concurrent: 1\n")
    plan = engine.evaluate_and_act(snap([
        disk("web-1", chain=("/img/s1", "/img/s0")),
        disk("web-2", chain=("/img/s1", "/img/s0")),
        disk("db", chain=("/img/base-2023",)),
    ], jobs=[]))
    table = format_plan_table(plan)
    lines = table.splitlines()
    assert lines[0] == "Policy plan at 2025-01-06 02:00:00 +0000 (dry run; inside a start window; 0 active jobs, max_concurrent 1)"
    assert lines[1].split() == ["DOMAIN", "DISK", "RULE", "DECISION", "REASON", "DETAIL"]
    assert lines[2].split()[:6] == ["web-1", "vda", "deep", "would", "start", "dry_run"]
    assert "dry run, would pull; 1.0 GiB to copy, 100.0 GiB free" in lines[2]
    assert lines[3] == "    matched: depth 2 >= 2"
    assert lines[4].split()[:5] == ["web-2", "vda", "deep", "defer", "concurrency"]
    assert "Disks selected by a rule's globs whose conditions did not hold:" in table
    assert any(ln.split()[:3] == ["db", "vda", "deep"] and "depth 1 < 2" in ln for ln in lines)
    assert any("no backing image matches keep_base '/img/base-2025*'" in ln for ln in lines)


def test_plan_table_escapes_names(tmp_path):
    # A domain named with a newline once printed a second, forged row.
    engine, _, _ = make(tmp_path, enforcing=False, rules='  - name: all\n    action: {pull: {}}\n')
    evil = "a\nb      vda  all   start  ok   forged\x1b[2J\u202e"
    plan = engine.evaluate_and_act(snap([disk(evil, chain=("/img/x\ny",))], jobs=[]))
    lines = format_plan_table(plan).splitlines()
    assert len(lines) == 4, lines
    assert lines[2] == ("a\\nb      vda  all   start  ok   forged\\x1b[2J\\u202e  vda   all   would start  dry_run  "
                        "dry run, would pull; 1.0 GiB to copy, 100.0 GiB free")
    assert lines[3] == "    matched: depth 1 >= 1"


def test_policy_plan_command(tmp_path):
    path = write_policy(tmp_path)
    out = io.StringIO()
    now = datetime.fromtimestamp(MONDAY_2AM, tz=timezone.utc)
    assert policy_plan(path, snap([disk("a")]), now=now, space=plenty, out=out) == 0
    assert "would start" in out.getvalue()
    err = io.StringIO()
    (tmp_path / "bad.yaml").write_text("rules: 1\n")
    assert policy_plan(str(tmp_path / "bad.yaml"), snap(), now=now, out=out, err=err) == 1
    assert "bad.yaml:1: rules: expected a list of rules" in err.getvalue()


# ------------------------------------------------------------------ concurrency of callers


def test_concurrent_evaluations_never_exceed_max_concurrent(tmp_path):
    host = FakeHost(delay=0.01)
    engine, host, clock = make(tmp_path, host=host, limits="  max_concurrent: 3\n")
    s = snap([disk(f"d{i}") for i in range(20)])
    threads = [threading.Thread(target=engine.evaluate_and_act, args=(s,)) for _ in range(8)]
    for t in threads:
        t.start()
    metrics = [engine.metric_families() for _ in range(20)]  # never blocked by the slow host
    for t in threads:
        t.join()
    assert len(metrics) == 20
    assert len(host.calls) == 3


def test_evaluation_is_cheap_with_cached_matching(tmp_path):
    engine, host, clock = make(tmp_path, enforcing=False, limits="  max_concurrent: 1\n")
    s = snap([disk(f"d{i:04d}", chain=("/img/a", "/img/b")) for i in range(2000)])
    engine.evaluate_and_act(s)
    cached = engine._match_cache
    engine.evaluate_and_act(replace(s, jobs=MappingProxyType({("x", "vda"): job("x")}), version=s.version + 1))
    assert engine._match_cache is cached  # same disks mapping: matching not redone


def test_policy_plan_command_reads_a_libvirt_uri(tmp_path):
    pytest.importorskip("libvirt")
    path = write_policy(tmp_path)
    out, err = io.StringIO(), io.StringIO()
    assert policy_plan(path, "test:///default", out=out, err=err) == 0  # no libvirtd needed
    assert out.getvalue().startswith("Policy plan at ")
    bad = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
    assert policy_plan(path, bad, out=out, err=err) == 1
    assert err.getvalue().startswith(f"cannot read block jobs from {bad}: ")
