"""``--web.config.file`` in prometheus/exporter-toolkit's format.

Users already write this file for node_exporter and friends, so we read the same keys with the same
meaning and reject what exporter-toolkit rejects. What Python's ``ssl`` cannot honour is an error,
not a silent downgrade (``curve_preferences``; a client certificate asked for or required without
being verified); what we honour only in part is a warning in ``WebConfig.warnings``, logged at load.
A value that would fail later (a header HTTP cannot carry, a bcrypt hash with a bad salt) is a load
error too. Relative paths are resolved against the config file's directory, as exporter-toolkit
does. Secrets are never echoed in messages.
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

from .configfile import ABSENT, ConfigError, Reader, describe, is_null, load, open_file

log = logging.getLogger(__name__)

CLIENT_AUTH_TYPES = ("NoClientCert", "RequestClientCert", "RequireAnyClientCert", "VerifyClientCertIfGiven",
                     "RequireAndVerifyClientCert")
_CLIENT_AUTH_ALIASES = {"RequireClientCert": "RequireAnyClientCert"}  # kept by exporter-toolkit
# The other two CLIENT_AUTH_TYPES are load errors (see the module docstring).
_VERIFY_MODES = {"NoClientCert": ssl.CERT_NONE, "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
                 "RequireAndVerifyClientCert": ssl.CERT_REQUIRED}

TLS_VERSIONS: Mapping[str, ssl.TLSVersion] = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
                                              "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}

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
    "Strict-Transport-Security": (), "X-Content-Type-Options": ("nosniff",), "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": (), "Content-Security-Policy": ()}

# RFC 9110 field-value characters (h11 checks the same): visible ASCII, space, tab, obs-text.
_HEADER_VALUE_RE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
# What golang.org/x/crypto/bcrypt and Python's bcrypt both verify.
_BCRYPT_RE = re.compile(r"\$2[abxy]\$(\d\d)\$[./A-Za-z0-9]{53}")
MAX_RATE_INTERVAL = 86400.0
MAX_BURST = 1_000_000


class WebConfigError(Exception):
    """Every problem found in a web config file, one ``FILE:LINE: message`` per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


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


class _Reader(Reader):
    """The shared reader with Go's yaml.v2 leniencies: any scalar is a string, ``<<`` merges."""

    echo = False  # a value in the wrong place may be a password or a key

    def mapping(self, node: yaml.Node | None, name: str,
                allowed: tuple[str, ...] | None = None) -> list[tuple[str, yaml.Node, yaml.Node]] | None:
        return super().mapping(node, name, allowed, merge=True, any_scalar_key=True)

    def string(self, node: yaml.Node, name: str) -> str | None:
        """Any scalar as written (Go's yaml.v2 also takes ``0`` for a string); None when null."""
        if is_null(node):
            return None
        if not isinstance(node, yaml.ScalarNode):
            self.error(node, f"{name}: expected a string, got {describe(node, False)}")
            return None
        return node.value

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

    def one_of(self, node: yaml.Node, name: str, value: str, choices: Mapping[str, Any] | tuple[str, ...],
               what: str = "invalid value") -> bool:
        if value in choices:
            return True
        self.error(node, f"{name}: {what} {value!r}; expected one of " + ", ".join(choices))
        return False


