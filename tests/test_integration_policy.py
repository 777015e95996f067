"""The pull policy on the real stack: the exporter subprocess with ``--policy.file`` and real VMs.

Every policy here matches only this test's own domains (exact names, or a label holding a random
token) and its own image directories. ``max_concurrent`` counts every job on the host, so tests
that do not test concurrency set it far above anything a shared host runs, and the concurrency
test adds the foreign jobs it finds to its limit.

Windows use "host local time", which for the exporter is whatever ``TZ`` says. The window tests
run the exporter with a ``TZ`` offset (POSIX allows seconds) that puts a local minute boundary a
few seconds ahead, so a window opens or closes on the real clock without waiting up to a minute.
"""

from __future__ import annotations

import math
import re
import signal
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

import vmlib
from exporterlib import Exporter, free_port, job_labels, run_exporter_command

pytestmark = pytest.mark.libvirt

MiB = 1024 * 1024
PLENTY = 100_000  # max_concurrent for tests that are not about concurrency (host-wide count)
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


# ------------------------------------------------------------------------------------ helpers


@pytest.fixture
def exporter(exporter):
    """conftest's, with a 1 s poll, returning once connected and polled once (``connected=False`` not to)."""
    def make(*args: str, connected: bool = True, **kw) -> Exporter:
        kw.setdefault("poll_interval", "1s")
        return exporter(*args, connected=connected, **kw)
    return make


def token() -> str:
    return uuid.uuid4().hex[:6]


def write_policy(path: Path, rules: list[dict], **limits) -> Path:
    limits.setdefault("max_concurrent", PLENTY)
    path.write_text(yaml.safe_dump({"rules": rules, "limits": limits}, sort_keys=False))
    return path


def rule(name: str, domain: str, **pull) -> dict:
    return {"name": name, "match": {"domain": domain, "disk": "vda"}, "action": {"pull": pull}}


def policy_args(path: Path, enforce: bool = True) -> list[str]:
    return [f"--policy.file={path}", *(["--policy.enforce"] if enforce else [])]


def deferred(ex: Exporter, rule_name: str, reason: str) -> float | None:
    return ex.value("libvirt_blockjob_policy_deferred", {"rule": rule_name, "reason": reason})


def started_total(ex: Exporter, rule_name: str) -> float | None:
    return ex.value("libvirt_blockjob_policy_started_total", {"rule": rule_name})


def jobs_now(vms) -> dict[str, dict | None]:
    """``virsh blockjob --info`` of every VM's vda, side by side (the independent view)."""
    with ThreadPoolExecutor(max_workers=max(1, len(vms))) as pool:
        return dict(zip([vm.name for vm in vms], pool.map(lambda vm: vmlib.job_info(vm), vms)))


