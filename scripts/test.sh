#!/usr/bin/env bash
# Runs the whole test suite on the real stack: sets up libvirtd + QEMU, Prometheus, Alertmanager
# and a virtualenv first (idempotent), then a 5-minute soak. Extra arguments go to pytest (and
# skip the soak).
set -euo pipefail
cd "$(dirname "$0")/.."
setup_args=(--with-prometheus --with-systemd)
if [ "${LBJE_SKIP_CONTAINER:-}" = 1 ]; then
  echo "test.sh: LBJE_SKIP_CONTAINER=1: the container image is neither built nor run (tests/test_container.py skips)" >&2
else
  setup_args+=(--with-podman)
fi
bash scripts/setup-host.sh "${setup_args[@]}"
source scripts/venv.sh test
# Tests that need the real stack must fail, not skip, when it is missing.
export LBJE_REQUIRE_LIBVIRT=1 LBJE_REQUIRE_TOOLS=1
"$VENV_PY" -m pytest -q -p no:cacheprovider "$@"
# The whole suite ends with the soak's short form (issue 14); a run of chosen tests does not.
if [ "$#" -eq 0 ]; then
  if [ "${LBJE_SKIP_SOAK:-}" = 1 ]; then
    echo "test.sh: LBJE_SKIP_SOAK=1: the soak (bench/soak.py) is not run" >&2
  else
    "$VENV_PY" -m bench.soak --minutes "${LBJE_SOAK_MINUTES:-5}" --seed "${LBJE_SOAK_SEED:-7}"
  fi
fi
