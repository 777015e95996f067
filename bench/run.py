"""Benchmark: the exporter against the libvirt RPC floor and the Debian libvirt exporter.

On the real libvirtd + QEMU: grows a fleet of paused no-OS domains (some with a crawling pull)
through the scale points (200, 1,000 and 2,000 disks by default; the large points are 250
domains with several disks each), runs a fresh exporter at each point with its defaults (call
budget on) and again with ``--poll.call-budget 0`` (budget off), next to the Debian
``prometheus-libvirt-exporter``, and measures what the whole host pays (the exporter's idle CPU,
libvirtd's and QEMU's added CPU, calls per second, RSS), scrape latency and size, series, the
discovery interval, and the poll cycle against a bare ``blockJobInfo`` loop. At the main point
it also measures how fresh the progress is, how soon a completion event shows on /metrics (the
benchmark's own tight loop, and an external fresh-connection checker as a user sees it), and
how soon a pull started by hand is discovered. Every domain it made is removed at the end, also
on Ctrl-C and SIGTERM. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as bench/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report  # noqa: E402
from bench.fleet import Fleet  # noqa: E402
from bench.libvirt_probe import Probe  # noqa: E402
from bench.probes import (  # noqa: E402
    Checker,
    CPUWindow,
    DebianExporter,
    Metrics,
    OurExporter,
    cpu_seconds,
    debian_version,
    find_debian_exporter,
    libvirtd_pid,
    rss_bytes,
)
from bench.scraping import KeepAliveScraper, line_value, sample_value, scrape, series_count  # noqa: E402
from exporter.cli import DEFAULT_CALL_BUDGET  # noqa: E402

POLL_INTERVAL = 1.0  # the exporter's default; the benchmark runs it with its defaults
PROGRESS_BYTES_PER_S = 1024 * 1024  # tracked jobs move one 512 KiB chunk every 0.5 s
PROGRESS_TRACKED = 5  # sampled every 50 ms: 100 calls/s on top of the exporter's

_t0 = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - _t0:7.1f}s] {message}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="small run (20 domains, 5 active, scale 10/20/40, budget off only at 40, short "
                        "windows): about 2 minutes")
    p.add_argument("--domains", type=int, help="domains at the main point, one disk each (default 200; quick 20)")
    p.add_argument("--active", type=int, help="crawling pulls at every point (default 50; quick 5)")
    p.add_argument("--scale", help="disk counts to measure, comma-separated (--domains is added); up to "
                                   "--domains a point is that many one-disk domains, above it the fleet is "
                                   "re-made as up to --max-domains domains with several disks each "
                                   "(default 200,1000,2000; quick 10,20,40)")
    p.add_argument("--max-domains", type=int,
                   help="domains at the points above --domains (default 250: 1,000 disks = 250 x 4, "
                        "2,000 = 250 x 8; quick: --domains)")
    p.add_argument("--budget-off", choices=("all", "largest", "none"),
                   help="points also measured with --poll.call-budget 0 (default all; quick largest)")
    p.add_argument("--call-budget", type=int,
                   help=f"--poll.call-budget of the budget-on rows (default: the exporter's, {DEFAULT_CALL_BUDGET})")
    p.add_argument("--scrapes", type=int, help="scrapes of each exporter at the main point (default 300; quick 30)")
    p.add_argument("--scale-scrapes", type=int, help="scrapes of each at other rows (default 100; quick 20)")
    p.add_argument("--alternate-seconds", type=float,
                   help="outside the main row, alternating scrapes stop after this long (at least 10 "
                        "each): a Debian scrape takes ~5 ms per disk (default 120; 0: no limit)")
    p.add_argument("--cpu-window", type=float,
                   help="idle CPU window, and libvirtd's baseline window, in seconds (default 30; quick 2)")
    p.add_argument("--cycles", type=int, help="poll cycles compared with the floor per row (default 10; quick 3)")
    p.add_argument("--pulls", type=int,
                   help="short pulls timed event -> /metrics, for each of the two ways (default 12; quick 6)")
    p.add_argument("--progress-seconds", type=float, help="progress-age sampling time (default 20; quick 3)")
    p.add_argument("--discovery-checks", type=int,
                   help="pulls started by hand on random idle disks and timed until the exporter shows "
                        "them, at the main and the largest point, budget on (default 3; quick 2)")
    p.add_argument("--seed", type=int, help="random seed for the disks the discovery checks pick (default: random)")
    p.add_argument("--json", dest="json_path", default="bench-results.json",
                   help="where to write every figure (default ./bench-results.json)")
    p.add_argument("--uri", default=os.environ.get("LBJE_LIBVIRT_URI", "qemu:///system"))
    p.add_argument("--memory-mib", type=int, default=48, help="guest memory (paused guests never touch it)")
    p.add_argument("--data-mib", type=int, default=32, help="data in the shared base image")
    p.add_argument("--workers", type=int, default=8, help="domains created side by side")
    p.add_argument("--debian-exporter", help="path of prometheus-libvirt-exporter (default: find or fetch it)")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    quick = args.quick
    defaults = dict(domains=(200, 20), active=(50, 5), scale=("200,1000,2000", "10,20,40"),
                    max_domains=(250, None), budget_off=("all", "largest"),
                    scrapes=(300, 30), scale_scrapes=(100, 20), alternate_seconds=(120.0, 0.0),
                    cpu_window=(30.0, 2.0), cycles=(10, 3), pulls=(12, 6), progress_seconds=(20.0, 3.0),
                    discovery_checks=(3, 2))
    for key, (full, small) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if quick else full)
    if args.max_domains is None or args.max_domains < args.domains:
        args.max_domains = args.domains
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 32)
    args.scale_points = sorted({int(x) for x in str(args.scale).split(",") if x.strip()})
    if args.domains not in args.scale_points:
        args.scale_points = sorted(set(args.scale_points) | {args.domains})
    if not 0 < args.active <= args.domains:
        raise SystemExit("--active must be between 1 and --domains")
    if args.pulls < 1 or args.discovery_checks < 0:
        raise SystemExit("--pulls must be at least 1 and --discovery-checks at least 0")
    if 2 * args.pulls + args.discovery_checks > args.domains - args.active:
        raise SystemExit("2 x --pulls + --discovery-checks needs that many domains without an active job")
    if max(args.scale_points) > 26 * args.max_domains:
        raise SystemExit("at most 26 disks per domain")
    # Before libvirtd's baseline window, once the fleet changed: QEMU start-ups and the pulls the
    # fleet just began keep the 2-core host busy for a while (load average ~4 right after 100 new
    # domains), which shows in every CPU figure. Then again after the exporter is ready (its own
    # start-up, and the first reads of every disk).
    args.settle = 1.0 if quick else 15.0
    args.warmup = 1.0 if quick else 5.0
    return args


# ------------------------------------------------------------------------------------ measuring


class Ours:
    """Reads the exporter's own figures from raw exposition lines (cheap, no full parse)."""

    def __init__(self, exporter: OurExporter) -> None:
        self.exporter = exporter
        self.port = exporter.port

    def raw(self) -> bytes:
        return scrape(self.port, use_gzip=False).body

    def metrics(self) -> Metrics:
        return Metrics(self.raw())

    def health(self, body: bytes | None = None) -> dict:
        body = body if body is not None else self.raw()
        return {
            "cycles": line_value(body, b"libvirt_blockjob_poll_cycles_total ") or 0.0,
            "duration": line_value(body, b"libvirt_blockjob_poll_duration_seconds ") or 0.0,
            "last_poll": line_value(body, b"libvirt_blockjob_last_poll_timestamp_seconds ") or 0.0,
        }


