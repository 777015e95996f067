"""config/systemd/: the unit and its enforce drop-in pass ``systemd-analyze verify`` without a
warning, ``systemd-analyze security --offline=true`` rates them under 2.0, and the hardening the
README promises is there.

There is no systemd running on the test machines, so the unit is checked offline, not started.
``systemd-analyze verify`` refuses an ExecStart= binary that does not exist, so the checked copy
points at the entry point of the environment running the tests instead of /opt's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.cli import DEFAULT_STATE_FILE, build_parser

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "config" / "systemd"
UNIT_NAME = "libvirt-blockjob-exporter.service"
UNIT = SYSTEMD / UNIT_NAME
DROPIN_DIR = SYSTEMD / f"{UNIT_NAME}.d"
ENFORCE = DROPIN_DIR / "enforce.conf"
DEFAULTS = SYSTEMD / "libvirt-blockjob-exporter.default"
INSTALLED_BIN = "/opt/libvirt-blockjob-exporter/bin/libvirt-blockjob-exporter"
MAX_EXPOSURE = 2.0


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        msg = "systemd-analyze not found; apt-get install systemd (scripts/test.sh does)"
        if os.environ.get("LBJE_REQUIRE_TOOLS") or os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return exe


def _entry_point() -> Path:
    exe = Path(sys.executable).parent / "libvirt-blockjob-exporter"
    assert exe.is_file() and os.access(exe, os.X_OK), f"{exe}: install the project (scripts/venv.sh)"
    return exe


def _directives(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; systemd allows a key more than once."""
    out, section = [], ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not a directive: {line!r}"
        out.append((section, key.strip(), value.strip()))
    return out


def _values(path: Path, key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in _directives(path) if s == section and k == key]


def _one(path: Path, key: str, section: str = "Service") -> str:
    values = _values(path, key, section)
    assert len(values) == 1, f"{path.name}: {key}= set {len(values)} times"
    return values[0]


def _install(tmp_path: Path, *, with_enforce: bool, extra_dropin: str = "") -> Path:
    """The unit (and drop-ins) laid out as under /etc/systemd/system, ExecStart made to exist."""
    exe = str(_entry_point())
    unit = tmp_path / UNIT_NAME
    unit.write_text(UNIT.read_text().replace(INSTALLED_BIN, exe))
    if with_enforce or extra_dropin:
        (tmp_path / f"{UNIT_NAME}.d").mkdir()
    if with_enforce:
        (tmp_path / f"{UNIT_NAME}.d" / "enforce.conf").write_text(ENFORCE.read_text().replace(INSTALLED_BIN, exe))
    if extra_dropin:
        (tmp_path / f"{UNIT_NAME}.d" / "zz-extra.conf").write_text(extra_dropin)
    return unit


def _verify(unit: Path) -> subprocess.CompletedProcess:
    # --man=no: the unit names no man page; verify would otherwise look for Documentation=man:.
    return subprocess.run([_systemd_analyze(), "verify", "--man=no", str(unit)], capture_output=True,
                          text=True, timeout=120)


def _exposure(unit: Path) -> tuple[float, str]:
    r = subprocess.run([_systemd_analyze(), "security", "--offline=true", "--no-pager", str(unit)],
                       capture_output=True, text=True, timeout=120)
    found = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", r.stdout)
    assert found, f"no overall exposure level (exit {r.returncode}):\n{r.stdout}{r.stderr}"
    return float(found.group(1)), r.stdout


@pytest.mark.parametrize("with_enforce", [False, True], ids=["read-only", "enforce-dropin"])
def test_verify_is_clean(tmp_path, with_enforce):
    r = _verify(_install(tmp_path, with_enforce=with_enforce))
    assert r.returncode == 0 and (r.stdout + r.stderr).strip() == "", r.stdout + r.stderr


def test_verify_reads_the_dropins(tmp_path):
    """Guards the check above: a drop-in laid out this way is read, so its warnings would show."""
    r = _verify(_install(tmp_path, with_enforce=True, extra_dropin="[Service]\nNoSuchDirective=1\n"))
    assert "NoSuchDirective" in r.stdout + r.stderr


@pytest.mark.parametrize("with_enforce", [False, True], ids=["read-only", "enforce-dropin"])
def test_security_exposure_under_2(tmp_path, with_enforce):
    level, report = _exposure(_install(tmp_path, with_enforce=with_enforce))
    print(f"systemd-analyze security --offline=true ({'with' if with_enforce else 'without'} enforce.conf): "
          f"{level}")
    assert level < MAX_EXPOSURE, report


def test_hardening_the_readme_promises():
    assert _one(UNIT, "User") == "libvirt-blockjob-exporter"
    assert _one(UNIT, "Group") == "libvirt-blockjob-exporter"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "Restart": "on-failure", "RestartPreventExitStatus": "2",
                       "CapabilityBoundingSet": "",
                       "AmbientCapabilities": ""}.items():
        assert _one(UNIT, key) == value, key
    assert _one(UNIT, "RestrictAddressFamilies").split() == ["AF_UNIX", "AF_INET", "AF_INET6"]
    # The default --state.file must lie in the one directory ProtectSystem=strict leaves writable.
    state_dir = _one(UNIT, "StateDirectory")
    assert os.path.dirname(DEFAULT_STATE_FILE) == f"/var/lib/{state_dir}"
    assert _values(UNIT, "ReadWritePaths") == []
    # Not ProcSubset=pid: prometheus_client reads the boot time from /proc/stat for
    # process_start_time_seconds, which the failure alert relies on.
    assert _values(UNIT, "ProcSubset") == []
    assert _values(UNIT, "SupplementaryGroups") == [], "the read-only unit needs no group"


def test_arguments_come_from_the_environment_file():
    assert _one(UNIT, "EnvironmentFile") == "-/etc/default/libvirt-blockjob-exporter"
    exec_start = _one(UNIT, "ExecStart").split()
    assert exec_start == [INSTALLED_BIN, "$ARGS"]  # $ARGS unbraced: split into words
    assert "--policy.enforce" not in DEFAULTS.read_text().split("ARGS=")[-1]


def test_environment_file_is_valid_and_lists_every_flag():
    lines = [ln for ln in DEFAULTS.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(lines) == 1 and re.fullmatch(r'ARGS="[^"\\$`]*"', lines[0]), lines
    args = lines[0][len('ARGS="'):-1].split()
    build_parser().parse_args(args)  # the shipped arguments are accepted
    documented = set(re.findall(r"^#\s+(--[a-z][\w.-]*)", DEFAULTS.read_text(), re.M))
    known = {opt for action in build_parser()._actions for opt in action.option_strings
             if opt.startswith("--") and opt not in ("--help", "--version")}
    assert documented == known, f"undocumented: {sorted(known - documented)}, unknown: {sorted(documented - known)}"


def test_enforce_dropin_grants_the_read_write_socket():
    assert _values(ENFORCE, "SupplementaryGroups") == ["libvirt"]
    exec_start = _values(ENFORCE, "ExecStart")
    assert exec_start[0] == "", "ExecStart= must be reset before it is replaced"
    assert len(exec_start) == 2
    assert exec_start[1].split() == [INSTALLED_BIN, "$ARGS", "--policy.enforce"]
    # Nothing in the drop-in loosens the unit's sandbox.
    assert {k for _, k, _ in _directives(ENFORCE)} == {"SupplementaryGroups", "ExecStart"}
