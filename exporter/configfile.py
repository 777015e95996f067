"""The one loader of our YAML files: the policy, the web config and the alert thresholds.

Hand-written over PyYAML's node tree because every message needs a line, which a node carries and a
loaded dict does not, and because a loaded dict has lost tags the files depend on (unquoted ``22:30``
is a base-60 integer but means a time); see docs/policy.md#errors. Every bound below, and an exception
while reading a value, gives a ``FILE[:LINE]: message``, never a traceback.
"""

from __future__ import annotations

import difflib
import errno
import math
import os
import stat
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterable, TypeVar

import yaml
from yaml.composer import ComposerError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .durations import parse_duration

MAX_BYTES = 1 << 20  # read at most (and one more byte to tell)
MAX_DEPTH = 32
MAX_NODES = 20_000  # bounds the time of pure-Python parsing; an alias counts its subtree at every use
MAX_PROBLEMS = 100  # listed; the rest are counted

STR = "tag:yaml.org,2002:str"
INT = "tag:yaml.org,2002:int"
FLOAT = "tag:yaml.org,2002:float"
BOOL = "tag:yaml.org,2002:bool"
NULL = "tag:yaml.org,2002:null"
MERGE = "tag:yaml.org,2002:merge"
_KIND = {STR: "a string", INT: "an integer", FLOAT: "a number", BOOL: "a boolean",
         NULL: "nothing (null)", "tag:yaml.org,2002:timestamp": "a date"}

ABSENT = object()  # a value that was wrong (and reported) or missing
T = TypeVar("T")


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None  # 1-based; None when the problem is not tied to a line (unreadable file)
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.message}" if self.line is None else f"{self.file}:{self.line}: {self.message}"


