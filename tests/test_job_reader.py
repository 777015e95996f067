"""The poller's reader thread with stand-in domains: reuse across cycles, walking away from a hung
call, and the hung domain coming back. The real hung QEMU is in test_integration_core.py."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("libvirt")

from exporter.libvirt_host import LibvirtHost, _JobInfoReader, _Target  # noqa: E402
from exporter.model import DomainInstance  # noqa: E402
from exporter.selfstats import SelfStats  # noqa: E402
from exporter.state import State  # noqa: E402


class FakeDomain:
    def __init__(self, job: dict | None = None, gate: threading.Event | None = None) -> None:
        self.job = job or {}
        self.gate = gate
        self.threads: list[str] = []

    def blockJobInfo(self, disk, flags):  # noqa: N802 - libvirt's name
        self.threads.append(threading.current_thread().name + str(threading.get_ident()))
        if self.gate is not None:
            self.gate.wait(10)
        return self.job


def target(name, dom, disk):
    return _Target(name, dom, disk, DomainInstance(f"uuid-{name}", 1))


def named(reads):
    return [(r.target.domain, r.target.disk) for r in reads]


def test_one_reader_serves_cycle_after_cycle():
    answered = []
    reader = _JobInfoReader(answered.append)
    reader.start()
    dom = FakeDomain({"type": 1, "cur": 1, "end": 2, "bandwidth": 0})
    try:
        for _ in range(3):
            results: list = []
            assert reader.read([target("a", dom, "vda"), target("a", dom, "vdb")], 1.0, results) is None
            assert [(r.target.domain, r.target.disk, r.result) for r in results] == [("a", "vda", dom.job),
                                                                                     ("a", "vdb", dom.job)]
        assert len(set(dom.threads)) == 1 and len(dom.threads) == 6
    finally:
        reader.stop()
        reader.join(2)
    assert not reader.is_alive() and answered == []


def test_a_hung_call_is_left_behind_and_reported_when_it_answers():
    gate = threading.Event()
    answered = []
    reader = _JobInfoReader(answered.append)
    reader.start()
    results: list = []
    started = time.monotonic()
    stuck = reader.read([target("ok", FakeDomain(), "vda"), target("hung", FakeDomain(gate=gate), "vda"),
                         target("later", FakeDomain(), "vda")], 0.2, results)
    assert stuck == 1 and named(results) == [("ok", "vda")]
    assert time.monotonic() - started < 2
    gate.set()
    reader.join(5)
    assert not reader.is_alive() and answered == ["hung"]


def test_the_poller_skips_a_hung_domain_until_it_answers_and_reads_the_rest():
    gate = threading.Event()
    host = LibvirtHost("qemu:///nowhere", State(), SelfStats(), poll_interval=0.1)  # call timeout 1 s
    hung = FakeDomain(gate=gate)
    host._domains = {"a": FakeDomain(), "hung": hung, "z": FakeDomain()}
    host._disks_by_domain = {"a": ("vda",), "hung": ("vda", "vdb"), "z": ("vda",)}
    first = host._read_job_infos([target(n, host._domains[n], d) for n in ("a", "hung", "z")
                                  for d in host._disks_by_domain[n]])
    assert named(first) == [("a", "vda"), ("z", "vda")]  # both of hung's disks skipped
    assert host.unresponsive_domains() == 1
    abandoned = [t for t in threading.enumerate() if t.name == "blockjob-reader"]
    gate.set()
    deadline = time.monotonic() + 5
    while host.unresponsive_domains() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert host.unresponsive_domains() == 0
    second = host._read_job_infos([target(n, host._domains[n], d) for n in ("a", "hung", "z")
                                   for d in host._disks_by_domain[n]])
    assert named(second) == [("a", "vda"), ("hung", "vda"), ("hung", "vdb"), ("z", "vda")]
    host._reader.stop()
    for thread in abandoned:
        thread.join(2)


def test_disks_with_a_moving_job_are_read_and_applied_first():
    from exporter.model import DiskInfo, JobInfo

    clock = [1000.0]
    state = State(clock=lambda: clock[0])
    names = ("idle", "crawl", "moving")
    state.replace_inventory({n: [DiskInfo(n, "vda", f"/img/{n}", "qcow2", ())] for n in names})
    state.apply_poll("crawl", "vda", JobInfo("pull", 1, 10, 1), 0.0)
    clock[0] = 1001.0
    state.apply_poll("moving", "vda", JobInfo("pull", 1, 10, 0), 0.0)
    host = LibvirtHost("qemu:///nowhere", state, SelfStats())
    order = []

    class Recording(FakeDomain):
        def __init__(self, name, job):
            super().__init__(job)
            self.name = name

        def UUIDString(self):  # noqa: N802
            return f"uuid-{self.name}"

        def ID(self):  # noqa: N802
            return 1

        def blockJobInfo(self, disk, flags):  # noqa: N802
            # What the state shows for "moving" when its own call is made tells whether the
            # first batch was applied before the second was read.
            order.append((self.name, state.snapshot().jobs.get(("moving", "vda")).cur))
            return self.job

    host._domains = {"idle": Recording("idle", {}),
                     "crawl": Recording("crawl", {"type": 1, "cur": 1, "end": 10, "bandwidth": 1}),
                     "moving": Recording("moving", {"type": 1, "cur": 5, "end": 10, "bandwidth": 0})}
    host._disks_by_domain = {n: ("vda",) for n in names}
    host._poll_jobs()
    assert order == [("moving", 1), ("crawl", 1), ("idle", 5)]
    host._reader.stop()
