"""Alerting end to end: real libvirtd + QEMU, the real exporter, Debian's Prometheus and Alertmanager.

One Prometheus (scrape and rule evaluation every second, our recording rules and our alerts rendered
from thresholds.yml with a short stall threshold), one Alertmanager (group_wait 0s, group_interval 1s)
posting to a webhook receiver in this process, and one exporter (dry-run policy matching only this
module's domains, `--alertmanager.url` pointing at that Alertmanager) are shared by the tests of this
module. Each test makes its own domains and its own block-job outcomes and asserts only on them, so
the tests neither depend on each other nor on their order, nor on other domains on the host.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
import yaml

import vmlib
from conftest import libvirt_required
from dashboard_queries import DASHBOARD, dashboard_queries
from exporterlib import Exporter, job_labels
from promlib import (AlertmanagerServer, PrometheusServer, WebhookReceiver, alert_rule_files, require_tools,
                     wait_until)

pytestmark = [pytest.mark.e2e, pytest.mark.libvirt]

MiB = 1024 * 1024
# Every domain of this module is lbje-test-<8 hex>-<LABEL>-<what>; the policy matches only those.
LABEL = f"e2e{uuid.uuid4().hex[:6]}"
POLICY_RULE = "e2e-flatten"
STALL_AFTER_S = 4
THRESHOLDS = {"stalled.after": f"{STALL_AFTER_S}s", "stalled.for": "0s"}
# Series the alert rules read that exist only while a job runs, after one ended or with a fleet
# policy, and the test that makes them; every other one must be scraped from the exporter at any time.
EVENT_ONLY_ALERT_INPUTS = {
    "libvirt_blockjob_failed_total": "after a failure: test_enospc_failure_fires_libvirt_block_job_failed",
    "libvirt_blockjob_cursor_last_change_timestamp_seconds": "while a job runs: test_throttled_pull_fires_...",
    "libvirt_blockjob_ready": "while a job runs: test_throttled_pull_fires_libvirt_block_job_stalled",
    "libvirt_blockjob:eta_seconds:rate5m": "while a job moves: test_every_dashboard_query_has_data (rate1m)",
    "libvirt_blockjob_domain_unresponsive": "while a QEMU hangs: test_integration_core's hung-domain test",
    "libvirt_blockjob_policy_fleet_connected": "with a fleet policy: tests/test_integration_fleet.py",
    "libvirt_blockjob_policy_fleet_leases": "with a fleet policy: tests/test_integration_fleet.py",
    "libvirt_blockjob_policy_fleet_pulls_running": "with a fleet policy: tests/test_integration_fleet.py",
}
# Dashboard queries allowed to return nothing in the scenario of test_every_dashboard_query_has_data,
# as {(panel title, query): reason}. Empty: the scenario gives every query data.
MAY_BE_EMPTY: dict[tuple[str, str], str] = {}

POLICY = f"""\
# Dry run (no --policy.enforce): the policy metrics exist and count this module's domains, nothing
# is ever started.
rules:
  - name: {POLICY_RULE}
    match:
      domain: "{vmlib.NAME_PREFIX}*-{LABEL}-*"
    when:
      min_backing_depth: 1
    action:
      pull: {{}}
"""


@dataclass
class Stack:
    prometheus: PrometheusServer
    alertmanager: AlertmanagerServer
    webhook: WebhookReceiver
    exporter: Exporter
    instance: str  # the exporter's scrape target, the `instance` label of its series
    rule_files: list[Path]

    def wait_for_webhook(self, name: str, vm: vmlib.VM, timeout: float) -> tuple[dict, float]:
        """The first firing notification of alert `name` for vm's vda, and when it arrived."""
        try:
            alert = self.webhook.wait_for_alert(name, labels_of(vm), timeout=timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nPrometheus alerts: {self.prometheus.alerts()}\n"
                                 f"{self.prometheus.log_tail(10)}\n{self.alertmanager.log_tail(10)}\n"
                                 f"--- exporter log (tail) ---\n{self.exporter.output()[-3000:]}") from None
        arrived = self.webhook.first_arrival(name, labels_of(vm))
        assert arrived is not None
        return alert, arrived