def wait_ready(ours: Ours, fleet: Fleet, timeout: float = 90.0) -> Metrics:
    """Until the exporter has polled and sees every disk and active job of the fleet."""
    want_disks = fleet.disks
    want_jobs = {vm.name for vm in fleet.active}
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        m = ours.metrics()
        ours_names = {vm.name for vm in fleet.vms}  # not just the prefix: another run may share the host
        disks = [lbls for lbls in m.series("libvirt_blockjob_backing_chain_depth")
                 if dict(lbls)["domain"] in ours_names]
        jobs = {dict(lbls)["domain"] for lbls in m.series("libvirt_blockjob_cursor")}
        cycles = m.get("libvirt_blockjob_poll_cycles_total", 0.0)
        if m.get("libvirt_blockjob_up") == 1 and len(disks) == want_disks and want_jobs <= jobs and cycles >= 2:
            return m
        last = f"up={m.get('libvirt_blockjob_up')} disks={len(disks)}/{want_disks} " \
               f"jobs={len(want_jobs & jobs)}/{len(want_jobs)} cycles={cycles}"
        time.sleep(0.25)
    raise TimeoutError(f"exporter not ready after {timeout}s: {last}\n{ours.exporter.output()[-3000:]}")


def calls_delta(before: Metrics, after: Metrics) -> tuple[dict[str, float], float]:
    b = before.by_label("libvirt_blockjob_libvirt_calls_total", "method")
    a = after.by_label("libvirt_blockjob_libvirt_calls_total", "method")
    name = "libvirt_blockjob_poll_cycles_total"
    cycles = after.get(name, 0.0) - before.get(name, 0.0)
    per_cycle = {k: (a[k] - b.get(k, 0.0)) / cycles for k in sorted(a) if cycles > 0 and a[k] - b.get(k, 0.0) > 0}
    return per_cycle, cycles


def _host_cpu() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def host_cpu_window(window: float, qemu_pids: list[int]) -> dict:
    """libvirtd's and our QEMUs' CPU over ``window`` seconds with no exporter of ours running and
    nothing of the benchmark calling libvirt: the baseline their added CPU is measured against."""
    pid = libvirtd_pid()
    libvirtd, qemus = CPUWindow([pid] if pid else []).start(), CPUWindow(qemu_pids).start()
    time.sleep(window)
    figures = {"libvirtd_baseline_cpu_pct": libvirtd.stop(), "qemu_baseline_cpu_pct": qemus.stop(),
               "baseline_window_s": window}
    problems = [w.problem for w in (libvirtd, qemus) if w.problem] + ([] if pid else ["libvirtd not found"])
    if problems:
        figures["baseline_problems"] = problems
    return figures


