"""libvirtd's CPU floor for watching active jobs: what reading N running pulls once a second costs
libvirtd, with a bare loop and with the exporter (default flags), against a baseline.

    sudo .venv/bin/python -m bench.libvirtd_floor [--jobs 50] [--window 30]

Each job is a pull crawling at 1 byte/s on its own paused no-OS domain. An active job's
``blockJobInfo`` asks QEMU (``query-block-jobs``), so this is the least any exporter that shows
every job's progress every second adds to libvirtd.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import libvirt  # noqa: E402

import vmlib  # noqa: E402
from exporterlib import Exporter  # noqa: E402


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _window(pid: int, seconds: float, each_second=None) -> float:
    """libvirtd's CPU over ``seconds`` as % of one core, running ``each_second`` once a second."""
    c0, t0 = _cpu_seconds(pid), time.monotonic()
    while time.monotonic() - t0 < seconds:
        if each_second is not None:
            each_second()
        time.sleep(max(0.0, 1.0 - (time.monotonic() - t0) % 1.0))
    return 100.0 * (_cpu_seconds(pid) - c0) / (time.monotonic() - t0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.libvirtd_floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=50, choices=range(1, 201), metavar="1..200")
    parser.add_argument("--window", type=float, default=30.0)
    args = parser.parse_args(argv)
    factory = vmlib.VMFactory()
    try:
        vms = [factory.create(f"floor{i}", depth=1, data_mib=4, size_mib=16, paused=True) for i in range(args.jobs)]
        for vm in vms:
            vmlib.start_pull(vm, "vda", bandwidth_bytes=1)
        conn = libvirt.openReadOnly("qemu:///system")
        doms = [conn.lookupByName(vm.name) for vm in vms]
        running = sum(1 for d in doms if d.blockJobInfo("vda", 0))
        pid = int(subprocess.check_output(["pgrep", "-x", "libvirtd"]).split()[0])
        rows = [("baseline (nothing of ours)", _window(pid, args.window)),
                (f"bare loop: {running} job reads a second",
                 _window(pid, args.window, lambda: [d.blockJobInfo("vda", 1) for d in doms]))]
        exporter = Exporter(poll_interval="1s")
        try:
            time.sleep(10)
            rows.append(("the exporter, default flags", _window(pid, args.window)))
        finally:
            exporter.stop()
        conn.close()
        for label, pct in rows:
            print(f"{label:40s} libvirtd {pct:5.2f} % of a core")
        return 0
    finally:
        factory.cleanup()


if __name__ == "__main__":
    sys.exit(main())
