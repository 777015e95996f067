"""Churn run: the outcomes libvirt reported against the outcomes the exporter counted.

    sudo .venv/bin/python -m bench.churn --minutes 10 --seed 1

Drives the real libvirtd + QEMU on a seeded random schedule over a few small no-OS domains:
capped and quick pulls (started by hand, as an operator would), aborts, ENOSPC failures on a small
tmpfs, domains destroyed mid-pull and recreated under the same name, QEMUs killed with SIGKILL and
recreated, and libvirtd restarts (one while a pull is about to end). An independent witness,
``virsh event --all --loop`` (restarted after each libvirtd restart), tallies the ``block-job-2``
outcomes libvirt reported; the script itself knows the ends libvirt never reports (a destroy or a
kill mid-pull). At the end it compares, per outcome, what the exporter counted from events and what
it inferred with those two tallies, and exits 1 on a difference it cannot explain.

A libvirtd restart is the one moment two honest observers can differ: an end that libvirt
re-reports right after it comes back reaches whichever of them is connected first. The report
shows those restarts; every other difference is a defect.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

_TESTS = Path(__file__).resolve().parent.parent / "tests"
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))

import vmlib  # noqa: E402
from exporterlib import Exporter, start_libvirtd, stop_libvirtd  # noqa: E402

PREFIX = "lbje-churn-"
vmlib.NAME_PREFIX = PREFIX
MiB = 1024 * 1024
OUTCOMES = ("completed", "failed", "canceled")
_EVENT = re.compile(r"event 'block-job-2' for domain '(?P<domain>[^']*)': .+ for (?P<disk>\S+) "
                    r"(?P<status>completed|failed|canceled)$")


class Witness:
    """``virsh event --all --loop``: libvirt's own account of every block-job-2 outcome."""

    def __init__(self) -> None:
        self.seen: Counter = Counter()  # (domain, outcome)
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="witness")

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            proc = self._proc = subprocess.Popen(
                ["virsh", "-c", vmlib.URI, "event", "--all", "--loop"], stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, text=True, bufsize=1)
            assert proc.stdout is not None
            for line in proc.stdout:
                m = _EVENT.search(line.strip())
                if m and m["domain"].startswith(PREFIX):
                    with self._lock:
                        self.seen[(m["domain"], m["status"])] += 1
            proc.wait()
            time.sleep(0.1)  # libvirtd is away: try again

    def counts(self) -> Counter:
        with self._lock:
            return Counter(self.seen)

    def stop(self) -> None:
        self._stop = True
        if self._proc is not None:
            vmlib.stop_process(self._proc)
        self._thread.join(5)