def idle_cpu(ours: Ours, window: float, qemu_pids: list[int]) -> dict:
    """The exporter alone (no scrape, no floor) for ``window`` seconds: its CPU and RSS, and over
    the same window libvirtd's and our QEMUs' CPU, the calls it made and what it exports."""
    pid = ours.exporter.pid
    before = ours.metrics()
    host0 = _host_cpu()
    lv_pid = libvirtd_pid()
    libvirtd, qemus = CPUWindow([lv_pid] if lv_pid else []).start(), CPUWindow(qemu_pids).start()
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(window)
    cpu1, t1 = cpu_seconds(pid), time.monotonic()
    libvirtd_pct, qemu_pct = libvirtd.stop(), qemus.stop()
    host1 = _host_cpu()
    rss = rss_bytes(pid)
    body = ours.raw()
    after = Metrics(body)
    per_cycle, cycles = calls_delta(before, after)
    host_busy = 100.0 * (host1[0] - host0[0]) / max(1, host1[1] - host0[1])
    name = "libvirt_blockjob_libvirt_calls_total"
    bji = (after.get(name, 0.0, method="blockJobInfo") or 0.0) - (before.get(name, 0.0, method="blockJobInfo") or 0.0)
    figures = {"idle_cpu_pct": 100.0 * (cpu1 - cpu0) / (t1 - t0), "idle_window_s": t1 - t0,
               "host_busy_pct_during_idle": host_busy, "loadavg": open("/proc/loadavg").read().split()[:3],
               "rss_mib": rss / 1024 / 1024, "idle_calls_per_cycle": per_cycle, "idle_cycles": cycles,
               "blockjobinfo_per_s": bji / (t1 - t0), "calls_per_s": sum(per_cycle.values()) * cycles / (t1 - t0),
               "discovery_interval_s": after.get("libvirt_blockjob_discovery_interval_seconds", math.nan),
               "series_count": series_count(body), "libvirtd_cpu_pct": libvirtd_pct, "qemu_cpu_pct": qemu_pct}
    problems = [w.problem for w in (libvirtd, qemus) if w.problem] + ([] if lv_pid else ["libvirtd not found"])
    if problems:
        figures["idle_window_problems"] = problems
    return figures


def poll_vs_floor(ours: Ours, probe: Probe, cycles: int, pairs: list) -> dict:
    """Our last cycle's duration, then the bare floor loop over ``pairs`` in the gap before our
    next cycle, so the two never run at the same time; repeated ``cycles`` times."""
    probe.floor(pairs)  # warm: the first pass pays for lookups the exporter made at start
    durations, floors, errors = [], [], 0
    h = ours.health()
    for _ in range(cycles):
        target = h["last_poll"] + POLL_INTERVAL + 0.3  # the next cycle has ended by then
        time.sleep(max(0.0, target - time.time()))
        for _retry in range(60):
            new = ours.health()
            if new["cycles"] > h["cycles"]:
                break
            time.sleep(0.05)
        if new["cycles"] > h["cycles"]:  # else the cycle is late: no new duration to read
            durations.append(new["duration"])
        h = new
        seconds, failed = probe.floor(pairs)
        floors.append(seconds)
        errors += failed
    poll, floor = report.median(durations), report.median(floors)
    return {"poll_cycle_ms": poll * 1000, "floor_ms": floor * 1000,
            "poll_floor_ratio": poll / floor if floor else math.nan,
            "poll_cycle_samples_ms": [d * 1000 for d in durations],
            "floor_samples_ms": [f * 1000 for f in floors], "floor_disks": len(pairs),
            "floor_errors": errors, "floor_per_call_us": floor / max(1, len(pairs)) * 1e6}


def scrapes(ours: Ours, debian: DebianExporter, count: int, max_seconds: float = 0.0, at_least: int = 10) -> dict:
    """Alternating sequential scrapes, fresh connection each, gzip asked for (as Prometheus).
    With ``max_seconds``, no new pair starts after that long once ``at_least`` pairs are done: a
    Debian scrape takes seconds at 1,000 disks and more."""
    before = ours.metrics()
    mine, theirs = [], []
    mine_last = theirs_last = None
    debian_up = []
    started = time.monotonic()
    for n in range(count):
        if max_seconds and n >= at_least and time.monotonic() - started > max_seconds:
            break
        mine_last = scrape(ours.port)
        mine.append(mine_last.seconds)
        theirs_last = scrape(debian.port)
        theirs.append(theirs_last.seconds)
        debian_up.append(line_value(theirs_last.body, b"libvirt_up ") == 1.0)
    after = ours.metrics()
    per_cycle, cycles = calls_delta(before, after)
    figures = {
        "ours_scrape_p50_ms": report.median(mine) * 1000,
        "ours_scrape_p99_ms": report.percentile(mine, 99) * 1000,
        "ours_scrape_max_ms": max(mine) * 1000,
        "ours_wire_kib": mine_last.wire_bytes / 1024, "ours_body_kib": len(mine_last.body) / 1024,
        "debian_scrape_p50_ms": report.median(theirs) * 1000,
        "debian_scrape_p99_ms": report.percentile(theirs, 99) * 1000,
        "debian_wire_kib": theirs_last.wire_bytes / 1024, "debian_body_kib": len(theirs_last.body) / 1024,
        "debian_up_fraction": sum(debian_up) / len(debian_up),
        "scrapes_each": len(mine),
        "scrape_window_calls_per_cycle": per_cycle, "scrape_window_cycles": cycles,
    }
    figures["speedup_vs_debian"] = figures["debian_scrape_p50_ms"] / figures["ours_scrape_p50_ms"]
    figures["speedup_vs_debian_p99"] = figures["debian_scrape_p99_ms"] / figures["ours_scrape_p99_ms"]
    return figures


