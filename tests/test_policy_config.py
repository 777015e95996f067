"""Policy file parsing: the documented example, values, and every kind of bad input with its line."""

from __future__ import annotations

import textwrap
from datetime import datetime, timezone

import pytest

from exporter.policy.commands import policy_check
from exporter.policy.config import (
    Limits,
    PolicyError,
    Window,
    glob_problem,
    load_policy,
    parse_bandwidth,
    parse_policy,
)

EXAMPLE = """\
rules:
  - name: flatten-deep-chains
    match:
      domain: "web-*"          # glob on the domain name
      disk: "vd*"              # glob on the disk target
    when:
      min_backing_depth: 2     # only disks with at least this many backing images
    action:
      pull:
        bandwidth: 50MiB/s     # omitted or 0 = unlimited
  - name: retire-old-base
    match:
      domain: "*"
    when:
      backing_file: "/var/lib/libvirt/images/base-2023-*.qcow2"   # any image in the chain matches
    action:
      pull:
        keep_base: "/var/lib/libvirt/images/base-2025-*.qcow2"    # pull only down to this image (blockRebase)
limits:
  max_concurrent: 2            # host-wide, counting every active block job, whoever started it
  windows:                     # start pulls only inside these, host local time; may cross midnight
    - days: [mon, tue, wed, thu, fri]
      start: "01:00"
      end: "05:00"
  abort_outside_window: false  # when true, abort pulls this policy started once the window closes
  retry_after: 1h              # a disk whose policy pull failed waits this long before another try
  min_free_space_ratio: 1.2    # start only if the overlay's filesystem has 1.2x the data the pull will copy
"""


def problems(text: str) -> list[tuple[int | None, str]]:
    with pytest.raises(PolicyError) as exc:
        parse_policy(textwrap.dedent(text), "p.yaml")
    return [(p.line, p.message) for p in exc.value.problems]


def one_problem(text: str) -> tuple[int | None, str]:
    found = problems(text)
    assert len(found) == 1, found
    return found[0]


# ------------------------------------------------------------------ the example


def test_example_is_accepted_as_written():
    policy = parse_policy(EXAMPLE, "example.yaml")
    assert [r.name for r in policy.rules] == ["flatten-deep-chains", "retire-old-base"]
    flatten, retire = policy.rules
    assert flatten.match.domain.pattern == "web-*" and flatten.match.disk.pattern == "vd*"
    assert flatten.when.min_backing_depth == 2 and flatten.when.backing_file is None
    assert flatten.pull.bandwidth_bytes == 50 * 1024 * 1024 and flatten.pull.keep_base is None
    assert flatten.line == 2 and retire.line == 11
    assert retire.match.disk.pattern == "*"
    assert retire.when.backing_file.matches("/var/lib/libvirt/images/base-2023-01.qcow2")
    assert retire.pull.keep_base.pattern == "/var/lib/libvirt/images/base-2025-*.qcow2"
    assert retire.pull.bandwidth_bytes == 0
    lim = policy.limits
    assert lim.max_concurrent == 2
    assert lim.windows == (Window(days=(0, 1, 2, 3, 4), start_minute=60, end_minute=300),)
    assert lim.abort_outside_window is False
    assert lim.retry_after == 3600
    assert lim.min_free_space_ratio == 1.2
    assert lim.max_attempts == 3
    assert policy.source == "example.yaml"


def test_load_policy_and_check_command(tmp_path, capsys):
    f = tmp_path / "policy.yaml"
    f.write_text(EXAMPLE)
    assert len(load_policy(str(f)).rules) == 2
    assert policy_check(str(f)) == 0
    out, err = capsys.readouterr()
    assert out == f"{f}: OK (2 rules)\n" and err == ""


def test_check_command_reports_every_error_on_stderr(tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text("rules:\n  - name: a\n    action: {pull: {bandwidth: 5 parsecs}}\nlimits:\n  max_concurrent: 0\n")
    assert policy_check(str(f)) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"{f}:3: rule 'a': action.pull.bandwidth: bad bandwidth '5 parsecs'")
    assert lines[1] == f"{f}:5: limits.max_concurrent: must be an integer >= 1, got 0"
    assert len(lines) == 2


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(PolicyError) as exc:
        load_policy(str(tmp_path / "nope.yaml"))
    assert str(exc.value).startswith(f"{tmp_path / 'nope.yaml'}: cannot read policy file")


