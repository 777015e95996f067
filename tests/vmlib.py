"""Real no-OS QEMU domains with qcow2 backing chains, driven the way an operator would.

Integration tests, the benchmark and the e2e test need real block jobs (``test:///default`` has
none), so this module makes small domains whose ``vda`` sits on a qcow2 chain with data in the
base, and drives pulls with ``virsh``. It shells out to ``virsh``/``qemu-img``/``qemu-io`` with
argument lists only and deliberately does not import ``libvirt``: it is the independent witness
the exporter's view is compared against, and it must not share the exporter's bugs.

Everything it creates is recorded before it is created and removed on fixture teardown, at exit
and on SIGTERM/SIGHUP, including after failures. It only ever touches domain names it generated
(``lbje-test-<8 hex>-<label>``), mounts it made and paths it created.

Measured on QEMU 7.2 / libvirt 9.0 (Debian 12, KVM): a pull of a 200 MiB base through a depth-2
chain takes ~10.3 s at 20 MiB/s and 0.2-0.6 s unlimited; ``virsh create`` of a paused domain
~0.6 s; ``virsh destroy`` 1.5-2.3 s in our container (libvirt waits until the exited QEMU is
reaped), which is why cleanup removes several domains in parallel.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

URI = os.environ.get("LBJE_LIBVIRT_URI", "qemu:///system")
# qemu must be able to open the images; this is the directory every distro's policy allows.
IMAGES_ROOT = Path(os.environ.get("LBJE_IMAGES_ROOT", "/var/lib/libvirt/images"))
NAME_PREFIX = "lbje-test-"
MIB = 1024 * 1024

_VIRSH_TIMEOUT = 120
_IMG_TIMEOUT = 600

# virsh's names for job types (vshDomainBlockJobToString) -> exporter.model.JOB_TYPES
_VIRSH_JOB_TYPES = {
    "Block Pull": "pull",
    "Block Copy": "copy",
    "Block Commit": "commit",
    "Active Block Commit": "active_commit",
    "Backup": "backup",
}


class CommandError(subprocess.CalledProcessError):
    """CalledProcessError whose message carries stderr, so a failing test says why."""

    def __str__(self) -> str:
        cmd = " ".join(str(c) for c in self.cmd)
        err = (self.stderr or "").strip() or (self.output or "").strip()
        return f"{cmd!r} exited {self.returncode}: {err}"


def run(args: Sequence[str | os.PathLike], *, timeout: float = _VIRSH_TIMEOUT) -> str:
    """Run one command (argument list, never a shell) and return its stdout."""
    argv = [str(a) for a in args]
    try:
        res = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=timeout)
    except subprocess.CalledProcessError as e:
        raise CommandError(e.returncode, e.cmd, e.stdout, e.stderr) from None
    return res.stdout


def virsh(*args: str | os.PathLike, timeout: float = _VIRSH_TIMEOUT) -> str:
    return run(["virsh", "-c", URI, *args], timeout=timeout)


def _virsh_quiet(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    # For cleanup and probing: failure is an answer, not an error.
    return subprocess.run(
        ["virsh", "-c", URI, *args], check=False, capture_output=True, text=True, timeout=timeout
    )


def libvirt_available() -> tuple[bool, str]:
    """(reachable, reason) for qemu:///system; used to skip or fail ``libvirt`` tests."""
    try:
        res = _virsh_quiet("version", timeout=20)
    except FileNotFoundError:
        return False, "virsh is not installed (run scripts/setup-host.sh)"
    except subprocess.TimeoutExpired:
        return False, f"virsh -c {URI} version timed out"
    if res.returncode != 0:
        return False, f"virsh -c {URI} version failed: {res.stderr.strip()}"
    return True, ""


_domain_type_cache: dict[str, str] = {}


