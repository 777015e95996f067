"""``--web.config.file`` in prometheus/exporter-toolkit's format.

Users already write this file for node_exporter and friends, so we read the same keys with the
same meaning and reject what exporter-toolkit rejects. Options Python's ``ssl`` module cannot
honour are errors, not silent downgrades:

- ``curve_preferences``: Python cannot set a curve preference list.
- ``client_auth_type: RequestClientCert``, ``RequireAnyClientCert`` (and its old alias
  ``RequireClientCert``): OpenSSL cannot ask for or demand a certificate without verifying it;
  use ``VerifyClientCertIfGiven`` or ``RequireAndVerifyClientCert`` with a client CA.

Accepted with a warning in ``WebConfig.warnings`` (also logged at WARNING when loading):

- ``http_server_config.http2: true``: the server speaks HTTP/1.1 only (clients fall back to it).
- Client verification without any client CA uses the system's CAs, as Go does.
- ``TLS10``/``TLS11``: allowed, but OpenSSL 3's default security level may still refuse them.
- TLS 1.3 names in ``cipher_suites``: ignored, as Go ignores them.

Header values must be characters HTTP can carry; basic-auth hashes are checked with bcrypt itself
(an invalid salt is a load error, not a failed login).

Every problem in the file is reported at once, each as ``FILE:LINE: message``; a problem with the
file as a whole (unreadable) is ``FILE: message``. Relative paths are resolved against the
directory of the config file, as exporter-toolkit does. Secrets are never echoed in messages.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import ssl
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import bcrypt
import yaml

from .configfile import ABSENT, ConfigError, Reader, describe, is_null, load

log = logging.getLogger(__name__)

CLIENT_AUTH_TYPES = (
    "NoClientCert",
    "RequestClientCert",
    "RequireAnyClientCert",
    "VerifyClientCertIfGiven",
    "RequireAndVerifyClientCert",
)
_CLIENT_AUTH_ALIASES = {"RequireClientCert": "RequireAnyClientCert"}  # kept by exporter-toolkit

TLS_VERSIONS: Mapping[str, ssl.TLSVersion] = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}

# Go's tls.CipherSuites() names (what exporter-toolkit accepts) -> OpenSSL names.
# None marks TLS 1.3 suites, which neither Go nor OpenSSL's cipher list lets you choose.
CIPHER_SUITES: Mapping[str, str | None] = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_AES_128_GCM_SHA256": None,
    "TLS_AES_256_GCM_SHA384": None,
    "TLS_CHACHA20_POLY1305_SHA256": None,
}

CURVES = ("CurveP256", "CurveP384", "CurveP521", "X25519")

# exporter-toolkit only lets these headers be set, some only to these values.
HEADERS: Mapping[str, tuple[str, ...]] = {
    "Strict-Transport-Security": (),
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": (),
    "Content-Security-Policy": (),
}

# What golang.org/x/crypto/bcrypt and Python's bcrypt both verify.
# RFC 9110 field-value characters (h11 checks the same): visible ASCII, space, tab, obs-text.
_HEADER_VALUE_RE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_BCRYPT_RE = re.compile(r"\$2[abxy]\$(\d\d)\$[./A-Za-z0-9]{53}")
MAX_RATE_INTERVAL = 86400.0
MAX_BURST = 1_000_000


class WebConfigError(Exception):
    """Every problem found in a web config file, one ``FILE:LINE: message`` per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


@dataclass(frozen=True)
class TLSServerConfig:
    """Present only when TLS is on. File paths are absolute."""

    cert_file: str | None = None
    key_file: str | None = None
    cert: str | None = field(default=None, repr=False)  # inline PEM
    key: str | None = field(default=None, repr=False)  # inline PEM (secret)
    client_auth_type: str = "NoClientCert"
    client_ca_file: str | None = None
    client_ca: str | None = field(default=None, repr=False)  # inline PEM
    client_allowed_sans: tuple[str, ...] | None = None
    min_version: str = "TLS12"
    max_version: str = "TLS13"
    cipher_suites: tuple[str, ...] = ()
    prefer_server_cipher_suites: bool = True
    curve_preferences: tuple[str, ...] = ()

    @property
    def watched_files(self) -> tuple[str, ...]:
        """Files whose change should make the server reload its TLS context."""
        return tuple(p for p in (self.cert_file, self.key_file, self.client_ca_file) if p)


