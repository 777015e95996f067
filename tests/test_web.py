"""The HTTP endpoint over real sockets on loopback: routing, auth, TLS, headers."""

from __future__ import annotations

import base64
import contextlib
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

    def __call__(self, accept: str | None) -> tuple[bytes, str]:
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
    assert '<a href="/metrics">' in page
    assert '<a href="https://example.org/runbook?a=1&amp;b=2">Runbook</a>' in page
    assert "&lt;Debug&gt;" in page
    assert page.count('href="/-/healthy"') == 1


def test_metrics_body_content_type_and_accept_header():
    with serving() as (ws, metrics):
        r, body = get(ws, "/metrics", headers={"Accept": "application/openmetrics-text"})
        assert r.status == 200 and body == BODY
        assert r.getheader("Content-Type") == CTYPE
        assert int(r.getheader("Content-Length")) == len(BODY)
        assert r.getheader("Content-Encoding") is None
        assert metrics.accepts[-1] == "application/openmetrics-text"
        r, body = get(ws, "/metrics?name[]=x")  # query strings are ignored
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


def test_gzip_of_parts_reuses_the_compressed_first_part():
    """A renderer may return parts; the first is compressed once while it is the same object."""
    first = BODY[:60_000]
    state = {"first": first, "rest": b"libvirt_blockjob_poll_cycles_total 1.0\n"}
    calls = []

    def parts(_accept):
        calls.append(1)
        return (state["first"], state["rest"]), CTYPE

    with serving(render=parts) as (ws, _):
        r, body = get(ws, "/metrics", headers={"Accept-Encoding": "gzip"})
        assert gzip.decompress(body) == first + state["rest"]
        state["rest"] = b"libvirt_blockjob_poll_cycles_total 2.0\n"
        r, body = get(ws, "/metrics", headers={"Accept-Encoding": "gzip"})
        assert gzip.decompress(body) == first + state["rest"]
        assert ws.gzip._prefix is first  # kept, not recompressed
        state["first"] = BODY[:50_000] + b"changed\n"
        r, body = get(ws, "/metrics", headers={"Accept-Encoding": "gzip"})
        assert gzip.decompress(body) == BODY[:50_000] + b"changed\n" + state["rest"]
        r, body = get(ws, "/metrics")
        assert r.getheader("Content-Encoding") is None and body == BODY[:50_000] + b"changed\n" + state["rest"]
    assert len(calls) == 4


def test_connection_threads_are_reused():
    with serving() as (ws, _):
        for _ in range(5):
            get(ws, "/metrics")
        time.sleep(0.2)
        before = {t.ident for t in threading.enumerate() if t.name == "web-connection"}
        for _ in range(20):
            r, body = get(ws, "/metrics")
            assert body == BODY
        time.sleep(0.2)
        after = {t.ident for t in threading.enumerate() if t.name == "web-connection"}
        # Sequential scrapes: a connection may arrive just before the last one's thread is idle
        # again, so two or three threads; one per scrape (20) if they were not reused.
        assert before & after and len(after) <= 3
    time.sleep(0.2)
    assert not [t for t in threading.enumerate() if t.name == "web-connection" and t.ident in after]


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


def test_header_parsing_matches_the_standard_library_limits_and_rules():
    """The handler reads an ordinary request's headers itself (faster than email.parser); it must
    refuse and accept what the standard library would."""
    with serving() as (ws, metrics):
        many = b"".join(b"X-%d: y\r\n" % i for i in range(101))
        assert raw_exchange(ws, b"GET /metrics HTTP/1.1\r\n" + many + b"\r\n").startswith(b"HTTP/1.1 431")
        long_line = b"X-Long: " + b"a" * 70_000 + b"\r\n"
        assert raw_exchange(ws, b"GET /metrics HTTP/1.1\r\n" + long_line + b"\r\n").startswith(b"HTTP/1.1 431")
        # Names in any case; the first of two values; a folded continuation line.
        data = raw_exchange(ws, b"GET /metrics HTTP/1.1\r\nACCEPT-encoding: gzip\r\nAccept: text/plain;\r\n"
                                b"  version=0.0.4\r\nAccept: ignored\r\nConnection: close\r\n\r\n")
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"Content-Encoding: gzip" in head
        assert gzip.decompress(body) == BODY
        assert metrics.accepts[-1] == "text/plain; version=0.0.4"
        # HTTP/1.0 closes unless asked to keep alive; HTTP/1.1 keeps alive unless asked to close.
        data = raw_exchange(ws, b"GET / HTTP/1.0\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 200") and b"Connection: close" in data.partition(b"\r\n\r\n")[0]
        host, port = ws.bound_address
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\nGET /-/healthy HTTP/1.1\r\nHost: x\r\n"
                      b"Connection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert data.count(b"HTTP/1.1 200 OK") == 2
        # Request lines of another shape go the standard library's way (which answers an
        # unparsable version HTTP/0.9-style: the error page without a status line).
        assert b"Error code: 505" in raw_exchange(ws, b"GET /metrics HTTP/2.0\r\n\r\n")
        data = raw_exchange(ws, b"GET /metrics  HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 200")  # odd spacing: the base class accepts it


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
        # Plain HTTP to the TLS port gets no HTTP answer.
        with pytest.raises((http.client.HTTPException, OSError)):
            get(ws, "/metrics")
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
