"""Processes under test and how they are measured: HTTP scrapes, CPU and RSS from /proc."""

from __future__ import annotations

import ctypes
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench.fleet import vmlib  # tests/vmlib.py, put on the path (and set up) by the fleet module
from bench.scraping import scrape

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


def libvirtd_pid() -> int | None:
    """libvirtd's pid (its pid file, else ``pidof``), or None when it is not running."""
    candidates: list[int] = []
    for pidfile in ("/var/run/libvirtd.pid", "/run/libvirtd.pid"):
        try:
            candidates.append(int(Path(pidfile).read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            pass
    res = subprocess.run(["pidof", "libvirtd"], capture_output=True, text=True)
    candidates.extend(int(x) for x in res.stdout.split())
    for pid in candidates:
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "libvirtd":
                return pid
        except OSError:
            continue
    return None


class CPUWindow:
    """CPU time of a fixed set of processes between ``start()`` and ``stop()``, as % of one core.

    A process that went away (or was replaced: libvirtd restarted by another test run on the
    host) spoils the window: the figure is NaN and ``problem`` says why.
    """

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self._start: dict[int, tuple[float, str]] = {}
        self._t0 = 0.0
        self.problem = ""

    @staticmethod
    def _identity(pid: int) -> str:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]  # starttime: tells a new process apart

    def start(self) -> "CPUWindow":
        self._start = {}
        for pid in self.pids:
            try:
                self._start[pid] = (cpu_seconds(pid), self._identity(pid))
            except OSError:
                self.problem = f"process {pid} gone before the window"
        self._t0 = time.monotonic()
        return self

    def stop(self) -> float:
        elapsed = time.monotonic() - self._t0
        total = 0.0
        for pid, (cpu0, ident) in self._start.items():
            try:
                if self._identity(pid) != ident:
                    raise OSError("replaced")
                total += cpu_seconds(pid) - cpu0
            except OSError:
                self.problem = f"process {pid} went away or was replaced during the window"
        if self.problem or not self._start:
            return float("nan")
        return 100.0 * total / elapsed


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


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
    """``python -m exporter`` with its defaults (1 s poll), on a loopback port and with a state
    file of its own; ``call_budget`` sets ``--poll.call-budget`` (None: the exporter's default)."""

    name = "ours"

    def __init__(self, uri: str, call_budget: int | None = None) -> None:
        port = free_port()
        budget = [] if call_budget is None else [f"--poll.call-budget={call_budget}"]
        # A state file of its own (the default path is the host's): no row inherits the jobs of
        # the one before, nothing is left on the host.
        self.state_dir = tempfile.mkdtemp(prefix="lbje-bench-state-")
        super().__init__([sys.executable, "-m", "exporter", f"--web.listen-address=127.0.0.1:{port}",
                          f"--libvirt.uri={uri}", f"--state.file={self.state_dir}/state.json", *budget],
                         port, cwd=REPO, env={**os.environ})

    def remove_log(self) -> None:
        super().remove_log()
        shutil.rmtree(self.state_dir, ignore_errors=True)


class DebianExporter(Served):
    name = "debian"

    def __init__(self, binary: str, uri: str) -> None:
        port = free_port()
        super().__init__([binary, f"--libvirt.uri={uri}", f"--web.listen-address=127.0.0.1:{port}"], port)


class Checker:
    """The external checker (``bench.checker``): a separate process that scrapes back to back on a
    fresh connection each time, as a user's monitoring would. Being another process, its loop
    shares no GIL with the benchmark's event callback, whose time it is compared with."""

    def __init__(self, port: int, use_gzip: bool = True) -> None:
        argv = [sys.executable, "-m", "bench.checker", str(port)] + ([] if use_gzip else ["--no-gzip"])
        self._timeout = 30.0
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
                                     preexec_fn=_die_with_parent)

    def _reply(self, timeout: float) -> dict:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"the checker did not answer within {timeout}s (exit {self.proc.poll()})")
        return json.loads(line)

    def watch(self, name: str, labels: dict, timeout: float = 30.0) -> dict:
        """Starts a watch of sample ``name{labels}``: returns once the checker has its value
        (``before``) and is scraping back to back; ``seen()`` then waits for it to go up."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"name": name, "labels": labels, "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        self._timeout = timeout
        return self._reply(30.0)

    def seen(self) -> dict:
        reply = self._reply(self._timeout + 30.0)
        if "seen" not in reply:
            raise TimeoutError(f"the checker never saw the value go up: {reply}")
        return reply

    def stop(self) -> None:
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        vmlib.stop_process(self.proc, 5.0)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


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
