"""Posts block-job failures straight to Alertmanager (``--alertmanager.url``).

They page with no Prometheus watching, and sooner than a scrape and rule would. The libvirt event
path must never wait on the network, so ``notify_failure`` only queues (bounded); one daemon thread
posts, retries and gives up. Each alert carries its own ``endsAt``, so nothing has to remember to
resolve it. See docs/alerting.md for labels and behaviour.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import ipaddress
import json
import logging
import math
import queue
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from typing import Mapping, NamedTuple

from prometheus_client.core import CounterMetricFamily

from . import __version__

log = logging.getLogger(__name__)

ALERTNAME = "LibvirtBlockJobFailedDirect"
SOURCE = "libvirt-blockjob-exporter"
RUNBOOK_URL = ("https://github.com/libvirt-blockjob-exporter/libvirt-blockjob-exporter/blob/main/"
               "docs/runbook.md#libvirtblockjobfaileddirect")
RESULTS = ("success", "error", "dropped")
RESERVED_LABELS = frozenset({"alertname", "severity", "domain", "disk", "job_type", "instance", "source"})
MAX_LABEL_VALUE_CHARS = 1024
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_LOG_EVERY_SECONDS = 60.0


class _Failure(NamedTuple):
    domain: str
    disk: str
    job_type: str
    wall_time: float


class _PermanentError(Exception):
    """Alertmanager rejected the alert itself (4xx): sending it again cannot help."""


_STOP = object()


def rfc3339(unix_time: float) -> str:
    return datetime.fromtimestamp(unix_time, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _default_instance(instance: str) -> str:
    """A listen address such as ":9478" or "0.0.0.0:9478" names no host; use this host's name."""
    host, sep, port = instance.rpartition(":")
    if not instance:
        return socket.gethostname()
    if sep and host.strip("[]") in ("", "0.0.0.0", "::"):
        return f"{socket.gethostname()}:{port}"
    return instance


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def label_problem(name: str, value: str) -> str | None:
    """Why ``name=value`` cannot be an extra label of the direct alerts, or None."""
    if not _LABEL_NAME.match(name) or name.startswith("__"):
        return f"invalid label name {name!r}"
    if name in RESERVED_LABELS:
        return f"label {name!r} is set by the notifier and cannot be overridden"
    if not value or len(value) > MAX_LABEL_VALUE_CHARS:
        return f"label {name!r}: the value must have 1 to {MAX_LABEL_VALUE_CHARS} characters"
    return None


