"""The exporter against real libvirtd + QEMU: real pulls, real failures, real libvirtd restarts."""

from __future__ import annotations

import os
import signal
import shutil
import subprocess
import time

import pytest

import vmlib
from exporterlib import Exporter, job_labels, run_exporter_command, start_libvirtd, stop_libvirtd

pytestmark = pytest.mark.libvirt

MiB = 1024 * 1024
OUTCOMES = ("completed", "failed", "canceled")


def outcome_counts(exporter: Exporter, domain: str, disk: str = "vda", job_type: str = "pull") -> dict:
    scrape = exporter.scrape()
    return {o: scrape.get(f"libvirt_blockjob_{o}_total", job_labels(domain, disk, job_type)) for o in OUTCOMES}


def depth(exporter: Exporter, domain: str, disk: str = "vda") -> float | None:
    return exporter.value("libvirt_blockjob_backing_chain_depth", {"domain": domain, "disk": disk})


def assert_stays(exporter: Exporter, domain: str, expected: dict, seconds: float = 3.0, **kw) -> None:
    """Outcome counters hold ``expected`` now and after ``seconds`` (no late double count)."""
    assert outcome_counts(exporter, domain, **kw) == expected
    time.sleep(seconds)
    assert outcome_counts(exporter, domain, **kw) == expected


def test_capped_pull_progress_bandwidth_and_one_completion(vm_factory, exporter):
    vm = vm_factory.create("capped", depth=2, data_mib=200, paused=True)
    ex = exporter()
    ex.wait_value("libvirt_blockjob_backing_chain_depth", {"domain": vm.name, "disk": "vda"},
                  lambda v: v == 2, timeout=10)
    cap = 40 * MiB
    vmlib.start_pull(vm, "vda", bandwidth_bytes=cap)
    labels = job_labels(vm.name)
    first = ex.wait_value("libvirt_blockjob_cursor", labels, lambda v: v is not None and v > 0, timeout=5)
    scrape = ex.scrape()
    info = vmlib.job_info(vm)
    assert info is not None
    assert scrape.get("libvirt_blockjob_cursor_end", labels) == info["end"]
    assert scrape.get("libvirt_blockjob_bandwidth_bytes_per_second", labels) == cap
    assert scrape.get("libvirt_blockjob_ready", labels) == 0
    assert scrape.get("libvirt_blockjob_active_jobs") >= 1
    assert abs(scrape.get("libvirt_blockjob_start_time_seconds", labels) - time.time()) < 30
    assert {o: scrape.get(f"libvirt_blockjob_{o}_total", labels) for o in OUTCOMES} == dict.fromkeys(OUTCOMES, 0)
    ratio = scrape.get("libvirt_blockjob_progress_ratio", labels)
    assert 0 < ratio < 1
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "metrics"], input=scrape.text.encode(), capture_output=True)
        assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    ex.wait_value("libvirt_blockjob_cursor", labels, lambda v: v is not None and v > first, timeout=5,
                  what="cursor rising")
    ex.wait_value("libvirt_blockjob_completed_total", labels, lambda v: v == 1, timeout=30)
    assert ex.value("libvirt_blockjob_cursor", labels) is None  # per-job gauges are gone
    assert_stays(ex, vm.name, {"completed": 1, "failed": 0, "canceled": 0})
    ex.wait_value("libvirt_blockjob_backing_chain_depth", {"domain": vm.name, "disk": "vda"},
                  lambda v: v == 0, timeout=5)
    assert vmlib.backing_depth(vm) == 0


def test_chain_depth_one_and_two(vm_factory, exporter):
    one = vm_factory.create("depth1", depth=1, data_mib=4, paused=True)
    two = vm_factory.create("depth2", depth=2, data_mib=4, paused=True, extra_disks=[1])
    ex = exporter()
    ex.wait_value("libvirt_blockjob_backing_chain_depth", {"domain": two.name, "disk": "vdb"},
                  lambda v: v == 1, timeout=10)
    assert depth(ex, one.name) == 1
    assert depth(ex, two.name) == 2


