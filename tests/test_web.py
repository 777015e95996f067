"""The HTTP endpoint over real sockets on loopback: routing, auth, TLS, headers."""

from __future__ import annotations

import base64
import contextlib
import errno
import gzip
import http.client
import os
import shutil
import socket
import ssl
import textwrap
import threading
import time
from pathlib import Path

import bcrypt
import pytest
from certlib import make_cert

from exporter import web as webmod
from exporter.web import DEFAULT_LISTEN_ADDRESS, WebServer, parse_listen_address
from exporter.webconfig import load_web_config

pytestmark = pytest.mark.timeout(120)

BODY = b"".join(b'libvirt_blockjob_progress_ratio{domain="vm%05d",disk="vda"} 0.5\n' % i
                for i in range(2000))[:100_000]
CTYPE = "text/plain; version=0.0.4; charset=utf-8"
PASSWORD = "correct horse"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()


class Metrics:
    """render_metrics stand-in that records the Accept header it was given."""

    def __init__(self) -> None:
        self.accepts: list[str | None] = []
        self.fail = False

    def __call__(self, accept: str | None, names=()) -> tuple[bytes, str]:
        self.accepts.append(accept)
        if self.fail:
            raise RuntimeError("collector exploded")
        return BODY, CTYPE


@contextlib.contextmanager
def serving(web_config=None, **kw):
    metrics = kw.pop("render", None) or Metrics()
    ws = WebServer(kw.pop("listen", "127.0.0.1:0"), kw.pop("path", "/metrics"), metrics,
                   web_config=web_config, **kw)
    ws.start()
    try:
        yield ws, metrics
    finally:
        ws.shutdown()


def get(ws, path, method="GET", headers=None, conn=None):
    host, port = ws.bound_address
    c = conn or http.client.HTTPConnection(host, port, timeout=10)
    c.request(method, path, headers=headers or {})
    r = c.getresponse()
    body = r.read()
    if conn is None:
        c.close()
    return r, body


def basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def write_config(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "web.yml"
    p.write_text(textwrap.dedent(text).lstrip("\n"))
    return p


# ---------------------------------------------------------------------------- plain HTTP


def test_default_listen_address():
    assert DEFAULT_LISTEN_ADDRESS == ":9478"
    assert parse_listen_address(DEFAULT_LISTEN_ADDRESS) == ("", 9478)
    assert parse_listen_address("[::1]:9100") == ("::1", 9100)
    assert parse_listen_address("localhost:0") == ("localhost", 0)
    for bad in ("9478", "host:http", "::1:9478", "x:70000"):
        with pytest.raises(ValueError):
            parse_listen_address(bad)
    with pytest.raises(ValueError):
        WebServer(":0", "metrics", Metrics())


def test_landing_page():
    links = [("https://example.org/runbook?a=1&b=2", "Runbook"), ("/debug", "<Debug>"),
             ("/-/healthy", "health")]
    with serving(landing_title="Block <jobs>", landing_links=links, version="1.2.3") as (ws, _):
        r, body = get(ws, "/")
    page = body.decode()
    assert r.status == 200
    assert r.getheader("Content-Type") == "text/html; charset=utf-8"
    assert "<title>Block &lt;jobs&gt;</title>" in page
    assert "1.2.3" in page
    assert '<a href="./metrics">Metrics</a>' in page  # relative: see test_status.py
    assert '<a href="https://example.org/runbook?a=1&amp;b=2">Runbook</a>' in page
    assert '<a href="/debug">&lt;Debug&gt;</a>' in page
    assert page.count('href="./-/healthy"') == 1 and 'href="/-/healthy"' not in page


def test_metrics_body_content_type_and_accept_header():
    with serving() as (ws, metrics):
        r, body = get(ws, "/metrics", headers={"Accept": "application/openmetrics-text"})
        assert r.status == 200 and body == BODY
        assert r.getheader("Content-Type") == CTYPE
        assert int(r.getheader("Content-Length")) == len(BODY)
        assert r.getheader("Content-Encoding") is None
        assert metrics.accepts[-1] == "application/openmetrics-text"
        r, body = get(ws, "/metrics?x=1")
        assert r.status == 200 and body == BODY and metrics.accepts[-1] is None


def test_gzip():
    with serving() as (ws, _):
        r, body = get(ws, "/metrics", headers={"Accept-Encoding": "gzip"})
        assert r.getheader("Content-Encoding") == "gzip"
        assert "Accept-Encoding" in r.getheader("Vary")
        assert len(body) < len(BODY) // 5
        assert gzip.decompress(body) == BODY
        r, body = get(ws, "/metrics", headers={"Accept-Encoding": "br, gzip;q=0"})
        assert r.getheader("Content-Encoding") is None and body == BODY


def test_health_404_and_head():
    with serving() as (ws, _):
        r, body = get(ws, "/-/healthy")
        assert (r.status, body) == (200, b"OK")
        for path in ("/nope", "/metrics/", "/-/ready"):
            assert get(ws, path)[0].status == 404
        r, body = get(ws, "/metrics", method="HEAD")
        assert r.status == 200 and body == b"" and int(r.getheader("Content-Length")) == len(BODY)


def test_absolute_form_request_target():
    with serving() as (ws, _):
        host, port = ws.bound_address
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(b"GET http://example/-/healthy HTTP/1.1\r\nHost: example\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"\r\n\r\nOK")
        assert b"Connection: close" in data


def test_only_get_and_head():
    with serving() as (ws, metrics):
        for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "FOO"):
            r, _ = get(ws, "/metrics", method=method)
            assert r.status == 405, method
            assert r.getheader("Allow") == "GET, HEAD"
        assert metrics.accepts == []  # nothing was rendered, let alone changed


def test_request_body_on_keepalive_connection_is_not_parsed_as_a_request():
    with serving() as (ws, _):
        host, port = ws.bound_address
        with socket.create_connection((host, port), timeout=5) as s:
            smuggled = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
            s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(smuggled)
                      + smuggled)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 405") and data.count(b"HTTP/1.1 ") == 1


