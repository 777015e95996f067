"""The jobs being tracked, kept in a small file across restarts of the exporter.

Without it a job that ends while the exporter is down is never counted, and a failure in that gap
is lost without a trace. The first resync reconciles the restored jobs as after a libvirtd restart:
a job still running is the same job (same start time), one that ended meanwhile is counted once, as
inferred. The file is written atomically whenever a job starts or ends, never on mere progress. A
missing, unreadable or corrupt file means a clean start and a warning: it caches what libvirt
itself can tell, never a reason to refuse to run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from typing import Any, Iterable

from .model import JOB_TYPES, ActiveJob, DomainInstance
from .state import State, TrackedJob

log = logging.getLogger(__name__)

MAX_BYTES = 8 * 1024 * 1024
MAX_JOBS = 20_000  # far above any host's disks
MAX_NAME = 1024  # libvirt domain names and disk targets are short; paths are longer
MAX_PATH = 4096
MAX_CHAIN = 256
_VERSION = 1


class StateFileError(ValueError):
    pass


def _text(value: Any, what: str, limit: int) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise StateFileError(f"{what} is not a string of at most {limit} characters")
    return value


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise StateFileError(f"{what} is not a byte count")
    return value


def _time(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise StateFileError(f"{what} is not a Unix time")
    return float(value)


def _job(entry: Any, index: int) -> TrackedJob:
    where = f"jobs[{index}]"
    if not isinstance(entry, dict):
        raise StateFileError(f"{where} is not an object")
    job_type = entry.get("job_type")
    if job_type not in JOB_TYPES:
        raise StateFileError(f"{where}.job_type is not one of {', '.join(JOB_TYPES)}")
    chain = entry.get("chain_at_start")
    if not isinstance(chain, list) or len(chain) > MAX_CHAIN:
        raise StateFileError(f"{where}.chain_at_start is not a list of at most {MAX_CHAIN} paths")
    run_id = entry.get("domain_id")
    if isinstance(run_id, bool) or not isinstance(run_id, int) or not -1 <= run_id < 2**31:
        raise StateFileError(f"{where}.domain_id is not a libvirt domain id")
    if not isinstance(entry.get("ready"), bool):
        raise StateFileError(f"{where}.ready is not true or false")
    if not isinstance(entry.get("held", False), bool):
        raise StateFileError(f"{where}.held is not true or false")
    job = ActiveJob(
        domain=_text(entry.get("domain"), f"{where}.domain", MAX_NAME),
        disk=_text(entry.get("disk"), f"{where}.disk", MAX_NAME),
        job_type=job_type,
        cur=_count(entry.get("cur"), f"{where}.cur"),
        end=_count(entry.get("end"), f"{where}.end"),
        bandwidth=_count(entry.get("bandwidth"), f"{where}.bandwidth"),
        ready=entry["ready"],
        start_time=_time(entry.get("start_time"), f"{where}.start_time"),
        cursor_changed_time=_time(entry.get("cursor_changed_time"), f"{where}.cursor_changed_time"),
        instance=DomainInstance(_text(entry.get("domain_uuid"), f"{where}.domain_uuid", 64), run_id),
    )
    return TrackedJob(job, tuple(_text(p, f"{where}.chain_at_start", MAX_PATH) for p in chain),
                      _text(entry.get("source_at_start"), f"{where}.source_at_start", MAX_PATH),
                      held=entry.get("held", False))


def parse(data: bytes) -> tuple[TrackedJob, ...]:
    """The jobs in a state file's bytes; StateFileError says what is wrong."""
    if len(data) > MAX_BYTES:
        raise StateFileError(f"larger than {MAX_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as err:
        raise StateFileError(f"not JSON: {err}") from None
    if not isinstance(doc, dict) or doc.get("version") != _VERSION or not isinstance(doc.get("jobs"), list):
        raise StateFileError(f'not an object with "version": {_VERSION} and a "jobs" list')
    if len(doc["jobs"]) > MAX_JOBS:
        raise StateFileError(f"more than {MAX_JOBS} jobs")
    jobs = tuple(_job(entry, i) for i, entry in enumerate(doc["jobs"]))
    active = [t.job.key for t in jobs if not t.held]
    if len(set(active)) != len(active):
        raise StateFileError("two active jobs on the same disk")
    held = [(t.job.key, t.job.instance, t.job.start_time) for t in jobs if t.held]
    if len(set(held)) != len(held):
        raise StateFileError("the same held job twice")
    return jobs


def dump(jobs: Iterable[TrackedJob]) -> bytes:
    entries = []
    for tracked in jobs:
        job = tracked.job
        if job.instance is None:
            continue  # a job whose run is unknown cannot be matched after a restart
        entries.append({
            "domain": job.domain, "disk": job.disk, "job_type": job.job_type, "cur": job.cur, "end": job.end,
            "bandwidth": job.bandwidth, "ready": job.ready, "start_time": job.start_time,
            "cursor_changed_time": job.cursor_changed_time, "domain_uuid": job.instance.uuid,
            "domain_id": job.instance.id, "chain_at_start": list(tracked.chain_at_start),
            "source_at_start": tracked.source_at_start,
            **({"held": True} if tracked.held else {}),
        })
    return json.dumps({"version": _VERSION, "jobs": entries}, separators=(",", ":")).encode()


class JobsFile:
    """Restores the state's jobs at start and writes them back whenever a job starts or ends."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._written_generation: int | None = None
        self._failing = False

    def restore(self, state: State) -> int:
        """Load the file into ``state``; returns the number of jobs restored."""
        try:
            with open(self.path, "rb") as f:
                jobs = parse(f.read(MAX_BYTES + 1))
        except FileNotFoundError:
            log.warning("state file %s does not exist: starting clean (jobs that ended while the exporter "
                        "was down cannot be counted this time)", self.path)
            return 0
        except (OSError, StateFileError) as err:
            log.warning("state file %s is unusable (%s): starting clean", self.path, err)
            return 0
        state.restore(jobs)
        log.info("state file %s: %d tracked job(s) restored; the first resync reconciles them", self.path, len(jobs))
        return len(jobs)

    def save(self, state: State) -> None:
        """Write the jobs if a job started or ended since the last write; never raises."""
        if state.jobs_generation() == self._written_generation:
            return
        generation, jobs = state.tracked_jobs()
        try:
            directory = os.path.dirname(self.path) or "."
            os.makedirs(directory, mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".state-", dir=directory)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(dump(jobs))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as err:
            if not self._failing:
                log.warning("cannot write the state file %s: %s (jobs that end while the exporter is down will "
                            "not be counted)", self.path, err)
            self._failing = True
            return
        if self._failing:
            log.info("state file %s is written again", self.path)
        self._failing = False
        self._written_generation = generation
