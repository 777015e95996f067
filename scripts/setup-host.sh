#!/usr/bin/env bash
# Brings up libvirtd + QEMU (and optionally Prometheus/Alertmanager/ZooKeeper) on a fresh Debian 12 host
# or container. Idempotent: safe to run again; does nothing that is already done.
set -euo pipefail

WITH_PROMETHEUS=0 WITH_SYSTEMD=0 WITH_PODMAN=0 WITH_BROWSER=0
for arg in "$@"; do
  case "$arg" in
    --with-prometheus) WITH_PROMETHEUS=1 ;;
    --with-systemd) WITH_SYSTEMD=1 ;;  # systemd-analyze, for tests/test_systemd_unit.py
    --with-podman) WITH_PODMAN=1 ;;    # rootful podman and debootstrap, for tests/test_container.py
    --with-browser) WITH_BROWSER=1 ;;  # headless chromium + its driver, for tests/test_status_page.py
    *) echo "setup-host.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

if [ "$(id -u)" -ne 0 ]; then
  echo "setup-host.sh: must run as root (it installs packages and starts libvirtd)" >&2
  exit 1
fi

need_pkgs=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 qemu-utils
           libvirt-dev pkg-config)
if [ "$WITH_PROMETHEUS" = 1 ]; then
  # ZooKeeper for the fleet budget tests: they start their own servers (tests/zklib.py), like Prometheus.
  need_pkgs+=(prometheus prometheus-alertmanager zookeeperd)
fi
if [ "$WITH_SYSTEMD" = 1 ]; then
  need_pkgs+=(systemd)
fi
if [ "$WITH_PODMAN" = 1 ]; then
  need_pkgs+=(podman runc debootstrap)
fi
if [ "$WITH_BROWSER" = 1 ]; then
  need_pkgs+=(chromium chromium-driver)
fi

missing=()
for p in "${need_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup-host.sh: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Debian's prometheus packages try to start services via policy-rc.d-less invoke-rc.d; harmless here.
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

getent passwd libvirt-qemu >/dev/null || useradd --system --no-create-home --shell /usr/sbin/nologin libvirt-qemu
mkdir -p /var/log/libvirt /var/run/libvirt /var/lib/libvirt/images

conf=/etc/libvirt/qemu.conf
marker="# libvirt-blockjob-exporter setup"
if ! grep -qF "$marker" "$conf" 2>/dev/null; then
  cat >>"$conf" <<CONF
$marker
user = "root"
group = "root"
security_driver = "none"
cgroup_controllers = [ ]
CONF
fi

pgrep -x virtlogd >/dev/null || virtlogd -d
if ! pgrep -x libvirtd >/dev/null; then
  libvirtd -d
fi
for _ in $(seq 1 50); do
  virsh -c qemu:///system version >/dev/null 2>&1 && break
  sleep 0.2
done
virsh -c qemu:///system version >/dev/null 2>&1 || { echo "setup-host.sh: libvirtd did not come up" >&2; exit 1; }
echo "setup-host.sh: libvirtd is up ($(virsh -c qemu:///system version | sed -n 's/^Running hypervisor: //p'))" >&2