def raw_exchange(ws, request: bytes) -> bytes:
    host, port = ws.bound_address
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_render_failure_is_a_500_and_logged(caplog):
    with serving() as (ws, metrics):
        metrics.fail = True
        with caplog.at_level("ERROR", logger="exporter.web"):
            r, body = get(ws, "/metrics")
        assert r.status == 500 and b"error" in body and b"exploded" not in body
        assert any("collector exploded" in (rec.exc_text or "") for rec in caplog.records)
        metrics.fail = False
        assert get(ws, "/metrics")[0].status == 200


def test_keep_alive_reuses_one_connection():
    with serving() as (ws, _):
        host, port = ws.bound_address
        c = http.client.HTTPConnection(host, port, timeout=10)
        get(ws, "/metrics", conn=c)
        sock = c.sock
        for _ in range(5):
            r, body = get(ws, "/metrics", conn=c)
            assert r.version == 11 and not r.will_close and body == BODY
        assert c.sock is sock
        # Without TCP_NODELAY every kept-alive answer (head and body written apart) waited 40 ms
        # for a delayed ACK.
        (transport,) = ws.listener.open
        assert transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        c.close()


def test_no_stderr_per_request(capfd):
    with serving() as (ws, _):
        for path in ("/", "/metrics", "/nope"):
            get(ws, path)
        get(ws, "/", method="POST")
        host, port = ws.bound_address
        with socket.create_connection((host, port), timeout=5) as s:  # malformed request
            s.sendall(b"BLAH\r\n\r\n")
            s.recv(1000)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_bind_failure_is_a_clear_oserror():
    with serving() as (ws, _):
        host, port = ws.bound_address
        other = WebServer(f"{host}:{port}", "/metrics", Metrics())
        with pytest.raises(OSError, match=rf"cannot listen on 127\.0\.0\.1:{port}: .*in use"):
            other.start()
    with pytest.raises(RuntimeError):
        other.bound_address


def test_all_interfaces_and_ipv6():
    with serving(listen=":0") as (ws, _):
        _, port = ws.bound_address
        assert port > 0
        r, _ = get(ws, "/-/healthy")
        assert r.status == 200  # reached over 127.0.0.1
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        ctx = serving(listen="[::1]:0")
        ws, _ = ctx.__enter__()
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        host, port = ws.bound_address
        assert host == "::1"
        c = http.client.HTTPConnection("::1", port, timeout=5)
        c.request("GET", "/-/healthy")
        assert c.getresponse().status == 200
        c.close()
    finally:
        ctx.__exit__(None, None, None)


