"""The exposition built from a state snapshot, read back the way client_python's tests do."""

import subprocess
import shutil

import pytest
from prometheus_client.exposition import generate_latest

from exporter.collector import BlockJobCollector, build_registry
from exporter.model import BackingImage, BlockJobEvent, ConnectionEvent, DiskInfo, JobInfo
from exporter.selfstats import SelfStats
from exporter.state import State


def make(active=True):
    state = State(clock=lambda: 1_700_000_000.0)
    stats = SelfStats()
    state.apply(ConnectionEvent(True, 0.0, 0.0))
    chain = (BackingImage("/img/base.qcow2", "qcow2"),)
    state.update_domain("web-1", [DiskInfo("web-1", "vda", "/img/top.qcow2", "qcow2", chain)])
    if active:
        state.apply_poll("web-1", "vda", JobInfo("pull", 25, 100, 1048576), 0.0)
    stats.calls("blockJobInfo", 3, 1)
    stats.event("block_job_2")
    return state, stats, build_registry(BlockJobCollector(state, stats, "9.9.9"))


def test_job_gauges_counters_and_health():
    _, _, registry = make()
    labels = {"domain": "web-1", "disk": "vda", "job_type": "pull"}
    value = registry.get_sample_value
    assert value("libvirt_blockjob_up") == 1
    assert value("libvirt_blockjob_cursor", labels) == 25
    assert value("libvirt_blockjob_cursor_end", labels) == 100
    assert value("libvirt_blockjob_progress_ratio", labels) == 0.25
    assert value("libvirt_blockjob_bandwidth_bytes_per_second", labels) == 1048576
    assert value("libvirt_blockjob_ready", labels) == 0
    assert value("libvirt_blockjob_start_time_seconds", labels) == 1_700_000_000.0
    for outcome in ("completed", "failed", "canceled"):
        assert value(f"libvirt_blockjob_{outcome}_total", labels) == 0
    assert value("libvirt_blockjob_backing_chain_depth", {"domain": "web-1", "disk": "vda"}) == 1
    assert value("libvirt_blockjob_exporter_build_info", {"version": "9.9.9"}) == 1
    assert value("libvirt_blockjob_libvirt_calls_total", {"method": "blockJobInfo"}) == 3
    assert value("libvirt_blockjob_libvirt_errors_total", {"method": "blockJobInfo"}) == 1
    assert value("libvirt_blockjob_events_received_total", {"event": "block_job_2"}) == 1
    assert value("libvirt_blockjob_active_jobs") == 1


def test_job_gauges_disappear_when_the_job_ends_but_counters_stay():
    state, _, registry = make()
    state.apply(BlockJobEvent("web-1", "vda", "pull", "completed", "block_job_2", 1.0, 1.0))
    labels = {"domain": "web-1", "disk": "vda", "job_type": "pull"}
    assert registry.get_sample_value("libvirt_blockjob_cursor", labels) is None
    assert registry.get_sample_value("libvirt_blockjob_completed_total", labels) == 1


def test_up_is_zero_when_disconnected():
    state, _, registry = make(active=False)
    state.apply(ConnectionEvent(False, 0.0, 0.0))
    assert registry.get_sample_value("libvirt_blockjob_up") == 0


def test_describe_does_not_read_state():
    class Exploding(State):
        def snapshot(self):
            raise AssertionError("describe() must not read the state")

    build_registry(BlockJobCollector(Exploding(), SelfStats(), "1"))


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_exposition_passes_promtool_check_metrics():
    _, _, registry = make()
    result = subprocess.run(["promtool", "check", "metrics"], input=generate_latest(registry),
                            capture_output=True)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
