"""The exposition: families built from a state snapshot on each scrape; never touches libvirt.

One collector object runs the exporter's collectors by name (``blockjobs``, ``exporter``, then
``policy``/``alertmanager`` when configured, ``process``), each timed and guarded the way
node_exporter does it: one that raises is logged, reported as
``libvirt_blockjob_scrape_collector_success{collector=...} 0`` and the rest is served.

prometheus_client's writers (``generate_latest``, OpenMetrics) are the only writers. They spend
about 9 ms (text) and 15 ms (OpenMetrics) on 200 disks with 50 jobs, so the block-job part of
the text is kept per format until the state hands out a new snapshot (it does so only when
something shown changed); the rest is written fresh on every scrape. The part and the rest are
the same writer's output for consecutive families, so their concatenation is byte for byte what
the writer gives for the whole (tests/test_collector.py holds them equal). When the snapshot does
change, only the families whose samples changed are written again (a moving job changes three).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterable, Sequence

from prometheus_client import ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from .model import OUTCOMES, ActiveJob, Snapshot
from .selfstats import SelfStats, SelfStatsSnapshot
from .state import State

log = logging.getLogger(__name__)

JOB_LABELS = ("domain", "disk", "job_type")

Families = Callable[[], Iterable[Metric]]
Encoder = Callable[[object], bytes]

# (name, help, value of an ActiveJob): one gauge per job, labelled JOB_LABELS.
_JOB_GAUGES: tuple[tuple[str, str, Callable[[ActiveJob], float]], ...] = (
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
_EOF = b"# EOF\n"  # OpenMetrics' last line: only the whole exposition ends with it
_MAX_CACHED_FORMATS = 4  # content types come from the Accept header: keep the cache bounded


def _outcome_help(outcome: str) -> str:
    return f"Block jobs that {outcome.replace('canceled', 'were canceled')}"


def snapshot_families(snap: Snapshot, version: str) -> Iterable[Metric]:
    """The block-job families: a pure function of the snapshot."""
    yield GaugeMetricFamily("libvirt_blockjob_up",
                            "1 while connected to libvirt with event callbacks registered, else 0",
                            value=1 if snap.connected else 0)
    build = GaugeMetricFamily("libvirt_blockjob_exporter_build_info",
                              "Build information of the exporter; always 1", labels=("version",))
    build.add_metric((version,), 1)
    yield build

    jobs = sorted(snap.jobs.values(), key=lambda j: (j.domain, j.disk))
    for name, help_text, value in _JOB_GAUGES:
        family = GaugeMetricFamily(name, help_text, labels=JOB_LABELS)
        for job in jobs:
            family.add_metric((job.domain, job.disk, job.job_type), value(job))
        yield family

    outcomes = sorted(snap.outcomes.items())
    for outcome in OUTCOMES:
        family = CounterMetricFamily(f"libvirt_blockjob_{outcome}", _outcome_help(outcome), labels=JOB_LABELS)
        for (domain, disk, job_type, each), count in outcomes:
            if each == outcome:
                family.add_metric((domain, disk, job_type), count)
        yield family
    inferred = CounterMetricFamily("libvirt_blockjob_outcomes_inferred",
                                   "Outcomes told from the disk or domain because no libvirt event reported them",
                                   labels=JOB_LABELS + ("outcome",))
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


def stats_families(stats: SelfStatsSnapshot) -> Iterable[Metric]:
    """The exporter's own counters (the ``exporter`` collector)."""
    events = CounterMetricFamily("libvirt_blockjob_events_received", "libvirt events received", labels=("event",))
    for event, count in sorted(stats.events.items()):
        events.add_metric((event,), count)
    yield events
    yield CounterMetricFamily("libvirt_blockjob_reconnects",
                              "Successful reconnections to libvirtd after a lost connection", value=stats.reconnects)
    yield GaugeMetricFamily("libvirt_blockjob_poll_duration_seconds", "Duration of the last poll cycle",
                            value=stats.last_poll_duration)
    yield CounterMetricFamily("libvirt_blockjob_poll_cycles", "Poll cycles run", value=stats.poll_cycles)
    yield GaugeMetricFamily("libvirt_blockjob_last_poll_timestamp_seconds", "Unix time the last poll cycle finished",
                            value=stats.last_poll_timestamp)
    calls = CounterMetricFamily("libvirt_blockjob_libvirt_calls", "libvirt API calls made", labels=("method",))
    errors = CounterMetricFamily("libvirt_blockjob_libvirt_errors", "libvirt API calls that failed",
                                 labels=("method",))
    for method, count in sorted(stats.calls.items()):
        calls.add_metric((method,), count)
    for method, count in sorted(stats.errors.items()):
        errors.add_metric((method,), count)
    yield calls
    yield errors


