"""The exporter's HTTP face: status page, telemetry, health; GET and HEAD only, read-only by design.

uvicorn's h11 protocol serves on one asyncio event loop in a thread of its own, so an idle or slow
client costs a file descriptor, not a thread (README, "HTTP server"). What uvicorn and h11 leave
out is added here, per connection:

- HEADER_TIMEOUT_SECONDS for the whole request head, from TCP open (TLS handshake included) or from
  a kept-alive request's first byte, however slowly the client trickles;
- MAX_HEADER_BYTES of head, answered 431 beyond (h11 bounds only a head still incomplete);
- a cap on open connections below the open-file limit (one more: 503, or closed under TLS); the
  soft RLIMIT_NOFILE is raised to the hard one, and an ``accept()`` that still fails pauses
  accepting a second, logged once (asyncio's own accept loop multiplies its retries);
- WRITE_TIMEOUT_SECONDS for a client that stops reading an answer, so unsent answers cannot pile up;
- Go's plain-text 400 answer to plain HTTP on the TLS port.

The web config file and the certificates it names are re-read when their stat changes (checked on
each request and each new connection); users, headers and the rate limit apply to the next request,
TLS settings to the next connection. A file that no longer loads is logged and the previous config
kept. Turning TLS on or off needs a restart.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import functools
import gzip
import hashlib
import hmac
import logging
import os
import resource
import secrets
import socket
import ssl
import threading
import time
from asyncio import sslproto
from email.utils import formatdate
from typing import Callable, Sequence
from urllib.parse import parse_qs, urlsplit

import bcrypt
import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from .status_page import CONTENT_SECURITY_POLICY, render_page
from .webconfig import WebConfig, WebConfigError, build_ssl_context, client_cert_allowed, load_web_config

log = logging.getLogger(__name__)

# 9478: not taken in the Prometheus "default port allocations" wiki as far as we know (the
# 9100-9999 range is nearly full, so claim it there before a release).
DEFAULT_LISTEN_ADDRESS = ":9478"
HEALTH_PATH = "/-/healthy"
STATUS_PATH = "/status.json"  # the status page's data (exporter.status); the page fetches it relative to /

MAX_HEADER_BYTES = 64 * 1024  # request line and headers together
HEADER_TIMEOUT_SECONDS = 10.0  # from connection open (or a kept-alive request's first byte) to a complete head
WRITE_TIMEOUT_SECONDS = 10.0  # a client that stops reading an answer for this long is cut off
IDLE_TIMEOUT_SECONDS = 120.0  # between requests: longer than common scrape intervals, so keep-alive is reused
MAX_CONNECTIONS = 4096
FD_RESERVE = 64  # descriptors kept for libvirt, logs, certificates
GZIP_LEVEL = 1  # metrics text compresses well even at level 1, for a fraction of level 9's CPU
DECOY_COST = 10  # exporter-toolkit's decoy hash cost
_AUTH_CACHE_SIZE = 256

_TOO_MANY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
             b"Content-Length: 21\r\nConnection: close\r\n\r\nToo many connections\n")
_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain; charset=utf-8\r\n"
              b"Content-Length: 26\r\nConnection: close\r\n\r\nRequest headers too large\n")
# What Go's net/http writes when a TLS server receives plain HTTP.
_PLAIN_TO_TLS = b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"

Exposition = Callable[[str | None, Sequence[str]], tuple[bytes, str]]


class _BasicAuth:
    """bcrypt verification with exporter-toolkit's protections.

    An unknown user is checked against a decoy hash, so timing tells little about which users
    exist. Logins that passed are cached under an HMAC with a per-process key: a scrape does not pay
    bcrypt each time and no fast password hash is kept. bcrypt runs in a worker thread, one at a
    time, so a flood of bad passwords burns one core, never the event loop or a cached login.
    """

    def __init__(self, users: Sequence[tuple[str, str]], decoy: bytes) -> None:
        self._users = {u.encode("utf-8"): h.encode("ascii") for u, h in users}
        self._decoy = decoy
        self._key = secrets.token_bytes(32)
        self._ok: dict[bytes, None] = {}  # insertion-ordered: oldest evicted first; written under _lock
        self._lock = threading.Lock()

    @staticmethod
    def credentials(authorization: str | None) -> tuple[bytes, bytes] | None:
        scheme, _, b64 = (authorization or "").strip().partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            raw = base64.b64decode(b64.strip(), validate=True)
        except ValueError:
            return None
        user, sep, password = raw.partition(b":")
        return (user, password) if sep else None

    def _cache_key(self, user: bytes, password: bytes) -> tuple[bytes, bytes | None]:
        stored = self._users.get(user)
        key = b"\0".join((user, stored or self._decoy, password))
        return hmac.new(self._key, key, hashlib.sha256).digest(), stored

    def cached(self, user: bytes, password: bytes) -> bool:
        return self._cache_key(user, password)[0] in self._ok

    def verify(self, user: bytes, password: bytes) -> bool:
        """The slow check (bcrypt); run it off the event loop."""
        key, stored = self._cache_key(user, password)
        with self._lock:
            # bcrypt only uses 72 bytes; Go and htpasswd truncate the same way.
            if not bcrypt.checkpw(password[:72], stored or self._decoy) or not stored:
                return False
            self._ok[key] = None
            while len(self._ok) > _AUTH_CACHE_SIZE:
                del self._ok[next(iter(self._ok))]
        return True


class _RateLimiter:
    """Token bucket as in golang.org/x/time/rate, used by exporter-toolkit's ``rate_limit``."""

    def __init__(self, interval: float, burst: int) -> None:
        self.params = (interval, burst)
        self._tokens = float(burst)
        self._last = time.monotonic()

    def allow(self) -> bool:  # only the event loop calls it
        interval, burst = self.params
        now = time.monotonic()
        self._tokens = min(float(burst), self._tokens + (now - self._last) / interval)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