def test_error_str_is_one_file_line_message_per_line():
    with pytest.raises(PolicyError) as exc:
        parse_policy("rules:\n  - name: x\nlimits:\n  max_concurrent: -2\n  nope: 1\n", "f.yaml")
    assert str(exc.value).splitlines() == [
        "f.yaml:2: rule 'x': rule has no action (expected 'action: {pull: ...}')",
        "f.yaml:4: limits.max_concurrent: must be an integer >= 1, got -2",
        "f.yaml:5: limits: unknown key 'nope' (allowed: max_concurrent, windows, abort_outside_window, "
        "retry_after, min_free_space_ratio, max_attempts)",
    ]


# ------------------------------------------------------------------ defaults and lenient forms


def test_minimal_policy_defaults():
    policy = parse_policy("rules:\n  - name: all\n    action:\n      pull:\n", "p.yaml")
    rule = policy.rules[0]
    assert rule.match.domain.matches("anything") and rule.match.disk.matches("sdz")
    assert rule.when.min_backing_depth is None and rule.when.backing_file is None
    assert rule.pull.bandwidth_bytes == 0 and rule.pull.keep_base is None
    assert policy.limits == Limits()
    assert policy.limits.windows is None and policy.limits.max_attempts == 3


def test_empty_match_keys_match_all():
    policy = parse_policy(
        'rules:\n  - name: a\n    match: {domain: "", disk: ""}\n    action: {pull: {}}\n'
        "  - name: b\n    match: {}\n    action: {pull: {}}\n",
        "p.yaml",
    )
    for rule in policy.rules:
        assert rule.match.domain.matches("x") and rule.match.disk.matches("vda")


def test_empty_rules_list_is_valid():
    assert parse_policy("rules: []\n", "p.yaml").rules == ()


def test_unquoted_times_are_read_as_written():
    # YAML 1.1 reads plain 22:30 as the base-60 integer 1350; the policy means the time.
    policy = parse_policy(
        "rules: []\nlimits:\n  windows:\n    - {days: [fri], start: 22:30, end: 02:00}\n", "p.yaml"
    )
    assert policy.limits.windows[0].start_minute == 22 * 60 + 30
    assert policy.limits.windows[0].end_minute == 120


def test_window_without_days_means_every_day_and_day_names_ignore_case():
    policy = parse_policy(
        'rules: []\nlimits:\n  windows:\n    - {start: "01:00", end: "02:00"}\n'
        '    - {days: [Sat, SUN], start: "03:00", end: "04:00"}\n',
        "p.yaml",
    )
    assert policy.limits.windows[0].days == tuple(range(7))
    assert policy.limits.windows[1].days == (5, 6)


@pytest.mark.parametrize(
    "text,expected",
    [
        (0, 0),
        (1048576, 1048576),
        ("1000", 1000),
        ("512B/s", 512),
        ("5KB/s", 5000),
        ("5kB/s", 5000),
        ("5MB/s", 5_000_000),
        ("2GB/s", 2_000_000_000),
        ("5KiB/s", 5 * 1024),
        ("50MiB/s", 50 * 1024**2),
        ("1GiB/s", 1024**3),
        ("1.5MiB/s", 1572864),
        ("0MiB/s", 0),
    ],
)
def test_bandwidth_units(text, expected):
    assert parse_bandwidth(text) == expected


@pytest.mark.parametrize("text", ["50MiB", "50 MiBps", "50Mib/s", "-5MiB/s", "fast", "5TB/s", ""])
def test_bad_bandwidth(text):
    with pytest.raises(ValueError):
        parse_bandwidth(text)


@pytest.mark.parametrize("pattern", ["vd[a", "[", "x[!]", "a[]"])
def test_unbalanced_globs(pattern):
    assert "unbalanced" in glob_problem(pattern)


@pytest.mark.parametrize("pattern", ["*", "vd[ab]", "vd[!a]", "a[]]b", "[]]", "x]", "/var/*/base-?.qcow2"])
def test_good_globs(pattern):
    assert glob_problem(pattern) is None


