"""``libvirt-blockjob-exporter status``: flags, rendering of hostile names, both sources (a running
exporter through TLS and basic auth, and libvirt during a real pull), ``--watch`` and ``--output json``."""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import bcrypt
import pytest

import vmlib
from certlib import make_cert
from exporter.cli import build_status_parser, status_main
from exporter.status_cli import ExporterSource, LibvirtSource, SourceError, render, run_status
from exporter.web import WebServer
from exporter.webconfig import load_web_config
from exporterlib import REPO

MiB = 1024 * 1024
NOW = 1_700_000_100.0


def document(**jobs_kw) -> dict:
    job = {"domain": "web-1", "disk": "vda", "type": "pull", "cur": 30 * MiB, "end": 100 * MiB, "percent": 30.0,
           "bandwidth": 2 * MiB, "rate": 2 * MiB, "eta_seconds": 35.0, "started": NOW - 125, "cursor_moved": NOW,
           "ready": False, "stalled": False} | jobs_kw
    return {"version": "1", "now": NOW, "refresh_seconds": 1.0,
            "connection": {"connected": True, "uri": "qemu:///system", "mode": "read-only", "domains": 3, "disks": 3,
                           "unresponsive": [], "unresponsive_total": 0},
            "jobs": {"total": 1, "shown": [job]},
            "outcomes": {"recent": [{"domain": "db", "disk": "vdb", "type": "pull", "outcome": "failed",
                                     "inferred": False, "time": NOW - 60}],
                         "totals": {"completed": 0, "failed": 1, "canceled": 0}},
            "chains": {"with_backing": 0, "deepest": []}, "policy": None, "exporter": None}


def shown(doc: dict, width: int = 160) -> str:
    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=width, highlight=False, color_system=None).print(render(doc, "test"))
    return out.getvalue()


def test_table_shows_bar_rate_eta_cap_and_since():
    text = shown(document())
    header, row = [line for line in text.splitlines() if "DOMAIN" in line or "web-1" in line]
    assert header.split() == ["DOMAIN", "DISK", "TYPE", "PROGRESS", "%", "RATE", "ETA", "CAP", "SINCE"]
    assert row.split()[:3] == ["web-1", "vda", "pull"]
    assert "\u2501" in row  # rich's bar
    assert row.split()[-8:] == ["30.0", "2.0", "MiB/s", "35s", "2.0", "MiB/s", "2m", "05s"]
    assert "connected  read-only, 3 running domains, 1 active block jobs" in text
    assert "last outcome: failed pull on db/vdb, 1m 00s ago" in text
    assert "stalled" in shown(document(stalled=True, rate=0.0, eta_seconds=None))
    assert "measuring" in shown(document(rate=None, eta_seconds=None))
    assert "ready" in shown(document(ready=True, type="copy", eta_seconds=0.0))
    assert "No active block jobs." in shown(document() | {"jobs": {"total": 0, "shown": []}})


def test_hostile_names_are_shown_as_text():
    """rich markup and terminal escapes in a name stay inert: no style applied, no escape written."""
    from rich.console import Console

    doc = document(domain="[bold red]x[/bold red]\x1b[2J\nforged row", disk="vd\x07a")
    out = io.StringIO()
    Console(file=out, width=200, force_terminal=True, color_system="truecolor").print(render(doc, "t\x1b]0;x\x07"))
    text = out.getvalue()
    assert "[bold red]x[/bold red]\\x1b[2J\\nforged row" in text
    assert "\x1b[2J" not in text and "\x07" not in text and "\x1b]0" not in text
    assert "forged row" not in [line.strip() for line in text.splitlines()]