def _stat(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino


class _Settings:
    """The web config in force; see the module docstring for when it is re-read."""

    def __init__(self, cfg: WebConfig | None) -> None:
        # Made once, here, whatever the users' costs: never on a request, never under a lock.
        self._decoy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(DECOY_COST)) if cfg else b""
        self.tls: ssl.SSLContext | None = build_ssl_context(cfg)  # a bad certificate fails start-up
        self.limiter: _RateLimiter | None = None
        self._apply(cfg or WebConfig())  # without a path, never re-read

    def _files(self) -> tuple:
        tls = self.cfg.tls_server_config
        return tuple(_stat(p) for p in (self.cfg.path, *(tls.watched_files if tls else ())))

    def _apply(self, cfg: WebConfig) -> None:
        self.cfg = cfg
        self._stamp = self._files()
        self.headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in cfg.http_server_config.headers]
        self.auth = _BasicAuth(cfg.basic_auth_users, self._decoy) if cfg.basic_auth_users else None
        rl = cfg.rate_limit
        if rl is None or self.limiter is None or self.limiter.params != (rl.interval_seconds, rl.burst):
            self.limiter = None if rl is None else _RateLimiter(rl.interval_seconds, rl.burst)

    def refresh(self) -> None:
        """Re-read the config (and certificates) if a file changed since the last look."""
        stamp = self._files() if self.cfg.path else self._stamp
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            cfg = load_web_config(self.cfg.path)
            if (cfg.tls_server_config is None) != (self.cfg.tls_server_config is None):
                raise WebConfigError([f"{cfg.path}: turning TLS on or off needs a restart"])
            tls = build_ssl_context(cfg)
        except (WebConfigError, OSError, ssl.SSLError) as e:
            log.error("web config or TLS files changed but cannot be used; keeping the previous ones:\n%s", e)
            return
        self.tls = tls
        self._apply(cfg)
        log.info("web config %s reloaded", cfg.path)