def load_web_config(path: str | os.PathLike[str]) -> WebConfig:
    """Read, check and freeze a web config file, or raise ``WebConfigError`` listing every problem.

    Certificates and keys are loaded here too, so that a bad one is reported with its line.
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


def _read_root(r: _Reader, root: yaml.Node | None, base: str) -> WebConfig:
    pairs = r.mapping(root, "web config", ("tls_server_config", "http_server_config", "basic_auth_users",
                                           "rate_limit")) or ()
    knodes = {key: knode for key, knode, _ in pairs}
    nodes = {key: vnode for key, _, vnode in pairs}  # an absent section reads as a null one: its defaults
    tls = _read_tls(r, knodes.get("tls_server_config"), nodes.get("tls_server_config"), base)
    http = _read_http(r, nodes.get("http_server_config"))
    users = _read_users(r, nodes.get("basic_auth_users"))
    rate = _read_rate_limit(r, nodes.get("rate_limit"))
    return WebConfig(path=r.path, tls_server_config=tls, http_server_config=http, basic_auth_users=users,
                     rate_limit=rate, warnings=tuple(r.warnings))


_TLS_KEYS = ("cert", "key", "client_ca", "cert_file", "key_file", "client_auth_type", "client_ca_file",
             "client_allowed_sans", "min_version", "max_version", "cipher_suites", "prefer_server_cipher_suites",
             "curve_preferences")
_TLS_PEMS = ("cert", "key", "client_ca")
_TLS_FILES = ("cert_file", "key_file", "client_ca_file")  # in the same order as _TLS_PEMS


def _read_tls(r: _Reader, section_knode: yaml.Node | None, node: yaml.Node | None,
              base: str) -> TLSServerConfig | None:
    pairs = r.mapping(node, "tls_server_config")
    v: dict[str, Any] = {}
    at: dict[str, yaml.Node] = {}  # key -> key node, for messages about the key as a whole
    n_problems = r.count

    for key, knode, vnode in pairs or ():
        name = f"tls_server_config.{key}"
        at[key] = knode
        if key in _TLS_PEMS or key in _TLS_FILES:
            s = r.string(vnode, name)
            if s:  # empty means unset, as in Go
                v[key] = os.path.join(base, s) if key in _TLS_FILES else s  # join keeps an absolute path
        elif key == "client_auth_type":
            s = r.string(vnode, name)
            if s and r.one_of(vnode, name, _CLIENT_AUTH_ALIASES.get(s, s), CLIENT_AUTH_TYPES):
                v[key] = _CLIENT_AUTH_ALIASES.get(s, s)
        elif key in ("min_version", "max_version"):
            s = r.string(vnode, name)
            if s is not None and r.one_of(vnode, name, s, TLS_VERSIONS, "unknown TLS version"):
                v[key] = s
        elif key == "prefer_server_cipher_suites":
            b = r.boolean(vnode, name)
            if b is not ABSENT:
                v[key] = b
        elif key == "cipher_suites":
            items = r.string_list(vnode, name)
            for s, inode in items or ():
                if s not in CIPHER_SUITES:
                    r.error(inode, f"{name}: unknown cipher suite {s!r}; expected Go names from tls.CipherSuites(), "
                            "e.g. TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256")
                elif CIPHER_SUITES[s] is None:
                    r.warn(inode, f"{name}: {s} is a TLS 1.3 suite, which cannot be chosen (Go ignores it too)")
            if items is not None:
                v[key] = tuple(s for s, _ in items if s in CIPHER_SUITES)
        elif key == "client_allowed_sans":
            items = r.string_list(vnode, name)
            if items is not None:
                v[key] = tuple(s for s, _ in items)
        elif key == "curve_preferences":  # any curve is an error, so none is ever kept
            items = r.string_list(vnode, name) or []
            for s, inode in items:
                if s not in CURVES:
                    r.error(inode, f"{name}: unknown curve {s!r}; expected one of " + ", ".join(CURVES))
            if items and all(s in CURVES for s, _ in items):
                r.error(knode, f"{name}: cannot be honoured; Python's ssl module cannot set a curve preference list "
                        "(remove it to use OpenSSL's default groups)")
        else:
            r.unknown_key(knode, key, "tls_server_config", _TLS_KEYS)

    # What turns TLS on; the first of them, in the order exporter-toolkit checks, names a missing part.
    given = [k for k in ("cert_file", "cert", "key_file", "key", "client_ca_file", "client_ca", "client_auth_type")
             if k in v]
    if not given:
        if pairs:
            r.warn(section_knode, "tls_server_config has no certificate, key, client CA or client_auth_type, so TLS "
                   "stays off and its other settings are ignored")
        return None

    def problem(key: str, message: str) -> None:
        r.error(at.get(key) or section_knode, message)

    for key in _TLS_FILES:
        if key in v:
            _readable(key, v[key], problem)

    cfg = TLSServerConfig(**v)
    if "cert_file" not in v and "cert" not in v:
        problem(given[0], f"tls_server_config: {given[0]} is set but there is no certificate (set cert_file, or cert)")
    if "key_file" not in v and "key" not in v:
        problem(given[0], f"tls_server_config: {given[0]} is set but there is no key (set key_file, or key)")
    for inline, fname in zip(_TLS_PEMS, _TLS_FILES):
        if inline in v and fname in v:
            r.warn(at[inline], f"tls_server_config: both {inline} and {fname} are set; {fname} is used, as in "
                   "exporter-toolkit")
    auth = cfg.client_auth_type
    has_ca = bool(cfg.client_ca_file or cfg.client_ca)
    if has_ca and auth == "NoClientCert":
        r.error(at.get("client_ca_file") or at.get("client_ca"), "tls_server_config: a client CA is set but "
                "client_auth_type is NoClientCert; set client_auth_type: RequireAndVerifyClientCert")
    if auth in ("RequestClientCert", "RequireAnyClientCert"):
        problem("client_auth_type", f"tls_server_config.client_auth_type: {auth} cannot be honoured: Python's ssl "
                "module cannot ask for a client certificate without verifying it; use VerifyClientCertIfGiven or "
                "RequireAndVerifyClientCert with client_ca_file")
    if auth in ("VerifyClientCertIfGiven", "RequireAndVerifyClientCert") and not has_ca:
        r.warn(at["client_auth_type"], "tls_server_config: no client_ca_file, so client certificates are verified "
               "against the system's CAs")
    if cfg.client_allowed_sans is not None and auth not in ("RequireAnyClientCert", "RequireAndVerifyClientCert"):
        problem("client_allowed_sans", "tls_server_config.client_allowed_sans requires client_auth_type "
                "RequireAnyClientCert or RequireAndVerifyClientCert")
    if TLS_VERSIONS[cfg.min_version] > TLS_VERSIONS[cfg.max_version]:
        r.error(at.get("min_version") or at.get("max_version"),
                f"tls_server_config: min_version {cfg.min_version} is above max_version {cfg.max_version}")
    if TLS_VERSIONS[cfg.min_version] < ssl.TLSVersion.TLSv1_2:
        r.warn(at.get("min_version"), f"tls_server_config.min_version {cfg.min_version}: OpenSSL's default security "
               "level may still refuse TLS below 1.2")
    if r.count == n_problems:  # load the files now, so that a bad certificate is reported with its line
        _make_context(cfg, problem)
    return cfg


def _read_http(r: _Reader, node: yaml.Node | None) -> HTTPServerConfig:
    http2 = True
    headers: list[tuple[str, str]] = []
    for key, knode, vnode in r.mapping(node, "http_server_config") or ():
        if key == "http2":
            b = r.boolean(vnode, "http_server_config.http2")
            if b is True:
                r.warn(knode, "http_server_config.http2: not honoured; this server speaks HTTP/1.1 only")
            http2 = http2 if b is ABSENT else b
        elif key == "headers":
            for hname, hknode, hvnode in r.mapping(vnode, "http_server_config.headers") or ():
                if hname not in HEADERS:
                    r.error(hknode, f"http_server_config.headers: header {hname!r} can not be configured; allowed: "
                            + ", ".join(HEADERS))
                    continue
                name = f"http_server_config.headers.{hname}"
                val = r.string(hvnode, name)
                if val is None:
                    continue
                if "\r" in val or "\n" in val:
                    r.error(hvnode, f"{name}: value contains a line break")
                elif not _HEADER_VALUE_RE.fullmatch(val):
                    r.error(hvnode, f"{name}: value has a character HTTP cannot carry (only visible ASCII, spaces, "
                            "tabs and Latin-1 letters)")
                elif (not HEADERS[hname] or r.one_of(hvnode, name, val, HEADERS[hname])) and val:  # blank: unset
                    headers.append((hname, val))
        else:
            r.unknown_key(knode, key, "http_server_config", ("http2", "headers"))
    return HTTPServerConfig(http2=http2, headers=tuple(headers))


def _read_users(r: _Reader, node: yaml.Node | None) -> tuple[tuple[str, str], ...]:
    users = []
    for user, knode, vnode in r.mapping(node, "basic_auth_users") or ():
        name = f"basic_auth_users.{user}"
        if not isinstance(vnode, yaml.ScalarNode) or is_null(vnode):
            r.error(vnode, f"{name}: expected a bcrypt hash, got {describe(vnode, False)}")
            continue
        h = vnode.value
        m = _BCRYPT_RE.fullmatch(h)
        if not m:  # never echo the value: it may be a plaintext password pasted by mistake
            r.error(vnode, f"{name}: not a bcrypt hash (expected $2a$, $2b$ or $2y$, a cost and 53 characters, "
                    "e.g. from `htpasswd -nBC 10 \"\" | tr -d ':\\n'`)")
            continue
        if not 4 <= int(m.group(1)) <= 31:
            r.error(vnode, f"{name}: bcrypt cost {int(m.group(1))} is outside 4..31")
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


def _read_rate_limit(r: _Reader, node: yaml.Node | None) -> RateLimitConfig | None:
    interval: Any = 0.0
    burst: Any = 0
    burst_node = node
    for key, knode, vnode in r.mapping(node, "rate_limit") or ():
        if key == "interval":  # Go's time.Duration, in our one grammar (a superset)
            interval = r.duration(vnode, "rate_limit.interval", MAX_RATE_INTERVAL)
        elif key == "burst":
            burst, burst_node = r.integer(vnode, "rate_limit.burst", 0, MAX_BURST), vnode
        else:
            r.unknown_key(knode, key, "rate_limit", ("interval", "burst"))
    if ABSENT in (interval, burst) or interval == 0:
        return None  # 0 disables the limiter, as in exporter-toolkit
    if burst < 1:
        r.error(burst_node, "rate_limit.burst: must be at least 1 when interval is set, or every request would be "
                "refused")
        return None
    return RateLimitConfig(interval_seconds=interval, burst=burst)


def _readable(key: str, path: str, problem: Callable[[str, str], None]) -> bool:
    try:
        with open_file(path):
            return True
    except OSError as e:
        problem(key, f"tls_server_config.{key} {path!r}: cannot read: {e.strerror or e}")
        return False


def _pem_file(directory: str, path: str | None, pem: str | None, name: str) -> str | None:
    """``path``, or else inline ``pem`` written to a private file (``ssl`` loads certificates from files only)."""
    if path is not None or pem is None:
        return path
    path = os.path.join(directory, name)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(pem)
    return path


def _make_context(tls: TLSServerConfig, problem: Callable[[str, str], None]) -> ssl.SSLContext | None:
    """Build the server context; report each failure as problem(config key, message)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = TLS_VERSIONS[tls.min_version]
    ctx.maximum_version = TLS_VERSIONS[tls.max_version]
    if tls.prefer_server_cipher_suites:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_alpn_protocols(["http/1.1"])

    readable = [_readable(k, p, problem) for k, p in (("cert_file", tls.cert_file), ("key_file", tls.key_file)) if p]
    with tempfile.TemporaryDirectory(prefix="webconfig-") as tmp:
        cert = _pem_file(tmp, tls.cert_file, tls.cert, "cert.pem")
        key = _pem_file(tmp, tls.key_file, tls.key, "key.pem")
        ok = bool(all(readable) and cert and key)
        if ok:
            try:
                ctx.load_cert_chain(cert, key)
            except ssl.SSLError as e:
                ok = False
                problem("cert_file" if tls.cert_file else "cert",
                        f"tls_server_config: cannot load certificate and key: {e.reason or e}")

    mode = _VERIFY_MODES[tls.client_auth_type]
    if mode != ssl.CERT_NONE:
        try:
            if tls.client_ca_file:
                if _readable("client_ca_file", tls.client_ca_file, problem):
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
            problem("cipher_suites", "tls_server_config.cipher_suites: none of these suites is available in this "
                    "OpenSSL")
    return ctx if ok else None