def scrapes_alone(ours: Ours, count: int, idle_cpu_pct: float, gap: float = 0.05) -> dict:
    """Ours only, same kind of scrape, ``gap`` apart so that they spread over poll cycles.

    Alternating with the Debian exporter measures both under the load that exporter puts on
    libvirtd and on every QEMU (a second or more of work per scrape at 200 domains); these
    scrapes measure ours on the host as it is without that."""
    times = []
    cpu0, t0 = cpu_seconds(ours.exporter.pid), time.monotonic()
    for _ in range(count):
        times.append(scrape(ours.port).seconds)
        time.sleep(gap)
    cpu1, t1 = cpu_seconds(ours.exporter.pid), time.monotonic()
    # The exporter's CPU per scrape, net of what it spends idle (polling) meanwhile: unlike the
    # latency, this does not grow when other work on the host delays the exporter.
    per_scrape = ((cpu1 - cpu0) - idle_cpu_pct / 100.0 * (t1 - t0)) / count
    return {"ours_cpu_per_scrape_ms": per_scrape * 1000,
            "ours_alone_scrape_p50_ms": report.median(times) * 1000,
            "ours_alone_scrape_p99_ms": report.percentile(times, 99) * 1000,
            "ours_alone_scrape_max_ms": max(times) * 1000}


def progress_age(ours: Ours, probe: Probe, fleet: Fleet, seconds: float) -> dict:
    """Moves a few crawling jobs at 1 MiB/s and samples our cursors against the live ones.

    * age: wall time at the scrape minus ``libvirt_blockjob_last_poll_timestamp_seconds``;
    * lag: for a cursor that differs from libvirt's, how long ago the benchmark (sampling the live
      cursor every 50 ms on its own connection) first saw libvirt past our value (0 if not yet);
      ``lag_upper`` bounds it from above: since the last live sample at or below our value.
    """
    tracked = fleet.active[:PROGRESS_TRACKED]
    handles = {vm.name: probe.handle(vm.name) for vm in tracked}
    history: dict[str, list[tuple[float, int]]] = {name: [] for name in handles}
    stop = threading.Event()

    def sample_live() -> None:
        while not stop.is_set():
            for name, dom in handles.items():
                cur = probe.cursor(dom, "vda")
                history[name].append((time.monotonic(), cur if cur is not None else -1))
            stop.wait(0.05)

    fleet.set_bandwidth(tracked, PROGRESS_BYTES_PER_S)
    sampler = threading.Thread(target=sample_live, name="bench-live-cursors", daemon=True)
    sampler.start()
    ages, lags, uppers, mismatches, samples, missing = [], [], [], 0, 0, 0
    try:
        time.sleep(1.5)  # history first, and let the jobs start moving
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            body = scrape(ours.port, use_gzip=False).body
            t_mono, t_wall = time.monotonic(), time.time()
            m = Metrics(body)
            ages.append(t_wall - m.get("libvirt_blockjob_last_poll_timestamp_seconds", 0.0))
            cursors = {dict(l)["domain"]: v for l, v in m.series("libvirt_blockjob_cursor").items()
                       if dict(l)["disk"] == "vda"}
            missing += sum(1 for vm in fleet.active if vm.name not in cursors)
            for name in handles:
                ours_cur = cursors.get(name)
                seen = [h for h in list(history[name]) if h[0] <= t_mono]
                if ours_cur is None or not seen:
                    continue
                samples += 1
                beyond = [t for t, cur in seen if cur > ours_cur]
                at_or_below = [t for t, cur in seen if 0 <= cur <= ours_cur]
                lag = t_mono - beyond[0] if beyond else 0.0
                mismatches += bool(beyond)
                lags.append(lag)
                if at_or_below:
                    uppers.append(t_mono - at_or_below[-1])
            time.sleep(0.2)
    finally:
        stop.set()
        sampler.join(5)
        fleet.set_bandwidth(tracked, 1)
    moved = {name: (h[-1][1] - h[0][1]) if h else 0 for name, h in history.items()}
    return {
        "progress_age_max_s": max(ages) if ages else math.nan,
        "progress_age_p50_s": report.median(ages),
        "progress_samples": len(ages),
        "cursor_lag_max_s": max(lags) if lags else math.nan,
        "cursor_lag_upper_max_s": max(uppers) if uppers else math.nan,
        "cursor_comparisons": samples, "cursor_behind_live": mismatches,
        "active_jobs_missing_from_metrics": missing,
        "tracked_jobs": len(tracked), "tracked_bytes_moved_min": min(moved.values()) if moved else 0,
    }


def event_latency(ours: Ours, probe: Probe, vms: list) -> dict:
    """Short unlimited pulls, one at a time: the benchmark's own BLOCK_JOB_2 callback time to the
    first scrape response (tight loop, kept-alive connection) showing the completion counter."""
    import vmlib  # fleet put tests/ on sys.path

    latencies, durations, request_times = [], [], []
    watcher = KeepAliveScraper(ours.port)
    old_switch = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)  # let the event thread run promptly next to the tight loop
    try:
        for vm in vms:
            labels = {"domain": vm.name, "disk": "vda", "job_type": "pull"}
            before = sample_value(watcher.get(), "libvirt_blockjob_completed_total", **labels) or 0.0
            started = time.monotonic()
            vmlib.start_pull(vm, "vda")
            seen = None
            deadline = started + 30
            while time.monotonic() < deadline:
                asked = time.monotonic()
                body = watcher.get()
                now = time.monotonic()
                request_times.append(now - asked)
                value = sample_value(body, "libvirt_blockjob_completed_total", **labels)
                if value is not None and value > before:
                    seen = now
                    break
            if seen is None:
                raise TimeoutError(f"completion of the pull on {vm.name} never showed on /metrics")
            end = probe.wait_end(vm.name, "vda", after=started)
            latencies.append(seen - end.monotonic)
            durations.append(end.monotonic - started)
            time.sleep(0.2)
    finally:
        sys.setswitchinterval(old_switch)
        watcher.close()
    return {
        "event_to_metrics_p50_ms": report.median(latencies) * 1000,
        "event_to_metrics_max_ms": max(latencies) * 1000,
        "event_to_metrics_min_ms": min(latencies) * 1000,
        "event_to_metrics_samples_ms": [x * 1000 for x in latencies],
        "event_pulls": len(latencies),
        "pull_seconds_p50": report.median(durations),
        "keepalive_scrape_p50_ms": report.median(request_times) * 1000,
        "keepalive_scrapes": len(request_times),
    }


