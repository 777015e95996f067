"""Prometheus-style durations (``500ms``, ``1s``, ``1h30m``) for flags and config."""

from __future__ import annotations

import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0, "y": 31536000.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)")


def parse_duration(text: str) -> float:
    """Seconds in ``text``; raises ValueError naming the text when it is not a duration."""
    value = text.strip()
    if not value:
        raise ValueError("empty duration")
    position = 0
    total = 0.0
    for match in _PART.finditer(value):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if position != len(value) or position == 0:
        raise ValueError(f"invalid duration {text!r} (use e.g. 500ms, 1s, 5m, 1h30m)")
    return total
