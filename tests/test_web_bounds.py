"""Hostile clients against the real exporter process, as issue 10 attacked it (libvirt's test
driver: no guests needed). Each test reproduces one of the issue's findings against the
hand-written server that uvicorn replaced, and bounds what it may cost now."""

from __future__ import annotations

import base64
import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import bcrypt
import pytest

import vmlib
from exporterlib import REPO, free_port

pytestmark = pytest.mark.timeout(180)


class Proc:
    """A child process serving HTTP on a free loopback port, its output in a file."""

    def __init__(self, args: list[str], nofile: tuple[int, int] | None = None, stdin=None) -> None:
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="lbje-web-bounds-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [a.replace("{port}", str(self.port)) for a in args], stdout=self.log, stderr=subprocess.STDOUT,
            stdin=stdin, cwd=REPO, preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile))
            if nofile else None)
        deadline = time.monotonic() + 20
        while True:
            assert self.proc.poll() is None, self.output()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, self.output()
                time.sleep(0.05)

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def status(self, key: str) -> int:
        """A /proc/PID/status figure in KiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def cpu_share(self, seconds: float = 2.0) -> float:
        before = self.cpu_seconds()
        time.sleep(seconds)
        return (self.cpu_seconds() - before) / seconds

    def get(self, path: str = "/metrics", headers: dict | None = None, timeout: float = 2.0) -> int:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                response.read()
                return response.status
        except urllib.error.HTTPError as e:
            return e.code

    def close(self) -> None:
        vmlib.stop_process(self.proc, 10)
        self.log.close()
        os.unlink(self.log.name)


@contextlib.contextmanager
def exporter(*flags: str, nofile: tuple[int, int] | None = None):
    p = Proc([sys.executable, "-m", "exporter", "--web.listen-address=127.0.0.1:{port}",
              "--libvirt.uri=test:///default", "--state.file=", *flags], nofile)  # never the host's file
    try:
        yield p
    finally:
        p.close()


@contextlib.contextmanager
def many_fds(n: int):
    """Lets this test process hold ``n`` more sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < n + 256:
        pytest.skip(f"hard open-file limit {hard} is too low for {n} connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_200_clients_with_6_mb_of_unfinished_headers_cost_little_memory():
    """They took the old server from 53 MB to 1.35 GB: every header line was kept."""
    with exporter() as ex:
        assert ex.get() == 200
        base = ex.status("VmRSS")
        socks: list[socket.socket] = []
        lock = threading.Lock()

        def attack() -> None:
            s = socket.create_connection(("127.0.0.1", ex.port), timeout=30)
            with lock:
                socks.append(s)
            try:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                for i in range(99):  # 99 x 64 KB: ~6 MB, never finished
                    s.sendall(b"X-%02d: %s\r\n" % (i, b"a" * 64_000))
            except OSError:
                pass  # cut off: what we want

        threads = [threading.Thread(target=attack) for _ in range(200)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            started = time.monotonic()
            assert ex.get(timeout=2) == 200
            assert time.monotonic() - started < 2
            grown_mib = (ex.status("VmHWM") - base) / 1024
            assert grown_mib < 100, f"peak RSS grew {grown_mib:.0f} MiB"
        finally:
            for s in socks:
                s.close()


def test_1100_idle_connections_under_a_soft_fd_limit_of_1024():
    """With systemd's default soft limit the old accept loop spun at a full core on EMFILE and
    /metrics stopped answering; now the limit is raised to the hard one at start."""
    with many_fds(1100), exporter(nofile=(1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1])) as ex:
        idle = []
        try:
            for _ in range(1100):
                idle.append(socket.create_connection(("127.0.0.1", ex.port), timeout=5))
            time.sleep(0.5)
            assert ex.cpu_share() < 0.2
            started = time.monotonic()
            assert ex.get(timeout=2) == 200
            assert time.monotonic() - started < 2
        finally:
            for s in idle:
                s.close()


EMFILE_SERVER = textwrap.dedent("""
    import logging, os, resource, sys
    from exporter.web import WebServer
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    ws = WebServer("127.0.0.1:" + sys.argv[1], "/metrics", lambda *a: (b"up 1\\n", "text/plain"))
    ws.start()
    hog = []  # what else might hold descriptors: libvirt, files, a leak
    try:
        while True:
            hog.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    for fd in hog[-8:]:
        os.close(fd)
    del hog[-8:]
    print("ready", flush=True)
    sys.stdin.readline()
    for fd in hog:
        os.close(fd)
    print("released", flush=True)
    sys.stdin.readline()
    ws.shutdown()
""")


def test_out_of_descriptors_backs_off_and_is_logged_once():
    """The old accept loop retried a failing accept() at once, forever, and logged nothing."""
    p = Proc([sys.executable, "-c", EMFILE_SERVER, "{port}"], stdin=subprocess.PIPE)
    clients = []
    try:
        deadline = time.monotonic() + 10
        while "ready" not in p.output():
            assert time.monotonic() < deadline and p.proc.poll() is None, p.output()
            time.sleep(0.05)
        for _ in range(40):  # more than the 8 free descriptors
            clients.append(socket.create_connection(("127.0.0.1", p.port), timeout=5))
        time.sleep(0.5)
        assert p.cpu_share(3.0) < 0.2
        assert p.output().count("accept() failed") == 1, p.output()
        p.proc.stdin.write(b"release\n")
        p.proc.stdin.flush()
        for s in clients:
            s.close()
        clients.clear()
        started = time.monotonic()
        assert p.get(timeout=3) == 200
        assert time.monotonic() - started < 3
        p.proc.stdin.write(b"stop\n")
        p.proc.stdin.flush()
    finally:
        for s in clients:
            s.close()
        p.close()


def _basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_removed_user_stops_working_after_sighup(tmp_path):
    """The old server read users once at start: a removed user kept working until a restart."""
    alice = bcrypt.hashpw(b"alice-pw", bcrypt.gensalt(4)).decode()
    bob = bcrypt.hashpw(b"bob-pw", bcrypt.gensalt(4)).decode()
    config = tmp_path / "web.yml"
    config.write_text(f"basic_auth_users:\n  alice: {alice}\n  bob: {bob}\n")
    with exporter(f"--web.config.file={config}") as ex:
        assert ex.get(headers=_basic("alice", "alice-pw")) == 200
        assert ex.get() == 401
        config.write_text(f"basic_auth_users:\n  bob: {bob}\n")
        ex.proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        assert ex.get(headers=_basic("alice", "alice-pw")) == 401
        assert ex.get(headers=_basic("bob", "bob-pw")) == 200
