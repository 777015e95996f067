#!/usr/bin/env python3
"""Generates config/prometheus/alerts.yml from config/prometheus/thresholds.yml.

Alert thresholds, `for:` durations and the job selector live in one small file users edit;
PromQL cannot take parameters, so the rules are rendered from it rather than hand-kept in step.
tests/test_rules.py fails while the committed alerts.yml differs from what this script renders.

    python3 scripts/gen-rules.py                       # rewrite config/prometheus/alerts.yml
    python3 scripts/gen-rules.py --check               # exit 1 if alerts.yml is out of date
    python3 scripts/gen-rules.py --set stalled.after=5s --set stalled.for=0s -o /tmp/alerts.yml
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path
from typing import Any, Mapping

import yaml

REPO = Path(__file__).resolve().parent.parent
DEFAULT_THRESHOLDS = REPO / "config" / "prometheus" / "thresholds.yml"
DEFAULT_OUTPUT = REPO / "config" / "prometheus" / "alerts.yml"

# section -> key -> kind; the whole file must have exactly these keys.
SCHEMA: dict[str, Any] = {
    "selector": "selector",
    "runbook_url": "url",
    "exporter_down": {"for": "duration", "severity": "severity"},
    "exporter_absent": {"for": "duration", "severity": "severity"},
    "libvirt_down": {"for": "duration", "severity": "severity"},
    "failed": {"window": "duration", "for": "duration", "severity": "severity"},
    "stalled": {"after": "duration", "for": "duration", "severity": "severity"},
    "slow": {"eta": "duration", "for": "duration", "severity": "severity"},
    "backing_chain": {"depth": "count0", "for": "duration", "severity": "severity"},
    "policy_errors": {"count": "count1", "window": "duration", "for": "duration", "severity": "severity"},
    "policy_reload_failed": {"for": "duration", "severity": "severity"},
}

_DURATION = re.compile(r"^(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?$")
_DURATION_UNITS = (365 * 86400, 7 * 86400, 86400, 3600, 60, 1, 0.001)
_MATCHER = r'\s*[a-zA-Z_][a-zA-Z0-9_]*\s*(?:=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"\s*'
_SELECTOR = re.compile(rf"^{_MATCHER}(?:,{_MATCHER})*,?\s*$")


class ThresholdError(ValueError):
    """All problems of a thresholds file at once, one per line, each with file and line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def duration_seconds(text: str) -> float:
    match = _DURATION.match(text)
    if not text or not match or not any(match.groups()):
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(int(g) * unit for g, unit in zip(match.groups(), _DURATION_UNITS) if g)


def _check_value(kind: str, value: Any) -> str | None:
    """Returns a problem description, or None if value is fine for kind."""
    if kind == "duration":
        if not isinstance(value, str):
            return f"expected a duration such as 5m, got {value!r}"
        try:
            duration_seconds(value)
        except ValueError as exc:
            return str(exc)
    elif kind == "severity":
        if value not in ("warning", "critical"):
            return f'expected "warning" or "critical", got {value!r}'
    elif kind in ("count0", "count1"):
        least = 0 if kind == "count0" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            return f"expected an integer >= {least}, got {value!r}"
    elif kind == "selector":
        if not isinstance(value, str) or not _SELECTOR.match(value):
            return f'expected PromQL label matchers such as job=~"libvirt-blockjob.*", got {value!r}'
    elif kind == "url":
        if not isinstance(value, str) or not re.match(r"^https?://\S+$", value) or "#" in value:
            return f"expected an http(s) URL without #fragment, got {value!r}"
    return None