def pick_domain_type(kvm_device: str = "/dev/kvm") -> str:
    """'kvm' when /dev/kvm is usable by us and libvirt, else 'qemu' (TCG, slower but works)."""
    forced = os.environ.get("LBJE_DOMAIN_TYPE")
    if forced:
        if forced not in ("kvm", "qemu"):
            raise ValueError(f"LBJE_DOMAIN_TYPE must be kvm or qemu, not {forced!r}")
        return forced
    if kvm_device in _domain_type_cache:
        return _domain_type_cache[kvm_device]
    kind = "qemu"
    if os.path.exists(kvm_device) and os.access(kvm_device, os.R_OK | os.W_OK):
        # /dev/kvm can exist yet be unusable (nested virt off, wrong container cgroup).
        if _virsh_quiet("domcapabilities", "--virttype", "kvm").returncode == 0:
            kind = "kvm"
    _domain_type_cache[kvm_device] = kind
    return kind


# --------------------------------------------------------------------------------------------
# images


def make_chain(
    directory: str | os.PathLike,
    depth: int,
    data_mib: int = 200,
    size_mib: int = 256,
    *,
    active_dir: str | os.PathLike | None = None,
    prefix: str = "",
    base: str | os.PathLike | None = None,
    mid_data_kib: int = 64,
) -> list[Path]:
    """Build a qcow2 chain and return it top-down: [active, backing1, ..., base].

    The active layer has ``depth`` backing images. ``base.qcow2`` gets ``data_mib`` MiB of 0x5a so
    a pull has real work; each intermediate gets ``mid_data_kib`` KiB of its own. ``active_dir``
    puts only the active overlay elsewhere (a small tmpfs makes a pull fail with ENOSPC).
    ``base`` reuses an existing image as the bottom instead of creating one (it is not written
    to), so many domains can share one data-filled base. depth 0 gives a lone data-filled image.
    Backing references are absolute with an explicit ``-F qcow2``. The caller owns the files.
    """
    if depth < 0:
        raise ValueError("depth must be >= 0")
    if not 0 <= data_mib <= size_mib:
        raise ValueError("need 0 <= data_mib <= size_mib")
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    top_dir = Path(active_dir).resolve() if active_dir is not None else directory
    top_dir.mkdir(parents=True, exist_ok=True)

    if base is not None:
        if depth == 0:
            raise ValueError("depth 0 with a shared base would make the base the active layer")
        bottom = Path(base).resolve()
        if not bottom.is_file():
            raise FileNotFoundError(bottom)
    else:
        bottom = (top_dir if depth == 0 else directory) / f"{prefix}base.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", bottom, f"{size_mib}M"],
            timeout=_IMG_TIMEOUT)
        if data_mib:
            run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {data_mib}M", bottom],
                timeout=_IMG_TIMEOUT)
    if depth == 0:
        return [bottom]

    chain = [bottom]  # bottom-up while building
    for i in range(1, depth):
        mid = directory / f"{prefix}mid{i}.qcow2"
        make_overlay(mid, chain[-1])
        if mid_data_kib:
            # Patterns stay clear of 0x55/0xaa so no layer ever looks like a boot sector.
            pattern = 0x10 + (i % 0x40)
            offset_kib = (i * 1024) % (size_mib * 1024 - mid_data_kib)
            run(["qemu-io", "-f", "qcow2", "-c",
                 f"write -P {pattern:#x} {offset_kib}k {mid_data_kib}k", mid], timeout=_IMG_TIMEOUT)
        chain.append(mid)
    chain.append(make_overlay(top_dir / f"{prefix}top.qcow2", chain[-1]))
    return chain[::-1]


def make_overlay(path: str | os.PathLike, backing: str | os.PathLike) -> Path:
    """An empty qcow2 overlay on ``backing`` (absolute reference, backing format qcow2)."""
    path = Path(path)
    backing = Path(backing).resolve()
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", path],
        timeout=_IMG_TIMEOUT)
    return path


# --------------------------------------------------------------------------------------------
# ownership and cleanup


