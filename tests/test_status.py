"""The status document (exporter.status), the rate the state measures for it, and its HTTP routes;
no VM and no browser (tests/test_status_page.py has those)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import re
import textwrap
import urllib.parse
from datetime import datetime, timezone
from types import MappingProxyType

import bcrypt
import pytest

from exporter import status as statusmod
from exporter.model import BackingImage, ConnectionEvent, DiskInfo, JobInfo, Snapshot
from exporter.policy.decide import DiskSpace
from exporter.policy.engine import PolicyEngine
from exporter.selfstats import SelfStats
from exporter.state import RECENT_OUTCOMES, State
from exporter.status import MAX_BYTES, StatusSource, build_status, to_json
from exporter.status_page import CONTENT_SECURITY_POLICY, SCRIPT, STYLE
from exporter.web import WebServer
from exporter.webconfig import load_web_config

MiB = 1024 * 1024
T0 = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def wall(self) -> float:
        return self.now + T0

    def mono(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def state(clock: Clock) -> State:
    s = State(clock=clock.wall, monotonic=clock.mono)
    s.apply(ConnectionEvent(True, clock.mono(), clock.wall()))
    return s


def disk(domain="dom", target="vda", depth=2) -> DiskInfo:
    return DiskInfo(domain, target, f"/img/{domain}-{target}.qcow2", "qcow2",
                    tuple(BackingImage(f"/img/b{i}.qcow2", "qcow2") for i in range(depth)))


def poll(state: State, clock: Clock, cur: int, end: int = 100 * MiB, domain="dom", target="vda", bandwidth=0,
         job_type="pull"):
    state.apply_poll(domain, target, JobInfo(job_type, cur, end, bandwidth), clock.mono() - 0.01)


def doc_of(state: State, clock: Clock, poll_interval: float = 1.0, **kw) -> dict:
    return build_status(state.snapshot(), now=clock.wall(), uri="qemu:///system", read_only=True,
                        poll_interval=poll_interval, **kw)


# ---------------------------------------------------------------------------- rate, ETA, stall


def test_rate_needs_two_samples_and_follows_the_cursor(state, clock):
    state.update_domain("dom", [disk()])
    poll(state, clock, 0)
    assert state.snapshot().jobs[("dom", "vda")].rate is None
    clock.now += 1.0
    poll(state, clock, 10 * MiB)
    assert state.snapshot().jobs[("dom", "vda")].rate == pytest.approx(10 * MiB)
    for _ in range(20):  # the job slows to 2 MiB/s: the rate follows within seconds
        clock.now += 1.0
        poll(state, clock, state.snapshot().jobs[("dom", "vda")].cur + 2 * MiB)
    assert state.snapshot().jobs[("dom", "vda")].rate == pytest.approx(2 * MiB, rel=0.01)
    job = doc_of(state, clock)["jobs"]["shown"][0]
    assert job["eta_seconds"] == pytest.approx((100 * MiB - 50 * MiB) / (2 * MiB), rel=0.01)
    assert job["percent"] == 50.0 and not job["stalled"]


def test_rate_is_smoothed_over_chunky_progress(state, clock):
    """QEMU copies in chunks: a fast poll sees 1 MiB, nothing, 1 MiB, ... The rate stays near 2.5 MiB/s."""
    state.update_domain("dom", [disk()])
    poll(state, clock, 0)
    cur = 0
    for i in range(40):
        clock.now += 0.2
        if i % 2:
            cur += MiB
        poll(state, clock, cur)
    assert state.snapshot().jobs[("dom", "vda")].rate == pytest.approx(2.5 * MiB, rel=0.15)


def test_a_cursor_that_goes_back_starts_a_new_measurement(state, clock):
    state.update_domain("dom", [disk()])
    poll(state, clock, 0)
    clock.now += 1
    poll(state, clock, 50 * MiB)
    clock.now += 1
    poll(state, clock, 5 * MiB)  # another pull took the disk between two polls
    assert state.snapshot().jobs[("dom", "vda")].rate is None


def test_a_still_cursor_shows_stalled_with_no_eta(state, clock):
    state.update_domain("dom", [disk()])
    poll(state, clock, 0)
    clock.now += 1
    poll(state, clock, MiB, bandwidth=1)
    clock.now += 4.9
    assert not doc_of(state, clock)["jobs"]["shown"][0]["stalled"]
    clock.now += 0.2  # more than STALL_MIN_SECONDS (and 3 poll intervals) without a move
    job = doc_of(state, clock)["jobs"]["shown"][0]
    assert job["stalled"] and job["rate"] == 0.0 and job["eta_seconds"] is None and job["bandwidth"] == 1
    assert doc_of(state, clock, poll_interval=3.0)["jobs"]["shown"][0]["stalled"] is False  # 3 intervals: 9 s


def test_a_ready_mirror_is_not_stalled(state, clock):
    state.update_domain("dom", [disk()])
    poll(state, clock, 100, end=100, job_type="copy")
    clock.now += 60
    job = doc_of(state, clock)["jobs"]["shown"][0]
    assert job["ready"] and not job["stalled"] and job["percent"] == 100.0 and job["eta_seconds"] == 0.0


# ---------------------------------------------------------------------------- sections


def test_outcomes_newest_first_and_bounded(state, clock):
    from exporter.model import BlockJobEvent

    for i in range(RECENT_OUTCOMES + 5):
        clock.now += 1
        state.apply(BlockJobEvent(f"d{i:03d}", "vda", "pull", "failed" if i % 3 == 0 else "completed",
                                  "block_job_2", clock.mono(), clock.wall()))
    snap = state.snapshot()
    assert len(snap.recent_outcomes) == RECENT_OUTCOMES
    assert snap.recent_outcomes[0].domain == f"d{RECENT_OUTCOMES + 4:03d}"
    outcomes = doc_of(state, clock)["outcomes"]
    assert [o["domain"] for o in outcomes["recent"]] == [f"d{i:03d}" for i in range(54, 34, -1)]
    assert outcomes["recent"][0] == {"domain": "d054", "disk": "vda", "type": "pull", "outcome": "failed",
                                     "inferred": False, "time": clock.wall()}
    assert outcomes["totals"] == {"completed": 36, "failed": 19, "canceled": 0}


def test_deepest_chains_first(state, clock):
    state.replace_inventory({f"d{i}": [disk(f"d{i}", depth=i % 7)] for i in range(30)})
    chains = doc_of(state, clock)["chains"]
    assert chains["with_backing"] == 30 - 5  # depth 0 for d0, d7, d14, d21, d28
    assert [(c["domain"], c["depth"]) for c in chains["deepest"]] == [
        ("d13", 6), ("d20", 6), ("d27", 6), ("d6", 6), ("d12", 5), ("d19", 5), ("d26", 5), ("d5", 5),
        ("d11", 4), ("d18", 4)]
    assert chains["deepest"][0]["base"] == "/img/b5.qcow2" and chains["deepest"][0]["source"] == "/img/d13-vda.qcow2"


def test_connection_and_exporter_health(state, clock):
    stats = SelfStats()
    stats.calls("blockJobInfo", 10, errors=2)
    stats.calls("XMLDesc", 3, errors=1)
    stats.poll_cycle(0.004, clock.wall())
    stats.discovery(20.0)
    state.set_unresponsive(frozenset({"hung"}))
    doc = doc_of(state, clock, stats=stats.snapshot(), version="9.9")
    assert doc["version"] == "9.9"
    assert doc["connection"] == {"connected": True, "uri": "qemu:///system", "mode": "read-only", "domains": 0,
                                 "disks": 0, "unresponsive": ["hung"], "unresponsive_total": 1}
    x = doc["exporter"]
    assert (x["last_poll_duration"], x["discovery_interval"], x["libvirt_calls"], x["libvirt_errors_total"]) == (
        0.004, 20.0, 13, 3)
    assert x["libvirt_errors"] == {"blockJobInfo": 2, "XMLDesc": 1}
    assert doc["policy"] is None


def test_policy_section_from_the_engines_last_plan(tmp_path, state, clock):
    path = tmp_path / "policy.yml"
    path.write_text(textwrap.dedent("""\
        rules:
          - name: flatten
            match: {domain: "web-*"}
            when: {min_backing_depth: 1}
            action: {pull: {}}
        limits:
          max_concurrent: 1
        """))
    monday_2am = datetime(2025, 1, 6, 2, 0, tzinfo=timezone.utc).timestamp()
    engine = PolicyEngine(str(path), enforcing=False, host=None, clock=lambda: monday_2am,
                          space=lambda _disk, _base: DiskSpace(bytes_to_copy=1, free_bytes=1 << 40))
    assert build_status(state.snapshot(), now=0, uri="u", read_only=True, poll_interval=1,
                        policy=engine)["policy"] == {"enforcing": False, "reload_ok": True, "evaluated": None}
    state.replace_inventory({f"web-{i}": [disk(f"web-{i}")] for i in range(3)} | {"db": [disk("db")]})
    engine.evaluate_and_act(state.snapshot())
    p = doc_of(state, clock, policy=engine)["policy"]
    assert p["enforcing"] is False and p["evaluated"] == monday_2am and p["in_window"] is True
    assert p["rules"] == [{"name": "flatten", "candidates": 3, "deferred": {"concurrency": 2, "dry_run": 1}}]
    assert p["deferred_total"] == 3 and p["starting"] == 0
    assert {(d["domain"], d["reason"], d["would"]) for d in p["deferred"]} == {
        ("web-0", "dry_run", "start"), ("web-1", "concurrency", None), ("web-2", "concurrency", None)}


# ---------------------------------------------------------------------------- bounds


def test_the_document_is_bounded_whatever_the_host_holds():
    """Thousands of jobs, disks and outcomes whose names are long runs of the characters JSON
    escapes most expensively: the document keeps its row bounds and stays under MAX_BYTES."""
    from exporter.model import ActiveJob, OutcomeRecord

    long = "\x01" * 5000
    names = [f"{i}{long}" for i in range(3000)]
    jobs = {(n, n): ActiveJob(n, n, "pull", 1, 2, 3, False, 1.0, 1.0, rate=1.0) for n in names}
    disks = {(n, n): DiskInfo(n, n, long, "qcow2", tuple(BackingImage(long, "qcow2") for _ in range(20)))
             for n in names}
    outcomes = tuple(OutcomeRecord(n, n, "pull", "failed", False, 1.0) for n in names[:50])
    snap = Snapshot(connected=True, disks=MappingProxyType(disks), jobs=MappingProxyType(jobs),
                    outcomes=MappingProxyType({}), inferred_outcomes=MappingProxyType({}),
                    running_domains=frozenset(names), version=1, unresponsive_domains=frozenset(names),
                    recent_outcomes=outcomes)
    stats = SelfStats()
    for i in range(100):
        stats.calls(f"method{i}{long}", 1, errors=1)
    doc = build_status(snap, now=2.0, uri="qemu:///" + long, read_only=True, poll_interval=1.0,
                       stats=stats.snapshot())
    body = to_json(doc)
    assert len(body) <= MAX_BYTES, len(body)
    assert json.loads(body) == doc
    assert len(doc["jobs"]["shown"]) == statusmod.MAX_JOBS and doc["jobs"]["total"] == 3000
    assert len(doc["chains"]["deepest"]) == statusmod.MAX_CHAINS and doc["chains"]["with_backing"] == 3000
    assert len(doc["outcomes"]["recent"]) == statusmod.MAX_OUTCOMES
    assert len(doc["connection"]["unresponsive"]) == statusmod.MAX_UNRESPONSIVE
    assert len(doc["exporter"]["libvirt_errors"]) == statusmod.MAX_ERROR_METHODS
    assert all(len(j["domain"]) == statusmod.MAX_NAME_CHARS for j in doc["jobs"]["shown"])
    assert doc["jobs"]["shown"][0]["domain"].endswith("\u2026")


def test_status_source_builds_at_most_twice_a_second(state, clock):
    ticks = iter([0.0, 0.1, 0.4, 0.6, 0.7])
    source = StatusSource(state, SelfStats(), uri="u", read_only=True, poll_interval=1.0, clock=clock.wall,
                          monotonic=lambda: next(ticks))
    first = source.json()
    state.update_domain("dom", [disk()])
    poll(state, clock, 1)
    assert source.json() is first and source.json() is first  # 0.1 s, 0.4 s
    fresh = source.json()  # 0.6 s
    assert fresh is not first and json.loads(fresh)["jobs"]["total"] == 1


# ---------------------------------------------------------------------------- HTTP


@contextlib.contextmanager
def serving(status=None, web_config=None):
    ws = WebServer("127.0.0.1:0", "/metrics", lambda accept, names=(): (b"", "text/plain"), web_config=web_config,
                   version="1.0", status=status)
    ws.start()
    try:
        yield ws
    finally:
        ws.shutdown()


def get(ws, path, method="GET", headers=None):
    host, port = ws.bound_address
    c = http.client.HTTPConnection(host, port, timeout=10)
    try:
        c.request(method, path, headers=headers or {})
        r = c.getresponse()
        return r, r.read()
    finally:
        c.close()


def test_status_json_route(state, clock):
    source = StatusSource(state, SelfStats(), uri="qemu:///system", read_only=True, poll_interval=1.0)
    with serving(source.json) as ws:
        r, body = get(ws, "/status.json")
        assert r.status == 200 and r.getheader("Content-Type") == "application/json"
        assert r.getheader("Cache-Control") == "no-store" and r.getheader("X-Content-Type-Options") == "nosniff"
        assert json.loads(body)["connection"]["connected"] is True
        r, body = get(ws, "/status.json", method="HEAD")
        assert r.status == 200 and body == b""
        assert get(ws, "/status.json", method="POST")[0].status == 405  # nothing over HTTP acts


def test_status_json_is_404_without_a_source_and_500_when_it_fails():
    with serving() as ws:
        assert get(ws, "/status.json")[0].status == 404

    def broken() -> bytes:
        raise RuntimeError("boom")

    with serving(broken) as ws:
        r, body = get(ws, "/status.json")
        assert r.status == 500 and b"status" in body


def test_page_is_static_and_its_policy_allows_only_its_own_script_and_style():
    with serving(lambda: b"{}") as ws:
        r, body = get(ws, "/")
    page = body.decode()
    csp = r.getheader("Content-Security-Policy")
    assert csp == CONTENT_SECURITY_POLICY
    for block, tag in ((SCRIPT, "script"), (STYLE, "style")):
        assert f"<{tag}>{block}</{tag}>" in page
        digest = base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()
        assert f"{tag}-src 'sha256-{digest}'" in csp
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp.split("; ")  # no clickjacking under another site's page
    assert page.count("<script") == 1 and "src=" not in re.sub(r"<script>.*</script>", "", page, flags=re.S)
    assert "innerHTML" not in SCRIPT and "insertAdjacentHTML" not in SCRIPT and "document.write" not in SCRIPT
    assert '<a href="./status.json">' in page and '<a href="./metrics">' in page


@pytest.mark.parametrize("telemetry_path", ["/metrics", "/x/prom", "/a:b"])  # a:b alone is a scheme
def test_footer_links_are_relative_like_the_fetch(telemetry_path):
    """Behind a reverse proxy serving the page at /hv1/, the links keep the prefix."""
    ws = WebServer("127.0.0.1:0", telemetry_path, lambda accept, names=(): (b"", "text/plain"))
    footer = re.search(r"<footer>.*</footer>", ws.landing_page.decode(), re.S).group(0)
    hrefs = re.findall(r'<a href="([^"]*)">', footer)
    assert [urllib.parse.urljoin("https://proxy/hv1/", href) for href in hrefs] == [
        f"https://proxy/hv1{telemetry_path}", "https://proxy/hv1/status.json", "https://proxy/hv1/-/healthy"]


def test_page_and_status_json_need_the_same_login_as_metrics(tmp_path):
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    config = tmp_path / "web.yml"
    config.write_text(f"basic_auth_users:\n  alice: {hashed}\n")
    with serving(lambda: b"{}", load_web_config(str(config))) as ws:
        login = {"Authorization": "Basic " + base64.b64encode(b"alice:pw").decode()}
        for path in ("/", "/status.json", "/metrics"):
            assert get(ws, path)[0].status == 401
            assert get(ws, path, headers=login)[0].status == 200