def test_abort_counts_one_canceled(vm_factory, exporter):
    vm = vm_factory.create("abort", depth=1, data_mib=200, paused=True)
    ex = exporter()
    vmlib.start_pull(vm, "vda", bandwidth_bytes=5 * MiB)
    labels = job_labels(vm.name)
    ex.wait_value("libvirt_blockjob_cursor", labels, lambda v: v is not None, timeout=5)
    vmlib.abort(vm, "vda")
    ex.wait_value("libvirt_blockjob_canceled_total", labels, lambda v: v == 1, timeout=10)
    assert_stays(ex, vm.name, {"completed": 0, "failed": 0, "canceled": 1})
    assert depth(ex, vm.name) == 1


def test_enospc_pull_counts_one_failed(vm_factory, exporter):
    small = vm_factory.tmpfs_dir(16)
    vm = vm_factory.create("enospc", depth=1, data_mib=200, active_dir=small, paused=True)
    ex = exporter()
    ex.wait_value("libvirt_blockjob_backing_chain_depth", {"domain": vm.name, "disk": "vda"},
                  lambda v: v == 1, timeout=10)
    vmlib.start_pull(vm, "vda")
    ex.wait_value("libvirt_blockjob_failed_total", job_labels(vm.name), lambda v: v == 1, timeout=30)
    assert_stays(ex, vm.name, {"completed": 0, "failed": 1, "canceled": 0})
    assert ex.value("libvirt_blockjob_cursor", job_labels(vm.name)) is None
    assert depth(ex, vm.name) == 1
    assert ex.value("libvirt_blockjob_outcomes_inferred_total",
                    {**job_labels(vm.name), "outcome": "failed"}) is None  # told by libvirt's event


def test_job_that_runs_between_two_polls_is_counted_once(vm_factory, exporter):
    vm = vm_factory.create("between", depth=1, data_mib=1, paused=True)
    ex = exporter(poll_interval="10s")
    ex.wait_value("libvirt_blockjob_up", None, lambda v: v == 1, timeout=10)
    vmlib.start_pull(vm, "vda")
    vmlib.wait_no_job(vm, "vda", timeout=10)
    ex.wait_value("libvirt_blockjob_completed_total", job_labels(vm.name), lambda v: v == 1, timeout=10)
    assert_stays(ex, vm.name, {"completed": 1, "failed": 0, "canceled": 0}, seconds=1)


def test_domain_destroyed_mid_pull_leaves_no_stale_gauges(vm_factory, exporter):
    vm = vm_factory.create("destroy", depth=1, data_mib=200, paused=True)
    ex = exporter()
    vmlib.start_pull(vm, "vda", bandwidth_bytes=2 * MiB)
    labels = job_labels(vm.name)
    ex.wait_value("libvirt_blockjob_cursor", labels, lambda v: v is not None, timeout=5)
    vmlib.destroy(vm)
    ex.wait_value("libvirt_blockjob_cursor", labels, lambda v: v is None, timeout=10, what="stale cursor")
    scrape = ex.scrape()
    for name in ("cursor_end", "progress_ratio", "bandwidth_bytes_per_second", "ready", "start_time_seconds",
                 "cursor_last_change_timestamp_seconds"):
        assert scrape.get(f"libvirt_blockjob_{name}", labels) is None, name
    assert scrape.series("libvirt_blockjob_backing_chain_depth", domain=vm.name) == {}
    # libvirt sends no block-job event: the end is inferred once, as canceled (documented)
    assert_stays(ex, vm.name, {"completed": 0, "failed": 0, "canceled": 1}, seconds=2)