@pytest.fixture(scope="module")
def stack(tmp_path_factory, request):
    require_tools("prometheus", "alertmanager")
    libvirt_required()
    tmp = tmp_path_factory.mktemp("e2e-alerting")
    policy = tmp / "policy.yml"
    policy.write_text(POLICY)
    failed_before = request.session.testsfailed
    with contextlib.ExitStack() as cleanup:
        webhook = cleanup.enter_context(WebhookReceiver())
        am = AlertmanagerServer(tmp / "alertmanager", webhook_url=webhook.url,
                                group_wait="0s", group_interval="1s", repeat_interval="10s")
        cleanup.callback(am.stop)
        am.start()
        exporter = Exporter(f"--policy.file={policy}", f"--alertmanager.url={am.url}",
                            "--alertmanager.label=cluster=lab", poll_interval="0.2s")
        cleanup.callback(exporter.stop, keep_log=True)  # removed below unless a test failed
        instance = exporter.url.removeprefix("http://")
        rule_files = alert_rule_files(tmp / "rules", THRESHOLDS)
        prom = PrometheusServer(tmp / "prometheus", targets=[instance], rule_files=rule_files,
                                alertmanager_url=am.url)
        cleanup.callback(prom.stop)
        prom.start()
        prom.wait_for_target_up(timeout=30)
        prom.wait_for_query("libvirt_blockjob_up == 1", timeout=15)
        yield Stack(prom, am, webhook, exporter, instance, rule_files)
    if request.session.testsfailed == failed_before:
        Path(exporter.log.name).unlink(missing_ok=True)  # kept for a look when something failed
    else:
        print(f"exporter log kept: {exporter.log.name}")


def labels_of(vm: vmlib.VM, disk: str = "vda") -> dict[str, str]:
    return {"domain": vm.name, "disk": disk}


def event_time(event: dict) -> float:
    """The Unix time of a `virsh event --timestamp` line ("2024-05-01 10:00:00.123+0000")."""
    return datetime.strptime(event["ts"], "%Y-%m-%d %H:%M:%S.%f%z").timestamp()


def wait_exporter_sees(stack: Stack, vm: vmlib.VM, depth: int) -> None:
    try:
        stack.exporter.wait_value("libvirt_blockjob_backing_chain_depth", labels_of(vm), lambda v: v == depth,
                                  timeout=30)
    except AssertionError as exc:
        # On a shared host the poll cycle (which also picks up new domains) can hang on other domains.
        scrape = stack.exporter.scrape()
        since = time.time() - (scrape.get("libvirt_blockjob_last_poll_timestamp_seconds") or 0)
        raise AssertionError(f"{exc}\nexporter: last poll cycle {since:.1f}s ago, took "
                             f"{scrape.get('libvirt_blockjob_poll_duration_seconds')}s, "
                             f"{scrape.get('libvirt_blockjob_domains')} domains") from None


def enospc_domain(vm_factory, what: str, base: Path | None = None) -> vmlib.VM:
    """A domain whose unlimited pull of 200 MiB into an overlay on a 16 MiB tmpfs fails with ENOSPC."""
    small = vm_factory.tmpfs_dir(16)
    return vm_factory.create(f"{LABEL}-{what}", depth=1, data_mib=200, active_dir=small, base=base, paused=True)


def fail_a_pull(stack: Stack, vm_factory, vm: vmlib.VM) -> float:
    """Starts the pull that fails; returns when libvirt reported the failure (its event's time)."""
    events = vm_factory.watch_events(vm)
    wait_exporter_sees(stack, vm, 1)
    vmlib.start_pull(vm, "vda")
    return event_time(events.wait_for("vda", "failed", timeout=30))


def history(prom: PrometheusServer, start: float, end: float, *queries: str) -> str:
    """What Prometheus recorded for `queries` from start to end, for a failure message."""
    lines = []
    for promql in queries:
        for series in prom.query_range(promql, start, end, step=0.5):
            values = " ".join(f"{float(t) - start:.1f}s={v}" for t, v in series["values"])
            lines.append(f"  {promql}: {values}")
    return "\n".join(lines)


