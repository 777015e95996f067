"""Policy file: YAML in, frozen dataclasses out.

The file is composed into a YAML node tree (not loaded into plain dicts) so every problem can be
reported with its line, and the whole tree is walked even after the first problem so one run of
``policy check`` lists everything that is wrong.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import re
from dataclasses import dataclass, field
from datetime import date, datetime, time as dtime, timedelta
from typing import Iterable

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # index = datetime.weekday()

DEFAULT_MAX_CONCURRENT = 1
DEFAULT_RETRY_AFTER = 3600.0
DEFAULT_MIN_FREE_SPACE_RATIO = 1.1
DEFAULT_MAX_ATTEMPTS = 3


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None  # 1-based; None when the problem is not tied to a line (unreadable file)
    message: str

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.file}: {self.message}"
        return f"{self.file}:{self.line}: {self.message}"


class PolicyError(Exception):
    """Every problem found in one policy file, in file order."""

    def __init__(self, problems: Iterable[Problem]):
        self.problems = list(problems)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


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


def glob_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a usable glob, or None.

    fnmatch silently treats an unclosed ``[`` as a literal, which is almost always a typo in a
    policy, so it is rejected here. The scan mirrors ``fnmatch.translate``.
    """
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "[":
            j = i
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                return f"unbalanced '[' at position {i}"
            i = j + 1
    return None


_DURATION_RE = re.compile(
    r"^(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?$"
)
_DURATION_UNITS = (365 * 86400, 7 * 86400, 86400, 3600, 60, 1, 0.001)


def parse_duration(text: str) -> float:
    """Seconds in a Prometheus-style duration (``30s``, ``5m``, ``1h30m``, ``1d``; ``0`` too)."""
    text = text.strip()
    if text == "0":
        return 0.0
    m = _DURATION_RE.match(text)
    if not text or m is None:
        raise ValueError(
            f"bad duration {text!r}: expected a Prometheus duration such as 30s, 5m, 1h, 1d, 1h30m"
        )
    return float(sum(int(g) * u for g, u in zip(m.groups(), _DURATION_UNITS) if g))


_BANDWIDTH_UNITS = {
    "B": 1,
    "KB": 1000,
    "kB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
}
_BANDWIDTH_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*(B|KB|kB|MB|GB|KiB|MiB|GiB)/s$")
_MAX_BANDWIDTH = 2**63 - 1


def parse_bandwidth(value: int | str) -> int:
    """Bytes per second; 0 means unlimited."""
    if isinstance(value, bool):
        raise ValueError("bad bandwidth: expected bytes/s, got a boolean")
    if isinstance(value, int):
        result = value
    else:
        text = value.strip()
        if text.isdigit():
            result = int(text)
        else:
            m = _BANDWIDTH_RE.match(text)
            if m is None:
                raise ValueError(
                    f"bad bandwidth {value!r}: expected an integer (bytes/s) or a number with "
                    "B/s, KB/s, MB/s, GB/s, KiB/s, MiB/s or GiB/s, e.g. 50MiB/s"
                )
            result = round(float(m.group(1)) * _BANDWIDTH_UNITS[m.group(2)])
    if result < 0:
        raise ValueError(f"bad bandwidth {value!r}: must not be negative")
    if result > _MAX_BANDWIDTH:
        raise ValueError(f"bad bandwidth {value!r}: too large")
    return result


_TIME_RE = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")


def parse_hhmm(text: str) -> int:
    """Minutes after midnight for ``HH:MM`` (00:00 .. 23:59)."""
    m = _TIME_RE.match(text.strip())
    if m is None:
        raise ValueError(f"bad time {text!r}: expected HH:MM between 00:00 and 23:59")
    return int(m.group(1)) * 60 + int(m.group(2))


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    s = int(seconds)
    if s == 0:
        return "0s"
    out = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= size:
            out += f"{s // size}{unit}"
            s %= size
    return out


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