def test_libvirtd_restart_mid_pull_reconnects_and_counts_once(vm_factory, exporter, libvirtd_restarts):
    vm = vm_factory.create("restart", depth=1, data_mib=200, paused=True)
    ex = exporter()
    labels = job_labels(vm.name)
    vmlib.start_pull(vm, "vda", bandwidth_bytes=12 * MiB)
    ex.wait_value("libvirt_blockjob_cursor", labels, lambda v: v is not None, timeout=5)
    start_time = ex.value("libvirt_blockjob_start_time_seconds", labels)
    stop_libvirtd()
    ex.wait_value("libvirt_blockjob_up", None, lambda v: v == 0, timeout=10)
    time.sleep(1)
    assert ex.value("libvirt_blockjob_up") == 0  # keeps serving while libvirtd is away
    start_libvirtd()
    back = time.monotonic()
    ex.wait_value("libvirt_blockjob_up", None, lambda v: v == 1, timeout=10)
    assert time.monotonic() - back < 10
    assert ex.value("libvirt_blockjob_reconnects_total") >= 1
    before = ex.value("libvirt_blockjob_cursor", labels)
    assert before is not None, "running job was not picked up again"
    assert ex.value("libvirt_blockjob_start_time_seconds", labels) == start_time  # the same job
    ex.wait_value("libvirt_blockjob_cursor", labels, lambda v: v is None or v > before, timeout=10,
                  what="cursor rising after reconnect")
    # events are registered again: the completion arrives as an event, not inferred
    ex.wait_value("libvirt_blockjob_completed_total", labels, lambda v: v == 1, timeout=40)
    assert_stays(ex, vm.name, {"completed": 1, "failed": 0, "canceled": 0})
    assert ex.value("libvirt_blockjob_outcomes_inferred_total", {**labels, "outcome": "completed"}) is None
    assert depth(ex, vm.name) == 0


def test_pull_completing_while_libvirtd_is_down_with_late_reconnect(vm_factory, exporter, libvirtd_restarts):
    vm = vm_factory.create("downdone", depth=2, data_mib=100, paused=True)
    ex = exporter()
    labels = job_labels(vm.name)
    vmlib.start_pull(vm, "vda", bandwidth_bytes=50 * MiB)  # about 2 s
    ex.wait_value("libvirt_blockjob_cursor", labels, lambda v: v is not None, timeout=5)
    stop_libvirtd()
    ex.wait_value("libvirt_blockjob_up", None, lambda v: v == 0, timeout=10)
    # Freeze the exporter so it reconnects only after libvirtd has re-emitted its events.
    ex.signal(signal.SIGSTOP)
    try:
        time.sleep(5)  # the pull finishes inside QEMU meanwhile
        start_libvirtd()
        assert vmlib.job_info(vm, "vda") is None
        assert vmlib.backing_depth(vm) == 0
        time.sleep(3)
    finally:
        ex.signal(signal.SIGCONT)
    ex.wait_value("libvirt_blockjob_up", None, lambda v: v == 1, timeout=10)
    ex.wait_value("libvirt_blockjob_completed_total", labels, lambda v: v == 1, timeout=10)
    assert_stays(ex, vm.name, {"completed": 1, "failed": 0, "canceled": 0})
    assert ex.value("libvirt_blockjob_cursor", labels) is None
    assert depth(ex, vm.name) == 0


def test_many_short_pulls_at_fastest_poll_never_crash_a_guest(vm_factory, exporter):
    """Guards the QEMU 7.2 crash: our polling during pull completion must never kill a guest."""
    vms = [vm_factory.create(f"short{i}", depth=1, data_mib=8, paused=True) for i in range(3)]
    ex = exporter(poll_interval="0.05s")
    rounds = 6
    for round_ in range(rounds):
        for vm in vms:
            if round_:
                # a fresh external overlay gives the disk a backing image to pull again
                vmlib.virsh("snapshot-create-as", vm.name, "--disk-only", "--no-metadata", "--atomic",
                            "--diskspec", f"vda,file={vm.workdir}/snap{round_}.qcow2")
            vmlib.start_pull(vm, "vda")
        for vm in vms:
            vmlib.wait_no_job(vm, "vda", timeout=30)
    for vm in vms:
        ex.wait_value("libvirt_blockjob_completed_total", job_labels(vm.name), lambda v: v == rounds, timeout=15)
        assert vmlib.domain_state(vm) in ("running", "paused"), f"{vm.name} died"
    for vm in vms:
        assert outcome_counts(ex, vm.name) == {"completed": rounds, "failed": 0, "canceled": 0}


