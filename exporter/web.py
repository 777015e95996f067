"""The exporter's HTTP endpoint: landing page, telemetry, health; read-only by design.

Built on ``http.server.ThreadingHTTPServer`` so that it needs nothing beyond the standard
library: one daemon thread per connection (threads wait for the next connection rather than
exit, see ``_Workers``), HTTP/1.1 keep-alive, and each response written with a single ``sendall``
so that a scrape costs one round trip and no Nagle/delayed-ACK stall. The metrics renderer may
return its text in parts; the first, when it is the same object as last time, is not compressed
again (see ``_GzipCache``).

TLS is negotiated in the connection's own thread, never in the accept loop, so a client that
stalls its handshake cannot block others. The TLS context is rebuilt when the certificate, key or
client CA files change (checked at most once a second, on new connections), so renewed
certificates are picked up as exporter-toolkit does. Users, headers and rate limit are read once
at start-up; restart the exporter to change them.

Only GET and HEAD are served; there is no control action over HTTP.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import hmac
import html
import logging
import os
import re
import secrets
import socket
import socketserver
import ssl
import struct
import threading
import time
import zlib
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Sequence
from urllib.parse import urlsplit

import bcrypt

from .webconfig import (
    WebConfig,
    WebConfigError,
    build_ssl_context,
    client_cert_allowed,
)

log = logging.getLogger(__name__)

# 9478: not taken in the Prometheus "default port allocations" wiki as far as we know (the
# 9100-9999 range is nearly full, so claim it there before a release).
DEFAULT_LISTEN_ADDRESS = ":9478"
HEALTH_PATH = "/-/healthy"

GZIP_LEVEL = 1  # text metrics compress ~10x even at level 1, at a fraction of level 6's CPU
IDLE_TIMEOUT_SECONDS = 120.0  # longer than common scrape intervals so keep-alive is reused
HANDSHAKE_TIMEOUT_SECONDS = 10.0
_AUTH_CACHE_SIZE = 256


class _BasicAuth:
    """bcrypt verification with exporter-toolkit's protections.

    Every configured user is compared (constant time, no early exit) and an unknown user is
    checked against a decoy hash of the highest configured cost, so timing does not reveal
    which users exist. Successful (user, password) pairs are remembered under an HMAC with a
    per-process key, so a scrape does not pay bcrypt each time and no fast password hash is
    kept in memory. bcrypt runs one at a time so a flood of bad passwords burns one core.
    """

    def __init__(self, users: Sequence[tuple[str, str]]) -> None:
        self._users = [(u.encode("utf-8"), h.encode("ascii")) for u, h in users]
        self._max_cost = max(int(h[4:6]) for _, h in self._users)
        self._key = secrets.token_bytes(32)
        self._ok: dict[bytes, None] = {}  # insertion-ordered: oldest evicted first
        self._lock = threading.Lock()
        self._bcrypt_lock = threading.Lock()
        self._decoy: bytes | None = None

    def check(self, authorization: str | None) -> bool:
        if not authorization:
            return False
        scheme, _, b64 = authorization.strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            raw = base64.b64decode(b64.strip(), validate=True)
        except (ValueError, TypeError):
            return False
        user, sep, password = raw.partition(b":")
        if not sep:
            return False

        stored = None
        for u, h in self._users:
            if hmac.compare_digest(u, user):
                stored = h
        valid_user = stored is not None
        if stored is None:
            stored = self._decoy_hash()

        cache_key = hmac.new(self._key, b"\0".join((user, stored, password)), hashlib.sha256).digest()
        with self._lock:
            if cache_key in self._ok:
                return valid_user
        with self._bcrypt_lock:
            # bcrypt only uses 72 bytes; Go and htpasswd truncate the same way.
            ok = bcrypt.checkpw(password[:72], stored)
        if ok and valid_user:
            with self._lock:
                self._ok[cache_key] = None
                while len(self._ok) > _AUTH_CACHE_SIZE:
                    del self._ok[next(iter(self._ok))]
            return True
        return False

    def _decoy_hash(self) -> bytes:
        with self._lock:
            if self._decoy is None:
                self._decoy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(self._max_cost))
            return self._decoy


class _RateLimiter:
    """Token bucket as in golang.org/x/time/rate, used by exporter-toolkit's ``rate_limit``."""

    def __init__(self, interval: float, burst: int) -> None:
        self._interval = interval
        self._burst = float(burst)
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def allow(self) -> bool:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._last) / self._interval)
            self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False


