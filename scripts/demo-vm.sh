#!/usr/bin/env bash
# Keeps a demo domain "lbje-demo" with a slow block pull running, so someone trying the exporter
# on a bare machine sees a live job. Idempotent: run it again at any time; once the pull has
# finished (backing depth 0) the next run rebuilds the chain and starts a new pull.
#
#   scripts/demo-vm.sh            create/start lbje-demo and make sure a pull is running
#   scripts/demo-vm.sh --remove   destroy/undefine lbje-demo and delete its images
#
# The domain has no OS (48 MiB, firmware only, started paused: block jobs run on while paused).
# vda is top.qcow2 -> mid.qcow2 -> base.qcow2 (200 MiB of data), pulled at ~1 MiB/s (~4 minutes).
set -Eeuo pipefail

NAME=lbje-demo
DIR=/var/lib/libvirt/images/lbje-demo
URI=${LBJE_LIBVIRT_URI:-qemu:///system}
BANDWIDTH=${LBJE_DEMO_BANDWIDTH:-1048576}  # bytes/s
DATA_MIB=200
SIZE_MIB=256

me=demo-vm.sh
die() { echo "$me: $*" >&2; exit 1; }
trap 'rc=$?; echo "$me: failed (exit $rc) at line $LINENO: $BASH_COMMAND" >&2' ERR
v() { virsh -q -c "$URI" "$@"; }

REMOVE=0
for arg in "$@"; do
  case "$arg" in
    --remove) REMOVE=1 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $arg (use --remove or nothing)" ;;
  esac
done

[ "$(id -u)" -eq 0 ] || die "must run as root (it uses qemu:///system and $DIR)"
for tool in virsh qemu-img qemu-io flock; do
  command -v "$tool" >/dev/null || die "$tool not found; run scripts/setup-host.sh first"
done
v version >/dev/null 2>&1 || die "cannot reach libvirtd at $URI; run scripts/setup-host.sh first"

# One run at a time: two overlapping runs would both rebuild the chain.
mkdir -p /run/lock
exec 9>/run/lock/lbje-demo.lock
flock -w 60 9 || die "another demo-vm.sh is still running"

state() { v domstate "$NAME" 2>/dev/null || echo absent; }

if [ "$REMOVE" = 1 ]; then
  st=$(state)
  if [ "$st" != absent ]; then
    [ "$st" = "shut off" ] || v destroy "$NAME" >/dev/null
    if v dominfo "$NAME" 2>/dev/null | grep -q '^Persistent: *yes'; then
      v undefine "$NAME" >/dev/null
    fi
  fi
  [ "$(state)" = absent ] || die "$NAME is still there after destroy/undefine"
  rm -rf -- "$DIR"
  echo "$me: $NAME removed (was: $st)"
  exit 0
fi

job_running() { v blockjob "$NAME" vda --info --raw --bytes 2>/dev/null | grep -q '^ *cur='; }
# Backing depth from the live XML (count <backingStore> elements that have a <source>).
live_depth() {
  v dumpxml "$NAME" | awk '/<disk /,/<\/disk>/' | awk '/<target dev=/{exit} {print}' \
    | grep -c '<backingStore type=' || true
}
chain_ok() {  # on-disk chain is intact: top -> mid -> base
  [ -f "$DIR/top.qcow2" ] && [ -f "$DIR/mid.qcow2" ] && [ -f "$DIR/base.qcow2" ] || return 1
  [ "$(qemu-img info -U --backing-chain "$DIR/top.qcow2" 2>/dev/null | grep -c '^image:')" = 3 ]
}

build_chain() {
  mkdir -p "$DIR"
  if ! { [ -f "$DIR/base.qcow2" ] && [ -f "$DIR/mid.qcow2" ] \
         && [ "$(qemu-img info -U --backing-chain "$DIR/mid.qcow2" 2>/dev/null | grep -c '^image:')" = 2 ]; }; then
    echo "$me: creating $DIR/base.qcow2 ($DATA_MIB MiB of data) and mid.qcow2" >&2
    rm -f "$DIR/base.qcow2" "$DIR/mid.qcow2" "$DIR/top.qcow2"
    qemu-img create -q -f qcow2 "$DIR/base.qcow2" "${SIZE_MIB}M"
    qemu-io -f qcow2 -c "write -P 0x5a 0 ${DATA_MIB}M" "$DIR/base.qcow2" >/dev/null
    qemu-img create -q -f qcow2 -b "$DIR/base.qcow2" -F qcow2 "$DIR/mid.qcow2"
    qemu-io -f qcow2 -c "write -P 0x11 1M 64k" "$DIR/mid.qcow2" >/dev/null
  fi
  # A finished pull leaves base and mid untouched; only the top needs to be fresh again.
  echo "$me: creating a fresh $DIR/top.qcow2 (depth 2)" >&2
  rm -f "$DIR/top.qcow2"
  qemu-img create -q -f qcow2 -b "$DIR/mid.qcow2" -F qcow2 "$DIR/top.qcow2"
}

start_domain() {
  local type=qemu
  if [ -r /dev/kvm ] && [ -w /dev/kvm ] && v domcapabilities --virttype kvm >/dev/null 2>&1; then
    type=kvm
  fi
  cat >"$DIR/$NAME.xml" <<XML
<domain type='$type'>
  <name>$NAME</name>
  <description>libvirt-blockjob-exporter demo (scripts/demo-vm.sh); no OS, safe to remove</description>
  <memory unit='MiB'>48</memory>
  <vcpu>1</vcpu>
  <os><type>hvm</type></os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$DIR/top.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
XML
  v create "$DIR/$NAME.xml" --paused >/dev/null
  echo "$me: started $NAME (type=$type, paused)" >&2
}

st=$(state)
case "$st" in
  running|paused)
    if job_running; then
      :
    elif [ "$(live_depth)" -eq 0 ]; then
      echo "$me: the last pull finished; rebuilding the chain" >&2
      v destroy "$NAME" >/dev/null
      # a persistent lbje-demo (someone defined it) stays defined; create below needs it gone
      if [ "$(state)" != absent ]; then v undefine "$NAME" >/dev/null; fi
      build_chain
      start_domain
    fi
    ;;
  absent|"shut off")
    if [ "$st" = "shut off" ]; then v undefine "$NAME" >/dev/null; fi
    chain_ok || build_chain
    start_domain
    ;;
  *)
    # crashed, pmsuspended, ...: start over
    v destroy "$NAME" >/dev/null 2>&1 || true
    if [ "$(state)" != absent ]; then v undefine "$NAME" >/dev/null; fi
    build_chain
    start_domain
    ;;
esac

if ! job_running; then
  depth=$(live_depth)
  [ "$depth" -gt 0 ] || die "$NAME has backing depth 0 right after (re)building; nothing to pull"
  v blockpull "$NAME" vda --bandwidth "$BANDWIDTH" --bytes >/dev/null
  echo "$me: started a pull on $NAME/vda at $BANDWIDTH bytes/s (backing depth $depth)" >&2
fi
info=$(v blockjob "$NAME" vda --info --raw --bytes | tr -s ' \n' ' ')
echo "$me: $NAME is $(state); vda job:${info:- none}"