def _line_index(text: str) -> dict[tuple[str, ...], int]:
    """Maps key paths to 1-based line numbers, so problems can name the line."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = path + (str(key.value),)
                lines[sub] = key.start_mark.line + 1
                walk(value, sub)

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """`stalled.after=5s` -> (("stalled", "after"), "5s"); the value is read as YAML."""
    if "=" not in text:
        raise ThresholdError([f"--set {text}: expected KEY=VALUE such as stalled.after=5s"])
    key, _, raw = text.partition("=")
    return tuple(key.strip().split(".")), yaml.safe_load(raw) if raw.strip() else ""


def load_thresholds(path: Path = DEFAULT_THRESHOLDS,
                    overrides: Mapping[tuple[str, ...], Any] | None = None) -> dict[str, Any]:
    """Reads and validates the thresholds; overrides ((section, key) -> value) replace file values."""
    text = Path(path).read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ThresholdError([f"{path}: {exc}"]) from None
    if not isinstance(data, dict):
        raise ThresholdError([f"{path}:1: expected a mapping of sections"])
    lines = _line_index(text)
    data = copy.deepcopy(data)
    origin: dict[tuple[str, ...], str] = {}
    problems: list[str] = []
    for key_path, value in (overrides or {}).items():
        key_path = tuple(key_path)
        spec: Any = SCHEMA
        for part in key_path:
            spec = spec.get(part) if isinstance(spec, dict) else None
        if spec is None or isinstance(spec, dict):
            problems.append(f"override {'.'.join(key_path)}: unknown key")
            continue
        target = data
        for part in key_path[:-1]:
            target = target.setdefault(part, {})
        target[key_path[-1]] = value
        origin[key_path] = f"override {'.'.join(key_path)}"

    def where(key_path: tuple[str, ...]) -> str:
        if key_path in origin:
            return origin[key_path]
        line = lines.get(key_path) or lines.get(key_path[:-1])
        return f"{path}:{line}" if line else str(path)

    def check(spec: Mapping[str, Any], values: Any, prefix: tuple[str, ...]) -> None:
        if not isinstance(values, dict):
            problems.append(f"{where(prefix)}: {'.'.join(prefix)}: expected a mapping")
            return
        for key in values:
            if key not in spec:
                problems.append(f"{where(prefix + (str(key),))}: unknown key {'.'.join(prefix + (str(key),))}")
        for key, kind in spec.items():
            key_path = prefix + (key,)
            if key not in values:
                problems.append(f"{where(prefix)}: missing key {'.'.join(key_path)}")
            elif isinstance(kind, dict):
                check(kind, values[key], key_path)
            else:
                problem = _check_value(kind, values[key])
                if problem:
                    problems.append(f"{where(key_path)}: {'.'.join(key_path)}: {problem}")

    check(SCHEMA, data, ())
    if problems:
        raise ThresholdError(problems)
    return data


def _seconds(text: str) -> str:
    value = duration_seconds(text)
    return str(int(value)) if value == int(value) else repr(value)


def _alert(name: str, expr: str, section: Mapping[str, Any], t: Mapping[str, Any],
           summary: str, description: str) -> dict[str, Any]:
    return {
        "alert": name,
        "expr": expr.strip() + "\n",
        "for": section["for"],
        "labels": {"severity": section["severity"]},
        "annotations": {
            "summary": summary,
            "description": description,
            "runbook_url": f"{t['runbook_url']}#{name.lower()}",
        },
    }


def build_rules(t: Mapping[str, Any]) -> dict[str, Any]:
    """The alert rule groups for validated thresholds t."""
    sel = t["selector"].strip().rstrip(",")
    where = "on {{ $labels.instance }}"
    job = "{{ $labels.job_type }} block job on disk {{ $labels.disk }} of domain {{ $labels.domain }}"

    f = t["failed"]
    w = f["window"]
    failed_expr = f"""
# 1. The failure counter grew within the window (increase() copes with counter resets).
increase(libvirt_blockjob_failed_total{{{sel}}}[{w}]) > 0
or
# 2. The exporter restarted within the window: its counters start again from nothing, so every
#    failure it counts now is new, even if the series looks unchanged to Prometheus.
(
  libvirt_blockjob_failed_total{{{sel}}} > 0
  and on (job, instance)
  resets(libvirt_blockjob_poll_cycles_total{{{sel}}}[{w}]) > 0
)
or
# 3. The series is new: the exporter creates it at 1 when a disk's first job fails, which is
#    never seen as an increase. Not if it merely reappears after Prometheus stopped scraping a
#    long-running exporter (told only where the exporter exposes process_start_time_seconds).
(
  (
    libvirt_blockjob_failed_total{{{sel}}} > 0
    unless
    libvirt_blockjob_failed_total{{{sel}}} offset {w}
  )
  unless on (job, instance)
  (
    time() - process_start_time_seconds{{{sel}}} > {_seconds(w)}
    unless on (job, instance)
    up{{{sel}}} offset {w} == 1
  )
)
"""

    s = t["stalled"]
    # Measured at the exporter's last poll, not at time(): while a poll cycle hangs (one domain's
    # QEMU monitor not answering blocks the whole cycle) no cursor is seen moving, and time() would
    # make every job on the host look stalled.
    stalled_expr = f"""