# ------------------------------------------------------------------ windows


def at(day: int, hh: int, mm: int = 0) -> datetime:
    # 2025-01-06 is a Monday; day 0 = Monday.
    return datetime(2025, 1, 6 + day, hh, mm, tzinfo=timezone.utc)


def test_window_same_day():
    w = Window(days=(0, 1, 2, 3, 4), start_minute=60, end_minute=300)
    assert w.contains(at(0, 1, 0))
    assert w.contains(at(4, 4, 59))
    assert not w.contains(at(0, 5, 0))  # end is exclusive
    assert not w.contains(at(0, 0, 59))
    assert not w.contains(at(5, 2, 0))  # saturday
    assert not w.contains(at(6, 2, 0))


def test_window_crossing_midnight_belongs_to_start_day():
    w = Window(days=(4,), start_minute=22 * 60, end_minute=2 * 60)  # fri 22:00-02:00
    assert w.contains(at(4, 22, 0))
    assert w.contains(at(4, 23, 59))
    assert w.contains(at(5, 1, 0))  # saturday 01:00 belongs to friday's window
    assert not w.contains(at(5, 2, 0))
    assert not w.contains(at(5, 22, 30))  # saturday itself is not a start day
    assert not w.contains(at(4, 1, 0))  # friday 01:00 would belong to thursday's window


def test_window_crossing_midnight_wraps_the_week():
    w = Window(days=(6,), start_minute=23 * 60, end_minute=60)  # sun 23:00-01:00
    assert w.contains(at(7, 0, 30))  # the next monday
    assert not w.contains(at(0, 23, 30))


def test_next_opening():
    w = Window(days=(0, 1, 2, 3, 4), start_minute=60, end_minute=300)
    assert w.next_opening(at(4, 6, 0)) == at(7, 1, 0)  # friday 06:00 -> monday 01:00
    assert w.next_opening(at(0, 0, 30)) == at(0, 1, 0)
    lim = Limits(windows=(w, Window(days=(5,), start_minute=120, end_minute=180)))
    assert lim.next_opening(at(4, 6, 0)) == at(5, 2, 0)


# ------------------------------------------------------------------ bad input, one at a time


