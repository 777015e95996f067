"""Fixtures shared by the unit, integration and e2e tests.

Tests marked ``libvirt`` (or using the VM fixtures) skip when qemu:///system is unreachable,
except under ``LBJE_REQUIRE_LIBVIRT=1``, where they fail: CI must never pass by skipping.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

# Lets tests, the benchmark and e2e say ``import vmlib`` however pytest imports this directory.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import vmlib  # noqa: E402

# Hypothesis (the property tests): CI runs a fixed, derandomized set of examples with no example
# database, so every run tries the same inputs and a failure reproduces from its printed blob.
# LBJE_HYPOTHESIS_PROFILE=long runs many more random examples on demand.
try:
    from hypothesis import HealthCheck, Phase, settings
except ImportError:  # only the property tests need it (the test extra installs it)
    pass
else:
    _common = dict(database=None, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow],
                   phases=[p for p in Phase if p is not Phase.explain])  # explain costs minutes on a failure
    settings.register_profile("ci", max_examples=200, derandomize=True, **_common)
    settings.register_profile("long", max_examples=5000, derandomize=False, **_common)
    settings.load_profile(os.environ.get("LBJE_HYPOTHESIS_PROFILE", "ci"))

_status: tuple[bool, str] | None = None


def libvirt_required() -> None:
    """Skip (or, under LBJE_REQUIRE_LIBVIRT=1, fail) unless real libvirtd + QEMU can be used."""
    global _status
    if _status is None:
        # A few tries: libvirtd may be restarting (a test that stops it, or setup-host.sh).
        for attempt in range(10):
            ok, reason = vmlib.libvirt_available()
            if ok or "No such file" not in reason and "Connection refused" not in reason:
                break
            time.sleep(0.5)
        if ok and os.geteuid() != 0:
            ok, reason = False, "not root: test domains need qemu:///system, mounts and image dirs"
        _status = (ok, reason)
    ok, reason = _status
    if ok:
        return
    if os.environ.get("LBJE_REQUIRE_LIBVIRT") == "1":
        pytest.fail(f"LBJE_REQUIRE_LIBVIRT=1 but libvirt is unusable: {reason}", pytrace=False)
    pytest.skip(f"libvirt unusable ({reason}); run scripts/setup-host.sh")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("libvirt") is not None:
        libvirt_required()


@pytest.fixture
def vm_factory():
    """A ``vmlib.VMFactory``; its domains, files and mounts go at teardown, even on failure."""
    libvirt_required()
    factory = vmlib.VMFactory()
    try:
        yield factory
    finally:
        problems = factory.cleanup()
        if problems:
            pytest.fail("vm_factory cleanup left: " + "; ".join(problems), pytrace=False)


@pytest.fixture
def tmpfs_dir(vm_factory):
    """``tmpfs_dir(size_mib) -> Path``: unmounted once the test's domains are gone."""
    return vm_factory.tmpfs_dir


@pytest.fixture
def tmp_images():
    """A fresh /var/lib/libvirt/images/lbje-test-images-*/ (qemu can read it), removed after."""
    with vmlib.images_dir("images") as path:
        yield path


@pytest.fixture
def exporter(request):
    """``exporter(*args, connected=False, **kw)`` starts ``python -m exporter`` (exporterlib.Exporter);
    with ``connected`` it returns once the exporter has connected and polled once. All are stopped
    at teardown; their logs are kept (and named) when the test failed."""
    from exporterlib import Exporter

    started: list = []
    failed_before = request.session.testsfailed

    def make(*args: str, connected: bool = False, **kw):
        instance = Exporter(*args, **kw)
        started.append(instance)
        if connected:  # a busy shared host can take many seconds to list every domain
            instance.wait_value("libvirt_blockjob_poll_cycles_total", None, lambda v: v and v >= 1, timeout=90,
                                what="connected and polled once")
        return instance

    yield make
    failed = request.session.testsfailed != failed_before
    for instance in started:
        instance.stop(keep_log=failed)
        if failed:
            print(f"exporter log: {instance.log.name}")


@pytest.fixture
def libvirtd_restarts():
    """For tests that stop libvirtd: skipped with LBJE_SKIP_LIBVIRTD_RESTART=1, and libvirtd is
    started again whatever happened."""
    from exporterlib import start_libvirtd

    if os.environ.get("LBJE_SKIP_LIBVIRTD_RESTART") == "1":
        pytest.skip("LBJE_SKIP_LIBVIRTD_RESTART=1")
    yield
    start_libvirtd()


@pytest.fixture
def zookeeper():
    """A ``zklib.ZooKeeper``: a real server on its own port and data dir, stopped at teardown even on
    failure (skips, or fails under LBJE_REQUIRE_TOOLS=1, without Debian's zookeeper)."""
    from zklib import ZooKeeper

    zk = ZooKeeper()
    try:
        yield zk
    finally:
        problems = zk.close()
        if problems:
            pytest.fail("zookeeper cleanup left: " + "; ".join(problems), pytrace=False)