class AlertmanagerNotifier:
    def __init__(self, url: str, resolve_after_seconds: float = 300.0, timeout_seconds: float = 5.0,
                 instance: str = "", extra_labels: Mapping[str, str] | None = None, queue_size: int = 1000,
                 *, retries: int = 3, backoff_seconds: float = 1.0) -> None:
        """Raises ValueError for a URL or labels that could never work, so it fails at start-up."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"Alertmanager URL must be http(s)://host[:port][/prefix], got {url!r}")
        if resolve_after_seconds <= 0 or timeout_seconds <= 0 or queue_size < 1 or retries < 0:
            raise ValueError("resolve_after_seconds and timeout_seconds must be > 0, queue_size >= 1, retries >= 0")
        extra = dict(extra_labels or {})
        for name, value in extra.items():
            problem = label_problem(name, value)
            if problem:
                raise ValueError(problem)

        self._headers = {"Content-Type": "application/json", "User-Agent": f"{SOURCE}/{__version__}"}
        if parts.username is not None:
            # urllib ignores user:password in the URL; send it as basic auth and keep it out of logs.
            creds = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            self._headers["Authorization"] = "Basic " + base64.b64encode(creds.encode()).decode()
        netloc = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        if parts.port is not None:
            netloc += f":{parts.port}"
        path = parts.path.rstrip("/")
        if not path.endswith("/api/v2/alerts"):
            path += "/api/v2/alerts"
        self.endpoint = urllib.parse.urlunsplit((parts.scheme, netloc, path, "", ""))
        # Proxies from the environment apply, but never to a loopback Alertmanager (as in Go).
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(parts.hostname) else []
        self._opener = urllib.request.build_opener(*handlers)

        self.resolve_after_seconds = float(resolve_after_seconds)
        self.timeout_seconds = float(timeout_seconds)
        self.instance = _default_instance(instance)
        self.extra_labels = extra
        self.retries = retries
        self.backoff_seconds = float(backoff_seconds)
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(RESULTS, 0)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._deadline = math.inf  # monotonic time after which a stopping worker drops what is left
        self._last_log = -math.inf
        self._suppressed = 0

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="alertmanager-notifier", daemon=True)
                self._thread.start()

    def notify_failure(self, domain: str, disk: str, job_type: str, wall_time: float) -> None:
        """Queues one failure; never blocks and never raises (a full queue drops and counts it)."""
        try:
            if self._stopping.is_set():
                self._count("dropped")
                return
            self._queue.put_nowait(_Failure(str(domain), str(disk), str(job_type), wall_time))
        except queue.Full:
            self._count("dropped")
            self._log_error("Alertmanager notification queue full, dropped a failure of %s/%s", domain, disk)
        except Exception:  # noqa: BLE001 - a notification must never break the event path
            self._count("dropped")

    def metric_families(self) -> list:
        family = CounterMetricFamily("libvirt_blockjob_alertmanager_notifications",
                                     "Alerts posted to Alertmanager, by result", labels=("result",))
        with self._lock:
            for result in RESULTS:
                family.add_metric((result,), self._counts[result])
        return [family]

    def stop(self, timeout: float = 5.0) -> None:
        """Stops retrying; what is still queued gets one attempt each until `timeout` runs out."""
        self._deadline = deadline = time.monotonic() + max(0.0, timeout)
        self._stopping.set()
        with contextlib.suppress(queue.Full):  # when full, the worker sees _stopping and drains it anyway
            self._queue.put_nowait(_STOP)
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(queue.Empty):  # whatever could not be sent in time is lost
            while True:
                if isinstance(self._queue.get_nowait(), _Failure):
                    self._count("dropped")

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                item = _STOP
            if item is _STOP:  # a wake-up from stop(), or nothing to do
                if self._stopping.is_set() and self._queue.empty():
                    return
            elif self._stopping.is_set() and time.monotonic() >= self._deadline:
                self._count("dropped")
            else:
                try:
                    self._deliver(item)  # type: ignore[arg-type]
                except Exception:  # noqa: BLE001 - keep the worker alive whatever happens
                    self._count("error")
                    log.exception("unexpected error posting to Alertmanager")

    def _deliver(self, failure: _Failure) -> None:
        body = json.dumps([self.alert(failure)]).encode()
        problem = ""
        for attempt in range(1 + self.retries):
            if attempt and self._stopping.wait(self.backoff_seconds * 2 ** (attempt - 1)):
                break  # stopping: no more retries
            try:
                self._post(body)
                self._count("success")
                return
            except _PermanentError as exc:
                problem = str(exc)
                break
            except (OSError, http.client.HTTPException, ValueError) as exc:
                problem = str(getattr(exc, "reason", None) or exc)
        self._count("error")
        self._log_error("could not post failure of %s/%s to Alertmanager %s: %s",
                        failure.domain, failure.disk, self.endpoint, problem)

    def _post(self, body: bytes) -> None:
        request = urllib.request.Request(self.endpoint, data=body, headers=self._headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout_seconds) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read(500).decode("utf-8", "replace").strip()
            exc.close()
            if 400 <= exc.code < 500 and exc.code not in (408, 429):
                raise _PermanentError(f"HTTP {exc.code}: {detail}") from None
            raise OSError(f"HTTP {exc.code}: {detail}") from None

    def alert(self, failure: _Failure) -> dict:
        """The v2 API alert for one failure (a function of the failure and settings only)."""
        start = failure.wall_time
        if not isinstance(start, (int, float)) or not math.isfinite(start) or start <= 0:
            start = time.time()
        return {
            "labels": {**self.extra_labels, "alertname": ALERTNAME, "severity": "critical", "domain": failure.domain,
                       "disk": failure.disk, "job_type": failure.job_type, "instance": self.instance, "source": SOURCE},
            "annotations": {
                "summary": "A libvirt block job failed.",
                "description": (f"The {failure.job_type} block job on disk {failure.disk} of domain "
                                f"{failure.domain} on {self.instance} failed at {rfc3339(start)}."),
                "runbook_url": RUNBOOK_URL,
            },
            "startsAt": rfc3339(start),
            "endsAt": rfc3339(start + self.resolve_after_seconds),
        }

    def _count(self, result: str) -> None:
        with self._lock:
            self._counts[result] += 1

    def _log_error(self, msg: str, *args: object) -> None:
        """At most one line a minute: a dead Alertmanager must not flood the log."""
        now = time.monotonic()
        with self._lock:
            if now - self._last_log < _LOG_EVERY_SECONDS:
                self._suppressed += 1
                return
            suppressed, self._suppressed, self._last_log = self._suppressed, 0, now
        if suppressed:
            msg += f" ({suppressed} similar messages suppressed)"
        log.warning(msg, *args)
