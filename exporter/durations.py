"""The one duration grammar of flags, the policy, the web config and the alert thresholds.

``0``, or numbers (fractions allowed) with units from largest to smallest, each at most once:
``y w d h m s ms us ns``: every Prometheus duration and every Go duration people write. Every
caller gives an upper bound: ``--poll.interval 1000y`` once killed the poller thread.
"""

from __future__ import annotations

import re

UNITS = {"y": 31536000.0, "w": 604800.0, "d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0,
         "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ns": 1e-9}
_PART = re.compile(r"(\d{1,20}(?:\.\d{1,20})?)(ms|us|µs|μs|ns|y|w|d|h|m|s)")
_EXAMPLE = "a number and a unit (ms, s, m, h, d, w, y) from largest to smallest, such as 500ms, 1.5m, 1h30m"


def parse_duration(text: str, maximum: float) -> float:
    """Seconds in ``text``, at most ``maximum``; ValueError naming the text otherwise."""
    value = text.strip()
    shown = value if len(value) <= 40 else value[:37] + "..."
    if value.startswith("-"):
        raise ValueError(f"bad duration {shown!r}: must not be negative")
    if value == "0":
        return 0.0
    position, total, last = 0, 0.0, float("inf")  # units strictly from largest to smallest
    for match in _PART.finditer(value):
        size = UNITS[match.group(2)]
        if match.start() != position or size >= last:
            break
        total += float(match.group(1)) * size
        position, last = match.end(), size
    if position != len(value) or position == 0:
        raise ValueError(f"bad duration {shown!r}: expected {_EXAMPLE}")
    if total > maximum:
        raise ValueError(f"bad duration {shown!r}: must be at most {format_duration(maximum)}")
    return total


def format_duration(seconds: float, precise: bool = False) -> str:
    """``1h30m``; whole seconds unless ``precise`` (then milliseconds too, for PromQL)."""
    ms = round(seconds * 1000) if precise else int(seconds) * 1000
    if ms == 0:
        return "0s"
    out = ""
    for unit, size in (("d", 86400000), ("h", 3600000), ("m", 60000), ("s", 1000), ("ms", 1)):
        if ms >= size:
            out += f"{ms // size}{unit}"
            ms %= size
    return out
