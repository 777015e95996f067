"""The external checker: what a user's monitoring sees of the exporter.

Run by the benchmark as ``python -m bench.checker PORT`` (see ``probes.Checker``). For each
command on stdin (one JSON line: ``name``, ``labels``, ``timeout``) it scrapes once, answers
``{"ready": true, "before": value}``, then scrapes back to back, a new TCP connection each time
(``Accept-Encoding: gzip`` as Prometheus asks, unless ``--no-gzip``), with Python's default
switch interval, until that sample goes above ``before``; it answers with the moment the body
that showed it arrived and the (start, end) of every scrape of the loop, all on
``time.monotonic()`` (CLOCK_MONOTONIC, the same clock as the benchmark's event callback).

A process of its own so that its loop shares no GIL with the benchmark's libvirt event callback,
the witness of when libvirt reported the event: only this module and ``bench.scraping`` load.
"""

from __future__ import annotations

import json
import sys
import time

from bench.scraping import sample_value, scrape


def _say(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def watch(port: int, name: str, labels: dict, timeout: float, use_gzip: bool) -> None:
    before = sample_value(scrape(port, use_gzip=use_gzip).body, name, **labels) or 0.0
    _say({"ready": True, "before": before})
    spans: list[tuple[float, float]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        started = time.monotonic()
        got = scrape(port, use_gzip=use_gzip)
        arrived = started + got.seconds  # the last body byte; decompressing and searching come after
        spans.append((started, arrived))
        value = sample_value(got.body, name, **labels)
        if value is not None and value > before:
            _say({"seen": arrived, "started": started, "scrapes": len(spans), "spans": spans})
            return
    _say({"timeout": True, "scrapes": len(spans)})


def main(argv: list[str]) -> int:
    port = int(argv[0])
    use_gzip = "--no-gzip" not in argv[1:]
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        watch(port, command["name"], command["labels"], float(command.get("timeout", 30.0)), use_gzip)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
