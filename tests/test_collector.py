"""The exposition built from a state snapshot, checked as exact text the way client_python's
tests do, and the block-job writer checked byte for byte against prometheus_client's writers
(the golden tests: ``reference_families`` states the block-job families as prometheus_client
families)."""

import shutil
import subprocess

import pytest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.collector import BlockJobCollector, BlockJobWriter
from exporter.model import OUTCOMES, BackingImage, BlockJobEvent, ConnectionEvent, DiskInfo, JobInfo, LifecycleEvent
from exporter.selfstats import SelfStats
from exporter.state import State

JOB = '{disk="vda",domain="web-\\"1\\"",job_type="pull"}'
EXPECTED = f"""\
# HELP libvirt_blockjob_up 1 while connected to libvirt with event callbacks registered, else 0
# TYPE libvirt_blockjob_up gauge
libvirt_blockjob_up 1.0
# HELP libvirt_blockjob_exporter_build_info Build information of the exporter; always 1
# TYPE libvirt_blockjob_exporter_build_info gauge
libvirt_blockjob_exporter_build_info{{version="9.9.9"}} 1.0
# HELP libvirt_blockjob_cursor Bytes processed so far by the active job (cur)
# TYPE libvirt_blockjob_cursor gauge
libvirt_blockjob_cursor{JOB} 25.0
# HELP libvirt_blockjob_cursor_end Total bytes the active job will process (end)
# TYPE libvirt_blockjob_cursor_end gauge
libvirt_blockjob_cursor_end{JOB} 100.0
# HELP libvirt_blockjob_progress_ratio cur/end of the active job, 0 while end is 0
# TYPE libvirt_blockjob_progress_ratio gauge
libvirt_blockjob_progress_ratio{JOB} 0.25
# HELP libvirt_blockjob_bandwidth_bytes_per_second Bandwidth cap of the active job, 0 = unlimited
# TYPE libvirt_blockjob_bandwidth_bytes_per_second gauge
libvirt_blockjob_bandwidth_bytes_per_second{JOB} 1.048576e+06
# HELP libvirt_blockjob_ready 1 once a copy/active-commit job is ready to pivot
# TYPE libvirt_blockjob_ready gauge
libvirt_blockjob_ready{JOB} 0.0
# HELP libvirt_blockjob_start_time_seconds Unix time the active job was first seen
# TYPE libvirt_blockjob_start_time_seconds gauge
libvirt_blockjob_start_time_seconds{JOB} 1.7e+09
# HELP libvirt_blockjob_cursor_last_change_timestamp_seconds Unix time the active job's cursor last moved (its start time until it moves)
# TYPE libvirt_blockjob_cursor_last_change_timestamp_seconds gauge
libvirt_blockjob_cursor_last_change_timestamp_seconds{JOB} 1.7e+09
# HELP libvirt_blockjob_completed_total Block jobs that completed
# TYPE libvirt_blockjob_completed_total counter
libvirt_blockjob_completed_total{JOB} 0.0
# HELP libvirt_blockjob_failed_total Block jobs that failed
# TYPE libvirt_blockjob_failed_total counter
libvirt_blockjob_failed_total{JOB} 0.0
# HELP libvirt_blockjob_canceled_total Block jobs that were canceled
# TYPE libvirt_blockjob_canceled_total counter
libvirt_blockjob_canceled_total{JOB} 0.0
# HELP libvirt_blockjob_outcomes_inferred_total Outcomes told from the disk or domain because no libvirt event reported them
# TYPE libvirt_blockjob_outcomes_inferred_total counter
# HELP libvirt_blockjob_backing_chain_depth Backing images under the active layer (0 = flat)
# TYPE libvirt_blockjob_backing_chain_depth gauge
libvirt_blockjob_backing_chain_depth{{disk="vda",domain="web-\\"1\\""}} 1.0
# HELP libvirt_blockjob_active_jobs Active block jobs on the host
# TYPE libvirt_blockjob_active_jobs gauge
libvirt_blockjob_active_jobs 1.0
# HELP libvirt_blockjob_domains Running domains watched
# TYPE libvirt_blockjob_domains gauge
libvirt_blockjob_domains 1.0
# HELP libvirt_blockjob_disks Disks polled
# TYPE libvirt_blockjob_disks gauge
libvirt_blockjob_disks 1.0
# HELP libvirt_blockjob_tracked_domains Domains with series: running, or gone less than --state.retention ago
# TYPE libvirt_blockjob_tracked_domains gauge
libvirt_blockjob_tracked_domains 1.0
# HELP libvirt_blockjob_tracked_disks Disks with series (chain depth or outcome counters)
# TYPE libvirt_blockjob_tracked_disks gauge
libvirt_blockjob_tracked_disks 1.0
# HELP libvirt_blockjob_tracked_jobs Block jobs being tracked, including ones the last poll lost and whose end is awaited
# TYPE libvirt_blockjob_tracked_jobs gauge
libvirt_blockjob_tracked_jobs 1.0
# HELP libvirt_blockjob_domain_unresponsive 1 while the domain's blockJobInfo has not answered within the call timeout (its QEMU hangs); present only then
# TYPE libvirt_blockjob_domain_unresponsive gauge
libvirt_blockjob_domain_unresponsive{{domain="stuck"}} 1.0
# HELP libvirt_blockjob_events_received_total libvirt events received
# TYPE libvirt_blockjob_events_received_total counter
libvirt_blockjob_events_received_total{{event="block_job"}} 0.0
libvirt_blockjob_events_received_total{{event="block_job_2"}} 1.0
libvirt_blockjob_events_received_total{{event="lifecycle"}} 0.0
# HELP libvirt_blockjob_reconnects_total Successful reconnections to libvirtd after a lost connection
# TYPE libvirt_blockjob_reconnects_total counter
libvirt_blockjob_reconnects_total 0.0
# HELP libvirt_blockjob_poll_duration_seconds Duration of the last poll cycle
# TYPE libvirt_blockjob_poll_duration_seconds gauge
libvirt_blockjob_poll_duration_seconds 0.0
# HELP libvirt_blockjob_poll_cycles_total Poll cycles run
# TYPE libvirt_blockjob_poll_cycles_total counter
libvirt_blockjob_poll_cycles_total 0.0
# HELP libvirt_blockjob_last_poll_timestamp_seconds Unix time the last poll cycle finished
# TYPE libvirt_blockjob_last_poll_timestamp_seconds gauge
libvirt_blockjob_last_poll_timestamp_seconds 0.0
# HELP libvirt_blockjob_discovery_interval_seconds Longest time a disk without a job goes unread (jobs started by others are found within it; --poll.call-budget)
# TYPE libvirt_blockjob_discovery_interval_seconds gauge
libvirt_blockjob_discovery_interval_seconds 0.0
# HELP libvirt_blockjob_libvirt_calls_total libvirt API calls made
# TYPE libvirt_blockjob_libvirt_calls_total counter
libvirt_blockjob_libvirt_calls_total{{method="blockJobInfo"}} 3.0
# HELP libvirt_blockjob_libvirt_errors_total libvirt API calls that failed
# TYPE libvirt_blockjob_libvirt_errors_total counter
libvirt_blockjob_libvirt_errors_total{{method="blockJobInfo"}} 1.0
# HELP libvirt_blockjob_scrape_collector_duration_seconds Duration of a collector scrape
# TYPE libvirt_blockjob_scrape_collector_duration_seconds gauge
libvirt_blockjob_scrape_collector_duration_seconds{{collector="blockjobs"}} 0.0
libvirt_blockjob_scrape_collector_duration_seconds{{collector="exporter"}} 0.0
# HELP libvirt_blockjob_scrape_collector_success Whether a collector succeeded
# TYPE libvirt_blockjob_scrape_collector_success gauge
libvirt_blockjob_scrape_collector_success{{collector="blockjobs"}} 1.0
libvirt_blockjob_scrape_collector_success{{collector="exporter"}} 1.0
"""