def test_a_malformed_document_is_an_error_not_a_traceback():
    for broken in ({"jobs": {"shown": [{"percent": "x"}], "total": 1}}, {"jobs": None}, {}):
        with pytest.raises(SourceError, match="not a status document"):
            render(broken, "http://x/")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--poll.interval", "50ms"], "argument --poll.interval: '50ms' is below the minimum of 0.1s"),
        (["--poll.interval", "2h"], "argument --poll.interval: bad duration '2h': must be at most 1h"),
        (["--exporter.url", "ftp://x/"], "argument --exporter.url: 'ftp://x/' must be an http(s) URL"),
        (["--exporter.url", "http://h:99999/"], "argument --exporter.url: Port out of range 0-65535"),
        (["--libvirt.uri", "nope"], "argument --libvirt.uri: 'nope' is not a libvirt URI (e.g. qemu:///system)"),
        (["--libvirt.uri", "qemu:///system", "--exporter.url", "http://h/"],
         "argument --exporter.url: not allowed with argument --libvirt.uri"),
        (["--exporter.url", "http://h/", "--exporter.username", "a:b", "--exporter.password-file", "f"],
         "argument --exporter.username: a basic auth username cannot hold ':'"),
        (["--exporter.url", "http://h/", "--exporter.username", "x" * 5000],
         "argument --exporter.username: longer than 4096 characters"),
        (["--exporter.url", "http://h/", "--exporter.ca-file", "a\nb"],
         "argument --exporter.ca-file: 'a\\nb' contains a control character"),
        (["--output", "yaml"], "argument --output: invalid choice: 'yaml' (choose from "),  # quoting varies
        (["--exporter.username", "u", "--exporter.password-file", "f"],
         "--exporter.username, --exporter.password-file and --exporter.ca-file need --exporter.url"),
        (["--exporter.url", "http://h/", "--exporter.username", "u"],
         "--exporter.username and --exporter.password-file go together"),
        (["--watch", "--poll.interval", "500ms"],
         "--watch from libvirt reads every domain and disk at each refresh: --poll.interval must be at least 1s "
         "(or read a running exporter with --exporter.url)"),
        (["--exporter.url", "https://alice@h/"],
         "argument --exporter.url: a URL with a login (user:password@) would show it to every user; give "
         "--exporter.username and --exporter.password-file instead"),
    ],
)
def test_bad_flags_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        status_main(argv)
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"libvirt-blockjob-exporter status: error: {message}")


def test_a_short_watch_interval_is_for_an_exporter_only(monkeypatch):
    """The 1 s floor holds only where each refresh is a full libvirt read."""
    seen = []
    monkeypatch.setattr("exporter.status_cli.run_status", lambda args: seen.append(args.poll_interval) or 0)
    assert status_main(["--exporter.url", "http://h/", "--watch", "--poll.interval", "100ms"]) == 0
    assert status_main(["--poll.interval", "100ms"]) == 0  # one look: two reads 0.1 s apart
    assert status_main(["--watch", "--poll.interval", "1s"]) == 0
    assert seen == [0.1, 0.1, 1.0]


