"""The state file: a round trip, every bound crossed, and a bad file never stopping the exporter."""

from __future__ import annotations

import json

import pytest

from exporter import statefile
from exporter.model import ActiveJob, DomainInstance, JobInfo
from exporter.state import State, TrackedJob
from exporter.statefile import JobsFile, StateFileError, dump, parse

RUN = DomainInstance("6f1c0c9e-7a57-4b54-9f5e-1c1d2b3a4f50", 12)


def tracked(domain="dom", disk="vda") -> TrackedJob:
    job = ActiveJob(domain, disk, "pull", 5, 100, 1024, False, 1_700_000_000.5, 1_700_000_001.0, RUN)
    return TrackedJob(job, ("/img/b1.qcow2", "/img/b0.qcow2"), "/img/top.qcow2")


def entry(**changes) -> dict:
    return {**json.loads(dump([tracked()]))["jobs"][0], **changes}


def document(*entries) -> bytes:
    return json.dumps({"version": 1, "jobs": list(entries)}).encode()


def test_round_trip():
    assert parse(dump([tracked("a"), tracked("b", "vdb")])) == (tracked("a"), tracked("b", "vdb"))


def test_jobs_of_unknown_runs_are_not_written():
    job = tracked().job
    unknown = TrackedJob(ActiveJob(job.domain, job.disk, job.job_type, job.cur, job.end, job.bandwidth, job.ready,
                                   job.start_time, job.cursor_changed_time, None), (), "")
    assert parse(dump([unknown])) == ()