REF_LABELS = ("domain", "disk", "job_type")
_JOB_GAUGES = (
    ("libvirt_blockjob_cursor", "Bytes processed so far by the active job (cur)", lambda j: j.cur),
    ("libvirt_blockjob_cursor_end", "Total bytes the active job will process (end)", lambda j: j.end),
    ("libvirt_blockjob_progress_ratio", "cur/end of the active job, 0 while end is 0",
     lambda j: j.progress_ratio),
    ("libvirt_blockjob_bandwidth_bytes_per_second", "Bandwidth cap of the active job, 0 = unlimited",
     lambda j: j.bandwidth),
    ("libvirt_blockjob_ready", "1 once a copy/active-commit job is ready to pivot",
     lambda j: 1 if j.ready else 0),
    ("libvirt_blockjob_start_time_seconds", "Unix time the active job was first seen",
     lambda j: j.start_time),
    ("libvirt_blockjob_cursor_last_change_timestamp_seconds",
     "Unix time the active job's cursor last moved (its start time until it moves)",
     lambda j: j.cursor_changed_time),
)

def _outcome_help(outcome):
    return f"Block jobs that {outcome.replace('canceled', 'were canceled')}"


def reference_families(snap, version):
    """The block-job families as prometheus_client families: what the fast writer must match."""
    yield GaugeMetricFamily("libvirt_blockjob_up",
                            "1 while connected to libvirt with event callbacks registered, else 0",
                            value=1 if snap.connected else 0)
    build = GaugeMetricFamily("libvirt_blockjob_exporter_build_info",
                              "Build information of the exporter; always 1", labels=("version",))
    build.add_metric((version,), 1)
    yield build

    jobs = sorted(snap.jobs.values(), key=lambda j: (j.domain, j.disk))
    for name, help_text, value in _JOB_GAUGES:
        family = GaugeMetricFamily(name, help_text, labels=REF_LABELS)
        for job in jobs:
            family.add_metric((job.domain, job.disk, job.job_type), value(job))
        yield family

    outcomes = sorted(snap.outcomes.items())
    for outcome in OUTCOMES:
        family = CounterMetricFamily(f"libvirt_blockjob_{outcome}", _outcome_help(outcome), labels=REF_LABELS)
        for (domain, disk, job_type, each), count in outcomes:
            if each == outcome:
                family.add_metric((domain, disk, job_type), count)
        yield family
    inferred = CounterMetricFamily("libvirt_blockjob_outcomes_inferred",
                                   "Outcomes told from the disk or domain because no libvirt event reported them",
                                   labels=REF_LABELS + ("outcome",))
    for labels, count in sorted(snap.inferred_outcomes.items()):
        inferred.add_metric(labels, count)
    yield inferred

    depth = GaugeMetricFamily("libvirt_blockjob_backing_chain_depth",
                              "Backing images under the active layer (0 = flat)", labels=("domain", "disk"))
    for (domain, disk), info in sorted(snap.disks.items()):
        depth.add_metric((domain, disk), info.backing_depth)
    yield depth
    yield GaugeMetricFamily("libvirt_blockjob_active_jobs", "Active block jobs on the host", value=len(snap.jobs))
    yield GaugeMetricFamily("libvirt_blockjob_domains", "Running domains watched", value=len(snap.running_domains))
    yield GaugeMetricFamily("libvirt_blockjob_disks", "Disks polled", value=len(snap.disks))
    yield GaugeMetricFamily("libvirt_blockjob_tracked_domains",
                            "Domains with series: running, or gone less than --state.retention ago",
                            value=snap.tracked_domains)
    yield GaugeMetricFamily("libvirt_blockjob_tracked_disks", "Disks with series (chain depth or outcome counters)",
                            value=snap.tracked_disks)
    yield GaugeMetricFamily("libvirt_blockjob_tracked_jobs",
                            "Block jobs being tracked, including ones the last poll lost and whose end is awaited",
                            value=len(snap.jobs))
    unresponsive = GaugeMetricFamily(
        "libvirt_blockjob_domain_unresponsive",
        "1 while the domain's blockJobInfo has not answered within the call timeout (its QEMU hangs); "
        "present only then", labels=("domain",))
    for domain in sorted(snap.unresponsive_domains):
        unresponsive.add_metric((domain,), 1)
    yield unresponsive


