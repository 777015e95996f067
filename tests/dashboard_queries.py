r"""The PromQL of a Grafana dashboard, with its variables filled in, for checking it against Prometheus.

    for title, promql in dashboard_queries(DASHBOARD, job="libvirt-blockjob", instance=".*"):
        prom.query(promql)

`job` and `instance` are regexes (".*", re.escape(address)); they stand inside `=~"..."`, so they are
escaped for a PromQL string literal first (a backslash doubled), as Grafana's Prometheus data source
does: `re.escape("127.0.0.1:9478")` becomes `instance=~"127\\.0\\.0\\.1:9478"`, which Prometheus
reads as the regex `127\.0\.0\.1:9478` (put in verbatim, `\.` is a PromQL parse error).
Unknown variables raise ValueError, so a typo in a dashboard cannot pass.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "dashboards" / "libvirt-blockjob.json"

_VARIABLE = re.compile(r"\$\{([A-Za-z_]\w*)(?::[\w]+)?\}|\$([A-Za-z_]\w*)|\[\[([A-Za-z_]\w*)\]\]")


def iter_panels(panels: list[dict]) -> Iterator[dict]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels") or [])


def substitute(text: str, values: Mapping[str, str]) -> str:
    def repl(match: re.Match) -> str:
        name = next(g for g in match.groups() if g)
        if name not in values:
            raise ValueError(f"unknown dashboard variable ${name} in {text!r}")
        return values[name]
    return _VARIABLE.sub(repl, text)


def dashboard_queries(path: str | Path = DASHBOARD, job: str = ".*", instance: str = ".*", *,
                      rate_interval: str = "1m", interval: str = "15s", range_: str = "1h",
                      ) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel, in dashboard order."""
    dashboard: dict[str, Any] = json.loads(Path(path).read_text())
    seconds = _seconds(range_)
    values = {
        "job": promql_string_escape(job), "instance": promql_string_escape(instance),
        "__rate_interval": rate_interval, "__interval": interval,
        "__interval_ms": str(int(_seconds(interval) * 1000)),
        "__range": range_, "__range_s": str(int(seconds)), "__range_ms": str(int(seconds * 1000)),
    }
    queries = []
    for panel in iter_panels(dashboard.get("panels", [])):
        for target in panel.get("targets") or []:
            expr = target.get("expr")
            if expr and not target.get("hide"):
                queries.append((panel.get("title", ""), substitute(expr, values)))
    return queries


def promql_string_escape(value: str) -> str:
    """`value` as the inside of a double-quoted PromQL string (Go escapes: backslash and quote)."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    total, rest = 0.0, duration
    for number, unit in re.findall(r"(\d+)(ms|s|m|h|d|w|y)", duration):
        total += int(number) * units[unit]
        rest = rest.replace(number + unit, "", 1)
    if rest or not duration:
        raise ValueError(f"not a duration: {duration!r}")
    return total