@pytest.mark.parametrize("data, message", [
    (b"{", "not JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
    (b'{"version": 2, "jobs": []}', 'not an object with "version": 1'),
    (document(entry(domain=5)), "jobs[0].domain is not a string"),
    (document(entry(domain="x" * 1025)), "jobs[0].domain is not a string of at most 1024"),
    (document(entry(job_type="teleport")), "jobs[0].job_type is not one of"),
    (document(entry(cur=-1)), "jobs[0].cur is not a byte count"),
    (document(entry(end=2**63)), "jobs[0].end is not a byte count"),
    (document(entry(ready="yes")), "jobs[0].ready is not true or false"),
    (document(entry(start_time=float("inf"))), "jobs[0].start_time is not a Unix time"),
    (document(entry(domain_id=True)), "jobs[0].domain_id is not a libvirt domain id"),
    (document(entry(chain_at_start=["/x"] * 257)), "jobs[0].chain_at_start is not a list of at most 256"),
    (document(entry(held="yes")), "jobs[0].held is not true or false"),
    (document(entry(), entry()), "two active jobs on the same disk"),
    (document(entry(held=True), entry(held=True)), "the same held job twice"),
])
def test_bad_files_are_refused_with_the_reason(data, message):
    with pytest.raises(StateFileError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse(data)


def test_size_and_count_bounds(monkeypatch):
    with pytest.raises(StateFileError, match="larger than"):
        parse(b" " * (statefile.MAX_BYTES + 1))
    monkeypatch.setattr(statefile, "MAX_JOBS", 2)
    with pytest.raises(StateFileError, match="more than 2 jobs"):
        parse(document(entry(disk="a"), entry(disk="b"), entry(disk="c")))


def test_a_corrupt_or_missing_file_means_a_clean_start_and_a_warning(tmp_path, caplog):
    state = State()
    missing = JobsFile(str(tmp_path / "none.json"))
    assert missing.restore(state) == 0
    corrupt = tmp_path / "state.json"
    corrupt.write_bytes(b"\0" * 10)
    assert JobsFile(str(corrupt)).restore(state) == 0
    assert "does not exist: starting clean" in caplog.text and "is unusable (not JSON" in caplog.text
    assert state.snapshot().jobs == {}


def test_saved_when_a_job_starts_or_ends_and_restored(tmp_path):
    path = tmp_path / "sub" / "state.json"
    state = State()
    state.restore([tracked()])
    jobs_file = JobsFile(str(path))
    jobs_file.save(state)
    first = path.stat().st_mtime_ns
    jobs_file.save(state)  # nothing started or ended: not written again
    assert path.stat().st_mtime_ns == first
    again = State()
    assert JobsFile(str(path)).restore(again) == 1
    assert again.snapshot().jobs[("dom", "vda")] == tracked().job


def test_an_unwritable_path_is_a_warning_not_an_error(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    state = State()
    state.restore([tracked()])
    JobsFile(str(blocker / "state.json")).save(state)  # its directory is a file
    assert "cannot write the state file" in caplog.text


def test_a_mirror_that_became_ready_is_saved_ready_and_its_abort_while_away_counts_canceled(tmp_path):
    """The file keeps jobs as they are now: a copy aborted once ready is a cancel, not a failure."""
    from exporter.model import BlockJobEvent, DiskInfo

    path = str(tmp_path / "state.json")
    disk = DiskInfo("dom", "vda", "/img/top.qcow2", "qcow2", ())
    state = State()
    state.update_domain("dom", [disk], RUN)
    state.apply_poll("dom", "vda", JobInfo("copy", 10, 100, 0), 0.0, instance=RUN)
    jobs_file = JobsFile(path)
    jobs_file.save(state)
    state.apply(BlockJobEvent("dom", "vda", "copy", "ready", "block_job_2", 1.0, 1.0, RUN))
    jobs_file.save(state)  # becoming ready is written
    again = State()
    assert JobsFile(path).restore(again) == 1
    assert again.snapshot().jobs[("dom", "vda")].ready
    records = again.resync({"dom": [disk]}, {}, 2.0, instances={"dom": RUN})
    assert [(r.outcome, r.inferred) for r in records] == [("canceled", True)]


def test_a_held_job_and_the_new_runs_job_on_its_disk_survive_a_restart(tmp_path):
    """A listing saw the domain's new run (its job on the same disk) before the old run's stop
    event came; the exporter died then. Both are written; the held one is counted as the end of
    an ended run, the new one goes on."""
    from exporter.model import DiskInfo

    clock = [100.0]
    path = str(tmp_path / "state.json")
    disk = DiskInfo("dom", "vda", "/img/top.qcow2", "qcow2", ())
    new_run = DomainInstance(RUN.uuid, RUN.id + 1)
    state = State(monotonic=lambda: clock[0])
    state.update_domain("dom", [disk], RUN)
    state.apply_poll("dom", "vda", JobInfo("pull", 10, 100, 0), clock[0], instance=RUN)
    state.update_domain("dom", [disk], new_run)
    state.apply_poll("dom", "vda", JobInfo("copy", 1, 100, 0), clock[0], instance=new_run)
    JobsFile(path).save(state)
    again = State(monotonic=lambda: clock[0])
    assert JobsFile(path).restore(again) == 2
    assert again.resync({"dom": [disk]}, {("dom", "vda"): JobInfo("copy", 2, 100, 0)}, clock[0],
                        instances={"dom": new_run}) == ()
    assert again.snapshot().jobs[("dom", "vda")].job_type == "copy"
    clock[0] += 3
    assert [(r.job_type, r.outcome, r.inferred) for r in again.expire()] == [("pull", "canceled", True)]


def test_a_restored_job_of_a_run_that_has_since_ended_counts_canceled(tmp_path):
    from exporter.model import DiskInfo

    clock = [100.0]
    state = State(monotonic=lambda: clock[0])
    state.restore([tracked()])
    disk = DiskInfo("dom", "vda", "/img/top.qcow2", "qcow2", ())
    assert state.resync({"dom": [disk]}, {}, clock[0], instances={"dom": DomainInstance(RUN.uuid, RUN.id + 1)}) == ()
    clock[0] += 3
    assert [(r.outcome, r.inferred) for r in state.expire()] == [("canceled", True)]