def build_ssl_context(cfg: WebConfig | None) -> ssl.SSLContext | None:
    """A server-side context for ``cfg``, or None when TLS is off; ``WebConfigError`` if its files no
    longer load (they are read again on every call, so that renewed certificates are picked up)."""
    if cfg is None or cfg.tls_server_config is None:
        return None
    problems: list[str] = []
    ctx = _make_context(cfg.tls_server_config, lambda key, msg: problems.append(f"{cfg.path}: {msg}"))
    if ctx is None:
        raise WebConfigError(problems or [f"{cfg.path}: cannot build TLS context"])
    return ctx


def _norm_ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        return value


def client_cert_allowed(tls: TLSServerConfig, peercert: Mapping[str, Any] | None) -> bool:
    """Whether a verified client certificate (``getpeercert()``) passes ``client_allowed_sans``: one
    of its DNS, e-mail, IP or URI SANs is listed there, as exporter-toolkit checks."""
    if tls.client_allowed_sans is None:
        return True
    allowed = {_norm_ip(s) for s in tls.client_allowed_sans} | set(tls.client_allowed_sans)
    return any((_norm_ip(value) if kind == "IP Address" else value) in allowed
               for kind, value in (peercert or {}).get("subjectAltName", ())
               if kind in ("DNS", "email", "IP Address", "URI"))
