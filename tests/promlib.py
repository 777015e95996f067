"""Runs the real Prometheus and Alertmanager (Debian's binaries) for tests, and a webhook receiver.

Everything binds to 127.0.0.1 on free ports and lives in a temporary directory; processes are
stopped at teardown even when the test fails (and at interpreter exit as a last resort).

    def test_x(prometheus_factory, alertmanager, webhook_receiver):
        prom = prometheus_factory(targets=[exporter_address], rule_files=alert_rule_files(tmp_path),
                                  alertmanager_url=alertmanager.url)
        prom.wait_for_target_up()
        prom.query('libvirt_blockjob_up')
        webhook_receiver.wait_for_alert("LibvirtBlockJobFailed", {"domain": "d"}, timeout=20)

Tests needing the binaries skip when they are missing, unless LBJE_REQUIRE_TOOLS is set (CI).
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
RULES_DIR = REPO / "config" / "prometheus"
JOB = "libvirt-blockjob"  # scrape job name matched by the default alert selector

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
AMTOOL = shutil.which("amtool")

# Loopback only: never through a proxy from the environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_running: set[subprocess.Popen] = set()


def require_tools(*names: str) -> None:
    """Skip unless the named tools exist; fail instead when LBJE_REQUIRE_TOOLS is set."""
    found = {"prometheus": PROMETHEUS, "promtool": PROMTOOL, "alertmanager": ALERTMANAGER, "amtool": AMTOOL}
    missing = [n for n in names if not found[n]]
    if not missing:
        return
    msg = f"missing {', '.join(missing)} (apt-get install prometheus prometheus-alertmanager)"
    if os.environ.get("LBJE_REQUIRE_TOOLS"):
        pytest.fail(f"LBJE_REQUIRE_TOOLS is set but {msg}", pytrace=False)
    pytest.skip(msg)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_json(url: str, data: Any = None, timeout: float = 5.0, method: str | None = None) -> Any:
    body = None if data is None else json.dumps(data).encode()
    request = urllib.request.Request(url, data=body, method=method,
                                     headers={"Content-Type": "application/json"} if body else {})
    with _opener.open(request, timeout=timeout) as response:
        raw = response.read()
    return json.loads(raw) if raw.strip() else None


def wait_until(probe: Callable[[], Any], timeout: float, what: str, interval: float = 0.1,
               describe: Callable[[], str] | None = None) -> Any:
    """Calls probe until it returns something truthy (returned) or timeout runs out (AssertionError)."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = probe()
            if result:
                return result
        except (OSError, ValueError) as exc:  # not up yet, connection refused, bad JSON mid-start
            last_error = exc
        if time.monotonic() >= deadline:
            detail = describe() if describe else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                                 + (f"; last error: {last_error}" if last_error else "")
                                 + (f"\n{detail}" if detail else ""))
        time.sleep(interval)


def labels_match(labels: Mapping[str, str], want: Mapping[str, str] | None) -> bool:
    return all(labels.get(k) == v for k, v in (want or {}).items())


