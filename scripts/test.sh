#!/usr/bin/env bash
# Runs the whole test suite on the real stack: sets up libvirtd + QEMU, Prometheus, Alertmanager
# and a virtualenv first (idempotent). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-host.sh --with-prometheus
source scripts/venv.sh test
# Tests that need the real stack must fail, not skip, when it is missing.
export LBJE_REQUIRE_LIBVIRT=1 LBJE_REQUIRE_TOOLS=1
exec "$VENV_PY" -m pytest -q -p no:cacheprovider "$@"