@pytest.mark.parametrize(
    "text,line,fragment",
    [
        ("rules:\n  - name: a\n    action: {pull: {}}\n    colour: red\n", 4, "unknown key 'colour'"),
        ("rules: []\nlimts: {}\n", 2, "unknown key 'limts' (allowed: rules, limits, fleet); did you mean 'limits'?"),
        ("rules:\n  - name: a\n    match: {domain: x, dsk: vda}\n    action: {pull: {}}\n", 3, "unknown key 'dsk'"),
        ("rules:\n  - name: a\n    when:\n      depth: 2\n    action: {pull: {}}\n", 4, "when: unknown key 'depth'"),
        ("rules:\n  - name: a\n    action:\n      pull:\n        speed: 5\n", 5, "action.pull: unknown key 'speed'"),
        ("rules:\n  - name: a\n    action:\n      copy: {}\n", 4, "action: unknown key 'copy'"),
        ("rules: []\nlimits:\n  windows:\n    - {start: '01:00', end: '02:00', tz: UTC}\n", 4, "unknown key 'tz'"),
        ("limits: {}\n", 1, "missing required key 'rules'"),
        ("rules:\n  - action: {pull: {}}\n", 2, "rules[0]: missing required key 'name'"),
        ("rules: []\nlimits:\n  windows:\n    - {end: '02:00'}\n", 4, "missing required key 'start'"),
        ("rules: []\nlimits:\n  windows:\n    - days: [mon]\n      start: '02:00'\n", 4, "missing required key 'end'"),
        ("rules:\n  - name: a\n", 2, "rule 'a': rule has no action"),
        ("rules:\n  - name: a\n    action:\n", 3, "rule 'a': rule has no action"),
        ("rules:\n  - name: a\n    action: {}\n", 3, "rule 'a': rule has no action"),
        ("rules:\n  - name: 7\n    action: {pull: {}}\n", 2, "rules[0].name: expected a string, got an integer ('7')"),
        ("rules:\n  - name: ''\n    action: {pull: {}}\n", 2, "rules[0].name: must not be empty"),
        ("rules: {a: 1}\n", 1, "rules: expected a list of rules, got a mapping"),
        ("rules:\n  - just-a-string\n", 2, "rules[0]: expected a mapping, got a string ('just-a-string')"),
        ("rules:\n  - name: a\n    match: [x]\n    action: {pull: {}}\n", 3, "match: expected a mapping, got a list"),
        ("rules:\n  - name: a\n    match: {domain: 5}\n    action: {pull: {}}\n", 3, "match.domain: expected a string"),
        ("rules:\n  - name: a\n    when: {min_backing_depth: 0}\n    action: {pull: {}}\n", 3,
         "when.min_backing_depth: must be an integer >= 1, got 0"),
        ("rules:\n  - name: a\n    when: {min_backing_depth: 1.5}\n    action: {pull: {}}\n", 3,
         "when.min_backing_depth: expected an integer >= 1, got a number ('1.5')"),
        ("rules:\n  - name: a\n    when: {min_backing_depth: true}\n    action: {pull: {}}\n", 3,
         "expected an integer >= 1, got a boolean"),
        ("rules:\n  - name: a\n    match: {disk: 'vd[a'}\n    action: {pull: {}}\n", 3,
         "match.disk: bad glob 'vd[a': unbalanced '['"),
        ("rules:\n  - name: a\n    when: {backing_file: '/x/[ab'}\n    action: {pull: {}}\n", 3,
         "when.backing_file: bad glob"),
        ("rules:\n  - name: a\n    when: {backing_file: ''}\n    action: {pull: {}}\n", 3,
         "when.backing_file: empty glob matches nothing"),
        ("rules:\n  - name: a\n    action:\n      pull: {keep_base: '/x/[b'}\n", 4, "action.pull.keep_base: bad glob"),
        ("rules:\n  - name: a\n    action:\n      pull: {bandwidth: 50MiB}\n", 4, "bad bandwidth '50MiB'"),
        ("rules:\n  - name: a\n    action:\n      pull: {bandwidth: -1}\n", 4, "must not be negative"),
        ("rules:\n  - name: a\n    action:\n      pull: {bandwidth: 1.5}\n", 4,
         "expected a bandwidth such as 50MiB/s or an integer in bytes/s, got a number ('1.5')"),
        ("rules: []\nlimits:\n  max_concurrent: two\n", 3, "limits.max_concurrent: expected an integer >= 1"),
        ("rules: []\nlimits:\n  max_concurrent: 0\n", 3, "limits.max_concurrent: must be an integer >= 1, got 0"),
        ("rules: []\nlimits:\n  max_attempts: 0\n", 3, "limits.max_attempts: must be an integer >= 1, got 0"),
        ("rules: []\nlimits:\n  abort_outside_window: maybe\n", 3, "expected true or false"),
        ("rules: []\nlimits:\n  retry_after: 1x\n", 3, "limits.retry_after: bad duration '1x'"),
        ("rules: []\nlimits:\n  retry_after: 90\n", 3, "duration '90' needs a unit"),
        ("rules: []\nlimits:\n  min_free_space_ratio: 0.9\n", 3, "must be a number >= 1.0"),
        ("rules: []\nlimits:\n  min_free_space_ratio: .nan\n", 3, "must be a number >= 1.0"),
        ("rules: []\nlimits:\n  min_free_space_ratio: lots\n", 3, "expected a number >= 1.0"),
        ("rules: []\nlimits:\n  windows: {days: [mon]}\n", 3, "limits.windows: expected a list of windows"),
        ("rules: []\nlimits:\n  windows: []\n", 3, "limits.windows: empty list would never allow a start"),
        ("rules: []\nlimits:\n  windows:\n    - {days: [mon, moon], start: '01:00', end: '02:00'}\n", 4,
         "bad day name 'moon'; expected one of mon, tue, wed, thu, fri, sat, sun"),
        ("rules: []\nlimits:\n  windows:\n    - {days: mon, start: '01:00', end: '02:00'}\n", 4,
         "days: expected a list of day names"),
        ("rules: []\nlimits:\n  windows:\n    - {days: [], start: '01:00', end: '02:00'}\n", 4,
         "days: empty list"),
        ("rules: []\nlimits:\n  windows:\n    - {days: [mon], start: '24:00', end: '02:00'}\n", 4,
         "start: bad time '24:00'"),
        ("rules: []\nlimits:\n  windows:\n    - {days: [mon], start: '1am', end: '02:00'}\n", 4, "start: bad time '1am'"),
        ("rules: []\nlimits:\n  windows:\n    - {days: [mon], start: '01:00', end: '01:60'}\n", 4, "end: bad time '01:60'"),
        ("rules: []\nlimits:\n  windows:\n    - days: [mon]\n      start: '03:00'\n      end: '03:00'\n", 4,
         "limits.windows[0]: empty window (start equals end 03:00)"),
        ("rules: []\nlimits:\n  max_concurrent: 1\n  max_concurrent: 2\n", 4,
         "limits: duplicate key 'max_concurrent' (first at line 3)"),
        ("rules: []\n1: x\n", 2, "policy: keys must be strings, got an integer ('1')"),
        ("- a\n- b\n", 1, "policy: expected a mapping, got a list"),
        ("", 1, "policy file is empty"),
        ("# only a comment\n", 1, "policy file is empty"),
        ("rules:\n  - name: a\n    <<: {x: 1}\n    action: {pull: {}}\n", 3, "merge keys ('<<') are not supported"),
    ],
)
def test_bad_input_reported_with_line(text, line, fragment):
    found = problems(text)
    assert any(ln == line and fragment in msg for ln, msg in found), found