class _Listener:
    """The accept loop. asyncio's own retries a failed ``accept()`` once per queued connection and
    each retry schedules another, so on EMFILE its timers multiply; here accepting pauses for a
    second and the first failure is logged."""

    def __init__(self, face: "WebServer", sock: socket.socket, limit: int, loop: asyncio.AbstractEventLoop,
                 factory: Callable[[], asyncio.Protocol]) -> None:
        self._face, self._sock, self._loop, self._factory = face, sock, loop, factory
        self.limit = limit
        self.count = 0  # connections accepted and not yet lost
        self.open: set[asyncio.BaseTransport] = set()
        self._refusing = False
        self._out_of_fds_logged = False
        loop.add_reader(sock, self._accept)

    def stop(self) -> None:
        self._loop.remove_reader(self._sock)

    def _accept(self) -> None:
        loop = self._loop
        for _ in range(128):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as e:  # EMFILE, ENFILE, ENOBUFS, ...: retrying at once would spin
                if not self._out_of_fds_logged:
                    self._out_of_fds_logged = True
                    log.error("accept() failed: %s; new connections wait, retried every second "
                              "(%d connections open; logged once)", e.strerror, self.count)
                loop.remove_reader(self._sock)
                loop.call_later(1.0, loop.add_reader, self._sock, self._accept)
                return
            if self.count >= self.limit:
                if not self._refusing:
                    self._refusing = True
                    log.warning("%d connections open, the most allowed; refusing new ones until some close", self.limit)
                if self._face.settings.tls is None:
                    with contextlib.suppress(OSError):
                        conn.send(_TOO_MANY)
                conn.close()
                continue
            self._refusing = False
            self.count += 1
            conn.setblocking(False)
            # uvicorn writes head and body apart: without this, delayed ACKs hold up kept-alive answers.
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            loop.create_task(self._connect(conn))

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn)
        except Exception as e:  # the client went away at once
            log.debug("connection setup failed: %s", e)
            self.count -= 1
            conn.close()


class _HTTP(H11Protocol):
    """uvicorn's h11 protocol plus the bounds of the module docstring."""

    def __init__(self, face: "WebServer", **kwargs) -> None:
        super().__init__(**kwargs)
        self._face = face
        self._raw: asyncio.BaseTransport | None = None  # the TCP transport
        self._made = False  # uvicorn's connection_made ran
        self._deadline: asyncio.TimerHandle | None = None
        self._head_bytes = 0  # of the request head being received
        self._stalled: asyncio.TimerHandle | None = None  # armed while the client does not read

    def opened(self, raw: asyncio.BaseTransport) -> None:
        self._raw = raw
        self._face.listener.open.add(raw)
        self._deadline = self.loop.call_later(HEADER_TIMEOUT_SECONDS, self._too_slow)

    def closed(self) -> None:
        self._disarm()
        if self._stalled is not None:
            self._stalled.cancel()
        if self._raw is not None:
            self._face.listener.open.discard(self._raw)
            self._face.listener.count -= 1
            self._raw = None

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        log.debug("%s: request headers not complete within %gs; closing", self.client, HEADER_TIMEOUT_SECONDS)
        if self._raw is not None:
            self._raw.abort()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self._raw is None:  # plain HTTP
            self.opened(transport)
        tls = self._face.settings.cfg.tls_server_config
        if tls is not None and not client_cert_allowed(tls, transport.get_extra_info("peercert")):
            log.debug("client certificate has no allowed SAN; closing")
            transport.abort()
            return
        self._made = True
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._raw is self.transport:  # plain HTTP
            self.closed()
        if self._made:
            super().connection_lost(exc)

    def pause_writing(self) -> None:
        """The client stopped reading an answer: it has WRITE_TIMEOUT_SECONDS to resume."""
        super().pause_writing()
        if self._stalled is None and self._raw is not None:
            self._stalled = self.loop.call_later(WRITE_TIMEOUT_SECONDS, self._raw.abort)

    def resume_writing(self) -> None:
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None
        super().resume_writing()

    def data_received(self, data: bytes) -> None:
        state = self.conn.their_state
        if state is h11.ERROR or self.transport.is_closing():
            return
        if state is not h11.IDLE:  # a body, or a pipelined request behind the one being answered
            super().data_received(data)
            return
        if self._deadline is None:  # the next request on a kept-alive connection
            self._deadline = self.loop.call_later(HEADER_TIMEOUT_SECONDS, self._too_slow)
        # h11 bounds only an incomplete head: feed it no more than the bound of any head.
        room = MAX_HEADER_BYTES - self._head_bytes
        head, rest = data[:room], data[room:]
        self._head_bytes += len(head)
        super().data_received(head)
        if self.conn.their_state is h11.IDLE:
            if rest and not self.transport.is_closing():
                self.transport.write(_TOO_LARGE)
                self.transport.close()
            return
        self._disarm()
        self._head_bytes = 0
        if rest:
            self.data_received(rest)