class _TLSContexts:
    """Current TLS context, rebuilt when its files change; a broken new file keeps the old one."""

    def __init__(self, cfg: WebConfig) -> None:
        assert cfg.tls_server_config is not None
        self._cfg = cfg
        self._files = cfg.tls_server_config.watched_files
        self._stamp = self._stat()
        ctx = build_ssl_context(cfg)
        assert ctx is not None
        self._ctx = ctx
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def _stat(self) -> tuple:
        out = []
        for p in self._files:
            try:
                st = os.stat(p)
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append(None)
        return tuple(out)

    def get(self) -> ssl.SSLContext:
        now = time.monotonic()
        if not self._files or now - self._checked < 1.0:
            return self._ctx
        with self._lock:
            if now - self._checked < 1.0:
                return self._ctx
            self._checked = now
            stamp = self._stat()
            if stamp != self._stamp:
                try:
                    ctx = build_ssl_context(self._cfg)
                except (WebConfigError, OSError, ssl.SSLError) as e:
                    log.error("TLS files changed but cannot be loaded, keeping the old ones: %s", e)
                else:
                    self._ctx = ctx  # type: ignore[assignment]
                    log.info("TLS certificate files changed; reloaded")
                self._stamp = stamp
            return self._ctx


_date_cache: tuple[int, str] = (0, "")


def _http_date() -> str:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]


class _GzipCache:
    """gzip for a response whose first part seldom changes (the block-job text, the same until a
    job moves or ends) and whose rest is small (the exporter's own counters).

    The first part is deflated once, ending on a full flush (byte-aligned, no back-references
    across it); each response then deflates only the rest with a small fresh compressor and
    wraps both in one gzip member (RFC 1952 header, CRC-32 and length of the whole text). It is
    the same format a single pass writes, a few % larger (the rest cannot refer back into the
    first part), for a tenth of the CPU while the first part is unchanged.
    """

    _HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no name, no mtime, OS unknown

    def __init__(self, level: int = GZIP_LEVEL) -> None:
        self._level = level
        self._lock = threading.Lock()
        self._prefix: bytes | None = None
        self._deflated = (b"", 0)  # (raw deflate of the prefix up to a full flush, its CRC-32)

    def compress(self, parts: Sequence[bytes]) -> bytes:
        if len(parts) < 2:
            return zlib.compress(b"".join(parts), self._level, wbits=31)
        prefix, rest = parts[0], b"".join(parts[1:])
        with self._lock:
            if self._prefix is not prefix:
                compressor = zlib.compressobj(self._level, zlib.DEFLATED, -15)
                self._deflated = (compressor.compress(prefix) + compressor.flush(zlib.Z_FULL_FLUSH),
                                  zlib.crc32(prefix))
                self._prefix = prefix
            deflated, crc = self._deflated
        # A 4 KiB window and small tables: the rest is a few KiB, and a full-size compressor
        # costs more to set up than the whole rest takes to compress.
        compressor = zlib.compressobj(self._level, zlib.DEFLATED, -12, 2)
        tail = compressor.compress(rest) + compressor.flush()
        trailer = struct.pack("<II", zlib.crc32(rest, crc), (len(prefix) + len(rest)) & 0xFFFFFFFF)
        return b"".join((self._HEADER, deflated, tail, trailer))


def _accepts_gzip(accept_encoding: str | None) -> bool:
    if not accept_encoding:
        return False
    for part in accept_encoding.split(","):
        name, _, params = part.partition(";")
        if name.strip().lower() not in ("gzip", "x-gzip"):
            continue
        params = params.strip().replace(" ", "")
        if params.startswith("q="):
            try:
                return float(params[2:]) > 0
            except ValueError:
                return False
        return True
    return False


_ORDINARY_REQUEST_LINE = re.compile(rb"([A-Z]{1,16}) (/[!-~]*) HTTP/1\.([01])\r?\n")
_MAX_HEADERS = 100  # http.client's limits, so both paths refuse the same requests
_MAX_HEADER_LINE = 65536


