#!/usr/bin/env bash
# Runs the exporter. On a bare machine it first brings up libvirtd + QEMU and, when no other
# domain is running, a demo VM with a backing chain and a slow block pull to watch.
# Extra arguments go to the exporter (e.g. --web.listen-address=:9478). LBJE_DEMO=0 skips the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-host.sh
source scripts/venv.sh
others=$(virsh -c qemu:///system list --name | sed '/^$/d;/^lbje-demo$/d' | wc -l)
if [ "${LBJE_DEMO:-auto}" = 1 ] || { [ "${LBJE_DEMO:-auto}" = auto ] && [ "$others" -eq 0 ]; }; then
  bash scripts/demo-vm.sh
  echo "Demo VM 'lbje-demo' is pulling its backing chain at 1 MiB/s (remove it with scripts/demo-vm.sh --remove)."
fi
listen=":9478"
for arg in "$@"; do
  case "$arg" in --web.listen-address=*) listen=${arg#*=} ;; esac
done
port=${listen##*:}
echo "Open http://localhost:${port}/ (metrics at http://localhost:${port}/metrics). Ctrl-C stops."
exec "$(dirname "$VENV_PY")/libvirt-blockjob-exporter" "$@"
