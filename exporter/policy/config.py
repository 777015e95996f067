"""Policy file: YAML in, frozen dataclasses out, through the shared loader (``exporter.configfile``).

The whole tree is walked even after the first problem so one run of ``policy check`` lists
everything that is wrong, each with its line.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from datetime import datetime, time as dtime, timedelta
from functools import partial
from typing import Callable

from yaml.nodes import Node, ScalarNode

from exporter.configfile import ABSENT, INT, STR, ConfigError, Reader, describe, is_null, load, short

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # index = datetime.weekday()


class PolicyError(ConfigError):
    """Every problem found in one policy file, in file order."""


@dataclass(frozen=True)
class Glob:
    """A shell-style pattern (``fnmatch``, case-sensitive, ``*`` also matches ``/``), compiled at load
    time because evaluation runs after every poll and job end."""

    pattern: str
    _regex: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_regex", re.compile(fnmatch.translate(self.pattern)))

    def matches(self, value: str) -> bool:
        return self._regex.match(value) is not None


MATCH_ALL = Glob("*")

# A bracket expression as fnmatch.translate reads it: '!' and a first ']' belong to it.
_BRACKET = re.compile(r"\[!?+\]?+[^\]]*+\]|\[")


def glob_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a usable glob: fnmatch takes an unclosed ``[`` literally, almost always a typo."""
    m = next((m for m in _BRACKET.finditer(pattern) if m.group() == "["), None)
    return None if m is None else f"unbalanced '[' at position {m.start() + 1}"


_BANDWIDTH_UNITS = {"B": 1, "KB": 1000, "kB": 1000, "MB": 1000**2, "GB": 1000**3,
                    "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
# Bytes/s as a bare integer (read exactly), or a number with a unit.
_BANDWIDTH_RE = re.compile(r"(\d{1,20})|(\d{1,20}(?:\.\d{1,20})?)\s*(B|KB|kB|MB|GB|KiB|MiB|GiB)/s", re.ASCII)
_MAX_BANDWIDTH = 2**63 - 1


def parse_bandwidth(value: int | str) -> int:
    """Bytes per second; 0 means unlimited."""
    if isinstance(value, bool):
        raise ValueError("bad bandwidth: expected bytes/s, got a boolean")
    result = value
    if not isinstance(value, int):
        m = _BANDWIDTH_RE.fullmatch(value.strip())
        if m is None:
            raise ValueError(f"bad bandwidth {short(value)}: expected an integer (bytes/s) or a number with "
                             "B/s, KB/s, MB/s, GB/s, KiB/s, MiB/s or GiB/s, e.g. 50MiB/s")
        result = int(m[1]) if m[1] else round(float(m[2]) * _BANDWIDTH_UNITS[m[3]])  # < 1e31: no overflow
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
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"


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
        return ((wd in self.days and minute >= self.start_minute)
                or ((wd - 1) % 7 in self.days and minute < self.end_minute))

    def next_opening(self, now: datetime) -> datetime:
        """The next start of this window strictly after ``now`` (wall-clock, DST ignored)."""
        start = dtime(self.start_minute // 60, self.start_minute % 60, tzinfo=now.tzinfo)
        for offset in range(8):
            t = datetime.combine(now.date() + timedelta(days=offset), start)
            if t.weekday() in self.days and t > now:
                return t
        raise AssertionError("a window with days opens within 8 days")


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
    max_concurrent: int = 1
    windows: tuple[Window, ...] | None = None  # None = starts allowed at any time
    abort_outside_window: bool = False
    retry_after: float = 3600.0  # seconds
    min_free_space_ratio: float = 1.1
    max_attempts: int = 3

    def in_window(self, now: datetime) -> bool:
        return self.windows is None or any(w.contains(now) for w in self.windows)

    def next_opening(self, now: datetime) -> datetime | None:
        return None if self.windows is None else min(w.next_opening(now) for w in self.windows)


@dataclass(frozen=True)
class FleetTLS:
    ca_file: str | None = None  # None: the system's CAs
    cert_file: str | None = None  # client certificate (with key_file) for mutual TLS
    key_file: str | None = None
    verify: bool = True


@dataclass(frozen=True)
class FleetDigest:
    username: str
    password_file: str  # read at connect time: the policy file stays free of secrets


@dataclass(frozen=True)
class Fleet:
    """A pull budget shared through ZooKeeper by every exporter using the same ``path``."""

    zookeeper: str  # kazoo connection string: host:port[,host:port...][/chroot]
    path: str
    max_concurrent: int
    session_timeout: float = 10.0
    timeout: float = 5.0  # one ZooKeeper operation (a lease taken, the leases listed)
    host_lost_after: float = 1800.0  # a host silent this long loses its leases
    tls: FleetTLS | None = None
    digest_auth: FleetDigest | None = None


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...]
    limits: Limits
    source: str = ""  # file name it was loaded from
    fleet: Fleet | None = None  # None: no fleet-wide budget

    @property
    def rule_names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.rules)