class _Owned:
    """What one owner (a factory, a context manager) created; cleaned newest first.

    Things are recorded *before* they are created, so a crash half-way still gets cleaned.
    """

    def __init__(self) -> None:
        self.domains: dict[str, bool] = {}  # name -> persistent
        self.mounts: list[Path] = []
        self.paths: list[Path] = []  # files/dirs we created (a dir is removed with its content)
        self.procs: list[subprocess.Popen] = []

    def _track(self) -> None:
        with _LOCK:
            if self not in _LIVE:
                _LIVE.append(self)
        _install_signal_handlers()

    def add_domain(self, name: str, persistent: bool) -> None:
        self._track()
        self.domains[name] = persistent

    def add_mount(self, path: Path) -> None:
        self._track()
        self.mounts.append(path)

    def add_path(self, path: Path) -> None:
        self._track()
        self.paths.append(path)

    def add_proc(self, proc: subprocess.Popen) -> None:
        self._track()
        self.procs.append(proc)

    def cleanup(self, parallel: bool = True) -> list[str]:
        """Remove everything; return what could not be removed (empty when all went).

        ``parallel=False`` for atexit and signal handlers, where no new thread may start.
        """
        problems: list[str] = []
        with _LOCK:
            procs, self.procs = self.procs, []
            domains, self.domains = dict(self.domains), {}
            mounts, self.mounts = list(self.mounts), []
            paths, self.paths = list(self.paths), []
            if self in _LIVE:
                _LIVE.remove(self)
        for p in procs:
            problems += _safely(stop_process, p)
        if parallel and len(domains) > 1:
            # `virsh destroy` takes ~2 s even though QEMU exits at once; do them side by side.
            with ThreadPoolExecutor(max_workers=min(16, len(domains))) as pool:
                for found in pool.map(lambda item: _safely(_remove_domain, *item),
                                      domains.items()):
                    problems += found
        else:
            for name, persistent in reversed(list(domains.items())):
                problems += _safely(_remove_domain, name, persistent)
        for mnt in reversed(mounts):
            problems += _safely(_unmount, mnt)
        for path in reversed(paths):
            problems += _safely(_remove_path, path)
        return problems


_LOCK = threading.RLock()
_LIVE: list[_Owned] = []
_PREV_HANDLERS: dict[int, object] = {}


def _safely(step, *args) -> list[str]:
    # One stuck step (virsh timing out, a busy mount) must not stop the rest of the cleanup.
    try:
        found = step(*args)
    except Exception as e:  # noqa: BLE001
        return [f"{step.__name__}{args!r} failed: {e}"]
    return found if isinstance(found, list) else []  # a step's own problems, if it reports any


def stop_process(p: subprocess.Popen, timeout: float = 5.0) -> int | None:
    """SIGTERM (after SIGCONT, for a process a test has stopped), SIGKILL if it outlives
    ``timeout``; the exit status. Shared by the tests' and the benchmark's child processes."""
    if p.poll() is None:
        p.send_signal(signal.SIGCONT)
        p.terminate()
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout)
    return p.returncode


def _remove_domain(name: str, persistent: bool) -> list[str]:
    if not name.startswith(NAME_PREFIX):  # defence in depth: never touch a foreign domain
        return [f"refusing to remove foreign domain {name!r}"]
    if _virsh_quiet("domstate", name).returncode != 0:
        return []  # never came to be, or already gone
    _virsh_quiet("destroy", name)
    # A test may have defined a transient domain, so "persistent" is only a hint; storage stays
    # (no --remove-all-storage): we delete only the files we made.
    if persistent or _virsh_quiet("domstate", name).returncode == 0:
        _virsh_quiet("undefine", name)
    for _ in range(50):
        if _virsh_quiet("domstate", name).returncode != 0:
            return []
        time.sleep(0.1)
    return [f"domain {name} is still defined"]


