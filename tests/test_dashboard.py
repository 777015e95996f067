"""dashboards/libvirt-blockjob.json: importable as is, uses only our metrics, filtered and rated right."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from dashboard_queries import DASHBOARD, dashboard_queries, iter_panels
from promlib import prometheus_factory  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
DS = {"type": "prometheus", "uid": "${datasource}"}
# Series Prometheus itself makes for every target; everything else must be documented.
PROMETHEUS_SERIES = {"up"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
            "unless", "atan2", "inf", "nan"}
RANGE_FUNCTIONS = ("rate", "irate", "increase")


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def documented_metrics() -> set[str]:
    text = (REPO / "docs" / "metrics.md").read_text()
    return set(re.findall(r"^\|\s*`(libvirt_blockjob_[a-z0-9_]+)`", text, re.M))


def recording_rules() -> set[str]:
    rules = yaml.safe_load((REPO / "config" / "prometheus" / "recording-rules.yml").read_text())
    return {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}


def targets():
    for panel in iter_panels(load()["panels"]):
        for target in panel.get("targets") or []:
            yield panel, target


def selectors(expr: str) -> list[tuple[str, str | None]]:
    """(metric name, matchers or None) of every vector selector in expr."""
    def blank(match: re.Match) -> str:  # same length, so positions still match expr
        return " " * len(match.group())
    text = re.sub(r'"(?:[^"\\]|\\.)*"', lambda m: '"' + "\0" * (len(m.group()) - 2) + '"', expr)
    text = re.sub(r"\[[^\]]*\]", blank, text)  # range and subquery durations
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", blank, text)
    found = []
    for match in re.finditer(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?(\s*\()?", text):
        name, braces, call = match.group(1), match.group(2), match.group(3)
        if call and not braces or name.lower() in KEYWORDS:
            continue  # a function or aggregation, or a keyword
        # Put the original matcher text (with its strings) back.
        found.append((name, expr[match.start(2) + 1:match.end(2) - 1] if braces else None))
    return found


def test_loads_with_fixed_identity():
    dashboard = load()
    assert dashboard["uid"] == "libvirt-blockjob"
    assert dashboard["title"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard.get("id") is None
    assert "__inputs" not in dashboard and "__requires" not in dashboard


def test_panel_ids_unique_and_grid_sane():
    panels = list(iter_panels(load()["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        assert panel.get("title"), f"panel {panel['id']} has no title"
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_every_panel_and_target_uses_the_datasource_variable():
    for panel in iter_panels(load()["panels"]):
        assert panel.get("datasource") == DS, f"panel {panel['title']!r}: {panel.get('datasource')}"
        if panel["type"] != "row":
            assert panel.get("targets"), f"panel {panel['title']!r} has no queries"
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs)), f"panel {panel['title']!r}: duplicate refIds"
    for panel, target in targets():
        assert target.get("datasource") == DS, f"{panel['title']!r} target {target.get('refId')}"


def test_variables():
    variables = {v["name"]: v for v in load()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        var = variables[name]
        assert var["type"] == "query"
        assert var["datasource"] == DS
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        assert query.startswith("label_values(") and query.rstrip(")").endswith(f", {name}")
        for metric, _ in selectors(query[len("label_values("):].rsplit(",", 1)[0]):
            assert metric in documented_metrics()
    assert '$job' in str(variables["instance"]["query"]), "instance must follow the chosen job"


def test_queries_use_only_documented_metrics_and_recording_rules():
    allowed = documented_metrics() | recording_rules() | PROMETHEUS_SERIES
    assert "libvirt_blockjob_failed_total" in allowed and "libvirt_blockjob:eta_seconds:rate1m" in allowed
    used = set()
    for panel, target in targets():
        for metric, _ in selectors(target["expr"]):
            assert metric in allowed, f"{panel['title']!r} uses undocumented {metric!r}: {target['expr']}"
            used.add(metric)
    # The panels the dashboard promises are there.
    for metric in ("libvirt_blockjob_progress_ratio", "libvirt_blockjob:throughput_bytes_per_second:rate1m",
                   "libvirt_blockjob:eta_seconds:rate1m", "libvirt_blockjob_completed_total",
                   "libvirt_blockjob_failed_total", "libvirt_blockjob_canceled_total",
                   "libvirt_blockjob_backing_chain_depth", "libvirt_blockjob_policy_candidates",
                   "libvirt_blockjob_policy_deferred", "libvirt_blockjob_policy_started_total",
                   "libvirt_blockjob_policy_errors_total", "up", "libvirt_blockjob_up",
                   "libvirt_blockjob_poll_duration_seconds", "libvirt_blockjob_reconnects_total",
                   "libvirt_blockjob_libvirt_errors_total"):
        assert metric in used, f"no panel shows {metric}"


def test_every_selector_is_filtered_by_job_and_instance():
    for panel, target in targets():
        for metric, matchers in selectors(target["expr"]):
            assert matchers is not None, f"{panel['title']!r}: {metric} without matchers"
            assert 'job=~"$job"' in matchers and 'instance=~"$instance"' in matchers, \
                f"{panel['title']!r}: {metric}{{{matchers}}}"


def test_rates_use_rate_interval():
    for panel, target in targets():
        expr = target["expr"]
        for match in re.finditer(rf"\b({'|'.join(RANGE_FUNCTIONS)})\s*\(", expr):
            depth, end = 1, match.end()
            while depth:
                depth += {"(": 1, ")": -1}.get(expr[end], 0)
                end += 1
            ranges = re.findall(r"\[([^\]]*)\]", expr[match.end():end])
            assert ranges == ["$__rate_interval"], f"{panel['title']!r}: {expr}"


def test_selector_parser():
    assert selectors('sum by (job_type) (increase(a_total{job=~"$job"}[$__rate_interval])) / b') == [
        ("a_total", 'job=~"$job"'), ("b", None)]
    assert selectors('count_values("depth", x:y:z{a="b"}) or vector(0)') == [("x:y:z", 'a="b"')]


def test_dashboard_queries_helper():
    queries = dashboard_queries(DASHBOARD, "libvirt-blockjob", re.escape("127.0.0.1:9478"))
    assert len(queries) == sum(1 for _ in targets())
    for title, promql in queries:
        assert "$" not in promql, (title, promql)
    # The regex 127\.0\.0\.1:9478, written as a PromQL string literal (backslashes doubled).
    assert any('job=~"libvirt-blockjob", instance=~"127\\\\.0\\\\.0\\\\.1:9478"' in q for _, q in queries)
    assert any("[1m]" in q for _, q in queries)


@pytest.mark.e2e
def test_every_query_is_valid_promql(tmp_path, prometheus_factory):
    prom = prometheus_factory(targets=[], rule_files=[REPO / "config" / "prometheus" / "recording-rules.yml"])
    for instance in (".*", re.escape("127.0.0.1:9478")):  # an escaped regex must stay valid PromQL
        for title, promql in dashboard_queries(DASHBOARD, "libvirt-blockjob", instance):
            prom.query(promql)  # raises on a parse or evaluation error
