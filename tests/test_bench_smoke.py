"""The benchmark's quick mode runs end to end on the real stack and reports every figure.

Only that the figures are there: speed targets are met (or missed) in the benchmark itself, never
asserted in a timed test.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.cli import DEFAULT_CALL_BUDGET

REPO = Path(__file__).resolve().parent.parent

POINT_FIGURES = [
    "disks", "domains", "active_jobs", "host_disks", "host_domains", "call_budget",
    "poll_cycle_ms", "floor_ms", "poll_floor_ratio", "floor_disks", "floor_per_call_us",
    "idle_cpu_pct", "floor_idle_cpu_pct", "idle_cpu_vs_floor", "rss_mib", "rss_after_scrapes_mib",
    "host_busy_pct_during_idle",
    "libvirtd_cpu_pct", "libvirtd_baseline_cpu_pct", "libvirtd_added_cpu_pct",
    "qemu_cpu_pct", "qemu_baseline_cpu_pct", "qemu_added_cpu_pct",
    "blockjobinfo_per_s", "calls_per_s", "discovery_interval_s", "series_count",
    "ours_scrape_p50_ms", "ours_scrape_p99_ms", "ours_alone_scrape_p50_ms", "ours_alone_scrape_p99_ms",
    "ours_wire_kib", "ours_body_kib", "ours_cpu_per_scrape_ms",
    "debian_scrape_p50_ms", "debian_scrape_p99_ms", "debian_wire_kib", "debian_body_kib",
    "speedup_vs_debian", "speedup_vs_debian_p99",
    "calls_per_cycle_total", "blockjobinfo_per_cycle", "scrape_window_extra_calls_per_cycle",
]
MAIN_FIGURES = [
    "progress_age_max_s", "progress_age_p50_s", "cursor_lag_max_s", "cursor_lag_upper_max_s",
    "event_to_metrics_p50_ms", "event_to_metrics_max_ms", "keepalive_scrape_p50_ms",
    "event_user_p50_ms", "event_user_max_ms", "event_user_showing_scrape_p50_ms",
    "event_user_start_after_event_p50_ms", "fresh_scrape_p50_ms", "fresh_scrape_gap_p50_ms",
    "discovery_seen_max_s", "discovery_deadline_s", "rss_end_mib",
]
# A libvirtd restarted by another test run on a shared host spoils a CPU window (NaN, reported).
MAY_BE_NAN = {"libvirtd_cpu_pct", "libvirtd_baseline_cpu_pct", "libvirtd_added_cpu_pct"}


@pytest.mark.libvirt
@pytest.mark.timeout(300)
def test_quick_benchmark_reports_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "bench", "--quick", "--json", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    results = json.loads(out.read_text())
    assert results["leftover_domains"] == [] and results["cleanup_problems"] == []
    assert "error" not in results and not results.get("interrupted")

    # Quick: the budget-off row only at the largest point.
    assert [(p["disks"], p["budget"]) for p in results["points"]] == [
        (10, "on"), (20, "on"), (40, "on"), (40, "off")]
    assert [p["domains"] for p in results["points"]] == [10, 20, 20, 20]
    assert [p["call_budget"] for p in results["points"]][-2:] == [DEFAULT_CALL_BUDGET, 0]
    for point in results["points"]:
        for figure in POINT_FIGURES:
            value = point.get(figure)
            assert isinstance(value, (int, float)), (point["disks"], figure, value)
            assert math.isfinite(value) or figure in MAY_BE_NAN, (point["disks"], figure, value)
        # The default budget covers every disk of these small points every cycle.
        assert point["blockjobinfo_per_cycle"] >= point["disks"]
        assert point["idle_calls_per_cycle"]["blockJobInfo"] > 0
        assert point["discovery_interval_s"] == 1.0
        assert point["series_count"] > point["disks"]
    main = results["main"]
    assert main["disks"] == 20 and main["active_jobs"] == 5 and main["budget"] == "on"
    for figure in MAIN_FIGURES:
        value = main.get(figure)
        assert isinstance(value, (int, float)) and math.isfinite(value), (figure, value)
    assert main["event_pulls"] == 6 and main["event_user_pulls"] == 6 and main["progress_samples"] > 5
    assert main["active_jobs_missing_from_metrics"] == 0
    largest = results["points"][2]
    assert len(main["discovery_checks"]) == 2 and len(largest["discovery_checks"]) == 2
    assert "discovery_checks" not in results["points"][3]  # budget off: not checked

    targets = {t["target"]: t for t in results["targets"]}
    assert set(targets) == {"scrape_p99", "vs_debian", "event_p50", "idle_cpu", "poll_vs_floor", "rss",
                            "progress_age", "event_user_p50", "discovery", "idle_cpu_largest",
                            "libvirtd_largest", "idle_cpu_growth", "discovery_largest"}
    assert all(isinstance(t["pass"], bool) and t["value"] is not None for t in targets.values()
               if t["target"] != "idle_cpu_growth")  # None when the main point's idle CPU rounds to 0
    for key in ("nproc", "cpu_model", "kernel", "libvirt", "qemu", "debian_exporter"):
        assert results["machine"].get(key), key
    assert "PASS" in run.stdout or "MISS" in run.stdout
