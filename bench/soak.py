"""Soak with faults: hours of churn, nothing lost or doubled, nothing growing.

    sudo .venv/bin/python -m bench.soak --minutes 120 --seed 7 --plot soak.png   # the documented run
    sudo .venv/bin/python -m bench.soak --minutes 5                              # scripts/test.sh's form

The churn of ``bench.churn`` (pulls capped and unlimited, aborts, ENOSPC failures, domains
destroyed or their QEMU killed mid-pull and recreated, libvirtd restarts, one while a pull ends),
plus: block copies pivoted or aborted, the policy enforcing on two domains of its own at the same
time, and the exporter killed with SIGKILL and restarted once (its state file carries the jobs it
was tracking). A scraper asks /metrics once a second throughout and records every failure, the
exporter's RSS and threads, and its series count against the live domain count.

At the end: every outcome libvirt reported (``virsh event`` as witness) and every end it never
reports (destroy, kill) counted exactly once, with the allowances ``bench.churn.compare`` explains,
where ends during the exporter's own absence count like ends while libvirtd was away (the
restarted exporter infers them); and the scrape, guest, RSS, thread and series checks. Exit 1 on
any failure.
"""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from collections import Counter

from bench.churn import PREFIX, Churn, Witness, compare, counted_by, print_rows, schedule_parser
from exporterlib import Exporter
import vmlib

POLICY = """\
rules:
  - name: soak
    match: {{domain: "{glob}", disk: vda}}
    when: {{min_backing_depth: 1}}
    action: {{pull: {{bandwidth: 8MiB/s}}}}
limits: {{max_concurrent: 100000}}
"""
RSS_GROWTH_MIB = 15.0  # between the first and the last tenth of the run, after warm-up
THREAD_GROWTH = 4  # spare readers may come and go
STOP_EVENT_GRACE = 5.0  # seconds: over the exporter's 3 s wait for a stop event, with room


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the start
    ok: bool
    seconds: float  # the scrape's duration
    rss_mib: float
    threads: int
    series: int
    domains: int  # our domains running, per virsh