def load_policy(path: str) -> Policy:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise PolicyError([Problem(path, None, f"cannot read policy file: {e.strerror or e}")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise PolicyError([Problem(path, line, "file is not valid UTF-8")])
    return parse_policy(text, path)


def parse_policy(text: str, filename: str) -> Policy:
    """Parse a policy document, raising PolicyError with every problem found."""
    p = _Parser(filename)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        msg = e.problem or e.context or "invalid YAML"
        if e.context and e.problem:
            ctx = e.context
            if e.context_mark is not None and mark is not None and e.context_mark.line != mark.line:
                ctx += f" started at line {e.context_mark.line + 1}"
            msg = f"{msg} ({ctx})"
        raise PolicyError([Problem(filename, mark.line + 1 if mark else None, f"YAML syntax error: {msg}")])
    except yaml.reader.ReaderError as e:
        line = text[: e.position].count("\n") + 1
        raise PolicyError([Problem(filename, line, f"YAML syntax error: {e.reason}")])
    except yaml.YAMLError as e:  # pragma: no cover - every PyYAML error above carries a mark
        raise PolicyError([Problem(filename, None, f"YAML syntax error: {e}")])
    if root is None:
        raise PolicyError([Problem(filename, 1, "policy file is empty; expected a mapping with 'rules'")])
    policy = p.policy(root)
    if p.problems:
        raise PolicyError(sorted(p.problems, key=lambda pr: (pr.line or 0)))
    assert policy is not None
    return policy


_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_BOOL = "tag:yaml.org,2002:bool"
_NULL = "tag:yaml.org,2002:null"
_KIND = {
    _STR: "a string",
    _INT: "an integer",
    _FLOAT: "a number",
    _BOOL: "a boolean",
    _NULL: "nothing (null)",
    "tag:yaml.org,2002:timestamp": "a date",
}

_ABSENT = object()


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _NULL


def _describe(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    kind = _KIND.get(node.tag, f"a value tagged {node.tag}")
    if node.tag == _NULL:
        return kind
    return f"{kind} ({node.value!r})"


class _Parser:
    def __init__(self, filename: str):
        self.filename = filename
        self.problems: list[Problem] = []
        self._ctor = yaml.constructor.SafeConstructor()

    # -- helpers

    def error(self, node: Node | None, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else None
        self.problems.append(Problem(self.filename, line, message))

    def construct(self, node: ScalarNode, where: str):
        try:
            return self._ctor.construct_object(node, deep=True)
        except yaml.YAMLError as e:
            self.error(node, f"{where}: cannot read value {node.value!r}: {getattr(e, 'problem', e)}")
            return _ABSENT

    def mapping(self, node: Node, where: str, allowed: tuple[str, ...]) -> dict[str, Node] | None:
        """Keys of a mapping node; a null value counts as an empty mapping."""
        if _is_null(node):
            return {}
        if not isinstance(node, MappingNode):
            self.error(node, f"{where}: expected a mapping, got {_describe(node)}")
            return None
        out: dict[str, Node] = {}
        first: dict[str, Node] = {}
        for knode, vnode in node.value:
            if not (isinstance(knode, ScalarNode) and knode.tag == _STR):
                if isinstance(knode, ScalarNode) and knode.tag == "tag:yaml.org,2002:merge":
                    self.error(knode, f"{where}: merge keys ('<<') are not supported")
                else:
                    self.error(knode, f"{where}: keys must be strings, got {_describe(knode)}")
                continue
            name = knode.value
            if name in first:
                self.error(
                    knode,
                    f"{where}: duplicate key '{name}' (first at line {first[name].start_mark.line + 1})",
                )
                continue
            first[name] = knode
            if name not in allowed:
                hint = difflib.get_close_matches(name, allowed, n=1)
                suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
                self.error(
                    knode,
                    f"{where}: unknown key '{name}' (allowed: {', '.join(allowed)}){suggestion}",
                )
                continue
            out[name] = vnode
        return out

    def scalar_of(self, node: Node, where: str, tags: tuple[str, ...], expected: str):
        if not isinstance(node, ScalarNode) or node.tag not in tags:
            self.error(node, f"{where}: expected {expected}, got {_describe(node)}")
            return _ABSENT
        return self.construct(node, where)

    def string(self, node: Node, where: str) -> str | object:
        return self.scalar_of(node, where, (_STR,), "a string")

    def glob(self, node: Node, where: str, empty_is_all: bool = False) -> Glob | None | object:
        value = self.string(node, where)
        if value is _ABSENT:
            return _ABSENT
        assert isinstance(value, str)
        if value == "":
            if empty_is_all:
                return MATCH_ALL
            self.error(node, f"{where}: empty glob matches nothing; remove the key instead")
            return _ABSENT
        problem = glob_problem(value)
        if problem:
            self.error(node, f"{where}: bad glob {value!r}: {problem}")
            return _ABSENT
        return Glob(value)

    def integer(self, node: Node, where: str, minimum: int) -> int | object:
        value = self.scalar_of(node, where, (_INT,), f"an integer >= {minimum}")
        if value is _ABSENT:
            return _ABSENT
        assert isinstance(value, int)
        if value < minimum:
            self.error(node, f"{where}: must be an integer >= {minimum}, got {value}")
            return _ABSENT
        return value

    # -- document

    def policy(self, root: Node) -> Policy | None:
        top = self.mapping(root, "policy", ("rules", "limits"))
        if top is None:
            return None
        if "rules" not in top:
            self.error(root, "policy: missing required key 'rules'")
        rules = self.rules(top["rules"]) if "rules" in top else ()
        limits = self.limits(top["limits"]) if "limits" in top else Limits()
        if rules is None or limits is None:
            return None
        return Policy(rules=rules, limits=limits, source=self.filename)

    def rules(self, node: Node) -> tuple[Rule, ...] | None:
        if _is_null(node):
            return ()
        if not isinstance(node, SequenceNode):
            self.error(node, f"rules: expected a list of rules, got {_describe(node)}")
            return None
        out: list[Rule] = []
        seen: dict[str, int] = {}
        ok = True
        for i, rnode in enumerate(node.value):
            rule = self.rule(rnode, i, seen)
            if rule is None:
                ok = False
            else:
                out.append(rule)
        return tuple(out) if ok else None

    def rule(self, node: Node, index: int, seen: dict[str, int]) -> Rule | None:
        where = f"rules[{index}]"
        keys = self.mapping(node, where, ("name", "match", "when", "action"))
        if keys is None:
            return None
        name: object = _ABSENT
        if "name" not in keys:
            self.error(node, f"{where}: missing required key 'name'")
        else:
            name = self.string(keys["name"], f"{where}.name")
            if name == "":
                self.error(keys["name"], f"{where}.name: must not be empty")
                name = _ABSENT
            elif isinstance(name, str):
                line = keys["name"].start_mark.line + 1
                if name in seen:
                    self.error(
                        keys["name"], f"{where}.name: duplicate rule name {name!r} (first at line {seen[name]})"
                    )
                else:
                    seen[name] = line
                    where = f"rule {name!r}"
        match = self.match(keys.get("match"), where)
        when = self.when(keys.get("when"), where)
        pull: object = _ABSENT
        if "action" not in keys or _is_null(keys["action"]):
            self.error(keys.get("action", node), f"{where}: rule has no action (expected 'action: {{pull: ...}}')")
        else:
            pull = self.action(keys["action"], where)
        parts = (name, match, when, pull)
        if any(p is _ABSENT for p in parts):
            return None
        return Rule(name=name, match=match, when=when, pull=pull, line=node.start_mark.line + 1)  # type: ignore[arg-type]

    def match(self, node: Node | None, where: str) -> Match | object:
        if node is None:
            return Match()
        keys = self.mapping(node, f"{where}: match", ("domain", "disk"))
        if keys is None:
            return _ABSENT
        domain = self.glob(keys["domain"], f"{where}: match.domain", True) if "domain" in keys else MATCH_ALL
        disk = self.glob(keys["disk"], f"{where}: match.disk", True) if "disk" in keys else MATCH_ALL
        if domain is _ABSENT or disk is _ABSENT:
            return _ABSENT
        return Match(domain=domain, disk=disk)  # type: ignore[arg-type]

    def when(self, node: Node | None, where: str) -> When | object:
        if node is None:
            return When()
        keys = self.mapping(node, f"{where}: when", ("min_backing_depth", "backing_file"))
        if keys is None:
            return _ABSENT
        depth: object = None
        backing: object = None
        if "min_backing_depth" in keys:
            depth = self.integer(keys["min_backing_depth"], f"{where}: when.min_backing_depth", 1)
        if "backing_file" in keys:
            backing = self.glob(keys["backing_file"], f"{where}: when.backing_file")
        if depth is _ABSENT or backing is _ABSENT:
            return _ABSENT
        return When(min_backing_depth=depth, backing_file=backing)  # type: ignore[arg-type]

    def action(self, node: Node, where: str) -> PullAction | object:
        keys = self.mapping(node, f"{where}: action", ("pull",))
        if keys is None:
            return _ABSENT
        if "pull" not in keys:
            self.error(node, f"{where}: rule has no action (expected 'action: {{pull: ...}}')")
            return _ABSENT
        pkeys = self.mapping(keys["pull"], f"{where}: action.pull", ("bandwidth", "keep_base"))
        if pkeys is None:
            return _ABSENT
        bandwidth: object = 0
        keep_base: object = None
        if "bandwidth" in pkeys:
            bandwidth = self.bandwidth(pkeys["bandwidth"], f"{where}: action.pull.bandwidth")
        if "keep_base" in pkeys:
            keep_base = self.glob(pkeys["keep_base"], f"{where}: action.pull.keep_base")
        if bandwidth is _ABSENT or keep_base is _ABSENT:
            return _ABSENT
        return PullAction(bandwidth_bytes=bandwidth, keep_base=keep_base)  # type: ignore[arg-type]

    def bandwidth(self, node: Node, where: str) -> int | object:
        value = self.scalar_of(
            node, where, (_INT, _STR), "a bandwidth such as 50MiB/s or an integer in bytes/s"
        )
        if value is _ABSENT:
            return _ABSENT
        try:
            return parse_bandwidth(value)  # type: ignore[arg-type]
        except ValueError as e:
            self.error(node, f"{where}: {e}")
            return _ABSENT

    def duration(self, node: Node, where: str) -> float | object:
        if isinstance(node, ScalarNode) and node.tag == _INT and node.value.strip() == "0":
            return 0.0
        if isinstance(node, ScalarNode) and node.tag == _INT:
            self.error(node, f"{where}: duration {node.value!r} needs a unit, e.g. {node.value}s or {node.value}m")
            return _ABSENT
        value = self.string(node, where)
        if value is _ABSENT:
            return _ABSENT
        try:
            return parse_duration(value)  # type: ignore[arg-type]
        except ValueError as e:
            self.error(node, f"{where}: {e}")
            return _ABSENT

    def limits(self, node: Node) -> Limits | None:
        keys = self.mapping(
            node,
            "limits",
            (
                "max_concurrent",
                "windows",
                "abort_outside_window",
                "retry_after",
                "min_free_space_ratio",
                "max_attempts",
            ),
        )
        if keys is None:
            return None
        values: dict[str, object] = {}
        if "max_concurrent" in keys:
            values["max_concurrent"] = self.integer(keys["max_concurrent"], "limits.max_concurrent", 1)
        if "max_attempts" in keys:
            values["max_attempts"] = self.integer(keys["max_attempts"], "limits.max_attempts", 1)
        if "abort_outside_window" in keys:
            values["abort_outside_window"] = self.scalar_of(
                keys["abort_outside_window"], "limits.abort_outside_window", (_BOOL,), "true or false"
            )
        if "retry_after" in keys:
            values["retry_after"] = self.duration(keys["retry_after"], "limits.retry_after")
        if "min_free_space_ratio" in keys:
            values["min_free_space_ratio"] = self.ratio(keys["min_free_space_ratio"])
        if "windows" in keys:
            values["windows"] = self.windows(keys["windows"])
        if any(v is _ABSENT for v in values.values()):
            return None
        return Limits(**values)  # type: ignore[arg-type]

    def ratio(self, node: Node) -> float | object:
        where = "limits.min_free_space_ratio"
        value = self.scalar_of(node, where, (_INT, _FLOAT), "a number >= 1.0")
        if value is _ABSENT:
            return _ABSENT
        value = float(value)  # type: ignore[arg-type]
        if math.isnan(value) or math.isinf(value) or value < 1.0:
            self.error(
                node,
                f"{where}: must be a number >= 1.0 (a pull must fit on the overlay's filesystem), got {node.value}",
            )
            return _ABSENT
        return value

    def windows(self, node: Node) -> tuple[Window, ...] | object:
        if not isinstance(node, SequenceNode):
            self.error(node, f"limits.windows: expected a list of windows, got {_describe(node)}")
            return _ABSENT
        if not node.value:
            self.error(node, "limits.windows: empty list would never allow a start; remove the key to allow any time")
            return _ABSENT
        out = [self.window(w, f"limits.windows[{i}]") for i, w in enumerate(node.value)]
        if any(w is _ABSENT for w in out):
            return _ABSENT
        return tuple(out)  # type: ignore[arg-type]

    def window(self, node: Node, where: str) -> Window | object:
        keys = self.mapping(node, where, ("days", "start", "end"))
        if keys is None:
            return _ABSENT
        days: object = tuple(range(7))
        if "days" in keys:
            days = self.days(keys["days"], f"{where}.days")
        times: dict[str, object] = {}
        for k in ("start", "end"):
            if k not in keys:
                self.error(node, f"{where}: missing required key '{k}'")
                times[k] = _ABSENT
            else:
                times[k] = self.hhmm(keys[k], f"{where}.{k}")
        if days is _ABSENT or _ABSENT in times.values():
            return _ABSENT
        if times["start"] == times["end"]:
            self.error(node, f"{where}: empty window (start equals end {_hhmm(times['start'])})")  # type: ignore[arg-type]
            return _ABSENT
        return Window(days=days, start_minute=times["start"], end_minute=times["end"])  # type: ignore[arg-type]

    def days(self, node: Node, where: str) -> tuple[int, ...] | object:
        if not isinstance(node, SequenceNode):
            self.error(node, f"{where}: expected a list of day names (mon..sun), got {_describe(node)}")
            return _ABSENT
        if not node.value:
            self.error(node, f"{where}: empty list; the window would never open")
            return _ABSENT
        out: set[int] = set()
        ok = True
        for dnode in node.value:
            if not (isinstance(dnode, ScalarNode) and dnode.tag == _STR):
                self.error(dnode, f"{where}: expected a day name (mon..sun), got {_describe(dnode)}")
                ok = False
                continue
            name = dnode.value.strip().lower()
            if name not in DAYS:
                self.error(dnode, f"{where}: bad day name {dnode.value!r}; expected one of {', '.join(DAYS)}")
                ok = False
                continue
            out.add(DAYS.index(name))
        return tuple(sorted(out)) if ok else _ABSENT

    def hhmm(self, node: Node, where: str) -> int | object:
        # Unquoted 22:00 is a YAML 1.1 base-60 integer; the raw text is what the user meant.
        if not (isinstance(node, ScalarNode) and node.tag in (_STR, _INT)):
            self.error(node, f"{where}: expected a time \"HH:MM\", got {_describe(node)}")
            return _ABSENT
        try:
            return parse_hhmm(node.value)
        except ValueError as e:
            self.error(node, f"{where}: {e}")
            return _ABSENT