def test_duplicate_rule_names():
    line, msg = one_problem(
        "rules:\n  - name: a\n    action: {pull: {}}\n  - name: b\n    action: {pull: {}}\n"
        "  - name: a\n    action: {pull: {}}\n"
    )
    assert line == 6
    assert msg == "rules[2].name: duplicate rule name 'a' (first at line 2)"


@pytest.mark.parametrize(
    "text,line,fragment",
    [
        ('rules:\n  - name: "unterminated\n', 3, "while scanning a quoted scalar started at line 2"),
        ("rules:\n  - name: a\n    match:\n      domain: *\n", 4, "while scanning an alias"),
        ("rules:\n  - name: a\n   action: {}\n", 3, "YAML syntax error"),
        ("rules: [a, b\n", 2, "YAML syntax error"),
        ("rules: []\nlimits:\n\tmax_concurrent: 1\n", 3, "YAML syntax error"),
        ("rules: []\n---\nrules: []\n", 2, "YAML syntax error"),
    ],
)
def test_yaml_syntax_errors_have_their_line(text, line, fragment):
    (ln, msg), = problems(text)
    assert msg.startswith("YAML syntax error")
    assert ln == line and fragment in msg, (ln, msg)


def test_all_problems_reported_at_once():
    text = """\
    rules:
      - name: one
        match:
          domain: "web-[ab"
          dsk: vda
        when:
          min_backing_depth: two
        action:
          pull:
            bandwidth: 50MiBps
      - name: one
        match: {}
      - match: {domain: x}
        action: {pull: {keep_base: ''}}
    limits:
      max_concurrent: 0
      windows:
        - days: [mon, funday]
          start: 25:00
          end: "05:00"
        - start: "22:00"
          end: "22:00"
      abort_outside_window: maybe
      retry_after: 60
      min_free_space_ratio: 0.5
      max_attempts: -1
      bogus: 1
    """
    found = problems(text)
    lines = [ln for ln, _ in found]
    assert lines == sorted(lines)
    expected = [
        (4, "bad glob 'web-[ab'"),
        (5, "unknown key 'dsk'"),
        (7, "min_backing_depth: expected an integer"),
        (10, "bad bandwidth '50MiBps'"),
        (11, "duplicate rule name 'one' (first at line 2)"),
        (11, "rule has no action"),
        (13, "rules[2]: missing required key 'name'"),
        (14, "keep_base: empty glob"),
        (16, "max_concurrent: must be an integer >= 1"),
        (18, "bad day name 'funday'"),
        (19, "bad time '25:00'"),
        (21, "empty window"),
        (23, "expected true or false"),
        (24, "needs a unit"),
        (25, "must be a number >= 1.0"),
        (26, "max_attempts: must be an integer >= 1"),
        (27, "unknown key 'bogus'"),
    ]
    for line, fragment in expected:
        assert any(ln == line and fragment in msg for ln, msg in found), (line, fragment, found)
    assert len(found) == len(expected), found