MAX_RULES = 1000
MAX_WINDOWS = 100
MAX_DAYS = 100  # entries of one window's day list (repeats allowed)
MAX_COUNT = 1_000_000  # max_concurrent, max_attempts, min_backing_depth (a big one means "no limit")
MAX_RETRY_AFTER = 365 * 86400.0
MAX_RATIO = 100.0
MAX_TEXT = 4096  # characters of a rule name or a glob
MAX_FLEET_PULLS = 10_000  # fleet max_concurrent: every lease is listed on each sync
MAX_CONNECT = 1024  # characters of the ZooKeeper connection string
MAX_ZK_HOSTS = 32
MAX_ZK_PATH = 512
MAX_ZK_PATH_DEPTH = 16

ReadFn = Callable[[Reader, Node, str], object]  # (reader, value node, where) -> value or ABSENT


def load_policy(path: str) -> Policy:
    return parse_policy(None, path)


def parse_policy(text: str | None, filename: str) -> Policy:
    """Parse ``text`` (or read ``filename`` when None), raising PolicyError with every problem found."""
    try:
        return load(filename, "policy file", _policy, text=text)[0]
    except ConfigError as e:
        raise PolicyError(e.problems) from None


def _section(r: Reader, node: Node | None, where: str, readers: dict[str, ReadFn], make: Callable = dict,
             required: tuple[str, ...] = (), prefix: str | None = None):
    """``make(**values)`` of a mapping's keys, read in file order by their readers as ``{prefix}{key}``
    (prefix ``where.`` unless given); ABSENT after a problem."""
    keys = r.keys(node, where, tuple(readers))
    if keys is None:
        return ABSENT
    prefix = f"{where}." if prefix is None else prefix
    values = {k: readers[k](r, v, prefix + k) for k, v in keys.items()}
    missing = [k for k in required if k not in keys]
    for k in missing:
        r.error(node, f"{where}: missing required key '{k}'")
    return ABSENT if missing or ABSENT in values.values() else make(**values)


def _list(r: Reader, node: Node, where: str, expected: str, maximum: int, item: Callable[[Node, int], object],
          empty: str | None = None):
    """The items of a list read by ``item(node, index)``; ABSENT after a problem (``empty`` if it is one)."""
    items = r.sequence(node, where, expected, maximum)
    if items is None:
        return ABSENT
    if not items and empty:
        r.error(node, f"{where}: {empty}")
        return ABSENT
    out = [item(n, i) for i, n in enumerate(items)]
    return ABSENT if ABSENT in out else tuple(out)


def _policy(r: Reader, root: Node | None) -> Policy | None:
    if root is None:
        r.error(1, "policy file is empty; expected a mapping with 'rules'")
        return None
    top = _section(r, root, "policy", _TOP, required=("rules",), prefix="")
    return None if top is ABSENT else Policy(rules=top["rules"], limits=top.get("limits", Limits()), source=r.path,
                                              fleet=top.get("fleet"))


def _rules(r: Reader, node: Node, where: str):
    if is_null(node):
        return ()
    seen: dict[str, int] = {}  # rule name -> line
    return _list(r, node, where, "a list of rules", MAX_RULES, lambda rnode, i: _rule(r, rnode, i, seen))


