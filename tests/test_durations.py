"""The one duration grammar of flags, policy, web config and alert thresholds."""

from __future__ import annotations

import pytest

from exporter.durations import format_duration, parse_duration

YEAR = 365 * 86400.0


@pytest.mark.parametrize(
    "text,seconds",
    [("30s", 30), ("5m", 300), ("1h", 3600), ("1d", 86400), ("1h30m", 5400), ("1w", 604800),
     ("500ms", 0.5), ("0", 0), ("0s", 0), ("2d12h", 216000), ("1y", YEAR),
     # fractions, once only in flags; Go units, once only in the web config
     ("1.5m", 90), ("1.5h", 5400), ("0.25s", 0.25), ("100us", 1e-4), ("3ns", 3e-9), ("1m30.5s", 90.5)],
)
def test_durations(text, seconds):
    assert parse_duration(text, YEAR) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["1x", "h", "30", "1m1h", "1s1s", "", "-1h", "1 h", "1.h", ".5s", "+1s", "1s "
                                  "x"])
def test_bad_durations(text):
    with pytest.raises(ValueError, match="bad duration"):
        parse_duration(text, YEAR)


def test_messages():
    with pytest.raises(ValueError) as e:
        parse_duration("fast", 60)
    assert str(e.value) == ("bad duration 'fast': expected a number and a unit (ms, s, m, h, d, w, y) from "
                            "largest to smallest, such as 500ms, 1.5m, 1h30m")
    with pytest.raises(ValueError) as e:
        parse_duration("-1s", 60)
    assert str(e.value) == "bad duration '-1s': must not be negative"


def test_upper_bound_and_huge_numbers():
    assert parse_duration("1h", 3600) == 3600
    with pytest.raises(ValueError) as e:
        parse_duration("1h1ms", 3600)
    assert str(e.value) == "bad duration '1h1ms': must be at most 1h"
    with pytest.raises(ValueError) as e:
        parse_duration("1000y", 3600)
    assert str(e.value) == "bad duration '1000y': must be at most 1h"
    # 10^400 years: once an OverflowError in the policy loader
    with pytest.raises(ValueError) as e:
        parse_duration("1" + "0" * 400 + "y", YEAR)
    assert str(e.value).startswith("bad duration '1000000000000000000000000000000000000...': expected")


def test_format_duration():
    assert format_duration(0) == "0s"
    assert format_duration(5400) == "1h30m"
    assert format_duration(90061.7) == "1d1h1m1s"
    assert format_duration(0.5, precise=True) == "500ms"
    assert format_duration(600, precise=True) == "10m"
    assert format_duration(90.25, precise=True) == "1m30s250ms"
