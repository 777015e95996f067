"""exporter/alertmanager.py against the real Alertmanager, and its behaviour when Alertmanager is not."""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from exporter.alertmanager import ALERTNAME, AlertmanagerNotifier, rfc3339
from promlib import alertmanager, free_port, wait_until, webhook_receiver  # noqa: F401


def counts(notifier: AlertmanagerNotifier) -> dict[str, float]:
    (family,) = notifier.metric_families()
    assert family.name == "libvirt_blockjob_alertmanager_notifications"
    assert family.type == "counter"
    return {s.labels["result"]: s.value for s in family.samples if s.name.endswith("_total")}


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@pytest.mark.e2e
def test_failure_reaches_alertmanager(alertmanager, webhook_receiver):
    notifier = AlertmanagerNotifier(alertmanager.url, resolve_after_seconds=120, instance="host1:9478",
                                    extra_labels={"cluster": "lab"})
    notifier.start()
    try:
        wall = time.time() - 1.5
        notifier.notify_failure("dom-1", "vda", "pull", wall)
        alert = alertmanager.wait_for_alert(ALERTNAME, {"domain": "dom-1"}, timeout=10)
    finally:
        notifier.stop()
    assert alert["labels"] == {
        "alertname": "LibvirtBlockJobFailedDirect", "severity": "critical", "domain": "dom-1", "disk": "vda",
        "job_type": "pull", "instance": "host1:9478", "source": "libvirt-blockjob-exporter", "cluster": "lab",
    }
    assert alert["annotations"]["summary"] == "A libvirt block job failed."
    assert "disk vda of domain dom-1" in alert["annotations"]["description"]
    assert alert["annotations"]["runbook_url"].endswith("docs/runbook.md#libvirtblockjobfaileddirect")
    assert abs(parse_time(alert["startsAt"]) - wall) < 0.01
    assert abs(parse_time(alert["endsAt"]) - (wall + 120)) < 0.01
    assert alert["status"]["state"] == "active"
    assert counts(notifier) == {"success": 1, "error": 0, "dropped": 0}
    # And on through Alertmanager's routing, as a receiver would see it.
    hit = webhook_receiver.wait_for_alert(ALERTNAME, {"domain": "dom-1", "disk": "vda"}, timeout=10)
    assert hit["labels"]["instance"] == "host1:9478"


def test_unreachable_alertmanager_neither_blocks_nor_raises():
    notifier = AlertmanagerNotifier(f"http://127.0.0.1:{free_port()}", retries=2, backoff_seconds=0.01,
                                    timeout_seconds=1)
    notifier.start()
    try:
        began = time.perf_counter()
        notifier.notify_failure("dom-1", "vda", "pull", time.time())
        elapsed = time.perf_counter() - began
        assert elapsed < 0.010, f"notify_failure took {elapsed * 1000:.1f} ms"
        wait_until(lambda: counts(notifier)["error"] == 1, 10, "the error to be counted")
    finally:
        notifier.stop()
    assert counts(notifier) == {"success": 0, "error": 1, "dropped": 0}


def test_hanging_alertmanager_fills_the_queue_and_drops():
    """A server that accepts connections but never answers: the queue fills, callers never wait."""
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(64)
        port = blackhole.getsockname()[1]
        notifier = AlertmanagerNotifier(f"http://127.0.0.1:{port}", queue_size=2, timeout_seconds=2, retries=0)
        notifier.start()
        slowest = 0.0
        for i in range(10):
            began = time.perf_counter()
            notifier.notify_failure(f"dom-{i}", "vda", "pull", time.time())
            slowest = max(slowest, time.perf_counter() - began)
        assert slowest < 0.010
        # One in flight, two queued, the rest dropped (the worker may not have taken the first yet).
        assert counts(notifier)["dropped"] in (7, 8)
        began = time.monotonic()
        notifier.stop(timeout=0.5)
        assert time.monotonic() - began < 1.5
    result = counts(notifier)
    assert result["success"] == 0
    assert result["dropped"] + result["error"] <= 10


class _Recorder(BaseHTTPRequestHandler):
    status = 200
    requests: list[tuple[dict, object]] = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).requests.append((dict(self.headers), json.loads(body)))
        self.send_response(type(self).status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture
def recorder():
    handler = type("Handler", (_Recorder,), {"requests": [], "status": 200})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield handler, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_payload_path_prefix_and_basic_auth(recorder):
    handler, port = recorder
    notifier = AlertmanagerNotifier(f"http://user:s%3Acret@127.0.0.1:{port}/am/", resolve_after_seconds=300,
                                    instance=":9478")
    assert notifier.endpoint == f"http://127.0.0.1:{port}/am/api/v2/alerts"
    notifier.start()
    try:
        notifier.notify_failure("web", "vdb", "copy", 1_700_000_000.25)
        wait_until(lambda: handler.requests, 5, "the post")
    finally:
        notifier.stop()
    headers, body = handler.requests[0]
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"user:s:cret").decode()
    assert headers["Content-Type"] == "application/json"
    (alert,) = body
    assert alert["startsAt"] == "2023-11-14T22:13:20.250Z"
    assert alert["endsAt"] == "2023-11-14T22:18:20.250Z"
    assert alert["labels"]["instance"] == f"{socket.gethostname()}:9478"
    assert alert["labels"]["job_type"] == "copy"
    assert counts(notifier)["success"] == 1


def test_rejected_alert_is_not_retried_and_errors_are_logged_once(recorder, caplog):
    handler, port = recorder
    handler.status = 400
    notifier = AlertmanagerNotifier(f"http://127.0.0.1:{port}", retries=3, backoff_seconds=0.01)
    notifier.start()
    with caplog.at_level(logging.WARNING, logger="exporter.alertmanager"):
        try:
            for i in range(3):
                notifier.notify_failure(f"dom-{i}", "vda", "pull", time.time())
            wait_until(lambda: counts(notifier)["error"] == 3, 5, "three errors")
        finally:
            notifier.stop()
    assert len(handler.requests) == 3  # one attempt each: a 400 will not get better
    assert len([r for r in caplog.records if r.name == "exporter.alertmanager"]) == 1


def test_server_errors_are_retried(recorder):
    handler, port = recorder
    handler.status = 503
    notifier = AlertmanagerNotifier(f"http://127.0.0.1:{port}", retries=2, backoff_seconds=0.01)
    notifier.start()
    try:
        notifier.notify_failure("dom", "vda", "pull", time.time())
        wait_until(lambda: counts(notifier)["error"] == 1, 5, "the error")
    finally:
        notifier.stop()
    assert len(handler.requests) == 3


def test_notify_after_stop_is_dropped():
    notifier = AlertmanagerNotifier("http://127.0.0.1:9")
    notifier.start()
    notifier.stop()
    notifier.notify_failure("dom", "vda", "pull", time.time())
    assert counts(notifier) == {"success": 0, "error": 0, "dropped": 1}


@pytest.mark.parametrize("kwargs", [
    {"url": "ftp://am:9093"},
    {"url": "localhost:9093"},
    {"url": "http://am:9093", "extra_labels": {"severity": "info"}},
    {"url": "http://am:9093", "extra_labels": {"bad-name": "x"}},
    {"url": "http://am:9093", "queue_size": 0},
])
def test_invalid_settings_fail_at_construction(kwargs):
    with pytest.raises(ValueError):
        AlertmanagerNotifier(**kwargs)


def test_rfc3339():
    assert rfc3339(0) == "1970-01-01T00:00:00.000Z"
