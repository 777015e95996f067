"""The scrape's direct text path says exactly what the registry path (``collect()``) says."""

import shutil
import subprocess

import pytest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.collector import BlockJobCollector, MetricsRenderer, build_registry
from exporter.process_metrics import ProcessMetrics
from exporter.model import BackingImage, BlockJobEvent, ConnectionEvent, DiskInfo, JobInfo, LifecycleEvent
from exporter.selfstats import SelfStats
from exporter.state import State


def parsed(text: bytes):
    return [(f.name, f.type, f.documentation, sorted((s.name, sorted(s.labels.items()), s.value) for s in f.samples))
            for f in text_string_to_metric_families(text.decode())]


def busy_state():
    clock = [1_700_000_000.25]
    state = State(clock=lambda: clock[0])
    stats = SelfStats()
    state.apply(ConnectionEvent(True, 0.0, 0.0))
    chain = (BackingImage("/img/mid.qcow2", "qcow2"), BackingImage("/img/base.qcow2", "qcow2"))
    odd = 'we"ird\\name\nwith ünïcode'
    for name in ("web-1", "web-2", odd, "db-1"):
        state.update_domain(name, [DiskInfo(name, "vda", f"/img/{name}.qcow2", "qcow2", chain),
                                   DiskInfo(name, "vdb", "", "raw", ())])
    state.apply_poll("web-1", "vda", JobInfo("pull", 25, 100, 1048576), 0.0)
    state.apply_poll(odd, "vdb", JobInfo("copy", 123456789, 123456789, 0), 0.0)
    state.apply_poll("db-1", "vda", JobInfo("commit", 0, 0, 0), 0.0)
    state.apply_poll("web-2", "vda", JobInfo("pull", 1, 10, 0), 0.0)
    state.apply(BlockJobEvent("web-2", "vda", "pull", "completed", "block_job_2", 1.0, 1.0))
    state.apply(LifecycleEvent("db-1", "crashed", 2.0, 2.0))  # inferred failure
    stats.calls("blockJobInfo", 12345678, 3)
    stats.calls("XMLDesc", 4)
    stats.event("block_job_2")
    stats.poll_cycle(0.0123, 1_700_000_001.5)
    return state, stats, clock


def test_direct_text_equals_registry_output():
    state, stats, _ = busy_state()
    collector = BlockJobCollector(state, stats, "1.2.3")
    collector.add_extra(lambda: [GaugeMetricFamily("libvirt_blockjob_policy_enforcing", "Enforcing", value=0)])
    registry = build_registry(collector)
    direct, content_type = MetricsRenderer(registry)()
    assert content_type.startswith("text/plain")
    assert parsed(direct) == parsed(generate_latest(registry))
    assert b'domain="we\\"ird\\\\name\\nwith \xc3\xbcn\xc3\xafcode"' in direct


def test_other_collectors_in_the_registry_are_rendered_too():
    state, stats, _ = busy_state()
    registry = build_registry(BlockJobCollector(state, stats, "1"))
    registry.register(ProcessMetrics())  # as the CLI does: process_start_time_seconds feeds an alert
    direct = MetricsRenderer(registry)()[0]
    assert b"\nprocess_start_time_seconds " in direct
    names = [f[0] for f in parsed(direct)]
    assert names == [f[0] for f in parsed(generate_latest(registry))]


def test_empty_and_disconnected_state_equal_too():
    state = State()
    registry = build_registry(BlockJobCollector(state, SelfStats(), "0"))
    assert parsed(MetricsRenderer(registry)()[0]) == parsed(generate_latest(registry))


