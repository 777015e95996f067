"""Prometheus rules, their promtool tests, the example configs and the runbook that alerts link to."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from promlib import AMTOOL, PROMTOOL, require_tools

REPO = Path(__file__).resolve().parent.parent
PROM = REPO / "config" / "prometheus"
ALERTS = PROM / "alerts.yml"
RECORDING = PROM / "recording-rules.yml"
THRESHOLDS = PROM / "thresholds.yml"
RUNBOOK = REPO / "docs" / "runbook.md"
ALERTING_DOC = REPO / "docs" / "alerting.md"
PROMTOOL_TESTS = sorted((REPO / "tests" / "promtool").glob("*.yml"))
RUNBOOK_BASE = "https://github.com/libvirt-blockjob-exporter/libvirt-blockjob-exporter/blob/main/docs/runbook.md#"

spec = importlib.util.spec_from_file_location("gen_rules", REPO / "scripts" / "gen-rules.py")
gen_rules = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen_rules)


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [r for g in groups for r in g["rules"] if "alert" in r]


def promtool_cases() -> dict[str, list[dict]]:
    """alertname -> every alert_rule_test entry for it, over all promtool test files."""
    cases: dict[str, list[dict]] = {}
    for path in PROMTOOL_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                cases.setdefault(case["alertname"], []).append(case)
    return cases


def github_anchors(markdown: str) -> set[str]:
    """Anchors GitHub makes for headings: lower case, punctuation dropped, spaces to dashes."""
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", markdown, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


# -- promtool / amtool -------------------------------------------------------------------------

def test_promtool_check_rules():
    require_tools("promtool")
    result = run(PROMTOOL, "check", "rules", str(ALERTS), str(RECORDING))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests():
    require_tools("promtool")
    assert PROMTOOL_TESTS
    result = run(PROMTOOL, "test", "rules", *map(str, PROMTOOL_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_prometheus_config():
    require_tools("promtool")
    result = run(PROMTOOL, "check", "config", str(PROM / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rule files found" in result.stdout


def test_amtool_check_config_and_routing():
    require_tools("amtool")
    config = REPO / "config" / "alertmanager" / "alertmanager.yml"
    result = run(AMTOOL, "check-config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    for labels, receiver in ((["severity=critical", "alertname=LibvirtBlockJobFailed"], "pager"),
                             (["severity=critical", "alertname=LibvirtBlockJobFailedDirect"], "pager"),
                             (["severity=warning", "alertname=LibvirtBlockJobStalled"], "ticket")):
        result = run(AMTOOL, "config", "routes", "test", f"--config.file={config}", *labels)
        assert result.stdout.split() == [receiver], (labels, result.stdout, result.stderr)


def test_example_configs_agree_with_the_rules():
    prometheus = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert sorted(prometheus["rule_files"]) == ["alerts.yml", "recording-rules.yml"]
    jobs = [c["job_name"] for c in prometheus["scrape_configs"]]
    selector = gen_rules.load_thresholds()["selector"]
    (regex,) = re.findall(r'job=~"([^"]*)"', selector)
    assert all(re.fullmatch(regex, job) for job in jobs), (selector, jobs)
    alertmanager = yaml.safe_load((REPO / "config" / "alertmanager" / "alertmanager.yml").read_text())
    assert alertmanager["route"]["group_by"] == ["alertname", "instance", "domain", "disk"]


# -- the alerts themselves ---------------------------------------------------------------------

def test_every_alert_is_complete():
    rules = alert_rules()
    assert len(rules) >= 9
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    anchors = github_anchors(RUNBOOK.read_text())
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"LibvirtBlockJob(?:[A-Z][a-z0-9]*)+", name), name
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert "for" in rule and gen_rules.duration_seconds(rule["for"]) >= 0, name
        notes = rule["annotations"]
        assert set(notes) >= {"summary", "description", "runbook_url"}, name
        assert notes["summary"] and "{{" not in notes["summary"], f"{name}: summary must be static"
        if not rule["expr"].startswith("absent("):  # absent() has no labels to name
            assert "{{" in notes["description"], f"{name}: description must be templated"
        assert notes["runbook_url"] == RUNBOOK_BASE + name.lower(), name
        assert name.lower() in anchors, f"{name}: no section in docs/runbook.md"


def test_runbook_has_every_anchor_it_or_alerts_link_to():
    from exporter.alertmanager import RUNBOOK_URL

    text = RUNBOOK.read_text()
    anchors = github_anchors(text)
    urls = [r["annotations"]["runbook_url"] for r in alert_rules()] + [RUNBOOK_URL]
    for url in urls:
        assert url.startswith(RUNBOOK_BASE), url
        assert url.split("#", 1)[1] in anchors, url
    for anchor in re.findall(r"\]\(#([^)]+)\)", text):
        assert anchor in anchors, f"runbook links to missing #{anchor}"


def test_every_alert_has_must_fire_and_must_not_fire_promtool_cases():
    cases = promtool_cases()
    for rule in alert_rules():
        name = rule["alert"]
        assert name in cases, f"{name} has no promtool test"
        assert any(c.get("exp_alerts") for c in cases[name]), f"{name}: no must-fire case"
        assert any(not c.get("exp_alerts") for c in cases[name]), f"{name}: no must-not-fire case"
    unknown = set(cases) - {r["alert"] for r in alert_rules()}
    assert not unknown, f"promtool tests for alerts that do not exist: {unknown}"


def test_descriptions_name_domain_and_disk_where_the_alert_has_them():
    cases = promtool_cases()
    for rule in alert_rules():
        labels = {k for c in cases[rule["alert"]] for a in c.get("exp_alerts") or [] for k in a["exp_labels"]}
        for label in ("domain", "disk", "rule"):
            if label in labels:
                assert f"$labels.{label}" in rule["annotations"]["description"], (rule["alert"], label)
        for case in cases[rule["alert"]]:
            for alert in case.get("exp_alerts") or []:
                assert alert.get("exp_annotations"), f"{rule['alert']}: check the rendered annotations"


# -- thresholds in one place -------------------------------------------------------------------

def test_alerts_yml_is_generated_from_thresholds():
    result = run(sys.executable, "scripts/gen-rules.py", "--check")
    assert result.returncode == 0, result.stderr
    assert ALERTS.read_text() == gen_rules.render(gen_rules.load_thresholds())


def test_every_threshold_is_documented():
    doc = ALERTING_DOC.read_text()
    for section, keys in gen_rules.SCHEMA.items():
        if isinstance(keys, dict):
            for key in keys:
                assert f"`{section}.{key}`" in doc, f"docs/alerting.md does not explain {section}.{key}"
        else:
            assert f"`{section}`" in doc, f"docs/alerting.md does not explain {section}"


def test_overrides_change_the_rules(tmp_path):
    out = tmp_path / "alerts.yml"
    result = run(sys.executable, "scripts/gen-rules.py", "--set", "stalled.after=5s", "--set", "stalled.for=0s",
                 "--set", "failed.window=2m", "--set", "backing_chain.depth=3", "-o", str(out))
    assert result.returncode == 0, result.stderr
    rules = {r["alert"]: r for g in yaml.safe_load(out.read_text())["groups"] for r in g["rules"]}
    assert "_seconds{" in rules["LibvirtBlockJobStalled"]["expr"]
    assert "> 5\n" in rules["LibvirtBlockJobStalled"]["expr"]
    assert "[2m]" in rules["LibvirtBlockJobFailed"]["expr"] and "offset 2m" in rules["LibvirtBlockJobFailed"]["expr"]
    assert rules["LibvirtBlockJobBackingChainTooDeep"]["expr"].strip().endswith("> 3")
    if PROMTOOL:
        check = run(PROMTOOL, "check", "rules", str(out))
        assert check.returncode == 0, check.stdout + check.stderr


def test_bad_thresholds_are_all_reported_with_lines(tmp_path):
    bad = tmp_path / "thresholds.yml"
    text = THRESHOLDS.read_text()
    text = text.replace("  after: 10m", "  after: ten minutes").replace("  depth: 10", "  depth: -1")
    text += "surprise: 1\n"
    bad.write_text(text)
    with pytest.raises(gen_rules.ThresholdError) as err:
        gen_rules.load_thresholds(bad)
    problems = err.value.problems
    lines = text.splitlines()
    assert len(problems) == 3, problems
    for needle in ("after: ten minutes", "depth: -1", "surprise: 1"):
        line = next(i for i, l in enumerate(lines, 1) if needle in l)
        assert any(f"{bad}:{line}:" in p for p in problems), (needle, problems)
    result = run(sys.executable, "scripts/gen-rules.py", "--thresholds", str(bad), "-o", str(tmp_path / "x.yml"))
    assert result.returncode == 2 and result.stderr.count("gen-rules:") == 3
    with pytest.raises(gen_rules.ThresholdError, match="unknown key"):
        gen_rules.load_thresholds(THRESHOLDS, {("stalled", "atfer"): "5s"})
    with pytest.raises(gen_rules.ThresholdError, match="severity"):
        gen_rules.load_thresholds(THRESHOLDS, {("failed", "severity"): "page"})


def test_thresholds_use_the_one_duration_grammar_and_render_prometheus_durations():
    t = gen_rules.load_thresholds(THRESHOLDS, {("stalled", "after"): "1.5m", ("failed", "window"): "0.5h"})
    assert t["stalled"]["after"] == "1m30s" and t["failed"]["window"] == "30m"
    assert gen_rules.load_thresholds(THRESHOLDS) == gen_rules.load_thresholds(THRESHOLDS, {})
    with pytest.raises(TypeError):
        t["stalled"]["after"] = "1s"  # frozen


@pytest.mark.parametrize("text,expected", [
    ("selector: " + "[" * 600 + "\n", "{f}:1: YAML syntax error: nested deeper than 32 levels"),
    (None, "{f}: cannot read thresholds file: No such file or directory"),
])
def test_unreadable_thresholds_are_one_clear_line(tmp_path, text, expected):
    f = tmp_path / "thresholds.yml"
    if text is not None:
        f.write_text(text)
    result = run(sys.executable, "scripts/gen-rules.py", "--thresholds", str(f), "-o", str(tmp_path / "x.yml"))
    assert (result.returncode, result.stderr) == (2, "gen-rules: " + expected.format(f=f) + "\n")


def test_threshold_values_are_bounded():
    with pytest.raises(gen_rules.ThresholdError) as err:
        gen_rules.load_thresholds(THRESHOLDS, {("stalled", "after"): "1000y", ("backing_chain", "depth"): 10**6,
                                               ("failed", "for"): "1.0005s"})
    assert err.value.problems == [
        "override stalled.after: stalled.after: bad duration '1000y': must be at most 365d",
        "override backing_chain.depth: backing_chain.depth: must be an integer <= 1000, got '1000000'",
        "override failed.for: failed.for: Prometheus durations are whole milliseconds, got '1.0005s'",
    ]
