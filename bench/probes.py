"""Processes under test and how they are measured: HTTP scrapes, CPU and RSS from /proc."""

from __future__ import annotations

import ctypes
import gzip
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench.fleet import vmlib  # tests/vmlib.py, put on the path (and set up) by the fleet module

REPO = Path(__file__).resolve().parent.parent
DEBIAN_PACKAGE = "prometheus-libvirt-exporter"
_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lbje-bench"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """Children get SIGTERM if the benchmark dies, even by SIGKILL: nothing is left listening."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------- /proc


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # fields 14 and 15 of proc(5)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


# ---------------------------------------------------------------------------------------- HTTP


@dataclass(frozen=True)
class Scrape:
    seconds: float
    wire_bytes: int  # body as sent (gzip when asked for and given)
    body: bytes  # decompressed


def scrape(port: int, *, path: str = "/metrics", use_gzip: bool = True, timeout: float = 60.0) -> Scrape:
    """One scrape on a fresh connection, as Prometheus' first request of a target is: new TCP
    connection, ``Accept-Encoding: gzip``. Timed from connect to the last body byte.

    A plain socket client: it sends the request and reads until the body is complete (by
    ``Content-Length`` or the last chunk); the response is parsed and decompressed after the
    clock stops. Python's ``http.client`` adds about 1 ms of its own parsing to every scrape,
    which would be counted as the exporter's; Prometheus' Go client does not add that.
    """
    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
               "Accept: text/plain;version=0.0.4;q=1,*/*;q=0.1\r\n"
               + ("Accept-Encoding: gzip\r\n" if use_gzip else "") + "\r\n").encode("ascii")
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(request)
        raw = _read_response(sock)
        seconds = time.perf_counter() - started
    head, _, payload = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if headers.get("transfer-encoding", "").lower() == "chunked":
        payload = _dechunk(payload)
    elif "content-length" in headers:
        payload = payload[: int(headers["content-length"])]
    if status != 200:
        raise RuntimeError(f"GET :{port}{path} -> {status}: {payload[:200]!r}")
    body = gzip.decompress(payload) if headers.get("content-encoding") == "gzip" else payload
    return Scrape(seconds, len(payload), body)


def _read_response(sock: socket.socket) -> bytes:
    """Bytes until the response is complete: Content-Length reached, the last chunk, or EOF."""
    buffer = bytearray()
    expected: int | None = None
    chunked = False
    while True:
        data = sock.recv(1 << 18)
        if not data:
            return bytes(buffer)
        buffer += data
        if expected is None and not chunked:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                continue
            head = bytes(buffer[:end]).lower()
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip() == b"content-length":
                    expected = end + 4 + int(value)
                elif name.strip() == b"transfer-encoding" and b"chunked" in value:
                    chunked = True
        if expected is not None and len(buffer) >= expected:
            return bytes(buffer)
        if chunked and buffer.endswith(b"\r\n0\r\n\r\n"):
            return bytes(buffer)


