"""Fuzz tests of the config loaders (the policy file and ``--web.config.file``, both through
``exporter.configfile``): whatever the input, the loader returns a config or raises its error, and
every line of that error is ``FILE:LINE: message`` (LINE within the file) or ``FILE: message``;
never another exception, and within bounded time (the hypothesis deadline) and memory (the
tracemalloc peak of one load).

Inputs: arbitrary bytes; byte-level mutations of valid files; YAML documents built from the
files' own keys and odd values (nested block and flow collections, anchors and aliases, merge
keys, tags, complex keys, huge and odd numbers, base-60 times, NaN, control and non-BMP
characters, several documents); and the bounds themselves (alias bombs, deep nesting, a file at
the size limit).

Characters YAML does not allow in a stream (C0 controls but tab and newlines, DEL, C1 but NEL,
surrogates, U+FFFE/U+FFFF) are problems with their line like any other
(``test_a_character_yaml_does_not_allow_...``).

String values never start with "/" (or name another directory), so that the web config's
certificate keys only ever name files in the test's own directory; the special files are a
separate test.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import tracemalloc
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from exporter.configfile import MAX_BYTES, MAX_DEPTH, MAX_NODES
from exporter.policy.config import Policy, PolicyError, load_policy, parse_policy
from exporter.webconfig import WebConfig, WebConfigError, load_web_config

REPO = Path(__file__).resolve().parent.parent
PEAK_BYTES = 64 * 1024**2  # one load of a file at MAX_BYTES or MAX_NODES peaks near 25 MiB
FUZZ = settings(deadline=timedelta(seconds=10), suppress_health_check=[HealthCheck.too_slow,
                                                                     HealthCheck.data_too_large])

POLICY_EXAMPLE = (REPO / "config" / "policy.example.yml").read_text()
WEB_EXAMPLE = """\
tls_server_config:
  cert_file: server.crt
  key_file: server.key
  client_auth_type: RequireAndVerifyClientCert
  client_ca_file: ca.crt
  min_version: TLS12
  cipher_suites: [TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256]
http_server_config:
  http2: false
  headers:
    X-Frame-Options: deny
basic_auth_users:
  alice: $2b$04$abcdefghijklmnopqrstuu5Qe3eP0rHDBBjWZFOxvZxvM7HwfXj9e
rate_limit:
  interval: 1s
  burst: 10
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# ------------------------------------------------------------------ the property


def _check_error_lines(text: str, path: str, lines: list[str]) -> None:
    assert lines, "an error with no problem in it"
    last_line = len(re.split("\r\n|[\r\n\x85\u2028\u2029]", text))  # YAML's line breaks
    for line in lines:
        assert line.startswith(path + ":"), f"not FILE:...: {line!r}"
        rest = line[len(path) + 1:]
        m = re.fullmatch(r"(?:(\d+): | )(\S.*)", rest, re.DOTALL)
        assert m is not None and "\n" not in rest, f"not FILE:LINE: message or FILE: message: {line!r}"
        if m.group(1) is not None:
            assert 1 <= int(m.group(1)) <= last_line, f"line {m.group(1)} is outside the file: {line!r}"


