"""What the enforcing policy does to libvirt: start a pull or rebase, abort a job.

The only calls that change anything. They need the read-write connection (``--policy.enforce``);
on a read-only one they refuse. A job just started is read back at once, so the next decision
counts it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import libvirt

from .libvirt_events import instance_of
from .libvirt_readers import Target
from .model import Snapshot

if TYPE_CHECKING:
    from .libvirt_host import LibvirtHost


class Actions:
    """The ``PolicyHost`` the policy engine drives; each call raises on failure."""

    def __init__(self, host: "LibvirtHost") -> None:
        self._host = host

    def _writable_domain(self, domain: str) -> libvirt.virDomain:
        connection = self._host._connection
        if connection.read_only or connection.conn is None:
            raise PermissionError("the libvirt connection is read-only (policy not enforcing) or down")
        return self._host._call("lookupByName", connection.conn.lookupByName, domain)

    def start_pull(self, domain: str, disk: str, bandwidth_bytes: int) -> None:
        dom = self._writable_domain(domain)
        self._host._call("blockPull", dom.blockPull, disk, bandwidth_bytes,
                         libvirt.VIR_DOMAIN_BLOCK_PULL_BANDWIDTH_BYTES)
        self._host._read([Target(domain, dom, disk, instance_of(dom))], wait=True)

    def start_rebase(self, domain: str, disk: str, base_path: str, bandwidth_bytes: int) -> None:
        dom = self._writable_domain(domain)
        self._host._call("blockRebase", dom.blockRebase, disk, base_path, bandwidth_bytes,
                         libvirt.VIR_DOMAIN_BLOCK_REBASE_BANDWIDTH_BYTES)
        self._host._read([Target(domain, dom, disk, instance_of(dom))], wait=True)

    def abort_job(self, domain: str, disk: str) -> None:
        dom = self._writable_domain(domain)
        self._host._call("blockJobAbort", dom.blockJobAbort, disk, 0)

    def fresh_snapshot(self) -> Snapshot:
        """Every disk's job read now and applied: for a decision that must count every job on the
        host, including one started by someone else since the last poll."""
        self._host._read(self._host._all_targets(), wait=True)
        return self._host._state.snapshot()
