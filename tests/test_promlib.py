"""Checks tests/promlib.py against the real Prometheus and Alertmanager, and our alert rules with them."""

from __future__ import annotations

import os
import time

import pytest

from promlib import (AlertmanagerServer, PrometheusServer, alert_rule_files, alertmanager,  # noqa: F401
                     metrics_server, prometheus_factory, require_tools, webhook_receiver)

pytestmark = pytest.mark.e2e

BASE = """\
# TYPE libvirt_blockjob_up gauge
libvirt_blockjob_up 1
# TYPE libvirt_blockjob_poll_cycles_total counter
libvirt_blockjob_poll_cycles_total {cycles}
"""
FAILED = """\
# TYPE libvirt_blockjob_failed_total counter
libvirt_blockjob_failed_total{domain="d",disk="vda",job_type="pull"} 1
"""


def test_failure_alert_reaches_webhook(tmp_path, metrics_server, alertmanager, webhook_receiver,
                                       prometheus_factory):
    metrics_server.text = BASE.format(cycles=10)
    prom = prometheus_factory(targets=[metrics_server.address], rule_files=alert_rule_files(tmp_path / "rules"),
                              alertmanager_url=alertmanager.url)
    prom.wait_for_target_up()
    assert prom.query_value('libvirt_blockjob_up{job="libvirt-blockjob"}') == 1.0
    # A few evaluations without any failure: nothing fires.
    prom.wait_for_query('count_over_time(libvirt_blockjob_up[1m]) >= 2', timeout=10)
    assert [a for a in prom.alerts() if a["labels"]["alertname"] == "LibvirtBlockJobFailed"] == []

    # The first failure on a disk: the counter appears already at 1.
    failed_at = time.time()
    metrics_server.text = BASE.format(cycles=20) + FAILED
    hit = webhook_receiver.wait_for_alert("LibvirtBlockJobFailed", {"domain": "d", "disk": "vda"}, timeout=20)
    arrived = webhook_receiver.first_arrival("LibvirtBlockJobFailed", {"domain": "d"})
    assert arrived is not None and failed_at < arrived <= time.time()
    assert webhook_receiver.first_arrival("LibvirtBlockJobFailed", {"domain": "other"}) is None
    assert hit["labels"]["job_type"] == "pull"
    assert hit["labels"]["severity"] == "critical"
    assert hit["labels"]["job"] == "libvirt-blockjob"
    assert hit["labels"]["instance"] == metrics_server.address
    assert "disk vda of domain d" in hit["annotations"]["description"]
    assert hit["annotations"]["runbook_url"].endswith("#libvirtblockjobfailed")
    alertmanager.wait_for_alert("LibvirtBlockJobFailed", {"domain": "d", "disk": "vda"}, timeout=5)
    # Only that alert: the exporter is up and connected.
    names = {a["labels"]["alertname"] for a in webhook_receiver.alerts()}
    assert names == {"LibvirtBlockJobFailed"}


def test_threshold_overrides_reach_prometheus(tmp_path, prometheus_factory):
    files = alert_rule_files(tmp_path / "rules", {"stalled.after": "5s", "selector": 'job="x"'})
    prom = prometheus_factory(targets=[], rule_files=files)
    rules = {r["name"]: r for g in prom.rules() for r in g["rules"]}
    assert "> 5\n" in rules["LibvirtBlockJobStalled"]["query"] or "> 5" in rules["LibvirtBlockJobStalled"]["query"]
    assert 'job="x"' in rules["LibvirtBlockJobExporterDown"]["query"]
    assert "libvirt_blockjob:eta_seconds:rate5m" in rules


def test_processes_are_gone_after_stop(tmp_path):
    require_tools("prometheus", "alertmanager")
    with AlertmanagerServer(tmp_path / "am") as am, PrometheusServer(tmp_path / "prom") as prom:
        pids = [am.proc.pid, prom.proc.pid]
        assert prom.query_value("vector(1)") == 1.0
        assert am.alerts() == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
