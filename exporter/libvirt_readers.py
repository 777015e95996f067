"""``blockJobInfo`` on reader threads, each with its own read-only libvirt connection.

A QEMU that stops answering its monitor blocks ``blockJobInfo`` with no timeout, and nothing may
let that one domain stall every other job's metrics or get another domain blamed:

* The calls run on a reader thread, so the poller can walk away from a call. A blocked call cannot
  be interrupted: its reader is set aside with it and the rest of the list is read by another.
* Each reader has its own connection. With libvirt 9.0's client the thread whose call is in flight
  does the socket I/O for every other call on that connection and can miss the wake-up that hands
  it a new request: a call queued behind a hung one then waits for libvirtd's next keepalive ping.
  libvirtd also reads only a few requests of one connection at a time (``max_client_requests``).
  A hung call therefore keeps its connection to itself.
* A slow call is set aside after ``patience``, a fraction of the poll interval, not after the call
  timeout, so the other domains are read on time. Its domain is skipped while the call is out and
  named unresponsive only once the call has not answered for ``call_timeout``; an answer that
  comes before that is handed over with the next read, so a slow but healthy domain still updates.
* Bounded: at most ``MAX_UNDECIDED`` slow calls not yet named (beyond that a read waits the full
  timeout, as when libvirtd is slow for everyone), ``MAX_SPARES`` idle readers kept, and
  ``MAX_HUNG`` hung calls (each holds a thread, a connection and a libvirtd worker) before the
  disks of further domains are skipped rather than read.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Callable

import libvirt

from .libvirt_events import JOB_TYPES
from .model import DiskKey, DomainInstance, JobInfo
from .selfstats import SelfStats

log = logging.getLogger(__name__)

# What libvirt says of a domain that stopped or vanished meanwhile.
DOMAIN_GONE_ERRORS = (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID)


def job_info_from_libvirt(raw: dict) -> JobInfo:
    return JobInfo(job_type=JOB_TYPES.get(raw.get("type", 0), "unknown"), cur=int(raw.get("cur", 0)),
                   end=int(raw.get("end", 0)), bandwidth=int(raw.get("bandwidth", 0)))


@dataclass(frozen=True)
class Target:
    """One disk to read, through the handle (on the main connection) of the run of its domain that
    the inventory saw."""

    domain: str
    handle: libvirt.virDomain
    disk: str
    instance: DomainInstance
    key: DiskKey = field(init=False, compare=False, repr=False)  # looked up for every disk every cycle

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", (self.domain, self.disk))


@dataclass(frozen=True)
class Read:
    """One ``blockJobInfo`` call: libvirt's answer (a dict) or the error it raised."""

    target: Target
    result: dict | libvirt.libvirtError
    call_started: float  # monotonic


class _Reader(threading.Thread):
    """Reads lists of targets, cycle after cycle, on its own connection (None: call the targets'
    own handles, for tests). Stopping it closes the connection, after an outstanding call."""

    _FLAGS = libvirt.VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES
    _MAX_HANDLES = 4096

    def __init__(self, conn: libvirt.virConnect | None, generation: int,
                 on_late: Callable[["_Reader", Read], None]) -> None:
        super().__init__(name="blockjob-reader", daemon=True)
        self._conn = conn
        self.generation = generation
        self._on_late = on_late
        self._handles: dict[bytes, libvirt.virDomain] = {}
        self._lock = threading.Lock()
        self._targets: list[Target] | None = []
        self._results: list[Read] = []
        self._position = 0
        self._call_started: float | None = None
        self._set_aside = False
        self._go = threading.Event()
        self._done = threading.Event()

    def run(self) -> None:
        try:
            while True:
                self._go.wait()
                self._go.clear()
                targets = self._targets
                if targets is None:
                    return
                late = None
                try:
                    late = self._read(targets)
                finally:
                    if late is None:
                        self._done.set()
                if late is not None:
                    self._on_late(self, late)
        finally:
            if self._conn is not None:
                with suppress(libvirt.libvirtError):
                    self._conn.close()

    def usable(self) -> bool:
        if self._targets is None:
            return False
        try:
            return self._conn is None or bool(self._conn.isAlive())
        except libvirt.libvirtError:
            return False

    def _handle(self, target: Target) -> libvirt.virDomain:
        """The domain on this reader's connection, looked up once by UUID (which names the domain
        whatever run it is in, as the main connection's handle does)."""
        if self._conn is None:
            return target.handle
        uuid = target.handle.UUID()
        handle = self._handles.get(uuid)
        if handle is None:
            if len(self._handles) >= self._MAX_HANDLES:
                self._handles.clear()
            handle = self._handles[uuid] = self._conn.lookupByUUID(uuid)
        return handle

    def _read(self, targets: list[Target]) -> Read | None:
        """None when the list was read; the late answer when the caller had walked away."""
        monotonic = time.monotonic
        lock = self._lock
        results = self._results
        for index, target in enumerate(targets):
            # No lock: the caller reads these two under the lock below and only acts on a
            # started call, and the position is written first.
            self._position = index
            self._call_started = started = monotonic()
            try:
                outcome = self._handle(target).blockJobInfo(target.disk, self._FLAGS)
            except libvirt.libvirtError as err:
                outcome = err
            except Exception as err:  # a binding's surprise must not end the thread the poller waits on
                outcome = libvirt.libvirtError(f"blockJobInfo({target.disk}) raised {err!r}")
            read = Read(target, outcome, started)
            with lock:
                late = self._set_aside
                if not late:
                    results.append(read)
                    self._call_started = None
            if late:
                return read
        return None

    def read(self, targets: list[Target], patience: float, results: list[Read],
             on_set_aside: Callable[["_Reader", str, float], None]) -> int | None:
        """Reads ``targets`` into ``results``; None when all were read, else the index of the call
        that took longer than ``patience``: the reader is then set aside with that call."""
        with self._lock:
            self._targets = targets
            self._results = []
            self._position = 0
            self._call_started = None
            self._set_aside = False
        self._done.clear()
        self._go.set()
        step = min(0.01, patience)
        while not self._done.wait(step):
            with self._lock:
                started = self._call_started
                if started is None or time.monotonic() - started <= patience:
                    continue
                self._set_aside = True
                results.extend(self._results)
                # Under the lock: recorded before the late answer can be handed on.
                on_set_aside(self, targets[self._position].domain, started)
                return self._position
        with self._lock:
            results.extend(self._results)
        return None

    def stop(self) -> None:
        with self._lock:
            self._targets = None
        self._go.set()


