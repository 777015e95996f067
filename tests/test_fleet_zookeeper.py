"""The fleet budget (exporter/policy/fleet.py) against a real ZooKeeper server, without libvirt.

Each test starts its own server (zklib) on a free port with its own data dir. Several
``FleetBudget`` objects with different host ids stand for exporters on different hosts; the
engine's answer to "which leases must stay" is a plain object the test changes.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

import vmlib
from exporter.policy.config import Fleet, FleetDigest
from exporter.policy.decide import FleetView
from exporter.policy.fleet import FleetBudget, lease_name, read_fleet_view

PATH = "/lbje-test/pulls"
REPO = Path(__file__).resolve().parent.parent


class Needs:
    """What an engine would answer: the generation it adopted, running pulls, starts in flight."""

    def __init__(self) -> None:
        self.generation = 0
        self.running: set = set()
        self.starting: set = set()

    def __call__(self):
        return self.generation, frozenset(self.running), frozenset(self.starting)


def config(zk, **kw) -> Fleet:
    kw.setdefault("max_concurrent", 2)
    kw.setdefault("session_timeout", 2.0)
    kw.setdefault("timeout", 2.0)
    kw.setdefault("host_lost_after", 10.0)
    return Fleet(zookeeper=zk.hosts, path=PATH, **kw)


@pytest.fixture
def budgets():
    made: list[FleetBudget] = []

    def make(zk, host: str, enforcing: bool = True, needs: Needs | None = None, on_change=None,
             **kw) -> tuple[FleetBudget, Needs]:
        needs = needs or Needs()
        b = FleetBudget(config(zk, **kw), host, enforcing, needs=needs, on_change=on_change)
        b.start()
        made.append(b)
        return b, needs

    yield make
    for b in made:
        b.stop()


def usable(b: FleetBudget, timeout: float = 15.0) -> None:
    vmlib.wait_for(lambda: b.view().usable, timeout=timeout, what=f"{b.host_id} usable ({b.view().detail})")


def adopt(b: FleetBudget, needs: Needs) -> dict:
    """Do what the engine does once the host's identity is held: take the adoption, answer with it."""
    gen, leases = vmlib.wait_for(b.adoption, timeout=10, what="adoption")
    needs.generation = gen
    return leases


def lease_nodes(zk) -> list[str]:
    c = zk.client()
    try:
        return sorted(c.get_children(f"{PATH}/leases"))
    finally:
        c.stop()
        c.close()


def test_the_budget_is_shared_and_a_released_lease_is_free_again(zookeeper, budgets):
    a, na = budgets(zookeeper, "host-a")
    b, nb = budgets(zookeeper, "host-b")
    for x, n in ((a, na), (b, nb)):
        usable(x)
        assert adopt(x, n) == {}
    assert a.acquire(("dom1", "vda"), "r") == (True, "")
    na.running.add(("dom1", "vda"))
    assert b.acquire(("dom2", "vda"), "r") == (True, "")
    nb.running.add(("dom2", "vda"))
    ok, why = b.acquire(("dom3", "vda"), "r")
    assert not ok and why == "2 fleet leases taken >= fleet max_concurrent 2"
    assert lease_nodes(zookeeper) == sorted([lease_name("host-a", ("dom1", "vda")),
                                             lease_name("host-b", ("dom2", "vda"))])
    # The same disk again is the lease already held, not a second one.
    assert a.acquire(("dom1", "vda"), "r")[0] and len(lease_nodes(zookeeper)) == 2
    # host-a's pull ends: its lease goes at the next sync, and host-b can take the slot.
    na.running.clear()
    a.wake()
    vmlib.wait_for(lambda: len(lease_nodes(zookeeper)) == 1, timeout=10, what="lease released")
    assert a.held() == 0
    assert b.acquire(("dom3", "vda"), "r") == (True, "")
    vmlib.wait_for(lambda: a.view().in_use == 2, timeout=10, what="host-a sees both of host-b's leases")
    # The budget node records its size, as kazoo's Semaphore does.
    c = zookeeper.client()
    assert c.get(PATH)[0] == b"2"
    c.stop()
    c.close()