def _bounded(load, *args):
    """Run one load; returns (result or exception, peak bytes)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        try:
            outcome = load(*args)
        except (PolicyError, WebConfigError) as e:
            outcome = e
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BYTES, f"peak {peak / 1024**2:.1f} MiB"
    return outcome


def _check_policy_text(text: str, path: str) -> None:
    outcome = _bounded(parse_policy, text, path)
    if isinstance(outcome, PolicyError):
        _check_error_lines(text, path, str(outcome).split("\n"))
        assert [str(p) for p in outcome.problems] == str(outcome).split("\n")
    else:
        assert isinstance(outcome, Policy)


def check_policy_text(text: str, path: str) -> None:
    _check_policy_text(text, path)


def check_files(workdir: Path, data: bytes) -> None:
    """Both loaders on the same bytes, read from a file."""
    text = data.decode("utf-8", "replace")
    for name, load, error, kind in (("policy.yml", load_policy, PolicyError, Policy),
                                    ("web.yml", load_web_config, WebConfigError, WebConfig)):
        path = workdir / name
        path.write_bytes(data)
        outcome = _bounded(load, str(path))
        if isinstance(outcome, error):
            _check_error_lines(text, str(path), str(outcome).split("\n"))
        else:
            assert isinstance(outcome, kind)


# ------------------------------------------------------------------ YAML documents

POLICY_KEYS = ("rules", "limits", "name", "match", "when", "action", "pull", "domain", "disk",
               "min_backing_depth", "backing_file", "bandwidth", "keep_base", "max_concurrent", "windows",
               "days", "start", "end", "abort_outside_window", "retry_after", "min_free_space_ratio",
               "max_attempts")
WEB_KEYS = ("tls_server_config", "http_server_config", "basic_auth_users", "rate_limit", "cert_file",
            "key_file", "cert", "key", "client_ca", "client_ca_file", "client_auth_type", "client_allowed_sans",
            "min_version", "max_version", "cipher_suites", "prefer_server_cipher_suites", "curve_preferences",
            "http2", "headers", "interval", "burst", "X-Frame-Options", "Strict-Transport-Security", "alice")
ODD_SCALARS = (
    "~", "null", "Null", "", '""', "''", "yes", "no", "on", "off", "y", "n", "true", "False", "TRUE",
    "0", "-0", "007", "0x1F", "0o17", "0b101", "1_000", "+12", "-1", "1e400", "-1e400", "1.5e-300", ".nan",
    ".inf", "-.Inf", "22:30", "1:30:00", "190:20:30", "24:00", "23:59", "00:00", "2001-12-14t21:59:43.10-05:00",
    "2002-12-14", "2002-02-30", "1" + "0" * 30, "9" * 5000, "-" + "9" * 400, "1." + "5" * 400, "50MiB/s",
    "1.5 GiB/s", "0.0000001KB/s", "99999999999999999999B/s", "1h", "90m", "1.5m", "0s", "-1s", "1e9h",
    "1h30m", "mon", "SUN", "funday", "*", "[", "web-*", "vd[a-", "TLS13", "TLS10", "NoClientCert",
    "RequireAnyClientCert", "VerifyClientCertIfGiven", "RequireAndVerifyClientCert", "RequireClientCert",
    "CurveP256", "TLS_AES_128_GCM_SHA256", "TLS_RSA_WITH_AES_128_CBC_SHA", "nosniff", "deny",
    "$2y$10$abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ012", "$2b$99$" + "a" * 53,
    "!!binary aGVsbG8=", "!!int 12", "!!float nan", "!!str 12", "!!set {a, b}", "!!omap [a: 1]",
    "!!python/object:os.system ls", "!custom value", "!!timestamp 2001-01-01", "!!bool yes",
    '"\\ud83d"', '"\\x00\\t\\u2028\\U0001F600"', '"a\\nb"', "'it''s'", "|\n  block\n", ">-\n  folded\n",
    "server.crt", "web.yml", ".", "..", "missing.pem", "-----BEGIN CERTIFICATE-----",
)
plain_text = st.text(st.characters(codec="utf-8", exclude_characters="/"), max_size=30)


def scalar_text(value: str) -> str:
    """A double-quoted YAML scalar (JSON's escapes are YAML's)."""
    return json.dumps(value)


@st.composite
def yaml_documents(draw, keys) -> str:
    anchors: list[str] = []

    def key() -> str:
        choice = draw(st.integers(0, 9))
        if choice < 7:
            return draw(st.sampled_from(keys))
        if choice == 7:
            return draw(st.sampled_from(("<<", "1", "null", "~", "[a, b]", "{x: y}", "? [c]", "true")))
        return scalar_text(draw(plain_text))

    def scalar() -> str:
        if draw(st.booleans()):
            return draw(st.sampled_from(ODD_SCALARS))
        return scalar_text(draw(plain_text)) if draw(st.booleans()) else str(draw(st.integers(-10**6, 10**40)))

    def flow(depth: int) -> str:
        if anchors and draw(st.integers(0, 5)) == 0:
            return "*" + draw(st.sampled_from(anchors))
        kind = draw(st.integers(0, 3)) if depth < 6 else 0
        if kind <= 1:
            text = scalar()
            if text.startswith(("|", ">")):
                text = scalar_text(text)  # block scalars only in block context
        elif kind == 2:
            text = "[" + ", ".join(flow(depth + 1) for _ in range(draw(st.integers(0, 4)))) + "]"
        else:
            text = "{" + ", ".join(f"{key()}: {flow(depth + 1)}" for _ in range(draw(st.integers(0, 4)))) + "}"
        if draw(st.integers(0, 6)) == 0:
            name = f"a{len(anchors)}"
            anchors.append(name)
            text = f"&{name} {text}"
        return text

    def block(depth: int, indent: int) -> str:
        pad = " " * indent
        if depth >= 3 or draw(st.integers(0, 2)) == 0:
            return " " + flow(depth)
        if draw(st.booleans()):
            items = [f"{pad}- {flow(depth + 1).lstrip()}" if draw(st.booleans())
                     else f"{pad}-" + block(depth + 1, indent + 2).rstrip("\n")
                     for _ in range(draw(st.integers(0, 4)))]
        else:
            items = [f"{pad}{key()}:" + block(depth + 1, indent + 2).rstrip("\n")
                     for _ in range(draw(st.integers(0, 5)))]
        return "\n" + "\n".join(items) if items else " {}"

    body = block(0, 0).lstrip("\n")
    if body.startswith(" "):
        body = body[1:]
    prefix = draw(st.sampled_from(("", "", "", "---\n", "%YAML 1.1\n---\n", "# comment\n", "\ufeff")))
    suffix = draw(st.sampled_from(("", "", "\n", "\n...\n", "\n---\nsecond: doc\n", "\n#end")))
    return prefix + body + suffix


class Raw(str):
    """A scalar written as is (an odd scalar, a tag, an alias)."""


def emit(value, indent: int = 0) -> str:
    """Block-style YAML of dicts, lists and scalars (str: quoted, Raw: as is)."""
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "\n".join(f"{pad}{k}:" + (("\n" + emit(v, indent + 2)) if isinstance(v, (dict, list)) and v
                                            else " " + emit(v)) for k, v in value.items())
    if isinstance(value, list):
        if not value:
            return "[]"
        return "\n".join(f"{pad}-" + (("\n" + emit(v, indent + 2)) if isinstance(v, (dict, list)) and v
                                       else " " + emit(v)) for v in value)
    if isinstance(value, Raw):
        return value if not value.startswith(("|", ">")) else scalar_text(value)
    if isinstance(value, str):
        return scalar_text(value)
    return str(value)


def shaped(good):
    """Mostly a plausible value, sometimes an odd scalar, a text or a collection."""
    return st.one_of(good, good, good, good, st.sampled_from(ODD_SCALARS).map(Raw), plain_text,
                     st.lists(st.sampled_from(ODD_SCALARS).map(Raw), max_size=3),
                     st.dictionaries(st.sampled_from(POLICY_KEYS + WEB_KEYS), st.sampled_from(ODD_SCALARS).map(Raw),
                                     max_size=2))


@st.composite
def mapping(draw, fields: dict, extra_keys=POLICY_KEYS + WEB_KEYS):
    """Some of ``fields`` (name -> value strategy), maybe an unknown or misspelled key."""
    out = {name: draw(strategy) for name, strategy in fields.items() if draw(st.integers(0, 4))}
    if draw(st.integers(0, 5)) == 0:
        name = draw(st.sampled_from(tuple(fields)))
        out[draw(st.sampled_from((name + "s", name[:-1], name.upper(), draw(st.sampled_from(extra_keys)))))] = \
            draw(st.sampled_from(ODD_SCALARS).map(Raw))
    return out


GLOB_VALUES = st.sampled_from(("*", "web-*", "vd?", "[ab]*", "[", "", "db-[!x]", "*.qcow2"))
TIME_VALUES = st.sampled_from(('"01:00"', '"05:00"', "22:30", '"24:00"', '"7:5"', "0", '"23:59"')).map(Raw)
policy_documents = mapping({
    "rules": shaped(st.lists(mapping({
        "name": shaped(st.sampled_from(("flatten", "retire", "r1", "flatten"))),
        "match": shaped(mapping({"domain": shaped(GLOB_VALUES), "disk": shaped(GLOB_VALUES)})),
        "when": shaped(mapping({"min_backing_depth": shaped(st.integers(-2, 10**7)),
                                "backing_file": shaped(GLOB_VALUES)})),
        "action": shaped(mapping({"pull": shaped(mapping({
            "bandwidth": shaped(st.sampled_from(("50MiB/s", "0", "1.5 GiB/s", "-1", "10 kB/s")).map(Raw)),
            "keep_base": shaped(GLOB_VALUES)}))})),
    }), max_size=4)),
    "limits": shaped(mapping({
        "max_concurrent": shaped(st.integers(-1, 2 * 10**6)),
        "windows": shaped(st.lists(mapping({
            "days": shaped(st.lists(st.sampled_from(("mon", "tue", "sun", "Fri", "xyz")).map(Raw), max_size=8)),
            "start": shaped(TIME_VALUES), "end": shaped(TIME_VALUES)}), max_size=3)),
        "abort_outside_window": shaped(st.booleans()),
        "retry_after": shaped(st.sampled_from(("1h", "30m", "0", "1y", "5", "-1s", "100000h")).map(Raw)),
        "min_free_space_ratio": shaped(st.sampled_from(("1.2", "0.5", "1", "100", "101", ".nan")).map(Raw)),
        "max_attempts": shaped(st.integers(0, 5)),
    })),
}).map(emit)

HASH = "$2b$04$abcdefghijklmnopqrstuu5Qe3eP0rHDBBjWZFOxvZxvM7HwfXj9e"
web_documents = mapping({
    "tls_server_config": shaped(mapping({
        key: shaped(st.sampled_from(("server.crt", "web.yml", "", "missing.pem", ".")))
        for key in ("cert_file", "key_file", "client_ca_file", "cert", "key", "client_ca")} | {
        "client_auth_type": shaped(st.sampled_from(("NoClientCert", "RequireAndVerifyClientCert", "RequireClientCert",
                                                    "VerifyClientCertIfGiven", "Bogus"))),
        "client_allowed_sans": shaped(st.lists(st.sampled_from(("a.example", "127.0.0.1", "::1")), max_size=3)),
        "min_version": shaped(st.sampled_from(("TLS10", "TLS12", "TLS13", "SSL3"))),
        "max_version": shaped(st.sampled_from(("TLS12", "TLS13"))),
        "cipher_suites": shaped(st.lists(st.sampled_from(("TLS_AES_128_GCM_SHA256", "TLS_RSA_WITH_AES_128_CBC_SHA",
                                                          "BOGUS")), max_size=3)),
        "prefer_server_cipher_suites": shaped(st.booleans()),
        "curve_preferences": shaped(st.lists(st.sampled_from(("CurveP256", "X25519", "Bogus")), max_size=2)),
    })),
    "http_server_config": shaped(mapping({
        "http2": shaped(st.booleans()),
        "headers": shaped(st.dictionaries(st.sampled_from(("X-Frame-Options", "Content-Security-Policy",
                                                           "X-Powered-By", "Strict-Transport-Security")),
                                          shaped(st.sampled_from(("deny", "sameorigin", "max-age=1", "a\u0001b",
                                                                  "\u00e9t\u00e9", "\u20ac")).map(
                                                                      lambda v: Raw(f'"{v}"'))), max_size=3)),
    })),
    "basic_auth_users": shaped(st.dictionaries(st.sampled_from(("alice", "bob:x", "1", "")),
                                               shaped(st.sampled_from((HASH, HASH[:-1], "$2b$03$" + HASH[7:],
                                                                       "plaintext", "$2b$04$" + "!" * 53))),
                                               max_size=3)),
    "rate_limit": shaped(mapping({"interval": shaped(st.sampled_from(("1s", "0", "0s", "2d", "-1s")).map(Raw)),
                                  "burst": shaped(st.integers(-1, 2 * 10**6))})),
}).map(emit)


# ------------------------------------------------------------------ tests


@FUZZ
@given(data=st.binary(max_size=3000))
@example(data=b"\xff\xfe\x00r\x00u")
@example(data=b"rules: []\n\x00")
@example(data=b"rules:\n  - name: \x85x\n")
@example(data=b"\r\x00")
def test_arbitrary_bytes(workdir, data):
    check_files(workdir, data)


@FUZZ
@given(data=st.data())
def test_mutated_valid_files(workdir, data):
    base = bytearray(data.draw(st.sampled_from((POLICY_EXAMPLE, WEB_EXAMPLE))).encode())
    for _ in range(data.draw(st.integers(1, 8), label="edits")):
        at = data.draw(st.integers(0, len(base)), label="at")
        edit = data.draw(st.sampled_from(("insert", "delete", "replace", "duplicate")), label="edit")
        chunk = data.draw(st.binary(min_size=1, max_size=8) | st.sampled_from(
            [b":", b"-", b"&x ", b"*x", b"[", b"{", b"\n", b"  ", b"\t", b"'", b'"', b"!!", b"<<: ", b"#"]), label="chunk")
        if edit == "insert":
            base[at:at] = chunk
        elif edit == "delete":
            del base[at:at + len(chunk)]
        elif edit == "replace":
            base[at:at + len(chunk)] = chunk
        else:
            line_start = base.rfind(b"\n", 0, at) + 1
            line_end = base.find(b"\n", at)
            line = bytes(base[line_start:line_end if line_end >= 0 else len(base)])
            base[line_start:line_start] = line + b"\n"
    check_files(workdir, bytes(base))


@FUZZ
@given(text=st.one_of(yaml_documents(POLICY_KEYS + WEB_KEYS[:4]), policy_documents))
def test_policy_yaml_documents(text):
    check_policy_text(text, "fuzz-policy.yml")


@FUZZ
@given(text=st.one_of(yaml_documents(WEB_KEYS + POLICY_KEYS[:2]), web_documents))
def test_web_config_yaml_documents(workdir, text):
    check_files(workdir, text.encode("utf-8", "surrogatepass"))


@FUZZ
@given(fan_out=st.integers(2, 12), levels=st.integers(1, 12), where=st.sampled_from(POLICY_KEYS[:2] + WEB_KEYS[:4]),
       merge=st.booleans())
def test_alias_bombs(workdir, fan_out, levels, where, merge):
    """Each level repeats the one below ``fan_out`` times: up to 12**12 values if expanded."""
    lines = ["a0: &a0 [x, y, z]"]
    for i in range(1, levels + 1):
        if merge:
            lines.append(f"a{i}: &a{i} {{<<: [{', '.join(f'*a{i - 1}' for _ in range(fan_out))}]}}")
        else:
            lines.append(f"a{i}: &a{i} [{', '.join(f'*a{i - 1}' for _ in range(fan_out))}]")
    lines.append(f"{where}: *a{levels}")
    check_files(workdir, "\n".join(lines).encode())


@FUZZ
@given(depth=st.sampled_from((MAX_DEPTH - 2, MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 100, 2000)),
       style=st.sampled_from(("seq", "map", "block", "mixed")))
def test_deep_nesting(workdir, depth, style):
    if style == "seq":
        text = "rules: " + "[" * depth + "]" * depth
    elif style == "map":
        text = "limits: " + "{a: " * depth + "b" + "}" * depth
    elif style == "block":
        text = "\n".join(" " * i + "k:" for i in range(min(depth, 400))) + " v"
    else:
        text = "tls_server_config: " + "[{a: " * (depth // 2) + "1" + "}]" * (depth // 2)
    check_files(workdir, text.encode())


SIZE_CASES = {
    "long scalar": lambda: "rules: " + "x" * (MAX_BYTES - 8),
    "MAX_NODES values": lambda: "rules: [" + ", ".join("1" for _ in range(MAX_NODES + 5)) + "]",
    "a long comment": lambda: "#" * (MAX_BYTES - 10) + "\nrules: []",
    "many keys": lambda: "".join(f"k{i}: {i}\n" for i in range(MAX_BYTES // 12))[:MAX_BYTES],
    "past MAX_BYTES": lambda: "rules: []\n" + " " * MAX_BYTES,
}
SIZE_SECONDS = 10.0  # about 1 s each on this 2-core machine; the bound leaves room for a busy one


def _rss_peak_reset() -> int | None:
    """Reset this process's peak RSS (Linux clear_refs) and return the RSS now, in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmRSS") * 1024
    except OSError:
        return None


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


