"""``libvirt-blockjob-exporter policy check|plan``: the CLI dispatches here."""

from __future__ import annotations

import sys
from datetime import datetime
from typing import TextIO

from exporter.model import Snapshot

from .config import Policy, PolicyError, load_policy
from .decide import FleetView, History, SpaceFn, evaluate
from .engine import format_plan_table
from .space import estimate_space


def _load_or_report(path: str, err: TextIO | None) -> Policy | None:
    """The policy, or None after printing every problem of the file to ``err``."""
    try:
        return load_policy(path)
    except PolicyError as e:
        print(str(e), file=err or sys.stderr)
        return None


def policy_check(path: str, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Validate a policy file: 0 and ``FILE: OK (N rules)``, or 1 and every problem on stderr."""
    policy = _load_or_report(path, err)
    if policy is None:
        return 1
    n = len(policy.rules)
    fleet = "" if policy.fleet is None else (f", fleet budget {policy.fleet.max_concurrent} at "
                                             f"{policy.fleet.path} on {policy.fleet.zookeeper}")
    print(f"{path}: OK ({n} rule{'s' if n != 1 else ''}{fleet})", file=out or sys.stdout)
    return 0


def policy_plan(path: str, source: str | Snapshot, now: datetime | None = None, space: SpaceFn = estimate_space,
                out: TextIO | None = None, err: TextIO | None = None, fleet: FleetView | None = None) -> int:
    """Print what the policy would do right now; never starts anything.

    ``source`` is a libvirt URI (read once over a read-only connection) or a ready Snapshot.
    Runs as a dry run with an empty history: a running exporter's backoff and give-up state is
    not visible to a separate command. With a ``fleet`` section it counts the leases taken in
    ZooKeeper now (``fleet`` given, or read once, within the section's ``timeout``) and takes none.
    """
    policy = _load_or_report(path, err)
    if policy is None:
        return 1
    snapshot = source
    if not isinstance(source, Snapshot):
        try:
            # Imported here: only libvirt_host imports libvirt, and `policy check` must work without it.
            from exporter.libvirt_host import read_once
            from exporter.state import State

            state = State()
            read_once(source, state)
            snapshot = state.snapshot()
        except Exception as e:  # libvirtError: connection refused, no such URI, no libvirt module, ...
            print(f"cannot read block jobs from {source}: {e}", file=err or sys.stderr)
            return 1
    if policy.fleet is not None and fleet is None:
        from .fleet import read_fleet_view

        fleet = read_fleet_view(policy.fleet)
    plan = evaluate(snapshot, policy, now or datetime.now().astimezone(), History.empty(), space, enforcing=False,
                    fleet=fleet)
    (out or sys.stdout).write(format_plan_table(plan))
    return 0
