"""The exporter's own counters, written by the poller and the event thread, read by scrapes."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping


@dataclass(frozen=True)
class SelfStatsSnapshot:
    events: Mapping[str, int]
    calls: Mapping[str, int]
    errors: Mapping[str, int]
    reconnects: int
    poll_cycles: int
    last_poll_duration: float
    last_poll_timestamp: float
    discovery_interval: float = 0.0


class SelfStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[str, int] = {"block_job": 0, "block_job_2": 0, "lifecycle": 0}
        self._calls: dict[str, int] = {}
        self._errors: dict[str, int] = {}
        self._reconnects = 0
        self._poll_cycles = 0
        self._last_poll_duration = 0.0
        self._last_poll_timestamp = 0.0
        self._discovery_interval = 0.0

    def event(self, name: str) -> None:
        with self._lock:
            self._events[name] = self._events.get(name, 0) + 1

    def calls(self, method: str, count: int = 1, errors: int = 0) -> None:
        with self._lock:
            self._calls[method] = self._calls.get(method, 0) + count
            self._errors[method] = self._errors.get(method, 0) + errors

    def reconnected(self) -> None:
        with self._lock:
            self._reconnects += 1

    def poll_cycle(self, duration: float, finished_wall: float) -> None:
        with self._lock:
            self._poll_cycles += 1
            self._last_poll_duration = duration
            self._last_poll_timestamp = finished_wall

    def discovery(self, interval: float) -> None:
        """Seconds the sweep takes to read every disk without a job once."""
        with self._lock:
            self._discovery_interval = interval

    def snapshot(self) -> SelfStatsSnapshot:
        with self._lock:
            return SelfStatsSnapshot(
                events=MappingProxyType(dict(self._events)), calls=MappingProxyType(dict(self._calls)),
                errors=MappingProxyType(dict(self._errors)), reconnects=self._reconnects,
                poll_cycles=self._poll_cycles, last_poll_duration=self._last_poll_duration,
                last_poll_timestamp=self._last_poll_timestamp, discovery_interval=self._discovery_interval)