def assert_no_job_for(vms, seconds: float, ex: Exporter | None = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        busy = {name: info for name, info in jobs_now(vms).items() if info}
        assert not busy, f"unexpected block jobs: {busy}"
        if ex is not None:
            scrape = ex.scrape()
            for vm in vms:
                assert scrape.get("libvirt_blockjob_cursor", job_labels(vm.name)) is None
        time.sleep(0.2)


def log_times(ex: Exporter, pattern: str, utc_offset: int | None = None) -> list[tuple[float, str]]:
    """(Unix time, line) of exporter log lines matching ``pattern`` (text log format).

    The log's times are the exporter's local time: ``utc_offset`` when it ran under a ``TZ`` of
    ours, else the same zone as this process.
    """
    out = []
    for line in ex.output().splitlines():
        m = re.match(r"ts=(\S+ \S+) ", line)
        if m and re.search(pattern, line):
            local = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
            if utc_offset is None:
                ts = local.timestamp()
            else:
                ts = local.replace(tzinfo=timezone.utc).timestamp() - utc_offset
            out.append((ts, line))
    return out


def wait_log(ex: Exporter, pattern: str, utc_offset: int | None = None, timeout: float = 5.0):
    """``log_times`` once at least one line matches (the exporter logs some events after acting)."""
    return vmlib.wait_for(lambda: log_times(ex, pattern, utc_offset), timeout=timeout, what=f"log line {pattern!r}")


def libvirt_client_readonly(pid: int) -> bool | None:
    """Whether libvirtd sees the client of process ``pid`` as read-only (``virt-admin``), or None."""
    listing = subprocess.run(["virt-admin", "srv-clients-list", "libvirtd"], capture_output=True, text=True)
    assert listing.returncode == 0, listing.stderr
    for line in listing.stdout.splitlines():
        fields = line.split()
        if not fields or not fields[0].isdigit():
            continue
        info = subprocess.run(["virt-admin", "client-info", "libvirtd", fields[0]], capture_output=True, text=True)
        values = dict(l.split(":", 1) for l in info.stdout.splitlines() if ":" in l)
        values = {k.strip(): v.strip() for k, v in values.items()}
        if values.get("unix_process_id") == str(pid):
            return values.get("readonly") == "yes"
    return None


@dataclass(frozen=True)
class Sample:
    t: float  # Unix time the sample was complete
    virsh: frozenset  # our domains with a job, per virsh
    exporter: frozenset  # our domains with a job, per the exporter's per-job gauges
    active_jobs: float  # libvirt_blockjob_active_jobs (every job on the host)
    synced: bool  # the exporter was connected and had polled, so active_jobs is meaningful


class JobSampler(vmlib.Sampler):
    """Samples virsh and the exporter together, every ``interval``."""

    def __init__(self, ex: Exporter, vms, interval: float = 0.1) -> None:
        super().__init__(interval)
        self.ex, self.vms = ex, list(vms)
        self._pool = ThreadPoolExecutor(max_workers=len(self.vms) + 1)

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._pool.shutdown()

    def take(self) -> Sample:
        names = [vm.name for vm in self.vms]
        scraping = self._pool.submit(self.ex.scrape)
        infos = list(self._pool.map(vmlib.job_info, self.vms))
        scrape = scraping.result()
        return Sample(
            t=time.time(),
            virsh=frozenset(n for n, info in zip(names, infos) if info),
            exporter=frozenset(n for n in names if scrape.get("libvirt_blockjob_cursor", job_labels(n)) is not None),
            active_jobs=scrape.get("libvirt_blockjob_active_jobs") or 0.0,
            synced=scrape.get("libvirt_blockjob_up") == 1
            and (scrape.get("libvirt_blockjob_poll_cycles_total") or 0) >= 1,
        )

    def transitions(self) -> tuple[list[tuple[float, str]], list[tuple[float, str]]]:
        """(starts, ends) seen by virsh: (time of the first sample showing the change, domain)."""
        starts, ends = [], []
        before: frozenset = frozenset()
        for s in self.samples:
            starts += [(s.t, n) for n in sorted(s.virsh - before)]
            ends += [(s.t, n) for n in sorted(before - s.virsh)]
            before = s.virsh
        return starts, ends


def shifted_tz(moment: float, local_hhmmss: tuple[int, int, int]) -> tuple[str, int]:
    """A POSIX ``TZ`` under which the Unix time ``moment`` reads ``local_hhmmss``; and its offset.

    The offset keeps within +-12 h and has whole seconds, so the local date is a plain shift.
    """
    h, m, s = local_hhmmss
    offset = (h * 3600 + m * 60 + s) - int(moment) % 86400
    offset = (offset + 43200) % 86400 - 43200
    sign = "-" if offset >= 0 else "+"  # POSIX: the sign is west of Greenwich
    a = abs(offset)
    return f"LBJ{sign}{a // 3600}:{a % 3600 // 60:02d}:{a % 60:02d}", offset


def local_weekday(moment: float, offset: int) -> str:
    return DAYS[datetime.fromtimestamp(moment + offset, timezone.utc).weekday()]


def exporter_on_shifted_clock(exporter, local_hhmmss, write_policy_for, ready, vm, lead: float = 10.0,
                              margin: float = 1.5):
    """Start an enforcing exporter whose local clock reads ``local_hhmmss`` about ``lead`` s from now.

    ``write_policy_for(moment, offset)`` writes the policy, ``ready(ex)`` waits for the state to
    check before that moment. A slow start (a busy host) is retried with a longer lead, so the
    moment is still ahead once the exporter is ready; a pull the given up exporter started on
    ``vm`` is aborted first. Returns (exporter, moment, offset).
    """
    for _ in range(3):
        moment = math.ceil(time.time() + lead)
        tz, offset = shifted_tz(moment, local_hhmmss)
        path = write_policy_for(moment, offset)
        began = time.time()
        ex = exporter(*policy_args(path), env={"TZ": tz})
        ready(ex)
        if moment - time.time() > margin:
            return ex, moment, offset
        ex.stop()
        if vmlib.job_info(vm) is not None:
            vmlib.abort(vm)
        lead = time.time() - began + 8
    pytest.fail("the exporter was never ready in time for the window (host too slow?)")


# ------------------------------------------------------------------------------------ 1. concurrency


def test_max_concurrent_two_of_four_and_a_freed_slot_is_used_at_once(vm_factory, exporter, tmp_path):
    tok = token()
    shared = vmlib.make_chain(vm_factory.images_dir(f"base{tok}"), 0, data_mib=24, size_mib=32)[0]
    vms = [vm_factory.create(f"c{tok}-{i}", depth=2, base=shared, data_mib=24, size_mib=32, paused=True)
           for i in range(4)]
    name = "flatten-deep-chains"
    glob = f"lbje-test-*-c{tok}-?"

    def policy(max_concurrent: int, depth: int) -> Path:
        return write_policy(tmp_path / "policy.yml", [{**rule(name, glob, bandwidth="8MiB/s"),
                                                       "when": {"min_backing_depth": depth}}],
                            max_concurrent=max_concurrent)

    # Matches nothing yet (our chains have depth 2): count the host's jobs first, then leave
    # exactly two slots for ours and reload, so little can change in between.
    ex = exporter(*policy_args(policy(1, 3)))
    assert libvirt_client_readonly(ex.proc.pid) is False  # enforcing: read-write
    foreign = int(ex.value("libvirt_blockjob_active_jobs"))
    limit = 2 + foreign
    policy(limit, 2)
    with JobSampler(ex, vms) as sampler:
        ex.signal(signal.SIGHUP)
        try:
            ex.wait_value("libvirt_blockjob_policy_started_total", {"rule": name}, lambda v: v == 4, timeout=45)
        except AssertionError:
            ours = len(sampler.samples[-1].exporter) if sampler.samples else 0
            now = int(ex.value("libvirt_blockjob_active_jobs")) - ours
            if now > foreign and deferred(ex, name, "concurrency"):
                pytest.skip(f"shared host too busy: foreign block jobs rose from {foreign} to {now} during the test")
            raise
        for vm in vms:
            ex.wait_value("libvirt_blockjob_completed_total", job_labels(vm.name), lambda v: v == 1, timeout=30)
        time.sleep(0.3)
    assert not sampler.errors, sampler.errors
    times = [s.t for s in sampler.samples]
    steps = sorted(b - a for a, b in zip(times, times[1:]))
    print(f"\n{len(times)} samples, interval median {steps[len(steps) // 2]:.3f} s, max {steps[-1]:.3f} s")
    assert steps[len(steps) // 2] < 0.5

    # Never more than two of ours at once, by virsh and by the exporter. On a shared host other
    # jobs may come and go meanwhile: a foreign job that ends frees a slot the policy may use.
    foreign_seen = [int(s.active_jobs) - len(s.exporter) for s in sampler.samples if s.synced]
    steady = min(foreign_seen) == max(foreign_seen) == foreign
    no_slot_freed = min(foreign_seen) >= foreign  # every start then used a slot one of ours freed
    bound = limit - min(foreign, max(0, min(foreign_seen)))
    ours_virsh = max(len(s.virsh) for s in sampler.samples)
    ours_exporter = max(len(s.exporter) for s in sampler.samples)
    print(f"foreign jobs {foreign} at start, {min(foreign_seen)}..{max(foreign_seen)} during the test; "
          f"max_concurrent {limit}; at most {ours_virsh} of ours at once (virsh), {ours_exporter} (exporter)")
    assert ours_virsh <= bound and ours_exporter <= bound
    if steady:
        assert bound == 2 and ours_virsh == 2

    # All four flat, by virsh and by the exporter, each pulled exactly once.
    for vm in vms:
        assert vmlib.backing_depth(vm) == 0
        ex.wait_value("libvirt_blockjob_backing_chain_depth", {"domain": vm.name, "disk": "vda"},
                      lambda v: v == 0, timeout=10)
        assert ex.value("libvirt_blockjob_failed_total", job_labels(vm.name)) == 0
    assert started_total(ex, name) == 4
    assert ex.value("libvirt_blockjob_policy_errors_total", {"rule": name}) == 0

    # A freed slot is used at once: the gap between a job's end and the next start.
    starts, ends = sampler.transitions()
    assert sorted(n for _, n in starts) == sorted(vm.name for vm in vms)  # each started once
    later = [(t, n) for t, n in starts if any(e <= t for e, _ in ends)]
    if steady:
        assert len(later) == 2, (starts, ends)
    assert later or bound >= 4, (starts, ends)
    assert later or not no_slot_freed, (starts, ends)
    gaps = [t - max(e for e, _ in ends if e <= t) for t, _ in later]
    started_log = log_times(ex, rf"policy: started pull on \S+-c{tok}-")
    ended_log = log_times(ex, rf"block job pull on \S+-c{tok}-\S+: completed")
    log_gaps = [t - max(e for e, _ in ended_log if e <= t) for t, _ in started_log if any(e <= t for e, _ in ended_log)]
    print(f"start gaps after a job end: sampled {[round(g, 3) for g in gaps]} s, "
          f"exporter log {[round(g, 3) for g in log_gaps]} s (poll interval 1 s)")
    if no_slot_freed:  # else a start may have used a slot a foreign job freed, not one of ours
        # Started from the job-end event, not the next poll: well under one poll interval + 1 s.
        assert max(gaps) < 1.0 + 1.0, f"next start {gaps} s after a job end (poll interval 1 s)"


# ------------------------------------------------------------------------------------ 2. keep_base


def test_keep_base_rebases_onto_the_base_and_keeps_what_is_under_it(vm_factory, exporter, tmp_path):
    tok = token()
    d = vm_factory.images_dir(f"kb{tok}")
    old = d / f"base-2023-{tok}.qcow2"
    vmlib.run(["qemu-img", "create", "-q", "-f", "qcow2", old, "32M"])
    vmlib.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x21 0 8M", old])
    new = vmlib.make_overlay(d / f"base-2025-{tok}.qcow2", old)
    vmlib.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 8M 4M", new])
    mid = vmlib.make_overlay(d / "mid.qcow2", new)
    vmlib.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x23 12M 4M", mid])
    top = vmlib.make_overlay(d / "top.qcow2", mid)
    vm = vm_factory.create(f"kb{tok}", chain=[top, mid, new, old], paused=True)
    assert vmlib.backing_chain(vm) == [str(mid), str(new), str(old)]

    name = "retire-old-base"
    policy = write_policy(tmp_path / "policy.yml", [{
        "name": name,
        "match": {"domain": vm.name},
        "when": {"backing_file": f"{d}/base-2023-*.qcow2"},
        "action": {"pull": {"keep_base": f"{d}/base-2025-*.qcow2", "bandwidth": "4MiB/s"}},
    }])
    ex = exporter(*policy_args(policy))
    ex.wait_value("libvirt_blockjob_completed_total", job_labels(vm.name), lambda v: v == 1, timeout=30)
    assert vmlib.backing_chain(vm) == [str(new), str(old)]  # exactly the base and what is under it
    ex.wait_value("libvirt_blockjob_backing_chain_depth", {"domain": vm.name, "disk": "vda"},
                  lambda v: v == 2, timeout=10)
    assert started_total(ex, name) == 1
    assert ex.value("libvirt_blockjob_failed_total", job_labels(vm.name)) == 0
    assert any(f"pull down to {new}" in line for _, line in wait_log(ex, "policy: started"))
    # The base is now directly under the active layer: the rule no longer matches, nothing restarts.
    ex.wait_value("libvirt_blockjob_policy_candidates", {"rule": name}, lambda v: v == 0, timeout=5)
    time.sleep(1.5)
    assert started_total(ex, name) == 1 and vmlib.job_info(vm) is None
    # The pulled layer's data reached the active image; the base's data is still read through it.
    # (Read once QEMU has closed the image: a running QEMU keeps qcow2 metadata in its cache.)
    ex.stop()
    vmlib.destroy(vm)
    out = vmlib.run(["qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x23 12M 4M", "-c", "read -P 0x22 8M 4M",
                     "-c", "read -P 0x21 0 8M", top])
    assert "Pattern verification failed" not in out
    mapped = vmlib.run(["qemu-img", "map", "--output=json", "-f", "qcow2", top])
    assert '"depth": 0' in mapped  # top now holds data of its own (mid's 4 MiB)


# ------------------------------------------------------------------------------------ 3. dry run


def test_dry_run_starts_nothing_reports_candidates_and_stays_read_only(vm_factory, exporter, tmp_path):
    tok = token()
    vms = [vm_factory.create(f"dry{tok}-{i}", depth=2, data_mib=8, size_mib=16, paused=True) for i in range(2)]
    shallow = vm_factory.create(f"dry{tok}-x", depth=1, data_mib=8, size_mib=16, paused=True)
    name = "flatten"
    policy = write_policy(tmp_path / "policy.yml",
                          [{**rule(name, f"lbje-test-*-dry{tok}-?"), "when": {"min_backing_depth": 2}}])
    ex = exporter(*policy_args(policy, enforce=False))
    ex.wait_value("libvirt_blockjob_policy_deferred", {"rule": name, "reason": "dry_run"}, lambda v: v == 2,
                  timeout=15)
    scrape = ex.scrape()
    assert scrape.get("libvirt_blockjob_policy_enforcing") == 0
    assert scrape.get("libvirt_blockjob_policy_candidates", {"rule": name}) == 2  # not the depth-1 disk
    assert scrape.get("libvirt_blockjob_policy_started_total", {"rule": name}) == 0
    assert_no_job_for(vms + [shallow], 5, ex)
    assert [vmlib.backing_depth(vm) for vm in vms] == [2, 2]
    assert vmlib.backing_depth(shallow) == 1
    assert ex.value("libvirt_blockjob_policy_started_total", {"rule": name}) == 0
    log = ex.output()
    assert "(read-only)" in log and "read-write" not in log
    for vm in vms:
        assert f"policy (dry run): would start on {vm.name}/vda" in log
    assert libvirt_client_readonly(ex.proc.pid) is True  # libvirtd's own view of the connection


# ------------------------------------------------------------------------------------ 4. windows


def test_nothing_starts_outside_the_window_and_starts_when_it_opens(vm_factory, exporter, tmp_path):
    tok = token()
    vm = vm_factory.create(f"win{tok}", depth=1, data_mib=8, size_mib=16, paused=True)
    name = "in-window"
    ex, opens, offset = exporter_on_shifted_clock(  # local 12:00:00 is `opens`
        exporter, (12, 0, 0),
        lambda moment, offset: write_policy(
            tmp_path / "policy.yml", [rule(name, vm.name, bandwidth="4MiB/s")],
            windows=[{"days": [local_weekday(moment, offset)], "start": "12:00", "end": "12:03"}]),
        lambda ex: ex.wait_value("libvirt_blockjob_policy_deferred", {"rule": name, "reason": "window"},
                                 lambda v: v == 1, timeout=20),
        vm)
    assert vmlib.job_info(vm) is None
    first_start = None
    while time.time() < opens + 5:
        info = vmlib.job_info(vm)
        now = time.time()
        if info is not None:
            first_start = now
            break
        time.sleep(0.05)
    assert first_start is not None, "no pull within 5 s of the window opening\n" + ex.output()[-3000:]
    assert first_start >= opens, f"pull started {opens - first_start:.2f} s before the window opened"
    print(f"\npull seen {first_start - opens:.2f} s after the window opened (poll interval 1 s)")
    assert first_start - opens < 5.0  # the next evaluation (poll interval 1 s), with room for a busy host
    starts = wait_log(ex, "policy: started pull", offset)
    assert len(starts) == 1 and starts[0][0] >= opens
    assert "next opens" in ex.output() and "deferred, window" in ex.output()
    ex.wait_value("libvirt_blockjob_completed_total", job_labels(vm.name), lambda v: v == 1, timeout=15)
    assert vmlib.backing_depth(vm) == 0


# ------------------------------------------------------------------------------------ 5. space


def test_disk_on_a_too_small_filesystem_is_deferred_for_space(vm_factory, exporter, tmp_path):
    tok = token()
    small = vm_factory.tmpfs_dir(16)
    vm = vm_factory.create(f"space{tok}", depth=1, data_mib=64, size_mib=64, active_dir=small, paused=True)
    name = "needs-room"
    policy = write_policy(tmp_path / "policy.yml", [rule(name, vm.name)], min_free_space_ratio=1.2)
    ex = exporter(*policy_args(policy))
    ex.wait_value("libvirt_blockjob_policy_deferred", {"rule": name, "reason": "space"}, lambda v: v == 1,
                  timeout=15)
    assert_no_job_for([vm], 3, ex)
    scrape = ex.scrape()
    assert scrape.get("libvirt_blockjob_policy_deferred", {"rule": name, "reason": "space"}) == 1
    assert scrape.get("libvirt_blockjob_policy_started_total", {"rule": name}) == 0
    assert scrape.get("libvirt_blockjob_policy_errors_total", {"rule": name}) == 0
    assert scrape.series("libvirt_blockjob_failed_total", domain=vm.name) == {}  # no job ever ran
    assert vmlib.backing_depth(vm) == 1
    assert re.search(rf"{vm.name}/vda \(rule {name}\) deferred, space: needs 1.2 x 6\d\.\d MiB", ex.output())


# ------------------------------------------------------------------------------------ 6. backoff


def fill(directory: Path) -> Path:
    """Fill a filesystem to the last byte with one file."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: nothing left to flush at close
        chunk = b"\0" * MiB
        try:
            while f.write(chunk):
                pass
        except OSError:
            pass
    return filler


def test_failed_policy_pull_waits_retry_after_then_retries(vm_factory, exporter, tmp_path):
    tok = token()
    room = vm_factory.tmpfs_dir(96)
    vm = vm_factory.create(f"retry{tok}", depth=1, data_mib=40, size_mib=64, active_dir=room, paused=True)
    name = "retry"
    policy = write_policy(tmp_path / "policy.yml", [rule(name, vm.name, bandwidth="8MiB/s")],
                          min_free_space_ratio=1.2, retry_after="20s")
    ex = exporter(*policy_args(policy))
    labels = job_labels(vm.name)
    ex.wait_value("libvirt_blockjob_cursor", labels, lambda v: v is not None, timeout=15)
    assert started_total(ex, name) == 1
    filler = fill(room)
    try:
        ex.wait_value("libvirt_blockjob_failed_total", labels, lambda v: v == 1, timeout=15)
    finally:
        filler.unlink()
    failed_at = time.time()
    ex.wait_value("libvirt_blockjob_policy_deferred", {"rule": name, "reason": "backoff"}, lambda v: v == 1,
                  timeout=5)
    assert ex.value("libvirt_blockjob_policy_errors_total", {"rule": name}) == 1
    # Room again, but no second try before retry_after.
    assert_no_job_for([vm], failed_at + 15 - time.time(), ex)
    assert started_total(ex, name) == 1
    assert deferred(ex, name, "backoff") == 1
    # Due 20 s after the failure. Evaluations run after poll cycles, which other domains being
    # destroyed can hold up for seconds on a shared host.
    ex.wait_value("libvirt_blockjob_policy_started_total", {"rule": name}, lambda v: v == 2, timeout=20)
    retried_after = time.time() - failed_at
    assert vmlib.job_info(vm) is not None or ex.value("libvirt_blockjob_completed_total", labels) == 1
    print(f"\nretried {retried_after:.1f} s after the failure was seen (retry_after 20 s)")
    assert 19 <= retried_after < 35
    assert "attempt 1 of 3 failed" in ex.output()


# ------------------------------------------------------------------------------------ 7. SIGHUP


def test_sighup_with_a_broken_file_keeps_the_old_policy(vm_factory, exporter, tmp_path):
    tok = token()
    first = vm_factory.create(f"hup{tok}-a", depth=1, data_mib=4, size_mib=16, paused=True)
    name = "old-rule"
    path = write_policy(tmp_path / "policy.yml", [rule(name, f"lbje-test-*-hup{tok}-?")])
    ex = exporter(*policy_args(path, enforce=False))
    ex.wait_value("libvirt_blockjob_policy_candidates", {"rule": name}, lambda v: v == 1, timeout=15)
    loaded_at = ex.value("libvirt_blockjob_policy_last_reload_success_timestamp_seconds")
    assert ex.value("libvirt_blockjob_policy_last_reload_successful") == 1

    path.write_text(
        "rules:\n"
        "  - name: new-rule\n"
        "    match: {domain: '*'}\n"
        "    action:\n"
        "      pull: {bandwidth: fast}\n"
        "limits:\n"
        "  max_concurent: 3\n"
    )
    ex.signal(signal.SIGHUP)
    ex.wait_value("libvirt_blockjob_policy_last_reload_successful", None, lambda v: v == 0, timeout=10)
    log = ex.output()
    assert f"{path}:5: " in log and "bad bandwidth" in log
    assert f"{path}:7: " in log and "did you mean 'max_concurrent'" in log
    assert "keeping the previous policy" in log
    # The old rules are still evaluated, against a changing inventory too.
    second = vm_factory.create(f"hup{tok}-b", depth=1, data_mib=4, size_mib=16, paused=True)
    ex.wait_value("libvirt_blockjob_policy_candidates", {"rule": name}, lambda v: v == 2, timeout=15)
    scrape = ex.scrape()
    assert scrape.get("libvirt_blockjob_policy_deferred", {"rule": name, "reason": "dry_run"}) == 2
    assert scrape.series("libvirt_blockjob_policy_candidates", rule="new-rule") == {}
    assert scrape.get("libvirt_blockjob_policy_last_reload_success_timestamp_seconds") == loaded_at

    write_policy(path, [rule("new-rule", second.name)])
    ex.signal(signal.SIGHUP)
    ex.wait_value("libvirt_blockjob_policy_last_reload_successful", None, lambda v: v == 1, timeout=10)
    assert ex.value("libvirt_blockjob_policy_last_reload_success_timestamp_seconds") > loaded_at
    ex.wait_value("libvirt_blockjob_policy_candidates", {"rule": "new-rule"}, lambda v: v == 1, timeout=10)
    assert ex.value("libvirt_blockjob_policy_candidates", {"rule": name}) is None
    assert vmlib.job_info(first) is None and vmlib.job_info(second) is None


def test_every_sighup_is_handled_at_once_while_the_exporter_is_busy(exporter, tmp_path):
    """Python runs signal handlers in the main thread only; a signal the kernel hands to one of
    the exporter's other threads must not wait for the main thread's next wake-up."""
    path = write_policy(tmp_path / "policy.yml", [rule("none", f"lbje-test-nothing-{token()}")])
    ex = exporter(*policy_args(path, enforce=False), f"--libvirt.uri=qemu+unix:///system?socket={tmp_path}/no.sock",
                  connected=False)
    stop = threading.Event()

    def scrape_hard() -> None:
        while not stop.is_set():
            try:
                ex.scrape(timeout=2)
            except OSError:
                pass

    scrapers = [threading.Thread(target=scrape_hard, daemon=True) for _ in range(4)]
    for t in scrapers:
        t.start()
    slow = []
    try:
        for i in range(30):
            before = ex.output().count(" reloaded (")
            sent = time.monotonic()
            ex.signal(signal.SIGHUP)
            while ex.output().count(" reloaded (") == before and time.monotonic() - sent < 2:
                time.sleep(0.005)
            if ex.output().count(" reloaded (") == before or time.monotonic() - sent > 0.5:
                slow.append(i)
    finally:
        stop.set()
        for t in scrapers:
            t.join(5)
    assert not slow, f"SIGHUPs {slow} of 30 were not handled within 0.5 s"


# ------------------------------------------------------------------------------------ 8. CLI


def test_invalid_policy_refuses_to_start_check_exit_codes_and_plan(vm_factory, tmp_path):
    tok = token()
    glob = f"lbje-test-*-cli{tok}-*"
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "rules:\n"
        f"  - name: flatten\n"
        f"    match: {{domain: '{glob}'}}\n"
        "    when: {min_backing_depth: 0}\n"
        "    action: {pull: {bandwidth: 5 parsecs}}\n"
        "limits:\n"
        "  windows:\n"
        "    - {days: [mon, funday], start: '01:00', end: '01:00'}\n"
    )
    check = run_exporter_command(["policy", "check", str(bad)])
    assert check.returncode == 1
    errors = check.stderr.strip().splitlines()
    assert [e.split(": ", 1)[0] for e in errors] == [f"{bad}:4", f"{bad}:5", f"{bad}:8"]

    ready = vm_factory.create(f"cli{tok}-ready", depth=2, data_mib=8, size_mib=16, paused=True)
    busy = vm_factory.create(f"cli{tok}-busy", depth=2, data_mib=64, size_mib=64, paused=True)
    small = vm_factory.tmpfs_dir(16)
    tight = vm_factory.create(f"cli{tok}-tight", depth=2, data_mib=64, size_mib=64, active_dir=small, paused=True)
    shallow = vm_factory.create(f"cli{tok}-shallow", depth=1, data_mib=4, size_mib=16, paused=True)
    vmlib.start_pull(busy, bandwidth_bytes=1)  # someone else's job, stalled

    started = run_exporter_command(["--policy.file", str(bad), "--policy.enforce",
                                    f"--web.listen-address=127.0.0.1:{free_port()}"])
    assert started.returncode == 1
    assert "refusing to start" in started.stderr
    assert f"{bad}:4: " in started.stderr and f"{bad}:5: " in started.stderr and f"{bad}:8: " in started.stderr
    assert jobs_now([ready, tight, shallow]) == dict.fromkeys([ready.name, tight.name, shallow.name])

    example = run_exporter_command(["policy", "check", "config/policy.example.yml"])
    assert (example.returncode, example.stdout.strip()) == (0, "config/policy.example.yml: OK (2 rules)")
    good = write_policy(tmp_path / "good.yml",
                        [{**rule("flatten", glob), "when": {"min_backing_depth": 2}}])
    check = run_exporter_command(["policy", "check", str(good)])
    assert (check.returncode, check.stdout.strip()) == (0, f"{good}: OK (1 rule)")
    assert run_exporter_command(["policy", "check", str(tmp_path / "missing.yml")]).returncode == 1
    assert run_exporter_command(["policy", "check"]).returncode == 2

    plan = run_exporter_command(["policy", "plan", "--policy.file", str(good)], timeout=120)
    assert plan.returncode == 0, plan.stderr
    print("\n" + plan.stdout)
    lines = plan.stdout.splitlines()

    def row(vm) -> tuple[str, str]:
        i = next(i for i, l in enumerate(lines) if l.startswith(vm.name + " "))
        return lines[i], lines[i + 1]

    line, matched = row(ready)
    assert re.search(r"\bflatten\s+would start\s+dry_run\b", line) and "matched: depth 2 >= 2" in matched
    line, matched = row(busy)
    assert re.search(r"\bdefer\s+active_job\s+pull job active \(started by someone else\)", line)
    assert "matched: depth 2 >= 2" in matched
    line, matched = row(tight)
    assert re.search(r"\bdefer\s+space\s+needs 1.1 x", line) and "matched: depth 2 >= 2" in matched
    assert re.search(rf"^{shallow.name}\s+vda\s+flatten\s+depth 1 < 2$", plan.stdout, re.M)
    assert jobs_now([ready, tight, shallow]) == dict.fromkeys([ready.name, tight.name, shallow.name])
    assert vmlib.backing_depth(ready) == 2


# ------------------------------------------------------------------------------------ 9. abort


def test_abort_outside_window_aborts_only_the_policys_pull_when_the_window_closes(vm_factory, exporter, tmp_path):
    tok = token()
    ours = vm_factory.create(f"abort{tok}-a", depth=1, data_mib=64, size_mib=64, paused=True)
    theirs = vm_factory.create(f"abort{tok}-b", depth=1, data_mib=64, size_mib=64, paused=True)
    vmlib.start_pull(theirs, bandwidth_bytes=1)  # a foreign job on a matching disk: never touched
    name = "night-only"
    labels = job_labels(ours.name)
    ex, closes, offset = exporter_on_shifted_clock(  # local 12:01:00 is `closes`
        exporter, (12, 1, 0),
        lambda moment, offset: write_policy(
            tmp_path / "policy.yml", [rule(name, f"lbje-test-*-abort{tok}-?", bandwidth="1MiB/s")],
            windows=[{"days": [local_weekday(moment - 60, offset)], "start": "12:00", "end": "12:01"}],
            abort_outside_window=True),
        lambda ex: ex.wait_value("libvirt_blockjob_cursor", labels, lambda v: v is not None, timeout=20),
        ours, margin=1.0)
    assert started_total(ex, name) == 1
    ex.wait_value("libvirt_blockjob_canceled_total", labels, lambda v: v == 1, timeout=15)
    aborting = log_times(ex, "policy: aborting pull on", offset)
    assert len(aborting) == 1 and ours.name in aborting[0][1]
    assert len(wait_log(ex, "policy: aborted pull on", offset)) == 1
    print(f"\nabort sent {aborting[0][0] - closes:.2f} s after the window closed (poll interval 1 s)")
    assert closes <= aborting[0][0] < closes + 5.0  # the next evaluation, with room for a busy host
    time.sleep(1.5)
    scrape = ex.scrape()
    assert scrape.get("libvirt_blockjob_canceled_total", labels) == 1
    assert scrape.get("libvirt_blockjob_failed_total", labels) == 0
    assert scrape.get("libvirt_blockjob_policy_errors_total", {"rule": name}) == 0
    assert scrape.get("libvirt_blockjob_policy_started_total", {"rule": name}) == 1  # not restarted
    assert scrape.get("libvirt_blockjob_policy_deferred", {"rule": name, "reason": "window"}) == 1
    assert scrape.get("libvirt_blockjob_policy_deferred", {"rule": name, "reason": "active_job"}) == 1
    assert vmlib.job_info(ours) is None and vmlib.backing_depth(ours) == 1
    assert vmlib.job_info(theirs) is not None  # the foreign job runs on
    assert "gave_up" not in ex.output() and "attempt 1" not in ex.output()


# ------------------------------------------------------------------------------------ stale view


def test_a_pull_started_by_hand_that_the_sweep_has_not_reached_counts_against_the_cap(vm_factory, exporter,
                                                                                        tmp_path):
    """The sweep reads disks without a job slowly (budget 1 call/s), but before it starts anything
    the policy reads every disk afresh: a foreign pull it has not yet seen fills the last slot."""
    tok = token()
    vms = [vm_factory.create(f"s{tok}-{i}", depth=2, data_mib=16, size_mib=32, extra_disks=(1, 1, 1),
                             paused=True) for i in range(3)]
    target, hand = vms[0], vms[2]
    name = "flatten"
    match_nothing = write_policy(tmp_path / "policy.yml", [{**rule(name, target.name),
                                                           "when": {"min_backing_depth": 3}}])
    ex = exporter(*policy_args(match_nothing), "--poll.call-budget=1")
    interval = ex.wait_value("libvirt_blockjob_discovery_interval_seconds", None,
                             lambda v: v is not None and v >= 10, timeout=10)
    foreign = int(ex.value("libvirt_blockjob_active_jobs"))
    vmlib.start_pull(hand, "vdc", bandwidth_bytes=1)  # crawls: holds its slot
    try:
        unseen = ex.value("libvirt_blockjob_cursor", job_labels(hand.name, "vdc")) is None
        write_policy(tmp_path / "policy.yml", [rule(name, target.name)], max_concurrent=foreign + 1)
        ex.signal(signal.SIGHUP)
        ex.wait_value("libvirt_blockjob_policy_deferred", {"rule": name, "reason": "concurrency"},
                      lambda v: v == 1, timeout=10)
        print(f"\ndiscovery interval {interval:.0f} s; the hand pull was "
              f"{'not yet' if unseen else 'already'} seen by the sweep when the policy reloaded")
        assert_no_job_for([target], 3, ex)
        assert started_total(ex, name) == 0
    finally:
        vmlib.abort(hand, "vdc")
    ex.wait_value("libvirt_blockjob_policy_started_total", {"rule": name}, lambda v: v == 1, timeout=15)
    vmlib.wait_for(lambda: vmlib.backing_depth(target) == 0, timeout=30, what="the policy's pull to finish")
