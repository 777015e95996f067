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
import re
import sys
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the exporter's own loader and duration grammar, also without installing it
from exporter.configfile import ABSENT, ConfigError, Reader, compose, load  # noqa: E402
from exporter.durations import format_duration, parse_duration  # noqa: E402

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
    "unresponsive": {"for": "duration", "severity": "severity"},
    "slow": {"eta": "duration", "for": "duration", "severity": "severity"},
    "backing_chain": {"depth": "count0", "for": "duration", "severity": "severity"},
    "policy_errors": {"count": "count1", "window": "duration", "for": "duration", "severity": "severity"},
    "policy_reload_failed": {"for": "duration", "severity": "severity"},
    "fleet_unavailable": {"for": "duration", "severity": "severity"},
    "fleet_lease_without_pull": {"for": "duration", "severity": "severity"},
}

_MATCHER = r'\s*[a-zA-Z_][a-zA-Z0-9_]*\s*(?:=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"\s*'
_SELECTOR = re.compile(rf"^{_MATCHER}(?:,{_MATCHER})*,?\s*$")
MAX_DURATION = 365 * 86400.0
MAX_COUNT = 1000
MAX_TEXT = 1000


class ThresholdError(ValueError):
    """All problems of a thresholds file at once, one per line, each with file and line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def duration_seconds(text: str) -> float:
    return parse_duration(text, MAX_DURATION)


def _check(r: Reader, kind: str, node: yaml.Node, name: str) -> Any:
    """The checked value (durations in canonical Prometheus form), or ABSENT after reporting."""
    if kind == "duration":
        seconds = r.duration(node, name, MAX_DURATION)
        if seconds is not ABSENT and abs(seconds * 1000 - round(seconds * 1000)) > 1e-6:
            r.error(node, f"{name}: Prometheus durations are whole milliseconds, got {node.value!r}")
            return ABSENT
        return seconds if seconds is ABSENT else format_duration(seconds, precise=True)
    if kind in ("count0", "count1"):
        return r.integer(node, name, 0 if kind == "count0" else 1, MAX_COUNT)
    value = r.string(node, name)
    if value is ABSENT:
        return ABSENT
    if len(value) > MAX_TEXT:
        problem = f"longer than {MAX_TEXT} characters"
    elif kind == "severity" and value not in ("warning", "critical"):
        problem = f'expected "warning" or "critical", got {value!r}'
    elif kind == "selector" and not _SELECTOR.match(value):
        problem = f'expected PromQL label matchers such as job=~"libvirt-blockjob.*", got {value!r}'
    elif kind == "url" and (not re.match(r"^https?://\S+$", value) or "#" in value):
        problem = f"expected an http(s) URL without #fragment, got {value!r}"
    else:
        return value
    r.error(node, f"{name}: {problem}")
    return ABSENT


def _walk(r: Reader, node: yaml.Node | None, spec: Mapping[str, Any], prefix: tuple[str, ...],
          overridden: Mapping[tuple[str, ...], Any]) -> Mapping[str, Any]:
    pairs = r.mapping(node, ".".join(prefix) or "thresholds", tuple(spec))
    given = {k: v for k, _, v in pairs or ()}
    out: dict[str, Any] = {}
    for key, kind in spec.items():
        path = prefix + (key,)
        if isinstance(kind, dict):
            out[key] = _walk(r, given.get(key), kind, path, overridden)
        elif path in overridden:
            out[key] = overridden[path]
        elif key not in given:
            if pairs is not None:
                r.error(node, f"missing key {'.'.join(path)}")
        else:
            out[key] = _check(r, kind, given[key], ".".join(path))
    return MappingProxyType(out)  # frozen, like every config result


class _OverrideReader(Reader):
    def _line(self, where):  # an override has no line
        return None


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """`stalled.after=5s` -> (("stalled", "after"), its YAML node)."""
    if "=" not in text:
        raise ThresholdError([f"--set {text}: expected KEY=VALUE such as stalled.after=5s"])
    key, _, raw = text.partition("=")
    try:
        return tuple(key.strip().split(".")), compose(raw if raw.strip() else "''", f"--set {text}")
    except ConfigError as e:
        raise ThresholdError([str(p) for p in e.problems]) from None


def load_thresholds(path: Path = DEFAULT_THRESHOLDS,
                    overrides: Mapping[tuple[str, ...], Any] | None = None) -> Mapping[str, Any]:
    """Reads and validates the thresholds; overrides ((section, key) -> value or YAML node) replace file values."""
    problems: list[str] = []
    overridden: dict[tuple[str, ...], Any] = {}
    for key_path, value in (overrides or {}).items():
        key_path = tuple(key_path)
        name = ".".join(key_path)
        spec: Any = SCHEMA
        for part in key_path:
            spec = spec.get(part) if isinstance(spec, dict) else None
        if spec is None or isinstance(spec, dict):
            problems.append(f"override {name}: unknown key")
            continue
        r = _OverrideReader(f"override {name}")
        node = value if isinstance(value, yaml.Node) else compose(yaml.safe_dump(value), r.path)
        overridden[key_path] = _check(r, spec, node, name)
        problems += [str(p) for p in r.final_problems()]
    try:
        data = load(str(path), "thresholds file", lambda r, root: _walk(r, root, SCHEMA, (), overridden))[0]
    except ConfigError as e:
        problems += [str(p) for p in e.problems]
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
unless on (job, instance, domain)
libvirt_blockjob_domain_unresponsive{{{sel}}} == 1
"""

    p = t["policy_errors"]
    # Candidates wait for the fleet budget while it cannot be used: nothing starts on that host.
    fleet_unavailable_expr = f"""
sum by (job, instance) (libvirt_blockjob_policy_deferred{{{sel},reason="fleet"}}) > 0
and on (job, instance)
libvirt_blockjob_policy_fleet_connected{{{sel}}} == 0
"""
    # More leases than the running pulls they are for: a lease nobody releases holds a slot of the
    # whole fleet. Pulls an operator started hold no lease, so they must not mask a stale one.
    fleet_lease_expr = f"""
libvirt_blockjob_policy_fleet_leases{{{sel}}}
> on (job, instance)
libvirt_blockjob_policy_fleet_pulls_running{{{sel}}}
"""
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
        _alert("LibvirtBlockJobDomainUnresponsive",
               f"libvirt_blockjob_domain_unresponsive{{{sel}}} == 1", t["unresponsive"], t,
               "A domain's QEMU does not answer, so its block jobs cannot be watched.",
               f"blockJobInfo for domain {{{{ $labels.domain }}}} on {{{{ $labels.instance }}}} has not answered "
               f"for more than {t['unresponsive']['for']}: its QEMU monitor hangs (the guest, not a job). Its "
               f"jobs' metrics keep their last values; every other domain is still watched."),
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
        _alert("LibvirtBlockJobPolicyFleetUnavailable", fleet_unavailable_expr, t["fleet_unavailable"], t,
               "The fleet pull budget in ZooKeeper cannot be used while pulls wait for it.",
               f"The policy {where} cannot use its fleet budget in ZooKeeper (disconnected, session lost, or "
               f"its host id held by another session) while {{{{ $value }}}} candidate pulls wait for it: it "
               f"starts no pull (more than {t['fleet_unavailable']['for']})."),
        _alert("LibvirtBlockJobPolicyFleetLeaseWithoutPull", fleet_lease_expr, t["fleet_lease_without_pull"], t,
               "A fleet pull lease is held with no pull running for it.",
               f"The exporter {where} holds {{{{ $value }}}} fleet leases, more than the running pulls they "
               f"are for, for more than {t['fleet_lease_without_pull']['for']}: the idle leases hold back pulls "
               f"on every host sharing the budget."),
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
