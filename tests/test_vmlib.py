"""vmlib against the real stack: its domains, chains and jobs behave as the other tests assume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import vmlib
from vmlib import MIB

pytestmark = pytest.mark.libvirt


def _mounted(path: Path) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def _report(capsys, text: str) -> None:
    with capsys.disabled():
        print(f"\n[vmlib timing] {text}")


def test_make_chain_builds_absolute_qcow2_chain(tmp_images):
    chain = vmlib.make_chain(tmp_images / "a", 3, data_mib=4, size_mib=16,
                             active_dir=tmp_images / "b")
    assert [p.name for p in chain] == ["top.qcow2", "mid2.qcow2", "mid1.qcow2", "base.qcow2"]
    assert chain[0].parent == tmp_images / "b"
    info = json.loads(vmlib.run(["qemu-img", "info", "--backing-chain", "--output=json",
                                 "-U", chain[0]]))
    assert [i["filename"] for i in info] == [str(p) for p in chain]
    assert all(i["format"] == "qcow2" for i in info)
    assert [i.get("backing-filename-format") for i in info] == ["qcow2"] * 3 + [None]
    assert info[-1]["virtual-size"] == 16 * MIB
    # the base holds the data, each intermediate a little of its own, the top nothing
    assert vmlib.make_chain(tmp_images / "c", 0, data_mib=1, size_mib=2)[0].name == "base.qcow2"


def test_depth_two_chain_is_reported(vm_factory):
    transient = vm_factory.create("depth2", depth=2, data_mib=8, paused=True, extra_disks=(1, 0))
    persistent = vm_factory.create("depth2p", depth=2, data_mib=8, persistent=True, paused=True)
    for vm in (transient, persistent):
        assert vm.name.startswith("lbje-test-") and vm.name.endswith("-" + vm.label)
        assert vmlib.domain_state(vm) == "paused"
        assert vmlib.active_source(vm) == str(vm.active)
        assert vmlib.backing_chain(vm) == [str(p) for p in vm.disks["vda"][1:]]
        assert vmlib.backing_depth(vm) == 2
        assert vmlib.job_info(vm) is None
        assert vm.name in vmlib.list_domains()
    assert vmlib.backing_depth(transient, "vdb") == 1
    assert vmlib.backing_depth(transient, "vdc") == 0
    assert "lbje-test-" in vmlib.virsh("list", "--persistent", "--name")  # define, not create

    root = ET.fromstring(vmlib.virsh("dumpxml", transient.name))
    assert root.get("type") == vm_factory.domain_type
    assert root.findtext("memory") == str(48 * 1024)  # KiB
    assert root.findtext("vcpu") == "1"
    assert root.findtext("on_crash") == "destroy"
    assert root.find("./devices/interface") is None and root.find("./devices/graphics") is None
    assert [d.get("type") for d in root.findall("./devices/disk/driver")] == ["qcow2"] * 3


def test_pick_domain_type_falls_back_to_qemu(monkeypatch):
    monkeypatch.delenv("LBJE_DOMAIN_TYPE", raising=False)
    assert vmlib.pick_domain_type("/nonexistent/kvm") == "qemu"
    want = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "qemu"
    assert vmlib.pick_domain_type() in (want, "qemu")


def test_tcg_domain_runs(vm_factory):
    vm_factory.domain_type = "qemu"
    vm = vm_factory.create("tcg", depth=1, data_mib=1, size_mib=16)
    assert ET.fromstring(vmlib.virsh("dumpxml", vm.name)).get("type") == "qemu"
    time.sleep(0.5)
    assert vmlib.domain_state(vm) == "running"


def test_capped_pull_progresses_then_completes(vm_factory, capsys):
    vm = vm_factory.create("capped", depth=2, data_mib=200, paused=True)
    chain_before = vmlib.backing_chain(vm)
    events = vm_factory.watch_events(vm)
    t0 = time.monotonic()
    vmlib.start_pull(vm, bandwidth_bytes=20 * MIB)
    samples = []
    while time.monotonic() - t0 < 2.5:
        samples.append(vmlib.job_info(vm))
        time.sleep(0.25)
    assert None not in samples, samples
    assert {s["job_type"] for s in samples} == {"pull"}
    assert {s["type"] for s in samples} == {"Block Pull"}
    assert {s["bandwidth"] for s in samples} == {20 * MIB}
    assert {s["end"] for s in samples} == {256 * MIB}  # virtual size, not data size
    curs = [s["cur"] for s in samples]
    assert curs == sorted(curs) and curs[-1] > curs[0]
    assert all(0 < c < 256 * MIB for c in curs)
    assert vmlib.backing_chain(vm) == chain_before  # unchanged until the pull ends

    vmlib.wait_no_job(vm, timeout=60)
    took = time.monotonic() - t0
    assert events.wait_for("vda", timeout=10)["status"] == "completed"
    assert vmlib.backing_depth(vm) == 0
    assert took > 5, "the cap did not hold"
    _report(capsys, f"200 MiB pull at 20 MiB/s took {took:.1f} s")


def test_partial_then_unlimited_pull(vm_factory, capsys):
    vm = vm_factory.create("unlimited", depth=3, data_mib=200, paused=True)
    mid1, base = vm.disks["vda"][2], vm.disks["vda"][3]
    vmlib.start_pull(vm, base=mid1)  # pulls only mid2 into the top
    vmlib.wait_no_job(vm, timeout=30)
    assert vmlib.backing_chain(vm) == [str(mid1), str(base)]

    t0 = time.monotonic()
    vmlib.start_pull(vm)
    vmlib.wait_no_job(vm, timeout=60, interval=0.02)
    took = time.monotonic() - t0
    assert vmlib.backing_depth(vm) == 0
    _report(capsys, f"200 MiB pull unlimited took {took:.2f} s")


def test_pull_onto_full_tmpfs_fails(vm_factory, tmpfs_dir):
    small = tmpfs_dir(16)
    vm = vm_factory.create("enospc", depth=2, data_mib=200, active_dir=small)
    assert vm.active.parent == small and _mounted(small)
    chain_before = vmlib.backing_chain(vm)
    events = vm_factory.watch_events(vm)
    vmlib.start_pull(vm)
    vmlib.wait_no_job(vm, timeout=30)
    # No error text anywhere in virsh's view: the job just vanishes, the event says "failed".
    assert events.wait_for("vda", timeout=10)["status"] == "failed"
    assert vmlib.backing_chain(vm) == chain_before
    assert os.statvfs(small).f_bavail == 0  # the overlay ran out of space
    assert vmlib.domain_state(vm) == "running"


def test_bandwidth_one_stalls_pull(vm_factory):
    vm = vm_factory.create("stall", depth=2, data_mib=200, paused=True)
    vmlib.start_pull(vm, bandwidth_bytes=20 * MIB)
    time.sleep(0.3)
    vmlib.set_bandwidth(vm, "vda", 1)
    time.sleep(0.7)  # the chunk already in flight still lands
    first = vmlib.job_info(vm)
    time.sleep(1.0)
    second = vmlib.job_info(vm)
    assert first["bandwidth"] == second["bandwidth"] == 1
    assert first["cur"] == second["cur"] < second["end"]
    vmlib.abort(vm, "vda")
    assert vmlib.job_info(vm) is None
    assert vmlib.backing_depth(vm) == 2  # an aborted pull leaves the chain


def test_cleanup_removes_everything_it_made():
    factory = vmlib.VMFactory()
    try:
        small = factory.tmpfs_dir(16)
        vms = [
            factory.create("gone1", depth=1, data_mib=1, size_mib=16, active_dir=small),
            factory.create("gone2", depth=1, data_mib=1, size_mib=16, persistent=True,
                           paused=True),
            factory.create("gone3", depth=1, data_mib=1, size_mib=16, persistent=True,
                           start=False),
        ]
        watcher = factory.watch_events(vms[0])
        vmlib.start_pull(vms[1], bandwidth_bytes=1)  # a job still running at cleanup
        assert factory.cleanup() == []
        assert not set(factory.names) & set(vmlib.list_domains())
        assert not set(vm.name for vm in vms) & set(vmlib.list_domains())
        assert not _mounted(small) and not small.exists()
        assert not any(vm.workdir.exists() for vm in vms)
        assert watcher._proc.poll() is not None
    finally:
        factory.cleanup()


_CHILD = textwrap.dedent("""
    import json, sys, time
    import vmlib
    f = vmlib.VMFactory()
    small = f.tmpfs_dir(8)
    vm = f.create("child", depth=1, data_mib=1, size_mib=16, active_dir=small, persistent=True)
    vmlib.start_pull(vm, bandwidth_bytes=1)
    print(json.dumps({"name": vm.name, "mount": str(small), "dir": str(vm.workdir)}), flush=True)
    if sys.argv[1] == "exit":
        sys.exit(3)  # no explicit cleanup: atexit must do it
    time.sleep(60)
""")


@pytest.mark.parametrize("how", ["exit", "sigterm"])
def test_cleanup_when_the_process_ends(how):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
    child = subprocess.Popen([sys.executable, "-c", _CHILD, how], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    made = None
    try:
        line = child.stdout.readline()
        assert line, child.stderr.read()
        made = json.loads(line)
        assert made["name"] in vmlib.list_domains()
        if how == "sigterm":
            child.send_signal(signal.SIGTERM)
        rc = child.wait(60)
        assert rc == (3 if how == "exit" else -signal.SIGTERM), child.stderr.read()
        assert made["name"] not in vmlib.list_domains()
        assert not _mounted(Path(made["mount"])) and not Path(made["mount"]).exists()
        assert not Path(made["dir"]).exists()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if made:  # only what our child reported it created
            vmlib._remove_domain(made["name"], True)
            vmlib._unmount(Path(made["mount"]))
            vmlib._remove_path(Path(made["dir"]))
