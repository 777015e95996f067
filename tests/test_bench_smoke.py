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

REPO = Path(__file__).resolve().parent.parent

POINT_FIGURES = [
    "disks", "domains", "active_jobs", "host_disks", "host_domains",
    "poll_cycle_ms", "floor_ms", "poll_floor_ratio", "floor_disks", "floor_per_call_us",
    "idle_cpu_pct", "floor_idle_cpu_pct", "idle_cpu_vs_floor", "rss_mib", "rss_after_scrapes_mib",
    "host_busy_pct_during_idle",
    "ours_scrape_p50_ms", "ours_scrape_p99_ms", "ours_alone_scrape_p50_ms", "ours_alone_scrape_p99_ms",
    "ours_wire_kib", "ours_body_kib", "ours_cpu_per_scrape_ms",
    "debian_scrape_p50_ms", "debian_scrape_p99_ms", "debian_wire_kib", "debian_body_kib",
    "speedup_vs_debian", "speedup_vs_debian_p99",
    "calls_per_cycle_total", "blockjobinfo_per_cycle", "scrape_window_extra_calls_per_cycle",
]
MAIN_FIGURES = [
    "progress_age_max_s", "progress_age_p50_s", "cursor_lag_max_s", "cursor_lag_upper_max_s",
    "event_to_metrics_p50_ms", "event_to_metrics_max_ms", "rss_end_mib",
]


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

    assert [p["disks"] for p in results["points"]] == [10, 20, 40]
    assert [p["domains"] for p in results["points"]] == [10, 20, 20]
    for point in results["points"]:
        for figure in POINT_FIGURES:
            value = point.get(figure)
            assert isinstance(value, (int, float)) and math.isfinite(value), (point["disks"], figure, value)
        assert point["blockjobinfo_per_cycle"] >= point["disks"]  # every disk of ours, each cycle
        assert point["idle_calls_per_cycle"]["blockJobInfo"] > 0
    main = results["main"]
    assert main["disks"] == 20 and main["active_jobs"] == 5
    for figure in MAIN_FIGURES:
        value = main.get(figure)
        assert isinstance(value, (int, float)) and math.isfinite(value), (figure, value)
    assert main["event_pulls"] >= 10 and main["progress_samples"] > 5
    assert main["active_jobs_missing_from_metrics"] == 0

    targets = {t["target"]: t for t in results["targets"]}
    assert set(targets) == {"scrape_p99", "vs_debian", "event_p50", "idle_cpu", "poll_vs_floor", "rss",
                            "progress_age"}
    assert all(isinstance(t["pass"], bool) and t["value"] is not None for t in targets.values())
    for key in ("nproc", "cpu_model", "kernel", "libvirt", "qemu", "debian_exporter"):
        assert results["machine"].get(key), key
    assert "PASS" in run.stdout or "MISS" in run.stdout