class Fixed:
    def __init__(self, families):
        self.families = list(families)

    def collect(self):
        return self.families


def sample_value(body, name, labels):
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def make(active=True, **kw):
    state = State(clock=lambda: 1_700_000_000.0)
    stats = SelfStats()
    state.apply(ConnectionEvent(True, 0.0, 0.0))
    chain = (BackingImage("/img/base.qcow2", "qcow2"),)
    state.update_domain('web-"1"', [DiskInfo('web-"1"', "vda", "/img/top.qcow2", "qcow2", chain)])
    if active:
        state.apply_poll('web-"1"', "vda", JobInfo("pull", 25, 100, 1048576), 0.0)
    state.set_unresponsive(frozenset({"stuck"}))
    stats.calls("blockJobInfo", 3, 1)
    stats.event("block_job_2")
    kw.setdefault("process", False)
    return state, stats, BlockJobCollector(state, stats, "9.9.9", clock=lambda: 0.0, **kw)


def test_exposition_text():
    _, _, collector = make()
    body, content_type = collector.exposition(None)
    assert (body.decode(), content_type) == (EXPECTED, "text/plain; version=0.0.4; charset=utf-8")


def test_job_gauges_disappear_when_the_job_ends_but_counters_stay():
    state, _, collector = make()
    state.apply(BlockJobEvent('web-"1"', "vda", "pull", "completed", "block_job_2", 1.0, 1.0))
    labels = {"domain": 'web-"1"', "disk": "vda", "job_type": "pull"}
    body = collector.exposition(None)[0]
    assert sample_value(body, "libvirt_blockjob_cursor", labels) is None
    assert sample_value(body, "libvirt_blockjob_completed_total", labels) == 1