def test_leases_outlive_the_exporter_and_its_restart_takes_back_only_running_pulls(zookeeper, budgets):
    a, na = budgets(zookeeper, "host-a")
    usable(a)
    adopt(a, na)
    for dom in ("run", "ended"):
        assert a.acquire((dom, "vda"), "flatten")[0]
        na.running.add((dom, "vda"))
    a.stop()  # a clean stop; kill -9 is the same once the session has expired
    time.sleep(1.0)
    assert len(lease_nodes(zookeeper)) == 2  # still counting against the budget
    other, no = budgets(zookeeper, "host-b")
    usable(other)
    adopt(other, no)
    assert not other.acquire(("x", "vda"), "r")[0]

    again, n2 = budgets(zookeeper, "host-a")
    usable(again)
    gen, leases = vmlib.wait_for(again.adoption, timeout=10, what="adoption")
    assert {k: (l.rule, l.host) for k, l in leases.items()} == {("run", "vda"): ("flatten", "host-a"),
                                                               ("ended", "vda"): ("flatten", "host-a")}
    # Until the engine has answered for this generation, nothing is released.
    again.wake()
    time.sleep(1.0)
    assert len(lease_nodes(zookeeper)) == 2
    n2.running = {("run", "vda")}  # the engine found only this pull still running
    n2.generation = gen
    again.wake()
    vmlib.wait_for(lambda: lease_nodes(zookeeper) == [lease_name("host-a", ("run", "vda"))], timeout=10,
                   what="the ended pull's lease released")
    assert again.held() == 1


def test_a_second_exporter_with_the_same_host_id_takes_nothing(zookeeper, budgets):
    a, na = budgets(zookeeper, "host-a")
    usable(a)
    twin, _ = budgets(zookeeper, "host-a")
    vmlib.wait_for(lambda: "held by another ZooKeeper session" in twin.view().detail, timeout=10, what="refusal")
    assert not twin.view().usable
    ok, why = twin.acquire(("d", "vda"), "r")
    assert not ok and "held by another ZooKeeper session" in why


def test_zookeeper_down_means_no_lease_and_back_means_leases_again(zookeeper, budgets):
    a, na = budgets(zookeeper, "host-a")
    usable(a)
    adopt(a, na)
    assert a.acquire(("d1", "vda"), "r")[0]
    na.running.add(("d1", "vda"))
    zookeeper.stop()
    vmlib.wait_for(lambda: not a.view().usable, timeout=10, what="unusable once ZooKeeper is gone")
    t0 = time.monotonic()
    ok, why = a.acquire(("d2", "vda"), "r")
    assert not ok and "unavailable" in why and time.monotonic() - t0 < 1.0
    print(f"\ndetail while down: {a.view().detail}")
    zookeeper.start()
    usable(a, timeout=30)
    assert lease_nodes(zookeeper) == [lease_name("host-a", ("d1", "vda"))]  # kept through the outage
    assert a.acquire(("d2", "vda"), "r")[0]


# An exporter acting for "host-lost" that takes one lease and waits to be killed.
LOST_HOST = """
import sys, time
from exporter.policy.config import Fleet
from exporter.policy.fleet import FleetBudget
fleet = Fleet(zookeeper=sys.argv[1], path=sys.argv[2], max_concurrent=2, session_timeout=2.0, timeout=2.0,
              host_lost_after=10.0)
b = FleetBudget(fleet, "host-lost", True, needs=lambda: (0, frozenset({("gone", "vda")}), frozenset()))
b.start()
while not b.view().usable:
    time.sleep(0.05)
print(b.acquire(("gone", "vda"), "r")[0], flush=True)
time.sleep(600)
"""