class _Fixed:
    """Hands a writer families already collected."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


class BlockJobCollector:
    """All of the exporter's collectors as one prometheus_client collector; see the module docstring."""

    def __init__(self, state: State, stats: SelfStats, version: str,
                 extra: Sequence[tuple[str, Families]] = (), process: bool = True,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self._state = state
        self._version = version
        self._clock = clock
        self._named: list[tuple[str, Families]] = [("exporter", lambda: stats_families(stats.snapshot()))]
        self._named.extend(extra)
        if process:
            # process_start_time_seconds lets the failure alert tell a restart from a new series.
            self._named.append(("process", ProcessCollector(registry=None).collect))
        self._lock = threading.Lock()
        # content type -> (snapshot, its block-job text, {family name: (samples, text)})
        self._cached: dict[str, tuple[Snapshot, bytes, dict]] = {}
        self.registry = CollectorRegistry(auto_describe=False, support_collectors_without_names=True)
        self.registry.register(self)

    def add_extra(self, name: str, families: Families) -> None:
        """Another collector (``policy``, ``alertmanager``), run before ``process``."""
        at = len(self._named) - (1 if self._named[-1][0] == "process" else 0)
        self._named.insert(at, (name, families))

    def _run(self, name: str, work: Callable[[], object], results: list):
        """``work()``, timed; None (and logged) if it raises."""
        start = self._clock()
        try:
            out = work()
            ok = 1
        except Exception:
            log.exception("collector %s failed; the rest of the scrape is served", name)
            out, ok = None, 0
        results.append((name, ok, self._clock() - start))
        return out

    @staticmethod
    def _scrape_families(results: list) -> list[Metric]:
        duration = GaugeMetricFamily("libvirt_blockjob_scrape_collector_duration_seconds",
                                     "Duration of a collector scrape", labels=("collector",))
        success = GaugeMetricFamily("libvirt_blockjob_scrape_collector_success",
                                    "Whether a collector succeeded", labels=("collector",))
        for name, ok, seconds in results:
            duration.add_metric((name,), seconds)
            success.add_metric((name,), ok)
        return [duration, success]

    def _rest(self, results: list) -> list[Metric]:
        out: list[Metric] = []
        for name, families in self._named:
            out.extend(self._run(name, lambda: list(families()), results) or ())
        return out + self._scrape_families(results)

    def collect(self) -> Iterable[Metric]:
        results: list = []
        head = self._run("blockjobs", lambda: list(snapshot_families(self._state.snapshot(), self._version)),
                         results)
        return (head or []) + self._rest(results)

    def render(self, encoder: Encoder, content_type: str) -> bytes:
        """``encoder(self.registry)``, with the block-job text kept per family while it is the same."""

        def block_jobs() -> bytes:
            snap = self._state.snapshot()
            with self._lock:
                cached = self._cached.get(content_type)
            if cached is not None and cached[0] is snap:
                return cached[1]
            previous = cached[2] if cached is not None else {}
            parts, kept = [], {}
            for family in snapshot_families(snap, self._version):
                old = previous.get(family.name)
                if old is not None and old[0] == family.samples:
                    text = old[1]
                else:
                    text = encoder(_Fixed([family])).removesuffix(_EOF)
                kept[family.name] = (family.samples, text)
                parts.append(text)
            text = b"".join(parts)
            with self._lock:
                if len(self._cached) >= _MAX_CACHED_FORMATS:
                    self._cached.clear()
                self._cached[content_type] = (snap, text, kept)
            return text

        results: list = []
        head = self._run("blockjobs", block_jobs, results) or b""
        return head + encoder(_Fixed(self._rest(results)))

    def exposition(self, accept: str | None, names: Sequence[str] = ()) -> tuple[bytes, str]:
        """The body and content type prometheus_client's negotiation picks for ``accept``;
        ``names`` (``name[]`` query parameters) restricts it to those series."""
        encoder, content_type = choose_encoder(accept or "")
        if names:
            return encoder(self.registry.restricted_registry(names)), content_type
        return self.render(encoder, content_type), content_type