def event_latency_user(ours: Ours, probe: Probe, vms: list) -> dict:
    """The same as a user sees it: short unlimited pulls, one at a time; libvirt's BLOCK_JOB_2 as
    seen on the benchmark's own read-only connection (its event thread, otherwise idle), to the
    first response showing the completion counter in an external checker's loop (another
    process: fresh TCP connection per scrape, gzip, back to back, Python's default switch
    interval).

    Besides the latency, what it is made of, for each pull: the duration of the scrape that
    showed the counter, how long after the event that scrape started (negative: it was already
    under way and still showed it) and how many scrapes started after the event (1: the first
    one showed it; more: the exporter had not applied the event yet); and over every scrape of
    the loops, a scrape's duration and the gap between two (the checker decompressing and
    searching the body)."""
    import vmlib  # fleet put tests/ on sys.path

    checker = Checker(ours.port)
    latencies, showing, start_after_event, durations, gaps, scrapes_after = [], [], [], [], [], []
    try:
        for vm in vms:
            labels = {"domain": vm.name, "disk": "vda", "job_type": "pull"}
            checker.watch("libvirt_blockjob_completed_total", labels, timeout=30.0)
            started = time.monotonic()
            vmlib.start_pull(vm, "vda")
            reply = checker.seen()
            end = probe.wait_end(vm.name, "vda", after=started)
            latencies.append(reply["seen"] - end.monotonic)
            showing.append(reply["seen"] - reply["started"])
            scrapes_after.append(sum(1 for a, _b in reply["spans"] if a >= end.monotonic))
            start_after_event.append(reply["started"] - end.monotonic)
            spans = reply["spans"]
            durations.extend(b - a for a, b in spans)
            gaps.extend(spans[i + 1][0] - spans[i][1] for i in range(len(spans) - 1))
            time.sleep(0.2)
    finally:
        checker.stop()
    ms = 1000.0
    return {
        "event_user_p50_ms": report.median(latencies) * ms,
        "event_user_max_ms": max(latencies) * ms,
        "event_user_min_ms": min(latencies) * ms,
        "event_user_samples_ms": [x * ms for x in latencies],
        "event_user_pulls": len(latencies),
        "event_user_showing_scrape_p50_ms": report.median(showing) * ms,
        "event_user_start_after_event_p50_ms": report.median(start_after_event) * ms,
        "event_user_start_after_event_samples_ms": [x * ms for x in start_after_event],
        "event_user_scrapes_started_after_event": scrapes_after,
        "fresh_scrape_p50_ms": report.median(durations) * ms,
        "fresh_scrape_p99_ms": report.percentile(durations, 99) * ms,
        "fresh_scrape_gap_p50_ms": report.median(gaps) * ms,
        "fresh_scrapes": len(durations),
    }


def discovery(ours: Ours, candidates: list, checks: int, rng: random.Random) -> dict:
    """Pulls started by hand (virsh, crawling at 1 byte/s) on idle disks picked at random, one at
    a time: how long until the exporter shows the job (its ``cursor_end`` series), against the
    discovery interval it exports plus one poll interval. Every pull is aborted at once."""
    import vmlib  # fleet put tests/ on sys.path

    picks = rng.sample(candidates, min(checks, len(candidates)))
    checks_out = []
    for vm, disk in picks:
        labels = {"domain": vm.name, "disk": disk, "job_type": "pull"}
        body = ours.raw()
        interval = line_value(body, b"libvirt_blockjob_discovery_interval_seconds ") or math.nan
        if sample_value(body, "libvirt_blockjob_cursor_end", **labels) is not None:
            raise RuntimeError(f"{vm.name}/{disk} already has a job on /metrics")
        timeout = 3 * (interval if math.isfinite(interval) else 60.0) + 30.0
        asked = time.monotonic()
        vmlib.start_pull(vm, disk, bandwidth_bytes=1)
        started = time.monotonic()
        try:
            seen = None
            while time.monotonic() - started < timeout:
                body = scrape(ours.port, use_gzip=False).body
                if sample_value(body, "libvirt_blockjob_cursor_end", **labels) is not None:
                    seen = time.monotonic()
                    break
                time.sleep(0.02)
        finally:
            vmlib.abort(vm, disk)
        if seen is None:
            raise TimeoutError(f"the pull started on {vm.name}/{disk} never showed on /metrics in {timeout:.0f}s")
        deadline = interval + POLL_INTERVAL
        checks_out.append({"domain": vm.name, "disk": disk, "seen_s": seen - started,
                           "virsh_s": started - asked, "interval_s": interval, "deadline_s": deadline,
                           "within": seen - started <= deadline})
        # Until the exporter has dropped the aborted job, so the next check starts clean.
        drop_deadline = time.monotonic() + 10
        while time.monotonic() < drop_deadline and sample_value(
                ours.raw(), "libvirt_blockjob_cursor_end", **labels) is not None:
            time.sleep(0.1)
    seen = [c["seen_s"] for c in checks_out]
    return {
        "discovery_checks": checks_out,
        "discovery_seen_max_s": max(seen) if seen else math.nan,
        "discovery_seen_p50_s": report.median(seen),
        "discovery_deadline_s": min((c["deadline_s"] for c in checks_out), default=math.nan),
        "discovery_all_within": all(c["within"] for c in checks_out) if checks_out else False,
    }