def _unmount(mnt: Path) -> list[str]:
    for attempt in range(20):
        if not os.path.ismount(mnt):
            break
        res = subprocess.run(["umount", str(mnt)], check=False, capture_output=True, text=True)
        if res.returncode == 0:
            break
        time.sleep(0.1 * (attempt + 1))  # EBUSY right after qemu exits
    else:
        # Still busy (someone else holds a file open): detach it so nothing stays mounted.
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)
    if os.path.ismount(mnt):
        return [f"{mnt} is still mounted"]
    with contextlib.suppress(FileNotFoundError, OSError):
        mnt.rmdir()
    return [] if not mnt.exists() else [f"mount point {mnt} was left behind"]


def _remove_path(path: Path) -> list[str]:
    try:
        if path.is_dir() and not path.is_symlink():
            if any(os.path.ismount(p) for p in [path, *path.rglob("*")] if p.is_dir()):
                return [f"{path} holds a mount; not removing it"]
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError as e:
        return [f"cannot remove {path}: {e}"]
    return []


def cleanup_all() -> list[str]:
    """Remove everything any owner in this process still holds (atexit, signals)."""
    with _LOCK:
        owners = list(_LIVE)
    problems: list[str] = []
    for owner in reversed(owners):
        problems += owner.cleanup(parallel=False)
    return problems


def _atexit_cleanup() -> None:
    for problem in cleanup_all():
        print(f"vmlib cleanup: {problem}", file=sys.stderr)


def _on_signal(signum, frame) -> None:
    cleanup_all()
    prev = _PREV_HANDLERS.get(signum, signal.SIG_DFL)
    if callable(prev):
        prev(signum, frame)
    elif prev != signal.SIG_IGN:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install_signal_handlers() -> None:
    # SIGINT is left alone: it raises KeyboardInterrupt, so finalizers and atexit still run.
    if _PREV_HANDLERS or threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        _PREV_HANDLERS[sig] = signal.getsignal(sig)
        signal.signal(sig, _on_signal)


atexit.register(_atexit_cleanup)


def _new_dir(prefix: str) -> Path:
    IMAGES_ROOT.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{NAME_PREFIX}{prefix}", dir=IMAGES_ROOT))


def _mount_tmpfs(owner: _Owned, size_mib: int) -> Path:
    if size_mib < 1:
        raise ValueError("size_mib must be >= 1")
    mnt = _new_dir("tmpfs-")
    owner.add_path(mnt)
    owner.add_mount(mnt)
    run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}M,mode=0755", "tmpfs", mnt])
    return mnt


@contextlib.contextmanager
def tmpfs_dir(size_mib: int) -> Iterator[Path]:
    """A fresh tmpfs of ``size_mib`` MiB under the images root, unmounted and removed on exit."""
    owner = _Owned()
    try:
        yield _mount_tmpfs(owner, size_mib)
    finally:
        problems = owner.cleanup()
        if problems:
            raise RuntimeError("; ".join(problems))


@contextlib.contextmanager
def images_dir(label: str = "images") -> Iterator[Path]:
    """A fresh directory under the images root that qemu can read, removed on exit."""
    owner = _Owned()
    try:
        d = _new_dir(f"{_check_label(label)}-")
        owner.add_path(d)
        yield d
    finally:
        problems = owner.cleanup()
        if problems:
            raise RuntimeError("; ".join(problems))


# --------------------------------------------------------------------------------------------
# domains


@dataclass
class VM:
    name: str
    label: str
    workdir: Path  # created by the factory, removed with the domain
    disks: dict[str, list[Path]]  # target -> chain top-down as built (the live XML may differ)
    persistent: bool
    domain_type: str
    xml_path: Path
    extra: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return self.name

    @property
    def active(self) -> Path:
        return self.disks["vda"][0]


def _name(dom) -> str:
    name = dom.name if isinstance(dom, VM) else dom
    if not isinstance(name, str) or not name:
        raise TypeError(f"expected a domain name or VM, got {dom!r}")
    return name


_LABEL_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")