@pytest.mark.parametrize("kind", SIZE_CASES)
def test_size_bounds(workdir, kind):
    """Files at and past the bounds, timed and measured without tracemalloc (which slows PyYAML
    several times over): the peak RSS of the load is measured instead."""
    text = SIZE_CASES[kind]()
    path = workdir / "size.yml"
    path.write_text(text)
    for name, load, error in (("policy", lambda: parse_policy(text, str(path)), PolicyError),
                              ("policy file", lambda: load_policy(str(path)), PolicyError),
                              ("web config", lambda: load_web_config(str(path)), WebConfigError)):
        rss_before = _rss_peak_reset()
        started = time.perf_counter()
        try:
            load()
        except error as e:
            _check_error_lines(text, str(path), str(e).split("\n"))
        took = time.perf_counter() - started
        assert took < SIZE_SECONDS, f"{name}: {took:.1f}s"
        if rss_before is not None:
            grew = _status_kib("VmHWM") * 1024 - rss_before
            assert grew < PEAK_BYTES, f"{name}: peak RSS grew by {grew / 1024**2:.0f} MiB"


@pytest.mark.parametrize("char", ["\x00", "\x01", "\x1b", "\x7f", "\x9b", "\ufffe"])
def test_a_character_yaml_does_not_allow_is_a_problem_with_its_line(workdir, char):
    _check_policy_text(f"rules: []\n# {char}\n", "fuzz-policy.yml")