class _TLS(sslproto.SSLProtocol):
    """asyncio's TLS layer with the connection counted and timed from TCP open, and Go's answer to
    plain HTTP (OpenSSL recognises an HTTP request line in place of a ClientHello)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, app: _HTTP, context: ssl.SSLContext) -> None:
        super().__init__(loop, app, context, None, server_side=True,
                         ssl_handshake_timeout=HEADER_TIMEOUT_SECONDS)
        self._http = app

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._http.opened(transport)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._http.closed()
        super().connection_lost(exc)

    def _on_handshake_complete(self, handshake_exc: Exception | None) -> None:
        if isinstance(handshake_exc, ssl.SSLError) and handshake_exc.reason == "HTTP_REQUEST" \
                and self._transport is not None:
            self._transport.write(_PLAIN_TO_TLS)
        super()._on_handshake_complete(handshake_exc)


@functools.lru_cache(maxsize=1)
def _http_date(now: int) -> bytes:
    return formatdate(now, usegmt=True).encode("ascii")


def _accepts_gzip(accept_encoding: str) -> bool:
    """gzip listed with a q-value above 0 (prometheus_client's own check ignores ``q=0``)."""
    for part in accept_encoding.split(","):
        name, *params = part.split(";")
        if name.strip().lower() not in ("gzip", "x-gzip"):
            continue
        for param in params:
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    return float(value) > 0
                except ValueError:
                    return False
        return True
    return False


class WebServer:
    """Serves the status page at ``/`` and its data (``status``, a JSON body built from in-memory
    snapshots, never from libvirt), the telemetry path and ``/-/healthy``; see the module docstring."""

    def __init__(self, listen_address: str, telemetry_path: str, exposition: Exposition,
                 web_config: WebConfig | None = None,
                 landing_title: str = "libvirt block job exporter",
                 landing_links: Sequence[tuple[str, str]] = (),
                 version: str = "", max_connections: int = MAX_CONNECTIONS,
                 status: Callable[[], bytes] | None = None) -> None:
        if not telemetry_path.startswith("/"):
            raise ValueError(f"telemetry path {telemetry_path!r} must start with '/'")
        self.listen_address = listen_address
        self._host, self._port = parse_listen_address(listen_address)
        self.telemetry_path = telemetry_path
        self.exposition = exposition
        self.landing_page = _landing_page(landing_title, version, telemetry_path, landing_links)
        self.status = status
        self.settings = _Settings(web_config)
        self.max_connections = max_connections
        self.listener: _Listener | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        settings = self.settings
        settings.refresh()
        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name, value)  # the first of repeated headers, as before

        def header(name: bytes) -> str | None:
            value = headers.get(name)
            return None if value is None else value.decode("latin-1")

        extra = list(settings.headers)
        if headers.get(b"transfer-encoding") or headers.get(b"content-length", b"0") != b"0":
            extra.append((b"connection", b"close"))  # we never read request bodies

        async def respond(status: int, body: bytes, content_type: bytes, more: Sequence = ()) -> None:
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"date", _http_date(int(time.time()))), (b"content-type", content_type),
                                    (b"content-length", str(len(body)).encode()), *more, *extra]})
            await send({"type": "http.response.body", "body": body})

        text = b"text/plain; charset=utf-8"
        if settings.limiter is not None and not settings.limiter.allow():
            return await respond(429, b"Too Many Requests\n", text)
        if settings.auth is not None:
            auth = settings.auth
            creds = auth.credentials(header(b"authorization"))
            ok = creds is not None and (auth.cached(*creds) or await asyncio.to_thread(auth.verify, *creds))
            if not ok:
                return await respond(401, b"Unauthorized\n", text, [(b"www-authenticate", b"Basic")])
        if scope["method"] not in ("GET", "HEAD"):
            return await respond(405, b"Method Not Allowed\n", text, [(b"allow", b"GET, HEAD")])
        path = scope["path"]
        if not path.startswith("/"):  # absolute-form, e.g. through a forward proxy
            path = urlsplit(path).path or "/"
        if path == self.telemetry_path:
            names = parse_qs(scope["query_string"].decode("latin-1")).get("name[]", ())
            try:
                body, content_type = self.exposition(header(b"accept"), names)
            except Exception:
                log.exception("rendering metrics failed")
                return await respond(500, b"An error has occurred while serving metrics; see the exporter's log.\n",
                                     text)
            more = [(b"vary", b"Accept, Accept-Encoding")]
            if _accepts_gzip(header(b"accept-encoding") or ""):
                body = gzip.compress(body, GZIP_LEVEL, mtime=0)
                more.append((b"content-encoding", b"gzip"))
            return await respond(200, body, content_type.encode("latin-1"), more)
        if path == "/":
            return await respond(200, self.landing_page, b"text/html; charset=utf-8",
                                 [(b"content-security-policy", _PAGE_CSP)])
        if path == STATUS_PATH and self.status is not None:
            try:
                body = self.status()
            except Exception:
                log.exception("building the status failed")
                return await respond(500, b"An error has occurred while building the status; see the exporter's log.\n",
                                     text)
            return await respond(200, body, b"application/json",
                                 [(b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff")])
        if path == HEALTH_PATH:
            return await respond(200, b"OK", text)
        return await respond(404, b"404 page not found\n", text)

    def _protocol(self, config: uvicorn.Config, state: ServerState, loop: asyncio.AbstractEventLoop) -> asyncio.Protocol:
        http = _HTTP(self, config=config, server_state=state, app_state={}, _loop=loop)
        self.settings.refresh()
        if self.settings.tls is None:
            return http
        return _TLS(loop, http, self.settings.tls)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("WebServer already started")
        limit = _raise_fd_limit()
        try:
            sock = _listen(self._host, self._port)
        except OSError as e:
            raise OSError(e.errno, f"cannot listen on {self.listen_address}: {e.strerror or e}") from e
        cap = self.max_connections if limit is None else max(1, min(self.max_connections, limit - FD_RESERVE))
        if not log.isEnabledFor(logging.DEBUG):
            logging.getLogger("uvicorn.error").setLevel(logging.ERROR)  # one line per bad request otherwise
        # uvicorn's protocol parses and answers. Not its Server: that wakes ten times a second to
        # refresh the Date header (written per response here) and accepts as asyncio does.
        config = uvicorn.Config(
            self, http="h11", ws="none", lifespan="off", interface="asgi3", log_config=None,
            access_log=False, proxy_headers=False, server_header=False, date_header=False,
            timeout_keep_alive=int(IDLE_TIMEOUT_SECONDS), h11_max_incomplete_event_size=MAX_HEADER_BYTES)
        config.load()
        self._sock = sock
        started = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(sock, config, cap, started), name="web-server",
                                        daemon=True)
        self._thread.start()
        started.wait(10)
        log.info("listening on %s (%s), at most %d connections", self.listen_address,
                 "https" if self.settings.tls else "http", cap)

    def _serve(self, sock: socket.socket, config: uvicorn.Config, cap: int, started: threading.Event) -> None:
        state = ServerState()
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop, self._stop = loop, asyncio.Event()
        try:
            self.listener = listener = _Listener(self, sock, cap, loop, lambda: self._protocol(config, state, loop))
            started.set()
            loop.run_until_complete(self._stop.wait())
            listener.stop()
            for connection in list(state.connections):  # closes idle ones, ends the others after their answer
                connection.shutdown()
            loop.run_until_complete(_drain(state, 2.0))
            for transport in list(listener.open):
                transport.abort()
            loop.run_until_complete(asyncio.sleep(0))
        finally:
            started.set()
            loop.close()

    @property
    def bound_address(self) -> tuple[str, int]:
        if self._sock is None:
            raise RuntimeError("WebServer not started")
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    def shutdown(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._loop.call_soon_threadsafe(self._stop.set)
        thread.join(timeout=10)
        if self._sock is not None:
            self._sock.close()


async def _drain(state: ServerState, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while (state.connections or state.tasks) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    for task in state.tasks:
        task.cancel()


def _raise_fd_limit() -> int | None:
    """Soft RLIMIT_NOFILE up to the hard limit; the soft limit now in force (None: unlimited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.debug("open-file limit raised from %d to %d", soft, hard)
            soft = hard
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, e)
    return None if soft == resource.RLIM_INFINITY else soft


def _listen(host: str, port: int) -> socket.socket:
    if host == "":
        candidates = [(socket.AF_INET6, ("::", port), True), (socket.AF_INET, ("0.0.0.0", port), False)]
    else:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        infos.sort(key=lambda i: i[0] != socket.AF_INET)  # like Go: one address per name, IPv4 first
        candidates = [(infos[0][0], infos[0][4][:2], False)]
    for i, (family, addr, dual) in enumerate(candidates):
        sock = None
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)  # EAFNOSUPPORT on a host without IPv6
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual else 1)
            sock.bind(addr)
            sock.listen(128)
            sock.setblocking(False)
            return sock
        except OSError as e:
            if sock is not None:
                sock.close()
            if i + 1 == len(candidates) or e.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                raise
    raise AssertionError("unreachable")


def parse_listen_address(address: str) -> tuple[str, int]:
    """``host:port``, ``:port`` (all interfaces) or ``[v6]:port`` -> (host, port); host "" = all."""
    host, sep, port_s = address.rpartition(":")
    if not sep:
        raise ValueError(f"listen address {address!r}: expected host:port, e.g. {DEFAULT_LISTEN_ADDRESS}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"listen address {address!r}: put an IPv6 address in brackets, e.g. [::1]:9478")
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"listen address {address!r}: port must be a number from 0 to 65535")
    return host, int(port_s)


_PAGE_CSP = CONTENT_SECURITY_POLICY.encode("ascii")


def _landing_page(title: str, version: str, telemetry_path: str,
                  links: Sequence[tuple[str, str]]) -> bytes:
    """The status page (``exporter.status_page``) with links to metrics, the status data and health.
    Those three are relative, as the page's fetch is: behind a reverse proxy serving the page under a
    path prefix they keep the prefix (``./``, so that ``/a:b`` does not become the URL ``a:b``)."""
    own = {telemetry_path, STATUS_PATH, HEALTH_PATH}
    items: dict[str, str] = {}
    for href, text in [(telemetry_path, "Metrics"), *links, (STATUS_PATH, "Status (JSON)"), (HEALTH_PATH, "Health")]:
        items.setdefault(href, text)  # a caller's own link to /-/healthy is not doubled
    return render_page(title, version, [("." + href if href in own else href, text) for href, text in items.items()])