def test_sigterm_exits_cleanly(exporter):
    ex = exporter()
    ex.signal(signal.SIGTERM)
    assert ex.proc.wait(10) == 0


def test_unreachable_uri_serves_up_zero_and_keeps_retrying(exporter, tmp_path):
    ex = exporter(f"--libvirt.uri=qemu+unix:///system?socket={tmp_path}/nothing.sock")
    assert ex.value("libvirt_blockjob_up") == 0
    time.sleep(2)
    scrape = ex.scrape()
    assert scrape.get("libvirt_blockjob_up") == 0
    assert scrape.get("libvirt_blockjob_libvirt_errors_total", {"method": "open"}) >= 2
    assert "cannot connect" in ex.output()


@pytest.mark.parametrize("flag", ["--poll.interval=fast", "--web.listen-address=nowhere", "--libvirt.uri=/tmp/x",
                                  "--log.format=xml", "--web.telemetry-path=metrics", "--no-such-flag"])
def test_bad_flags_exit_2_with_a_clear_message(flag):
    result = run_exporter_command([flag])
    assert result.returncode == 2
    assert "error:" in result.stderr and flag.split("=")[0].lstrip("-").split(".")[0] in result.stderr


def test_version_flag():
    result = run_exporter_command(["--version"])
    assert result.returncode == 0 and "libvirt-blockjob-exporter" in result.stdout


def test_a_hung_domain_blames_only_itself_and_the_others_follow_virsh(vm_factory, exporter):
    """A QEMU that stops answering blocks blockJobInfo forever. For the whole stop every other
    domain's exported cursor follows virsh within one poll interval, only the stopped domain is
    named (log and metric), and its job is unknown, not ended."""
    healthy = [vm_factory.create(f"healthy{i}", depth=1, data_mib=300, size_mib=512, paused=True) for i in range(2)]
    hung = vm_factory.create("hung", depth=1, data_mib=300, size_mib=512, paused=True)
    ex = exporter(poll_interval="1s")
    for vm in (*healthy, hung):
        vmlib.start_pull(vm, "vda", bandwidth_bytes=4 * MiB)
    for vm in (*healthy, hung):
        ex.wait_value("libvirt_blockjob_cursor", job_labels(vm.name), lambda v: v is not None, timeout=5)
    history = {vm.name: [] for vm in healthy}  # (monotonic, virsh cur)
    worst = {vm.name: 0.0 for vm in healthy}
    pid = vmlib.qemu_pid(hung)
    os.kill(pid, signal.SIGSTOP)
    try:
        stop_until = time.monotonic() + 25
        named = False
        while time.monotonic() < stop_until:
            for vm in healthy:
                info = vmlib.job_info(vm)
                assert info is not None, f"{vm.name}'s pull ended early"
                history[vm.name].append((time.monotonic(), info["cur"]))
            scrape, now = ex.scrape(), time.monotonic()
            for vm in healthy:
                exported = scrape.get("libvirt_blockjob_cursor", job_labels(vm.name))
                # how long ago virsh last showed a cursor at or below the exported one: the lag
                behind = [t for t, cur in history[vm.name] if cur > exported]
                lag = now - min(behind) if behind else 0.0
                worst[vm.name] = max(worst[vm.name], lag)
                assert scrape.get("libvirt_blockjob_domain_unresponsive", {"domain": vm.name}) is None
            named |= scrape.get("libvirt_blockjob_domain_unresponsive", {"domain": hung.name}) == 1
            time.sleep(0.2)
        frozen = ex.value("libvirt_blockjob_cursor", job_labels(hung.name))
        assert frozen is not None  # its job is unknown, not ended
    finally:
        os.kill(pid, signal.SIGCONT)
    assert named, "the hung domain was never named in libvirt_blockjob_domain_unresponsive"
    # One poll interval, plus the sampling step of this loop.
    assert max(worst.values()) <= 1.25, f"healthy cursors lagged virsh by {worst} s"
    log = ex.output()
    assert f"blockJobInfo on {hung.name} has not answered" in log
    for vm in healthy:
        assert f"blockJobInfo on {vm.name} has not answered" not in log
        assert f"domain {vm.name} answers" not in log
    ex.wait_value("libvirt_blockjob_cursor", job_labels(hung.name), lambda v: v is not None and v > frozen,
                  timeout=10, what="cursor of the domain once it answers again")
    assert ex.value("libvirt_blockjob_domain_unresponsive", {"domain": hung.name}) is None
    assert outcome_counts(ex, hung.name) == {"completed": 0, "failed": 0, "canceled": 0}


