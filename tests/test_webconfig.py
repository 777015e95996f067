"""Web config parsing: exporter-toolkit's format, every problem reported with file and line."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import ssl
import textwrap
from pathlib import Path

import bcrypt
import pytest
from certlib import make_cert

from exporter.webconfig import (
    WebConfig,
    WebConfigError,
    build_ssl_context,
    client_cert_allowed,
    load_web_config,
)

HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()

# With LBJE_REQUIRE_TOOLS set (the test command sets it), a missing openssl fails instead.
needs_openssl = pytest.mark.skipif(
    shutil.which("openssl") is None and not os.environ.get("LBJE_REQUIRE_TOOLS"),
    reason="openssl CLI not installed")


def write(tmp_path: Path, text: str, name: str = "web.yml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).lstrip("\n"))
    return p


def problems(path: Path) -> list[str]:
    with pytest.raises(WebConfigError) as ei:
        load_web_config(path)
    err = ei.value
    assert str(err) == "\n".join(err.problems)
    return err.problems


def has(probs: list[str], path: Path, line: int, *words: str) -> bool:
    prefix = f"{path}:{line}: "
    return any(p.startswith(prefix) and all(w in p for w in words) for p in probs)


# ---------------------------------------------------------------------------- good files


def test_empty_file_means_defaults(tmp_path):
    cfg = load_web_config(write(tmp_path, ""))
    assert cfg.tls_server_config is None
    assert cfg.basic_auth_users == ()
    assert cfg.http_server_config.http2 is True and cfg.http_server_config.headers == ()
    assert cfg.rate_limit is None
    assert build_ssl_context(cfg) is None
    assert build_ssl_context(None) is None


@needs_openssl
def test_full_config_parses_into_frozen_dataclasses(tmp_path):
    certs = tmp_path / "certs"
    certs.mkdir()
    make_cert(certs, "server")
    make_cert(certs, "ca")
    p = write(tmp_path, f"""
        tls_server_config:
          cert_file: certs/server.crt
          key_file: certs/server.key
          client_auth_type: RequireAndVerifyClientCert
          client_ca_file: certs/ca.crt
          client_allowed_sans: [client.example, 10.0.0.1]
          min_version: TLS12
          max_version: TLS13
          cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384]
          prefer_server_cipher_suites: false
        http_server_config:
          http2: false
          headers:
            X-Frame-Options: deny
            X-Content-Type-Options: nosniff
            X-XSS-Protection: 0
            Strict-Transport-Security: max-age=31536000
        basic_auth_users:
          alice: {HASH}
          bob: '{HASH}'
        rate_limit:
          interval: 100ms
          burst: 20
        """)
    cfg = load_web_config(p)
    tls = cfg.tls_server_config
    assert tls is not None
    assert tls.cert_file == str(certs / "server.crt")  # relative to the config file's directory
    assert tls.key_file == str(certs / "server.key")
    assert tls.client_ca_file == str(certs / "ca.crt")
    assert tls.client_auth_type == "RequireAndVerifyClientCert"
    assert tls.client_allowed_sans == ("client.example", "10.0.0.1")
    assert tls.prefer_server_cipher_suites is False
    assert len(tls.cipher_suites) == 2
    assert cfg.http_server_config.http2 is False
    assert dict(cfg.http_server_config.headers) == {
        "X-Frame-Options": "deny", "X-Content-Type-Options": "nosniff",
        "X-XSS-Protection": "0", "Strict-Transport-Security": "max-age=31536000"}
    assert dict(cfg.basic_auth_users) == {"alice": HASH, "bob": HASH}
    assert cfg.rate_limit is not None
    assert cfg.rate_limit.interval_seconds == pytest.approx(0.1) and cfg.rate_limit.burst == 20
    assert cfg.warnings == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.path = "x"  # type: ignore[misc]
    assert HASH not in repr(cfg)  # secrets stay out of logs

    ctx = build_ssl_context(cfg)
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert not ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    names = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert names == {"ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384"}


@needs_openssl
def test_inline_cert_key_and_client_ca(tmp_path):
    cert, key = make_cert(tmp_path, "server")
    ca, _ = make_cert(tmp_path, "ca")
    ind = lambda p: textwrap.indent(p.read_text(), " " * 6)  # noqa: E731
    p = tmp_path / "web.yml"
    p.write_text("tls_server_config:\n"
                 f"  cert: |\n{ind(cert)}"
                 f"  key: |\n{ind(key)}"
                 f"  client_ca: |\n{ind(ca)}"
                 "  client_auth_type: VerifyClientCertIfGiven\n")
    cfg = load_web_config(p)
    assert cfg.tls_server_config is not None and cfg.tls_server_config.cert_file is None
    assert "PRIVATE KEY" not in repr(cfg)
    ctx = build_ssl_context(cfg)
    assert ctx is not None and ctx.verify_mode == ssl.CERT_OPTIONAL


@needs_openssl
def test_accepted_but_not_honoured_options_warn(tmp_path, caplog):
    make_cert(tmp_path, "server")
    p = write(tmp_path, """
        tls_server_config:
          cert_file: server.crt
          key_file: server.key
          cipher_suites: [TLS_AES_128_GCM_SHA256]
        http_server_config:
          http2: true
        """)
    with caplog.at_level("WARNING", logger="exporter.webconfig"):
        cfg = load_web_config(p)
    w = "\n".join(cfg.warnings)
    assert f"{p}:4: " in w and "TLS 1.3" in w
    assert f"{p}:6: " in w and "http2" in w
    assert len(caplog.records) == len(cfg.warnings) == 2


@needs_openssl
def test_tls_options_python_cannot_honour_are_errors(tmp_path):
    """They used to be served differently from what was asked (a warning in the log)."""
    make_cert(tmp_path, "server")
    make_cert(tmp_path, "ca")
    for auth in ("RequestClientCert", "RequireAnyClientCert", "RequireClientCert"):
        p = write(tmp_path, f"""
            tls_server_config:
              cert_file: server.crt
              key_file: server.key
              client_auth_type: {auth}
              client_ca_file: ca.crt
              curve_preferences: [X25519, CurveP256]
            """)
        probs = problems(p)
        assert has(probs, p, 4, "client_auth_type", "cannot be honoured"), probs
        assert has(probs, p, 6, "curve_preferences", "cannot be honoured"), probs
        assert len(probs) == 2


def test_tls_options_without_certificate_leave_tls_off(tmp_path):
    cfg = load_web_config(write(tmp_path, "tls_server_config:\n  min_version: TLS13\n"))
    assert cfg.tls_server_config is None
    assert any("TLS stays off" in w for w in cfg.warnings)


def test_yaml_merge_keys_and_anchors(tmp_path):
    p = write(tmp_path, f"""
        basic_auth_users:
          alice: &h {HASH}
          bob: *h
        """)
    assert dict(load_web_config(p).basic_auth_users) == {"alice": HASH, "bob": HASH}


# ---------------------------------------------------------------------------- bad files


def test_every_problem_is_reported_at_once_with_its_line(tmp_path):
    p = write(tmp_path, """
        tls_server_config:
          cert_file: missing.crt
          client_auth_type: RequireEverything
          min_version: TLS14
          cipher_suites: [TLS_RSA_WITH_RC4_128_SHA]
          curve_preferences: [CurveP999]
          prefer_server_cipher_suites: maybe
          chiper_suites: []
        http_server_config:
          http2: "yes"
          headers:
            X-Frame-Options: allow
            X-Powered-By: me
        basic_auth_users:
          alice: hunter2
          bob: $2b$03$abcdefghijklmnopqrstuvabcdefghijklmnopqrstuvwxyz01234
          carol: [a]
        rate_limit:
          interval: fast
          burst: many
          bursts: 2
        metrics_path: /x
        """)
    probs = problems(p)
    expect = [
        (2, "cert_file is set but there is no key"),
        (2, "missing.crt", "cannot read"),
        (3, "client_auth_type", "RequireEverything", "RequireAndVerifyClientCert"),
        (4, "unknown TLS version", "TLS14"),
        (5, "unknown cipher suite", "TLS_RSA_WITH_RC4_128_SHA"),
        (6, "unknown curve", "CurveP999"),
        (7, "prefer_server_cipher_suites", "expected true or false"),
        (8, "unknown key 'chiper_suites'", "did you mean 'cipher_suites'"),
        (10, "http2", "expected true or false"),
        (12, "X-Frame-Options", "allow", "deny"),
        (13, "X-Powered-By", "can not be configured"),
        (15, "alice", "not a bcrypt hash"),
        (16, "bob", "cost 3"),
        (17, "carol", "expected a bcrypt hash", "a list"),
        (19, "interval", "fast"),
        (20, "burst", "expected an integer"),
        (21, "unknown key 'bursts'"),
        (22, "unknown key 'metrics_path'"),
    ]
    for line, *words in expect:
        assert has(probs, p, line, *words), (line, words, probs)
    assert len(probs) == len(expect), probs
    assert all(re.match(re.escape(str(p)) + r":\d+: \S", x) for x in probs)
    assert "hunter2" not in str(probs)  # a pasted password is never echoed


@needs_openssl
def test_unreadable_and_mismatched_files(tmp_path):
    make_cert(tmp_path, "a")
    make_cert(tmp_path, "b")
    p1 = write(tmp_path, """
        tls_server_config:
          cert_file: nope.crt
          key_file: /nonexistent/nope.key
        """, "one.yml")
    probs = problems(p1)
    assert has(probs, p1, 2, "nope.crt", "cannot read", "No such file")
    assert has(probs, p1, 3, "/nonexistent/nope.key", "cannot read")
    assert len(probs) == 2

    p2 = write(tmp_path, """
        tls_server_config:
          cert_file: a.crt
          key_file: b.key
        """, "two.yml")
    assert has(problems(p2), p2, 2, "cannot load certificate and key")

    notpem = tmp_path / "empty.pem"
    notpem.write_text("hello\n")
    p3 = write(tmp_path, """
        tls_server_config:
          cert_file: a.crt
          key_file: a.key
          client_auth_type: RequireAndVerifyClientCert
          client_ca_file: empty.pem
        """, "three.yml")
    assert has(problems(p3), p3, 5, "client_ca_file", "no usable CA")


@needs_openssl
def test_cross_field_rules(tmp_path):
    make_cert(tmp_path, "s")
    p = write(tmp_path, """
        tls_server_config:
          key_file: s.key
          client_ca_file: s.crt
          min_version: TLS13
          max_version: TLS12
          client_allowed_sans: [x]
        """)
    probs = problems(p)
    assert has(probs, p, 2, "key_file is set but there is no certificate")
    assert has(probs, p, 3, "client CA", "NoClientCert")
    assert has(probs, p, 4, "min_version TLS13 is above max_version TLS12")
    assert has(probs, p, 6, "client_allowed_sans requires")
    assert len(probs) == 4

    p2 = write(tmp_path, """
        tls_server_config:
          cert_file: s.crt
          key_file: s.key
          client_auth_type: RequireAnyClientCert
        """, "any.yml")
    assert has(problems(p2), p2, 4, "RequireAnyClientCert cannot be honoured")


def test_wrong_shapes(tmp_path):
    p = write(tmp_path, """
        tls_server_config: [a, b]
        http_server_config:
          headers: nosniff
        basic_auth_users: alice
        """)
    probs = problems(p)
    assert has(probs, p, 1, "tls_server_config", "expected a mapping", "a list")
    assert has(probs, p, 3, "headers", "expected a mapping")
    assert has(probs, p, 4, "basic_auth_users", "expected a mapping")
    assert len(probs) == 3

    top = write(tmp_path, "- just\n- a list\n", "top.yml")
    assert has(problems(top), top, 1, "expected a mapping")


def test_duplicate_keys_are_rejected(tmp_path):
    p = write(tmp_path, f"""
        basic_auth_users:
          alice: {HASH}
          alice: {HASH}
        """)
    assert has(problems(p), p, 3, "duplicate key 'alice'", "line 2")


def test_yaml_syntax_error_has_line(tmp_path):
    p = write(tmp_path, """
        basic_auth_users:
          alice: x
         bob: [unclosed
        """)
    assert problems(p) == [f"{p}:3: YAML syntax error: expected <block end>, but found '<block mapping start>' "
                           "(while parsing a block mapping started at line 1)"]


def test_missing_file(tmp_path):
    probs = problems(tmp_path / "absent.yml")
    assert probs == [f"{tmp_path / 'absent.yml'}: cannot read web config: No such file or directory"]


def test_rate_limit_rules(tmp_path):
    p = write(tmp_path, """
        rate_limit:
          interval: 1s
          burst: 0
        """)
    assert has(problems(p), p, 3, "burst", "at least 1")
    p2 = write(tmp_path, "rate_limit:\n  interval: -1s\n  burst: 1\n", "neg.yml")
    assert has(problems(p2), p2, 2, "negative")
    off = write(tmp_path, "rate_limit:\n  interval: 0\n  burst: 5\n", "off.yml")
    assert load_web_config(off).rate_limit is None
    combo = write(tmp_path, "rate_limit:\n  interval: 1m30s\n  burst: 1\n", "combo.yml")
    assert load_web_config(combo).rate_limit.interval_seconds == 90.0


def test_header_value_with_line_break_is_rejected(tmp_path):
    p = write(tmp_path, 'http_server_config:\n  headers:\n    Content-Security-Policy: "a\\r\\nX: y"\n')
    assert has(problems(p), p, 3, "line break")


def test_header_value_http_cannot_carry_is_rejected(tmp_path):
    """A curly quote used to pass the load and then fail every response (latin-1 encode error)."""
    p = write(tmp_path, """
        http_server_config:
          headers:
            Content-Security-Policy: default-src ’self’
            Strict-Transport-Security: "max-age=1\\x00"
        """)
    probs = problems(p)
    assert has(probs, p, 3, "Content-Security-Policy", "character HTTP cannot carry")
    assert has(probs, p, 4, "Strict-Transport-Security", "character HTTP cannot carry")
    assert len(probs) == 2
    ok = write(tmp_path, "http_server_config:\n  headers:\n    Content-Security-Policy: \"caf\u00e9 'self'\"\n", "ok.yml")
    assert load_web_config(ok).http_server_config.headers == (("Content-Security-Policy", "caf\u00e9 'self'"),)


def test_bcrypt_hash_with_an_invalid_salt_is_a_load_error(tmp_path):
    """It used to load and then drop the connection of every login attempt (ValueError)."""
    bad = HASH[:28] + "z" + HASH[29:]  # the salt's last character carries bits bcrypt rejects
    with pytest.raises(ValueError, match="Invalid salt"):
        bcrypt.checkpw(b"s3cret", bad.encode())
    p = write(tmp_path, f"basic_auth_users:\n  alice: {HASH}\n  bob: '{bad}'\n")
    probs = problems(p)
    assert has(probs, p, 3, "basic_auth_users.bob", "invalid salt") and len(probs) == 1
    assert bad not in probs[0]


def test_client_cert_allowed():
    from exporter.webconfig import TLSServerConfig

    tls = TLSServerConfig(client_auth_type="RequireAndVerifyClientCert",
                          client_allowed_sans=("client.example", "2001:db8::1"))
    assert client_cert_allowed(tls, {"subjectAltName": (("DNS", "client.example"),)})
    assert client_cert_allowed(tls, {"subjectAltName": (("IP Address", "2001:DB8:0:0:0:0:0:1"),)})
    assert not client_cert_allowed(tls, {"subjectAltName": (("DNS", "other.example"),)})
    assert not client_cert_allowed(tls, {})
    assert client_cert_allowed(TLSServerConfig(), None)


def test_webconfig_error_is_one_problem_per_line():
    e = WebConfigError(["a.yml:1: x", "a.yml:2: y"])
    assert str(e) == "a.yml:1: x\na.yml:2: y"
    assert isinstance(WebConfig(), WebConfig)


# ---------------------------------------------------------------------------- bounds (issue 10)


@pytest.mark.parametrize("text,expected", [
    # once a RecursionError traceback
    ("rate_limit: " + "[" * 600 + "]" * 600 + "\n", ["{p}:1: YAML syntax error: nested deeper than 32 levels"]),
    # once a ValueError traceback (PyYAML's int() of 5,000 digits)
    ("rate_limit:\n  interval: 1s\n  burst: " + "9" * 5000 + "\n",
     ["{p}:3: rate_limit.burst: cannot read value '9999999999999999999999999999999999999...': Exceeds the limit "
      "(4300 digits) for integer string conversion: value has 5000 digits; use sys.set_int_max_str_digits() "
      "to increase the limit"]),
    # once accepted as an infinite interval or burst
    ("rate_limit:\n  interval: 1" + "0" * 300 + "h\n  burst: 1\n",
     ["{p}:2: rate_limit.interval: bad duration '1000000000000000000000000000000000000...': expected a number "
      "and a unit (ms, s, m, h, d, w, y) from largest to smallest, such as 500ms, 1.5m, 1h30m"]),
    ("rate_limit:\n  interval: 2d\n  burst: 1\n", ["{p}:2: rate_limit.interval: bad duration '2d': must be at most 1d"]),
    ("rate_limit:\n  interval: 1s\n  burst: 1000001\n",
     ["{p}:3: rate_limit.burst: must be an integer <= 1000000, got '1000001'"]),
    ("rate_limit:\n  interval: 1s\n  burts: 1\n",
     ["{p}:2: rate_limit.burst: must be at least 1 when interval is set, or every request would be refused",
      "{p}:3: rate_limit: unknown key 'burts' (allowed: interval, burst); did you mean 'burst'?"]),
])
def test_values_beyond_bounds_are_file_line_errors(tmp_path, text, expected):
    p = tmp_path / "web.yml"
    p.write_text(text)
    assert problems(p) == [e.format(p=p) for e in expected]


def test_one_duration_grammar(tmp_path):
    p = write(tmp_path, "rate_limit:\n  interval: 1.5m\n  burst: 2\n")
    assert load_web_config(p).rate_limit.interval_seconds == 90


def test_size_and_problem_count_are_bounded(tmp_path):
    assert problems(Path("/dev/zero")) == ["/dev/zero: web config is larger than 1024 KiB"]
    users = "".join(f"  u{i}: not-a-hash\n" for i in range(300))
    p = write(tmp_path, "basic_auth_users:\n" + users)
    probs = problems(p)
    assert len(probs) == 101
    assert probs[0] == (f"{p}:2: basic_auth_users.u0: not a bcrypt hash (expected $2a$, $2b$ or $2y$, a cost and "
                        "53 characters, e.g. from `htpasswd -nBC 10 \"\" | tr -d ':\\n'`)")
    assert probs[100] == f"{p}: ... and 200 more problems"


def test_alias_bomb_is_refused(tmp_path):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 10) + "]" for i in range(8)]
    p = write(tmp_path, "\n".join(lines) + "\n")
    assert problems(p) == [f"{p}:5: YAML syntax error: more than 20000 values (an alias counts everything it repeats)"]


def test_values_in_the_wrong_place_are_not_echoed(tmp_path):
    p = write(tmp_path, "basic_auth_users: hunter2\nhttp_server_config:\n  http2: hunter3\n")
    assert problems(p) == [f"{p}:1: basic_auth_users: expected a mapping, got a string",
                           f"{p}:3: http_server_config.http2: expected true or false, got a string"]