class JobReaders:
    MAX_UNDECIDED = 2
    MAX_SPARES = 2
    MAX_HUNG = 32

    def __init__(self, uri: str | None, stats: SelfStats, call_timeout: float, patience: float,
                 on_unresponsive: Callable[[frozenset[str]], None], wake: Callable[[], None]) -> None:
        self._uri = uri
        self._stats = stats
        self._call_timeout = call_timeout
        self._patience = patience
        self._on_unresponsive = on_unresponsive
        self._wake = wake
        self._lock = threading.Lock()
        self._reader: _Reader | None = None  # used by the poller thread only
        self._spares: list[_Reader] = []
        self._outstanding: dict[str, tuple[_Reader, float]] = {}  # domain -> its set-aside call
        self._unresponsive: set[str] = set()
        self._late: list[Read] = []
        self._generation = 0

    def outstanding(self) -> bool:
        with self._lock:
            return bool(self._outstanding)

    def unresponsive(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._unresponsive)

    def read(self, targets: list[Target]) -> tuple[list[Read], bool]:
        """(every answer, whether every target was read); the answers include those of calls set
        aside earlier that came back in time. Domains with a call out are skipped."""
        with self._lock:
            results, self._late = self._late, []
            busy = set(self._outstanding)
        self._name_overdue()
        if busy:
            targets = [t for t in targets if t.domain not in busy]
        complete = not busy
        position = 0
        while position < len(targets):
            with self._lock:
                hung = len(self._outstanding)
                undecided = hung - len(self._unresponsive)
            if hung >= self.MAX_HUNG:
                log.warning("%d blockJobInfo calls have not answered; skipping the remaining %d disks", hung,
                            len(targets) - position)
                return results, False
            reader = self._take()
            patience = self._patience if undecided < self.MAX_UNDECIDED else self._call_timeout
            stuck_at = reader.read(targets[position:], patience, results, self._set_aside)
            if stuck_at is None:
                self._reader = reader
                break
            self._reader = None
            complete = False
            name = targets[position + stuck_at].domain
            position += stuck_at + 1
            while position < len(targets) and targets[position].domain == name:
                position += 1
        self._name_overdue()
        return results, complete

    def close(self) -> None:
        """The main connection is going away: so are the readers and their connections."""
        with self._lock:
            self._generation += 1
            readers = self._spares + [reader for reader, _ in self._outstanding.values()]
            if self._reader is not None:
                readers.append(self._reader)
            self._reader = None
            self._spares = []
            self._outstanding.clear()
            self._late.clear()
            named, self._unresponsive = self._unresponsive, set()
        for reader in readers:
            reader.stop()
        if named:
            self._on_unresponsive(frozenset())

    def _take(self) -> _Reader:
        if self._reader is not None:
            if self._reader.usable():
                return self._reader
            self._reader.stop()
        with self._lock:
            while self._spares:
                spare = self._spares.pop()
                if spare.usable():
                    return spare
                spare.stop()
            generation = self._generation
        conn = None
        if self._uri is not None:
            try:
                conn = libvirt.openReadOnly(self._uri)
            finally:
                self._stats.calls("open", errors=0 if conn is not None else 1)
        reader = _Reader(conn, generation, self._answered_late)
        reader.start()
        return reader

    def _set_aside(self, reader: _Reader, name: str, started: float) -> None:
        with self._lock:
            self._outstanding[name] = (reader, started)

    def _name_overdue(self) -> None:
        now = time.monotonic()
        overdue = []
        with self._lock:
            for name, (_reader, started) in self._outstanding.items():
                if name not in self._unresponsive and now - started > self._call_timeout:
                    self._unresponsive.add(name)
                    overdue.append((name, now - started))
            named = frozenset(self._unresponsive)
        for name, waited in overdue:
            log.warning("blockJobInfo on %s has not answered for %.1fs; skipping the domain until it does",
                        name, waited)
        if overdue:
            self._on_unresponsive(named)

    def _answered_late(self, reader: _Reader, read: Read) -> None:
        """On a set-aside reader's thread, when its call returns."""
        name = read.target.domain
        with self._lock:
            current = self._outstanding.get(name, (None, 0.0))[0] is reader
            named = current and name in self._unresponsive
            if current:
                del self._outstanding[name]
                self._unresponsive.discard(name)
                if not named:  # only slow: its answer goes with the next read
                    self._late.append(read)
            keep = (current and reader.generation == self._generation and len(self._spares) < self.MAX_SPARES
                    and reader.usable())
            if keep:
                self._spares.append(reader)
            still_named = frozenset(self._unresponsive)
        if not keep:
            reader.stop()
        if named:
            log.info("domain %s answers blockJobInfo again (after %.1fs)", name, time.monotonic() - read.call_started)
            self._on_unresponsive(still_named)
        self._wake()