# ------------------------------------------------------------------ special files in the web config


def _load_with_timeout(path: Path, fifo: Path | None, seconds: float):
    """load_web_config in a thread; if it is still blocked after ``seconds``, a writer opens and
    closes the FIFO so that it can finish (and the test does not hang)."""
    result: list = []

    def run():
        try:
            result.append(load_web_config(str(path)))
        except WebConfigError as e:
            result.append(e)
        except Exception as e:  # noqa: BLE001 - reported below
            result.append(e)

    thread = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(seconds)
    blocked = thread.is_alive()
    while fifo is not None and thread.is_alive() and time.monotonic() - started < seconds + 10:
        try:  # a writer that opens and closes it lets each blocked open() go on (to EOF)
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader right now
            pass
        thread.join(0.05)
    return result[0] if result else None, blocked, time.monotonic() - started


@pytest.mark.parametrize("target", ["/dev/zero", "/dev/null", "/dev/urandom", ".", "missing.pem", "web.yml"])
@pytest.mark.parametrize("client_ca", [False, True])
def test_tls_files_that_are_not_certificates_are_errors_within_bounded_time(tmp_path, target, client_ca):
    cfg = tmp_path / "web.yml"
    lines = ["tls_server_config:", f"  cert_file: {target}", f"  key_file: {target}"]
    if client_ca:
        lines += ["  client_auth_type: RequireAndVerifyClientCert", f"  client_ca_file: {target}"]
    cfg.write_text("\n".join(lines) + "\n")
    outcome, blocked, took = _load_with_timeout(cfg, None, 10)
    assert not blocked and took < 10
    assert isinstance(outcome, WebConfigError), outcome
    _check_error_lines(cfg.read_text(), str(cfg), str(outcome).split("\n"))


def test_a_tls_file_that_is_a_fifo_is_an_error_within_bounded_time(tmp_path):
    fifo = tmp_path / "cert.pem"
    os.mkfifo(fifo)
    cfg = tmp_path / "web.yml"
    cfg.write_text("tls_server_config:\n  cert_file: cert.pem\n  key_file: cert.pem\n")
    outcome, blocked, took = _load_with_timeout(cfg, fifo, 3)
    assert not blocked, f"load_web_config blocked on the FIFO for {took:.1f}s"
    assert isinstance(outcome, WebConfigError)
