"""Statistics, targets, tables and the machine description for the benchmark's results."""

from __future__ import annotations

import math
import os
import platform
import subprocess
from typing import Sequence

# (name, point, figure key, comparison, threshold, what it means). The point is "main" (the main
# point, budget on) or "largest" (the largest point, budget on). A threshold of None is the poll
# interval; a string is another figure of the same point.
TARGETS = [
    ("scrape_p99", "main", "ours_alone_scrape_p99_ms", "<", 5.0, "/metrics p99, ours alone (ms)"),
    ("vs_debian", "main", "speedup_vs_debian", ">=", 100.0, "Debian exporter p50 / ours p50 (x)"),
    ("event_p50", "main", "event_to_metrics_p50_ms", "<", 10.0, "completion event -> /metrics p50, kept-alive (ms)"),
    ("idle_cpu", "main", "idle_cpu_pct", "<", 2.0, "idle CPU (% of one core)"),
    ("poll_vs_floor", "main", "poll_floor_ratio", "<=", 1.5, "poll cycle / RPC floor (x)"),
    ("rss", "main", "rss_mib", "<", 60.0, "RSS (MiB)"),
    ("progress_age", "main", "cursor_lag_upper_max_s", "<=", None, "cursor staleness max (s) vs poll interval"),
    ("event_user_p50", "main", "event_user_p50_ms", "<", 20.0,
     "completion event -> /metrics p50, user's side (ms)"),
    ("discovery", "main", "discovery_seen_max_s", "<=", "discovery_deadline_s",
     "pull by hand seen (s) vs discovery interval + poll"),
    ("idle_cpu_largest", "largest", "idle_cpu_pct", "<", 1.0, "idle CPU (% of one core)"),
    ("libvirtd_largest", "largest", "libvirtd_added_cpu_pct", "<", 1.0, "libvirtd's added CPU (% of one core)"),
    ("idle_cpu_growth", "largest", "idle_cpu_growth", "<", 1.5, "idle CPU vs the main point's (x)"),
    ("discovery_largest", "largest", "discovery_seen_max_s", "<=", "discovery_deadline_s",
     "pull by hand seen (s) vs discovery interval + poll"),
]


def largest_on(points: Sequence[dict]) -> dict | None:
    """The row of the largest point with the call budget on."""
    on = [p for p in points if p.get("budget") == "on"]
    return max(on, key=lambda p: p["disks"]) if on else None


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def judge(points: Sequence[dict], poll_interval: float) -> list[dict]:
    """PASS or MISS for each target. The growth and discovery rows of the largest point are left
    out when it is the main point (discovery is checked there only when it is a larger one)."""
    main = next((p for p in points if p.get("main")), None)
    largest = largest_on(points)
    verdicts = []
    for key, where, figure, op, threshold, what in TARGETS:
        point = main if where == "main" else largest
        if point is None:
            continue
        if key in ("idle_cpu_growth", "discovery_largest") and point is main:
            continue
        if key.startswith("discovery") and figure not in point:  # not checked there (--discovery-checks 0)
            continue
        if threshold is None:
            threshold = poll_interval
        elif isinstance(threshold, str):
            threshold = point.get(threshold, math.nan)
        value = point.get(figure)
        if value is None or (isinstance(value, float) and math.isnan(value)) or math.isnan(threshold):
            ok = False
        elif op == "<":
            ok = value < threshold
        elif op == "<=":
            ok = value <= threshold
        else:
            ok = value >= threshold
        verdicts.append({"target": key, "figure": figure, "what": what, "op": op, "threshold": threshold,
                         "value": value, "pass": ok, "point": f"{point['disks']} disks, budget {point['budget']}"})
    return verdicts


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else _fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


COST_COLUMNS = [
    ("disks", "disks", 0), ("domains", "domains", 0), ("active", "active_jobs", 0),
    ("host disks", "host_disks", 0), ("budget", "budget", 0),
    ("blockJobInfo/s", "blockjobinfo_per_s", 0), ("calls/s", "calls_per_s", 0), ("discovery s", "discovery_interval_s", 0),
    ("idle CPU %", "idle_cpu_pct", 2), ("libvirtd +CPU %", "libvirtd_added_cpu_pct", 2),
    ("QEMU +CPU %", "qemu_added_cpu_pct", 2), ("floor CPU %", "floor_idle_cpu_pct", 2),
    ("poll ms", "poll_cycle_ms", 2), ("floor ms", "floor_ms", 2), ("poll/floor", "poll_floor_ratio", 2),
    ("RSS MiB", "rss_mib", 1), ("series", "series_count", 0), ("host busy %", "host_busy_pct_during_idle", 0),
]
SCRAPE_COLUMNS = [
    ("disks", "disks", 0), ("budget", "budget", 0),
    ("alone p50 ms", "ours_alone_scrape_p50_ms", 2), ("alone p99 ms", "ours_alone_scrape_p99_ms", 2),
    ("CPU/scrape ms", "ours_cpu_per_scrape_ms", 2),
    ("ours p50 ms", "ours_scrape_p50_ms", 2), ("ours p99 ms", "ours_scrape_p99_ms", 2),
    ("ours KiB gz/raw", ("ours_wire_kib", "ours_body_kib"), 1),
    ("deb p50 ms", "debian_scrape_p50_ms", 1), ("deb p99 ms", "debian_scrape_p99_ms", 1),
    ("deb KiB gz/raw", ("debian_wire_kib", "debian_body_kib"), 1),
    ("pairs", "scrapes_each", 0), ("speedup p50", "speedup_vs_debian", 0),
    ("calls/cycle", "calls_per_cycle_total", 1),
]


def _columns_table(points: Sequence[dict], columns) -> str:
    rows = []
    for p in points:
        row = []
        for _header, key, digits in columns:
            if isinstance(key, tuple):
                row.append("/".join(_fmt(p.get(k), digits) for k in key))
            else:
                value = p.get(key)
                row.append(_fmt(value, digits) if isinstance(value, float) else _fmt(value))
        rows.append(row)
    return table([c[0] for c in columns], rows)


def cost_table(points: Sequence[dict]) -> str:
    return _columns_table(points, COST_COLUMNS)


def scrape_table(points: Sequence[dict]) -> str:
    return _columns_table(points, SCRAPE_COLUMNS)


def summary_table(verdicts: Sequence[dict]) -> str:
    rows = [[v["what"], v["point"], f"{v['op']} {_fmt(float(v['threshold']), 2)}", _fmt(v["value"], 3),
             "PASS" if v["pass"] else "MISS"] for v in verdicts]
    return table(["target", "point", "goal", "measured", "verdict"], rows)


def machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_kib = 0
    try:
        with open("/proc/meminfo") as f:
            mem_kib = int(next(l for l in f if l.startswith("MemTotal:")).split()[1])
    except (OSError, StopIteration):
        pass
    info = {"nproc": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "mem_gib": round(mem_kib / 1024 / 1024, 1), "python": platform.python_version()}
    try:
        info["qemu_binary"] = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                                             text=True, timeout=10).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        pass
    return info


def version_string(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"
