"""Statistics, targets, tables and the machine description for the benchmark's results."""

from __future__ import annotations

import math
import os
import platform
import subprocess
from typing import Sequence

# name -> (figure key in the main point's results, comparison, threshold, what it means)
TARGETS = [
    ("scrape_p99", "ours_alone_scrape_p99_ms", "<", 5.0, "/metrics p99, ours alone (ms)"),
    ("vs_debian", "speedup_vs_debian", ">=", 100.0, "Debian exporter p50 / ours p50 (x)"),
    ("event_p50", "event_to_metrics_p50_ms", "<", 10.0, "completion event -> /metrics p50 (ms)"),
    ("idle_cpu", "idle_cpu_pct", "<", 2.0, "idle CPU (% of one core)"),
    ("poll_vs_floor", "poll_floor_ratio", "<=", 1.5, "poll cycle / RPC floor (x)"),
    ("rss", "rss_mib", "<", 60.0, "RSS (MiB)"),
    ("progress_age", "cursor_lag_upper_max_s", "<=", None, "cursor staleness max (s) vs poll interval"),
]


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def judge(figures: dict, poll_interval: float) -> list[dict]:
    verdicts = []
    for key, figure, op, threshold, what in TARGETS:
        if threshold is None:
            threshold = poll_interval
        value = figures.get(figure)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            ok = False
        elif op == "<":
            ok = value < threshold
        elif op == "<=":
            ok = value <= threshold
        else:
            ok = value >= threshold
        verdicts.append({"target": key, "figure": figure, "what": what, "op": op, "threshold": threshold,
                         "value": value, "pass": ok})
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


SCALE_COLUMNS = [
    ("disks", "disks", 0), ("domains", "domains", 0), ("active", "active_jobs", 0),
    ("host disks", "host_disks", 0),
    ("poll ms", "poll_cycle_ms", 2), ("floor ms", "floor_ms", 2), ("poll/floor", "poll_floor_ratio", 2),
    ("idle CPU %", "idle_cpu_pct", 2), ("floor CPU %", "floor_idle_cpu_pct", 2), ("RSS MiB", "rss_mib", 1),
    ("alone p50 ms", "ours_alone_scrape_p50_ms", 2), ("alone p99 ms", "ours_alone_scrape_p99_ms", 2),
    ("CPU/scrape ms", "ours_cpu_per_scrape_ms", 2),
    ("ours p50 ms", "ours_scrape_p50_ms", 2), ("ours p99 ms", "ours_scrape_p99_ms", 2),
    ("ours KiB gz/raw", None, 0),
    ("deb p50 ms", "debian_scrape_p50_ms", 1), ("deb p99 ms", "debian_scrape_p99_ms", 1),
    ("deb KiB gz/raw", None, 0),
    ("speedup p50", "speedup_vs_debian", 0),
    ("calls/cycle", "calls_per_cycle_total", 1),
    ("host busy %", "host_busy_pct_during_idle", 0),
]


def scale_table(points: Sequence[dict]) -> str:
    rows = []
    for p in points:
        row = []
        for header, key, digits in SCALE_COLUMNS:
            if header.startswith("ours KiB"):
                row.append(f"{_fmt(p.get('ours_wire_kib'), 1)}/{_fmt(p.get('ours_body_kib'), 1)}")
            elif header.startswith("deb KiB"):
                row.append(f"{_fmt(p.get('debian_wire_kib'), 1)}/{_fmt(p.get('debian_body_kib'), 1)}")
            else:
                value = p.get(key)
                row.append(_fmt(value, digits) if isinstance(value, float) else _fmt(value))
        rows.append(row)
    return table([c[0] for c in SCALE_COLUMNS], rows)


def summary_table(verdicts: Sequence[dict]) -> str:
    rows = [[v["what"], f"{v['op']} {_fmt(float(v['threshold']), 2)}", _fmt(v["value"], 3),
             "PASS" if v["pass"] else "MISS"] for v in verdicts]
    return table(["target (main point)", "goal", "measured", "verdict"], rows)


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
