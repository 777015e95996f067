"""The exposition: families built from a state snapshot on each scrape; never touches libvirt.

One collector object runs the exporter's collectors by name (``blockjobs``, ``exporter``, then
``policy``/``alertmanager`` when configured, ``process``), each timed and guarded the way
node_exporter does it: one that raises is logged, reported as
``libvirt_blockjob_scrape_collector_success{collector=...} 0`` and the rest is served.

The block-job families are written by ``BlockJobWriter``, their only writer: they have a line per
job or disk and moving jobs change them every poll, so nearly every scrape writes them anew, too
slowly with prometheus_client's writers at a few hundred disks (the benchmark shows it). It writes
the bytes prometheus_client would, in both formats (the golden tests in tests/test_collector.py
hold it to that); everything else goes through prometheus_client's writers.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from operator import attrgetter
from typing import Callable, Iterable, Mapping, Sequence

from prometheus_client import ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString

from .model import OUTCOMES, Snapshot
from .selfstats import SelfStats, SelfStatsSnapshot
from .state import State

log = logging.getLogger(__name__)

Families = Callable[[], Iterable[Metric]]


@dataclass(frozen=True)
class Family:
    """One block-job family. ``labels`` are in the writers' order (sorted by name)."""

    name: str
    help: str
    labels: tuple[str, ...] = ()
    type: str = "gauge"  # or "counter"

    @property
    def sample(self) -> str:
        return self.name + "_total" if self.type == "counter" else self.name

    def header(self, openmetrics: bool) -> str:
        if openmetrics:
            return f"# HELP {self.name} {_escape(self.help)}\n# TYPE {self.name} {self.type}\n"
        text = self.help.replace("\\", r"\\").replace("\n", r"\n")
        return f"# HELP {self.sample} {text}\n# TYPE {self.sample} {self.type}\n"


JOB_LABELS = ("disk", "domain", "job_type")
UP = Family("libvirt_blockjob_up", "1 while connected to libvirt with event callbacks registered, else 0")
BUILD_INFO = Family("libvirt_blockjob_exporter_build_info", "Build information of the exporter; always 1", ("version",))
# One gauge per active job, with the job's value.
JOB_GAUGES = tuple((Family(name, help_text, JOB_LABELS), attrgetter(attr)) for name, attr, help_text in (
    ("libvirt_blockjob_cursor", "cur", "Bytes processed so far by the active job (cur)"),
    ("libvirt_blockjob_cursor_end", "end", "Total bytes the active job will process (end)"),
    ("libvirt_blockjob_progress_ratio", "progress_ratio", "cur/end of the active job, 0 while end is 0"),
    ("libvirt_blockjob_bandwidth_bytes_per_second", "bandwidth", "Bandwidth cap of the active job, 0 = unlimited"),
    ("libvirt_blockjob_ready", "ready", "1 once a copy/active-commit job is ready to pivot"),
    ("libvirt_blockjob_start_time_seconds", "start_time", "Unix time the active job was first seen"),
    ("libvirt_blockjob_cursor_last_change_timestamp_seconds", "cursor_changed_time",
     "Unix time the active job's cursor last moved (its start time until it moves)"),
))
OUTCOME_COUNTERS = tuple(
    Family(f"libvirt_blockjob_{outcome}", f"Block jobs that {outcome.replace('canceled', 'were canceled')}",
           JOB_LABELS, "counter") for outcome in OUTCOMES)
INFERRED = Family("libvirt_blockjob_outcomes_inferred",
                  "Outcomes told from the disk or domain because no libvirt event reported them",
                  (*JOB_LABELS, "outcome"), "counter")
DEPTH = Family("libvirt_blockjob_backing_chain_depth", "Backing images under the active layer (0 = flat)",
               ("disk", "domain"))
DISKS_BY_DEPTH = Family("libvirt_blockjob_disks_by_backing_depth",
                        "Disks polled, by backing images under the active layer (with "
                        "--collector.chain-depth.min-depth, which leaves the shallower disks out of "
                        "libvirt_blockjob_backing_chain_depth)", ("depth",))
