"""The benchmark's domains: many paused no-OS guests on small qcow2 chains, some with a crawling pull.

Everything is made through tests/vmlib.py, so its cleanup machinery (at exit, on SIGTERM/SIGHUP,
and our own ``cleanup()`` in a ``finally``) removes every domain, image and directory we made,
and only those.

Sizes: every domain's ``vda`` is ``base <- mid <- top`` where ``base`` (16 MiB of data in a
64 MiB virtual disk) is shared by all domains and opened read-only, so 200-400 domains cost a few
MiB of disk. A paused no-OS QEMU 7.2 has ~32 MiB RSS (~10 MiB anonymous) whatever its configured
memory, because a paused guest never touches its RAM; 200 domains need ~2 GiB of anonymous
memory, so vmlib's 48 MiB guests are kept.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_TESTS = Path(__file__).resolve().parent.parent / "tests"
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))

import vmlib  # noqa: E402

# Our domains are ``lbje-bench-<8 hex>-<label>`` so that they are told apart from the test suite's
# ``lbje-test-*`` at a glance. vmlib reads NAME_PREFIX at call time, both when naming a domain and
# in the guard that refuses to remove any other name, so the two stay consistent.
PREFIX = "lbje-bench-"
vmlib.NAME_PREFIX = PREFIX

CRAWL_BYTES_PER_S = 1  # QEMU copies one 512 KiB chunk, then the job waits (stays active)
LIBVIRTD_PATIENCE = 180.0  # how long cleanup waits out a libvirtd restart (another test run's)


def _virsh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-c", vmlib.URI, *args], capture_output=True, text=True, timeout=120)


def domain_exists(name: str) -> bool | None:
    """Whether libvirt knows ``name``; None when libvirtd does not answer (being restarted)."""
    try:
        res = _virsh("domstate", name)
    except subprocess.TimeoutExpired:
        return None
    if res.returncode == 0:
        return True
    return False if "failed to get domain" in res.stderr else None


def wait_libvirtd(timeout: float) -> bool:
    """Until libvirtd answers (True), or ``timeout`` seconds (False)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if _virsh("list", "--name").returncode == 0:
                return True
        except subprocess.TimeoutExpired:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(2)