@dataclass(frozen=True)
class HTTPServerConfig:
    http2: bool = True
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class RateLimitConfig:
    interval_seconds: float  # one token per interval
    burst: int


@dataclass(frozen=True)
class WebConfig:
    path: str = ""
    tls_server_config: TLSServerConfig | None = None
    http_server_config: HTTPServerConfig = HTTPServerConfig()
    basic_auth_users: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # (user, hash)
    rate_limit: RateLimitConfig | None = None
    warnings: tuple[str, ...] = field(default=(), compare=False)


# --------------------------------------------------------------------------- loading


class _Reader(Reader):
    """The shared reader with Go's yaml.v2 leniencies: any scalar is a string, ``<<`` merges."""

    echo = False  # a value in the wrong place may be a password or a key
    is_null = staticmethod(is_null)

    def describe(self, node: yaml.Node) -> str:
        return describe(node, echo=False)

    def mapping(self, node: yaml.Node | None, name: str) -> list[tuple[str, yaml.Node, yaml.Node]] | None:
        return super().mapping(node, name, merge=True, any_scalar_key=True)

    def string(self, node: yaml.Node, name: str) -> str | None:
        """Any scalar as written (Go's yaml.v2 also takes ``0`` for a string); None when null."""
        if is_null(node):
            return None
        if not isinstance(node, yaml.ScalarNode):
            self.error(node, f"{name}: expected a string, got {describe(node, False)}")
            return None
        return node.value

    def boolean(self, node: yaml.Node, name: str) -> bool | None:
        value = super().boolean(node, name)
        return None if value is ABSENT else value

    def string_list(self, node: yaml.Node, name: str) -> list[tuple[str, yaml.Node]] | None:
        if is_null(node):
            return None
        if not isinstance(node, yaml.SequenceNode):
            self.error(node, f"{name}: expected a list of strings, got {describe(node, False)}")
            return None
        out = []
        for item in node.value:
            s = self.string(item, f"{name} item")
            if s is not None:
                out.append((s, item))
            elif is_null(item):
                self.error(item, f"{name}: empty list item")
        return out


def load_web_config(path: str | os.PathLike[str]) -> WebConfig:
    """Read, check and freeze a web config file, or raise ``WebConfigError`` listing every problem.

    Certificates and keys are loaded once here so that a bad pair is reported at start-up with
    the line that named it, not on the first scrape.
    """
    spath = os.fspath(path)
    base = os.path.dirname(os.path.abspath(spath))
    try:
        cfg, r = load(spath, "web config", lambda r, root: _read_root(r, root, base), reader=_Reader(spath))
    except ConfigError as e:
        raise WebConfigError([str(p) for p in e.problems]) from None
    for w in r.warnings:
        log.warning("web config: %s", w)
    return cfg


_TOP_KEYS = ("tls_server_config", "http_server_config", "basic_auth_users", "rate_limit")


def _read_root(r: _Reader, root: yaml.Node | None, base: str) -> WebConfig:
    pairs = r.mapping(root, "web config")
    sections: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for key, knode, vnode in pairs or []:
        if key not in _TOP_KEYS:
            r.unknown_key(knode, key, "web config", _TOP_KEYS)
        else:
            sections[key] = (knode, vnode)

    tls = None
    if "tls_server_config" in sections:
        tls = _read_tls(r, *sections["tls_server_config"], base)
    http = HTTPServerConfig()
    if "http_server_config" in sections:
        http = _read_http(r, sections["http_server_config"][1]) or http
    users: tuple[tuple[str, str], ...] = ()
    if "basic_auth_users" in sections:
        users = _read_users(r, sections["basic_auth_users"][1])
    rate = None
    if "rate_limit" in sections:
        rate = _read_rate_limit(r, sections["rate_limit"][1])
    return WebConfig(path=r.path, tls_server_config=tls, http_server_config=http,
                     basic_auth_users=users, rate_limit=rate, warnings=tuple(r.warnings))


