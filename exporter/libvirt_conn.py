"""The main libvirt connection: open, keepalive, close callback, event callbacks, backoff.

It is read-only unless the policy enforces. A close callback and keepalive notice a libvirtd that
went away; opening again backs off up to ``max_delay``, because on a hypervisor the exporter and
libvirtd start and restart independently.
"""

from __future__ import annotations

import logging
import queue
from contextlib import suppress
from typing import Callable

import libvirt

from .libvirt_events import ensure_event_loop, register_callbacks
from .logsetup import RateLimitedLog
from .selfstats import SelfStats

log = logging.getLogger(__name__)


class Connection:
    _FIRST_DELAY = 0.5

    def __init__(self, uri: str, read_only: bool, stats: SelfStats, events: queue.SimpleQueue | None,
                 on_lost: Callable[[], None], max_delay: float = 2.0) -> None:
        """``events`` None: a one-shot reader with no event loop (no events, no close callback)."""
        self.uri = uri
        self.read_only = read_only
        self._stats = stats
        self._events = events
        self._on_lost = on_lost
        self._max_delay = max_delay
        self._delay = self._FIRST_DELAY
        self._callback_ids: list[int] = []
        self._warn = RateLimitedLog(log)
        self.conn: libvirt.virConnect | None = None

    def open(self) -> bool:
        """Connect and register the callbacks; False (logged, retried after ``retry_delay``) if not."""
        try:
            conn = libvirt.openReadOnly(self.uri) if self.read_only else libvirt.open(self.uri)
            self._stats.calls("open")
        except libvirt.libvirtError as err:
            self._stats.calls("open", errors=1)
            self._warn.warning("connect", "cannot connect to %s: %s (retrying)", self.uri, str(err).strip())
            return False
        self.conn = conn
        if self._events is None:
            return True
        try:
            with suppress(libvirt.libvirtError):  # not every driver has keepalive; the close callback works
                conn.setKeepAlive(5, 3)
            conn.registerCloseCallback(lambda _conn, _reason, _opaque: self._on_lost(), None)
            self._callback_ids = register_callbacks(conn, self._events)
            ensure_event_loop().renew_soon_timer()  # answers go behind this connection's events too
        except libvirt.libvirtError as err:
            self._warn.warning("connect", "connected to %s but setting up failed: %s", self.uri, err)
            self.close()
            return False
        self._delay = self._FIRST_DELAY
        return True

    def retry_delay(self) -> float:
        """How long to wait before the next ``open`` after a failed one (doubling, bounded)."""
        delay = self._delay
        self._delay = min(self._delay * 2, self._max_delay)
        return delay

    def alive(self) -> bool:
        conn = self.conn
        try:
            return conn is not None and bool(conn.isAlive())
        except libvirt.libvirtError:
            return False

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        for callback_id in self._callback_ids:
            with suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(callback_id)
        self._callback_ids = []
        for step in (conn.unregisterCloseCallback, conn.close):
            with suppress(libvirt.libvirtError):
                step()