def test_shutdown_ends_keep_alive_connections():
    ws = WebServer("127.0.0.1:0", "/metrics", Metrics())
    ws.start()
    host, port = ws.bound_address
    c = http.client.HTTPConnection(host, port, timeout=5)
    get(ws, "/metrics", conn=c)
    ws.shutdown()
    ws.shutdown()  # idempotent
    with pytest.raises((OSError, http.client.HTTPException)):
        c.request("GET", "/metrics")
        c.getresponse()
    with pytest.raises(OSError):
        socket.create_connection((host, port), timeout=2).close()


def test_custom_metrics_path_can_shadow_nothing_else():
    with serving(path="/custom") as (ws, _):
        assert get(ws, "/custom")[0].status == 200
        assert get(ws, "/metrics")[0].status == 404
        assert get(ws, "/")[0].status == 200


# ---------------------------------------------------------------------------- web config


def test_basic_auth(tmp_path, monkeypatch):
    cfg = load_web_config(write_config(tmp_path, f"""
        basic_auth_users:
          alice: {HASH}
        http_server_config:
          headers:
            X-Frame-Options: deny
            Content-Security-Policy: default-src 'none'
        """))
    calls = []
    real = bcrypt.checkpw
    monkeypatch.setattr(webmod.bcrypt, "checkpw", lambda p, h: calls.append(1) or real(p, h))
    with serving(cfg) as (ws, metrics):
        for headers in ({}, basic("alice", "wrong"), basic("mallory", PASSWORD),
                        {"Authorization": "Bearer abc"}, {"Authorization": "Basic !!!"}):
            r, _ = get(ws, "/metrics", headers=headers)
            assert r.status == 401, headers
            assert r.getheader("WWW-Authenticate") == "Basic"
            assert r.getheader("X-Frame-Options") == "deny"
        assert metrics.accepts == []
        assert get(ws, "/-/healthy")[0].status == 401  # everything is behind auth, as in exporter-toolkit
        assert get(ws, "/", method="POST")[0].status == 401

        n = len(calls)
        for _ in range(3):
            r, body = get(ws, "/metrics", headers=basic("alice", PASSWORD))
            assert r.status == 200 and body == BODY
            assert r.getheader("Content-Security-Policy") == "default-src 'none'"
        assert len(calls) == n + 1  # verified once, then served from the cache
        r, _ = get(ws, "/nope", headers=basic("alice", PASSWORD))
        assert r.status == 404 and r.getheader("X-Frame-Options") == "deny"
        assert get(ws, "/metrics", headers=basic("alice", "wrong"))[0].status == 401


def test_rate_limit(tmp_path):
    cfg = load_web_config(write_config(tmp_path, "rate_limit:\n  interval: 1h\n  burst: 2\n"))
    with serving(cfg) as (ws, _):
        assert [get(ws, "/-/healthy")[0].status for _ in range(3)] == [200, 200, 429]


@pytest.fixture
def certs(tmp_path):
    if shutil.which("openssl") is None and not os.environ.get("LBJE_REQUIRE_TOOLS"):
        pytest.skip("openssl CLI not installed")
    d = tmp_path / "certs"
    d.mkdir()
    make_cert(d, "server")
    make_cert(d, "client", san="DNS:client.example")
    make_cert(d, "stranger", san="DNS:client.example")
    make_cert(d, "other", san="DNS:other.example")
    return d


def tls_client(certs: Path, client: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs / "server.crt"))
    if client:
        ctx.load_cert_chain(str(certs / f"{client}.crt"), str(certs / f"{client}.key"))
    return ctx


def https_get(ws, ctx, path="/metrics", headers=None):
    host, port = ws.bound_address
    c = http.client.HTTPSConnection(host, port, context=ctx, timeout=10)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        return r, r.read()
    finally:
        c.close()