_TLS_KEYS = ("cert", "key", "client_ca", "cert_file", "key_file", "client_auth_type",
             "client_ca_file", "client_allowed_sans", "min_version", "max_version",
             "cipher_suites", "prefer_server_cipher_suites", "curve_preferences")


def _join(base: str, p: str) -> str:
    return p if os.path.isabs(p) else os.path.join(base, p)


def _read_tls(r: _Reader, section_knode: yaml.Node, node: yaml.Node, base: str) -> TLSServerConfig | None:
    pairs = r.mapping(node, "tls_server_config")
    if pairs is None:
        return None
    v: dict[str, Any] = {}
    at: dict[str, yaml.Node] = {}  # key -> key node, for messages about the key as a whole
    n_problems = r.count

    for key, knode, vnode in pairs:
        name = f"tls_server_config.{key}"
        at[key] = knode
        if key in ("cert", "key", "client_ca", "cert_file", "key_file", "client_ca_file"):
            s = r.string(vnode, name)
            if s:  # empty means unset, as in Go
                v[key] = _join(base, s) if key.endswith("_file") else s
        elif key == "client_auth_type":
            s = r.string(vnode, name)
            if s:
                s2 = _CLIENT_AUTH_ALIASES.get(s, s)
                if s2 not in CLIENT_AUTH_TYPES:
                    r.error(vnode, f"{name}: invalid value {s!r}; expected one of "
                            + ", ".join(CLIENT_AUTH_TYPES))
                else:
                    v[key] = s2
        elif key in ("min_version", "max_version"):
            s = r.string(vnode, name)
            if s is not None:
                if s not in TLS_VERSIONS:
                    r.error(vnode, f"{name}: unknown TLS version {s!r}; expected one of "
                            + ", ".join(TLS_VERSIONS))
                else:
                    v[key] = s
        elif key == "cipher_suites":
            items = r.string_list(vnode, name)
            if items is not None:
                names = []
                for s, inode in items:
                    if s not in CIPHER_SUITES:
                        r.error(inode, f"{name}: unknown cipher suite {s!r}; expected Go names "
                                "from tls.CipherSuites(), e.g. TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256")
                    else:
                        if CIPHER_SUITES[s] is None:
                            r.warn(inode, f"{name}: {s} is a TLS 1.3 suite, which cannot be "
                                   "chosen (Go ignores it too)")
                        names.append(s)
                v[key] = tuple(names)
        elif key == "curve_preferences":
            items = r.string_list(vnode, name)
            if items is not None:
                bad = False
                for s, inode in items:
                    if s not in CURVES:
                        bad = True
                        r.error(inode, f"{name}: unknown curve {s!r}; expected one of "
                                + ", ".join(CURVES))
                if items and not bad:
                    r.error(knode, f"{name}: cannot be honoured; Python's ssl module cannot set a "
                            "curve preference list (remove it to use OpenSSL's default groups)")
                v[key] = tuple(s for s, _ in items)
        elif key == "prefer_server_cipher_suites":
            b = r.boolean(vnode, name)
            if b is not None:
                v[key] = b
        elif key == "client_allowed_sans":
            items = r.string_list(vnode, name)
            if items is not None:
                v[key] = tuple(s for s, _ in items)
        else:
            r.unknown_key(knode, key, "tls_server_config", _TLS_KEYS)

    cfg = TLSServerConfig(**v)
    enabled = any(k in v for k in ("cert", "key", "client_ca", "cert_file", "key_file",
                                   "client_ca_file", "client_auth_type"))
    if not enabled:
        if pairs and r.count == n_problems:
            r.warn(section_knode, "tls_server_config has no certificate, key, client CA or "
                   "client_auth_type, so TLS stays off and its other settings are ignored")
        return None

    for fkey in ("cert_file", "key_file", "client_ca_file"):
        if fkey in v:
            try:
                with open(v[fkey], "rb"):
                    pass
            except OSError as e:
                r.error(at[fkey], f"tls_server_config.{fkey} {v[fkey]!r}: cannot read: "
                        f"{e.strerror or e}")

    # Cross-field checks, in the order exporter-toolkit makes them.
    given = [k for k in ("cert_file", "cert", "key_file", "key", "client_ca_file", "client_ca",
                         "client_auth_type") if k in v]
    if "cert_file" not in v and "cert" not in v:
        r.error(at[given[0]], f"tls_server_config: {given[0]} is set but there is no certificate "
                "(set cert_file, or cert)")
    if "key_file" not in v and "key" not in v:
        first = "cert_file" if "cert_file" in v else given[0]
        r.error(at[first], f"tls_server_config: {first} is set but there is no key "
                "(set key_file, or key)")
    for inline, fname in (("cert", "cert_file"), ("key", "key_file"), ("client_ca", "client_ca_file")):
        if inline in v and fname in v:
            r.warn(at[inline], f"tls_server_config: both {inline} and {fname} are set; "
                   f"{fname} is used, as in exporter-toolkit")
    auth = cfg.client_auth_type
    has_ca = bool(cfg.client_ca_file or cfg.client_ca)
    if has_ca and auth == "NoClientCert":
        r.error(at.get("client_ca_file") or at.get("client_ca"),
                "tls_server_config: a client CA is set but client_auth_type is NoClientCert; "
                "set client_auth_type: RequireAndVerifyClientCert")
    if auth in ("RequestClientCert", "RequireAnyClientCert"):
        r.error(at["client_auth_type"], f"tls_server_config.client_auth_type: {auth} cannot be "
                "honoured: Python's ssl module cannot ask for a client certificate without "
                "verifying it; use VerifyClientCertIfGiven or RequireAndVerifyClientCert with "
                "client_ca_file")
    if auth in ("VerifyClientCertIfGiven", "RequireAndVerifyClientCert") and not has_ca:
        r.warn(at["client_auth_type"], "tls_server_config: no client_ca_file, so client "
               "certificates are verified against the system's CAs")
    if cfg.client_allowed_sans is not None and auth not in ("RequireAnyClientCert",
                                                            "RequireAndVerifyClientCert"):
        r.error(at["client_allowed_sans"], "tls_server_config.client_allowed_sans requires "
                "client_auth_type RequireAnyClientCert or RequireAndVerifyClientCert")
    if TLS_VERSIONS[cfg.min_version] > TLS_VERSIONS[cfg.max_version]:
        r.error(at.get("min_version") or at.get("max_version"),
                f"tls_server_config: min_version {cfg.min_version} is above max_version "
                f"{cfg.max_version}")
    if TLS_VERSIONS[cfg.min_version] < ssl.TLSVersion.TLSv1_2:
        r.warn(at.get("min_version"), f"tls_server_config.min_version {cfg.min_version}: "
               "OpenSSL's default security level may still refuse TLS below 1.2")

    if r.count == n_problems:
        # Load the files now so a bad certificate is reported with its line.
        def problem(key: str, msg: str) -> None:
            r.error(at.get(key) or section_knode, msg)
        _make_context(cfg, problem)
    return cfg


