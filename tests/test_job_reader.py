"""The readers with stand-in domains: reuse across cycles, moving on from a slow call at once,
naming a hung domain only past the call timeout, late answers, bounded readers. The real hung QEMU
is in test_integration_core.py."""

from __future__ import annotations

import threading
import time

import pytest

libvirt = pytest.importorskip("libvirt")

from exporter.libvirt_host import LibvirtHost  # noqa: E402
from exporter.libvirt_readers import JobReaders, Target  # noqa: E402
from exporter.model import DiskInfo, DomainInstance, JobInfo  # noqa: E402
from exporter.selfstats import SelfStats  # noqa: E402
from exporter.state import State  # noqa: E402

JOB = {"type": 1, "cur": 5, "end": 10, "bandwidth": 0}


class FakeDomain:
    def __init__(self, name: str = "x", job: dict | None = None, gate: threading.Event | None = None,
                 delay: float = 0.0) -> None:
        self.name = name
        self.job = job or {}
        self.gate = gate
        self.delay = delay
        self.threads: list[int] = []

    def blockJobInfo(self, disk, flags):  # noqa: N802 - libvirt's name
        self.threads.append(threading.get_ident())
        if self.gate is not None:
            self.gate.wait(10)
        if self.delay:
            time.sleep(self.delay)
        return self.job

    def UUIDString(self):  # noqa: N802
        return f"uuid-{self.name}"

    def ID(self):  # noqa: N802
        return 1


def targets(domains: dict, disks: dict) -> list[Target]:
    return [Target(n, domains[n], d, DomainInstance(f"uuid-{n}", 1)) for n in domains for d in disks[n]]


def named(reads) -> list[tuple[str, str]]:
    return [(r.target.domain, r.target.disk) for r in reads]


@pytest.fixture
def readers():
    """Readers that call the stand-in handles (no connection); poll interval 1 s: patience 0.1 s,
    call timeout 2 s. Records what they name unresponsive."""
    seen: list[frozenset] = []
    pool = JobReaders(None, SelfStats(), call_timeout=2.0, patience=0.1, on_unresponsive=seen.append,
                      wake=lambda: None)
    pool.seen = seen
    yield pool
    pool.close()


def test_one_reader_serves_cycle_after_cycle(readers):
    dom = FakeDomain("a", JOB)
    for _ in range(3):
        reads, complete = readers.read(targets({"a": dom}, {"a": ("vda", "vdb")}))
        assert complete and [(r.target.disk, r.result) for r in reads] == [("vda", JOB), ("vdb", JOB)]
    assert len(set(dom.threads)) == 1 and len(dom.threads) == 6


def test_a_hung_domain_delays_the_others_only_by_the_patience_and_is_named_after_the_timeout(readers):
    gate = threading.Event()
    domains = {"a": FakeDomain("a"), "hung": FakeDomain("hung", gate=gate), "z": FakeDomain("z")}
    disks = {"a": ("vda",), "hung": ("vda", "vdb"), "z": ("vda",)}
    started = time.monotonic()
    reads, complete = readers.read(targets(domains, disks))
    assert time.monotonic() - started < 0.5
    assert named(reads) == [("a", "vda"), ("z", "vda")] and not complete  # both of hung's disks skipped
    assert readers.unresponsive() == frozenset()  # slow, not named yet
    started = time.monotonic()
    reads, complete = readers.read(targets(domains, disks))  # skipped while its call is out
    assert named(reads) == [("a", "vda"), ("z", "vda")] and time.monotonic() - started < 0.1
    time.sleep(2.1)
    readers.read(targets(domains, disks))
    assert readers.unresponsive() == {"hung"} and readers.seen[-1] == {"hung"}  # only the hung one
    gate.set()
    deadline = time.monotonic() + 5
    while readers.outstanding() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert readers.unresponsive() == frozenset() and readers.seen[-1] == frozenset()
    reads, complete = readers.read(targets(domains, disks))
    assert complete and named(reads) == [("a", "vda"), ("hung", "vda"), ("hung", "vdb"), ("z", "vda")]
    assert all(name == frozenset() or name == {"hung"} for name in readers.seen)


def test_a_slow_domain_is_not_named_and_its_late_answer_comes_with_the_next_read(readers):
    domains = {"a": FakeDomain("a"), "slow": FakeDomain("slow", JOB, delay=0.3), "z": FakeDomain("z")}
    disks = {n: ("vda",) for n in domains}
    reads, _ = readers.read(targets(domains, disks))
    assert [r.target.domain for r in reads] == ["a", "z"]
    time.sleep(0.4)
    assert not readers.outstanding() and readers.unresponsive() == frozenset()
    reads, _ = readers.read(targets(domains, disks))
    assert (reads[0].target.domain, reads[0].result) == ("slow", JOB)  # the late answer first
    assert readers.seen == []