def discovery_candidates(fleet: Fleet, exclude: set[str]) -> list:
    """(domain, disk) of every disk of ours without a job whose backing chain is still whole
    (not on a domain the event pulls flattened), for ``discovery`` to pick from."""
    active = {vm.name for vm in fleet.active}
    return [(vm, disk) for vm in fleet.vms if vm.name not in exclude
            for disk in sorted(vm.disks) if not (disk == "vda" and vm.name in active)]


def measure_point(fleet: Fleet, probe: Probe, debian: DebianExporter, args, *, main: bool, budget: int | None,
                  settle: float, discovery_checks: int, rng: random.Random) -> dict:
    """One row: a fresh exporter with ``--poll.call-budget budget`` (None: its default)."""
    qemu_pids = fleet.qemu_pids()
    time.sleep(settle)
    log(f"  libvirtd's baseline over {args.cpu_window:.0f}s (no exporter of ours)")
    baseline = host_cpu_window(args.cpu_window, qemu_pids)
    ours_proc = OurExporter(args.uri, budget)
    try:
        ours_proc.wait_serving()
        ours = Ours(ours_proc)
        m = wait_ready(ours, fleet)
        figures = {
            "disks": fleet.disks, "domains": len(fleet.vms), "active_jobs": len(fleet.active),
            "host_disks": int(m.get("libvirt_blockjob_disks", 0.0)),
            "host_domains": int(m.get("libvirt_blockjob_domains", 0.0)),
            "host_active_jobs": int(m.get("libvirt_blockjob_active_jobs", 0.0)),
            "main": main, "budget": "off" if budget == 0 else "on",
            "call_budget": DEFAULT_CALL_BUDGET if budget is None else budget,
        }
        figures.update(baseline)
        time.sleep(args.warmup)
        log(f"  idle CPU over {args.cpu_window:.0f}s")
        figures.update(idle_cpu(ours, args.cpu_window, qemu_pids))
        figures["libvirtd_added_cpu_pct"] = figures["libvirtd_cpu_pct"] - figures["libvirtd_baseline_cpu_pct"]
        figures["qemu_added_cpu_pct"] = figures["qemu_cpu_pct"] - figures["qemu_baseline_cpu_pct"]
        figures["libvirtd_us_per_call"] = (figures["libvirtd_added_cpu_pct"] / 100.0 / figures["blockjobinfo_per_s"]
                                           * 1e6 if figures["blockjobinfo_per_s"] else math.nan)
        per_cycle = figures["idle_calls_per_cycle"]
        figures["calls_per_cycle_total"] = sum(per_cycle.values())
        figures["blockjobinfo_per_cycle"] = per_cycle.get("blockJobInfo", 0.0)
        pairs = probe.host_disks()
        if budget != 0:  # the floor makes as many calls as the exporter does per cycle
            pairs, _with_job = probe.floor_pairs(pairs, figures["blockjobinfo_per_cycle"])
        log(f"  the floor's CPU over {args.cpu_window:.0f}s ({len(pairs)} calls per pass)")
        figures.update(probe.floor_cpu(pairs, args.cpu_window, POLL_INTERVAL))
        figures["idle_cpu_vs_floor"] = figures["idle_cpu_pct"] / figures["floor_idle_cpu_pct"] \
            if figures["floor_idle_cpu_pct"] else math.nan
        log("  poll cycle vs RPC floor")
        figures.update(poll_vs_floor(ours, probe, args.cycles, pairs))
        n = args.scrapes if main else args.scale_scrapes
        cap = 0.0 if main else args.alternate_seconds
        log(f"  {n} scrapes of each exporter, alternating" + (f" (at most ~{cap:.0f}s)" if cap else ""))
        figures.update(scrapes(ours, debian, n, cap))
        log(f"  {n} scrapes of ours alone")
        figures.update(scrapes_alone(ours, n, figures["idle_cpu_pct"]))
        figures["rss_after_scrapes_mib"] = rss_bytes(ours_proc.pid) / 1024 / 1024
        # Calls the scrape window made beyond what the same number of idle cycles made: scrapes
        # cost libvirt nothing, so this is ~0 (inventory refreshes every 30 s add noise).
        scrape_calls = figures["scrape_window_calls_per_cycle"]
        figures["scrape_window_extra_calls_per_cycle"] = (
            sum(scrape_calls.values()) - figures["calls_per_cycle_total"])
        used: set[str] = set()
        if main:
            log(f"  progress age for {args.progress_seconds:.0f}s")
            figures.update(progress_age(ours, probe, fleet, args.progress_seconds))
            idle = fleet.idle_vms()
            kept_alive, fresh = idle[:args.pulls], idle[args.pulls:2 * args.pulls]
            used = {vm.name for vm in kept_alive + fresh}
            log(f"  event -> /metrics over {args.pulls} pulls (kept-alive tight loop)")
            figures.update(event_latency(ours, probe, kept_alive))
            log(f"  event -> /metrics over {args.pulls} pulls (external fresh-connection checker)")
            figures.update(event_latency_user(ours, probe, fresh))
        if discovery_checks:
            log(f"  discovery: {discovery_checks} pulls started by hand on random idle disks "
                f"(exported interval {figures['discovery_interval_s']:.0f}s)")
            figures.update(discovery(ours, discovery_candidates(fleet, used), discovery_checks, rng))
        if main:
            figures["rss_end_mib"] = rss_bytes(ours_proc.pid) / 1024 / 1024
        figures["exporter_errors_logged"] = sum(1 for line in ours_proc.output().splitlines()
                                                if " ERROR " in line or "Traceback" in line)
        return figures
    finally:
        ours_proc.stop()
        ours_proc.remove_log()