def _check_label(label: str) -> str:
    if not _LABEL_RE.match(label):
        raise ValueError(f"label must match {_LABEL_RE.pattern}: {label!r}")
    return label


def _disk_target(index: int) -> str:
    if index >= 26:
        raise ValueError("at most 26 disks")
    return "vd" + chr(ord("a") + index)


def domain_xml(name: str, disks: dict[str, Path], *, domain_type: str, memory_mib: int = 48,
               description: str = "") -> str:
    """A firmware-only domain: no bootable disk, no network, no graphics, no balloon."""
    dom = ET.Element("domain", type=domain_type)
    ET.SubElement(dom, "name").text = name
    if description:
        ET.SubElement(dom, "description").text = description
    ET.SubElement(dom, "memory", unit="MiB").text = str(memory_mib)
    ET.SubElement(dom, "vcpu").text = "1"
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type").text = "hvm"
    # No <boot>: SeaBIOS finds no boot signature (the data is 0x5a) and waits in its retry loop.
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "restart"
    ET.SubElement(dom, "on_crash").text = "destroy"
    devices = ET.SubElement(dom, "devices")
    for target, path in disks.items():
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type="qcow2")
        ET.SubElement(disk, "source", file=str(Path(path).resolve()))
        ET.SubElement(disk, "target", dev=target, bus="virtio")
    ET.SubElement(devices, "controller", type="usb", model="none")
    ET.SubElement(devices, "memballoon", model="none")
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")


class VMFactory:
    """Creates test domains and removes them, their files and its tmpfs mounts on ``cleanup()``.

    Use one per test (the ``vm_factory`` fixture does); cleanup also runs at exit and on
    SIGTERM/SIGHUP for whatever a crashed test left.
    """

    def __init__(self, *, domain_type: str | None = None, memory_mib: int = 48) -> None:
        self.domain_type = domain_type or pick_domain_type()
        self.memory_mib = memory_mib
        self.vms: list[VM] = []
        self._owned = _Owned()

    def create(
        self,
        label: str = "vm",
        *,
        depth: int = 2,
        data_mib: int = 200,
        size_mib: int = 256,
        base: str | os.PathLike | None = None,
        active_dir: str | os.PathLike | None = None,
        chain: Sequence[str | os.PathLike] | None = None,
        extra_disks: Sequence[int | Sequence[str | os.PathLike]] = (),
        extra_data_mib: int = 16,
        persistent: bool = False,
        start: bool = True,
        paused: bool = False,
        name_tail: str = "",
    ) -> VM:
        """Make the images and the domain ``lbje-test-<8 hex>-<label><name_tail>``.

        ``name_tail`` goes into the domain name only, not into file names: characters a hostile
        domain creator might choose (``<img src=x onerror=...>``; libvirt refuses only ``/``).

        ``vda`` gets a fresh chain (see ``make_chain``) unless ``chain`` (top-down) is given.
        ``extra_disks`` adds vdb, vdc, ...: an int is the depth of a fresh chain holding
        ``extra_data_mib`` MiB, a sequence is a ready chain. A transient domain is created
        running (or paused); a persistent one is defined and started unless ``start=False``.
        """
        if "/" in name_tail or "\0" in name_tail:
            raise ValueError(f"libvirt refuses '/' and NUL in a domain name: {name_tail!r}")
        stem = f"{NAME_PREFIX}{uuid.uuid4().hex[:8]}-{_check_label(label)}"
        name = stem + name_tail
        workdir = IMAGES_ROOT / stem
        self._owned.add_path(workdir)  # recorded first: cleaned even if mkdir half-fails
        workdir.mkdir(parents=True)

        disks: dict[str, list[Path]] = {}
        if chain is not None:
            disks["vda"] = [Path(p) for p in chain]
        else:
            disks["vda"] = make_chain(workdir, depth, data_mib, size_mib,
                                      active_dir=active_dir, base=base,
                                      prefix="" if active_dir is None else f"{stem}-")
            if active_dir is not None:  # the overlay lives outside workdir: ours to delete
                self._owned.add_path(disks["vda"][0])
        for i, spec in enumerate(extra_disks, start=1):
            target = _disk_target(i)
            if isinstance(spec, int):
                disks[target] = make_chain(workdir, spec, extra_data_mib, max(extra_data_mib, 16),
                                           prefix=f"{target}-")
            else:
                disks[target] = [Path(p) for p in spec]

        xml_path = workdir / "domain.xml"
        xml_path.write_text(domain_xml(
            name, {t: c[0] for t, c in disks.items()}, domain_type=self.domain_type,
            memory_mib=self.memory_mib,
            description=f"libvirt-blockjob-exporter test domain (vmlib, pid {os.getpid()})",
        ))
        vm = VM(name=name, label=label, workdir=workdir, disks=disks, persistent=persistent,
                domain_type=self.domain_type, xml_path=xml_path)
        self._owned.add_domain(name, persistent)
        self.vms.append(vm)
        if persistent:
            virsh("define", xml_path)
            if start:
                self.start(vm, paused=paused)
        else:
            if not start:
                raise ValueError("a transient domain exists only while running; "
                                 "use persistent=True")
            virsh("create", xml_path, *(["--paused"] if paused else []))
        return vm

    @staticmethod
    def start(dom, paused: bool = False) -> None:
        virsh("start", _name(dom), *(["--paused"] if paused else []))

    def tmpfs_dir(self, size_mib: int) -> Path:
        """A tmpfs mount owned by this factory (unmounted after its domains are gone)."""
        return _mount_tmpfs(self._owned, size_mib)

    def images_dir(self, label: str = "images") -> Path:
        d = _new_dir(f"{_check_label(label)}-")
        self._owned.add_path(d)
        return d

    def watch_events(self, dom) -> "BlockJobEvents":
        """A started ``BlockJobEvents`` for ``dom``, stopped on cleanup."""
        w = BlockJobEvents(dom, _owner=self._owned)
        w.start()
        return w

    @property
    def names(self) -> list[str]:
        return [vm.name for vm in self.vms]

    def cleanup(self) -> list[str]:
        """Destroy/undefine our domains, unmount, delete our files; return leftovers."""
        self.vms = []
        return self._owned.cleanup()