def alert_rule_files(directory: Path, overrides: Mapping[str, Any] | None = None) -> list[Path]:
    """Rule files for a Prometheus under test: the recording rules and alerts rendered with overrides.

    Overrides use gen-rules' keys, e.g. {"stalled.after": "5s", "stalled.for": "0s"}; without any,
    the result equals the committed alerts.yml. The one place thresholds live stays the one place.
    """
    gen = _gen_rules()
    parsed = {tuple(key.split(".")): value for key, value in (overrides or {}).items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    alerts = directory / "alerts.yml"
    alerts.write_text(gen.render(gen.load_thresholds(gen.DEFAULT_THRESHOLDS, parsed)))
    recording = directory / "recording-rules.yml"
    shutil.copyfile(RULES_DIR / "recording-rules.yml", recording)
    return [recording, alerts]


_gen_module = None


def _gen_rules():
    """scripts/gen-rules.py as a module (its name has a dash)."""
    global _gen_module
    if _gen_module is None:
        spec = importlib.util.spec_from_file_location("gen_rules", REPO / "scripts" / "gen-rules.py")
        module = importlib.util.module_from_spec(spec)
        assert spec.loader is not None
        spec.loader.exec_module(module)
        _gen_module = module
    return _gen_module


# -- processes ---------------------------------------------------------------------------------

class _Server:
    """A child process on a free loopback port, ready once GET /-/ready answers 200."""

    name = "server"

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / f"{self.name}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 20.0) -> "_Server":
        for attempt in range(3):  # the free port may be taken between choosing and binding
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, cwd=self.workdir)
            _running.add(self.proc)
            try:
                wait_until(self._ready, timeout, f"{self.name} on {self.url}", describe=self.log_tail)
                return self
            except AssertionError:
                exited = self.proc.poll() is not None
                self.stop()
                if not (exited and "address already in use" in self.log_tail()) or attempt == 2:
                    raise
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
        with _opener.open(f"{self.url}/-/ready", timeout=2) as response:
            return response.status == 200

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        _running.discard(proc)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return f"--- {self.log_path} (tail) ---\n" + "\n".join(text.splitlines()[-lines:])

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class AlertmanagerServer(_Server):
    """Alertmanager that sends every alert to `webhook_url` at once (group_wait 0s)."""

    name = "alertmanager"

    def __init__(self, workdir: Path, webhook_url: str | None = None, config: Mapping[str, Any] | None = None,
                 group_wait: str = "0s", group_interval: str = "1s", repeat_interval: str = "1h") -> None:
        super().__init__(workdir)
        if config is None:
            receiver: dict[str, Any] = {"name": "test"}
            if webhook_url:
                receiver["webhook_configs"] = [{"url": webhook_url, "send_resolved": True}]
            config = {
                "route": {"receiver": "test", "group_by": ["alertname", "instance", "domain", "disk"],
                          "group_wait": group_wait, "group_interval": group_interval,
                          "repeat_interval": repeat_interval},
                "receivers": [receiver],
            }
        self.config_path = self.workdir / "alertmanager.yml"
        self.config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
        (self.workdir / "data").mkdir(exist_ok=True)

    def _command(self) -> list[str]:
        assert ALERTMANAGER, "alertmanager binary not found"
        return [ALERTMANAGER, f"--config.file={self.config_path}", f"--storage.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address=",
                "--log.level=debug"]

    def alerts(self, active_only: bool = True) -> list[dict]:
        query = "" if not active_only else "?active=true&silenced=false&inhibited=false"
        return http_json(f"{self.url}/api/v2/alerts{query}")

    def post_alerts(self, alerts: Sequence[Mapping[str, Any]]) -> None:
        http_json(f"{self.url}/api/v2/alerts", list(alerts), method="POST")

    def wait_for_alert(self, name: str, labels: Mapping[str, str] | None = None, timeout: float = 10.0) -> dict:
        def probe():
            for alert in self.alerts():
                if alert["labels"].get("alertname") == name and labels_match(alert["labels"], labels):
                    return alert
            return None
        return wait_until(probe, timeout, f"alert {name} {dict(labels or {})} in Alertmanager",
                          describe=lambda: f"active: {self._safe(self.alerts)}\n{self.log_tail()}")

    @staticmethod
    def _safe(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - only for error messages
            return f"<{exc}>"


class PrometheusServer(_Server):
    """Prometheus scraping `targets` as job `job` every second and evaluating rules every second.

    `scrape_configs` replaces the generated scrape config entirely when given.
    """

    name = "prometheus"

    def __init__(self, workdir: Path, targets: Iterable[str] = (), rule_files: Iterable[Path | str] = (),
                 alertmanager_url: str | None = None, job: str = JOB, scrape_interval: str = "1s",
                 evaluation_interval: str = "1s", scrape_configs: Sequence[Mapping[str, Any]] | None = None,
                 extra_args: Sequence[str] = ()) -> None:
        super().__init__(workdir)
        config: dict[str, Any] = {
            "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval,
                       "evaluation_interval": evaluation_interval},
            "rule_files": [str(Path(f).resolve()) for f in rule_files],
            "scrape_configs": list(scrape_configs) if scrape_configs is not None else
            [{"job_name": job, "static_configs": [{"targets": list(targets)}]}],
        }
        if alertmanager_url:
            parts = urllib.parse.urlsplit(alertmanager_url)
            am: dict[str, Any] = {"static_configs": [{"targets": [parts.netloc]}]}
            if parts.path.strip("/"):
                am["path_prefix"] = parts.path
            config["alerting"] = {"alertmanagers": [am]}
        self.job = job
        self.config_path = self.workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.extra_args = list(extra_args)

    def _command(self) -> list[str]:
        assert PROMETHEUS, "prometheus binary not found"
        return [PROMETHEUS, f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle",
                *self.extra_args]

    def _api(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        try:
            reply = http_json(f"{self.url}/api/v1/{path}" + (f"?{query}" if query else ""))
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")
            raise PromQLError(f"{path} {params}: HTTP {exc.code}: {detail}") from None
        if reply.get("status") != "success":
            raise PromQLError(f"{path} {params}: {reply}")
        return reply["data"]

    def query(self, promql: str, at: float | None = None) -> list[dict]:
        """Instant query: the `result` list (a scalar or string result comes back as one sample)."""
        data = self._api("query", query=promql, time=at)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def query_range(self, promql: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        return self._api("query_range", query=promql, start=start, end=end, step=step)["result"]

    def query_value(self, promql: str) -> float | None:
        """The value of a query expected to give at most one sample (None if none)."""
        result = self.query(promql)
        if not result:
            return None
        assert len(result) == 1, f"{promql} gave {len(result)} samples: {result}"
        return float(result[0]["value"][1])

    def alerts(self) -> list[dict]:
        """Pending and firing alerts of the rule evaluation."""
        return self._api("alerts")["alerts"]

    def rules(self) -> list[dict]:
        return self._api("rules")["groups"]

    def targets(self) -> list[dict]:
        return self._api("targets")["activeTargets"]

    def reload(self) -> None:
        """Re-reads the config and rule files (e.g. after rewriting them with other thresholds)."""
        http_json(f"{self.url}/-/reload", method="POST")

    def wait_for_target_up(self, timeout: float = 15.0) -> list[dict]:
        def probe():
            targets = self.targets()
            return targets if targets and all(t["health"] == "up" for t in targets) else None
        return wait_until(probe, timeout, "all scrape targets up",
                          describe=lambda: f"targets: {AlertmanagerServer._safe(self.targets)}")

    def wait_for_query(self, promql: str, timeout: float = 15.0,
                       check: Callable[[list[dict]], bool] = bool) -> list[dict]:
        """Waits until `promql` gives a result that `check` accepts (default: any sample)."""
        def probe():
            result = self.query(promql)
            return result if check(result) else None
        return wait_until(probe, timeout, f"query {promql!r}",
                          describe=lambda: f"last result: {AlertmanagerServer._safe(lambda: self.query(promql))}")

    def wait_for_alert(self, name: str, labels: Mapping[str, str] | None = None, timeout: float = 15.0,
                       state: str = "firing") -> dict:
        def probe():
            for alert in self.alerts():
                if (alert["labels"].get("alertname") == name and alert["state"] == state
                        and labels_match(alert["labels"], labels)):
                    return alert
            return None
        return wait_until(probe, timeout, f"{state} alert {name} {dict(labels or {})} in Prometheus",
                          describe=lambda: f"alerts: {AlertmanagerServer._safe(self.alerts)}\n{self.log_tail()}")


class PromQLError(AssertionError):
    pass


# -- small HTTP servers in the test process ----------------------------------------------------

class _HTTPServer:
    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._server.owner = self  # type: ignore[attr-defined]
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _QuietHandler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class _WebhookHandler(_QuietHandler):
    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = {"invalid": raw.decode("utf-8", "replace")}
        self.server.owner._record(self.path, payload)  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


class WebhookReceiver(_HTTPServer):
    """Records Alertmanager webhook posts and when each arrived; `url` goes into a webhook_config."""

    def __init__(self) -> None:
        super().__init__(_WebhookHandler)
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self._lock = threading.Lock()
        self.posts: list[dict] = []
        self._arrivals: list[float] = []  # time.time() at which posts[i] arrived

    def _record(self, path: str, payload: dict) -> None:
        now = time.time()
        with self._lock:
            self.posts.append(payload)
            self._arrivals.append(now)

    def arrivals(self, status: str | None = None) -> list[tuple[float, dict]]:
        """(arrival time as time.time(), alert) for every alert of every post so far, in order."""
        with self._lock:
            posts = list(zip(self._arrivals, self.posts))
        return [(at, a) for at, p in posts for a in p.get("alerts", [])
                if status is None or a.get("status") == status]

    def alerts(self, status: str | None = None) -> list[dict]:
        """Every alert of every post so far, in order (an alert repeats if notified again)."""
        return [alert for _, alert in self.arrivals(status)]

    def first_arrival(self, name: str, labels: Mapping[str, str] | None = None,
                      status: str = "firing") -> float | None:
        """When the first notification of alert `name` with `labels` arrived (time.time()), or None."""
        for at, alert in self.arrivals(status):
            if alert["labels"].get("alertname") == name and labels_match(alert["labels"], labels):
                return at
        return None

    def wait_for_alert(self, name: str, labels: Mapping[str, str] | None = None, timeout: float = 15.0,
                       status: str = "firing") -> dict:
        def probe():
            for alert in self.alerts(status):
                if alert["labels"].get("alertname") == name and labels_match(alert["labels"], labels):
                    return alert
            return None
        return wait_until(probe, timeout, f"{status} alert {name} {dict(labels or {})} at the webhook",
                          describe=lambda: f"received: {self.alerts()}")


class _MetricsHandler(_QuietHandler):
    def do_GET(self) -> None:  # noqa: N802
        body = self.server.owner.text.encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class StaticMetricsServer(_HTTPServer):
    """Serves whatever text exposition `text` holds now, at any path; `address` is host:port."""

    def __init__(self, text: str = "") -> None:
        super().__init__(_MetricsHandler)
        self.text = text
        self.address = f"127.0.0.1:{self.port}"


def _kill_leftovers() -> None:
    for proc in list(_running):
        if proc.poll() is None:
            proc.kill()


atexit.register(_kill_leftovers)


# -- pytest fixtures (import them into a test module: from promlib import alertmanager, ...) ----

@pytest.fixture
def webhook_receiver():
    with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture
def alertmanager(tmp_path, webhook_receiver):
    """A running Alertmanager posting every alert to the `webhook_receiver` fixture at once."""
    require_tools("alertmanager")
    server = AlertmanagerServer(tmp_path / "alertmanager", webhook_url=webhook_receiver.url)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def prometheus_factory(tmp_path):
    """`prometheus_factory(**PrometheusServer kwargs) -> started PrometheusServer`, all stopped at teardown."""
    require_tools("prometheus")
    servers: list[PrometheusServer] = []

    def make(**kwargs: Any) -> PrometheusServer:
        server = PrometheusServer(tmp_path / f"prometheus-{len(servers)}", **kwargs)
        servers.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def metrics_server():
    """A StaticMetricsServer; set `.text` to change what the next scrape sees."""
    with StaticMetricsServer() as server:
        yield server


def temp_dir(prefix: str = "lbje-prom-") -> Path:
    """For use outside pytest (e.g. a benchmark or a manual run)."""
    return Path(tempfile.mkdtemp(prefix=prefix))