# Host-wide gauges, with their value in the snapshot.
TOTALS = tuple((Family(name, help_text), value) for name, value, help_text in (
    ("libvirt_blockjob_active_jobs", lambda s: len(s.jobs), "Active block jobs on the host"),
    ("libvirt_blockjob_domains", lambda s: len(s.running_domains), "Running domains watched"),
    ("libvirt_blockjob_disks", lambda s: len(s.disks), "Disks polled"),
    ("libvirt_blockjob_tracked_domains", lambda s: s.tracked_domains,
     "Domains with series: running, or gone less than --state.retention ago"),
    ("libvirt_blockjob_tracked_disks", lambda s: s.tracked_disks,
     "Disks with series (chain depth or outcome counters)"),
    ("libvirt_blockjob_tracked_jobs", lambda s: len(s.jobs),
     "Block jobs being tracked, including ones the last poll lost and whose end is awaited"),
))
UNRESPONSIVE = Family("libvirt_blockjob_domain_unresponsive",
                      "1 while the domain's blockJobInfo has not answered within the call timeout (its QEMU "
                      "hangs); present only then", ("domain",))


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


# Most values repeat (counts, depths, sizes, bandwidths): their text is kept.
_number = functools.lru_cache(maxsize=4096)(floatToGoString)


def _label_text(names: Sequence[str], values: Sequence[str]) -> str:
    return "{" + ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values)) + "}"


class BlockJobWriter:
    """The block-job families of a snapshot as exposition text; see the module docstring."""

    _MAX_LABEL_TEXTS = 65536  # bounds the label-text cache; it starts over beyond that

    def __init__(self, version: str, min_depth: int = 0) -> None:
        self._version = version
        self._min_depth = min_depth  # per-disk chain depth only from this depth; 0: every disk
        self._labels: dict[tuple[str, ...], str] = {}  # (domain, disk[, job_type]) -> label text

    def _disk(self, domain: str, disk: str, job_type: str | None = None) -> str:
        """The label text of a disk (``DEPTH``) or of a job on it (``JOB_LABELS``), kept."""
        key = (domain, disk) if job_type is None else (domain, disk, job_type)
        text = self._labels.get(key)
        if text is None:
            if len(self._labels) >= self._MAX_LABEL_TEXTS:
                self._labels.clear()
            text = self._labels[key] = _label_text(("disk", "domain", "job_type"), (disk, domain, *key[2:]))
        return text

    def write(self, snap: Snapshot, openmetrics: bool, names: frozenset[str] | None = None) -> str:
        """The text; with ``names`` (``name[]``) only those series, and no family left empty."""
        out: list[str] = []

        def family(fam: Family, rows: Iterable[tuple[str, float]]) -> None:
            sample = fam.sample
            if names is not None:
                rows = list(rows) if sample in names else ()
                if not rows:
                    return
            out.append(fam.header(openmetrics))
            out.extend(f"{sample}{labels} {_number(value)}\n" for labels, value in rows)

        family(UP, [("", 1 if snap.connected else 0)])
        family(BUILD_INFO, [(_label_text(BUILD_INFO.labels, (self._version,)), 1)])
        jobs = [(self._disk(j.domain, j.disk, j.job_type), j)
                for j in sorted(snap.jobs.values(), key=lambda j: (j.domain, j.disk))]
        for fam, value in JOB_GAUGES:
            family(fam, [(labels, value(job)) for labels, job in jobs])
        outcomes = sorted(snap.outcomes.items())
        for fam, outcome in zip(OUTCOME_COUNTERS, OUTCOMES):
            family(fam, [(self._disk(domain, disk, job_type), count)
                         for (domain, disk, job_type, each), count in outcomes if each == outcome])
        family(INFERRED, [(_label_text(INFERRED.labels, (disk, domain, job_type, outcome)), count)
                          for (domain, disk, job_type, outcome), count in sorted(snap.inferred_outcomes.items())])
        family(DEPTH, [(self._disk(domain, disk), info.backing_depth)
                       for (domain, disk), info in sorted(snap.disks.items()) if info.backing_depth >= self._min_depth])
        if self._min_depth:
            by_depth = Counter(info.backing_depth for info in snap.disks.values())
            family(DISKS_BY_DEPTH, [(_label_text(DISKS_BY_DEPTH.labels, (str(depth),)), count)
                                    for depth, count in sorted(by_depth.items())])
        for fam, total in TOTALS:
            family(fam, [("", total(snap))])
        family(UNRESPONSIVE, [(_label_text(UNRESPONSIVE.labels, (domain,)), 1)
                              for domain in sorted(snap.unresponsive_domains)])
        return "".join(out)