_HTTP_KEYS = ("http2", "headers")


def _read_http(r: _Reader, node: yaml.Node) -> HTTPServerConfig | None:
    pairs = r.mapping(node, "http_server_config")
    if pairs is None:
        return None
    http2 = True
    headers: list[tuple[str, str]] = []
    for key, knode, vnode in pairs:
        if key == "http2":
            b = r.boolean(vnode, "http_server_config.http2")
            if b is not None:
                http2 = b
                if b:
                    r.warn(knode, "http_server_config.http2: not honoured; this server speaks "
                           "HTTP/1.1 only")
        elif key == "headers":
            hpairs = r.mapping(vnode, "http_server_config.headers")
            for hname, hknode, hvnode in hpairs or []:
                if hname not in HEADERS:
                    r.error(hknode, f"http_server_config.headers: header {hname!r} can not be "
                            "configured; allowed: " + ", ".join(HEADERS))
                    continue
                val = r.string(hvnode, f"http_server_config.headers.{hname}")
                if val is None:
                    continue
                if "\r" in val or "\n" in val:
                    r.error(hvnode, f"http_server_config.headers.{hname}: value contains a line break")
                    continue
                if not _HEADER_VALUE_RE.fullmatch(val):
                    r.error(hvnode, f"http_server_config.headers.{hname}: value has a character HTTP "
                            "cannot carry (only visible ASCII, spaces, tabs and Latin-1 letters)")
                    continue
                allowed = HEADERS[hname]
                if allowed and val not in allowed:
                    r.error(hvnode, f"http_server_config.headers.{hname}: invalid value {val!r}; "
                            "expected one of " + ", ".join(allowed))
                    continue
                if val:  # blank means unset
                    headers.append((hname, val))
        else:
            r.unknown_key(knode, key, "http_server_config", _HTTP_KEYS)
    return HTTPServerConfig(http2=http2, headers=tuple(headers))