def _text(r: Reader, node: Node, where: str, empty: str | None = None):
    """A string of at most MAX_TEXT characters; ``empty``, if given, is what is wrong with ""."""
    value = r.string(node, where)
    if value is not ABSENT and len(value) > MAX_TEXT:
        r.error(node, f"{where}: longer than {MAX_TEXT} characters")
        return ABSENT
    if value == "" and empty:
        r.error(node, f"{where}: {empty}")
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
        name = _text(r, keys["name"], f"{where}.name", "must not be empty")
        if name in seen:
            r.error(keys["name"], f"{where}.name: duplicate rule name {short(name)} (first at line {seen[name]})")
        elif name is not ABSENT:
            seen[name] = keys["name"].start_mark.line + 1
            where = f"rule {short(name)}"
    glob_or_all = partial(_glob, empty_is_all=True)
    match = _section(r, keys.get("match"), f"{where}: match", {"domain": glob_or_all, "disk": glob_or_all}, Match)
    when = _section(r, keys.get("when"), f"{where}: when", {"min_backing_depth": _count, "backing_file": _glob}, When)
    action = _section(r, keys.get("action"), f"{where}: action", {"pull": _pull})
    if action is not ABSENT and "pull" not in action:  # missing, null, empty or only unknown keys
        r.error(keys.get("action", node), f"{where}: rule has no action (expected 'action: {{pull: ...}}')")
        action = ABSENT
    if ABSENT in (name, match, when, action):
        return ABSENT
    return Rule(name, match, when, action["pull"], line=node.start_mark.line + 1)


def _glob(r: Reader, node: Node, where: str, empty_is_all: bool = False):
    value = _text(r, node, where, None if empty_is_all else "empty glob matches nothing; remove the key instead")
    if value is ABSENT:
        return ABSENT
    if value == "":  # only where empty_is_all: _text reported it otherwise
        return MATCH_ALL
    problem = glob_problem(value)
    if problem:
        r.error(node, f"{where}: bad glob {short(value)}: {problem}")
        return ABSENT
    return Glob(value)


_count = partial(Reader.integer, minimum=1, maximum=MAX_COUNT)


def _pull(r: Reader, node: Node, where: str):
    values = _section(r, node, where, {"bandwidth": _bandwidth, "keep_base": _glob})
    return values if values is ABSENT else PullAction(values.get("bandwidth", 0), values.get("keep_base"))


def _bandwidth(r: Reader, node: Node, where: str):
    value = r.scalar(node, where, (INT, STR), "a bandwidth such as 50MiB/s or an integer in bytes/s")
    try:
        return ABSENT if value is ABSENT else parse_bandwidth(value)
    except ValueError as e:
        r.error(node, f"{where}: {e}")
        return ABSENT


def _windows(r: Reader, node: Node, where: str):
    return _list(r, node, where, "a list of windows", MAX_WINDOWS, lambda w, i: _window(r, w, f"{where}[{i}]"),
                 empty="empty list would never allow a start; remove the key to allow any time")


def _window(r: Reader, node: Node, where: str):
    values = _section(r, node, where, {"days": _days, "start": _hhmm_value, "end": _hhmm_value},
                      required=("start", "end"))
    if values is ABSENT:
        return ABSENT
    start, end = values["start"], values["end"]
    if start == end:
        r.error(node, f"{where}: empty window (start equals end {start // 60:02d}:{start % 60:02d})")
        return ABSENT
    return Window(days=values.get("days", tuple(range(7))), start_minute=start, end_minute=end)


def _days(r: Reader, node: Node, where: str):
    days = _list(r, node, where, "a list of day names (mon..sun)", MAX_DAYS, lambda d, _: _day(r, d, where),
                 empty="empty list; the window would never open")
    return days if days is ABSENT else tuple(sorted(set(days)))


def _day(r: Reader, node: Node, where: str):
    name = r.scalar(node, where, (STR,), "a day name (mon..sun)")
    if name is ABSENT:
        return ABSENT
    if name.strip().lower() not in DAYS:
        r.error(node, f"{where}: bad day name {short(name)}; expected one of {', '.join(DAYS)}")
        return ABSENT
    return DAYS.index(name.strip().lower())


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


_LIMITS: dict[str, ReadFn] = {
    "max_concurrent": _count,
    "windows": _windows,
    "abort_outside_window": Reader.boolean,
    "retry_after": partial(Reader.duration, maximum=MAX_RETRY_AFTER),
    "min_free_space_ratio": partial(Reader.number, minimum=1.0, maximum=MAX_RATIO,
                                    why=" (a pull must fit on the overlay's filesystem)"),
    "max_attempts": _count,
}
_ZK_HOST = re.compile(r"(\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}))(?::(\d{1,5}))?", re.ASCII)
_ZK_NODE = re.compile(r"[A-Za-z0-9._:@+=-]{1,255}", re.ASCII)