# ------------------------------------------------------------------ bounds (issue 10)


def test_fractional_durations_as_for_flags():
    policy = parse_policy("rules: []\nlimits:\n  retry_after: 1.5m\n", "p.yaml")
    assert policy.limits.retry_after == 90


@pytest.mark.parametrize(
    "text,expected",
    [
        # 10^400 years: once an OverflowError traceback
        ("rules: []\nlimits:\n  retry_after: 1" + "0" * 400 + "y\n",
         "p.yaml:3: limits.retry_after: bad duration '1000000000000000000000000000000000000...': expected a "
         "number and a unit (ms, s, m, h, d, w, y) from largest to smallest, such as 500ms, 1.5m, 1h30m"),
        ("rules: []\nlimits:\n  retry_after: 1000y\n",
         "p.yaml:3: limits.retry_after: bad duration '1000y': must be at most 365d"),
        # PyYAML's int() of 5,000 digits: once a ValueError traceback
        ("rules: []\nlimits:\n  max_concurrent: " + "9" * 5000 + "\n",
         "p.yaml:3: limits.max_concurrent: cannot read value '9999999999999999999999999999999999999...': "
         "Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits; use "
         "sys.set_int_max_str_digits() to increase the limit"),
        ("rules: []\nlimits:\n  max_concurrent: 1000001\n",
         "p.yaml:3: limits.max_concurrent: must be an integer <= 1000000, got '1000001'"),
        ("rules: []\nlimits:\n  max_attempts: 99999999999999999999\n",
         "p.yaml:3: limits.max_attempts: must be an integer <= 1000000, got '99999999999999999999'"),
        ("rules:\n  - name: a\n    when: {min_backing_depth: 1000001}\n    action: {pull: {}}\n",
         "p.yaml:3: rule 'a': when.min_backing_depth: must be an integer <= 1000000, got '1000001'"),
        ("rules: []\nlimits:\n  min_free_space_ratio: 1" + "0" * 400 + "\n",
         "p.yaml:3: limits.min_free_space_ratio: must be a number <= 100, got '1000000000000000000000000000000000000...'"),
        ("rules:\n  - name: a\n    action:\n      pull: {bandwidth: " + "1" * 400 + "GiB/s}\n",
         "p.yaml:4: rule 'a': action.pull.bandwidth: bad bandwidth '1111111111111111111111111111111111111...': expected an integer "
         "(bytes/s) or a number with B/s, KB/s, MB/s, GB/s, KiB/s, MiB/s or GiB/s, e.g. 50MiB/s"),
        # 600 nested brackets: once a RecursionError traceback
        ("rules: " + "[" * 600 + "]" * 600 + "\n",
         "p.yaml:1: YAML syntax error: nested deeper than 32 levels"),
        ("a: &a [*a]\n", "p.yaml:1: YAML syntax error: an alias refers to a value that contains it"),
    ],
)
def test_values_beyond_bounds_are_file_line_errors(text, expected):
    with pytest.raises(PolicyError) as exc:
        parse_policy(text, "p.yaml")
    assert str(exc.value) == expected


def test_alias_bomb_is_stopped_by_the_value_bound():
    # 1,000 windows each repeating a list of 2,000 bad day names: once 2 million error lines and 1.4 GB.
    days = "[" + ", ".join(["funday"] * 2000) + "]"
    windows = "".join("    - {days: *d, start: '01:00', end: '02:00'}\n" for _ in range(1000))
    text = f"x: &d {days}\nrules: []\nlimits:\n  windows:\n{windows}"
    with pytest.raises(PolicyError) as exc:
        parse_policy(text, "p.yaml")
    assert str(exc.value) == ("p.yaml:13: YAML syntax error: more than 20000 values "
                              "(an alias counts everything it repeats)")