class Fleet:
    def __init__(self, *, memory_mib: int = 48, data_mib: int = 16, size_mib: int = 64,
                 depth: int = 2, workers: int = 8, log=print) -> None:
        self.factory = vmlib.VMFactory(memory_mib=memory_mib)
        self.data_mib = data_mib
        self.size_mib = size_mib
        self.depth = depth
        self.workers = workers
        self.log = log
        self.vms: list[vmlib.VM] = []
        self.active: list[vmlib.VM] = []  # domains whose vda has a crawling pull
        self._extra_dir: Path | None = None
        self._generation = 1
        self.created: list[str] = []  # every name we ever asked libvirt to create
        self._lock = threading.Lock()
        # Made in the main thread first: vmlib installs its signal handlers only from there.
        base_dir = self.factory.images_dir("base")
        self.base = vmlib.make_chain(base_dir, 0, data_mib=data_mib, size_mib=size_mib,
                                     prefix="shared-")[0]

    @property
    def domain_type(self) -> str:
        return self.factory.domain_type

    @property
    def disks(self) -> int:
        return sum(len(vm.disks) for vm in self.vms)

    def idle_vms(self) -> list[vmlib.VM]:
        active = {vm.name for vm in self.active}
        return [vm for vm in self.vms if vm.name not in active]

    def grow(self, total: int, active_total: int, active_stride: int) -> float:
        """Create domains until there are ``total``; every ``active_stride``-th gets a crawling pull
        while fewer than ``active_total`` have one. Returns the seconds it took."""
        started = time.monotonic()
        indices = range(len(self.vms), total)
        want_active = [i for i in indices if i % active_stride == 0][: max(0, active_total - len(self.active))]
        plan = [(i, i in want_active) for i in indices]
        if not plan:
            return 0.0
        results = self._parallel(lambda item: self._create(*item), plan)
        for vm, active in results:  # keep creation order whatever the pool did
            self.vms.append(vm)
            if active:
                self.active.append(vm)
        return time.monotonic() - started

    def _create(self, index: int, active: bool, extra: int = 0) -> tuple[vmlib.VM, bool]:
        last: Exception | None = None
        label = f"g{self._generation}-{index:04d}"
        chains = []
        for n in range(extra):  # vdb, vdc, ...: an empty overlay each on the shared base
            assert self._extra_dir is not None
            top = self._extra_dir / f"{label}-{n + 1}.qcow2"
            if not top.exists():
                vmlib.make_overlay(top, self.base)
            chains.append([top, Path(self.base)])
        for attempt in range(3):
            try:
                vm = self.factory.create(label, depth=self.depth, base=self.base, extra_disks=chains,
                                         data_mib=self.data_mib, size_mib=self.size_mib, paused=True)
            except Exception as err:  # noqa: BLE001 - retried, then re-raised
                last = err
                with self._lock:
                    self.created.extend(n for n in self.factory.names if n not in self.created)
                time.sleep(0.5 * (attempt + 1))
                continue
            with self._lock:
                self.created.append(vm.name)
            if active:
                vmlib.start_pull(vm, "vda", bandwidth_bytes=CRAWL_BYTES_PER_S)
            return vm, active
        raise RuntimeError(f"cannot create bench domain {index}: {last}")

    def rebuild(self, total_disks: int, active_total: int, count: int | None = None) -> float:
        """Replace every domain: ``count`` domains (default: as many as now) holding
        ``total_disks`` disks between them (thin overlays on the shared base), the disks spread
        evenly; every ``count // active_total``-th gets a crawling pull on ``vda``. Hot-plugging
        instead is not possible: vmlib's domains have no ACPI, so QEMU's pci.0 refuses
        device_add. Returns the seconds."""
        started = time.monotonic()
        count = count or len(self.vms)
        active_stride = max(1, count // max(1, active_total))
        old, self.vms, self.active = self.vms, [], []
        self._parallel(lambda vm: vmlib.destroy(vm, missing_ok=True), old, workers=16)
        if self._extra_dir is None:
            self._extra_dir = self.factory.images_dir("extra")
        self._generation += 1
        per_domain = [total_disks // count + (1 if i < total_disks % count else 0) for i in range(count)]
        plan = [(i, i % active_stride == 0 and i // active_stride < active_total, per_domain[i] - 1)
                for i in range(count)]
        results = self._parallel(lambda item: self._create(*item), plan)
        for vm, active in results:
            self.vms.append(vm)
            if active:
                self.active.append(vm)
        return time.monotonic() - started

    def qemu_pids(self) -> list[int]:
        """The QEMU processes of our domains (for their CPU; other domains are not read)."""
        pids = []
        for vm in self.vms:
            try:
                pids.append(vmlib.qemu_pid(vm))
            except (OSError, ValueError):
                pass
        return pids

    def set_bandwidth(self, vms, bytes_per_s: int) -> None:
        self._parallel(lambda vm: vmlib.set_bandwidth(vm, "vda", bytes_per_s), list(vms))

    def _parallel(self, work, items: list, workers: int | None = None) -> list:
        """``work`` over ``items`` side by side; on an interrupt, queued items are dropped (not run)
        so that cleanup starts at once."""
        pool = ThreadPoolExecutor(max_workers=workers or self.workers)
        try:
            futures = [pool.submit(work, item) for item in items]
            return [f.result() for f in futures]
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            pool.shutdown(wait=True)

    def cleanup(self) -> list[str]:
        """Removes every domain, image and directory we made; returns the problems.

        Our domains go first, here, waiting out a libvirtd that does not answer (other test runs
        on the host restart it): vmlib's cleanup takes a domain libvirtd cannot be asked about
        for one already gone, and would then delete its images under a running QEMU."""
        with self._lock:
            self.created.extend(n for n in self.factory.names if n not in self.created)
        self.vms = []
        self.active = []
        stuck = self._remove_domains(sorted(set(self.created)))
        problems = [f"{name}: libvirtd did not answer for {LIBVIRTD_PATIENCE:.0f}s; not removed" for name in stuck]
        return problems + self.factory.cleanup()

    def _remove_domains(self, names: list[str]) -> list[str]:
        """``virsh destroy`` (our domains are transient: that removes them) side by side until
        libvirt no longer knows them; the names it could not be asked about in time."""
        def remove(name: str) -> str | None:
            if not name.startswith(PREFIX):  # never a foreign domain (vmlib's guard too)
                return None
            exists = domain_exists(name)
            if exists:
                _virsh("destroy", name)
                exists = domain_exists(name)
            return None if exists is False else name

        pending = names
        deadline = time.monotonic() + LIBVIRTD_PATIENCE
        while pending:
            with ThreadPoolExecutor(max_workers=16) as pool:
                pending = [n for n in pool.map(remove, pending) if n is not None]
            if not pending or time.monotonic() >= deadline:
                break
            self.log(f"{len(pending)} domains not removed yet (libvirtd not answering?); retrying")
            wait_libvirtd(max(0.0, deadline - time.monotonic()))
        return pending

    def leftovers(self) -> list[str]:
        """Names we created that libvirt still knows (should be empty after cleanup); every
        name if libvirtd does not answer."""
        names = set(self.created) | set(self.factory.names)
        for _attempt in range(3):
            if not wait_libvirtd(LIBVIRTD_PATIENCE):
                break
            try:
                existing = set(vmlib.list_domains())
            except vmlib.CommandError:  # restarted again in between
                continue
            return sorted(n for n in names if n in existing)
        return sorted(names)