# --------------------------------------------------------------------------------------------
# domain and job helpers (all take a domain name or a VM)


def domain_state(dom) -> str | None:
    """'running', 'paused', 'shut off', ... or None when no such domain exists."""
    res = _virsh_quiet("domstate", _name(dom))
    return res.stdout.strip() if res.returncode == 0 else None


def destroy(dom, *, missing_ok: bool = False) -> None:
    if missing_ok and domain_state(dom) in (None, "shut off"):
        return
    virsh("destroy", _name(dom))


def suspend(dom) -> None:
    virsh("suspend", _name(dom))


def resume(dom) -> None:
    virsh("resume", _name(dom))


def list_domains() -> list[str]:
    """Names of all domains, running or defined."""
    return [n for n in virsh("list", "--all", "--name").splitlines() if n.strip()]


def start_pull(dom, disk: str = "vda", bandwidth_bytes: int | None = None,
               base: str | os.PathLike | None = None) -> None:
    """``virsh blockpull``; bandwidth in bytes/s (None = unlimited), ``base`` keeps images below."""
    args = ["blockpull", _name(dom), disk]
    if bandwidth_bytes is not None:
        args += ["--bandwidth", str(int(bandwidth_bytes)), "--bytes"]
    if base is not None:
        args += ["--base", str(base)]
    virsh(*args)


def set_bandwidth(dom, disk: str, bytes_per_s: int) -> None:
    """Change a running job's cap; 1 byte/s stalls a pull after its in-flight chunk."""
    virsh("blockjob", _name(dom), disk, "--bandwidth", str(int(bytes_per_s)), "--bytes")