def test_a_login_in_the_exporter_url_is_refused_without_echoing_it(capsys):
    with pytest.raises(SystemExit) as exc:
        status_main(["--exporter.url", "https://alice:s3cret@h:9478/"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "libvirt-blockjob-exporter status: error: argument --exporter.url: a URL with a login (user:password@) "
        "would show it to every user; give --exporter.username and --exporter.password-file instead")
    assert "s3cret" not in err


@pytest.mark.parametrize("given,fetched", [
    ("https://h:9478", "https://h:9478/status.json"),
    ("https://h:9478/", "https://h:9478/status.json"),
    ("https://h:9478/metrics", "https://h:9478/status.json"),  # a scrape target's URL
    ("https://h:9478/metrics/", "https://h:9478/status.json"),
    ("https://proxy/hv1/metrics", "https://proxy/hv1/status.json"),
    ("https://proxy/hv1", "https://proxy/hv1/status.json"),
    ("https://proxy/hv1/status.json", "https://proxy/hv1/status.json"),
    ("https://h/my-metrics", "https://h/my-metrics/status.json"),
])
def test_the_status_json_of_an_exporter_url(given, fetched):
    assert ExporterSource(given, None, None, None).url == fetched


# ---------------------------------------------------------------------------- from a running exporter


class _Answer(http.server.BaseHTTPRequestHandler):
    """Answers every GET with the server's ``answer`` (status, reason, headers, body); records each request."""

    def do_GET(self):
        self.server.requests.append((self.path, dict(self.headers)))
        status, reason, headers, body = self.server.answer
        self.send_response(status, reason)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    """Starts plain HTTP servers on loopback: ``start(status, body=..., headers=..., reason=...)``."""
    servers = []

    def start(status=200, body=b"", headers=None, reason=None):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
        server.requests, server.answer = [], (status, reason, headers or {}, body)
        server.url = f"http://127.0.0.1:{server.server_address[1]}"
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_redirect_is_an_error_and_the_login_goes_nowhere_else(http_server, tmp_path):
    """urllib would follow it with the Authorization header, to any host and over plain http."""
    (tmp_path / "pw").write_text("pw\n")
    login = ["--exporter.username", "alice", "--exporter.password-file", str(tmp_path / "pw")]
    target = http_server(200, json.dumps(document()).encode())
    for code in (301, 302, 303, 307, 308):
        redirect = http_server(code, headers={"Location": target.url + "/status.json"})
        err = io.StringIO()
        assert run_status(status_args("--exporter.url", redirect.url, *login), io.StringIO(), err) == 1
        assert err.getvalue() == (
            f"libvirt-blockjob-exporter status: {redirect.url}/status.json: HTTP {code} redirects to "
            f"{target.url}/status.json; redirects are not followed (they would carry the login): give "
            "--exporter.url as the exporter's own URL\n")
        assert [(path, headers["Authorization"]) for path, headers in redirect.requests] == [
            ("/status.json", "Basic " + base64.b64encode(b"alice:pw").decode())]
    assert target.requests == []


def _json_with(doc: dict, **raw: str) -> bytes:
    """``doc`` as JSON with each of ``raw``'s keys (top level or the job's) spelled as the raw text given."""
    text = json.dumps(doc)
    for key, value in raw.items():
        text = text.replace(json.dumps(f"@{key}@"), value)
    return text.encode()


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize("body,output,message", [
    (b"[" * 100_000, "json", "{fetched}: not a status document (maximum recursion depth exceeded"),
    (json.dumps(document() | {"connection": {"mode": _nested(40)}}).encode(), "json",
     "{fetched}: not a status document (nested deeper than 32 levels)"),
    (_json_with(document() | {"now": "@now@"}, now="Infinity"), "json",
     "{fetched}: not a status document (Infinity is not a number)"),
    (_json_with(document(percent="@p@"), p="NaN"), "table", "{fetched}: not a status document (NaN is not a number)"),
    (_json_with(document() | {"now": "@now@"}, now="-1e400"), "json",
     "{fetched}: not a status document (-1e400 is out of range)"),
    (json.dumps(document(started=-10 ** 400)).encode(), "table",
     "{url}: not a status document (OverflowError: int too large to convert to float)"),
    (json.dumps(document(started=-1e308) | {"now": 1e308}).encode(), "table",
     "{url}: not a status document (OverflowError: cannot convert float infinity to integer)"),
], ids=["deep", "deeper-than-32", "Infinity", "NaN", "overflowing-float", "huge-int", "infinite-duration"])
def test_a_hostile_answer_is_exit_1_not_a_traceback(http_server, body, output, message):
    x = http_server(200, body)
    out, err = io.StringIO(), io.StringIO()
    assert run_status(status_args("--exporter.url", x.url, "--output", output), out, err) == 1
    assert out.getvalue() == ""
    assert err.getvalue().startswith(
        "libvirt-blockjob-exporter status: " + message.format(url=x.url, fetched=x.url + "/status.json"))


def test_an_error_message_from_the_exporter_is_shown_escaped(http_server):
    """The reason phrase is the server's text: a terminal escape in it must not reach the terminal."""
    x = http_server(503, reason="down\x1b]0;owned\x07\x1b[2J")
    err = io.StringIO()
    assert run_status(status_args("--exporter.url", x.url), io.StringIO(), err) == 1
    assert err.getvalue() == (f"libvirt-blockjob-exporter status: {x.url}/status.json: HTTP 503 "
                              "down\\x1b]0;owned\\x07\\x1b[2J\n")


@pytest.fixture
def tls_exporter(tmp_path):
    """A WebServer behind TLS and basic auth serving a fixed status document, and its CA file."""
    cert, key = make_cert(tmp_path, "server")
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    config = tmp_path / "web.yml"
    config.write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
                      f"basic_auth_users:\n  alice: {hashed}\n")
    (tmp_path / "password").write_text("pw\n")
    served = {"doc": document()}
    ws = WebServer("127.0.0.1:0", "/metrics", lambda *a: (b"", "text/plain"), load_web_config(str(config)),
                   status=lambda: json.dumps(served["doc"]).encode())
    ws.start()
    try:
        yield SimpleNamespace(url=f"https://127.0.0.1:{ws.bound_address[1]}", ca=str(cert),
                              password_file=str(tmp_path / "password"), served=served)
    finally:
        ws.shutdown()