def test_many_slow_calls_use_a_bounded_number_of_readers_and_every_answer_arrives(readers):
    domains = {f"d{i}": FakeDomain(f"d{i}", delay=0.15) for i in range(8)}
    disks = {n: ("vda",) for n in domains}
    before = threading.active_count()
    seen, peak = set(), 0
    for _ in range(3):
        seen.update(r.target.domain for r in readers.read(targets(domains, disks))[0])
        peak = max(peak, threading.active_count() - before)
        time.sleep(0.3)
    seen.update(r.target.domain for r in readers.read([])[0])
    assert seen == set(domains)
    assert peak <= 4, peak
    assert readers.unresponsive() == frozenset()


def test_disks_with_a_moving_job_are_read_and_applied_first():
    clock = [1000.0]
    state = State(clock=lambda: clock[0])
    names = ("idle", "crawl", "moving")
    state.replace_inventory({n: [DiskInfo(n, "vda", f"/img/{n}", "qcow2", ())] for n in names})
    state.apply_poll("crawl", "vda", JobInfo("pull", 1, 10, 1), 0.0)
    clock[0] = 1001.0
    state.apply_poll("moving", "vda", JobInfo("pull", 1, 10, 0), 0.0)
    host = LibvirtHost("qemu:///nowhere", state, SelfStats())
    host._readers = JobReaders(None, SelfStats(), 2.0, 0.1, state.set_unresponsive, lambda: None)
    order = []

    class Recording(FakeDomain):
        def blockJobInfo(self, disk, flags):  # noqa: N802
            # What the state shows for "moving" when its own call is made tells whether the
            # first batch was applied before the second was read.
            order.append((self.name, state.snapshot().jobs.get(("moving", "vda")).cur))
            return self.job

    host._domains = {"idle": Recording("idle"),
                     "crawl": Recording("crawl", {"type": 1, "cur": 1, "end": 10, "bandwidth": 1}),
                     "moving": Recording("moving", {"type": 1, "cur": 5, "end": 10, "bandwidth": 0})}
    host._disks_by_domain = {n: ("vda",) for n in names}
    try:
        host._poll_jobs()
    finally:
        host._readers.close()
    assert order == [("moving", 1), ("crawl", 1), ("idle", 5)]


