"""Every outcome counted exactly once on the real stack, in the sequences operators meet: a domain
recreated under the same name, a QEMU killed and started again, pulls right after a libvirtd restart,
the exporter itself stopped while a pull ends, and series of domains that are gone."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml

import vmlib
from exporterlib import Exporter, job_labels, start_libvirtd, stop_libvirtd

pytestmark = pytest.mark.libvirt

MiB = 1024 * 1024
OUTCOMES = ("completed", "failed", "canceled")


@pytest.fixture
def exporter(exporter):
    """conftest's, returning once the exporter has connected and polled once."""
    def make(*args: str, **kw) -> Exporter:
        kw.setdefault("connected", True)
        return exporter(*args, **kw)
    return make


def counts(ex: Exporter, domain: str, disk: str = "vda", job_type: str = "pull") -> dict:
    scrape = ex.scrape()
    return {o: scrape.get(f"libvirt_blockjob_{o}_total", job_labels(domain, disk, job_type)) for o in OUTCOMES}


def wait_counts(ex: Exporter, domain: str, expected: dict, timeout: float = 20.0, settle: float = 3.0) -> None:
    """The counters reach ``expected`` and still hold it ``settle`` seconds later."""
    try:
        vmlib.wait_for(lambda: counts(ex, domain) == expected, timeout=timeout)
    except TimeoutError:
        raise AssertionError(f"{domain}: outcomes {counts(ex, domain)}, expected {expected}\n"
                             f"--- exporter log (tail) ---\n{ex.output()[-6000:]}") from None
    time.sleep(settle)
    assert counts(ex, domain) == expected


def short_pull(vm) -> None:
    """``virsh blockpull --wait``: a pull that starts and ends between two polls."""
    vmlib.virsh("blockpull", vm.name, "vda", "--wait", timeout=60)


def test_pulls_of_a_domain_recreated_right_after_a_destroy_are_counted(vm_factory, exporter):
    vm = vm_factory.create("recreated", depth=1, data_mib=64, paused=True)
    ex = exporter(poll_interval="1s")
    vmlib.start_pull(vm, "vda", bandwidth_bytes=1 * MiB)
    ex.wait_value("libvirt_blockjob_cursor", job_labels(vm.name), lambda v: v is not None, timeout=5)
    vmlib.destroy(vm)
    wait_counts(ex, vm.name, {"completed": 0, "failed": 0, "canceled": 1}, settle=0)
    vmlib.recreate(vm)  # same name, new UUID and id, within seconds
    short_pull(vm)
    wait_counts(ex, vm.name, {"completed": 1, "failed": 0, "canceled": 1})
    assert "block job pull on %s/vda completed: counted" % vm.name in ex.output()


def test_a_failure_on_a_recreated_domain_is_counted(vm_factory, exporter):
    small = vm_factory.tmpfs_dir(16)
    vm = vm_factory.create("refail", depth=1, data_mib=200, active_dir=small, paused=True)
    ex = exporter(poll_interval="1s")
    vmlib.start_pull(vm, "vda", bandwidth_bytes=1 * MiB)
    ex.wait_value("libvirt_blockjob_cursor", job_labels(vm.name), lambda v: v is not None, timeout=5)
    vmlib.destroy(vm)
    wait_counts(ex, vm.name, {"completed": 0, "failed": 0, "canceled": 1}, settle=0)
    vmlib.recreate(vm)
    vmlib.start_pull(vm, "vda")  # ENOSPC on the 16 MiB tmpfs
    vmlib.wait_no_job(vm, timeout=30)
    wait_counts(ex, vm.name, {"completed": 0, "failed": 1, "canceled": 1})


def test_quick_pulls_after_a_qemu_kill_and_restart_are_all_counted(vm_factory, exporter):
    vm = vm_factory.create("killed", depth=1, data_mib=64, paused=True)
    ex = exporter(poll_interval="1s")
    vmlib.start_pull(vm, "vda", bandwidth_bytes=1 * MiB)
    ex.wait_value("libvirt_blockjob_cursor", job_labels(vm.name), lambda v: v is not None, timeout=5)
    os.kill(vmlib.qemu_pid(vm), signal.SIGKILL)
    vmlib.wait_for(lambda: vmlib.domain_state(vm) in (None, "shut off"), timeout=20, what="QEMU gone")
    vmlib.recreate(vm)
    for i in range(3):
        if i:
            vmlib.add_layer(vm, f"layer{i}")
        short_pull(vm)
        time.sleep(2)
    wait_counts(ex, vm.name, {"completed": 3, "failed": 1, "canceled": 0})