class Churn:
    def __init__(self, seed: int, domains: int, log=print) -> None:
        self.rng = random.Random(seed)
        self.log = log
        self.factory = vmlib.VMFactory()
        self.vms: list = []
        self.layers = Counter()
        self.unreported: Counter = Counter()  # (domain, outcome) libvirt never reports
        self.away: Counter = Counter()  # domain -> jobs that ended while libvirtd was down
        self.actions: Counter = Counter()
        self.trace: list[str] = []  # one line per action, with its time: what a failed run is read against
        self.last_stop = 0.0  # monotonic time of the last destroy or kill
        self.domains = domains
        self.exporter: Exporter | None = None

    def setup(self) -> None:
        small = self.factory.tmpfs_dir(16)
        self.vms = [self.factory.create(f"c{i}", depth=1, data_mib=32, size_mib=64, paused=True)
                    for i in range(self.domains - 1)]
        self.vms.append(self.factory.create("enospc", depth=1, data_mib=64, active_dir=small, paused=True))

    def _ready_to_pull(self, vm) -> bool:
        if vmlib.domain_state(vm) is None or vmlib.job_info(vm) is not None:
            return False
        if vm.label != "enospc" and vmlib.backing_depth(vm) == 0:
            self.layers[vm.name] += 1
            vmlib.add_layer(vm, f"layer{self.layers[vm.name]}")
        return True

    def candidates(self) -> list:
        """The domains the schedule acts on."""
        return self.vms

    def step(self) -> None:
        vm = self.rng.choice(self.candidates())
        action = self.rng.choices(["capped", "quick", "abort", "destroy", "kill"], [4, 4, 2, 1, 1])[0]
        if vm.label == "enospc":
            action = "quick"
        info = vmlib.job_info(vm) if vmlib.domain_state(vm) is not None else None
        if action in ("capped", "quick"):
            if not self._ready_to_pull(vm):
                return
            if action == "capped":
                vmlib.start_pull(vm, "vda", bandwidth_bytes=self.rng.choice([2, 4, 8]) * MiB)
            else:
                subprocess.run(["virsh", "-c", vmlib.URI, "blockpull", vm.name, "vda", "--wait"],
                               capture_output=True, timeout=60)
        elif info is None:
            return
        elif action in ("destroy", "kill") and self.exporter is not None and self.exporter.value(
                "libvirt_blockjob_cursor", {"domain": vm.name, "disk": "vda", "job_type": "pull"}) is None:
            return  # a job nobody has seen yet: no one could tell it ever ran
        elif action == "abort":
            subprocess.run(["virsh", "-c", vmlib.URI, "blockjob", vm.name, "vda", "--abort"], capture_output=True)
        elif action == "destroy":
            vmlib.destroy(vm)
            self.unreported[(vm.name, "canceled")] += 1
            self.did(action, vm.name)
            vmlib.recreate(vm)
            return
        else:
            os.kill(vmlib.qemu_pid(vm), signal.SIGKILL)
            self.did(action, vm.name)
            vmlib.wait_for(lambda: vmlib.domain_state(vm) is None, timeout=30, what="killed QEMU gone")
            self.unreported[(vm.name, "failed")] += 1
            vmlib.recreate(vm)
            return
        self.did(action, vm.name)

    def did(self, action: str, domain: str = "") -> None:
        self.actions[action] += 1
        if action in ("destroy", "kill"):
            self.last_stop = time.monotonic()
        now = time.time()
        self.trace.append(f"{time.strftime('%H:%M:%S', time.localtime(now))}.{int(now * 1000) % 1000:03d} "
                          f"{action} {domain}")

    def safe_step(self) -> None:
        """One step of the schedule, then a pause; a failed command is counted and the schedule goes on."""
        try:
            self.step()
        except (vmlib.CommandError, subprocess.TimeoutExpired, TimeoutError) as err:
            self.did("step error")
            print(f"step failed (the schedule goes on): {err}", file=sys.stderr)
        time.sleep(self.rng.uniform(0.2, 2.0))

    def restart_libvirtd(self, while_ending: bool) -> None:
        """Stop libvirtd for a few seconds. A job running when it stops, or the pull started to end
        about then, may end while it is away; libvirt may or may not re-report such an end to
        whoever is connected after, so each is allowed for (``away``)."""
        ending = []
        if while_ending:
            vm = next((v for v in self.candidates() if v.label != "enospc" and self._ready_to_pull(v)), None)
            if vm is not None:
                vmlib.start_pull(vm, "vda", bandwidth_bytes=16 * MiB)
                ending.append(vm)
                time.sleep(1)
        # That pull is counted whatever blockJobInfo says now: a job QEMU has finished and libvirtd
        # has not yet concluded is no longer listed, and its end is reported after the restart.
        running = ending + [v for v in self.vms if v not in ending and vmlib.domain_state(v) is not None
                            and vmlib.job_info(v) is not None]
        stop_libvirtd()
        time.sleep(self.rng.uniform(1, 5))
        start_libvirtd()
        for v in running:
            if vmlib.domain_state(v) is None or vmlib.job_info(v) is None:
                self.away[v.name] += 1
        self.did("libvirtd restart")

    def quiesce(self) -> None:
        """Let every pull end, so that every outcome is in."""
        for vm in self.vms:
            if vmlib.domain_state(vm) is not None and vmlib.job_info(vm) is not None:
                vmlib.set_bandwidth(vm, "vda", 0)
        for vm in self.vms:
            if vmlib.domain_state(vm) is not None:
                vmlib.wait_no_job(vm, timeout=120)


def counted_by(scrape) -> tuple[Counter, Counter]:
    """(counted, inferred) per (domain, outcome) in one scrape."""
    counted, inferred = Counter(), Counter()
    for outcome in OUTCOMES:
        for labels, value in scrape.series(f"libvirt_blockjob_{outcome}_total").items():
            counted[(dict(labels)["domain"], outcome)] += value
        for labels, value in scrape.series("libvirt_blockjob_outcomes_inferred_total", outcome=outcome).items():
            inferred[(dict(labels)["domain"], outcome)] += value
    return counted, inferred