def abort(dom, disk: str = "vda") -> None:
    """Cancel the job (synchronous: the job is gone when this returns)."""
    virsh("blockjob", _name(dom), disk, "--abort")


def job_info(dom, disk: str = "vda") -> dict | None:
    """The active job on ``disk`` or None.

    Parses ``virsh blockjob DOM DISK --info --raw --bytes``, which prints `` type=Block Pull``,
    `` bandwidth=<bytes/s>``, `` cur=``, `` end=`` lines, or a blank line when there is no job.
    Returns {'type': virsh's name, 'job_type': exporter.model name, 'bandwidth', 'cur', 'end'}.
    """
    out = virsh("blockjob", _name(dom), disk, "--info", "--raw", "--bytes")
    fields: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep:
            fields[key] = value
    if "cur" not in fields:
        return None
    return {
        "type": fields.get("type", ""),
        "job_type": _VIRSH_JOB_TYPES.get(fields.get("type", ""), "unknown"),
        "bandwidth": int(fields.get("bandwidth", "0")),
        "cur": int(fields["cur"]),
        "end": int(fields["end"]),
    }


def wait_no_job(dom, disk: str = "vda", timeout: float = 60.0, interval: float = 0.1) -> float:
    """Wait until ``disk`` has no job; return the seconds waited. Raises TimeoutError."""
    t0 = time.monotonic()
    info = None
    while True:
        info = job_info(dom, disk)
        if info is None:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{_name(dom)}/{disk}: job still active after {timeout}s: {info}")
        time.sleep(interval)


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.1, what: str = "condition"):
    """Poll ``predicate()`` until truthy; return its value. Raises TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout}s")
        time.sleep(interval)


class Sampler:
    """Calls ``take()`` every ``interval`` in a thread for the length of a with-block.

    Results go to ``samples``, exceptions to ``errors`` (for the test to report): a sample that
    failed must not end the sampling that an assertion over the whole run relies on.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.samples: list = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=type(self).__name__)

    def take(self):
        raise NotImplementedError

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                self.samples.append(self.take())
            except Exception as e:  # noqa: BLE001 - reported by the test
                self.errors.append(repr(e))
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - began)))


def _live_disk(dom, disk: str) -> ET.Element:
    root = ET.fromstring(virsh("dumpxml", _name(dom)))
    for d in root.findall("./devices/disk"):
        target = d.find("target")
        if target is not None and target.get("dev") == disk:
            return d
    raise KeyError(f"{_name(dom)} has no disk {disk}")


def _source_path(src: ET.Element) -> str:
    return src.get("file") or src.get("dev") or src.get("dir") or ""


def active_source(dom, disk: str = "vda") -> str:
    src = _live_disk(dom, disk).find("source")
    return _source_path(src) if src is not None else ""


def backing_chain(dom, disk: str = "vda") -> list[str]:
    """Backing images below the active layer, top-down, from the live ``virsh dumpxml``.

    A chain ends with an empty ``<backingStore/>``; only elements with a ``<source>`` count.
    Non-file sources appear as "". A shut-off persistent domain's XML has no chain (libvirt
    only probes it at start), so this is meaningful for running or paused domains.
    """
    chain: list[str] = []
    node = _live_disk(dom, disk).find("backingStore")
    while node is not None:
        src = node.find("source")
        if src is None:
            break
        chain.append(_source_path(src))
        node = node.find("backingStore")
    return chain


def backing_depth(dom, disk: str = "vda") -> int:
    return len(backing_chain(dom, disk))


# --------------------------------------------------------------------------------------------
# events

_EVENT_RE = re.compile(
    r"^(?P<ts>\S+ \S+): event '(?P<event>block-job(?:-2)?)' for domain '(?P<domain>[^']*)': "
    r"(?P<type>.+?) for (?P<disk>.+) (?P<status>completed|failed|canceled|ready)$"
)


