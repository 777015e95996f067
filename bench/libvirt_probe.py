"""The benchmark's own view of libvirt: read-only connections and its own event loop.

It serves as the witness the exporter is compared against: the RPC floor (a bare loop of the same
``blockJobInfo`` calls the exporter makes), the live cursor of a job, and the moment libvirt
reports a job's end. Like the exporter, this process runs libvirt's default event loop (it needs
events), the exporter's own loop with its gate: a floor pass holds the loop still as a poll cycle
does, so the floor is the cheapest way to make those calls beside a running event loop.
Only ``blockJobInfo`` and ``XMLDesc`` are called on domains: never the BLOCK stats group or
``virDomainGetBlockInfo`` (see DEVELOPERS.md).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import libvirt

from exporter.domain_xml import parse_disks
from exporter.libvirt_events import ensure_event_loop

FLAGS = libvirt.VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES

@dataclass(frozen=True)
class JobEnd:
    domain: str
    disk: str
    status: int
    monotonic: float


class Probe:
    def __init__(self, uri: str) -> None:
        self.event_loop = ensure_event_loop()  # before any connection, or no event arrives
        self.uri = uri
        self.conn = libvirt.openReadOnly(uri)
        self._events_conn = libvirt.openReadOnly(uri)
        self._cond = threading.Condition()
        self.ends: list[JobEnd] = []
        self._callback = self._events_conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, self._on_block_job_2, None)

    def close(self) -> None:
        try:
            self._events_conn.domainEventDeregisterAny(self._callback)
        except libvirt.libvirtError:
            pass
        for conn in (self._events_conn, self.conn):
            try:
                conn.close()
            except libvirt.libvirtError:
                pass

    # ------------------------------------------------------------------ events

    def _on_block_job_2(self, _conn, dom, disk, _job_type, status, _opaque) -> None:
        now = time.monotonic()  # first thing: this is the moment the benchmark learns of the end
        with self._cond:
            self.ends.append(JobEnd(dom.name(), disk, status, now))
            self._cond.notify_all()

    def wait_end(self, domain: str, disk: str, after: float, timeout: float = 30.0) -> JobEnd:
        """The first end of a job on ``domain``/``disk`` reported after monotonic time ``after``."""
        def found():
            for end in self.ends:
                if end.domain == domain and end.disk == disk and end.monotonic >= after:
                    return end
            return None
        with self._cond:
            end = self._cond.wait_for(found, timeout)
        if end is None:
            raise TimeoutError(f"no BLOCK_JOB_2 end for {domain}/{disk} within {timeout}s")
        return end

    # ------------------------------------------------------------------ the RPC floor

    def host_disks(self) -> list[tuple[libvirt.virDomain, str, str]]:
        """(handle, domain, disk) of every running domain's disks, read as the exporter reads them:
        the live XML, cdroms and floppies left out."""
        pairs = []
        for dom in self.conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            try:
                name = dom.name()
                disks = parse_disks(name, dom.XMLDesc(0))
            except libvirt.libvirtError:
                continue  # a foreign domain went away meanwhile
            pairs.extend((dom, name, d.disk) for d in disks)
        return pairs

    def floor_pairs(self, pairs: list[tuple[libvirt.virDomain, str, str]],
                    calls_per_cycle: float) -> tuple[list[tuple[libvirt.virDomain, str, str]], int]:
        """The disks one floor pass reads: as many calls as the exporter makes per cycle.

        Without a call budget that is every disk. With one, the exporter reads every disk with
        a job and a slice of the others each cycle, so the floor reads every disk with a job
        (libvirtd asks QEMU only about those: the costly calls) and the first others up to the
        same count. Returns (those disks, how many of them have a job)."""
        with_job, without = [], []
        with self.event_loop.held():
            for pair in pairs:
                try:
                    (with_job if pair[0].blockJobInfo(pair[2], FLAGS) else without).append(pair)
                except libvirt.libvirtError:
                    without.append(pair)
        others = max(0, min(len(without), round(calls_per_cycle) - len(with_job)))
        return with_job + without[:others], len(with_job)

    def floor(self, pairs: list[tuple[libvirt.virDomain, str, str]]) -> tuple[float, int]:
        """One bare pass of ``blockJobInfo`` over ``pairs``: (seconds, failed calls)."""
        errors = 0
        started = time.perf_counter()
        with self.event_loop.held():
            for dom, _name, disk in pairs:
                try:
                    dom.blockJobInfo(disk, FLAGS)
                except libvirt.libvirtError:
                    errors += 1
        return time.perf_counter() - started, errors

    def floor_cpu(self, pairs: list[tuple[libvirt.virDomain, str, str]], window: float,
                  interval: float) -> dict:
        """The floor's CPU: a pass every ``interval`` (as the exporter polls) for ``window``
        seconds, as % of one core of this whole process (its event loop included)."""
        passes = errors = 0
        cpu0, t0 = time.process_time(), time.monotonic()
        next_pass = t0
        while time.monotonic() - t0 < window:
            _seconds, failed = self.floor(pairs)
            passes += 1
            errors += failed
            next_pass += interval
            time.sleep(max(0.0, next_pass - time.monotonic()))
        elapsed = time.monotonic() - t0
        return {"floor_idle_cpu_pct": 100.0 * (time.process_time() - cpu0) / elapsed,
                "floor_cpu_passes": passes, "floor_cpu_errors": errors}

    def handle(self, domain: str) -> libvirt.virDomain:
        return self.conn.lookupByName(domain)

    @staticmethod
    def cursor(dom: libvirt.virDomain, disk: str) -> int | None:
        info = dom.blockJobInfo(disk, FLAGS)
        return int(info["cur"]) if info else None
