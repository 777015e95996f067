"""Runs the real exporter as a subprocess and reads its /metrics, for integration and e2e tests."""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Mapping, Sequence

from prometheus_client.parser import text_string_to_metric_families

import vmlib

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Metrics:
    """One scrape, indexed by sample name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, frozenset], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def get(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        return self.samples.get((name, frozenset((labels or {}).items())))

    def series(self, name: str, **match: str) -> dict[frozenset, float]:
        return {labels: value for (n, labels), value in self.samples.items()
                if n == name and all((k, v) in labels for k, v in match.items())}


class Exporter:
    """``python -m exporter`` on a free loopback port, stopped with SIGTERM at the end.

    With a ``--web.config.file`` that turns on TLS and/or basic auth, pass ``ca_file`` (the CA that
    signed the server's certificate: the URL becomes https) and ``basic_auth`` (user, password) so
    that this helper's own requests get through."""

    def __init__(self, *args: str, poll_interval: str = "0.2s", env: Mapping[str, str] | None = None,
                 state_file: str | None = None, ca_file: str | os.PathLike | None = None,
                 basic_auth: tuple[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"{'https' if ca_file else 'http'}://127.0.0.1:{self.port}"
        self._tls = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
        self._headers = {} if basic_auth is None else {
            "Authorization": "Basic " + base64.b64encode(":".join(basic_auth).encode()).decode()}
        # Each exporter keeps its own state file (the default path is the host's), kept for a restart
        # with the same ``state_file``.
        self.state_dir = None if state_file else tempfile.mkdtemp(prefix="lbje-state-")
        self.state_file = state_file or os.path.join(self.state_dir, "state.json")
        self.args = [sys.executable, "-m", "exporter", f"--web.listen-address=127.0.0.1:{self.port}",
                     f"--poll.interval={poll_interval}", "--log.level=debug", f"--state.file={self.state_file}",
                     *args]
        self.log = tempfile.NamedTemporaryFile(prefix="lbje-exporter-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO,
                                     env={**os.environ, **(env or {})})
        self.wait_serving()

    def wait_serving(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exporter exited with {self.proc.returncode}:\n{self.output()}")
            try:
                self.scrape()
                return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"exporter did not serve within {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def _get(self, path: str, timeout: float) -> bytes:
        request = urllib.request.Request(f"{self.url}{path}", headers=self._headers)
        with urllib.request.urlopen(request, timeout=timeout, context=self._tls) as response:
            return response.read()

    def scrape(self, timeout: float = 5.0) -> Metrics:
        return Metrics(self._get("/metrics", timeout).decode())

    def raw(self, path: str = "/metrics") -> bytes:
        return self._get(path, 5)

    def value(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        return self.scrape().get(name, labels)

    def wait_value(self, name: str, labels: Mapping[str, str] | None, predicate, timeout: float = 30.0,
                   what: str = "") -> float | None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = self.value(name, labels)
            except OSError:
                last = "unreachable"
            if last != "unreachable" and predicate(last):
                return last
            time.sleep(0.1)
        raise AssertionError(f"{what or name}{dict(labels or {})}: last value {last!r} after {timeout}s\n"
                             f"--- exporter log (tail) ---\n{self.output()[-4000:]}")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 10.0, keep_log: bool = False) -> int:
        """Stops the process and removes what it left; ``keep_log`` keeps its log for a post-mortem."""
        returncode = vmlib.stop_process(self.proc, timeout)
        self.log.close()
        if not keep_log:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.log.name)
        if self.state_dir is not None:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        return returncode

    def __enter__(self) -> "Exporter":
        return self

    def __exit__(self, *exc) -> None:
        self.stop(keep_log=exc[0] is not None)


def job_labels(domain: str, disk: str = "vda", job_type: str = "pull") -> dict[str, str]:
    return {"domain": domain, "disk": disk, "job_type": job_type}


def run_exporter_command(args: Sequence[str], timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exporter", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def _systemd() -> bool:
    return Path("/run/systemd/system").is_dir() and subprocess.run(
        ["systemctl", "is-active", "--quiet", "libvirtd"], check=False).returncode == 0


def libvirtd_running() -> bool:
    return subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True).returncode == 0


def stop_libvirtd(timeout: float = 20.0) -> None:
    """Stop libvirtd; running QEMU guests and their block jobs carry on without it."""
    if _systemd():
        subprocess.run(["systemctl", "stop", "libvirtd", "libvirtd.socket", "libvirtd-ro.socket"], check=True)
    else:
        subprocess.run(["pkill", "-TERM", "-x", "libvirtd"], check=False)
    deadline = time.monotonic() + timeout
    while libvirtd_running():
        if time.monotonic() > deadline:
            subprocess.run(["pkill", "-KILL", "-x", "libvirtd"], check=False)
            time.sleep(0.5)
            break
        time.sleep(0.05)


def start_libvirtd(timeout: float = 30.0) -> None:
    if _systemd():
        subprocess.run(["systemctl", "start", "libvirtd"], check=True)
    elif not libvirtd_running():
        subprocess.run(["libvirtd", "-d"], check=True)
    deadline = time.monotonic() + timeout
    while subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True).returncode != 0:
        if time.monotonic() > deadline:
            raise TimeoutError("libvirtd did not come back")
        time.sleep(0.1)