def zk_path_problem(path: str) -> str | None:
    """Why ``path`` is not a ZooKeeper path we accept: absolute, plain characters, no reserved node."""
    if not path.startswith("/") or path == "/":
        return "must be an absolute path below / such as /libvirt-blockjob/pulls/ceph-a"
    if len(path) > MAX_ZK_PATH:
        return f"longer than {MAX_ZK_PATH} characters"
    parts = path[1:].split("/")
    if len(parts) > MAX_ZK_PATH_DEPTH:
        return f"more than {MAX_ZK_PATH_DEPTH} levels"
    for part in parts:
        if not part:
            return "empty path component (// or a trailing /)"
        if part in (".", "..") or not _ZK_NODE.fullmatch(part):
            return f"bad path component {short(part)}: use letters, digits and . _ : @ + = -"
    if parts[0] == "zookeeper":
        return "/zookeeper is reserved by ZooKeeper"
    return None


def zk_connect_problem(text: str) -> str | None:
    """Why ``text`` is not a ZooKeeper connection string (host:port[,host:port...][/chroot])."""
    if len(text) > MAX_CONNECT:
        return f"longer than {MAX_CONNECT} characters"
    hosts, slash, chroot = text.partition("/")
    if slash:
        problem = zk_path_problem("/" + chroot)
        if problem:
            return f"chroot: {problem}"
    items = hosts.split(",")
    if len(items) > MAX_ZK_HOSTS:
        return f"more than {MAX_ZK_HOSTS} servers"
    for item in items:
        m = _ZK_HOST.fullmatch(item.strip())
        if m is None:
            return f"bad server {short(item)}: expected host:port, e.g. zk1:2181"
        if m[2] is not None and not 1 <= int(m[2]) <= 65535:
            return f"bad port in {short(item)}: expected 1..65535"
    return None


def _checked(check: Callable[[str], str | None], r: Reader, node: Node, where: str):
    value = r.string(node, where)
    if value is ABSENT:
        return ABSENT
    problem = check(value)
    if problem:
        r.error(node, f"{where}: {problem}")
        return ABSENT
    return value


def _file(r: Reader, node: Node, where: str):
    return _text(r, node, where, "empty path")


def _username(r: Reader, node: Node, where: str):
    value = _text(r, node, where, "must not be empty")
    if value is not ABSENT and (len(value) > 256 or ":" in value or not value.isprintable()):
        r.error(node, f"{where}: at most 256 printable characters without ':'")
        return ABSENT
    return value


def _tls(r: Reader, node: Node, where: str):
    values = _section(r, node, where, {"ca_file": _file, "cert_file": _file, "key_file": _file,
                                       "verify": Reader.boolean}, FleetTLS)
    if values is not ABSENT and (values.cert_file is None) != (values.key_file is None):
        r.error(node, f"{where}: cert_file and key_file go together")
        return ABSENT
    return values


def _fleet(r: Reader, node: Node, where: str):
    readers: dict[str, ReadFn] = {
        "zookeeper": partial(_checked, zk_connect_problem),
        "path": partial(_checked, zk_path_problem),
        "max_concurrent": partial(Reader.integer, minimum=1, maximum=MAX_FLEET_PULLS),
        "session_timeout": partial(Reader.duration, maximum=120.0),
        "timeout": partial(Reader.duration, maximum=60.0),
        "host_lost_after": partial(Reader.duration, maximum=30 * 86400.0),
        "tls": _tls,
        "digest_auth": partial(_section, readers={"username": _username, "password_file": _file},
                               make=FleetDigest, required=("username", "password_file")),
    }
    fleet = _section(r, node, where, readers, Fleet, required=("zookeeper", "path", "max_concurrent"))
    if fleet is ABSENT:
        return ABSENT
    problems = []
    if fleet.session_timeout < 2.0:
        problems.append(f"{where}.session_timeout: must be at least 2s")
    if fleet.timeout < 0.1:
        problems.append(f"{where}.timeout: must be at least 100ms")
    if fleet.host_lost_after < max(10.0, 3 * fleet.session_timeout):
        problems.append(f"{where}.host_lost_after: must be at least 10s and 3 x session_timeout, so a host that "
                        "is merely restarting keeps its leases")
    for problem in problems:
        r.error(node, problem)
    return ABSENT if problems else fleet


_TOP: dict[str, ReadFn] = {"rules": _rules, "limits": partial(_section, readers=_LIMITS, make=Limits),
                           "fleet": _fleet}