def test_cached_part_follows_the_state_and_counters_are_always_fresh():
    state, stats, clock = busy_state()
    registry = build_registry(BlockJobCollector(state, stats, "1"))
    render = MetricsRenderer(registry)
    first = render()[0]
    assert render()[0] == first
    stats.poll_cycle(0.5, 1_700_000_009.0)
    clock[0] += 5
    state.apply_poll("web-1", "vda", JobInfo("pull", 50, 100, 1048576), 0.0)
    again = render()[0]
    assert parsed(again) == parsed(generate_latest(registry))
    assert b'libvirt_blockjob_cursor{disk="vda",domain="web-1",job_type="pull"} 50.0' in again
    assert b"libvirt_blockjob_poll_cycles_total 2.0" in again

    # An outcome, a chain change and a new domain each invalidate their cached section.
    state.apply(BlockJobEvent("web-1", "vda", "pull", "failed", "block_job_2", 3.0, 3.0))
    assert parsed(render()[0]) == parsed(generate_latest(registry))
    state.update_domain("web-1", [DiskInfo("web-1", "vda", "/img/web-1.qcow2", "qcow2", ())])
    state.update_domain("new-1", [DiskInfo("new-1", "vda", "/img/new-1.qcow2", "qcow2", ())])
    state.apply_poll("new-1", "vda", JobInfo("pull", 0, 10, 0), 0.0)
    last = render()[0]
    assert parsed(last) == parsed(generate_latest(registry))
    assert b'libvirt_blockjob_backing_chain_depth{disk="vda",domain="web-1"} 0.0' in last
    assert b'libvirt_blockjob_failed_total{disk="vda",domain="web-1",job_type="pull"} 1.0' in last


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_direct_text_passes_promtool_check_metrics():
    state, stats, _ = busy_state()
    body = MetricsRenderer(build_registry(BlockJobCollector(state, stats, "1")))()[0]
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_parts_keep_the_snapshot_text_while_the_state_is_unchanged():
    state, stats, _ = busy_state()
    renderer = MetricsRenderer(build_registry(BlockJobCollector(state, stats, "1")))
    first, _ = renderer.parts()
    stats.poll_cycle(0.5, 1_700_000_002.0)  # only the exporter's own counters moved
    second, _ = renderer.parts()
    assert second[0] is first[0] and second[1] != first[1]
    state.apply_poll("web-1", "vda", JobInfo("pull", 26, 100, 1048576), 0.0)
    third, _ = renderer.parts()
    assert third[0] is not first[0] and b" 26.0\n" in third[0]
    assert b"".join(third) == renderer()[0]  # the parts join to the whole text


def test_process_metrics_match_prometheus_client_process_collector():
    """Same names, help, types and (within what moves between two reads) values."""
    from prometheus_client import CollectorRegistry, ProcessCollector

    theirs_registry = CollectorRegistry()
    ProcessCollector(registry=theirs_registry)
    ours = ProcessMetrics()
    ours_text = ours.render().encode()
    theirs_text = generate_latest(theirs_registry)
    ours_families, theirs_families = parsed(ours_text), parsed(theirs_text)
    assert [f[:3] for f in ours_families] == [f[:3] for f in theirs_families]
    ours_values = {f[0]: f[3][0][2] for f in ours_families}
    theirs_values = {f[0]: f[3][0][2] for f in theirs_families}
    assert ours_values["process_start_time_seconds"] == pytest.approx(theirs_values["process_start_time_seconds"], abs=0.02)
    assert ours_values["process_max_fds"] == theirs_values["process_max_fds"]
    assert ours_values["process_cpu_seconds"] == pytest.approx(theirs_values["process_cpu_seconds"], abs=0.5)
    assert ours_values["process_resident_memory_bytes"] == pytest.approx(
        theirs_values["process_resident_memory_bytes"], rel=0.1)
    assert abs(ours_values["process_open_fds"] - theirs_values["process_open_fds"]) <= 2
    # The registry path (collect) says what the direct path (render) says.
    assert [f[:3] for f in parsed(generate_latest(_registry_with(ours)))] == [f[:3] for f in ours_families]
    ours.close()


def _registry_with(collector):
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(collector)
    return registry
