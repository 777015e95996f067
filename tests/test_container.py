"""The Dockerfile, really built with rootful podman and run against the host's libvirtd.

No image registry can be reached from the test machines, so the base image the Dockerfile names
in FROM is made here: a Debian bookworm minbase (debootstrap, from the mirror apt uses) with
Python 3.11, pip, Python's headers and the host's CA bundle (outbound HTTPS goes through a proxy
whose CA only the host's bundle has), imported under that name and built with ``--pull=never``.
It is kept between runs and made again only when its recipe or the host's CAs change.

Everything lives in a private podman store under ``LBJE_CONTAINER_CACHE`` (default
/var/cache/libvirt-blockjob-exporter-test), so the host's own images and containers are never
touched. The image and containers a run makes have unique names and go at its end, failed or
not; the next run also removes anything a killed run left in the private store.

``LBJE_SKIP_CONTAINER=1`` skips this module, and says so.

libvirtd on the test machines cannot reach polkit (no D-Bus), so it admits only root, even on the
read-only socket. The live test therefore runs two containers: the image as built (uid 10001, no
capabilities) behind a root-owned relay to the host's read-only socket, and the image as root
with the host's socket directory mounted as the README says.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import selectors
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

import vmlib
from exporter import __version__
from exporterlib import Metrics, free_port, job_labels

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
SKIP_ENV = "LBJE_SKIP_CONTAINER"
CACHE = Path(os.environ.get("LBJE_CONTAINER_CACHE", "/var/cache/libvirt-blockjob-exporter-test"))
RUNROOT = Path("/run/libvirt-blockjob-exporter-test")
PREFIX = "lbje-test-"
HOST_LIBVIRT_DIR = "/var/run/libvirt"
RO_SOCKET = "libvirt-sock-ro"
IMAGE_UID = "10001"

# The stand-in for python:3.11-slim-bookworm: what the Dockerfile's steps use from it.
BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-pip", "libpython3.11-dev", "ca-certificates")
BASE_RECIPE_VERSION = "1"
RECIPE_LABEL = "lbje-test.base-recipe"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
HOST_LOCAL_CAS = Path("/usr/local/share/ca-certificates")
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")

CONTAINERS_CONF = """\
# Written by tests/test_container.py.
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
"""


# --------------------------------------------------------------------------------------------
# podman in a private store


class Podman:
    def __init__(self) -> None:
        (CACHE / "containers.conf").write_text(CONTAINERS_CONF)
        (CACHE / "storage.conf").write_text(
            "# Written by tests/test_container.py: a store of the test's own.\n"
            f'[storage]\ndriver = "overlay"\ngraphroot = "{CACHE / "storage"}"\n'
            f'runroot = "{RUNROOT / "storage"}"\n')
        self.env = {**os.environ, "CONTAINERS_CONF": str(CACHE / "containers.conf"),
                    "CONTAINERS_STORAGE_CONF": str(CACHE / "storage.conf")}

    def run(self, *args: str, timeout: float = 120, check: bool = True, nice: bool = False,
            stdin=None) -> subprocess.CompletedProcess:
        cmd = [*(["nice", "-n", "19"] if nice else []), "podman", *args]
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=stdin is None, timeout=timeout,
                           stdin=stdin)
        if check and r.returncode != 0:
            out = r.stdout if isinstance(r.stdout, str) else r.stdout.decode(errors="replace")
            err = r.stderr if isinstance(r.stderr, str) else r.stderr.decode(errors="replace")
            raise AssertionError(f"podman {' '.join(args[:3])} ... exited {r.returncode}:\n{out[-3000:]}{err[-3000:]}")
        return r

    def out(self, *args: str, **kw) -> str:
        return self.run(*args, **kw).stdout.strip()

    def sweep(self) -> list[str]:
        """Remove every container, volume and image but the base images in the private store:
        all were made by this module; killed runs leave theirs."""
        removed = []
        for name in self.out("ps", "-a", "--format", "{{.Names}}").split():
            if name.startswith(PREFIX):
                self.run("rm", "-f", "-t", "0", "-v", name, check=False)
                removed.append(name)
        for name in self.out("volume", "ls", "--format", "{{.Name}}").split():
            if name.startswith(PREFIX):
                self.run("volume", "rm", "-f", name, check=False)
                removed.append(name)
        for ref in self.out("images", "--format", "{{.Repository}}:{{.Tag}}").split():
            if ref.startswith(f"localhost/{PREFIX}"):
                self.run("rmi", "-f", ref, check=False)
                removed.append(ref)
        self.run("image", "prune", "-f", check=False)  # untagged build stages
        for work in [*CACHE.glob("relay-*"), *CACHE.glob("base-*")]:
            _remove_tree(work)
            removed.append(str(work))
        return removed


def _lock(path: Path, timeout: float = 480) -> int:
    """One run at a time uses the private store (a sweep would remove another run's image)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise TimeoutError(f"{path} stayed locked for {timeout}s")
            time.sleep(1)


# --------------------------------------------------------------------------------------------
# the base image


def _base_image() -> str:
    """The one image every FROM names, as podman stores it."""
    froms = {line.split()[1] for line in DOCKERFILE.read_text().splitlines()
             if line.strip().upper().startswith("FROM ")}
    stage_names = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", DOCKERFILE.read_text(), re.M | re.I))
    bases = froms - stage_names
    assert len(bases) == 1, f"expected one base image, the Dockerfile names {sorted(bases)}"
    name = bases.pop()
    first, _, rest = name.partition("/")
    if not rest:
        return f"docker.io/library/{name}"
    if "." in first or ":" in first or first == "localhost":
        return name
    return f"docker.io/{name}"


def _apt_entries() -> list[tuple[str, list[str]]]:
    """(URI, suites) of the host's enabled deb sources, one-line and deb822."""
    out: list[tuple[str, list[str]]] = []
    apt = Path("/etc/apt")
    for path in [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]:
        if path.is_file():
            for line in path.read_text().splitlines():
                words = re.sub(r"\[[^]]*\]", "", line.split("#")[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    out.append((words[1], [words[2]]))
    for path in sorted((apt / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[0].isspace():
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if ("deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no"
                    and fields.get("uris") and fields.get("suites")):
                for uri in fields["uris"].split():
                    out.append((uri, fields["suites"].split()))
    return out


def _mirrors() -> tuple[str, str]:
    """The Debian mirror and security mirror apt uses here (deb.debian.org's when none found)."""
    entries = _apt_entries()
    main = next((u for u, s in entries if BASE_SUITE in s), "http://deb.debian.org/debian")
    security = next((u for u, s in entries if f"{BASE_SUITE}-security" in s),
                    "http://deb.debian.org/debian-security")
    return main, security


def _recipe_key(mirror: str, security: str) -> str:
    h = hashlib.sha256()
    for part in (BASE_RECIPE_VERSION, BASE_SUITE, " ".join(BASE_PACKAGES), mirror, security):
        h.update(part.encode() + b"\0")
    if HOST_CA_BUNDLE.is_file():
        h.update(HOST_CA_BUNDLE.read_bytes())
    for ca in sorted(HOST_LOCAL_CAS.glob("**/*.crt")):
        h.update(ca.read_bytes())
    return h.hexdigest()[:16]


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if (p + "/").startswith(prefix)]


def _remove_tree(rootfs: Path) -> None:
    """Delete a directory of ours; debootstrap mounts /proc (and may bind /dev) in its target, so
    never through a mount."""
    for point in sorted(_mounts_under(rootfs), reverse=True):
        subprocess.run(["umount", "--lazy", point], check=False)
    left = _mounts_under(rootfs)
    assert not left, f"still mounted under {rootfs}, not removed: {left}"
    shutil.rmtree(rootfs, ignore_errors=True)


def _build_base(podman: Podman, name: str, key: str, mirror: str, security: str) -> None:
    work = Path(tempfile.mkdtemp(prefix="base-", dir=CACHE))
    rootfs = work / "rootfs"
    try:
        log = work / "debootstrap.log"
        with open(log, "w") as f:
            r = subprocess.run(["nice", "-n", "19", "debootstrap", "--variant=minbase",
                                "--include=" + ",".join(BASE_PACKAGES), BASE_SUITE, str(rootfs), mirror],
                               stdout=f, stderr=subprocess.STDOUT, timeout=1200)
        assert r.returncode == 0, f"debootstrap failed:\n{log.read_text()[-4000:]}"
        # Like the official image: sources in deb822, pip free to install into the system.
        (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
        keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
        (rootfs / "etc/apt/sources.list.d/debian.sources").write_text(
            f"Types: deb\nURIs: {mirror}\nSuites: {BASE_SUITE} {BASE_SUITE}-updates\nComponents: main\n"
            f"Signed-By: {keyring}\n\n"
            f"Types: deb\nURIs: {security}\nSuites: {BASE_SUITE}-security\nComponents: main\n"
            f"Signed-By: {keyring}\n")
        for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
            marker.unlink()
        # The host's CAs, also where update-ca-certificates (run by a later apt-get) finds them.
        if HOST_CA_BUNDLE.is_file():
            shutil.copy2(HOST_CA_BUNDLE, rootfs / "etc/ssl/certs/ca-certificates.crt")
        if HOST_LOCAL_CAS.is_dir():
            shutil.copytree(HOST_LOCAL_CAS, rootfs / HOST_LOCAL_CAS.relative_to("/"), dirs_exist_ok=True)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (rootfs / junk).glob("*"):
                if entry.is_file():
                    entry.unlink()
        assert not _mounts_under(rootfs), _mounts_under(rootfs)
        tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(rootfs), "--exclude=./dev/*",
                                "--exclude=./proc/*", "--exclude=./sys/*", "-c", "."], stdout=subprocess.PIPE)
        try:
            podman.run("rmi", "-f", name, check=False)  # an older recipe's
            podman.run("import", "--change", 'CMD ["python3"]', "--change", "ENV LANG=C.UTF-8",
                       "--change", f"LABEL {RECIPE_LABEL}={key}", "-", name, stdin=tar.stdout,
                       timeout=600, nice=True)
        finally:
            tar.stdout.close()
            assert tar.wait(timeout=60) == 0, "tar of the base rootfs failed"
    finally:
        _remove_tree(rootfs)
        shutil.rmtree(work, ignore_errors=True)


def _ensure_base(podman: Podman) -> str:
    name = _base_image()
    mirror, security = _mirrors()
    key = _recipe_key(mirror, security)
    have = podman.run("image", "inspect", "--format", f'{{{{index .Config.Labels "{RECIPE_LABEL}"}}}}', name,
                      check=False)
    if have.returncode == 0 and have.stdout.strip() == key:
        return f"reused {name}"
    start = time.monotonic()
    _build_base(podman, name, key, mirror, security)
    return f"made {name} from {mirror} in {time.monotonic() - start:.0f}s"


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def podman():
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1: the container image is neither built nor run")
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if missing or os.geteuid() != 0:
        msg = (f"missing {' '.join(missing)} (scripts/test.sh installs them)" if missing
               else "not root: the image is built with rootful podman")
        if os.environ.get("LBJE_REQUIRE_TOOLS") or os.environ.get("CI"):
            pytest.fail(f"{msg}; set {SKIP_ENV}=1 to skip the container test", pytrace=False)
        pytest.skip(msg)
    CACHE.mkdir(parents=True, exist_ok=True)
    fd = _lock(CACHE / "lock")
    try:
        engine = Podman()
        left = engine.sweep()
        if left:
            print(f"removed what an earlier run left: {' '.join(left)}")
        try:
            yield engine
        finally:
            engine.sweep()
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def image(podman):
    start = time.monotonic()
    print(f"base image: {_ensure_base(podman)}")
    tag = f"localhost/{PREFIX}image:{uuid.uuid4().hex[:8]}"
    args = ["build", "--pull=never", "--force-rm", "--layers=false", "-t", tag, "-f", str(DOCKERFILE)]
    for var in PROXY_VARS:
        if os.environ.get(var):
            args += ["--build-arg", f"{var}={os.environ[var]}"]
    build = time.monotonic()
    try:
        podman.run(*args, str(ROOT), timeout=1200, nice=True)
        print(f"image {tag} built in {time.monotonic() - build:.0f}s ({time.monotonic() - start:.0f}s in all)")
        yield tag
    finally:
        podman.run("rmi", "-f", tag, check=False)


# --------------------------------------------------------------------------------------------
# a relay to libvirt's read-only socket


class SocketRelay:
    """A UNIX socket in ``directory`` that forwards each connection to ``upstream``; libvirtd sees
    this (root) process as the client."""

    def __init__(self, directory: Path, upstream: str) -> None:
        self.upstream = upstream
        self.path = directory / RO_SOCKET
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.path))
        os.chmod(self.path, 0o777)
        self.listener.listen(16)
        self.listener.settimeout(0.2)
        self.closed = threading.Event()
        self.sockets: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                server.connect(self.upstream)
            except OSError:
                client.close()
                server.close()
                continue
            self.sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peer = {a: b, b: a}
        with selectors.DefaultSelector() as sel:
            sel.register(a, selectors.EVENT_READ)
            sel.register(b, selectors.EVENT_READ)
            try:
                while not self.closed.is_set():
                    for key, _ in sel.select(timeout=0.2):
                        data = key.fileobj.recv(65536)
                        if not data:
                            return
                        peer[key.fileobj].sendall(data)
            except OSError:
                return
            finally:
                a.close()
                b.close()

    def close(self) -> None:
        self.closed.set()
        self.thread.join(timeout=5)
        self.listener.close()
        for s in self.sockets:
            s.close()


# --------------------------------------------------------------------------------------------
# tests


def test_image_runs_as_non_root(podman, image):
    assert podman.out("image", "inspect", "--format", "{{.Config.User}}", image) == f"{IMAGE_UID}:{IMAGE_UID}"
    ids = podman.out("run", "--rm", "--pull=never", "--entrypoint", "id", image)
    assert ids.startswith(f"uid={IMAGE_UID}(exporter) gid={IMAGE_UID}(exporter)"), ids
    state = podman.out("run", "--rm", "--pull=never", "--entrypoint", "stat", image, "-c", "%u:%g:%a",
                       "/var/lib/libvirt-blockjob-exporter")
    assert state == f"{IMAGE_UID}:{IMAGE_UID}:750"


def test_version(podman, image):
    r = podman.run("run", "--rm", "--pull=never", image, "--version")
    assert r.stdout.strip() == f"libvirt-blockjob-exporter {__version__}", r.stdout + r.stderr


def _scrape(port: int) -> Metrics:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return Metrics(response.read().decode())


def _wait(podman: Podman, name: str, port: int, predicate, what: str, timeout: float = 90) -> Metrics:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = _scrape(port)
            if predicate(last):
                return last
        except OSError as err:
            last = err
        time.sleep(0.3)
    logs = podman.run("logs", name, check=False)
    raise AssertionError(f"{name}: {what} not seen within {timeout}s; last scrape: "
                         f"{getattr(last, 'text', last)!s:.2000}\n--- container log ---\n"
                         f"{(logs.stdout + logs.stderr)[-4000:]}")


@pytest.mark.libvirt
def test_serves_a_live_job_from_the_hosts_libvirt(podman, image, vm_factory):
    vm = vm_factory.create("container", depth=1, data_mib=16, paused=True)
    suffix = uuid.uuid4().hex[:8]
    relayed, direct, volume = f"{PREFIX}relayed-{suffix}", f"{PREFIX}direct-{suffix}", f"{PREFIX}state-{suffix}"
    relay_dir = Path(tempfile.mkdtemp(prefix="relay-", dir=CACHE))  # a killed run's goes at the next sweep
    os.chmod(relay_dir, 0o755)
    relay = SocketRelay(relay_dir, os.path.join(HOST_LIBVIRT_DIR, RO_SOCKET))
    ports = {relayed: free_port(), direct: free_port()}
    pulled = False
    try:
        # As built: uid 10001, no capabilities, state on a volume; libvirtd sees the relay.
        podman.run("run", "-d", "--pull=never", "--name", relayed, "--cap-drop=ALL",
                   "-p", f"127.0.0.1:{ports[relayed]}:9478", "-v", f"{relay_dir}:{HOST_LIBVIRT_DIR}:ro",
                   "-v", f"{volume}:/var/lib/libvirt-blockjob-exporter", image)
        # The README's mount of the host's socket directory, as root: the only user this
        # polkit-less libvirtd admits.
        podman.run("run", "-d", "--pull=never", "--name", direct, "--user", "0:0", "--cap-drop=ALL",
                   "-p", f"127.0.0.1:{ports[direct]}:9478", "-v", f"{HOST_LIBVIRT_DIR}:{HOST_LIBVIRT_DIR}:ro",
                   image)
        for name, port in ports.items():
            _wait(podman, name, port, lambda m: m.get("libvirt_blockjob_up") == 1, "libvirt_blockjob_up 1")

        vmlib.start_pull(vm, "vda", bandwidth_bytes=1)
        pulled = True
        labels = job_labels(vm.name)
        for name, port in ports.items():
            m = _wait(podman, name, port,
                      lambda m: m.get("libvirt_blockjob_bandwidth_bytes_per_second", labels) == 1
                      and (m.get("libvirt_blockjob_cursor_end", labels) or 0) > 0,
                      f"the live pull on {vm.name}")
            assert m.get("libvirt_blockjob_up") == 1
            assert m.get("libvirt_blockjob_backing_chain_depth", {"domain": vm.name, "disk": "vda"}) == 1

        # As built, the image runs clean: the only warning is the first start's missing state file.
        logs = podman.run("logs", relayed)
        log = logs.stdout + logs.stderr
        print(f"--- {relayed} log ---\n{log}")
        noisy = [ln for ln in log.splitlines() if re.search(r"level=(WARNING|ERROR|CRITICAL)", ln)
                 and "does not exist: starting clean" not in ln]
        assert not noisy, "\n".join(noisy)

        # The state file is written to the volume by the image's user.
        mountpoint = Path(podman.out("volume", "inspect", "--format", "{{.Mountpoint}}", volume))
        vmlib.wait_for(lambda: vm.name in (mountpoint / "state.json").read_text(errors="replace")
                       if (mountpoint / "state.json").exists() else False,
                       timeout=30, what="the state file on the volume")
        assert (mountpoint / "state.json").stat().st_uid == int(IMAGE_UID)
    finally:
        try:
            if pulled and vmlib.job_info(vm) is not None:
                vmlib.abort(vm, "vda")
        finally:
            for name in (relayed, direct):
                podman.run("rm", "-f", "-t", "2", name, check=False)
            podman.run("volume", "rm", "-f", volume, check=False)
            relay.close()
            shutil.rmtree(relay_dir, ignore_errors=True)