def _dechunk(payload: bytes) -> bytes:
    out = bytearray()
    position = 0
    while True:
        line_end = payload.index(b"\r\n", position)
        size = int(payload[position:line_end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += payload[line_end + 2: line_end + 2 + size]
        position = line_end + 2 + size + 2


class KeepAliveScraper:
    """Plain scrapes on one kept-alive connection: for tight loops that watch a value."""

    def __init__(self, port: int, path: str = "/metrics") -> None:
        self.port = port
        self.path = path
        self._conn: http.client.HTTPConnection | None = None

    def get(self) -> bytes:
        for attempt in range(2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                self._conn.request("GET", self.path)
                return self._conn.getresponse().read()
            except (OSError, http.client.HTTPException):
                self._conn.close()
                self._conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


class Metrics:
    """One exposition, indexed by (sample name, labels)."""

    def __init__(self, body: bytes) -> None:
        self.samples: dict[tuple[str, frozenset], float] = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def get(self, name: str, default: float | None = None, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())), default)

    def by_label(self, name: str, label: str) -> dict[str, float]:
        return {dict(lbls)[label]: value for (n, lbls), value in self.samples.items()
                if n == name and label in dict(lbls)}

    def series(self, name: str) -> dict[frozenset, float]:
        return {lbls: value for (n, lbls), value in self.samples.items() if n == name}


def sample_value(body: bytes, name: str, **labels: str) -> float | None:
    """Value of the sample ``name{labels}`` in an exposition, whatever the label order."""
    head = b"\n" + name.encode() + b"{"
    pairs = [f'{k}="{v}"'.encode() for k, v in labels.items()]
    at = body.find(head)
    while at >= 0:
        end = body.find(b"\n", at + 1)
        line = body[at + 1:end if end >= 0 else None]
        close = line.rfind(b"}")
        label_text = line[len(head) - 1:close]
        if len(label_text.split(b'",')) == len(pairs) and all(p in label_text for p in pairs):
            return float(line[close + 1:].split()[0])
        at = body.find(head, at + 1)
    return None


def line_value(body: bytes, prefix: bytes) -> float | None:
    """Value of the first exposition line starting with ``prefix`` (name plus ``{labels}``)."""
    at = body.find(b"\n" + prefix)
    if at < 0:
        return None
    start = at + 1 + len(prefix)
    end = body.find(b"\n", start)
    return float(body[start:end if end >= 0 else None].split()[0])


# ---------------------------------------------------------------------------------------- processes


class Served:
    """A child process serving /metrics on a loopback port; stopped with SIGTERM."""

    name = "process"

    def __init__(self, argv: list[str], port: int, *, cwd: Path | None = None, env=None) -> None:
        self.port = port
        self.argv = argv
        self.log = tempfile.NamedTemporaryFile(prefix=f"lbje-bench-{self.name}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=cwd,
                                     env=env, preexec_fn=_die_with_parent)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def wait_serving(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            try:
                scrape(self.port, timeout=5)
                return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"{self.name} did not serve within {timeout}s:\n{self.output()[-3000:]}")

    def stop(self, timeout: float = 10.0) -> None:
        vmlib.stop_process(self.proc, timeout)
        self.log.close()

    def remove_log(self) -> None:
        try:
            os.unlink(self.log.name)
        except OSError:
            pass


class OurExporter(Served):
    """``python -m exporter`` with its defaults (1 s poll), on a loopback port."""

    name = "ours"

    def __init__(self, uri: str) -> None:
        port = free_port()
        super().__init__([sys.executable, "-m", "exporter", f"--web.listen-address=127.0.0.1:{port}",
                          f"--libvirt.uri={uri}"], port, cwd=REPO, env={**os.environ})


class DebianExporter(Served):
    name = "debian"

    def __init__(self, binary: str, uri: str) -> None:
        port = free_port()
        super().__init__([binary, f"--libvirt.uri={uri}", f"--web.listen-address=127.0.0.1:{port}"], port)


def debian_version() -> str:
    res = subprocess.run(["dpkg-query", "-W", "-f=${Version}", DEBIAN_PACKAGE], capture_output=True, text=True)
    if res.returncode == 0 and res.stdout:
        return res.stdout
    stamp = _CACHE / "debian-exporter" / "VERSION"
    return stamp.read_text().strip() if stamp.exists() else "unknown"


def find_debian_exporter(log=print) -> str:
    """The Debian package's binary: installed, or unpacked from ``apt-get download`` into a cache
    (no maintainer scripts run, so no system service is enabled or started)."""
    for candidate in (shutil.which(DEBIAN_PACKAGE), f"/usr/bin/{DEBIAN_PACKAGE}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    target = _CACHE / "debian-exporter"
    binary = target / "usr" / "bin" / DEBIAN_PACKAGE
    if binary.exists():
        return str(binary)
    log(f"{DEBIAN_PACKAGE} not installed; fetching the Debian package into {target}")
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["apt-get", "download", "-q", DEBIAN_PACKAGE]
        if subprocess.run(cmd, cwd=tmp, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
            subprocess.run(cmd, cwd=tmp, check=True, capture_output=True)
        deb = next(Path(tmp).glob("*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
        version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True,
                                 text=True).stdout.strip()
        (target / "VERSION").write_text(version + "\n")
    return str(binary)