def test_the_sweep_reads_every_idle_disk_within_the_discovery_interval_as_the_list_changes():
    """Round-robin in key order, resumed after the last disk swept: disks that gain or lose a job
    meanwhile do not make the others wait longer than the exported interval."""
    stats = SelfStats()
    host = LibvirtHost("qemu:///nowhere", State(), stats, poll_interval=0.5, call_budget=6)
    disks = [Target(f"d{i:02d}", None, disk, DomainInstance(f"u{i}", i)) for i in range(10) for disk in ("vda", "vdb")]
    last_read = {t.key: 0 for t in disks}
    for cycle in range(1, 41):
        busy = {t.key for t in disks[cycle % 7::9]}  # jobs come and go
        idle = [t for t in disks if t.key not in busy]
        batch = host._sweep(idle, len(busy))
        room = max(1, 3 - len(busy))
        assert len(batch) == min(room, len(idle))
        assert stats.snapshot().discovery_interval == -(-len(idle) // room) * 0.5
        for t in batch:
            last_read[t.key] = cycle
        for key in busy:
            last_read[key] = cycle  # read every cycle while it has a job
        if cycle >= 20:
            assert cycle - min(last_read.values()) < 20, last_read
    unlimited = LibvirtHost("qemu:///nowhere", State(), stats, poll_interval=0.5)
    assert unlimited._sweep(disks, 3) == disks and stats.snapshot().discovery_interval == 0.5


def test_a_binding_surprise_is_an_error_answer_not_a_dead_reader(readers):
    """Anything other than libvirtError from blockJobInfo becomes that disk's error: the reader
    thread lives on and the next read is served."""

    class Odd(FakeDomain):
        def blockJobInfo(self, disk, flags):  # noqa: N802
            if disk == "vdb":
                raise TypeError("binding surprise")
            return super().blockJobInfo(disk, flags)

    doms = {"odd": Odd("odd", JOB)}
    reads, _complete = readers.read(targets(doms, {"odd": ("vda", "vdb")}))
    assert named(reads) == [("odd", "vda"), ("odd", "vdb")]
    assert reads[0].result == JOB and isinstance(reads[1].result, libvirt.libvirtError)
    assert "binding surprise" in str(reads[1].result)
    again, _complete = readers.read(targets(doms, {"odd": ("vda",)}))
    assert named(again) == [("odd", "vda")]


def test_an_unreadable_xml_of_a_running_domain_keeps_its_disks_and_jobs():
    """A failed XMLDesc (not "no domain") must not end the domain's jobs: the next inventory pass
    would bring a running job back as a new one and count its end twice."""
    xml = ("<domain><name>d</name><devices><disk type='file' device='disk'><driver type='qcow2'/>"
           "<source file='/img/top.qcow2'/><target dev='vda'/></disk></devices></domain>")

    class Flaky:
        fail = False

        def name(self):
            return "d"

        def XMLDesc(self, flags):  # noqa: N802
            if self.fail:
                raise libvirt.libvirtError("internal error: try again")
            return xml

        def UUIDString(self):  # noqa: N802
            return "uuid-d"

        def ID(self):  # noqa: N802
            return 1

    dom = Flaky()

    class Conn:
        def listAllDomains(self, flags):  # noqa: N802
            return [dom]

    state = State()
    host = LibvirtHost("qemu:///nowhere", state, SelfStats())
    host._connection.conn = Conn()
    first, _ = host._list_inventory()
    dom.fail = True
    second, instances = host._list_inventory()
    assert second == first and set(instances) == {"d"}
    assert host._disks_by_domain == {"d": ("vda",)}


def _xml(name: str, *layers: str) -> str:
    disks = "".join(f"<disk type='file' device='disk'><driver type='qcow2'/><source file='/img/{name}-{layer}'/>"
                    f"<target dev='vd{chr(97 + i)}'/></disk>" for i, layer in enumerate(layers))
    return f"<domain><name>{name}</name><devices>{disks}</devices></domain>"


class XmlDomain:
    """A domain whose XML can change and whose XMLDesc calls are counted."""

    def __init__(self, name: str, id_: int = 1) -> None:
        self._name, self._id, self.reads, self.xml, self.error = name, id_, 0, _xml(name, "top"), None

    def name(self):
        return self._name

    def XMLDesc(self, flags):  # noqa: N802
        self.reads += 1
        if self.error is not None:
            raise self.error
        return self.xml

    def UUIDString(self):  # noqa: N802
        return f"uuid-{self._name}"

    def ID(self):  # noqa: N802
        return self._id


def test_the_xml_is_re_read_from_the_budget_spread_over_the_cycles_and_a_change_reaches_the_state():
    """The periodic listing reads no known domain's XML; each cycle re-reads the XML of the domains
    read longest ago (once per inventory interval each, at most half of what the jobs leave), and a
    changed disk list (a snapshot's new layer, a new disk: no event) reaches the state."""
    doms = {f"d{i:02d}": XmlDomain(f"d{i:02d}") for i in range(12)}

    class Conn:
        def listAllDomains(self, flags):  # noqa: N802
            return list(doms.values())

    state = State()
    host = LibvirtHost("qemu:///nowhere", state, SelfStats(), poll_interval=1.0, inventory_interval=4.0,
                       call_budget=10)
    host._connection.conn = Conn()
    inventory, instances = host._list_inventory()
    state.replace_inventory(inventory, instances)
    assert all(d.reads == 1 for d in doms.values())
    host._list_inventory(reread=False)
    assert all(d.reads == 1 for d in doms.values())  # known, same run: the XML last read stands

    assert host._xml_share(0) == 3.0  # 12 domains / 4 cycles
    assert host._xml_share(5) == 2.5  # at most half of what the jobs leave
    assert host._xml_share(10) == 0.5  # the jobs take everything: one re-read a cycle still
    unlimited = LibvirtHost("qemu:///nowhere", State(), SelfStats(), inventory_interval=4.0)
    unlimited._xml_read_at = dict(host._xml_read_at)
    assert unlimited._xml_share(0) == 12

    host._reread_xml(3)
    assert sum(d.reads for d in doms.values()) == 12  # none due yet
    for i, name in enumerate(sorted(doms)):  # read 10 s ago, d00 longest ago
        host._xml_read_at[name] = time.monotonic() - 10 - (12 - i)
    doms["d01"].xml = _xml("d01", "top", "extra")  # a new disk
    host._reread_xml(3)
    assert [d.reads for d in doms.values()][:4] == [2, 2, 2, 1]
    assert ("d01", "vdb") in state.snapshot().disks and host._disks_by_domain["d01"] == ("vda", "vdb")

    doms["d03"].error = libvirt.libvirtError("no domain")
    doms["d03"].error.err = (libvirt.VIR_ERR_NO_DOMAIN, 0, "no domain", 0, "", "", "", 0, 0)
    host._connection.alive = lambda: True
    host._reread_xml(3)
    assert host._refresh_domains == {"d03"}  # the next cycle's refresh finds it stopped
    assert [d.reads for d in doms.values()][3:6] == [2, 2, 2]

    # A domain that restarted under the same name is read again by the listing.
    doms["d07"] = XmlDomain("d07", id_=2)
    host._list_inventory(reread=False)
    assert doms["d07"].reads == 1 and sum(d.reads for n, d in doms.items() if n != "d07") == 12 + 3 + 2
