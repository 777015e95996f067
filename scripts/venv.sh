#!/usr/bin/env bash
# Sourced by run.sh and test.sh: makes .venv with the project installed (editable) and its extras.
# Usage: source scripts/venv.sh [extra]   -> sets VENV_PY
set -euo pipefail
_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_extra=${1:-}

# libvirt-python compiles against libvirt's headers: it needs a C compiler and Python's headers.
_need=()
command -v gcc >/dev/null || _need+=(gcc)
python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || _need+=(python3-dev)
python3 -c 'import ensurepip' 2>/dev/null || _need+=(python3-venv)
if [ "${#_need[@]}" -gt 0 ]; then
  echo "venv.sh: installing ${_need[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${_need[@]}" >/dev/null
fi

if [ ! -x "$_repo/.venv/bin/python" ]; then
  python3 -m venv "$_repo/.venv"
fi
VENV_PY="$_repo/.venv/bin/python"
_stamp="$_repo/.venv/.installed-$(cat "$_repo/pyproject.toml" | sha256sum | cut -c1-16)${_extra:+-$_extra}"
if [ ! -e "$_stamp" ]; then
  "$VENV_PY" -m pip install -q --upgrade pip >/dev/null
  if [ -n "$_extra" ]; then
    "$VENV_PY" -m pip install -q -e "$_repo[$_extra]"
  else
    "$VENV_PY" -m pip install -q -e "$_repo"
  fi
  touch "$_stamp"
fi
export VENV_PY
