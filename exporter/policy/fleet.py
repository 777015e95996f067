"""The fleet-wide pull budget: leases in ZooKeeper through kazoo (the only module that imports it).

Kazoo's Semaphore recipe counts the children of a lease node and creates one under a Lock; its
leases are ephemeral, so they vanish when the session expires, which after ``kill -9`` is a
session timeout later while the pulls they covered still run. Here the same recipe (kazoo's
``Lock``, count, create) makes **persistent** leases named after the host and disk, and the host's
identity decides who may release them:

    P                               data: the budget, as kazoo's Semaphore keeps it (the smallest in use)
    P/lock                          kazoo's Lock recipe: one lease is taken at a time, fleet-wide
    P/leases/<host>:<domain>:<disk> persistent: one per policy pull that runs (or may run) on a host
    P/hosts/<host>                  persistent; rewritten every heartbeat
    P/hosts/<host>/owner            ephemeral: the session of the exporter acting for the host now

An exporter acts for its host only while it holds ``owner``; a restarted one waits for the old
session's ``owner`` to expire, then takes the host's leases back (the engine adopts those whose
pull still runs and the rest are released). Another exporter deletes a host's leases only once
that host's heartbeat has not changed for ``host_lost_after`` of its own connected observation,
in one transaction guarded by the heartbeat's version. Every exporter enforces the smaller of its
own ``max_concurrent`` and P's, and lowers P's to its own. docs/policy.md#fleet-budget has the
design and its failure behaviour.

Every ZooKeeper call runs on this module's own thread with a timeout; the poller only reads the
cached view and waits at most ``fleet.timeout`` for a lease.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import quote, unquote

from exporter.configfile import open_file, read_bounded
from exporter.model import DiskKey

from .config import MAX_FLEET_PULLS, Fleet
from .decide import FleetView

log = logging.getLogger("exporter.policy.fleet")
_kazoo_log = logging.getLogger("exporter.policy.fleet.kazoo")
_kazoo_log.setLevel(logging.INFO)  # kazoo's debug log is every request and answer

MAX_HOST_ID = 253  # a DNS name
MAX_PASSWORD_BYTES = 4096
_MAX_NAME = 1000  # a lease node's name; longer (huge domain names) is hashed
_MAX_LEASE_DATA = 64 * 1024

# The engine's answer to "which leases must stay": (generation adopted, disks whose pull runs,
# disks being started right now). Only the running ones are re-taken when missing.
NeedsFn = Callable[[], tuple[int, frozenset, frozenset]]


class FleetError(Exception):
    """The fleet section cannot be used (an unreadable password file)."""


def host_id_problem(host_id: str) -> str | None:
    if not host_id or len(host_id) > MAX_HOST_ID:
        return f"must be 1 to {MAX_HOST_ID} characters"
    if not host_id.isprintable() or any(c.isspace() for c in host_id):
        return "must be printable, without spaces"
    return None


@dataclass(frozen=True)
class Lease:
    host: str
    domain: str
    disk: str
    rule: str
    started: float  # Unix time the lease was taken

    @property
    def key(self) -> DiskKey:
        return (self.domain, self.disk)


def lease_name(host: str, key: DiskKey) -> str:
    """``host:domain:disk``, each percent-encoded (no ``/``, never ``.``); hashed past _MAX_NAME."""
    name = ":".join(quote(part, safe="") for part in (host, *key))
    if len(name) <= _MAX_NAME:
        return name
    digest = hashlib.sha256("\0".join(key).encode()).hexdigest()
    return f"{quote(host, safe='')}:sha256-{digest}"


def lease_host(name: str) -> str:
    return unquote(name.split(":", 1)[0])


def _lease_data(lease: Lease) -> bytes:
    return json.dumps({"host": lease.host, "domain": lease.domain, "disk": lease.disk, "rule": lease.rule,
                       "started": lease.started, "pid": os.getpid()}).encode()


def _parse_lease(data: bytes) -> Lease | None:
    try:
        d = json.loads(data[:_MAX_LEASE_DATA].decode())
        return Lease(str(d["host"]), str(d["domain"]), str(d["disk"]), str(d.get("rule", "")),
                     float(d.get("started", 0.0)))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _parse_budget(data: bytes | None) -> int | None:
    """The budget in ``P``'s data (ASCII digits, as kazoo's Semaphore writes it), None if it holds none."""
    if not data or len(data) > 20 or not data.isdigit():
        return None
    n = int(data)
    return n if 1 <= n <= MAX_FLEET_PULLS else None


def _read_password(path: str) -> str:
    try:
        raw = read_bounded(path, MAX_PASSWORD_BYTES)
    except OSError as e:
        raise FleetError(f"fleet.digest_auth.password_file {path}: {e.strerror or e}") from None
    if raw is None:
        raise FleetError(f"fleet.digest_auth.password_file {path}: larger than {MAX_PASSWORD_BYTES} bytes")
    try:
        return raw.decode().rstrip("\r\n")
    except UnicodeDecodeError:
        raise FleetError(f"fleet.digest_auth.password_file {path}: not UTF-8") from None


def make_client(config: Fleet):
    """A KazooClient for ``config``, not started: bounded retries, TLS and digest auth as configured."""
    from kazoo.client import KazooClient
    from kazoo.retry import KazooRetry
    from kazoo.security import make_acl, make_digest_acl

    kw: dict = {}
    if config.digest_auth is not None:
        user, password = config.digest_auth.username, _read_password(config.digest_auth.password_file)
        kw["auth_data"] = [("digest", f"{user}:{password}")]
        # Ours to change, everyone's to read (policy plan, zkCli): the leases are not secret.
        kw["default_acl"] = [make_digest_acl(user, password, all=True), make_acl("world", "anyone", read=True)]
    if config.tls is not None:
        for key in ("ca_file", "cert_file", "key_file"):
            path = getattr(config.tls, key)
            try:
                if path:
                    with open_file(path):  # OpenSSL would wait on a FIFO for ever
                        pass
            except OSError as e:
                raise FleetError(f"fleet.tls.{key} {path}: {e.strerror or e}") from None
        kw.update(use_ssl=True, verify_certs=config.tls.verify, ca=config.tls.ca_file,
                  certfile=config.tls.cert_file, keyfile=config.tls.key_file)
    return KazooClient(
        hosts=config.zookeeper, timeout=config.session_timeout, logger=_kazoo_log,
        # Reconnect for ever (ZooKeeper may be down for long); a command is never retried: the
        # caller decides again on the next evaluation.
        connection_retry=KazooRetry(max_tries=-1, delay=0.2, backoff=2, max_delay=2.0),
        command_retry=KazooRetry(max_tries=0, deadline=config.timeout),
        **kw)


class _Request:
    def __init__(self, key: DiskKey, rule: str) -> None:
        self.key, self.rule = key, rule
        self.done = threading.Event()
        self.abandoned = False
        self.result: tuple[bool, str] = (False, "not attempted")


class FleetBudget:
    """One exporter's side of the budget. Thread-safe; ``view``/``held`` never wait on ZooKeeper.

    ``enforcing``: takes leases, heartbeats, releases what the engine no longer needs and reaps
    lost hosts. Otherwise (dry run) it only reads how many leases are taken.
    """

    def __init__(self, config: Fleet, host_id: str, enforcing: bool, needs: NeedsFn | None = None,
                 on_change: Callable[[], None] | None = None, client=None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        problem = host_id_problem(host_id)
        if problem:
            raise FleetError(f"fleet host id {host_id[:40]!r}: {problem}")
        self.config = config
        self.host_id = host_id
        self._enforcing = enforcing
        self._needs = needs or (lambda: (0, frozenset(), frozenset()))
        self._on_change = on_change or (lambda: None)
        self._client = client if client is not None else make_client(config)
        self._clock = clock
        self._timeout = config.timeout
        self._path = config.path.rstrip("/")
        self._leases_path = f"{self._path}/leases"
        self._host_path = f"{self._path}/hosts/{quote(host_id, safe='')}"
        self._prefix = quote(host_id, safe="") + ":"
        self._heartbeat_every = max(0.5, min(config.session_timeout / 3, config.host_lost_after / 10))
        self._reap_every = max(1.0, config.host_lost_after / 10)
        self._lock = threading.Lock()  # the fields below
        self._connected = False
        self._session_lost = False
        self._owner = False
        self._generation = 0  # +1 each time this host's identity is (re)gained
        self._adoption: tuple[int, dict[DiskKey, Lease]] | None = None
        self._in_use = 0
        self._max = config.max_concurrent  # enforced: the smaller of ours and the one in ZooKeeper
        self._held: dict[DiskKey, Lease] = {}
        self._usable = False
        self._detail = f"connecting to ZooKeeper {config.zookeeper}"
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._requests: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # thread-only state
        self._paths_ready = False
        self._last_heartbeat = 0.0
        self._next_reap = 0.0
        self._seen: dict[str, tuple[int, float]] = {}  # host node -> (heartbeat version, first seen at)
        self._names: dict[str, Lease | None] = {}  # our lease node names -> what they hold
        self._budget_warned: bytes | None = None
        self._logged_detail = ""

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._client.add_listener(self._on_state)
        self._client.start_async()
        self._thread = threading.Thread(target=self._run, name="policy-fleet", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close the session: ``owner`` goes at once, so a restart takes over without waiting. The
        leases stay: the pulls they cover run on without us."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self._timeout + 5)
        try:
            self._client.stop()
            self._client.close()
        except Exception as e:  # noqa: BLE001 - shutting down anyway
            log.debug("closing the ZooKeeper client: %s", e)

    def wake(self) -> None:
        """Sync soon (the engine calls this after each evaluation: a finished pull's lease goes)."""
        self._wake.set()

    def _on_state(self, state) -> None:
        """kazoo's listener, on its connection thread: flags only, never a call."""
        from kazoo.protocol.states import KazooState

        with self._lock:
            self._connected = state == KazooState.CONNECTED
            if state == KazooState.LOST:
                self._session_lost = True
                self._owner = False
            if not self._connected:
                self._usable = False
                self._detail = ("ZooKeeper session lost (expired); reconnecting" if state == KazooState.LOST
                                else "connection to ZooKeeper lost; reconnecting")
        self._wake.set()
        self._on_change()

    # ------------------------------------------------------------------ what the engine reads

    def view(self) -> FleetView:
        with self._lock:
            return FleetView(self._usable, self._max, self._in_use, self._detail)

    def held(self) -> int:
        with self._lock:
            return len(self._held)

    def connected(self) -> bool:
        with self._lock:
            return self._usable

    def adoption(self) -> tuple[int, dict[DiskKey, Lease]] | None:
        """(generation, this host's leases as found) since the identity was last (re)gained, for the
        engine to take back the pulls that still run. Nothing is released until ``needs`` answers
        with that generation."""
        with self._lock:
            return self._adoption

    def acquire(self, key: DiskKey, rule: str) -> tuple[bool, str]:
        """Take a lease for a pull about to start; waits at most ``fleet.timeout``. (ok, why not)."""
        if not self._enforcing:
            return False, "dry run takes no lease"
        with self._lock:
            if not self._usable:
                return False, f"fleet budget unavailable: {self._detail}"
        req = _Request(key, rule)
        self._requests.put(req)
        self._wake.set()
        if not req.done.wait(self._timeout + 0.5):
            req.abandoned = True  # if it is taken after all, the next sync releases it
            return False, f"ZooKeeper did not grant a lease within {self._timeout:g}s"
        return req.result

    # ------------------------------------------------------------------ the fleet thread

    def _z(self, method: str, *args, **kw):
        """One ZooKeeper call, waited for at most ``timeout``."""
        return getattr(self._client, f"{method}_async")(*args, **kw).get(timeout=self._timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._heartbeat_every)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._sync()
                while True:
                    try:
                        req = self._requests.get_nowait()
                    except queue.Empty:
                        break
                    self._serve(req)
            except Exception as e:  # noqa: BLE001 - kazoo errors, timeouts: unusable until the next sync
                self._set_state(False, f"ZooKeeper error: {type(e).__name__}: {e}"[:300])
            self._fail_requests()

    def _fail_requests(self) -> None:
        with self._lock:
            usable, detail = self._usable, self._detail
        if usable:
            return
        while True:
            try:
                req = self._requests.get_nowait()
            except queue.Empty:
                return
            req.result = (False, f"fleet budget unavailable: {detail}")
            req.done.set()

    def _set_state(self, usable: bool, detail: str = "") -> None:
        with self._lock:
            changed = usable != self._usable
            self._usable, self._detail = usable, detail
        if detail != self._logged_detail:
            (log.info if usable else log.warning)("fleet budget %s: %s", self.config.path,
                                                  detail or "available")
            self._logged_detail = detail
        if changed:
            self._on_change()

    def _sync(self) -> None:
        with self._lock:
            connected, lost = self._connected, self._session_lost
            self._session_lost = False
        if lost:
            self._seen.clear()
        if not connected:
            self._seen.clear()  # a host's silence counts only while we watch
            with self._lock:
                detail = self._detail
            self._set_state(False, detail)
            return
        if not self._paths_ready:
            self._ensure_paths()
        self._read_budget()
        if self._enforcing and not self._claim():
            return
        now = self._clock()
        if self._enforcing and now - self._last_heartbeat >= self._heartbeat_every:
            self._heartbeat()
            self._last_heartbeat = now
        names = self._z("get_children", self._leases_path) if self._exists(self._leases_path) else []
        if self._enforcing:
            names = self._reconcile(names)
        mine = {n: self._names.get(n) for n in names if n.startswith(self._prefix)}
        with self._lock:
            self._in_use = len(names)
            self._held = {lease.key: lease for lease in mine.values() if lease is not None}
        if self._enforcing and now >= self._next_reap:
            due = self._reap(names, now)
            self._next_reap = min(now + self._reap_every * random.uniform(0.8, 1.2), due)
        self._set_state(True, "")

    def _exists(self, path: str) -> bool:
        return self._z("exists", path) is not None

    def _ensure_paths(self) -> None:
        if self._enforcing:
            self._z("ensure_path", self._leases_path)
            self._z("ensure_path", f"{self._path}/hosts")
        self._paths_ready = True

    def _read_budget(self) -> None:
        """Enforce the smaller of our ``max_concurrent`` and ``P``'s, and (enforcing) lower ``P``'s to
        ours: hosts configured differently then all enforce the smallest, in whatever order they
        start. Only a hand edit raises it, so a host with an old policy file cannot."""
        from kazoo.exceptions import BadVersionError, NoNodeError

        local = self.config.max_concurrent
        try:
            data, stat = self._z("get", self._path)
        except NoNodeError:  # no exporter has enforced yet (dry run), or deleted by hand
            self._paths_ready = False
            data, stat = b"", None
        stored = _parse_budget(data)
        if self._enforcing and stat is not None and (stored is None or stored > local):
            try:
                self._z("set", self._path, str(local).encode(), version=stat.version)
                if data:
                    log.warning("fleet budget %s was %r in ZooKeeper; set to this host's max_concurrent %d",
                                self._path, data[:20], local)
                stored = local
            except BadVersionError:  # another exporter wrote it just now
                stored = _parse_budget(self._z("get", self._path)[0])
        if stored is not None and stored < local and data != self._budget_warned:
            self._budget_warned = data
            log.warning("fleet budget %s is %d in ZooKeeper, below max_concurrent %d here: enforcing %d, the "
                        "smallest any exporter using this path has set; to raise it, give every host the new "
                        "value, then set it in ZooKeeper by hand (zkCli.sh set %s N)", self._path, stored, local,
                        stored, self._path)
        with self._lock:
            self._max = local if stored is None else min(local, stored)

    def _claim(self) -> bool:
        """Hold this host's identity (``owner``); False while another session holds it."""
        from kazoo.exceptions import NodeExistsError, NoNodeError

        with self._lock:
            if self._owner:
                return True
        session = self._client.client_id[0] if self._client.client_id else None
        owner = f"{self._host_path}/owner"
        try:
            self._z("ensure_path", self._host_path)
            self._z("create", owner, json.dumps({"pid": os.getpid()}).encode(), ephemeral=True)
        except NodeExistsError:
            try:
                _, stat = self._z("get", owner)
            except NoNodeError:
                self._wake.set()  # it just went: try again at once
                return False
            if stat.ephemeralOwner != session:
                self._set_state(False, f"host id {self.host_id!r} is held by another ZooKeeper session: an earlier "
                                       "run of this exporter until its session times out, or another exporter "
                                       "with the same --fleet.host-id")
                return False
        self._names.clear()
        names = self._z("get_children", self._leases_path)
        leases = {}
        for name in names:
            if name.startswith(self._prefix):
                lease = self._read_lease(name)
                if lease is not None and lease.host == self.host_id:
                    leases[lease.key] = lease
        with self._lock:
            self._owner = True
            self._generation += 1
            self._adoption = (self._generation, leases)
        log.info("fleet budget %s: acting for host %r (%d leases of this host found)", self._path, self.host_id,
                 len(leases))
        self._on_change()
        return True

    def _read_lease(self, name: str) -> Lease | None:
        from kazoo.exceptions import NoNodeError

        if name in self._names:
            return self._names[name]
        try:
            data, _ = self._z("get", f"{self._leases_path}/{name}")
        except NoNodeError:
            return None
        lease = _parse_lease(data)
        if lease is None:
            log.warning("fleet lease %s holds no lease record; leaving it alone", name)
        self._names[name] = lease
        return lease

    def _heartbeat(self) -> None:
        from kazoo.exceptions import NoNodeError

        beat = json.dumps({"host": self.host_id, "pid": os.getpid(), "time": time.time()}).encode()
        try:
            self._z("set", self._host_path, beat)
        except NoNodeError:  # reaped while we were away
            self._z("ensure_path", self._host_path)
            self._z("set", self._host_path, beat)

    def _reconcile(self, names: list[str]) -> list[str]:
        """Release this host's leases no pull needs; re-take the ones a running pull lost."""
        from kazoo.exceptions import NodeExistsError, NoNodeError

        generation, running, starting = self._needs()
        with self._lock:
            current = generation == self._generation
        names = list(names)
        mine = {}
        for name in names:
            if name.startswith(self._prefix):
                lease = self._read_lease(name)
                if lease is not None and lease.host == self.host_id:
                    mine[lease.key] = name
        if current:
            for key, name in mine.items():
                if key in running or key in starting:
                    continue
                try:
                    self._z("delete", f"{self._leases_path}/{name}")
                except NoNodeError:
                    pass
                names.remove(name)
                self._names.pop(name, None)
                log.info("fleet lease released: %s/%s", *key)
        for key in sorted(running - set(mine)):
            # A pull runs without its lease (reaped while this host was unreachable): it counts
            # again, over the budget if need be, since it runs whatever we do.
            lease = Lease(self.host_id, key[0], key[1], "", time.time())
            name = lease_name(self.host_id, key)
            try:
                self._z("create", f"{self._leases_path}/{name}", _lease_data(lease))
                log.warning("fleet lease re-taken for the running pull on %s/%s (it had been released)", *key)
            except NodeExistsError:
                pass
            names.append(name)
            self._names[name] = lease
        return names

    def _serve(self, req: _Request) -> None:
        if req.abandoned:
            return
        try:
            req.result = self._take(req.key, req.rule)
        except Exception as e:
            req.result = (False, f"ZooKeeper error: {type(e).__name__}: {e}"[:300])
            raise
        finally:
            req.done.set()

    def _take(self, key: DiskKey, rule: str) -> tuple[bool, str]:
        """kazoo's Semaphore, persistent: under the Lock recipe, count the leases and create ours."""
        from kazoo.exceptions import LockTimeout, NodeExistsError

        name = lease_name(self.host_id, key)
        lock = self._client.Lock(f"{self._path}/lock", self.host_id)
        try:
            got = lock.acquire(timeout=self._timeout)
        except LockTimeout:  # kazoo raises rather than returning False: busy, not broken
            got = False
        if not got:
            return False, f"the fleet lock was busy for {self._timeout:g}s"
        try:
            names = self._z("get_children", self._leases_path)
            if name in names:
                return True, "lease already held"
            if len(names) >= self._max:
                with self._lock:
                    self._in_use = len(names)
                return False, f"{len(names)} fleet leases taken >= fleet max_concurrent {self._max}"
            lease = Lease(self.host_id, key[0], key[1], rule, time.time())
            try:
                self._z("create", f"{self._leases_path}/{name}", _lease_data(lease))
            except NodeExistsError:
                pass
            self._names[name] = lease
            with self._lock:
                self._in_use = len(names) + 1
                self._held[key] = lease
            log.info("fleet lease taken for %s/%s (%d of %d)", key[0], key[1], len(names) + 1, self._max)
            return True, ""
        finally:
            try:
                lock.release()
            except Exception as e:  # noqa: BLE001 - the lock node is ephemeral: it goes with the session
                log.warning("fleet lock release failed: %s", e)

    def _reap(self, names: list[str], now: float) -> float:
        """Delete the leases of hosts whose heartbeat has not moved for host_lost_after (watched by us).

        Returns when the next silent host is due, so it is reaped then rather than up to a reap
        interval later: the time docs/policy.md gives for a lost host's leases holds."""
        from kazoo.exceptions import KazooException, NoNodeError

        hosts_path = f"{self._path}/hosts"
        due = float("inf")
        by_host: dict[str, list[str]] = {}
        for name in names:
            by_host.setdefault(name.split(":", 1)[0], []).append(name)
        hosts = self._z("get_children", hosts_path)
        for node in hosts:
            if node == quote(self.host_id, safe=""):
                continue
            path = f"{hosts_path}/{node}"
            try:
                _, stat = self._z("get", path)
            except NoNodeError:
                continue
            seen = self._seen.get(node)
            if stat.numChildren or seen is None or seen[0] != stat.version:
                self._seen[node] = (stat.version, now)  # alive (owner held) or beating
                continue
            if now - seen[1] < self.config.host_lost_after:
                due = min(due, seen[1] + self.config.host_lost_after)
                continue
            leases = by_host.get(node, [])
            txn = self._client.transaction()
            txn.check(path, stat.version)
            for name in leases:
                txn.delete(f"{self._leases_path}/{name}")
            txn.delete(path)
            results = txn.commit_async().get(timeout=self._timeout)
            if any(isinstance(r, (Exception, KazooException)) for r in results):
                log.info("fleet: host %s came back or changed while being reaped; leaving it", unquote(node))
                continue
            self._seen.pop(node, None)
            log.warning("fleet: host %s has been silent for %.0fs (host_lost_after): released its %d leases",
                        unquote(node), now - seen[1], len(leases))
        for node in set(self._seen) - set(hosts):
            del self._seen[node]
        return due


def read_fleet_view(config: Fleet, timeout: float | None = None) -> FleetView:
    """The budget as it is now, for ``policy plan``: connect, read the budget and count the leases,
    disconnect. No write."""
    from kazoo.exceptions import NoNodeError

    timeout = config.timeout if timeout is None else timeout
    try:
        client = make_client(config)
    except FleetError as e:
        return FleetView(False, config.max_concurrent, 0, str(e))
    try:
        client.start(timeout=timeout)
        try:
            stored = _parse_budget(client.get_async(config.path).get(timeout=timeout)[0])
            in_use = len(client.get_children_async(f"{config.path}/leases").get(timeout=timeout))
        except NoNodeError:
            stored, in_use = None, 0
        return FleetView(True, min(config.max_concurrent, stored or config.max_concurrent), in_use)
    except Exception as e:  # noqa: BLE001 - unreachable, auth failed, timeout: shown as the reason
        return FleetView(False, config.max_concurrent, 0, f"cannot read ZooKeeper {config.zookeeper}: "
                                                          f"{type(e).__name__}: {e}"[:300])
    finally:
        try:
            client.stop()
            client.close()
        except Exception:  # noqa: BLE001
            pass
