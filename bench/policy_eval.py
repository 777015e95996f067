"""Evaluation cost benchmark: ``python -m bench.policy_eval [DISKS]``.

The engine runs after every poll cycle and on every job end, so evaluation must stay cheap on a
busy host. This prints figures instead of asserting a time (timed tests are flaky).
"""

from __future__ import annotations

import sys
import time
from datetime import datetime, timezone
from types import MappingProxyType

from exporter.model import ActiveJob, BackingImage, DiskInfo, Snapshot

from exporter.policy.config import parse_policy
from exporter.policy.decide import DiskSpace, History, evaluate, match_disks

POLICY = """\
rules:
  - name: web
    match: {domain: "web-*", disk: "vd*"}
    when: {min_backing_depth: 2}
    action: {pull: {bandwidth: 50MiB/s}}
  - name: old-base
    when: {backing_file: "/img/base-2023-*.qcow2"}
    action: {pull: {keep_base: "/img/base-2025-*.qcow2"}}
  - name: rest
    when: {min_backing_depth: 3}
    action: {pull: {}}
limits:
  max_concurrent: 4
  windows:
    - {days: [mon, tue, wed, thu, fri], start: "01:00", end: "05:00"}
"""


def build(n: int) -> Snapshot:
    disks = {}
    for i in range(n):
        dom = ("web-" if i % 2 else "db-") + str(i)
        chain = tuple(BackingImage(f"/img/{dom}-s{k}.qcow2", "qcow2") for k in range(i % 4))
        if i % 3 == 0:
            chain += tuple(BackingImage(f"/img/base-{y}-01.qcow2", "qcow2") for y in (2025, 2023))
        d = DiskInfo(dom, "vda", f"/img/{dom}.qcow2", "qcow2", chain)
        disks[d.key] = d
    jobs = {k: ActiveJob(k[0], k[1], "copy", 1, 2, 0, False, 0.0, 0.0) for k in list(disks)[:2]}
    return Snapshot(True, MappingProxyType(disks), MappingProxyType(jobs), MappingProxyType({}),
                    MappingProxyType({}), frozenset(d.domain for d in disks.values()), 1)


def main(argv: list[str]) -> None:
    n = int(argv[0]) if argv else 5000
    policy = parse_policy(POLICY, "bench.yaml")
    snap = build(n)
    now = datetime(2025, 1, 6, 2, 0, tzinfo=timezone.utc)
    space = lambda d, b: DiskSpace(1 << 30, 1 << 40)  # noqa: E731
    rounds = 20

    t = time.perf_counter()
    for _ in range(rounds):
        matches = match_disks(snap, policy)
    match_ms = (time.perf_counter() - t) / rounds * 1000
    t = time.perf_counter()
    for _ in range(rounds):
        plan = evaluate(snap, policy, now, History.empty(), space, True, matches)
    cached_ms = (time.perf_counter() - t) / rounds * 1000
    print(f"disks={n} candidates={len(matches.candidates)} starts={len(plan.starts)}")
    print(f"match_disks: {match_ms:.2f} ms")
    print(f"evaluate with cached matches: {cached_ms:.2f} ms")
    print(f"evaluate from scratch: {match_ms + cached_ms:.2f} ms")


if __name__ == "__main__":
    main(sys.argv[1:])