class _Headers:
    """The request headers: ``get`` by name in any case, first value wins (as email's Message)."""

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: dict[str, str] = {}

    def add(self, name: str, value: str) -> None:
        self._values.setdefault(name.lower(), value)

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._values.get(name.lower(), default)

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._values


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "libvirt-blockjob-exporter"
    sys_version = ""  # don't advertise the Python version in error responses
    disable_nagle_algorithm = True
    timeout = IDLE_TIMEOUT_SECONDS
    server: "_Server"

    # Everything the base class would print goes to the debug log instead.
    def log_message(self, format: str, *args) -> None:  # noqa: A002
        log.debug("%s %s", self.address_string(), format % args)

    def log_request(self, code="-", size="-") -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug('%s "%s" %s %s', self.address_string(), self.requestline, code, size)

    def address_string(self) -> str:
        return str(self.client_address[0]) if self.client_address else "-"

    def parse_request(self) -> bool:
        """The base class's parsing, without ``email.parser`` for an ordinary request's headers
        (a third of a scrape's own time). A request line of any other shape (absolute form,
        HTTP/0.9 or 2, odd spacing) goes the base class's way, before any header is read."""
        match = _ORDINARY_REQUEST_LINE.fullmatch(self.raw_requestline)
        if match is None:
            return super().parse_request()
        command, path, minor = match.groups()
        self.command = command.decode("ascii")
        self.path = path.decode("latin-1")
        if self.path.startswith("//"):  # as the base class: no scheme-relative open redirects
            self.path = "/" + self.path.lstrip("/")
        self.request_version = "HTTP/1.1" if minor == b"1" else "HTTP/1.0"
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        self.close_connection = minor != b"1"
        headers = _Headers()
        last = None
        count = 0
        while True:
            line = self.rfile.readline(_MAX_HEADER_LINE + 1)
            if len(line) > _MAX_HEADER_LINE:
                self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Line too long",
                                "header line")
                return False
            if line in (b"\r\n", b"\n", b""):
                break
            count += 1
            if count > _MAX_HEADERS:
                self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Too many headers",
                                f"got more than {_MAX_HEADERS} headers")
                return False
            text = line.decode("latin-1").rstrip("\r\n")
            if text[:1] in (" ", "\t"):  # obsolete line folding: continues the last header
                if last is not None:
                    headers._values[last] += " " + text.strip()
                continue
            name, sep, value = text.partition(":")
            if sep:
                last = name.strip().lower()
                if last in headers:
                    last = None  # a repeated header: the first value is kept
                headers.add(name.strip(), value.strip())
        self.headers = headers  # type: ignore[assignment]
        connection = (headers.get("Connection") or "").lower()
        if connection == "close":
            self.close_connection = True
        elif connection == "keep-alive":
            self.close_connection = False
        if (headers.get("Expect") or "").lower() == "100-continue" and minor == b"1":
            return self.handle_expect_100()
        return True

    def end_headers(self) -> None:
        # Only reached for errors the base class answers itself (400, 414, ...).
        for k, v in self.server.app.extra_headers:
            self.send_header(k, v)
        super().end_headers()

    def _respond(self, status: HTTPStatus, body: bytes, content_type: str,
                 headers: Sequence[tuple[str, str]] = ()) -> None:
        app = self.server.app
        lines = [f"HTTP/1.1 {status.value} {status.phrase}",
                 f"Date: {_http_date()}",
                 f"Content-Type: {content_type}",
                 f"Content-Length: {len(body)}"]
        lines.extend(f"{k}: {v}" for k, v in headers)
        lines.extend(f"{k}: {v}" for k, v in app.extra_headers)
        if self.close_connection:
            lines.append("Connection: close")
        elif self.request_version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if self.command == "HEAD" or not body:
            self.wfile.write(head)
        else:
            self.wfile.write(head + body)
        self.log_request(status.value, len(body))

    def _text(self, status: HTTPStatus, text: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        self._respond(status, text.encode("utf-8"), "text/plain; charset=utf-8", headers)

    def _admit(self) -> bool:
        """Rate limit and basic auth, in exporter-toolkit's order, before any routing."""
        app = self.server.app
        if self.headers.get("Transfer-Encoding") or self.headers.get("Content-Length", "0") != "0":
            self.close_connection = True  # we never read request bodies; don't parse one as a request
        if app.limiter is not None and not app.limiter.allow():
            self._text(HTTPStatus.TOO_MANY_REQUESTS, "Too Many Requests\n")
            return False
        if app.auth is not None and not app.auth.check(self.headers.get("Authorization")):
            self._text(HTTPStatus.UNAUTHORIZED, "Unauthorized\n", (("WWW-Authenticate", "Basic"),))
            return False
        return True

    def do_GET(self) -> None:
        if not self._admit():
            return
        app = self.server.app
        path = self.path
        if not path.startswith("/"):  # absolute-form, e.g. through a forward proxy
            path = urlsplit(path).path or "/"
        if "?" in path:
            path = path.split("?", 1)[0]
        if path == app.telemetry_path:
            self._metrics()
        elif path == "/":
            self._respond(HTTPStatus.OK, app.landing_page, "text/html; charset=utf-8")
        elif path == HEALTH_PATH:
            self._text(HTTPStatus.OK, "OK")
        else:
            self._text(HTTPStatus.NOT_FOUND, "404 page not found\n")

    do_HEAD = do_GET

    def _metrics(self) -> None:
        app = self.server.app
        try:
            body, content_type = app.render_metrics(self.headers.get("Accept"))
        except Exception:
            log.exception("rendering metrics failed")
            self._text(HTTPStatus.INTERNAL_SERVER_ERROR,
                       "An error has occurred while serving metrics; see the exporter's log.\n")
            return
        headers: list[tuple[str, str]] = [("Vary", "Accept-Encoding")]
        parts = (body,) if isinstance(body, bytes) else tuple(body)
        if _accepts_gzip(self.headers.get("Accept-Encoding")):
            body = app.gzip.compress(parts)
            headers.append(("Content-Encoding", "gzip"))
        else:
            body = b"".join(parts)
        self._respond(HTTPStatus.OK, body, content_type, headers)

    def _not_allowed(self) -> None:
        if not self._admit():
            return
        self._text(HTTPStatus.METHOD_NOT_ALLOWED, "Method Not Allowed\n", (("Allow", "GET, HEAD"),))

    def __getattr__(self, name: str):
        # Any other method (POST, PUT, DELETE, OPTIONS, ...) is refused the same way.
        if name.startswith("do_"):
            return self._not_allowed
        raise AttributeError(name)


class _Workers:
    """Connection threads that wait for the next connection instead of exiting.

    Every connection still gets a thread of its own (a kept-alive scrape connection holds one for
    its life), but a thread that has finished waits ``idle_seconds`` for another connection
    before it exits: starting a thread costs more than a whole scrape's response.
    """

    def __init__(self, serve: Callable[[object, object], None], idle_seconds: float = 60.0) -> None:
        self._serve = serve
        self._idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._idle: list[_Slot] = []
        self._closed = False

    def submit(self, request, client_address) -> None:
        with self._lock:
            if self._idle:
                slot = self._idle.pop()
                slot.work = (request, client_address)
                slot.ready.set()
                return
        threading.Thread(target=self._run, args=((request, client_address),), name="web-connection",
                         daemon=True).start()

    def _run(self, work) -> None:
        slot = _Slot()
        while work is not None:
            self._serve(*work)
            slot.ready.clear()
            slot.work = None
            with self._lock:
                if self._closed:
                    return
                self._idle.append(slot)
            if not slot.ready.wait(self._idle_seconds):
                with self._lock:
                    if slot in self._idle:
                        self._idle.remove(slot)
                        return
                slot.ready.wait()  # submit() took this slot as the wait ended: the work is coming
            work = slot.work

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for slot in idle:
            slot.ready.set()  # no work: the thread exits


class _Slot:
    __slots__ = ("ready", "work")

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.work: tuple | None = None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    app: "WebServer"
    dual_stack = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.workers = _Workers(self.process_request_thread)

    def process_request(self, request, client_address) -> None:
        self.workers.submit(request, client_address)

    def server_close(self) -> None:
        self.workers.close()
        super().server_close()

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if self.dual_stack else 1)
        # Skip HTTPServer.server_bind: its getfqdn() can wait on DNS.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), port

    def finish_request(self, request, client_address) -> None:
        conn = request
        app = self.app
        app._track(conn, True)
        try:
            if app.tls is not None:
                conn.settimeout(HANDSHAKE_TIMEOUT_SECONDS)
                try:
                    conn = app.tls.get().wrap_socket(request, server_side=True)
                except (OSError, ssl.SSLError) as e:
                    log.debug("TLS handshake with %s failed: %s", client_address[0], e)
                    return
                app._track(conn, True)
                tls_cfg = app.web_config.tls_server_config  # type: ignore[union-attr]
                if not client_cert_allowed(tls_cfg, conn.getpeercert()):
                    log.debug("client %s: certificate has no allowed SAN", client_address[0])
                    return
            self.RequestHandlerClass(conn, client_address, self)
        finally:
            app._track(request, False)
            if conn is not request:
                app._track(conn, False)
                try:
                    conn.close()
                except OSError:
                    pass

    def handle_error(self, request, client_address) -> None:
        log.debug("error serving %s", client_address, exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


def parse_listen_address(address: str) -> tuple[str, int]:
    """``host:port``, ``:port`` (all interfaces) or ``[v6]:port`` -> (host, port); host "" = all."""
    host, sep, port_s = address.rpartition(":")
    if not sep:
        raise ValueError(f"listen address {address!r}: expected host:port, e.g. {DEFAULT_LISTEN_ADDRESS}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"listen address {address!r}: put an IPv6 address in brackets, "
                         "e.g. [::1]:9478")
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"listen address {address!r}: port must be a number from 0 to 65535")
    return host, int(port_s)


