"""Policy file: YAML in, frozen dataclasses out, through the shared loader (``exporter.configfile``).

The whole tree is walked even after the first problem so one run of ``policy check`` lists
everything that is wrong, each with its line.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from datetime import date, datetime, time as dtime, timedelta

from yaml.nodes import Node, ScalarNode

from exporter.configfile import ABSENT, INT, STR, ConfigError, Problem, Reader, describe, is_null, load, short  # noqa: F401
from exporter.durations import format_duration  # noqa: F401 - the policy package's display helper

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # index = datetime.weekday()

DEFAULT_MAX_CONCURRENT = 1
DEFAULT_RETRY_AFTER = 3600.0
DEFAULT_MIN_FREE_SPACE_RATIO = 1.1
DEFAULT_MAX_ATTEMPTS = 3


# --------------------------------------------------------------------------- errors


class PolicyError(ConfigError):
    """Every problem found in one policy file, in file order."""


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Glob:
    """A shell-style pattern (``fnmatch``, case-sensitive, ``*`` also matches ``/``).

    Compiled once at load time because evaluation runs after every poll and job end.
    """

    pattern: str
    _regex: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_regex", re.compile(fnmatch.translate(self.pattern)))

    def matches(self, value: str) -> bool:
        return self._regex.match(value) is not None

    def __str__(self) -> str:
        return self.pattern


MATCH_ALL = Glob("*")


# A bracket expression as fnmatch.translate reads it: '!' and a first ']' belong to it.
_BRACKET = re.compile(r"\[!?+\]?+[^\]]*+\]|\[")


def glob_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a usable glob, or None.

    fnmatch silently treats an unclosed ``[`` as a literal, which is almost always a typo in a
    policy, so it is rejected here.
    """
    for m in _BRACKET.finditer(pattern):
        if m.group() == "[":
            return f"unbalanced '[' at position {m.start() + 1}"
    return None