def assert_never_stalled(prom: PrometheusServer, vm: vmlib.VM, seconds: float) -> None:
    """LibvirtBlockJobStalled is neither pending nor firing for vm during the next `seconds`."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        stalled = [a for a in prom.alerts() if a["labels"].get("alertname") == "LibvirtBlockJobStalled"
                   and a["labels"].get("domain") == vm.name]
        assert stalled == [], stalled
        time.sleep(0.5)


def report(**timings: float) -> None:
    print("e2e timings: " + ", ".join(f"{k}={v:.3f}s" for k, v in timings.items()))


# -- tests ---------------------------------------------------------------------------------------

def test_every_series_the_alerts_read_is_scraped(stack, vm_factory):
    """An alert whose input series is missing can never fire (or, for LibvirtBlockJobFailed's guard on
    process_start_time_seconds, fires where it should not): the running exporter exposes them all."""
    wait_exporter_sees(stack, vm_factory.create(f"{LABEL}-inputs", depth=1, data_mib=1, paused=True), 1)
    rules = yaml.safe_load(stack.rule_files[-1].read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"] if "alert" in r]
    names = {name for expr in exprs for name in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", expr)}
    assert "process_start_time_seconds" in names and "up" in names, names
    assert set(EVENT_ONLY_ALERT_INPUTS) <= names, set(EVENT_ONLY_ALERT_INPUTS) - names
    missing = []
    for name in sorted(names - set(EVENT_ONLY_ALERT_INPUTS)):
        try:
            stack.prometheus.wait_for_query(f'{name}{{instance="{stack.instance}"}}', timeout=5)
        except AssertionError:
            missing.append(name)
    assert not missing, f"series the alert rules read but Prometheus does not get from the exporter: {missing}"


def test_enospc_failure_fires_libvirt_block_job_failed(stack, vm_factory):
    """A real ENOSPC pull failure reaches the webhook as LibvirtBlockJobFailed for that domain and disk."""
    vm = enospc_domain(vm_factory, "fail")
    failed_at = fail_a_pull(stack, vm_factory, vm)
    alert, arrived = stack.wait_for_webhook("LibvirtBlockJobFailed", vm, timeout=30)
    labels = alert["labels"]
    assert labels == {**labels, "alertname": "LibvirtBlockJobFailed", "domain": vm.name, "disk": "vda",
                      "job_type": "pull", "severity": "critical", "job": stack.prometheus.job,
                      "instance": stack.instance}, labels
    assert f"disk vda of domain {vm.name} on {stack.instance} failed" in alert["annotations"]["description"]
    assert alert["annotations"]["runbook_url"].endswith("#libvirtblockjobfailed")
    # The exporter counted exactly this one failure, and Prometheus has it.
    assert stack.prometheus.query_value(
        f'libvirt_blockjob_failed_total{{domain="{vm.name}",disk="vda",job_type="pull"}}') == 1.0
    assert 0 <= arrived - failed_at < 15, (failed_at, arrived)
    report(failure_to_prometheus_alert_at_webhook=arrived - failed_at)


def test_direct_alert_arrives_before_prometheus_alert(stack, vm_factory):
    """With --alertmanager.url the exporter's own alert is at the webhook before Prometheus's for the same failure."""
    vm = enospc_domain(vm_factory, "direct")
    failed_at = fail_a_pull(stack, vm_factory, vm)
    direct, direct_at = stack.wait_for_webhook("LibvirtBlockJobFailedDirect", vm, timeout=20)
    _, prometheus_at = stack.wait_for_webhook("LibvirtBlockJobFailed", vm, timeout=30)
    report(failure_to_direct_alert_at_webhook=direct_at - failed_at,
           failure_to_prometheus_alert_at_webhook=prometheus_at - failed_at,
           direct_ahead_of_prometheus=prometheus_at - direct_at)
    assert direct_at < prometheus_at, (direct_at, prometheus_at)
    # The same failure: same disk and job type, and the instance of the scrape target, which the
    # example Alertmanager config's inhibit rule (direct mutes Prometheus's alert) relies on.
    labels = direct["labels"]
    assert labels == {**labels, "alertname": "LibvirtBlockJobFailedDirect", "domain": vm.name, "disk": "vda",
                      "job_type": "pull", "severity": "critical", "instance": stack.instance,
                      "source": "libvirt-blockjob-exporter", "cluster": "lab"}, labels
    # startsAt is the failure's time as the exporter saw it (libvirt's event), not the post's.
    starts = datetime.fromisoformat(direct["startsAt"].replace("Z", "+00:00")).timestamp()
    assert abs(starts - failed_at) < 2, (direct["startsAt"], failed_at)
    assert stack.exporter.value("libvirt_blockjob_alertmanager_notifications_total", {"result": "success"}) >= 1


def test_throttled_pull_fires_libvirt_block_job_stalled(stack, vm_factory):
    """A pull throttled to 1 byte/s fires LibvirtBlockJobStalled (threshold 4s here); a moving pull does not."""
    vm = vm_factory.create(f"{LABEL}-stall", depth=1, data_mib=200, paused=True)
    wait_exporter_sees(stack, vm, 1)
    prom = stack.prometheus
    job = job_labels(vm.name)
    selector = f'domain="{vm.name}",disk="vda",job_type="pull"'
    vmlib.start_pull(vm, "vda", bandwidth_bytes=2 * MiB)  # ~100 s for 200 MiB
    try:
        prom.wait_for_query(f"libvirt_blockjob_cursor{{{selector}}} > 0", timeout=15)
        assert_never_stalled(prom, vm, STALL_AFTER_S + 2)  # moving for longer than the threshold
        assert prom.query_value(f"libvirt_blockjob:throughput_bytes_per_second:rate1m{{{selector}}}") > 0

        vmlib.set_bandwidth(vm, "vda", 1)
        throttled_at = time.time()
        prom.wait_for_query(f"libvirt_blockjob_bandwidth_bytes_per_second{{{selector}}} == 1", timeout=10)
        alert, arrived = stack.wait_for_webhook("LibvirtBlockJobStalled", vm, timeout=STALL_AFTER_S + 20)
        labels = alert["labels"]
        assert labels == {**labels, "domain": vm.name, "disk": "vda", "job_type": "pull", "severity": "warning",
                          "instance": stack.instance}, labels
        assert alert["annotations"]["runbook_url"].endswith("#libvirtblockjobstalled")
        # The job is still there (stuck, not ended), and the alert came only after its cursor had
        # stood still for the threshold.
        last_change = stack.exporter.value("libvirt_blockjob_cursor_last_change_timestamp_seconds", job)
        assert last_change is not None and vmlib.job_info(vm) is not None
        assert arrived - last_change >= STALL_AFTER_S, (
            "fired before the cursor stood still for the threshold: "
            f"throttled at {throttled_at:.3f}, cursor last moved at {last_change:.3f}, alert arrived at {arrived:.3f}\n"
            + history(prom, throttled_at - 8, time.time(),
                      f"libvirt_blockjob_cursor{{{selector}}}",
                      f"libvirt_blockjob_cursor_last_change_timestamp_seconds{{{selector}}}",
                      "libvirt_blockjob_last_poll_timestamp_seconds", "libvirt_blockjob_poll_duration_seconds"))
        report(stall_to_stalled_alert_at_webhook=arrived - last_change,
               throttle_to_stalled_alert_at_webhook=arrived - throttled_at)
    finally:
        with contextlib.suppress(vmlib.CommandError):
            vmlib.abort(vm, "vda")


def qemu_pid(vm: vmlib.VM) -> int:
    return int(Path(f"/run/libvirt/qemu/{vm.name}.pid").read_text().strip())


def test_hanging_poll_does_not_make_moving_jobs_stalled(stack, vm_factory):
    """A QEMU that does not answer its monitor blocks blockJobInfo on it; the other jobs must keep
    moving in the exporter and never be reported stalled."""
    prom = stack.prometheus
    hung = vm_factory.create(f"{LABEL}-hung", depth=1, data_mib=8, paused=True)
    vm = vm_factory.create(f"{LABEL}-moving", depth=1, data_mib=200, paused=True)
    wait_exporter_sees(stack, hung, 1)
    wait_exporter_sees(stack, vm, 1)
    selector = f'domain="{vm.name}",disk="vda",job_type="pull"'
    # A job on the domain that will hang: blockJobInfo then asks its QEMU (no job: libvirt answers alone).
    vmlib.start_pull(hung, "vda", bandwidth_bytes=1)
    vmlib.start_pull(vm, "vda", bandwidth_bytes=2 * MiB)
    pid = qemu_pid(hung)
    try:
        stack.exporter.wait_value("libvirt_blockjob_cursor", job_labels(hung.name), lambda v: v is not None,
                                  timeout=10)
        prom.wait_for_query(f"libvirt_blockjob_cursor{{{selector}}} > 0", timeout=15)
        os.kill(pid, signal.SIGSTOP)  # the next blockJobInfo on it never returns
        stopped = time.monotonic()
        shown = stack.exporter.value("libvirt_blockjob_cursor", job_labels(vm.name))
        # Not longer than needed: other exporters on a shared host hang on this domain too.
        assert_never_stalled(prom, vm, STALL_AFTER_S + 2)
        # The hung call really happened (else this test proves nothing): the poller walked away from
        # it, and the moving job's progress kept being exported meanwhile.
        assert "has not answered" in stack.exporter.output()
        since_poll = prom.query_value("time() - libvirt_blockjob_last_poll_timestamp_seconds")
        assert since_poll is not None and since_poll < STALL_AFTER_S, since_poll
        assert stack.exporter.value("libvirt_blockjob_cursor", job_labels(vm.name)) > shown
    finally:
        os.kill(pid, signal.SIGCONT)
        for each in (vm, hung):
            with contextlib.suppress(vmlib.CommandError):
                vmlib.abort(each, "vda")
    report(poll_hung_for_without_stalled_alert=time.monotonic() - stopped)


def test_every_dashboard_query_has_data(stack, vm_factory):
    """During a running pull, with completed, failed, canceled and inferred outcomes and a dry-run policy,
    every query of every panel returns data from this Prometheus."""
    prom, exporter = stack.prometheus, stack.exporter
    # One data-filled base, shared read-only; removed with the domains.
    base = vmlib.make_chain(vm_factory.images_dir("base"), 0, data_mib=200)[0]
    running = vm_factory.create(f"{LABEL}-running", depth=2, base=base, paused=True)
    done = vm_factory.create(f"{LABEL}-done", depth=1, data_mib=8, paused=True)
    canceled = vm_factory.create(f"{LABEL}-cancel", depth=1, base=base, paused=True)
    gone = vm_factory.create(f"{LABEL}-gone", depth=1, base=base, paused=True)
    failed = enospc_domain(vm_factory, "dashfail", base=base)
    for vm, depth in ((running, 2), (done, 1), (canceled, 1), (gone, 1)):
        wait_exporter_sees(stack, vm, depth)

    def outcome(vm: vmlib.VM, name: str, value: float = 1, **extra: str) -> None:
        exporter.wait_value(f"libvirt_blockjob_{name}_total", {**job_labels(vm.name), **extra},
                            lambda v: v == value, timeout=20)

    vmlib.start_pull(running, "vda", bandwidth_bytes=3 * MiB)  # ~70 s: runs through the whole check
    try:
        vmlib.start_pull(done, "vda")
        vmlib.start_pull(canceled, "vda", bandwidth_bytes=5 * MiB)
        vmlib.start_pull(gone, "vda", bandwidth_bytes=5 * MiB)
        fail_a_pull(stack, vm_factory, failed)
        exporter.wait_value("libvirt_blockjob_cursor", job_labels(canceled.name), lambda v: v and v > 0, timeout=10)
        exporter.wait_value("libvirt_blockjob_cursor", job_labels(gone.name), lambda v: v and v > 0, timeout=10)
        vmlib.abort(canceled, "vda")
        vmlib.destroy(gone)  # libvirt sends no block-job event: the exporter infers the outcome
        outcome(done, "completed")
        outcome(failed, "failed")
        outcome(canceled, "canceled")
        outcome(gone, "outcomes_inferred", outcome="canceled")

        # The scenario is in Prometheus (which lags the exporter by up to a scrape): from these
        # domains, not from whatever else runs on the host.
        for promql in [*(f'libvirt_blockjob_{name}_total{{domain="{vm.name}",disk="vda",job_type="pull"}} == 1'
                         for vm, name in ((done, "completed"), (failed, "failed"), (canceled, "canceled"))),
                       f'libvirt_blockjob_outcomes_inferred_total{{domain="{gone.name}",outcome="canceled"}} == 1',
                       f'libvirt_blockjob:eta_seconds:rate1m{{domain="{running.name}"}} > 0',
                       f'libvirt_blockjob_policy_candidates{{rule="{POLICY_RULE}"}} >= 1',
                       "libvirt_blockjob_policy_enforcing == 0"]:
            prom.wait_for_query(promql, timeout=15)

        queries = dashboard_queries(DASHBOARD, job=re.escape(prom.job), instance=re.escape(stack.instance),
                                    rate_interval="1m")
        assert queries
        assert set(MAY_BE_EMPTY) <= set(queries), f"stale MAY_BE_EMPTY entries: {set(MAY_BE_EMPTY) - set(queries)}"
        empty: list[tuple[str, str]] = []

        def all_have_data() -> bool:
            empty[:] = [(title, q) for title, q in queries if (title, q) not in MAY_BE_EMPTY and not prom.query(q)]
            return not empty

        started = time.monotonic()
        with contextlib.suppress(AssertionError):  # reported below, with the queries that had none
            wait_until(all_have_data, 20, "every dashboard query to return data", interval=1)
        assert not empty, "dashboard queries without data:\n" + "\n".join(f"  {t}: {q}" for t, q in empty)
        report(dashboard_all_queries_have_data_after=time.monotonic() - started)
        assert vmlib.job_info(running) is not None, "the pull ended before every query had data"
    finally:
        with contextlib.suppress(vmlib.CommandError):
            vmlib.abort(running, "vda")
