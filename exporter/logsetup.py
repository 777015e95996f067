"""Log set-up for ``--log.level`` and ``--log.format`` (text, or one JSON object per line)."""

from __future__ import annotations

import json
import logging
import sys
import time

LEVELS = ("debug", "info", "warn", "error")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)r"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())  # one of LEVELS; logging knows "WARN" as WARNING


class RateLimitedLog:
    """One warning per (what) per interval, so a flapping domain cannot flood the log."""

    def __init__(self, log: logging.Logger, interval: float = 60.0) -> None:
        self._log = log
        self._interval = interval
        self._last: dict[str, float] = {}

    def warning(self, what: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(what, -self._interval) >= self._interval:
            self._last[what] = now
            self._log.warning(message, *args)
        else:
            self._log.debug(message, *args)