def _read_users(r: _Reader, node: yaml.Node) -> tuple[tuple[str, str], ...]:
    pairs = r.mapping(node, "basic_auth_users")
    users = []
    for user, knode, vnode in pairs or []:
        name = f"basic_auth_users.{user}"
        if not isinstance(vnode, yaml.ScalarNode) or r.is_null(vnode):
            r.error(vnode, f"{name}: expected a bcrypt hash, got {r.describe(vnode)}")
            continue
        h = vnode.value
        m = _BCRYPT_RE.fullmatch(h)
        if not m:
            # Never echo the value: it may be a plaintext password pasted by mistake.
            r.error(vnode, f"{name}: not a bcrypt hash (expected $2a$, $2b$ or $2y$, a cost and "
                    "53 characters, e.g. from `htpasswd -nBC 10 \"\" | tr -d ':\\n'`)")
            continue
        cost = int(m.group(1))
        if not 4 <= cost <= 31:
            r.error(vnode, f"{name}: bcrypt cost {cost} is outside 4..31")
            continue
        try:  # the salt as bcrypt reads it, at the lowest cost: a bad one would fail every login
            bcrypt.hashpw(b"", (h[:4] + "04" + h[6:29]).encode("ascii"))
        except ValueError:
            r.error(vnode, f"{name}: the bcrypt hash has an invalid salt")
            continue
        if ":" in user:
            r.warn(knode, f"{name}: a user name with ':' can never log in with basic auth")
        users.append((user, h))
    return tuple(users)


_RATE_KEYS = ("interval", "burst")


def _read_rate_limit(r: _Reader, node: yaml.Node) -> RateLimitConfig | None:
    pairs = r.mapping(node, "rate_limit")
    if pairs is None:
        return None
    interval: Any = 0.0
    burst: Any = 0
    at: dict[str, yaml.Node] = {}
    for key, knode, vnode in pairs:
        at[key] = vnode
        if key == "interval":  # Go's time.Duration, in our one grammar (a superset)
            interval = r.duration(vnode, "rate_limit.interval", MAX_RATE_INTERVAL)
        elif key == "burst":
            burst = r.integer(vnode, "rate_limit.burst", 0, MAX_BURST)
        else:
            r.unknown_key(knode, key, "rate_limit", _RATE_KEYS)
    if ABSENT in (interval, burst) or interval == 0:
        return None  # 0 disables the limiter, as in exporter-toolkit
    if burst < 1:
        r.error(at.get("burst") or node, "rate_limit.burst: must be at least 1 when interval is "
                "set, or every request would be refused")
        return None
    return RateLimitConfig(interval_seconds=interval, burst=burst)


# --------------------------------------------------------------------------- TLS


_VERIFY_MODES = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}