def status_args(*argv: str):
    return build_status_parser().parse_args(list(argv))


def test_reads_a_running_exporter_through_tls_and_basic_auth(tls_exporter):
    x = tls_exporter
    out, err = io.StringIO(), io.StringIO()
    login = ["--exporter.username", "alice", "--exporter.password-file", x.password_file]
    assert run_status(status_args("--exporter.url", x.url, "--exporter.ca-file", x.ca, *login,
                                  "--output", "json"), out, err) == 0, err.getvalue()
    assert json.loads(out.getvalue()) == x.served["doc"]
    out = io.StringIO()
    assert run_status(status_args("--exporter.url", x.url + "/", "--exporter.ca-file", x.ca, *login), out, err) == 0
    assert "web-1" in out.getvalue() and "2.0 MiB/s" in out.getvalue()

    err = io.StringIO()
    assert run_status(status_args("--exporter.url", x.url, "--exporter.ca-file", x.ca), io.StringIO(), err) == 1
    assert "HTTP 401 Unauthorized (give --exporter.username and --exporter.password-file)" in err.getvalue()
    err = io.StringIO()
    assert run_status(status_args("--exporter.url", x.url, *login), io.StringIO(), err) == 1  # unknown CA
    assert "CERTIFICATE_VERIFY_FAILED" in err.getvalue()
    x.served["doc"] = {"jobs": "nope"}
    err = io.StringIO()
    assert run_status(status_args("--exporter.url", x.url, "--exporter.ca-file", x.ca, *login),
                      io.StringIO(), err) == 1
    assert "not a status document" in err.getvalue()


def test_watch_refreshes_until_interrupted(tls_exporter):
    """--watch --output json: one document a line, each a fresh read, until SIGINT (exit 0)."""
    x = tls_exporter
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter", "status", "--exporter.url", x.url, "--exporter.ca-file", x.ca,
         "--exporter.username", "alice", "--exporter.password-file", x.password_file, "--watch",
         "--output", "json", "--poll.interval", "0.2s"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A suite started in the background by a shell inherits SIGINT ignored; Ctrl-C is what is tested.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        lines = [proc.stdout.readline() for _ in range(2)]
        x.served["doc"] = document(percent=60.0)
        deadline = time.monotonic() + 10
        while json.loads(lines[-1])["jobs"]["shown"][0]["percent"] != 60.0 and time.monotonic() < deadline:
            lines.append(proc.stdout.readline())
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert json.loads(lines[0])["jobs"]["shown"][0]["percent"] == 30.0
    assert json.loads(lines[-1])["jobs"]["shown"][0]["percent"] == 60.0


class _Reads:
    """A source answering ``first``/``next`` from a list: documents, or exceptions to raise."""

    def __init__(self, reads: list) -> None:
        self.reads = reads

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def first(self):
        return self.next()

    def next(self):
        read = self.reads.pop(0)
        if isinstance(read, BaseException):
            raise read
        return read


WATCH = ["--exporter.url", "http://x/", "--watch", "--poll.interval", "0.1s"]
RETRY = (r"http://x/status\.json: HTTP 503 Service Unavailable "
         r"\(last good read at \d\d:\d\d:\d\d; retrying every 0\.1s\)")


def test_watch_shows_a_failed_read_in_place_and_carries_on(monkeypatch):
    """Not a terminal (rich's Live would draw only its last frame there): each refresh printed."""
    reads = [document(), SourceError("http://x/status.json: HTTP 503 Service Unavailable"), document(percent=60.0),
             KeyboardInterrupt()]
    monkeypatch.setattr("exporter.status_cli.ExporterSource", lambda *a: _Reads(reads))
    out, err = io.StringIO(), io.StringIO()
    assert run_status(status_args(*WATCH), out, err) == 0, err.getvalue()
    frames = out.getvalue().split("\n\n")
    assert len(frames) == 3 and err.getvalue() == ""
    assert re.search(r"^web-1 .* 30\.0 ", frames[0], re.M) and "60.0" not in frames[0]
    assert re.fullmatch(RETRY, frames[1])
    assert re.search(r"^web-1 .* 60\.0 ", frames[2], re.M)