class Scraper:
    """One scrape a second, on a fresh connection, with the exporter's own figures from /proc."""

    def __init__(self) -> None:
        self.exporter: Exporter | None = None
        self.samples: list[Sample] = []
        self.paused = threading.Event()  # while the exporter is down on purpose
        self._stop = threading.Event()
        self._begun = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True, name="scraper")

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(max(0.0, 1.0 - (time.monotonic() - self._begun) % 1.0)):
            exporter = self.exporter
            if exporter is None or self.paused.is_set():
                continue
            started = time.monotonic()
            try:
                text = exporter.raw().decode()
                ok = True
            except OSError:
                text, ok = "", False
            seconds = time.monotonic() - started
            try:
                pid = exporter.proc.pid
                status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
                threads, rss = int(status["Threads"]), int(status["VmRSS"].split()[0]) / 1024
            except (OSError, KeyError, ValueError):
                threads, rss = 0, 0.0
            try:
                ours = [n for n in vmlib.virsh("list", "--name").split() if n.startswith(PREFIX)]
            except vmlib.CommandError:  # libvirtd restarting: the count is not known this second
                ours = []
            series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
            self.samples.append(Sample(started - self._begun, ok, seconds, rss, threads, series, len(ours)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


class Soak(Churn):
    """The churn's schedule with copies and a policy's domains added."""

    def setup(self) -> None:
        super().setup()
        self.policy_vms = [self.factory.create(f"pol{i}", depth=2, data_mib=16, size_mib=32, paused=True)
                           for i in range(2)]
        self.vms += self.policy_vms  # watched like the others (restarts, the comparison)

    def candidates(self) -> list:
        return [v for v in self.vms if v not in self.policy_vms]  # the policy acts on those

    def step(self) -> None:
        if self.rng.random() < 0.15:
            return self.copy()
        if self.rng.random() < 0.1:  # give the policy work: a new layer on a flat disk of its own
            vm = self.rng.choice(self.policy_vms)
            if vmlib.job_info(vm) is None and vmlib.backing_depth(vm) == 0:
                self.layers[vm.name] += 1
                vmlib.add_layer(vm, f"layer{self.layers[vm.name]}")
                self.did("policy layer", vm.name)
            return None
        return super().step()

    def copy(self) -> None:
        """A block copy of a disk with no job, then a pivot (completed) or an abort (canceled)."""
        vm = self.rng.choice([v for v in self.candidates() if v.label != "enospc"])
        if vmlib.domain_state(vm) is None or vmlib.job_info(vm) is not None:
            return
        self.layers[vm.name] += 1
        dest = vm.workdir / f"copy{self.layers[vm.name]}.qcow2"
        pivot = self.rng.random() < 0.5
        vmlib.virsh("blockcopy", vm.name, "vda", str(dest), "--wait", "--transient-job",
                    "--pivot" if pivot else "--finish", timeout=120)
        self.did("copy pivoted" if pivot else "copy aborted", vm.name)

    def quiesce(self) -> None:
        super().quiesce()
        for vm in self.policy_vms:
            vmlib.wait_no_job(vm, timeout=120)  # the policy's pulls run at their own pace


def restart_exporter(churn: Soak, scraper: Scraper, exporter: Exporter,
                     args: list[str]) -> tuple[Exporter, tuple[Counter, Counter]]:
    """SIGKILL the exporter and start it again on the same state file. Returns the new exporter and
    what the old one had counted (its last scrape, just before the kill; the schedule waits).

    Not within the exporter's grace after a destroy or kill: libvirt does not replay events, so a
    stop event the dying exporter had not yet received is lost, and the new one can only infer
    canceled for a crashed domain's jobs (its state file says they were awaiting that event)."""
    time.sleep(max(0.0, churn.last_stop + STOP_EVENT_GRACE - time.monotonic()))
    running = [v for v in churn.vms if vmlib.domain_state(v) is not None and vmlib.job_info(v) is not None]
    scraper.paused.set()
    last = exporter.scrape()
    # and the jobs it tracked: one that libvirt no longer lists may not have been reported yet
    tracked = {dict(labels)["domain"] for labels in last.series("libvirt_blockjob_cursor")}
    running += [v for v in churn.vms if v.name in tracked and v not in running]
    exporter.proc.send_signal(signal.SIGKILL)
    exporter.proc.wait(10)
    time.sleep(churn.rng.uniform(1, 4))
    new = Exporter(*args, poll_interval="1s", state_file=exporter.state_file)
    new.wait_value("libvirt_blockjob_up", None, lambda v: v == 1, timeout=60)
    for vm in running:  # ended while no exporter was there: the new one infers them
        if vmlib.domain_state(vm) is None or vmlib.job_info(vm) is None:
            churn.away[vm.name] += 1
    scraper.exporter = new
    scraper.paused.clear()
    churn.did("exporter killed")
    return new, counted_by(last)


def checks(scraper: Scraper, churn: Soak) -> list[str]:
    problems = []
    samples = [s for s in scraper.samples if s.t > 60] or scraper.samples
    failed = [s for s in scraper.samples if not s.ok]
    if failed:
        problems.append(f"{len(failed)} of {len(scraper.samples)} scrapes failed (first at {failed[0].t:.0f} s)")
    tenth = max(1, len(samples) // 10)
    first, last = samples[:tenth], samples[-tenth:]
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    rss0, rss1 = median([s.rss_mib for s in first]), median([s.rss_mib for s in last])
    if rss1 - rss0 > RSS_GROWTH_MIB:
        problems.append(f"RSS grew from {rss0:.1f} to {rss1:.1f} MiB")
    th0, th1 = median([s.threads for s in first]), median([s.threads for s in last])
    if th1 - th0 > THREAD_GROWTH:
        problems.append(f"threads grew from {th0} to {th1}")
    # Domains come back under their names, so the series stay within what the live domains have.
    series = [s.series for s in samples if s.ok]
    if series and max(series) > 1.5 * median(series):
        problems.append(f"series rose to {max(series)} (median {median(series)})")
    gone = [v.name for v in churn.vms if vmlib.domain_state(v) is None]
    if gone:
        problems.append(f"guests stopped that the schedule did not stop: {gone}")
    return problems


def timeline(samples: list[Sample], parts: int = 10) -> list[str]:
    """The run in ``parts`` equal spans: per span, scrapes answered and the medians of RSS, threads,
    series and live domains (what the README shows of a long run)."""
    if not samples:
        return []
    span = samples[-1].t / parts or 1.0
    rows = []
    for i in range(parts):
        part = [s for s in samples if i * span <= s.t < (i + 1) * span or (i == parts - 1 and s.t == samples[-1].t)]
        ok = [s for s in part if s.ok]
        if not ok:
            continue
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        rows.append(f"{i * span / 60:6.1f}-{(i + 1) * span / 60:6.1f} min: {len(ok)}/{len(part)} scrapes, "
                    f"RSS {med([s.rss_mib for s in ok]):.1f} MiB, threads {med([s.threads for s in ok])}, "
                    f"series {med([s.series for s in ok])}, domains {med([s.domains for s in ok])}")
    return rows


def plot(scraper: Scraper, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t / 60 for s in scraper.samples]
    fig, (a, b) = plt.subplots(2, 1, sharex=True, figsize=(8, 5))
    a.plot(t, [s.rss_mib for s in scraper.samples])
    a.set_ylabel("RSS MiB")
    b.plot(t, [s.series for s in scraper.samples], label="series")
    b.plot(t, [10 * s.domains for s in scraper.samples], label="10 x live domains")
    b.set_ylabel("count")
    b.set_xlabel("minutes")
    b.legend()
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    parser = schedule_parser("python -m bench.soak", __doc__, 120.0, 7)
    parser.add_argument("--plot", help="write RSS and series over time to this PNG (needs matplotlib)")
    args = parser.parse_args(argv)
    churn, witness, scraper = Soak(args.seed, args.domains), Witness(), Scraper()
    exporters: list[Exporter] = []
    passed = False
    try:
        churn.setup()
        policy = Path(churn.factory.images_dir("policy")) / "policy.yml"
        policy.write_text(POLICY.format(glob=f"{PREFIX}*-pol?"))
        ex_args = [f"--policy.file={policy}", "--policy.enforce"]
        witness.start()
        exporter = churn.exporter = scraper.exporter = Exporter(*ex_args, poll_interval="1s")
        exporters.append(exporter)
        scraper.start()
        duration = args.minutes * 60
        events = sorted([(churn.rng.uniform(0.1, 0.9) * duration, "libvirtd") for _ in range(args.libvirtd_restarts)]
                        + [(churn.rng.uniform(0.3, 0.7) * duration, "exporter")])
        before_kill: tuple[Counter, Counter] = (Counter(), Counter())
        begun = last_report = time.monotonic()
        while time.monotonic() - begun < duration:
            if time.monotonic() - last_report >= 600:  # a long run shows it is alive
                last_report = time.monotonic()
                recent = [s for s in scraper.samples[-600:] if s.ok]
                print(f"soak: {(last_report - begun) / 60:.0f} min: " + ", ".join(
                      f"{k} {v}" for k, v in sorted(churn.actions.items()))
                      + (f"; RSS {recent[-1].rss_mib:.1f} MiB, series {recent[-1].series}" if recent else ""),
                      flush=True)
            if events and time.monotonic() - begun >= events[0][0]:
                _, what = events.pop(0)
                if what == "libvirtd":
                    churn.restart_libvirtd(while_ending=churn.actions["libvirtd restart"] == 0)
                    exporter.wait_value("libvirt_blockjob_up", None, lambda v: v == 1, timeout=60)
                    time.sleep(2)  # the witness resubscribes
                else:
                    exporter, before_kill = restart_exporter(churn, scraper, exporter, ex_args)
                    churn.exporter = exporter
                    exporters.append(exporter)
                continue
            churn.safe_step()
        churn.quiesce()
        time.sleep(5)  # the last events and inferences settle
        scraper.stop()
        rows, bad = compare(exporter, witness.counts(), churn, earlier=before_kill)
        problems = bad + checks(scraper, churn)
        ok = [s for s in scraper.samples if s.ok]
        print(f"soak: {args.minutes:g} min, seed {args.seed}, {len(churn.vms)} domains; actions: "
              + ", ".join(f"{k} {v}" for k, v in sorted(churn.actions.items()))
              + f"; jobs that ended while libvirtd or the exporter was away: {sum(churn.away.values())}")
        print_rows(rows)
        if ok:
            print(f"scrapes: {len(ok)} of {len(scraper.samples)} answered, slowest {max(s.seconds for s in ok) * 1000:.0f} ms;"
                  f" RSS {ok[0].rss_mib:.1f} -> {ok[-1].rss_mib:.1f} MiB (max {max(s.rss_mib for s in ok):.1f});"
                  f" threads {ok[0].threads} -> {ok[-1].threads}; series {ok[0].series} -> {ok[-1].series}")
        for row in timeline(scraper.samples):
            print("  " + row)
        if args.plot and ok:
            plot(scraper, args.plot)
            print(f"plot: {args.plot}")
        for line in problems:
            print("PROBLEM " + line)
        print("result: " + ("every outcome counted exactly once, nothing grew" if not problems else "FAILED"))
        passed = not problems
        return 0 if passed else 1
    finally:
        scraper.stop()
        witness.stop()
        for each in exporters:  # a failed run keeps the exporters' logs: they say what each end was taken for
            each.stop(keep_log=not passed)
            if not passed:
                print(f"exporter log: {each.log.name}")
        if not passed and churn.trace:
            with tempfile.NamedTemporaryFile("w", prefix="lbje-soak-actions-", suffix=".log", delete=False) as f:
                f.write("\n".join(churn.trace) + "\n")
            print(f"actions: {f.name}")
        if exporters and exporters[0].state_dir:
            shutil.rmtree(exporters[0].state_dir, ignore_errors=True)
        from exporterlib import start_libvirtd

        start_libvirtd()
        churn.factory.cleanup()


if __name__ == "__main__":
    sys.exit(main())