def test_up_is_zero_when_disconnected():
    state, _, collector = make(active=False)
    state.apply(ConnectionEvent(False, 0.0, 0.0))
    assert b"\nlibvirt_blockjob_up 0.0\n" in collector.exposition(None)[0]


def test_a_failing_collector_is_reported_and_the_rest_is_served(caplog):
    def broken():
        raise RuntimeError("policy state exploded")

    _, _, collector = make()
    collector.add_extra("policy", broken)
    collector.add_extra("alertmanager", lambda: [GaugeMetricFamily("libvirt_blockjob_x", "X", value=2)])
    with caplog.at_level("ERROR", logger="exporter.collector"):
        body = collector.exposition(None)[0].decode()
    assert body.startswith(EXPECTED.split("# HELP libvirt_blockjob_scrape_collector_duration_seconds")[0])
    assert body.endswith("""\
# HELP libvirt_blockjob_x X
# TYPE libvirt_blockjob_x gauge
libvirt_blockjob_x 2.0
# HELP libvirt_blockjob_scrape_collector_duration_seconds Duration of a collector scrape
# TYPE libvirt_blockjob_scrape_collector_duration_seconds gauge
libvirt_blockjob_scrape_collector_duration_seconds{collector="blockjobs"} 0.0
libvirt_blockjob_scrape_collector_duration_seconds{collector="exporter"} 0.0
libvirt_blockjob_scrape_collector_duration_seconds{collector="policy"} 0.0
libvirt_blockjob_scrape_collector_duration_seconds{collector="alertmanager"} 0.0
# HELP libvirt_blockjob_scrape_collector_success Whether a collector succeeded
# TYPE libvirt_blockjob_scrape_collector_success gauge
libvirt_blockjob_scrape_collector_success{collector="blockjobs"} 1.0
libvirt_blockjob_scrape_collector_success{collector="exporter"} 1.0
libvirt_blockjob_scrape_collector_success{collector="policy"} 0.0
libvirt_blockjob_scrape_collector_success{collector="alertmanager"} 1.0
""")
    assert any("collector policy failed" in r.getMessage() and "exploded" in (r.exc_text or "")
               for r in caplog.records)