def test_a_pull_right_after_a_libvirtd_restart_is_counted(vm_factory, exporter, libvirtd_restarts):
    vm = vm_factory.create("afterrestart", depth=1, data_mib=100, paused=True)
    vmlib.start_pull(vm, "vda", bandwidth_bytes=5 * MiB)  # about 20 s
    # A 10 s poll: the read at (re)connect sees the job, and the pull after the restart runs and
    # ends between two polls, so only its event can count it.
    ex = exporter(poll_interval="10s", connected=False)
    ex.wait_value("libvirt_blockjob_cursor", job_labels(vm.name), lambda v: v is not None, timeout=10)
    stop_libvirtd()
    ex.signal(signal.SIGSTOP)  # reconnect only after libvirtd has dealt with the pull's end
    try:
        vmlib.wait_for(lambda: vmlib.run(["qemu-img", "info", "-U", "--output=json", vm.active]).count(
            '"backing-filename"') == 0, timeout=30, what="the pull finished inside QEMU")
        start_libvirtd()
        time.sleep(3)
    finally:
        ex.signal(signal.SIGCONT)
    ex.wait_value("libvirt_blockjob_up", None, lambda v: v == 1, timeout=20)
    wait_counts(ex, vm.name, {"completed": 1, "failed": 0, "canceled": 0}, settle=0)
    assert ex.value("libvirt_blockjob_outcomes_inferred_total",
                    {**job_labels(vm.name), "outcome": "completed"}) == 1  # inferred at the reconnect
    vmlib.add_layer(vm, "fresh")  # a new layer, pulled within seconds of the reconnect
    short_pull(vm)
    wait_counts(ex, vm.name, {"completed": 2, "failed": 0, "canceled": 0}, timeout=8)


def tracked_then_stopped(vm_factory, exporter, state_file: str, label: str, **create):
    """A capped pull the exporter tracks (and has written to its state file), then the exporter
    stopped: (the VM, the pull's labels, its start time as the exporter saw it)."""
    vm = vm_factory.create(label, depth=1, paused=True, **create)
    first = exporter(state_file=state_file)
    vmlib.start_pull(vm, "vda", bandwidth_bytes=1 * MiB)
    labels = job_labels(vm.name)
    first.wait_value("libvirt_blockjob_cursor", labels, lambda v: v is not None, timeout=5)
    started = first.value("libvirt_blockjob_start_time_seconds", labels)
    vmlib.wait_for(lambda: Path(state_file).exists() and vm.name in Path(state_file).read_text(), timeout=5,
                   what="job in the state file")
    assert first.stop() == 0
    return vm, labels, started


@pytest.mark.parametrize("end", ["completed", "failed"])
def test_a_pull_that_ends_while_the_exporter_is_down_is_counted_at_its_start(vm_factory, exporter, tmp_path, end):
    state_file = str(tmp_path / "state.json")
    create = {"data_mib": 64} if end == "completed" else {"data_mib": 200, "active_dir": vm_factory.tmpfs_dir(16)}
    vm, labels, started = tracked_then_stopped(vm_factory, exporter, state_file, f"down{end}", **create)
    assert started is not None
    vmlib.set_bandwidth(vm, "vda", 0)  # let it end (or hit ENOSPC) while no exporter runs
    vmlib.wait_no_job(vm, timeout=30)
    second = exporter(state_file=state_file)
    wait_counts(second, vm.name, {**dict.fromkeys(OUTCOMES, 0), end: 1}, settle=1)
    assert second.value("libvirt_blockjob_outcomes_inferred_total", {**labels, "outcome": end}) == 1
    assert [j for j in json.loads(Path(state_file).read_text())["jobs"] if j["domain"] == vm.name] == []
    assert second.value("libvirt_blockjob_start_time_seconds", labels) is None


def test_a_job_still_running_after_an_exporter_restart_keeps_its_start_time(vm_factory, exporter, tmp_path):
    state_file = str(tmp_path / "state.json")
    vm, labels, started = tracked_then_stopped(vm_factory, exporter, state_file, "stillrunning", data_mib=64)
    time.sleep(1.5)
    second = exporter(state_file=state_file)
    assert second.value("libvirt_blockjob_start_time_seconds", labels) == started
    assert counts(second, vm.name) == dict.fromkeys(OUTCOMES, 0)