# ------------------------------------------------------------------------------------ main


class _Terminated(BaseException):
    pass


_terminating = False


def _on_term(signum, _frame) -> None:
    """SIGTERM/SIGHUP unwind to main()'s ``finally``, which removes the domains side by side
    through vmlib (its own handler would remove them one by one, ~2 s each). Only once: a second
    signal must not break off the cleanup it started."""
    global _terminating
    if _terminating:
        return
    _terminating = True
    raise _Terminated(signum)


def _handle_termination() -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_term)


def main(argv=None) -> int:
    args = resolve(build_parser().parse_args(argv))
    _handle_termination()
    if os.geteuid() != 0:
        print("the benchmark needs root (qemu:///system, images under /var/lib/libvirt/images)", file=sys.stderr)
        return 2

    results: dict = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {k: v for k, v in vars(args).items() if k != "scale"},
        "machine": report.machine(),
        "notes": {
            "scrapes": "sequential, a fresh TCP connection per scrape (keep-alive off, like Prometheus' "
                       "first request), Accept-Encoding: gzip; alternating ours/Debian",
            "floor": "bare Python loop of blockJobInfo(disk, BANDWIDTH_BYTES), own read-only connection, "
                     "libvirt's event loop running and held still during the pass (as the exporter's poll "
                     "cycle holds it), run between two of our poll cycles; over every running disk of the "
                     "host with the budget off, over as many disks as the exporter reads per cycle with it "
                     "on (every disk with a job, then others)",
            "idle_cpu": "utime+stime from /proc/PID/stat over the window, no scrapes, % of one core",
            "floor_idle_cpu": "the floor loop once per poll interval over the same window length, "
                              "CPU of the whole benchmark process (idle otherwise), % of one core",
            "libvirtd_added_cpu": "libvirtd's utime+stime over the idle window minus over an equal window "
                                  "just before, with no exporter of ours running and nothing of the benchmark "
                                  "calling libvirt; % of one core (qemu_added_cpu: the same for our QEMUs)",
            "blockjobinfo_per_s": "delta of libvirt_blockjob_libvirt_calls_total{method=blockJobInfo} over the "
                                  "idle window / its length",
            "calls_per_s": "the same for every method (blockJobInfo, XMLDesc, listAllDomains, ...)",
            "series_count": "samples in one uncompressed scrape after the idle window",
            "event_latency": "benchmark's own BLOCK_JOB_2 callback -> first /metrics response with the "
                             "completion counter incremented (tight loop, kept-alive connection, "
                             "sys.setswitchinterval(0.0005))",
            "event_user": "BLOCK_JOB_2 on the benchmark's own read-only connection (its event thread, "
                          "otherwise idle) -> first response showing the counter in an external checker "
                          "process scraping back to back, a new TCP connection per scrape, gzip",
            "discovery": "virsh blockpull --bandwidth 1 --bytes on a random idle disk -> first fresh "
                         "scrape (every ~20 ms) with its cursor_end series; deadline: the exported "
                         "discovery interval + one poll interval",
        },
        "points": [],
    }
    fleet = probe = debian = None
    exit_code = 1
    try:
        binary = args.debian_exporter or find_debian_exporter(log)
        probe = Probe(args.uri)
        results["machine"]["libvirt"] = report.version_string(probe.conn.getLibVersion())
        results["machine"]["qemu"] = report.version_string(probe.conn.getVersion())
        results["machine"]["debian_exporter"] = f"{binary} {debian_version()}"
        log(f"libvirt {results['machine']['libvirt']}, QEMU {results['machine']['qemu']}; "
            f"Debian exporter {binary}")
        fleet = Fleet(memory_mib=args.memory_mib, data_mib=args.data_mib, workers=args.workers, log=log)
        _handle_termination()  # again: vmlib installed its handlers when the fleet made its first file
        results["machine"]["domain_type"] = fleet.domain_type
        debian = DebianExporter(binary, args.uri)
        debian.wait_serving()
        stride = max(1, args.domains // args.active)
        rng = random.Random(args.seed)
        largest = max(args.scale_points)
        for point in args.scale_points:
            count = min(args.max_domains, point)
            if point <= count and fleet.disks == len(fleet.vms):  # one disk per domain: grow
                took = fleet.grow(point, args.active, stride)
                log(f"{len(fleet.vms)} domains ({len(fleet.active)} with a crawling pull) in {took:.1f}s")
            else:
                took = fleet.rebuild(point, args.active, count)
                log(f"{len(fleet.vms)} domains re-made with {fleet.disks} disks "
                    f"({len(fleet.active)} with a crawling pull) in {took:.1f}s")
            main_point = point == args.domains
            budgets: list[int | None] = [args.call_budget]
            if args.budget_off == "all" or (args.budget_off == "largest" and point == largest):
                budgets.append(0)
            for n, budget in enumerate(budgets):
                on = budget != 0
                log(f"point: {fleet.disks} disks on {len(fleet.vms)} domains, budget {'on' if on else 'off'}"
                    f"{' (main)' if main_point and on else ''}")
                checks = args.discovery_checks if on and (main_point or (point == largest and point > args.domains)) else 0
                figures = measure_point(fleet, probe, debian, args, main=main_point and on, budget=budget,
                                        settle=args.settle if n == 0 else args.warmup,
                                        discovery_checks=checks, rng=rng)
                results["points"].append(figures)
                log(f"  calls {figures['blockjobinfo_per_s']:.0f}/s, discovery {figures['discovery_interval_s']:.0f}s, "
                    f"idle CPU {figures['idle_cpu_pct']:.2f}% (floor {figures['floor_idle_cpu_pct']:.2f}%), "
                    f"libvirtd +{figures['libvirtd_added_cpu_pct']:.2f}%, "
                    f"poll {figures['poll_cycle_ms']:.1f} ms vs floor {figures['floor_ms']:.1f} ms, "
                    f"RSS {figures['rss_mib']:.1f} MiB, {figures['series_count']} series, "
                    f"scrape p99 {figures['ours_alone_scrape_p99_ms']:.2f} ms alone, "
                    f"{figures['ours_scrape_p99_ms']:.2f} ms vs {figures['debian_scrape_p99_ms']:.1f} ms alternating")
        exit_code = 0
    except (KeyboardInterrupt, _Terminated) as err:
        log(f"interrupted ({type(err).__name__}); cleaning up")
        results["interrupted"] = True
        exit_code = 130
    except Exception as err:  # noqa: BLE001 - reported, cleaned up, and the figures so far kept
        import traceback

        traceback.print_exc()
        results["error"] = f"{type(err).__name__}: {err}"
        exit_code = 1
    finally:
        # Nothing may break off the cleanup: Ctrl-C is ignored from here (virsh inherits that).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if debian is not None:
            debian.stop()
            debian.remove_log()
        if fleet is not None:
            log(f"removing {len(fleet.factory.names)} domains")
            problems = fleet.cleanup()
            results["cleanup_problems"] = problems
            results["leftover_domains"] = fleet.leftovers()
            results["domains_created"] = len(set(fleet.created))
            for problem in problems:
                log(f"cleanup: {problem}")
        if probe is not None:
            probe.close()

    main_figures = next((p for p in results["points"] if p.get("main")), None)
    largest_on = report.largest_on(results["points"])
    if main_figures is not None and largest_on not in (None, main_figures) and main_figures.get("idle_cpu_pct"):
        largest_on["idle_cpu_growth"] = largest_on["idle_cpu_pct"] / main_figures["idle_cpu_pct"]
    if main_figures is not None:
        results["main"] = main_figures
        results["targets"] = report.judge(results["points"], POLL_INTERVAL)
    results["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    Path(args.json_path).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")

    m = results["machine"]
    print(f"\nmachine: {m.get('nproc')} x {m.get('cpu_model')}, {m.get('mem_gib')} GiB, kernel {m.get('kernel')}, "
          f"libvirt {m.get('libvirt')}, QEMU {m.get('qemu')} ({m.get('domain_type')}), "
          f"Debian exporter {m.get('debian_exporter')}")
    if results["points"]:
        print("\nwhole-host cost (fresh exporter per row, default 1 s poll; budget on: --poll.call-budget "
              f"{results['points'][0]['call_budget']}, off: 0; idle windows of {args.cpu_window:.0f} s):")
        print(report.cost_table(results["points"]))
        print("\nscrapes (new connection, gzip; 'alone' 50 ms apart, the others alternating with Debian's):")
        print(report.scrape_table(results["points"]))
    if main_figures is not None:
        mf = main_figures
        print(f"\nmain point: {mf['domains']} domains, {mf['disks']} disks, {mf['active_jobs']} active jobs "
              f"(host: {mf['host_domains']} domains, {mf['host_disks']} disks, {mf['host_active_jobs']} jobs)")
        if "event_to_metrics_p50_ms" in mf:
            print(f"event -> /metrics, kept-alive tight loop: p50 {mf['event_to_metrics_p50_ms']:.2f} ms, "
                  f"max {mf['event_to_metrics_max_ms']:.2f} ms over {mf['event_pulls']} pulls "
                  f"(a kept-alive scrape: p50 {mf['keepalive_scrape_p50_ms']:.2f} ms)")
        if "event_user_p50_ms" in mf:
            print(f"event -> /metrics, user's side (external checker, new connection per scrape): p50 "
                  f"{mf['event_user_p50_ms']:.2f} ms, max {mf['event_user_max_ms']:.2f} ms over "
                  f"{mf['event_user_pulls']} pulls; a fresh scrape p50 {mf['fresh_scrape_p50_ms']:.2f} ms "
                  f"(p99 {mf['fresh_scrape_p99_ms']:.2f}), gap between scrapes p50 "
                  f"{mf['fresh_scrape_gap_p50_ms']:.2f} ms, the showing scrape started "
                  f"{mf['event_user_start_after_event_p50_ms']:.2f} ms after the event (p50)")
        if "progress_age_max_s" in mf:
            print(f"progress age max {mf['progress_age_max_s']:.3f} s, cursor lag max "
                  f"{mf['cursor_lag_max_s']:.3f} s (upper bound {mf['cursor_lag_upper_max_s']:.3f} s)")
        for point in results["points"]:
            for check in point.get("discovery_checks", []):
                print(f"discovery at {point['disks']} disks: {check['domain']}/{check['disk']} seen after "
                      f"{check['seen_s']:.2f} s (exported interval {check['interval_s']:.0f} s, deadline "
                      f"{check['deadline_s']:.0f} s: {'within' if check['within'] else 'LATE'})")
        print("\n" + report.summary_table(results["targets"]))
    print(f"\nleftover domains: {results.get('leftover_domains', [])}; figures in {args.json_path}")
    if results.get("leftover_domains") or results.get("cleanup_problems"):
        return exit_code or 3
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