def _make_context(tls: TLSServerConfig, problem: Callable[[str, str], None]) -> ssl.SSLContext | None:
    """Build the server context; report each failure as problem(config key, message)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ok = True
    ctx.minimum_version = TLS_VERSIONS[tls.min_version]
    ctx.maximum_version = TLS_VERSIONS[tls.max_version]
    if tls.prefer_server_cipher_suites:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_alpn_protocols(["http/1.1"])

    def read(key: str, p: str) -> bool:
        try:
            with open(p, "rb"):
                return True
        except OSError as e:
            problem(key, f"tls_server_config.{key} {p!r}: cannot read: {e.strerror or e}")
            return False

    with tempfile.TemporaryDirectory(prefix="webconfig-") as tmp:
        cert_path, key_path = tls.cert_file, tls.key_file
        cert_key = "cert_file" if tls.cert_file else "cert"
        if cert_path is None and tls.cert is not None:
            cert_path = os.path.join(tmp, "cert.pem")
            _write_private(cert_path, tls.cert)
        if key_path is None and tls.key is not None:
            key_path = os.path.join(tmp, "key.pem")
            _write_private(key_path, tls.key)
        readable = True
        if tls.cert_file:
            readable &= read("cert_file", tls.cert_file)
        if tls.key_file:
            readable &= read("key_file", tls.key_file)
        if cert_path and key_path and readable:
            try:
                ctx.load_cert_chain(cert_path, key_path)
            except ssl.SSLError as e:
                ok = False
                problem(cert_key, f"tls_server_config: cannot load certificate and key: "
                        f"{e.reason or e}")
        else:
            ok = False

    mode = _VERIFY_MODES[tls.client_auth_type]
    if mode != ssl.CERT_NONE:
        try:
            if tls.client_ca_file:
                if read("client_ca_file", tls.client_ca_file):
                    ctx.load_verify_locations(cafile=tls.client_ca_file)
                else:
                    ok = False
            elif tls.client_ca:
                ctx.load_verify_locations(cadata=tls.client_ca)
            else:
                ctx.load_default_certs(ssl.Purpose.CLIENT_AUTH)
        except ssl.SSLError as e:
            ok = False
            key = "client_ca_file" if tls.client_ca_file else "client_ca"
            problem(key, f"tls_server_config.{key}: no usable CA certificate ({e.reason or e})")
        ctx.verify_mode = mode

    openssl_names = [CIPHER_SUITES[c] for c in tls.cipher_suites if CIPHER_SUITES.get(c)]
    if openssl_names:
        try:
            ctx.set_ciphers(":".join(openssl_names))  # type: ignore[arg-type]
        except ssl.SSLError:
            ok = False
            problem("cipher_suites", "tls_server_config.cipher_suites: none of these suites is "
                    "available in this OpenSSL")
    return ctx if ok else None


def _write_private(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def build_ssl_context(cfg: WebConfig | None) -> ssl.SSLContext | None:
    """A server-side context for ``cfg``, or None when TLS is off.

    Raises ``WebConfigError`` if the files no longer load (they are re-read on every call so
    that the server can pick up renewed certificates).
    """
    if cfg is None or cfg.tls_server_config is None:
        return None
    problems: list[str] = []
    ctx = _make_context(cfg.tls_server_config,
                        lambda key, msg: problems.append(f"{cfg.path}: {msg}"))
    if ctx is None:
        raise WebConfigError(problems or [f"{cfg.path}: cannot build TLS context"])
    return ctx


def _norm_san(kind: str, value: str) -> str:
    if kind == "IP Address":
        try:
            return str(ipaddress.ip_address(value.strip()))
        except ValueError:
            return value
    return value


def client_cert_allowed(tls: TLSServerConfig, peercert: Mapping[str, Any] | None) -> bool:
    """Whether a verified client certificate (``SSLSocket.getpeercert()``) passes
    ``client_allowed_sans``: any DNS, e-mail, IP or URI SAN listed there, as exporter-toolkit checks.
    """
    if tls.client_allowed_sans is None:
        return True
    if not peercert:
        return False
    allowed = {_norm_san("IP Address", s) for s in tls.client_allowed_sans} | set(tls.client_allowed_sans)
    for kind, value in peercert.get("subjectAltName", ()):
        if kind in ("DNS", "email", "IP Address", "URI") and _norm_san(kind, value) in allowed:
            return True
    return False