@pytest.mark.parametrize("content", [b"{not json", b'{"version": 1, "jobs": [{"domain": 5}]}', b"\0" * 100])
def test_a_corrupt_state_file_means_a_clean_start_and_a_warning(exporter, tmp_path, content):
    state_file = tmp_path / "state.json"
    state_file.write_bytes(content)
    ex = exporter(state_file=str(state_file))
    assert ex.value("libvirt_blockjob_up") == 1
    assert f"state file {state_file} is unusable" in ex.output()


def test_series_of_a_gone_domain_go_after_the_retention_and_a_returning_one_keeps_them(vm_factory, exporter):
    gone = vm_factory.create("gone", depth=1, data_mib=64, paused=True)
    back = vm_factory.create("back", depth=1, data_mib=64, paused=True, persistent=True)
    ex = exporter("--state.retention=12s", poll_interval="1s")
    for vm in (gone, back):
        vmlib.start_pull(vm, "vda", bandwidth_bytes=1 * MiB)
        ex.wait_value("libvirt_blockjob_cursor", job_labels(vm.name), lambda v: v is not None, timeout=5)
        vmlib.abort(vm)
        wait_counts(ex, vm.name, {"completed": 0, "failed": 0, "canceled": 1}, settle=0)
    vmlib.destroy(gone)
    vmlib.destroy(back)
    vm_factory.start(back, paused=True)  # back well within the retention
    assert counts(ex, gone.name) == {"completed": 0, "failed": 0, "canceled": 1}
    vmlib.wait_for(lambda: not ex.scrape().series("libvirt_blockjob_canceled_total", domain=gone.name),
                   timeout=30, what="series of the gone domain dropped")
    assert counts(ex, back.name) == {"completed": 0, "failed": 0, "canceled": 1}
    assert ex.scrape().series("libvirt_blockjob_outcomes_inferred_total", domain=gone.name) == {}


def test_the_policy_never_exceeds_max_concurrent_when_a_job_is_started_by_hand(vm_factory, exporter, tmp_path):
    token = os.urandom(3).hex()
    policy_vms = [vm_factory.create(f"cap{token}{i}", depth=1, data_mib=64, paused=True) for i in range(4)]
    hand = vm_factory.create("hand", depth=1, data_mib=64, paused=True)
    everyone = [*policy_vms, hand]
    # max_concurrent counts every job on the host: leave room for jobs others run here (on vda).
    def foreign_jobs() -> int:
        count = 0
        for name in vmlib.virsh("list", "--name").split():
            if name not in {v.name for v in everyone}:
                try:
                    count += vmlib.job_info(name) is not None
                except vmlib.CommandError:
                    pass  # gone meanwhile
        return count

    foreign = foreign_jobs()
    policy = tmp_path / "policy.yml"
    policy.write_text(yaml.safe_dump({
        "rules": [{"name": "cap", "match": {"domain": f"*-cap{token}*", "disk": "vda"},
                   "action": {"pull": {"bandwidth": "1MiB/s"}}}],
        "limits": {"max_concurrent": 2 + foreign},
    }))
    ex = exporter(f"--policy.file={policy}", "--policy.enforce", poll_interval="1s")
    try:
        vmlib.wait_for(lambda: len(vmlib.domains_with_job(policy_vms)) == 2, timeout=20, what="two policy pulls")
    except TimeoutError:
        if foreign_jobs() != foreign:
            pytest.skip("shared host too busy: block jobs of other domains came or went during the test")
        raise
    time.sleep(1.5)  # the policy has settled on two
    running = vmlib.domains_with_job(policy_vms)
    assert len(running) == 2
    vmlib.start_pull(hand, "vda", bandwidth_bytes=1 * MiB)
    time.sleep(0.07)
    vmlib.abort(next(vm for vm in policy_vms if vm.name in running))
    samples, worst = 0, set()
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        busy = vmlib.domains_with_job(everyone)
        samples += 1
        if len(busy) > len(worst):
            worst = busy
        time.sleep(0.05)
    if foreign_jobs() != foreign:
        pytest.skip("shared host too busy: block jobs of other domains came or went during the test")
    assert samples > 20
    assert len(worst) <= 2, f"more than max_concurrent jobs at once: {sorted(worst)}"
    assert ex.value("libvirt_blockjob_policy_started_total", {"rule": "cap"}) == 2
    assert ex.value("libvirt_blockjob_policy_deferred", {"rule": "cap", "reason": "concurrency"}) >= 2