def test_problems_are_capped_at_100():
    days = "[" + ", ".join(["funday"] * 50) + "]"
    windows = "".join(f"    - {{days: {days}, start: '01:00', end: '02:00'}}\n" for _ in range(10))
    with pytest.raises(PolicyError) as exc:
        parse_policy(f"rules: []\nlimits:\n  windows:\n{windows}", "p.yaml")
    lines = str(exc.value).splitlines()
    assert len(lines) == 101
    assert lines[0] == "p.yaml:4: limits.windows[0].days: bad day name 'funday'; expected one of mon, tue, wed, thu, fri, sat, sun"
    assert lines[99] == "p.yaml:5: limits.windows[1].days: bad day name 'funday'; expected one of mon, tue, wed, thu, fri, sat, sun"
    assert lines[100] == "p.yaml: ... and 400 more problems"


def test_counts_are_bounded():
    rules = "".join(f"  - {{name: r{i}, action: {{pull: {{}}}}}}\n" for i in range(1001))
    with pytest.raises(PolicyError) as exc:
        parse_policy("rules:\n" + rules, "p.yaml")
    assert str(exc.value) == "p.yaml:2: rules: more than 1000 items"


def test_unexpected_exception_while_reading_is_a_file_line_error(monkeypatch):
    import exporter.policy.config as config

    def boom(text):
        raise RuntimeError("boom")

    monkeypatch.setattr(config, "parse_hhmm", boom)
    with pytest.raises(PolicyError) as exc:
        parse_policy("rules: []\nlimits:\n  windows:\n    - {start: '01:00', end: '02:00'}\n", "p.yaml")
    assert str(exc.value) == "p.yaml:4: cannot read this value: RuntimeError: boom"


def test_large_file_is_refused_without_reading_it_all(tmp_path):
    # `policy check /dev/zero` once grew to 4.3 GB; run it under a 512 MiB address-space limit.
    import subprocess
    import sys

    big = tmp_path / "big.yaml"
    big.write_text("rules: []\n" + "#" * (1 << 20))
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (512 << 20, 512 << 20)); "
            "from exporter.policy.commands import policy_check; "
            "sys.exit(policy_check(sys.argv[1]) + 10 * policy_check(sys.argv[2]))")
    result = subprocess.run([sys.executable, "-c", code, "/dev/zero", str(big)], capture_output=True,
                            text=True, timeout=60)
    assert result.stderr == (f"/dev/zero: policy file is larger than 1024 KiB\n"
                             f"{big}: policy file is larger than 1024 KiB\n")
    assert result.returncode == 11


# ------------------------------------------------------------------ fleet


def _fleet(extra: str = "", zk: str = "zk1:2181,zk2:2181", path: str = "/lbj/pulls/ceph-a", n: str = "10") -> str:
    return f"rules: []\nfleet:\n  zookeeper: \"{zk}\"\n  path: \"{path}\"\n  max_concurrent: {n}\n{extra}"


def test_fleet_section_defaults_and_every_key():
    from exporter.policy.config import Fleet, FleetDigest, FleetTLS

    assert parse_policy("rules: []\n", "p.yml").fleet is None
    f = parse_policy(_fleet(), "p.yml").fleet
    assert f == Fleet("zk1:2181,zk2:2181", "/lbj/pulls/ceph-a", 10, session_timeout=10.0, timeout=5.0,
                      host_lost_after=1800.0)
    full = parse_policy(_fleet(
        "  session_timeout: 30s\n  timeout: 500ms\n  host_lost_after: 2h\n"
        "  tls: {ca_file: /etc/zk/ca.pem, cert_file: /etc/zk/c.pem, key_file: /etc/zk/k.pem, verify: false}\n"
        "  digest_auth: {username: lbje, password_file: /etc/zk/pw}\n",
        zk="[::1]:2181,zk.example:2182/chroot/x"), "p.yml").fleet
    assert (full.session_timeout, full.timeout, full.host_lost_after) == (30.0, 0.5, 7200.0)
    assert full.tls == FleetTLS("/etc/zk/ca.pem", "/etc/zk/c.pem", "/etc/zk/k.pem", False)
    assert full.digest_auth == FleetDigest("lbje", "/etc/zk/pw")


