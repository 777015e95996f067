"""The benchmark's own view of libvirt: read-only connections and its own event loop.

It serves as the witness the exporter is compared against: the RPC floor (a bare loop of the same
``blockJobInfo`` calls the exporter makes), the live cursor of a job, and the moment libvirt
reports a job's end. Like the exporter, this process runs libvirt's default event loop (it needs
events), so the floor is measured under the same client conditions the exporter works under.
Only ``blockJobInfo`` and ``XMLDesc`` are called on domains: never the BLOCK stats group or
``virDomainGetBlockInfo`` (see DEVELOPERS.md).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import libvirt

from exporter.domain_xml import parse_disks

FLAGS = libvirt.VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES

_loop_lock = threading.Lock()
_loop_started = False


def _quiet(_ctx, _err) -> None:
    """libvirt prints every error to stderr by default; a vanished foreign domain is not news."""


def start_event_loop() -> None:
    """Register and run the default event loop once, before any connection is opened."""
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.registerErrorHandler(_quiet, None)
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="bench-libvirt-events", daemon=True).start()
        _loop_started = True


@dataclass(frozen=True)
class JobEnd:
    domain: str
    disk: str
    status: int
    monotonic: float


class Probe:
    def __init__(self, uri: str) -> None:
        start_event_loop()
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

    @staticmethod
    def floor(pairs: list[tuple[libvirt.virDomain, str, str]]) -> tuple[float, int]:
        """One bare pass of ``blockJobInfo`` over ``pairs``: (seconds, failed calls)."""
        errors = 0
        started = time.perf_counter()
        for dom, _name, disk in pairs:
            try:
                dom.blockJobInfo(disk, FLAGS)
            except libvirt.libvirtError:
                errors += 1
        return time.perf_counter() - started, errors

    def handle(self, domain: str) -> libvirt.virDomain:
        return self.conn.lookupByName(domain)

    @staticmethod
    def cursor(dom: libvirt.virDomain, disk: str) -> int | None:
        info = dom.blockJobInfo(disk, FLAGS)
        return int(info["cur"]) if info else None
