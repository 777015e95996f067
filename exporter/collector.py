"""Builds metric families from a state snapshot on each scrape; never touches libvirt."""

from __future__ import annotations

import threading
from typing import Callable, Iterable, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from .model import OUTCOMES, Snapshot
from .selfstats import SelfStats, SelfStatsSnapshot
from .state import State

JOB_LABELS = ("domain", "disk", "job_type")

ExtraFamilies = Callable[[], Iterable[Metric]]


class BlockJobCollector:
    def __init__(self, state: State, stats: SelfStats, version: str,
                 extra: Sequence[ExtraFamilies] = ()) -> None:
        self._state = state
        self._stats = stats
        self._version = version
        self._extra = list(extra)

    def add_extra(self, families: ExtraFamilies) -> None:
        self._extra.append(families)

    def describe(self) -> list[Metric]:
        """Registration must not call libvirt: describe from an empty snapshot."""
        return list(self._families(Snapshot.empty(), SelfStats().snapshot()))

    def collect(self) -> Iterable[Metric]:
        yield from self._families(self._state.snapshot(), self._stats.snapshot())
        for extra in self._extra:
            yield from extra()

    def _families(self, snap: Snapshot, stats: SelfStatsSnapshot) -> Iterable[Metric]:
        yield GaugeMetricFamily("libvirt_blockjob_up",
                                "1 while connected to libvirt with event callbacks registered, else 0",
                                value=1 if snap.connected else 0)
        build = GaugeMetricFamily("libvirt_blockjob_exporter_build_info",
                                  "Build information of the exporter; always 1",
                                  labels=("version",))
        build.add_metric((self._version,), 1)
        yield build

        job_gauges = [
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
        ]
        jobs = sorted(snap.jobs.values(), key=lambda j: (j.domain, j.disk))
        for name, help_text, value in job_gauges:
            family = GaugeMetricFamily(name, help_text, labels=JOB_LABELS)
            for job in jobs:
                family.add_metric((job.domain, job.disk, job.job_type), value(job))
            yield family

        for outcome in OUTCOMES:
            family = CounterMetricFamily(f"libvirt_blockjob_{outcome}", f"Block jobs that {outcome.replace('canceled', 'were canceled')}",
                                         labels=JOB_LABELS)
            for (domain, disk, job_type, each), count in sorted(snap.outcomes.items()):
                if each == outcome:
                    family.add_metric((domain, disk, job_type), count)
            yield family
        inferred = CounterMetricFamily(
            "libvirt_blockjob_outcomes_inferred",
            "Outcomes told from the disk or domain because no libvirt event reported them",
            labels=JOB_LABELS + ("outcome",))
        for (domain, disk, job_type, outcome), count in sorted(snap.inferred_outcomes.items()):
            inferred.add_metric((domain, disk, job_type, outcome), count)
        yield inferred

        depth = GaugeMetricFamily("libvirt_blockjob_backing_chain_depth",
                                  "Backing images under the active layer (0 = flat)", labels=("domain", "disk"))
        for (domain, disk), info in sorted(snap.disks.items()):
            depth.add_metric((domain, disk), info.backing_depth)
        yield depth
        yield GaugeMetricFamily("libvirt_blockjob_active_jobs", "Active block jobs on the host",
                                value=len(snap.jobs))
        yield GaugeMetricFamily("libvirt_blockjob_domains", "Running domains watched",
                                value=len(snap.running_domains))
        yield GaugeMetricFamily("libvirt_blockjob_disks", "Disks polled", value=len(snap.disks))

        events = CounterMetricFamily("libvirt_blockjob_events_received", "libvirt events received",
                                     labels=("event",))
        for event, count in sorted(stats.events.items()):
            events.add_metric((event,), count)
        yield events
        yield CounterMetricFamily("libvirt_blockjob_reconnects",
                                  "Successful reconnections to libvirtd after a lost connection",
                                  value=stats.reconnects)
        yield GaugeMetricFamily("libvirt_blockjob_poll_duration_seconds", "Duration of the last poll cycle",
                                value=stats.last_poll_duration)
        yield CounterMetricFamily("libvirt_blockjob_poll_cycles", "Poll cycles run", value=stats.poll_cycles)
        yield GaugeMetricFamily("libvirt_blockjob_last_poll_timestamp_seconds",
                                "Unix time the last poll cycle finished", value=stats.last_poll_timestamp)
        calls = CounterMetricFamily("libvirt_blockjob_libvirt_calls", "libvirt API calls made",
                                    labels=("method",))
        errors = CounterMetricFamily("libvirt_blockjob_libvirt_errors", "libvirt API calls that failed",
                                     labels=("method",))
        for method, count in sorted(stats.calls.items()):
            calls.add_metric((method,), count)
        for method, count in sorted(stats.errors.items()):
            errors.add_metric((method,), count)
        yield calls
        yield errors


class MetricsRenderer:
    """Renders the registry to text; one render at a time keeps the scrape cost bounded."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._lock = threading.Lock()

    def __call__(self, accept: str | None = None) -> tuple[bytes, str]:
        with self._lock:
            return generate_latest(self._registry), CONTENT_TYPE_LATEST


def build_registry(collector: BlockJobCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    return registry