def test_watch_json_reports_a_failed_read_on_stderr_and_carries_on(monkeypatch):
    reads = [document(), SourceError("http://x/status.json: HTTP 503 Service Unavailable"), document(percent=60.0),
             KeyboardInterrupt()]
    monkeypatch.setattr("exporter.status_cli.ExporterSource", lambda *a: _Reads(reads))
    out, err = io.StringIO(), io.StringIO()
    assert run_status(status_args(*WATCH, "--output", "json"), out, err) == 0, err.getvalue()
    assert [json.loads(line)["jobs"]["shown"][0]["percent"] for line in out.getvalue().splitlines()] == [30.0, 60.0]
    assert re.fullmatch("libvirt-blockjob-exporter status: " + RETRY + "\n", err.getvalue())


def test_watch_still_ends_at_a_failed_first_read(monkeypatch):
    """A wrong URL or login is said at once, not retried forever."""
    reads = [SourceError("http://x/status.json: HTTP 401 Unauthorized")]
    monkeypatch.setattr("exporter.status_cli.ExporterSource", lambda *a: _Reads(reads))
    err = io.StringIO()
    assert run_status(status_args(*WATCH), io.StringIO(), err) == 1
    assert err.getvalue() == "libvirt-blockjob-exporter status: http://x/status.json: HTTP 401 Unauthorized\n"


def test_the_libvirt_source_connects_again_after_a_failed_read(monkeypatch):
    """A dead connection stays dead: retrying with --watch means connecting again."""
    import exporter.libvirt_host

    connections = []

    @contextlib.contextmanager
    def reading(uri, state):
        connection = {"alive": True, "closed": False}
        connections.append(connection)

        def read():
            if not connection["alive"]:
                raise ConnectionError("end of file while reading data")
        try:
            yield read
        finally:
            connection["closed"] = True

    monkeypatch.setattr(exporter.libvirt_host, "reading", reading)
    with LibvirtSource("test:///default", 0.0) as source:
        assert source.next()["jobs"]["total"] == 0
        connections[0]["alive"] = False
        with pytest.raises(SourceError, match=r"^cannot read block jobs from test:///default: end of file"):
            source.next()
        assert source.next()["jobs"]["total"] == 0
    assert connections == [{"alive": False, "closed": True}, {"alive": True, "closed": True}]


# ---------------------------------------------------------------------------- from libvirt


@pytest.mark.libvirt
def test_reads_libvirt_read_only_during_a_real_pull(vm_factory):
    vm = vm_factory.create("cli", depth=2, data_mib=40, size_mib=64, paused=True)
    vmlib.start_pull(vm, bandwidth_bytes=2 * MiB)
    cmd = [sys.executable, "-m", "exporter", "status", "--libvirt.uri", vmlib.URI, "--poll.interval", "1s"]
    done = subprocess.run([*cmd, "--output", "json"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["connection"]["connected"] and doc["connection"]["mode"] == "read-only"
    job = next(j for j in doc["jobs"]["shown"] if j["domain"] == vm.name)
    assert job["type"] == "pull" and job["bandwidth"] == 2 * MiB and 0 < job["percent"] < 100
    # Two reads a second apart: a rate near the cap, and an ETA from it.
    assert 0.5 * MiB < job["rate"] < 8 * MiB and job["eta_seconds"] > 0
    table = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if vm.name in line)
    assert "\u2501" in row and "MiB/s" in row
    vmlib.abort(vm)


def test_an_unreachable_libvirt_is_exit_1():
    done = subprocess.run([sys.executable, "-m", "exporter", "status", "--libvirt.uri", "qemu+unix:///system?socket=/nonexistent"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(
        "libvirt-blockjob-exporter status: cannot read block jobs from qemu+unix:///system?socket=/nonexistent")


@pytest.mark.parametrize("flag", ("--exporter.password-file", "--exporter.ca-file"))
def test_a_fifo_as_the_password_or_ca_file_is_an_error_not_a_wait(tmp_path, capsys, flag):
    """open() of a FIFO waits for a writer for ever: the command must refuse it at once."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    args = ["--exporter.url", "http://127.0.0.1:9/", flag, str(fifo)]
    if flag == "--exporter.password-file":
        args += ["--exporter.username", "alice"]
    result = []
    worker = threading.Thread(target=lambda: result.append(status_main(args)), daemon=True)
    worker.start()
    worker.join(5)
    assert result == [1], "the command waited on the FIFO"
    assert "FIFO or socket" in capsys.readouterr().err