class WebServer:
    """Serves ``/``, the telemetry path and ``/-/healthy``; see the module docstring."""

    def __init__(self, listen_address: str, telemetry_path: str,
                 render_metrics: Callable[[str | None], tuple[bytes | Sequence[bytes], str]],
                 web_config: WebConfig | None = None,
                 landing_title: str = "libvirt block job exporter",
                 landing_links: Sequence[tuple[str, str]] = (),
                 version: str = "") -> None:
        if not telemetry_path.startswith("/"):
            raise ValueError(f"telemetry path {telemetry_path!r} must start with '/'")
        self.listen_address = listen_address
        self._host, self._port = parse_listen_address(listen_address)
        self.telemetry_path = telemetry_path
        self.render_metrics = render_metrics
        self.gzip = _GzipCache()
        self.web_config = web_config
        self.landing_page = _landing_page(landing_title, version, telemetry_path, landing_links)
        http_cfg = web_config.http_server_config if web_config else None
        self.extra_headers: tuple[tuple[str, str], ...] = http_cfg.headers if http_cfg else ()
        users = web_config.basic_auth_users if web_config else ()
        self.auth = _BasicAuth(users) if users else None
        rl = web_config.rate_limit if web_config else None
        self.limiter = _RateLimiter(rl.interval_seconds, rl.burst) if rl else None
        # Built now so that bad certificates fail start-up, not the first scrape.
        self.tls = _TLSContexts(web_config) if web_config and web_config.tls_server_config else None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._conns: set = set()
        self._conns_lock = threading.Lock()

    def _track(self, conn, add: bool) -> None:
        with self._conns_lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("WebServer already started")
        host, port = self._host, self._port
        try:
            if host == "":
                server = self._bind_any(port)
            else:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                           flags=socket.AI_PASSIVE)
                # Like Go: one address per host name, IPv4 first.
                infos.sort(key=lambda i: i[0] != socket.AF_INET)
                family, _, _, _, sockaddr = infos[0]
                cls = _Server6 if family == socket.AF_INET6 else _Server
                server = self._bind(cls, sockaddr[:2])
        except OSError as e:
            raise OSError(e.errno, f"cannot listen on {self.listen_address}: "
                          f"{e.strerror or e}") from e
        server.app = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="web-server", daemon=True)
        self._thread.start()
        scheme = "https" if self.tls else "http"
        log.info("listening on %s (%s)", self.listen_address, scheme)

    def _bind_any(self, port: int) -> _Server:
        if socket.has_ipv6:
            try:
                cls = type("_ServerDual", (_Server6,), {"dual_stack": True})
                return self._bind(cls, ("::", port))
            except OSError as e:
                if e.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):  # IPv6 is off
                    raise
        return self._bind(_Server, ("0.0.0.0", port))

    @staticmethod
    def _bind(cls: type[_Server], addr: tuple) -> _Server:
        server = cls(addr, _Handler, bind_and_activate=False)
        try:
            server.server_bind()
            server.server_activate()
        except BaseException:
            server.server_close()
            raise
        return server

    @property
    def bound_address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("WebServer not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def shutdown(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        stopper = threading.Thread(target=server.shutdown, name="web-server-stop", daemon=True)
        stopper.start()
        host, port = server.server_address[:2]
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        while stopper.is_alive():
            # Wake the accept loop so that shutdown need not wait out its poll interval.
            try:
                socket.create_connection((host, port), timeout=0.2).close()
            except OSError:
                pass
            stopper.join(0.05)
        server.server_close()
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:  # end keep-alive connections, or they would outlive the server
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def _landing_page(title: str, version: str, telemetry_path: str,
                  links: Sequence[tuple[str, str]]) -> bytes:
    e = html.escape
    items: list[tuple[str, str]] = []
    for href, text in [(telemetry_path, "Metrics"), *links, (HEALTH_PATH, "Health")]:
        if all(href != h for h, _ in items):  # a caller's own link to /-/healthy is not doubled
            items.append((href, text))
    lis = "\n".join(f'<li><a href="{e(h, quote=True)}">{e(t)}</a></li>' for h, t in items)
    ver = f"<p>Version: {e(version)}</p>\n" if version else ""
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{e(title)}</title>\n"
        "<style>body{font-family:sans-serif;max-width:50em;margin:2em auto;padding:0 1em}</style>\n"
        f"</head>\n<body>\n<h1>{e(title)}</h1>\n{ver}<ul>\n{lis}\n</ul>\n</body>\n</html>\n"
    )
    return page.encode("utf-8")