def test_tls(certs, tmp_path):
    cfg = load_web_config(write_config(tmp_path, """
        tls_server_config:
          cert_file: certs/server.crt
          key_file: certs/server.key
        """))
    with serving(cfg) as (ws, _):
        r, body = https_get(ws, tls_client(certs))
        assert r.status == 200 and body == BODY
        # Plain HTTP to the TLS port gets the answer Go's server gives.
        assert raw_exchange(ws, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n") == (
            b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n")
        # A client that stalls its handshake does not hold up others.
        host, port = ws.bound_address
        with socket.create_connection((host, port)):
            assert https_get(ws, tls_client(certs))[0].status == 200


def test_tls_with_basic_auth(certs, tmp_path):
    cfg = load_web_config(write_config(tmp_path, f"""
        tls_server_config:
          cert_file: certs/server.crt
          key_file: certs/server.key
        basic_auth_users:
          alice: {HASH}
        """))
    with serving(cfg) as (ws, _):
        assert https_get(ws, tls_client(certs))[0].status == 401
        assert https_get(ws, tls_client(certs), headers=basic("alice", PASSWORD))[0].status == 200


def test_client_cert_required(certs, tmp_path):
    cfg = load_web_config(write_config(tmp_path, """
        tls_server_config:
          cert_file: certs/server.crt
          key_file: certs/server.key
          client_auth_type: RequireAndVerifyClientCert
          client_ca_file: certs/client.crt
        """))
    with serving(cfg) as (ws, _):
        assert https_get(ws, tls_client(certs, "client"))[0].status == 200
        for who in (None, "stranger"):  # no certificate; one not signed by the client CA
            with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
                https_get(ws, tls_client(certs, who))


def test_client_allowed_sans(certs, tmp_path):
    (certs / "cas.pem").write_text((certs / "client.crt").read_text() + (certs / "other.crt").read_text())
    cfg = load_web_config(write_config(tmp_path, """
        tls_server_config:
          cert_file: certs/server.crt
          key_file: certs/server.key
          client_auth_type: RequireAndVerifyClientCert
          client_ca_file: certs/cas.pem
          client_allowed_sans: [client.example]
        """))
    with serving(cfg) as (ws, _):
        assert https_get(ws, tls_client(certs, "client"))[0].status == 200
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            https_get(ws, tls_client(certs, "other"))


def test_verify_client_cert_if_given(certs, tmp_path):
    cfg = load_web_config(write_config(tmp_path, """
        tls_server_config:
          cert_file: certs/server.crt
          key_file: certs/server.key
          client_auth_type: VerifyClientCertIfGiven
          client_ca_file: certs/client.crt
        """))
    with serving(cfg) as (ws, _):
        assert https_get(ws, tls_client(certs))[0].status == 200
        assert https_get(ws, tls_client(certs, "client"))[0].status == 200
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            https_get(ws, tls_client(certs, "stranger"))


def test_renewed_certificate_is_picked_up(certs, tmp_path):
    cfg = load_web_config(write_config(tmp_path, """
        tls_server_config:
          cert_file: certs/server.crt
          key_file: certs/server.key
        """))
    with serving(cfg) as (ws, _):
        old = tls_client(certs)
        assert https_get(ws, old)[0].status == 200
        renewed = tmp_path / "renewed"
        renewed.mkdir()
        make_cert(renewed, "server")
        for name in ("server.crt", "server.key"):
            tmp = certs / (name + ".new")
            shutil.copy(renewed / name, tmp)
            os.replace(tmp, certs / name)
        time.sleep(1.1)
        assert https_get(ws, tls_client(renewed))[0].status == 200
        with pytest.raises(ssl.SSLError):
            https_get(ws, old)


def test_concurrent_scrapes():
    with serving() as (ws, _):
        errors = []

        def worker():
            try:
                for _ in range(20):
                    r, body = get(ws, "/metrics")
                    assert r.status == 200 and body == BODY
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []


# ---------------------------------------------------------------------------- negotiation


PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
                     "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


def test_exposition_is_negotiated_by_prometheus_client():
    from exporter.collector import BlockJobCollector
    from exporter.model import ConnectionEvent
    from exporter.selfstats import SelfStats
    from exporter.state import State

    state = State()
    state.apply(ConnectionEvent(True, 0.0, 0.0))
    collector = BlockJobCollector(state, SelfStats(), "1.0", process=False)
    with serving(render=collector.exposition) as (ws, _):
        r, body = get(ws, "/metrics", headers={"Accept": PROMETHEUS_ACCEPT})
        assert r.getheader("Content-Type") == \
            "application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=underscores"
        assert body.endswith(b"\n# EOF\n") and b"\nlibvirt_blockjob_up 1.0\n" in body
        r, body = get(ws, "/metrics", headers={"Accept": "*/*"})
        assert r.getheader("Content-Type") == "text/plain; version=0.0.4; charset=utf-8"
        assert b"# EOF" not in body
        r, body = get(ws, "/metrics?name[]=libvirt_blockjob_up&name[]=libvirt_blockjob_domains")
        assert body == (b"# HELP libvirt_blockjob_up 1 while connected to libvirt with event callbacks "
                        b"registered, else 0\n# TYPE libvirt_blockjob_up gauge\nlibvirt_blockjob_up 1.0\n"
                        b"# HELP libvirt_blockjob_domains Running domains watched\n"
                        b"# TYPE libvirt_blockjob_domains gauge\nlibvirt_blockjob_domains 0.0\n")


# ---------------------------------------------------------------------------- hostile clients
# Each of these reproduces a finding of issue 10 against the hand-written server it replaced.


def test_gzip_q0_in_any_spelling_is_honoured():
    """The old parser gave gzip for ``gzip;Q=0`` and ``gzip;level=1;q=0``."""
    with serving() as (ws, _):
        for value in ("gzip;q=0", "gzip; Q=0", "gzip;level=1;q=0", "identity, gzip;q=0.000"):
            r, body = get(ws, "/metrics", headers={"Accept-Encoding": value})
            assert r.getheader("Content-Encoding") is None and body == BODY, value
        r, body = get(ws, "/metrics", headers={"Accept-Encoding": "br;q=1, gzip;q=0.5"})
        assert r.getheader("Content-Encoding") == "gzip" and gzip.decompress(body) == BODY


def test_garbage_request_lines_get_a_400_status_line():
    """The old server answered these HTTP/0.9-style: an HTML page with no status line."""
    with serving() as (ws, _):
        for request in (b"BLAH\r\n\r\n", b"\x16\x03\x01\x00\x05hello\r\n\r\n", b"GET\r\n\r\n"):
            assert raw_exchange(ws, request).startswith(b"HTTP/1.1 400 "), request


def test_connection_header_is_a_token_list():
    """``Connection: close, te`` used to keep the connection open (the value was compared whole)."""
    with serving() as (ws, _):
        data = raw_exchange(ws, b"GET /-/healthy HTTP/1.1\r\nHost: x\r\nConnection: close, te\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"\r\n\r\nOK")


def test_request_head_is_capped_at_64_kib_in_total():
    """The old limits were per line (64 KiB) and 100 lines: 6 MB of headers per request."""
    with serving() as (ws, metrics):
        lines = b"".join(b"X-%d: %s\r\n" % (i, b"a" * 1000) for i in range(70))  # ~70 KiB, short lines
        assert raw_exchange(ws, b"GET /metrics HTTP/1.1\r\n" + lines + b"\r\n").startswith(b"HTTP/1.1 431 ")
        fits = b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX: " + b"a" * 60_000 + b"\r\n\r\n"
        assert raw_exchange(ws, fits).startswith(b"HTTP/1.1 200 ")
        assert metrics.accepts == [None]


def test_trickled_headers_are_cut_off_after_10_seconds_in_total():
    """A header line every second used to be served forever: the timeout was per receive."""
    with serving() as (ws, metrics):
        host, port = ws.bound_address
        with socket.create_connection((host, port)) as s:  # blocking: MSG_DONTWAIT polls
            opened = time.monotonic()
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            closed_after = None
            for i in range(15):
                time.sleep(1)
                try:
                    s.sendall(b"X-%d: y\r\n" % i)
                    if s.recv(1024, socket.MSG_DONTWAIT) == b"":
                        closed_after = time.monotonic() - opened
                        break
                except BlockingIOError:
                    continue
                except OSError:
                    closed_after = time.monotonic() - opened
                    break
        assert closed_after is not None and 9.5 <= closed_after <= 12.5, closed_after
        assert metrics.accepts == []
        # A kept-alive connection's next request gets the same deadline.
        with socket.create_connection((host, port), timeout=15) as s:
            s.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
            first = b""
            while not first.endswith(b"\r\n\r\nOK"):
                first += s.recv(65536)
            assert first.startswith(b"HTTP/1.1 200 ")
            s.sendall(b"GET /-/healthy HTTP/1.1\r\n")
            started = time.monotonic()
            assert s.recv(65536) == b""
            assert 9.5 <= time.monotonic() - started <= 12.5


def test_connections_beyond_the_cap_are_refused_at_once():
    """The old server took every connection (a thread each) until accept() failed."""
    with serving(max_connections=5) as (ws, _):
        host, port = ws.bound_address
        idle = [socket.create_connection((host, port), timeout=5) for _ in range(5)]
        try:
            time.sleep(0.2)
            started = time.monotonic()
            assert raw_exchange(ws, b"").startswith(b"HTTP/1.1 503 ")
            assert time.monotonic() - started < 1
            idle.pop().close()
            time.sleep(0.2)
            assert get(ws, "/-/healthy")[0].status == 200
        finally:
            for s in idle:
                s.close()


def test_removed_user_is_refused_on_the_next_request_and_header_changes_apply(tmp_path):
    """exporter-toolkit re-reads the file per request; the old server read it once at start."""
    other = bcrypt.hashpw(b"pw2", bcrypt.gensalt(4)).decode()
    path = write_config(tmp_path, f"basic_auth_users:\n  alice: {HASH}\n  bob: {other}\n")
    with serving(load_web_config(path)) as (ws, _):
        assert get(ws, "/-/healthy", headers=basic("alice", PASSWORD))[0].status == 200
        path.write_text(f"basic_auth_users:\n  bob: {other}\nhttp_server_config:\n  headers:\n"
                        "    X-Frame-Options: deny\n")
        r, _ = get(ws, "/-/healthy", headers=basic("alice", PASSWORD))
        assert r.status == 401
        r, _ = get(ws, "/-/healthy", headers=basic("bob", "pw2"))
        assert r.status == 200 and r.getheader("X-Frame-Options") == "deny"
        path.write_text("basic_auth_users: [broken\n")  # invalid: the previous config stays
        assert get(ws, "/-/healthy", headers=basic("bob", "pw2"))[0].status == 200
        path.write_text("rate_limit:\n  interval: 1h\n  burst: 1\n")
        assert [get(ws, "/-/healthy")[0].status for _ in range(2)] == [200, 429]


def test_unknown_user_does_not_stall_other_scrapes(tmp_path):
    """The decoy hash used to be made on the first unknown user, at the highest configured cost,
    while holding the lock every login takes: 4.9 s of stalled scrapes at cost 14."""
    slow = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(14)).decode()
    cfg = load_web_config(write_config(tmp_path, f"basic_auth_users:\n  alice: {slow}\n"))
    with serving(cfg) as (ws, _):
        assert get(ws, "/-/healthy", headers=basic("alice", PASSWORD))[0].status == 200  # now cached
        took = {}

        def unknown():
            started = time.monotonic()
            took["status"] = get(ws, "/-/healthy", headers=basic("mallory", "x"))[0].status
            took["unknown"] = time.monotonic() - started

        t = threading.Thread(target=unknown)
        t.start()
        time.sleep(0.02)
        started = time.monotonic()
        assert get(ws, "/-/healthy", headers=basic("alice", PASSWORD))[0].status == 200
        took["alice"] = time.monotonic() - started
        t.join()
    assert took["status"] == 401
    assert took["alice"] < 0.3, took
    assert took["unknown"] < 0.5, took  # the decoy's fixed cost, not the users' 14


def test_tls_min_version_is_enforced(certs, tmp_path):
    cfg = load_web_config(write_config(tmp_path, """
        tls_server_config:
          cert_file: certs/server.crt
          key_file: certs/server.key
          min_version: TLS13
        """))
    with serving(cfg) as (ws, _):
        old = tls_client(certs)
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises((ssl.SSLError, ConnectionError)):
            https_get(ws, old)
        assert https_get(ws, tls_client(certs))[0].status == 200


def test_a_client_that_stops_reading_is_cut_off():
    big = BODY * 160  # 16 MB: more than the kernel's socket buffers hold
    with serving(render=lambda accept, names=(): (big, CTYPE)) as (ws, _):
        s = socket.socket()
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(ws.bound_address)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(12)  # never reads
            s.settimeout(5)
            got = 0
            with contextlib.suppress(ConnectionResetError):
                while chunk := s.recv(1 << 20):  # what the kernel still held, then the end
                    got += len(chunk)
            assert got < len(big) // 2
        finally:
            s.close()
        assert get(ws, "/-/healthy")[0].status == 200


def test_all_interfaces_fall_back_to_ipv4_on_a_host_without_ipv6(monkeypatch):
    """`:PORT` listens on IPv6 and IPv4 at once, or on IPv4 alone where the kernel has no IPv6."""
    real_socket = socket.socket

    def no_ipv6(family=socket.AF_INET, *args, **kwargs):
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real_socket(family, *args, **kwargs)

    sock = webmod._listen("", 0)
    try:
        assert sock.family == socket.AF_INET6
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    finally:
        sock.close()
    monkeypatch.setattr(socket, "socket", no_ipv6)
    sock = webmod._listen("", 0)
    try:
        assert sock.family == socket.AF_INET and sock.getsockname()[0] == "0.0.0.0"
    finally:
        sock.close()
