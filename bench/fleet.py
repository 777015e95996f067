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

    def rebuild(self, total_disks: int, active_total: int, active_stride: int) -> float:
        """Replace every domain by one with more disks (thin overlays on the shared base), so the
        same number of domains holds ``total_disks`` disks. Hot-plugging instead is not possible:
        vmlib's domains have no ACPI, so QEMU's pci.0 refuses device_add. Returns the seconds."""
        started = time.monotonic()
        count = len(self.vms)
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
        with self._lock:
            self.created.extend(n for n in self.factory.names if n not in self.created)
        self.vms = []
        self.active = []
        return self.factory.cleanup()

    def leftovers(self) -> list[str]:
        """Names we created that libvirt still knows (should be empty after cleanup)."""
        existing = set(vmlib.list_domains())
        return sorted(n for n in set(self.created) | set(self.factory.names) if n in existing)