(
  libvirt_blockjob_last_poll_timestamp_seconds{{{sel}}}
  - on (job, instance) group_right
  libvirt_blockjob_cursor_last_change_timestamp_seconds{{{sel}}}
  > {_seconds(s["after"])}
)
unless on (job, instance, domain, disk, job_type)
libvirt_blockjob_ready{{{sel}}} == 1
"""

    p = t["policy_errors"]
    rules = [
        _alert("LibvirtBlockJobExporterDown", f"up{{{sel}}} == 0", t["exporter_down"], t,
               "libvirt-blockjob-exporter cannot be scraped.",
               f"Prometheus has failed to scrape the libvirt block job exporter {{{{ $labels.instance }}}} "
               f"(job {{{{ $labels.job }}}}) for more than {t['exporter_down']['for']}: block jobs on that "
               f"host are not monitored."),
        _alert("LibvirtBlockJobExporterAbsent", f"absent(up{{{sel}}})", t["exporter_absent"], t,
               "No libvirt-blockjob-exporter target is known to Prometheus.",
               f"Prometheus has had no scrape target matching {{{sel}}} for more than "
               f"{t['exporter_absent']['for']}: block jobs are not monitored anywhere."),
        _alert("LibvirtBlockJobLibvirtDown", f"libvirt_blockjob_up{{{sel}}} == 0", t["libvirt_down"], t,
               "libvirt-blockjob-exporter has lost its libvirt connection.",
               f"The exporter {where} has not been connected to libvirtd with its event callbacks for more "
               f"than {t['libvirt_down']['for']}: it sees no block jobs on that host."),
        _alert("LibvirtBlockJobFailed", failed_expr, f, t,
               "A libvirt block job failed.",
               f"The {job} {where} failed within the last {w}."),
        _alert("LibvirtBlockJobStalled", stalled_expr, s, t,
               "A libvirt block job makes no progress.",
               f"The {job} {where} has not moved its cursor for {{{{ $value | humanizeDuration }}}} "
               f"(threshold {s['after']}) and is not ready to pivot."),
        _alert("LibvirtBlockJobSlow",
               f"libvirt_blockjob:eta_seconds:rate5m{{{sel}}} > {_seconds(t['slow']['eta'])}",
               t["slow"], t,
               "A libvirt block job will not finish soon.",
               f"At its current rate the {job} {where} needs about {{{{ $value | humanizeDuration }}}} "
               f"more to finish (threshold {t['slow']['eta']})."),
        _alert("LibvirtBlockJobBackingChainTooDeep",
               f"libvirt_blockjob_backing_chain_depth{{{sel}}} > {t['backing_chain']['depth']}",
               t["backing_chain"], t,
               "A disk's backing chain is too deep.",
               f"Disk {{{{ $labels.disk }}}} of domain {{{{ $labels.domain }}}} {where} has "
               f"{{{{ $value }}}} backing images under its active layer (threshold "
               f"{t['backing_chain']['depth']})."),
        _alert("LibvirtBlockJobPolicyErrors",
               f"increase(libvirt_blockjob_policy_errors_total{{{sel}}}[{p['window']}]) >= {p['count']}",
               p, t,
               "The block job policy keeps failing to pull.",
               f"Policy rule {{{{ $labels.rule }}}} {where} had {{{{ $value | printf \"%.0f\" }}}} pulls "
               f"that could not be started or that failed within {p['window']} (threshold {p['count']})."),
        _alert("LibvirtBlockJobPolicyReloadFailed",
               f"libvirt_blockjob_policy_last_reload_successful{{{sel}}} == 0",
               t["policy_reload_failed"], t,
               "The block job policy file could not be reloaded.",
               f"The last (re)load of the policy file {where} failed: the exporter keeps applying the "
               f"previous policy."),
    ]
    return {"groups": [{"name": "libvirt-blockjob", "rules": rules}]}


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)

HEADER = """\
# GENERATED by scripts/gen-rules.py from config/prometheus/thresholds.yml: do not edit.
# Change thresholds there and run `python3 scripts/gen-rules.py`; docs/alerting.md explains them.
# Needs the recording rules of config/prometheus/recording-rules.yml (LibvirtBlockJobSlow).
"""


def render(thresholds: Mapping[str, Any]) -> str:
    body = yaml.dump(build_rules(thresholds), Dumper=_Dumper, sort_keys=False, width=1000,
                     default_flow_style=False, allow_unicode=True)
    return HEADER + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--thresholds", type=Path, default=DEFAULT_THRESHOLDS, help="thresholds YAML file")
    parser.add_argument("-o", "--output", default=str(DEFAULT_OUTPUT), help='output file, "-" for stdout')
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one threshold (repeatable), e.g. stalled.after=5s")
    parser.add_argument("--check", action="store_true", help="exit 1 if the output file is out of date")
    args = parser.parse_args(argv)
    try:
        overrides = dict(parse_override(item) for item in args.set)
        text = render(load_thresholds(args.thresholds, overrides))
    except ThresholdError as exc:
        for problem in exc.problems:
            print(f"gen-rules: {problem}", file=sys.stderr)
        return 2
    if args.check:
        current = Path(args.output).read_text() if Path(args.output).exists() else ""
        if current != text:
            print(f"gen-rules: {args.output} is out of date; run python3 scripts/gen-rules.py", file=sys.stderr)
            return 1
        return 0
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