def compare(exporter: Exporter, witness: Counter, churn: Churn,
            earlier: tuple[Counter, Counter] = (Counter(), Counter())) -> tuple[list, list[str]]:
    """Per outcome: (outcome, reported, ended unreported, counted, of which from events, inferred),
    and the domains whose figures cannot be explained.

    Per domain and outcome, with A the jobs of the domain that ended while libvirtd was down:
    every reported and every unreported end is counted once and with its outcome,
    R + U <= counted <= R + U + A, and no event is counted that libvirt did not report,
    R - A <= from events <= R. A covers an end that libvirt re-reported after its restart to one
    observer and not the other; an end counted with the wrong outcome shows as a shortfall.
    ``earlier`` adds what an exporter killed during the run had counted (``counted_by``)."""
    now_counted, now_inferred = counted_by(exporter.scrape())
    totals = {o: Counter() for o in OUTCOMES}
    bad = []
    for vm in churn.vms:
        name, away = vm.name, churn.away[vm.name]
        for outcome in OUTCOMES:
            counted = now_counted[(name, outcome)] + earlier[0][(name, outcome)]
            inferred = now_inferred[(name, outcome)] + earlier[1][(name, outcome)]
            r, u = witness[(name, outcome)], churn.unreported[(name, outcome)]
            row = {"reported": r, "unreported": u, "counted": counted, "events": counted - inferred,
                   "inferred": inferred}
            totals[outcome].update(row)
            if not (r + u <= counted <= r + u + away and r - away <= counted - inferred <= r):
                bad.append(f"{name} {outcome}: {row}, ended while libvirtd was away {away}")
    rows = [(o, t["reported"], t["unreported"], t["counted"], t["events"], t["inferred"]) for o, t in totals.items()]
    return rows, bad


def print_rows(rows: list) -> None:
    """``compare``'s rows as a Markdown table."""
    print("| outcome | libvirt reported | ended unreported (destroy/kill) | exporter counted | "
          "of which from events | inferred |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


def schedule_parser(prog: str, doc: str, minutes: float, seed: int) -> argparse.ArgumentParser:
    """The flags of a seeded schedule (the churn's, and the soak's built on it)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=minutes)
    parser.add_argument("--seed", type=int, default=seed)
    parser.add_argument("--domains", type=int, default=6)
    parser.add_argument("--libvirtd-restarts", type=int, default=3)
    return parser


def main(argv=None) -> int:
    args = schedule_parser("python -m bench.churn", __doc__, 10.0, 1).parse_args(argv)
    churn = Churn(args.seed, args.domains)
    witness = Witness()
    exporter = None
    passed = False
    try:
        churn.setup()
        witness.start()
        exporter = churn.exporter = Exporter(poll_interval="1s")
        deadline = time.monotonic() + args.minutes * 60
        restarts = sorted(churn.rng.uniform(0.1, 0.9) * args.minutes * 60 for _ in range(args.libvirtd_restarts))
        begun = time.monotonic()
        while time.monotonic() < deadline:
            if restarts and time.monotonic() - begun >= restarts[0]:
                restarts.pop(0)
                churn.restart_libvirtd(while_ending=churn.actions["libvirtd restart"] == 0)
                exporter.wait_value("libvirt_blockjob_up", None, lambda v: v == 1, timeout=60)
                time.sleep(2)  # the witness resubscribes
                continue
            churn.safe_step()
        churn.quiesce()
        exporter.wait_value("libvirt_blockjob_up", None, lambda v: v == 1, timeout=60)
        time.sleep(5)  # the last events and inferences settle
        rows, bad = compare(exporter, witness.counts(), churn)
        print(f"churn: {args.minutes:g} min, seed {args.seed}, {len(churn.vms)} domains; actions: "
              + ", ".join(f"{k} {v}" for k, v in sorted(churn.actions.items()))
              + f"; jobs that ended while libvirtd was away: {sum(churn.away.values())}")
        print_rows(rows)
        for line in bad:
            print("MISMATCH " + line)
        print("result: " + ("every outcome counted exactly once" if not bad else "MISMATCH"))
        passed = not bad
        return 0 if passed else 1
    finally:
        witness.stop()
        if exporter is not None:
            exporter.stop(keep_log=not passed)
            if not passed:
                print(f"exporter log: {exporter.log.name}")
        start_libvirtd()
        churn.factory.cleanup()


if __name__ == "__main__":
    sys.exit(main())