@pytest.mark.parametrize(
    "text,line,fragment",
    [
        ("rules: []\nfleet: {}\n", 2, "fleet: missing required key 'zookeeper'"),
        (_fleet(zk="zk1:99999"), 3, "fleet.zookeeper: bad port in 'zk1:99999': expected 1..65535"),
        (_fleet(zk="zk 1:2181"), 3, "fleet.zookeeper: bad server 'zk 1:2181': expected host:port"),
        (_fleet(zk="zk1:2181/"), 3, "fleet.zookeeper: chroot: must be an absolute path below /"),
        (_fleet(zk=",".join(["zk:1"] * 33)), 3, "fleet.zookeeper: more than 32 servers"),
        (_fleet(zk="z" * 1025), 3, "fleet.zookeeper: longer than 1024 characters"),
        (_fleet(path="relative/x"), 4, "fleet.path: must be an absolute path"),
        (_fleet(path="/"), 4, "fleet.path: must be an absolute path"),
        (_fleet(path="/a//b"), 4, "fleet.path: empty path component"),
        (_fleet(path="/a/../b"), 4, "fleet.path: bad path component '..'"),
        (_fleet(path="/a/b c"), 4, "fleet.path: bad path component 'b c'"),
        (_fleet(path="/zookeeper/quota"), 4, "fleet.path: /zookeeper is reserved by ZooKeeper"),
        (_fleet(path="/" + "a" * 600), 4, "fleet.path: longer than 512 characters"),
        (_fleet(path="/a" * 17), 4, "fleet.path: more than 16 levels"),
        (_fleet(n="0"), 5, "fleet.max_concurrent: must be an integer >= 1, got 0"),
        (_fleet(n="10001"), 5, "fleet.max_concurrent: must be an integer <= 10000"),
        (_fleet("  session_timeout: 1s\n"), 3, "fleet.session_timeout: must be at least 2s"),
        (_fleet("  session_timeout: 3m\n"), 6, "fleet.session_timeout: bad duration '3m': must be at most 2m"),
        (_fleet("  timeout: 10ms\n"), 3, "fleet.timeout: must be at least 100ms"),
        (_fleet("  timeout: 2m\n"), 6, "fleet.timeout: bad duration '2m': must be at most 1m"),
        (_fleet("  session_timeout: 60s\n  host_lost_after: 2m\n"), 3,
         "fleet.host_lost_after: must be at least 10s and 3 x session_timeout"),
        (_fleet("  host_lost_after: 31d\n"), 6, "fleet.host_lost_after: bad duration '31d': must be at most 30d"),
        (_fleet("  tls: {cert_file: /c.pem}\n"), 6, "fleet.tls: cert_file and key_file go together"),
        (_fleet("  tls: {ca: /c.pem}\n"), 6, "fleet.tls: unknown key 'ca'"),
        (_fleet("  digest_auth: {username: 'a:b', password_file: /pw}\n"), 6,
         "fleet.digest_auth.username: at most 256 printable characters without ':'"),
        (_fleet("  digest_auth: {username: a}\n"), 6, "fleet.digest_auth: missing required key 'password_file'"),
        (_fleet("  zk: x\n"), 6, "fleet: unknown key 'zk'"),
    ],
)
def test_bad_fleet_sections_are_file_line_errors(text, line, fragment):
    with pytest.raises(PolicyError) as e:
        parse_policy(text, "p.yml")
    assert any(p.line == line and fragment in p.message for p in e.value.problems), e.value.problems


def test_check_command_names_the_fleet_budget(tmp_path, capsys):
    f = tmp_path / "p.yml"
    f.write_text(_fleet())
    assert policy_check(str(f)) == 0
    assert capsys.readouterr().out.strip() == f"{f}: OK (0 rules, fleet budget 10 at /lbj/pulls/ceph-a on zk1:2181,zk2:2181)"


def test_a_fifo_as_the_policy_file_is_an_error_not_a_wait(tmp_path, capsys):
    """open() on a FIFO blocks until someone writes; the loader refuses it at once."""
    import os

    fifo = tmp_path / "policy.yml"
    os.mkfifo(fifo)
    assert policy_check(str(fifo)) == 1
    assert f"{fifo}: cannot read policy file: a FIFO or socket, not a file" in capsys.readouterr().err