def test_a_host_killed_for_good_frees_its_leases_within_the_documented_time(zookeeper, budgets):
    """docs/policy.md: at most session_timeout + host_lost_after + heartbeat after the host was last
    heard from, plus ZooKeeper's rounding of session expiry to its tickTime (500 ms in zklib)."""
    watcher, nw = budgets(zookeeper, "host-b")
    usable(watcher)
    adopt(watcher, nw)
    session, lost_after, heartbeat, tick = 2.0, 10.0, 2.0 / 3, 0.5
    reap_every = max(1.0, lost_after / 10)
    proc = subprocess.Popen([sys.executable, "-c", LOST_HOST, zookeeper.hosts, PATH], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "True\n"
        assert lease_nodes(zookeeper) == [lease_name("host-lost", ("gone", "vda"))]
        proc.kill()
        proc.wait(10)
        t0 = time.monotonic()
        vmlib.wait_for(lambda: lease_nodes(zookeeper) == [], timeout=30, what="the lost host's lease reaped")
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    print(f"\nreaped {took:.1f} s after kill -9 (session_timeout 2 s, host_lost_after 10 s)")
    # Not sooner than host_lost_after after the last look that saw it alive (looks are at most a
    # jittered reap interval and a heartbeat apart); not later than the documented bound, plus 0.3 s
    # for this test's polling.
    assert lost_after - (1.2 * reap_every + heartbeat) <= took <= session + tick + lost_after + heartbeat + 0.3
    c = zookeeper.client()
    assert c.get_children(f"{PATH}/hosts") == ["host-b"]
    c.stop()
    c.close()


def test_a_silent_host_is_reaped_at_the_first_sync_once_due_not_a_reap_interval_later(zookeeper, budgets,
                                                                                     monkeypatch):
    """The reaper looks every host_lost_after / 10 (+-20%) and once more when a silent host is due.
    The watcher here runs no thread: the test calls its sync every 0.1 s of its own clock."""
    from kazoo.protocol.states import KazooState

    lost, nl = budgets(zookeeper, "host-lost", host_lost_after=30.0)
    usable(lost)
    adopt(lost, nl)
    nl.running.add(("gone", "vda"))
    assert lost.acquire(("gone", "vda"), "r")[0]
    lost.stop()  # owner goes at once, the lease stays
    monkeypatch.setattr(random, "uniform", lambda low, high: high)  # every reap interval 3.6 s
    now = [0.0]
    c = zookeeper.client()
    try:
        watcher = FleetBudget(config(zookeeper, host_lost_after=30.0), "host-b", True, needs=Needs(), client=c,
                              clock=lambda: now[0])
        watcher._on_state(KazooState.CONNECTED)
        reaped_at = None
        for tick in range(400):
            now[0] = tick / 10
            watcher._sync()  # the first one (at 0) finds host-lost silent
            if not c.get_children(f"{PATH}/leases"):
                reaped_at = now[0]
                break
        assert reaped_at == 30.0
    finally:
        c.stop()
        c.close()


def test_a_pull_whose_lease_was_reaped_takes_it_again_even_over_the_budget(zookeeper, budgets):
    a, na = budgets(zookeeper, "host-a", max_concurrent=1)
    usable(a)
    adopt(a, na)
    na.running.add(("d", "vda"))  # a pull runs, its lease is gone (reaped during a partition)
    a.wake()
    vmlib.wait_for(lambda: lease_nodes(zookeeper) == [lease_name("host-a", ("d", "vda"))], timeout=10,
                   what="lease re-taken")


def test_hosts_with_different_budgets_all_enforce_the_smallest(zookeeper, budgets):
    c = zookeeper.client()
    try:
        a, na = budgets(zookeeper, "host-a", max_concurrent=3)
        usable(a)
        adopt(a, na)
        assert c.get(PATH)[0] == b"3" and a.view().max_concurrent == 3
        b, nb = budgets(zookeeper, "host-b", max_concurrent=2)
        usable(b)
        adopt(b, nb)
        assert c.get(PATH)[0] == b"2" and b.view().max_concurrent == 2
        vmlib.wait_for(lambda: a.view().max_concurrent == 2, timeout=10, what="host-a enforces host-b's smaller budget")
        for d in ("d1", "d2"):
            assert a.acquire((d, "vda"), "r") == (True, "")
            na.running.add((d, "vda"))
        assert a.acquire(("d3", "vda"), "r") == (False, "2 fleet leases taken >= fleet max_concurrent 2")
        # A host with a larger value (an old policy file) neither raises the budget nor enforces its own.
        big, nbig = budgets(zookeeper, "host-c", max_concurrent=5)
        usable(big)
        adopt(big, nbig)
        assert c.get(PATH)[0] == b"2" and big.view().max_concurrent == 2
        assert big.acquire(("d4", "vda"), "r") == (False, "2 fleet leases taken >= fleet max_concurrent 2")
        assert read_fleet_view(config(zookeeper, max_concurrent=5)) == FleetView(True, 2, 2)
        # Raised by hand, once no host has a smaller value (host-b would lower it again at once).
        b.stop()
        c.set(PATH, b"3")
        vmlib.wait_for(lambda: a.view().max_concurrent == 3 and big.view().max_concurrent == 3, timeout=10,
                       what="the budget raised by hand")
        assert c.get(PATH)[0] == b"3"
    finally:
        c.stop()
        c.close()


def test_a_busy_fleet_lock_defers_the_start_and_leaves_the_budget_usable(zookeeper, budgets):
    """kazoo's Lock.acquire raises LockTimeout when the lock stays busy: that is "try later", not
    a broken connection (which would set fleet_connected to 0 and fail the queued requests)."""
    changes: list[float] = []
    a, na = budgets(zookeeper, "host-a", on_change=lambda: changes.append(time.monotonic()))
    usable(a)
    adopt(a, na)
    since = len(changes)
    c = zookeeper.client()
    try:
        holder = c.Lock(f"{PATH}/lock", "someone")
        assert holder.acquire(timeout=5)
        assert a.acquire(("d", "vda"), "r") == (False, "the fleet lock was busy for 2s")
        holder.release()
        time.sleep(1.0)  # more than a heartbeat interval: a flap would have been undone by now
        assert changes[since:] == [] and a.view() == FleetView(True, 2, 0, "")
        assert a.acquire(("d", "vda"), "r") == (True, "")
        assert c.get_children(f"{PATH}/lock") == []
    finally:
        c.stop()
        c.close()


def test_dry_run_only_reads_and_plan_reads_once(zookeeper, budgets):
    a, na = budgets(zookeeper, "host-a")
    usable(a)
    adopt(a, na)
    assert a.acquire(("d", "vda"), "r")[0]
    dry, _ = budgets(zookeeper, "host-dry", enforcing=False)
    usable(dry)
    vmlib.wait_for(lambda: dry.view().in_use == 1, timeout=10, what="dry run counts the lease")
    assert dry.acquire(("e", "vda"), "r") == (False, "dry run takes no lease")
    c = zookeeper.client()
    assert c.get_children(f"{PATH}/hosts") == ["host-a"]  # the dry run wrote nothing
    c.stop()
    c.close()
    view = read_fleet_view(config(zookeeper))
    assert view.usable and view.in_use == 1 and view.max_concurrent == 2
    t0 = time.monotonic()
    down = read_fleet_view(replace(config(zookeeper), zookeeper="127.0.0.1:1"), timeout=1.0)
    assert not down.usable and "cannot read ZooKeeper" in down.detail and time.monotonic() - t0 < 3


def test_digest_auth_leases_are_readable_by_all_and_writable_by_their_user(zookeeper, budgets, tmp_path):
    from kazoo.exceptions import NoAuthError

    secret = tmp_path / "zk-password"
    secret.write_text("s3cret\n")
    a, na = budgets(zookeeper, "host-a", digest_auth=FleetDigest("lbje", str(secret)))
    usable(a)
    adopt(a, na)
    assert a.acquire(("d", "vda"), "r")[0]
    c = zookeeper.client()
    try:
        name = lease_name("host-a", ("d", "vda"))
        assert c.get(f"{PATH}/leases/{name}")[0]  # readable by anyone
        with pytest.raises(NoAuthError):
            c.delete(f"{PATH}/leases/{name}")
    finally:
        c.stop()
        c.close()


# ------------------------------------------------------------------ the engine with a real budget


def fleet_policy(tmp_path, zk, cap: int = 1, name: str = "policy.yaml", domains: str = "*", **fleet) -> str:
    import yaml

    f = tmp_path / name
    f.write_text(yaml.safe_dump({
        "rules": [{"name": "all", "match": {"domain": domains}, "action": {"pull": {}}}],
        "limits": {"max_concurrent": 10},
        "fleet": {"zookeeper": zk.hosts, "path": PATH, "max_concurrent": cap, "session_timeout": "2s",
                  "timeout": "2s", "host_lost_after": "10s", **fleet}}))
    return str(f)


@pytest.fixture
def engines():
    made = []

    def make(path, host_id, host=None, enforcing=True):
        from exporter.policy.engine import PolicyEngine
        from test_policy_engine import Clock, FakeHost, plenty

        clock = Clock()
        host = host or FakeHost()
        e = PolicyEngine(path, enforcing, host, clock=clock, now=clock.now, space=plenty, host_id=host_id)
        e.start()
        made.append(e)
        return e, host

    yield make
    for e in made:
        e.stop()


def settle(engine, snapshot, until, timeout=15.0):
    """Evaluate until ``until(plan)``: the budget is read asynchronously, as in the exporter."""
    def attempt():
        engine._host.given = snapshot
        plan = engine.evaluate_and_act(snapshot)
        return plan if until(plan) else None
    return vmlib.wait_for(attempt, timeout=timeout, interval=0.2, what="engine decision")


def test_the_engine_takes_a_lease_per_start_releases_it_at_the_outcome_and_takes_pulls_back(
        zookeeper, engines, tmp_path):
    from test_policy_engine import disk, job, snap

    path = fleet_policy(tmp_path, zookeeper, cap=1)
    e, host = engines(path, "host-a")
    s = snap([disk("a"), disk("b")])
    plan = settle(e, s, lambda p: p.starts)
    assert [(d.domain, d.action, d.reason) for d in plan.decisions] == [("a", "start", "start"),
                                                                      ("b", "defer", "fleet")]
    assert plan.decisions[1].detail == "1 fleet leases taken >= fleet max_concurrent 1"
    assert host.calls == [("start_pull", "a", "vda", 0)]
    assert lease_nodes(zookeeper) == [lease_name("host-a", ("a", "vda"))]
    families = {f.name: f for f in e.metric_families()}
    assert families["libvirt_blockjob_policy_fleet_connected"].samples[0].value == 1
    assert families["libvirt_blockjob_policy_fleet_max_concurrent"].samples[0].value == 1
    vmlib.wait_for(lambda: e.fleet.held() == 1, timeout=5, what="held lease seen")

    # The exporter restarts while the pull runs: a new engine, same host id, takes it back.
    e.stop()
    running = snap([disk("a"), disk("b")], jobs=[job("a")])
    e2, host2 = engines(path, "host-a")
    host2.view = running
    plan = settle(e2, running, lambda p: e2.history().disks.get(("a", "vda")) is not None
                  and e2.fleet.view().usable)
    assert e2.history().disks[("a", "vda")].running
    assert [(d.domain, d.reason) for d in plan.decisions] == [("a", "active_job"), ("b", "fleet")]
    assert lease_nodes(zookeeper) == [lease_name("host-a", ("a", "vda"))]
    assert host2.calls == []

    # Its outcome is counted: the lease goes and the next disk gets it.
    e2.on_outcome("a", "vda", "pull", "completed", time.time())
    flat = snap([disk("a", chain=()), disk("b")])
    host2.view = flat
    plan = settle(e2, flat, lambda p: p.starts)
    assert [(d.domain, d.action) for d in plan.decisions] == [("b", "start")]
    assert lease_nodes(zookeeper) == [lease_name("host-a", ("b", "vda"))]


def test_a_failed_start_gives_its_lease_back_and_a_reload_cannot_change_the_fleet(zookeeper, engines, tmp_path):
    from test_policy_engine import FakeHost, disk, snap

    path = fleet_policy(tmp_path, zookeeper, cap=1)
    e, host = engines(path, "host-a", host=FakeHost(fail={"start_pull"}))
    plan = settle(e, snap([disk("a")]), lambda p: p.decisions and p.decisions[0].error)
    assert plan.decisions[0].action == "start"
    vmlib.wait_for(lambda: lease_nodes(zookeeper) == [], timeout=10, what="lease of the failed start released")
    changed = fleet_policy(tmp_path, zookeeper, cap=5)
    assert changed == path
    assert not e.reload()
    assert e.policy.fleet.max_concurrent == 1


def test_plan_shows_the_budget_without_taking_a_lease(zookeeper, budgets, tmp_path):
    import io
    from datetime import datetime, timezone

    from exporter.policy.commands import policy_plan
    from test_policy_engine import MONDAY_2AM, disk, plenty, snap

    a, na = budgets(zookeeper, "host-a")
    usable(a)
    adopt(a, na)
    assert a.acquire(("x", "vda"), "r")[0]
    path = fleet_policy(tmp_path, zookeeper, cap=2)
    out = io.StringIO()
    now = datetime.fromtimestamp(MONDAY_2AM, tz=timezone.utc)
    assert policy_plan(path, snap([disk("p"), disk("q")]), now=now, space=plenty, out=out) == 0
    text = out.getvalue()
    assert "Fleet budget: 1 of 2 leases taken across the fleet, 1 free (read now; no lease taken)" in text
    rows = {ln.split()[0]: ln.split()[3:6] for ln in text.splitlines() if ln.startswith(("p ", "q "))}
    assert rows == {"p": ["would", "start", "dry_run"], "q": ["defer", "fleet", "2"]}
    assert lease_nodes(zookeeper) == [lease_name("host-a", ("x", "vda"))]


def fleet_metric(engine, name: str) -> float:
    return {f.name: f for f in engine.metric_families()}[f"libvirt_blockjob_policy_fleet_{name}"].samples[0].value


def test_a_restart_after_its_leases_were_reaped_counts_its_running_pulls_even_over_the_budget(
        zookeeper, engines, budgets, tmp_path):
    """An exporter away longer than host_lost_after lost its leases while its pulls ran on. Back, it
    takes a lease for each pull running on a disk a rule matches, over the budget if need be, and
    keeps it until the pull ends; the pull stays foreign (it may be an operator's)."""
    from test_policy_engine import MONDAY_2AM, disk, job, snap

    other, no = budgets(zookeeper, "host-b", max_concurrent=1)
    usable(other)
    adopt(other, no)
    assert other.acquire(("x", "vda"), "r") == (True, "")  # the budget's only lease, taken meanwhile
    no.running.add(("x", "vda"))
    x_lease = lease_name("host-b", ("x", "vda"))
    path = fleet_policy(tmp_path, zookeeper, cap=1, domains="vm-*")
    disks = [disk("vm-a"), disk("vm-b"), disk("vm-c"), disk("other")]
    running = snap(disks, jobs=[job("vm-a"), job("vm-b"), job("vm-c", job_type="copy"), job("other")])
    e, host = engines(path, "host-a")
    host.view = running
    leases = sorted([lease_name("host-a", ("vm-a", "vda")), lease_name("host-a", ("vm-b", "vda")), x_lease])
    plan = settle(e, running, lambda p: lease_nodes(zookeeper) == leases and fleet_metric(e, "leases") == 2)
    # Only pulls on disks a rule matches count: not the copy job, not the unmatched domain's pull.
    assert [(d.domain, d.action, d.detail) for d in plan.decisions] == [
        ("vm-a", "defer", "pull job active (started by someone else)"),
        ("vm-b", "defer", "pull job active (started by someone else)"),
        ("vm-c", "defer", "copy job active (started by someone else)")]
    assert e.history().disks == {} and host.calls == []
    assert fleet_metric(e, "pulls_running") == 2
    # The budget counts them: other hosts wait.
    assert other.acquire(("y", "vda"), "r") == (False, "3 fleet leases taken >= fleet max_concurrent 1")
    # vm-a ends with an outcome: its lease goes. vm-b vanishes without one: its lease stays until
    # lost_after (600 s by default) has passed.
    e.on_outcome("vm-a", "vda", "pull", "completed", time.time())
    gone = [disk("vm-a", chain=()), disk("vm-b", chain=()), disk("vm-c"), disk("other")]
    later = snap(gone, jobs=[job("vm-c", job_type="copy"), job("other")], taken_wall=MONDAY_2AM + 600)
    host.view = later
    settle(e, later, lambda p: lease_nodes(zookeeper) == [lease_name("host-a", ("vm-b", "vda")), x_lease])
    assert fleet_metric(e, "pulls_running") == 0
    lost = snap(gone, jobs=[job("vm-c", job_type="copy"), job("other")], taken_wall=MONDAY_2AM + 601)
    host.view = lost
    settle(e, lost, lambda p: lease_nodes(zookeeper) == [x_lease])
    vmlib.wait_for(lambda: fleet_metric(e, "leases") == 0, timeout=5, what="host-a's lease count back to 0")


def test_fleet_pulls_running_counts_the_policys_pulls_not_an_operators(zookeeper, engines, tmp_path):
    """The gauge LibvirtBlockJobPolicyFleetLeaseWithoutPull compares the host's leases with."""
    from test_policy_engine import disk, job, snap

    path = fleet_policy(tmp_path, zookeeper, cap=2)
    e, host = engines(path, "host-a")
    idle = snap([disk("a")])
    settle(e, idle, lambda p: p.starts)
    assert host.calls == [("start_pull", "a", "vda", 0)]
    assert fleet_metric(e, "pulls_running") == 0  # not in the inventory yet
    # An operator starts a pull on a new disk b: it is not the policy's and holds no lease.
    both = snap([disk("a"), disk("b")], jobs=[job("a"), job("b")])
    host.view = both
    settle(e, both, lambda p: fleet_metric(e, "leases") == 1)
    assert (fleet_metric(e, "pulls_running"), fleet_metric(e, "leases")) == (1, 1)
    assert lease_nodes(zookeeper) == [lease_name("host-a", ("a", "vda"))]


@pytest.mark.parametrize("which", ("password_file", "ca_file"))
def test_a_fifo_as_a_fleet_secret_or_tls_file_is_an_error_not_a_wait(tmp_path, which):
    """The client is made without ZooKeeper: a FIFO named as the digest password or a TLS file is
    refused at once (open() and OpenSSL would wait on it for ever)."""
    from exporter.policy.config import FleetDigest, FleetTLS
    from exporter.policy.fleet import FleetError, make_client

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    config = Fleet("127.0.0.1:1", "/lbj", 1,
                   digest_auth=FleetDigest("u", str(fifo)) if which == "password_file" else None,
                   tls=FleetTLS(str(fifo), None, None, True) if which == "ca_file" else None)
    errors: list[Exception] = []

    def make() -> None:
        try:
            make_client(config)
        except FleetError as e:
            errors.append(e)

    worker = threading.Thread(target=make, daemon=True)
    worker.start()
    worker.join(5)
    assert len(errors) == 1 and "FIFO or socket" in str(errors[0]), "the client waited on the FIFO"