def _counts(name: str, help_text: str, label: str, counts: Mapping[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, help_text, labels=(label,))
    for key, count in sorted(counts.items()):
        family.add_metric((key,), count)
    return family


def stats_families(stats: SelfStatsSnapshot) -> Iterable[Metric]:
    """The exporter's own counters (the ``exporter`` collector)."""
    yield _counts("libvirt_blockjob_events_received", "libvirt events received", "event", stats.events)
    yield CounterMetricFamily("libvirt_blockjob_reconnects",
                              "Successful reconnections to libvirtd after a lost connection", value=stats.reconnects)
    yield GaugeMetricFamily("libvirt_blockjob_poll_duration_seconds", "Duration of the last poll cycle",
                            value=stats.last_poll_duration)
    yield CounterMetricFamily("libvirt_blockjob_poll_cycles", "Poll cycles run", value=stats.poll_cycles)
    yield GaugeMetricFamily("libvirt_blockjob_last_poll_timestamp_seconds", "Unix time the last poll cycle finished",
                            value=stats.last_poll_timestamp)
    yield GaugeMetricFamily("libvirt_blockjob_discovery_interval_seconds",
                            "Longest time a disk without a job goes unread (jobs started by others are found "
                            "within it; --poll.call-budget)", value=stats.discovery_interval)
    yield _counts("libvirt_blockjob_libvirt_calls", "libvirt API calls made", "method", stats.calls)
    yield _counts("libvirt_blockjob_libvirt_errors", "libvirt API calls that failed", "method", stats.errors)


@dataclass(frozen=True, eq=False)
class _Fixed:
    """Hands a writer or a registry families already collected."""

    families: list[Metric]

    def collect(self) -> list[Metric]:
        return self.families


class BlockJobCollector:
    """All of the exporter's collectors; see the module docstring."""

    def __init__(self, state: State, stats: SelfStats, version: str,
                 extra: Sequence[tuple[str, Families]] = (), process: bool = True,
                 clock: Callable[[], float] = time.perf_counter, min_depth: int = 0) -> None:
        self._state = state
        self._clock = clock
        self._writer = BlockJobWriter(version, min_depth)
        self._named: list[tuple[str, Families]] = [("exporter", lambda: stats_families(stats.snapshot()))]
        self._named.extend(extra)
        if process:
            # process_start_time_seconds lets the failure alert tell a restart from a new series.
            self._named.append(("process", ProcessCollector(registry=None).collect))
        self._lock = threading.Lock()
        self._cached: dict[bool, tuple[Snapshot, bytes]] = {}  # openmetrics? -> (snapshot, its text)

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

    def _block_jobs(self, openmetrics: bool, names: frozenset[str] | None) -> bytes:
        snap = self._state.snapshot()
        with self._lock:  # scrapes may come side by side; the writer's label cache is not shared
            if names is not None:
                return self._writer.write(snap, openmetrics, names).encode()
            cached = self._cached.get(openmetrics)
            if cached is None or cached[0] is not snap:
                cached = self._cached[openmetrics] = (snap, self._writer.write(snap, openmetrics).encode())
        return cached[1]

    def _rest(self, results: list) -> list[Metric]:
        out: list[Metric] = []
        for name, families in self._named:
            out.extend(self._run(name, lambda: list(families()), results) or ())
        duration = GaugeMetricFamily("libvirt_blockjob_scrape_collector_duration_seconds",
                                     "Duration of a collector scrape", labels=("collector",))
        success = GaugeMetricFamily("libvirt_blockjob_scrape_collector_success",
                                    "Whether a collector succeeded", labels=("collector",))
        for name, ok, seconds in results:
            duration.add_metric((name,), seconds)
            success.add_metric((name,), ok)
        return out + [duration, success]

    def exposition(self, accept: str | None, names: Sequence[str] = ()) -> tuple[bytes, str]:
        """The body and content type prometheus_client's negotiation picks for ``accept``;
        ``names`` (``name[]`` query parameters) restricts it to those series."""
        encoder, content_type = choose_encoder(accept or "")
        openmetrics = content_type.startswith("application/openmetrics-text")
        wanted = frozenset(names) or None
        results: list = []
        head = self._run("blockjobs", lambda: self._block_jobs(openmetrics, wanted), results) or b""
        rest: object = _Fixed(self._rest(results))
        if wanted is not None:
            registry = CollectorRegistry(auto_describe=False, support_collectors_without_names=True)
            registry.register(rest)  # type: ignore[arg-type]
            rest = registry.restricted_registry(wanted)
        return head + encoder(rest), content_type