def test_the_sweep_finds_a_pull_started_by_hand_within_the_discovery_interval(vm_factory, exporter):
    """With a call budget below the host's disk count, disks without a job are swept round-robin:
    the budget holds while nothing runs, and a pull started by someone else (no event tells of a
    start) shows within the exported discovery interval, on a disk chosen at random."""
    import math
    import random

    budget = 3
    vms = [vm_factory.create(f"sweep{i}", depth=1, data_mib=16, size_mib=32, extra_disks=(1, 1, 1),
                             extra_data_mib=16, paused=True) for i in range(3)]
    ex = exporter(f"--poll.call-budget={budget}", poll_interval="1s")
    for vm in vms:
        ex.wait_value("libvirt_blockjob_backing_chain_depth", {"domain": vm.name, "disk": "vdd"},
                      lambda v: v == 1, timeout=15)
    ex.wait_value("libvirt_blockjob_poll_cycles_total", None, lambda v: v is not None and v >= 3, timeout=10)
    scrape = ex.scrape()
    disks, busy = scrape.get("libvirt_blockjob_disks"), scrape.get("libvirt_blockjob_active_jobs")
    interval = scrape.get("libvirt_blockjob_discovery_interval_seconds")
    assert disks >= 12
    xml_share = min(len(vms) / 30, max(0.5, (budget - busy) / 2))  # XML re-reads: 3 domains every 30 s
    assert interval == math.ceil((disks - busy) / max(1, int(budget - busy - xml_share))), (disks, busy, interval)

    calls = {"method": "blockJobInfo"}
    before, started = ex.value("libvirt_blockjob_libvirt_calls_total", calls), time.monotonic()
    time.sleep(4)
    after, elapsed = ex.value("libvirt_blockjob_libvirt_calls_total", calls), time.monotonic() - started
    rate = (after - before) / elapsed
    print(f"\n{disks:.0f} disks, budget {budget}/s: discovery interval {interval:.0f} s, {rate:.2f} calls/s")
    assert rate <= max(budget, busy + 1) + 0.5

    vm, disk = random.choice(vms), random.choice(("vda", "vdb", "vdc", "vdd"))
    labels = job_labels(vm.name, disk)
    vmlib.start_pull(vm, disk, bandwidth_bytes=1)
    t0 = time.monotonic()
    try:
        ex.wait_value("libvirt_blockjob_cursor_end", labels, lambda v: v is not None, timeout=interval + 5,
                      what=f"the pull on {vm.name}/{disk}")
        seen = time.monotonic() - t0
        print(f"pull on {disk} of {vm.label} seen after {seen:.2f} s (discovery interval {interval:.0f} s)")
        assert seen <= interval + 1.5  # the interval, a poll interval and a scrape's slack
    finally:
        vmlib.abort(vm, disk)
    ex.wait_value("libvirt_blockjob_canceled_total", labels, lambda v: v == 1, timeout=10)