class BlockJobEvents:
    """Records a domain's block-job events via ``virsh event --loop`` (the operator's view).

    ``start()`` returns only once virsh is subscribed: it changes the domain's description and
    waits for the resulting metadata-change event, so no job event can slip by before it.
    Each event is a dict: event ('block-job-2' names the target, 'block-job' the file), domain,
    type (virsh's name), job_type, disk, status ('completed', 'failed', 'canceled', 'ready').
    """

    def __init__(self, dom, *, _owner: _Owned | None = None) -> None:
        self.domain = _name(dom)
        self.events: list[dict] = []
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._own_owner = _owner is None
        self._owner = _owner or _Owned()
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 15.0) -> "BlockJobEvents":
        self._proc = subprocess.Popen(
            ["virsh", "-c", URI, "event", "--domain", self.domain, "--all", "--loop",
             "--timestamp"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
        )
        self._owner.add_proc(self._proc)
        self._thread = threading.Thread(target=self._read, daemon=True,
                                        name=f"virsh-event-{self.domain}")
        self._thread.start()
        deadline = time.monotonic() + timeout
        while True:
            virsh("desc", self.domain, "--new-desc", f"lbje event sync {uuid.uuid4().hex[:8]}")
            with self._cond:
                if self._cond.wait_for(lambda: any("metadata-change" in l for l in self.lines),
                                       timeout=0.5):
                    return self
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"virsh event for {self.domain} did not subscribe")

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            line = line.rstrip("\n")
            m = _EVENT_RE.match(line)
            with self._cond:
                self.lines.append(line)
                if m:
                    ev = m.groupdict()
                    ev["job_type"] = _VIRSH_JOB_TYPES.get(ev["type"], "unknown")
                    self.events.append(ev)
                self._cond.notify_all()

    def wait_for(self, disk: str = "vda", status: str | None = None,
                 timeout: float = 30.0) -> dict:
        """First block-job-2 event for ``disk`` (with ``status`` if given). Raises TimeoutError."""
        def match():
            for ev in self.events:
                if ev["event"] == "block-job-2" and ev["disk"] == disk and (
                        status is None or ev["status"] == status):
                    return ev
            return None
        with self._cond:
            ev = self._cond.wait_for(match, timeout=timeout)
        if ev is None:
            raise TimeoutError(f"no block-job-2 event for {self.domain}/{disk} "
                               f"(status {status}) in {timeout}s; saw {self.events}")
        return ev

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc)
        if self._thread is not None:
            self._thread.join(5)
        if self._own_owner:
            self._owner.cleanup()

    def __enter__(self) -> "BlockJobEvents":
        return self.start() if self._proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def domains_with_job(doms, disk: str = "vda") -> set[str]:
    """The names among ``doms`` whose ``disk`` has an active job, read by one ``virsh`` process (one
    sample of many domains at nearly the same moment)."""
    names = [_name(d) for d in doms]
    script = " ; ".join(f"echo @{n} ; blockjob {n} {disk} --info --raw --bytes" for n in names)
    busy, current = set(), None
    for line in virsh(script).splitlines():
        line = line.strip()
        if line.startswith("@"):
            current = line[1:]
        elif line.startswith("cur=") and current is not None:
            busy.add(current)
    return busy


def recreate(vm: VM, paused: bool = True) -> None:
    """Create a transient domain again from its XML (same name, same UUID-less XML: a new UUID)."""
    virsh("create", vm.xml_path, *(["--paused"] if paused else []))


def add_layer(vm: VM, label: str, disk: str = "vda") -> Path:
    """A fresh external overlay on ``disk``: one more backing image to pull."""
    path = vm.workdir / f"{label}.qcow2"
    virsh("snapshot-create-as", vm.name, "--disk-only", "--no-metadata", "--atomic",
          "--diskspec", f"{disk},file={path}")
    return path


def qemu_pid(vm) -> int:
    return int(Path(f"/run/libvirt/qemu/{_name(vm)}.pid").read_text().strip())