_BANDWIDTH_UNITS = {"B": 1, "KB": 1000, "kB": 1000, "MB": 1000**2, "GB": 1000**3,
                    "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
_BANDWIDTH_RE = re.compile(r"^(\d{1,20}(?:\.\d{1,20})?)\s*(B|KB|kB|MB|GB|KiB|MiB|GiB)/s$", re.ASCII)
_MAX_BANDWIDTH = 2**63 - 1


def parse_bandwidth(value: int | str) -> int:
    """Bytes per second; 0 means unlimited."""
    if isinstance(value, bool):
        raise ValueError("bad bandwidth: expected bytes/s, got a boolean")
    if isinstance(value, int):
        result = value
    else:
        text = value.strip()
        if re.fullmatch(r"\d{1,20}", text, re.ASCII):
            result = int(text)
        else:
            m = _BANDWIDTH_RE.match(text)
            if m is None:
                raise ValueError(
                    f"bad bandwidth {short(value)}: expected an integer (bytes/s) or a number with "
                    "B/s, KB/s, MB/s, GB/s, KiB/s, MiB/s or GiB/s, e.g. 50MiB/s"
                )
            result = round(float(m.group(1)) * _BANDWIDTH_UNITS[m.group(2)])  # < 1e31: no overflow
    if result < 0:
        raise ValueError(f"bad bandwidth {short(str(value))}: must not be negative")
    if result > _MAX_BANDWIDTH:
        raise ValueError(f"bad bandwidth {short(str(value))}: too large")
    return result


_TIME_RE = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")


def parse_hhmm(text: str) -> int:
    """Minutes after midnight for ``HH:MM`` (00:00 .. 23:59)."""
    m = _TIME_RE.match(text.strip())
    if m is None:
        raise ValueError(f"bad time {short(text)}: expected HH:MM between 00:00 and 23:59")
    return int(m.group(1)) * 60 + int(m.group(2))


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


# --------------------------------------------------------------------------- policy records


@dataclass(frozen=True)
class Window:
    """A weekly start window in host local time; crossing midnight belongs to its start day."""

    days: tuple[int, ...]  # datetime.weekday() numbers, sorted, 0 = Monday
    start_minute: int
    end_minute: int  # exclusive; < start_minute means the window crosses midnight

    def contains(self, now: datetime) -> bool:
        minute = now.hour * 60 + now.minute
        wd = now.weekday()
        if self.start_minute < self.end_minute:
            return wd in self.days and self.start_minute <= minute < self.end_minute
        return (wd in self.days and minute >= self.start_minute) or (
            (wd - 1) % 7 in self.days and minute < self.end_minute
        )

    def next_opening(self, now: datetime) -> datetime:
        """The next start of this window strictly after ``now`` (wall-clock, DST ignored)."""
        today = now.date()
        for offset in range(8):
            d: date = today + timedelta(days=offset)
            if d.weekday() in self.days:
                t = datetime.combine(d, dtime(self.start_minute // 60, self.start_minute % 60))
                t = t.replace(tzinfo=now.tzinfo)
                if t > now:
                    return t
        raise AssertionError("a window with days opens within 8 days")

    def __str__(self) -> str:
        return f"{','.join(DAYS[d] for d in self.days)} {_hhmm(self.start_minute)}-{_hhmm(self.end_minute)}"


@dataclass(frozen=True)
class Match:
    domain: Glob = MATCH_ALL
    disk: Glob = MATCH_ALL


@dataclass(frozen=True)
class When:
    min_backing_depth: int | None = None
    backing_file: Glob | None = None


@dataclass(frozen=True)
class PullAction:
    bandwidth_bytes: int = 0  # 0 = unlimited
    keep_base: Glob | None = None  # None = pull the whole chain (virDomainBlockPull)


@dataclass(frozen=True)
class Rule:
    name: str
    match: Match
    when: When
    pull: PullAction
    line: int = 0


@dataclass(frozen=True)
class Limits:
    max_concurrent: int = DEFAULT_MAX_CONCURRENT
    windows: tuple[Window, ...] | None = None  # None = starts allowed at any time
    abort_outside_window: bool = False
    retry_after: float = DEFAULT_RETRY_AFTER  # seconds
    min_free_space_ratio: float = DEFAULT_MIN_FREE_SPACE_RATIO
    max_attempts: int = DEFAULT_MAX_ATTEMPTS

    def in_window(self, now: datetime) -> bool:
        return self.windows is None or any(w.contains(now) for w in self.windows)

    def next_opening(self, now: datetime) -> datetime | None:
        if self.windows is None:
            return None
        return min(w.next_opening(now) for w in self.windows)


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...]
    limits: Limits
    source: str = ""  # file name it was loaded from

    @property
    def rule_names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.rules)


# --------------------------------------------------------------------------- loading

MAX_RULES = 1000
MAX_WINDOWS = 100
MAX_DAYS = 100  # entries of one window's day list (repeats allowed)
MAX_COUNT = 1_000_000  # max_concurrent, max_attempts, min_backing_depth (a big one means "no limit")
MAX_RETRY_AFTER = 365 * 86400.0
MAX_RATIO = 100.0
MAX_TEXT = 4096  # characters of a rule name or a glob


def load_policy(path: str) -> Policy:
    return _load(path, None)


def parse_policy(text: str, filename: str) -> Policy:
    """Parse a policy document, raising PolicyError with every problem found."""
    return _load(filename, text)


def _load(path: str, text: str | None) -> Policy:
    try:
        return load(path, "policy file", _policy, text=text)[0]
    except ConfigError as e:
        raise PolicyError(e.problems) from None


def _policy(r: Reader, root: Node | None) -> Policy | None:
    if root is None:
        r.error(1, "policy file is empty; expected a mapping with 'rules'")
        return None
    top = r.keys(root, "policy", ("rules", "limits"))
    if top is None:
        return None
    if "rules" not in top:
        r.error(root, "policy: missing required key 'rules'")
    rules = _rules(r, top["rules"]) if "rules" in top else ()
    limits = _limits(r, top["limits"]) if "limits" in top else Limits()
    if rules is ABSENT or limits is ABSENT:
        return None
    return Policy(rules=rules, limits=limits, source=r.path)


def _rules(r: Reader, node: Node):
    if is_null(node):
        return ()
    items = r.sequence(node, "rules", "a list of rules", MAX_RULES)
    if items is None:
        return ABSENT
    seen: dict[str, int] = {}
    out = [_rule(r, rnode, i, seen) for i, rnode in enumerate(items)]
    return ABSENT if ABSENT in out else tuple(out)


def _text(r: Reader, node: Node, where: str):
    value = r.string(node, where)
    if value is not ABSENT and len(value) > MAX_TEXT:
        r.error(node, f"{where}: longer than {MAX_TEXT} characters")
        return ABSENT
    return value


def _rule(r: Reader, node: Node, index: int, seen: dict[str, int]):
    where = f"rules[{index}]"
    keys = r.keys(node, where, ("name", "match", "when", "action"))
    if keys is None:
        return ABSENT
    name: object = ABSENT
    if "name" not in keys:
        r.error(node, f"{where}: missing required key 'name'")
    else:
        name = _text(r, keys["name"], f"{where}.name")
        if name == "":
            r.error(keys["name"], f"{where}.name: must not be empty")
            name = ABSENT
        elif name in seen:
            r.error(keys["name"], f"{where}.name: duplicate rule name {short(name)} (first at line {seen[name]})")
        elif name is not ABSENT:
            seen[name] = keys["name"].start_mark.line + 1
            where = f"rule {short(name)}"
    match = _match(r, keys.get("match"), where)
    when = _when(r, keys.get("when"), where)
    pull: object = ABSENT
    if is_null(keys.get("action")):
        r.error(keys.get("action", node), f"{where}: rule has no action (expected 'action: {{pull: ...}}')")
    else:
        pull = _action(r, keys["action"], where)
    if ABSENT in (name, match, when, pull):
        return ABSENT
    return Rule(name=name, match=match, when=when, pull=pull, line=node.start_mark.line + 1)


def _glob(r: Reader, node: Node, where: str, empty_is_all: bool = False):
    value = _text(r, node, where)
    if value is ABSENT:
        return ABSENT
    if value == "":
        if empty_is_all:
            return MATCH_ALL
        r.error(node, f"{where}: empty glob matches nothing; remove the key instead")
        return ABSENT
    problem = glob_problem(value)
    if problem:
        r.error(node, f"{where}: bad glob {short(value)}: {problem}")
        return ABSENT
    return Glob(value)


def _match(r: Reader, node: Node | None, where: str):
    keys = r.keys(node, f"{where}: match", ("domain", "disk"))
    if keys is None:
        return ABSENT
    domain = _glob(r, keys["domain"], f"{where}: match.domain", True) if "domain" in keys else MATCH_ALL
    disk = _glob(r, keys["disk"], f"{where}: match.disk", True) if "disk" in keys else MATCH_ALL
    return ABSENT if ABSENT in (domain, disk) else Match(domain=domain, disk=disk)


def _when(r: Reader, node: Node | None, where: str):
    keys = r.keys(node, f"{where}: when", ("min_backing_depth", "backing_file"))
    if keys is None:
        return ABSENT
    depth = backing = None
    if "min_backing_depth" in keys:
        depth = r.integer(keys["min_backing_depth"], f"{where}: when.min_backing_depth", 1, MAX_COUNT)
    if "backing_file" in keys:
        backing = _glob(r, keys["backing_file"], f"{where}: when.backing_file")
    return ABSENT if ABSENT in (depth, backing) else When(min_backing_depth=depth, backing_file=backing)


def _action(r: Reader, node: Node, where: str):
    keys = r.keys(node, f"{where}: action", ("pull",))
    if keys is None:
        return ABSENT
    if "pull" not in keys:
        r.error(node, f"{where}: rule has no action (expected 'action: {{pull: ...}}')")
        return ABSENT
    pkeys = r.keys(keys["pull"], f"{where}: action.pull", ("bandwidth", "keep_base"))
    if pkeys is None:
        return ABSENT
    bandwidth: object = 0
    keep_base: object = None
    if "bandwidth" in pkeys:
        where_bw = f"{where}: action.pull.bandwidth"
        value = r.scalar(pkeys["bandwidth"], where_bw, (INT, STR),
                         "a bandwidth such as 50MiB/s or an integer in bytes/s")
        try:
            bandwidth = ABSENT if value is ABSENT else parse_bandwidth(value)
        except ValueError as e:
            r.error(pkeys["bandwidth"], f"{where_bw}: {e}")
            bandwidth = ABSENT
    if "keep_base" in pkeys:
        keep_base = _glob(r, pkeys["keep_base"], f"{where}: action.pull.keep_base")
    if ABSENT in (bandwidth, keep_base):
        return ABSENT
    return PullAction(bandwidth_bytes=bandwidth, keep_base=keep_base)


_LIMIT_KEYS = ("max_concurrent", "windows", "abort_outside_window", "retry_after", "min_free_space_ratio",
               "max_attempts")


def _limits(r: Reader, node: Node):
    keys = r.keys(node, "limits", _LIMIT_KEYS)
    if keys is None:
        return ABSENT
    values: dict[str, object] = {}
    for key in ("max_concurrent", "max_attempts"):
        if key in keys:
            values[key] = r.integer(keys[key], f"limits.{key}", 1, MAX_COUNT)
    if "abort_outside_window" in keys:
        values["abort_outside_window"] = r.boolean(keys["abort_outside_window"], "limits.abort_outside_window")
    if "retry_after" in keys:
        values["retry_after"] = r.duration(keys["retry_after"], "limits.retry_after", MAX_RETRY_AFTER)
    if "min_free_space_ratio" in keys:
        values["min_free_space_ratio"] = r.number(
            keys["min_free_space_ratio"], "limits.min_free_space_ratio", 1.0, MAX_RATIO,
            " (a pull must fit on the overlay's filesystem)")
    if "windows" in keys:
        values["windows"] = _windows(r, keys["windows"])
    return ABSENT if ABSENT in values.values() else Limits(**values)


def _windows(r: Reader, node: Node):
    items = r.sequence(node, "limits.windows", "a list of windows", MAX_WINDOWS)
    if items is None:
        return ABSENT
    if not items:
        r.error(node, "limits.windows: empty list would never allow a start; remove the key to allow any time")
        return ABSENT
    out = [_window(r, w, f"limits.windows[{i}]") for i, w in enumerate(items)]
    return ABSENT if ABSENT in out else tuple(out)


def _window(r: Reader, node: Node, where: str):
    keys = r.keys(node, where, ("days", "start", "end"))
    if keys is None:
        return ABSENT
    days = _days(r, keys["days"], f"{where}.days") if "days" in keys else tuple(range(7))
    times: dict[str, object] = {}
    for k in ("start", "end"):
        if k not in keys:
            r.error(node, f"{where}: missing required key '{k}'")
            times[k] = ABSENT
        else:
            times[k] = _hhmm_value(r, keys[k], f"{where}.{k}")
    if days is ABSENT or ABSENT in times.values():
        return ABSENT
    if times["start"] == times["end"]:
        r.error(node, f"{where}: empty window (start equals end {_hhmm(times['start'])})")
        return ABSENT
    return Window(days=days, start_minute=times["start"], end_minute=times["end"])


def _days(r: Reader, node: Node, where: str):
    items = r.sequence(node, where, "a list of day names (mon..sun)", MAX_DAYS)
    if items is None:
        return ABSENT
    if not items:
        r.error(node, f"{where}: empty list; the window would never open")
        return ABSENT
    out: set[int] = set()
    ok = True
    for dnode in items:
        if not (isinstance(dnode, ScalarNode) and dnode.tag == STR):
            r.error(dnode, f"{where}: expected a day name (mon..sun), got {describe(dnode)}")
            ok = False
        elif dnode.value.strip().lower() not in DAYS:
            r.error(dnode, f"{where}: bad day name {short(dnode.value)}; expected one of {', '.join(DAYS)}")
            ok = False
        else:
            out.add(DAYS.index(dnode.value.strip().lower()))
    return tuple(sorted(out)) if ok else ABSENT


def _hhmm_value(r: Reader, node: Node, where: str):
    # Unquoted 22:00 is a YAML 1.1 base-60 integer; the raw text is what the user meant.
    if not (isinstance(node, ScalarNode) and node.tag in (STR, INT)):
        r.error(node, f"{where}: expected a time \"HH:MM\", got {describe(node)}")
        return ABSENT
    try:
        return parse_hhmm(node.value)
    except ValueError as e:
        r.error(node, f"{where}: {e}")
        return ABSENT