class ConfigError(Exception):
    """Every problem found in one file, in file order, at most MAX_PROBLEMS and a count of the rest."""

    def __init__(self, problems: Iterable[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def short(value: str) -> str:
    """``repr`` of a value for a message, cut so a huge value cannot make a huge message."""
    return repr(value if len(value) <= 40 else value[:37] + "...")


def describe(node: Node, echo: bool = True) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    kind = _KIND.get(node.tag, f"a value tagged {node.tag}")
    return kind if node.tag == NULL or not echo else f"{kind} ({short(node.value)})"


def is_null(node: Node | None) -> bool:
    return node is None or (isinstance(node, ScalarNode) and node.tag == NULL)


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer stops at MAX_DEPTH levels and MAX_NODES values, aliases included."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._depth = self._count = 0
        self._sizes: dict[int, int] = {}  # id(node) -> values in its subtree, once composed

    def _add(self, values: int, mark) -> None:
        self._count += values
        if self._count > MAX_NODES:
            message = f"more than {MAX_NODES} values (an alias counts everything it repeats)"
            raise ComposerError(None, None, message, mark)

    def compose_node(self, parent, index):
        mark = self.peek_event().start_mark
        if self.check_event(yaml.AliasEvent):
            node = super().compose_node(parent, index)
            if id(node) not in self._sizes:
                raise ComposerError(None, None, "an alias refers to a value that contains it", mark)
            self._add(self._sizes[id(node)], mark)
            return node
        if self._depth >= MAX_DEPTH:
            raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", mark)
        start = self._count
        self._add(1, mark)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._sizes[id(node)] = self._count - start
        return node


def _syntax_problem(path: str, text: str, e: yaml.YAMLError) -> Problem:
    if isinstance(e, yaml.reader.ReaderError):
        return Problem(path, text[: e.position].count("\n") + 1, f"YAML syntax error: {e.reason}")
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        msg = e.problem or e.context or "invalid YAML"
        if e.context and e.problem:
            ctx = e.context
            if e.context_mark is not None and mark is not None and e.context_mark.line != mark.line:
                ctx += f" started at line {e.context_mark.line + 1}"
            msg = f"{msg} ({ctx})"
        return Problem(path, mark.line + 1 if mark else None, f"YAML syntax error: {msg}")
    return Problem(path, None, f"YAML syntax error: {e}")  # pragma: no cover - all carry a mark


def compose(text: str, path: str) -> Node | None:
    """The node tree of ``text`` (None when empty); ConfigError with the line otherwise."""
    try:  # the loader's constructor already rejects characters YAML does not allow
        loader = _BoundedLoader(text)
        try:
            return loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise ConfigError([_syntax_problem(path, text, e)]) from None


def open_file(path: str) -> BinaryIO:
    """``open(path, "rb")`` that cannot block: a FIFO or socket is refused (OSError), not waited on."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    if stat.S_ISFIFO(os.fstat(fd).st_mode) or stat.S_ISSOCK(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "a FIFO or socket, not a file")
    return os.fdopen(fd, "rb")


def read_bounded(path: str, limit: int) -> bytes | None:
    """The file's bytes, or None if it holds more than ``limit``: reads at most ``limit`` + 1, so
    ``/dev/zero`` cannot grow memory. OSError if it cannot be read (a FIFO or socket included)."""
    with open_file(path) as f:
        raw = f.read(limit + 1)
    return raw if len(raw) <= limit else None


def read_text(path: str, what: str) -> str:
    """The file's text, at most MAX_BYTES of it."""
    try:
        raw = read_bounded(path, MAX_BYTES)
    except OSError as e:
        raise ConfigError([Problem(path, None, f"cannot read {what}: {e.strerror or e}")]) from None
    if raw is None:
        raise ConfigError([Problem(path, None, f"{what} is larger than {MAX_BYTES // 1024} KiB")])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([Problem(path, raw[: e.start].count(b"\n") + 1, "file is not valid UTF-8")]) from None


class Reader:
    """Walks a node tree collecting problems; each accessor returns ABSENT after reporting one."""

    echo = True  # whether type errors quote the value (not where it may be a secret)

    def __init__(self, path: str) -> None:
        self.path = path
        self.problems: list[Problem] = []
        self.omitted = 0
        self.warnings: list[str] = []
        self.at: Node | None = None  # the value being read, for an unexpected exception's line
        self._ctor = yaml.constructor.SafeConstructor()

    # -- reporting

    def _line(self, where: Node | int | None) -> int | None:
        return where.start_mark.line + 1 if isinstance(where, Node) else where

    def error(self, where: Node | int | None, message: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(Problem(self.path, self._line(where), message))
        else:
            self.omitted += 1

    @property
    def count(self) -> int:  # problems found so far, kept or not
        return len(self.problems) + self.omitted

    def absent(self, where: Node | int | None, message: str):
        """ABSENT, for an accessor to return after reporting ``message``."""
        self.error(where, message)
        return ABSENT

    def warn(self, where: Node | int | None, message: str) -> None:
        self.warnings.append(str(Problem(self.path, self._line(where), message)))

    def final_problems(self) -> list[Problem]:
        out = sorted(self.problems, key=lambda p: p.line or 0)
        if self.omitted:
            out.append(Problem(self.path, None, f"... and {self.omitted} more problems"))
        return out

    # -- structure

    def mapping(self, node: Node | None, where: str, allowed: tuple[str, ...] | None = None,
                merge: bool = False, any_scalar_key: bool = False) -> list[tuple[str, Node, Node]] | None:
        """(key, key node, value node) in file order; null is an empty mapping, None if not a mapping.

        With ``allowed``, other keys are reported (with a did-you-mean) and left out. ``merge``
        resolves ``<<`` merge keys (Go's yaml.v2 does); without it they are an error.
        """
        self.at = node
        if is_null(node):
            return []
        if not isinstance(node, MappingNode):
            self.error(node, f"{where}: expected a mapping, got {describe(node, self.echo)}")
            return None
        if merge:
            try:
                self._ctor.flatten_mapping(node)
            except yaml.MarkedYAMLError as e:
                self.error(e.problem_mark.line + 1 if e.problem_mark else node, f"{where}: {e.problem}")
                return None
        out: list[tuple[str, Node, Node]] = []
        first: dict[str, Node] = {}
        for knode, vnode in node.value:
            scalar = isinstance(knode, ScalarNode) and not is_null(knode)
            if not (scalar and (any_scalar_key or knode.tag == STR)):
                if isinstance(knode, ScalarNode) and knode.tag == MERGE:
                    self.error(knode, f"{where}: merge keys ('<<') are not supported")
                else:
                    self.error(knode, f"{where}: keys must be strings, got {describe(knode, self.echo)}")
                continue
            key = knode.value
            if key in first:
                self.error(knode, f"{where}: duplicate key {key!r} (first at line {first[key].start_mark.line + 1})")
                continue
            first[key] = knode
            if allowed is not None and key not in allowed:
                self.unknown_key(knode, key, where, allowed)
                continue
            out.append((key, knode, vnode))
        return out

    def keys(self, node: Node | None, where: str, allowed: tuple[str, ...]) -> dict[str, Node] | None:
        """A mapping's known keys -> value nodes."""
        pairs = self.mapping(node, where, allowed)
        return None if pairs is None else {k: v for k, _, v in pairs}

    def unknown_key(self, knode: Node, key: str, where: str, allowed: Iterable[str]) -> None:
        allowed = tuple(allowed)
        hint = difflib.get_close_matches(key, allowed, n=1)
        self.error(knode, f"{where}: unknown key {short(key)} (allowed: {', '.join(allowed)})"
                   + (f"; did you mean {hint[0]!r}?" if hint else ""))

    def sequence(self, node: Node, where: str, expected: str, maximum: int) -> list[Node] | None:
        self.at = node
        if not isinstance(node, SequenceNode):
            self.error(node, f"{where}: expected {expected}, got {describe(node, self.echo)}")
            return None
        if len(node.value) > maximum:
            self.error(node, f"{where}: more than {maximum} items")
            return None
        return node.value

    # -- scalars

    def scalar(self, node: Node, where: str, tags: tuple[str, ...], expected: str):
        """The constructed value of a scalar with one of ``tags``."""
        self.at = node
        if not isinstance(node, ScalarNode) or node.tag not in tags:
            return self.absent(node, f"{where}: expected {expected}, got {describe(node, self.echo)}")
        try:
            return self._ctor.construct_object(node, deep=True)
        except Exception as e:  # ValueError for a 5,000-digit integer, bad dates, ...
            why = getattr(e, "problem", None) or e
            return self.absent(node, f"{where}: cannot read value {short(node.value)}: {why}")

    def string(self, node: Node, where: str):
        return self.scalar(node, where, (STR,), "a string")

    def boolean(self, node: Node, where: str):
        return self.scalar(node, where, (BOOL,), "true or false")

    def integer(self, node: Node, where: str, minimum: int, maximum: int):
        value = self.scalar(node, where, (INT,), f"an integer >= {minimum}")
        if value is ABSENT:
            return ABSENT
        if value < minimum:
            return self.absent(node, f"{where}: must be an integer >= {minimum}, got {value}")
        if value > maximum:
            return self.absent(node, f"{where}: must be an integer <= {maximum}, got {short(node.value)}")
        return value

    def number(self, node: Node, where: str, minimum: float, maximum: float, why: str = ""):
        value = self.scalar(node, where, (INT, FLOAT), f"a number >= {minimum}")
        if value is ABSENT:
            return ABSENT
        value = math.inf if isinstance(value, int) and abs(value) > 1e300 else float(value)
        if not value >= minimum:  # NaN too
            return self.absent(node, f"{where}: must be a number >= {minimum}{why}, got {short(node.value)}")
        if value > maximum:
            return self.absent(node, f"{where}: must be a number <= {maximum:g}, got {short(node.value)}")
        return value

    def duration(self, node: Node, where: str, maximum: float):
        """Seconds; the integer 0 is a duration too, any other bare number lacks its unit."""
        self.at = node
        if isinstance(node, ScalarNode) and node.tag == INT:
            if node.value.strip() == "0":
                return 0.0
            number = node.value[:20]
            return self.absent(node, f"{where}: duration {short(node.value)} needs a unit, e.g. {number}s or {number}m")
        if not (isinstance(node, ScalarNode) and node.tag == STR):
            got = describe(node, self.echo)
            return self.absent(node, f"{where}: expected a duration such as 30s or 1.5m, got {got}")
        try:
            return parse_duration(node.value, maximum)
        except ValueError as e:
            return self.absent(node, f"{where}: {e}")


def load(path: str, what: str, walk: Callable[[Reader, Node | None], T],
         reader: Reader | None = None, text: str | None = None) -> tuple[T, Reader]:
    """Read ``path`` (or ``text``) within the bounds and run ``walk`` over its node tree.

    Raises ConfigError with every problem, ``walk``'s exceptions included (on the line of the
    value being read), so that no input gives a traceback.
    """
    r = reader or Reader(path)
    if text is None:
        text = read_text(path, what)
    elif len(text) > MAX_BYTES:
        raise ConfigError([Problem(path, None, f"{what} is larger than {MAX_BYTES // 1024} KiB")])
    root = compose(text, path)
    try:
        result = walk(r, root)
    except Exception as e:  # a bug or a case missed: still the file's line, not a traceback
        r.error(r.at, f"cannot read this value: {type(e).__name__}: {e}")
    if r.problems:
        raise ConfigError(r.final_problems())
    return result, r