def test_failing_block_job_collector_keeps_the_exporter_families():
    class Broken(State):
        def snapshot(self):
            raise RuntimeError("boom")

    collector = BlockJobCollector(Broken(), SelfStats(), "1", process=False, clock=lambda: 0.0)
    body = collector.exposition(None)[0].decode()
    assert body.startswith("# HELP libvirt_blockjob_events_received_total ")
    assert 'libvirt_blockjob_scrape_collector_success{collector="blockjobs"} 0.0\n' in body


def test_name_filter():
    _, _, collector = make()
    body, _ = collector.exposition(None, ["libvirt_blockjob_up", "libvirt_blockjob_cursor"])
    assert body.decode() == f"""\
# HELP libvirt_blockjob_up 1 while connected to libvirt with event callbacks registered, else 0
# TYPE libvirt_blockjob_up gauge
libvirt_blockjob_up 1.0
# HELP libvirt_blockjob_cursor Bytes processed so far by the active job (cur)
# TYPE libvirt_blockjob_cursor gauge
libvirt_blockjob_cursor{JOB} 25.0
"""


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
    stats.event("block_job_2")
    stats.poll_cycle(0.0123, 1_700_000_001.5)
    return state, stats, clock


ACCEPTS = (None, "text/plain;version=0.0.4;q=1,*/*;q=0.1",
           "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
           "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


@pytest.mark.parametrize("accept", ACCEPTS)
def test_the_block_job_writer_writes_what_prometheus_client_writes(accept):
    """The golden test: every scrape, as the state changes, is byte for byte what
    prometheus_client's writer gives for the reference families plus the other collectors'."""
    state, stats, clock = busy_state()
    collector = BlockJobCollector(state, stats, "1.2.3", clock=lambda: 0.0, process=False)
    policy = GaugeMetricFamily("libvirt_blockjob_policy_enforcing", "E", value=0)
    collector.add_extra("policy", lambda: [policy])
    encoder, _ = choose_encoder(accept or "")

    def same():
        body = collector.exposition(accept)[0]
        scrape = GaugeMetricFamily("libvirt_blockjob_scrape_collector_duration_seconds",
                                   "Duration of a collector scrape", labels=("collector",))
        success = GaugeMetricFamily("libvirt_blockjob_scrape_collector_success",
                                    "Whether a collector succeeded", labels=("collector",))
        for name in ("blockjobs", "exporter", "policy"):
            scrape.add_metric((name,), 0)
            success.add_metric((name,), 1)
        from exporter.collector import stats_families
        expected = [*reference_families(state.snapshot(), "1.2.3"), *stats_families(stats.snapshot()),
                    policy, scrape, success]
        assert body == encoder(Fixed(expected))
        return body

    first = same()
    assert same() == first  # served from the kept text
    stats.poll_cycle(0.5, 1_700_000_009.0)  # only the exporter's own counters move
    assert b"libvirt_blockjob_poll_cycles_total 2.0" in same()
    clock[0] += 5
    state.apply_poll("web-1", "vda", JobInfo("pull", 50, 100, 1048576), 0.0)
    assert b'libvirt_blockjob_cursor{disk="vda",domain="web-1",job_type="pull"} 50.0' in same()
    state.apply(BlockJobEvent("web-1", "vda", "pull", "failed", "block_job_2", 3.0, 3.0))
    state.update_domain("new-1", [DiskInfo("new-1", "vda", "/img/new-1.qcow2", "qcow2", ())])
    state.apply_poll("new-1", "vda", JobInfo("copy", 2**53 + 1, 10**21, 0), 0.0)
    last = same()
    assert b'libvirt_blockjob_failed_total{disk="vda",domain="web-1",job_type="pull"} 1.0' in last
    if accept and "openmetrics" in accept:
        assert last.endswith(b"\n# EOF\n") and last.count(b"# EOF") == 1
    assert b'domain="we\\"ird\\\\name\\nwith \xc3\xbcn\xc3\xafcode"' in last


@pytest.mark.parametrize("openmetrics", (False, True))
def test_name_filter_matches_prometheus_clients_restricted_registry(openmetrics):
    state, _, _ = busy_state()
    from prometheus_client.exposition import generate_latest
    from prometheus_client.registry import CollectorRegistry

    names = frozenset({"libvirt_blockjob_cursor", "libvirt_blockjob_completed_total", "libvirt_blockjob_completed",
                       "libvirt_blockjob_domain_unresponsive", "libvirt_blockjob_backing_chain_depth",
                       "libvirt_blockjob_outcomes_inferred_total", "libvirt_blockjob_disks"})
    registry = CollectorRegistry(auto_describe=False, support_collectors_without_names=True)
    registry.register(Fixed(reference_families(state.snapshot(), "1")))
    writer = openmetrics_latest if openmetrics else generate_latest
    expected = writer(registry.restricted_registry(names)).decode().removesuffix("# EOF\n")
    assert BlockJobWriter("1").write(state.snapshot(), openmetrics, names) == expected


def test_openmetrics_output_equals_openmetrics_writer():
    state, stats, _ = busy_state()
    collector = BlockJobCollector(state, stats, "1", clock=lambda: 0.0, process=False)
    body, content_type = collector.exposition("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"\n# EOF\n")
    assert body.startswith(openmetrics_latest(Fixed(reference_families(state.snapshot(), "1"))).removesuffix(b"# EOF\n"))


def test_process_collector_is_prometheus_clients():
    _, _, collector = make(process=True)
    body = collector.exposition(None)[0]
    assert b"\nprocess_start_time_seconds " in body and b"\nprocess_cpu_seconds_total " in body
    assert b'libvirt_blockjob_scrape_collector_success{collector="process"} 1.0\n' in body


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_exposition_passes_promtool_check_metrics():
    state, stats, _ = busy_state()
    body = BlockJobCollector(state, stats, "1").exposition(None)[0]
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_a_minimum_chain_depth_leaves_flat_disks_out_and_counts_every_disk_by_depth():
    """--collector.chain-depth.min-depth bounds the per-disk series of a host of flat disks; the
    count by depth still covers every disk (0 keeps today's output: the golden tests above)."""
    state, _, _ = busy_state()
    names = frozenset({"libvirt_blockjob_backing_chain_depth", "libvirt_blockjob_disks_by_backing_depth"})
    text = BlockJobWriter("1", min_depth=1).write(state.snapshot(), False, names)
    depth_lines = [line for line in text.splitlines() if line.startswith("libvirt_blockjob_backing_chain_depth{")]
    assert depth_lines == [
        'libvirt_blockjob_backing_chain_depth{disk="vda",domain="we\\"ird\\\\name\\nwith ünïcode"} 2.0',
        'libvirt_blockjob_backing_chain_depth{disk="vda",domain="web-1"} 2.0',
        'libvirt_blockjob_backing_chain_depth{disk="vda",domain="web-2"} 2.0',
    ]  # db-1 crashed: its disks are gone; every vdb is flat
    assert text.endswith(
        "# HELP libvirt_blockjob_disks_by_backing_depth Disks polled, by backing images under the active layer "
        "(with --collector.chain-depth.min-depth, which leaves the shallower disks out of "
        "libvirt_blockjob_backing_chain_depth)\n"
        "# TYPE libvirt_blockjob_disks_by_backing_depth gauge\n"
        'libvirt_blockjob_disks_by_backing_depth{depth="0"} 3.0\n'
        'libvirt_blockjob_disks_by_backing_depth{depth="2"} 3.0\n')
    assert "disks_by_backing_depth" not in BlockJobWriter("1").write(state.snapshot(), False)
