"""State and event logic without a VM: every way an outcome can be seen is counted exactly once."""

from __future__ import annotations

import pytest

from exporter.model import BackingImage, BlockJobEvent, ConnectionEvent, DiskInfo, JobInfo, LifecycleEvent
from exporter.state import State


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def wall(self) -> float:
        return self.now + 1_700_000_000

    def mono(self) -> float:
        return self.now

    def tick(self, seconds: float = 1.0) -> float:
        self.now += seconds
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def state(clock: Clock) -> State:
    s = State(clock=clock.wall, monotonic=clock.mono, pending_grace=3.0, dedup_window=60.0)
    s.apply(ConnectionEvent(True, clock.mono(), clock.wall()))
    return s


def disk(domain="dom", target="vda", depth=2, source="/img/top.qcow2") -> DiskInfo:
    chain = tuple(BackingImage(f"/img/b{i}.qcow2", "qcow2") for i in range(depth))
    return DiskInfo(domain, target, source, "qcow2", chain)


def pull(cur=10, end=100, bandwidth=0, job_type="pull") -> JobInfo:
    return JobInfo(job_type=job_type, cur=cur, end=end, bandwidth=bandwidth)


def event(clock: Clock, status: str, domain="dom", target="vda", job_type="pull", event_id="block_job_2"):
    return BlockJobEvent(domain, target, job_type, status, event_id, clock.mono(), clock.wall())


def count(state: State, outcome: str, domain="dom", target="vda", job_type="pull") -> int:
    return state.snapshot().outcomes.get((domain, target, job_type, outcome), 0)


def total_outcomes(state: State) -> int:
    return sum(state.snapshot().outcomes.values())


def start(state: State, clock: Clock, job: JobInfo | None = None, target="vda") -> None:
    state.update_domain("dom", [disk(target=target)])
    state.apply_poll("dom", target, job or pull(), clock.mono())


def test_first_poll_creates_job_and_zero_counters(state, clock):
    start(state, clock, pull(cur=5, end=50, bandwidth=1024))
    snap = state.snapshot()
    job = snap.jobs[("dom", "vda")]
    assert (job.cur, job.end, job.bandwidth, job.job_type) == (5, 50, 1024, "pull")
    assert job.progress_ratio == pytest.approx(0.1)
    assert job.start_time == clock.wall()
    for outcome in ("completed", "failed", "canceled"):
        assert snap.outcomes[("dom", "vda", "pull", outcome)] == 0


def test_cursor_change_time_moves_only_with_cursor(state, clock):
    start(state, clock, pull(cur=5))
    first = state.snapshot().jobs[("dom", "vda")].cursor_changed_time
    clock.tick(5)
    state.apply_poll("dom", "vda", pull(cur=5), clock.mono())
    assert state.snapshot().jobs[("dom", "vda")].cursor_changed_time == first
    clock.tick(5)
    state.apply_poll("dom", "vda", pull(cur=6), clock.mono())
    assert state.snapshot().jobs[("dom", "vda")].cursor_changed_time == clock.wall()


def test_event_counts_once_and_block_job_v1_never_counts(state, clock):
    start(state, clock)
    clock.tick()
    assert state.apply(event(clock, "completed", target="/img/top.qcow2", event_id="block_job")) == ()
    records = state.apply(event(clock, "completed"))
    assert [r.outcome for r in records] == ["completed"]
    assert not records[0].inferred
    assert count(state, "completed") == 1
    assert ("dom", "vda") not in state.snapshot().jobs
    assert total_outcomes(state) == 1


def test_job_that_ended_between_two_polls_is_counted_from_its_event(state, clock):
    state.update_domain("dom", [disk()])
    state.apply(event(clock, "failed"))
    assert count(state, "failed") == 1
    assert count(state, "completed") == 0  # the sibling counters exist at zero


def test_in_flight_poll_cannot_resurrect_a_job_an_event_ended(state, clock):
    start(state, clock)
    clock.tick()
    call_started = clock.mono()
    clock.tick(0.001)
    state.apply(event(clock, "completed"))
    state.apply_poll("dom", "vda", pull(cur=99), call_started)  # answered before the job was gone
    assert state.snapshot().jobs == {}
    clock.tick(10)
    state.apply_poll("dom", "vda", None, clock.mono())
    assert state.expire_pending() == ()
    assert total_outcomes(state) == 1


def test_poll_loses_job_then_event_names_the_outcome(state, clock):
    start(state, clock)
    clock.tick()
    state.apply_poll("dom", "vda", None, clock.mono())
    assert ("dom", "vda") in state.snapshot().jobs  # parked, waiting for the event
    clock.tick(1)
    state.apply(event(clock, "failed"))
    clock.tick(10)
    assert state.expire_pending() == ()
    assert count(state, "failed") == 1
    assert total_outcomes(state) == 1


def test_lost_job_without_event_is_inferred_completed_from_the_flattened_chain(state, clock):
    start(state, clock)
    clock.tick()
    state.apply_poll("dom", "vda", None, clock.mono())
    state.update_domain("dom", [disk(depth=0)])
    clock.tick(2)
    assert state.expire_pending() == ()  # still inside the grace
    clock.tick(2)
    records = state.expire_pending()
    assert [(r.outcome, r.inferred) for r in records] == [("completed", True)]
    assert state.snapshot().inferred_outcomes[("dom", "vda", "pull", "completed")] == 1
    # libvirt's late event for the same end is not counted again
    state.apply(event(clock, "completed"))
    assert count(state, "completed") == 1


def test_lost_job_with_unchanged_chain_is_counted_failed(state, clock):
    start(state, clock)
    clock.tick()
    state.apply_poll("dom", "vda", None, clock.mono())
    clock.tick(5)
    assert [r.outcome for r in state.expire_pending()] == ["failed"]


def test_job_reappearing_within_grace_is_the_same_job(state, clock):
    start(state, clock)
    started = state.snapshot().jobs[("dom", "vda")].start_time
    clock.tick()
    state.apply_poll("dom", "vda", None, clock.mono())
    clock.tick()
    state.apply_poll("dom", "vda", pull(cur=20), clock.mono())
    clock.tick(10)
    assert state.expire_pending() == ()
    assert state.snapshot().jobs[("dom", "vda")].start_time == started
    assert total_outcomes(state) == 0


@pytest.mark.parametrize("kind, outcome", [("stopped", "canceled"), ("crashed", "failed")])
def test_domain_destroyed_mid_job_leaves_no_job_and_counts_once(state, clock, kind, outcome):
    start(state, clock)
    start(state, clock, target="vdb")
    clock.tick()
    records = state.apply(LifecycleEvent("dom", kind, clock.mono(), clock.wall()))
    assert sorted((r.disk, r.outcome) for r in records) == [("vda", outcome), ("vdb", outcome)]
    snap = state.snapshot()
    assert snap.jobs == {} and snap.disks == {} and "dom" not in snap.running_domains
    # a poll answered before the domain died does not bring the job back
    state.apply_poll("dom", "vda", pull(), clock.mono() - 0.5)
    assert state.snapshot().jobs == {}
    assert state.apply(LifecycleEvent("dom", "stopped", clock.mono(), clock.wall())) == ()
    assert total_outcomes(state) == 2


def test_resync_counts_jobs_that_ended_while_disconnected_and_ignores_reemitted_events(state, clock):
    start(state, clock)
    start(state, clock, target="vdb")
    state.apply(ConnectionEvent(False, clock.mono(), clock.wall()))
    assert state.snapshot().connected is False
    assert ("dom", "vda") in state.snapshot().jobs  # kept while disconnected: needed to reconcile
    clock.tick(30)
    records = state.resync({"dom": [disk(depth=0), disk(target="vdb")]}, {("dom", "vdb"): pull(cur=50)},
                           call_started=clock.mono())
    assert [(r.disk, r.outcome, r.inferred) for r in records] == [("vda", "completed", True)]
    clock.tick(0.5)
    state.apply(event(clock, "completed"))  # libvirt re-emits after its restart
    assert count(state, "completed") == 1
    assert state.snapshot().jobs[("dom", "vdb")].cur == 50
    assert total_outcomes(state) == 1


def test_event_applied_before_resync_is_not_counted_again_by_resync(state, clock):
    start(state, clock)
    state.apply(ConnectionEvent(False, clock.mono(), clock.wall()))
    clock.tick(5)
    call_started = clock.mono()
    clock.tick(0.01)
    state.apply(event(clock, "completed"))
    state.resync({"dom": [disk(depth=0)]}, {}, call_started=call_started)
    assert count(state, "completed") == 1
    assert state.snapshot().inferred_outcomes == {}


def test_incomplete_resync_keeps_jobs_it_could_not_poll(state, clock):
    start(state, clock)
    clock.tick()
    assert state.resync({"dom": [disk()]}, {}, clock.mono(), jobs_complete=False) == ()
    assert ("dom", "vda") in state.snapshot().jobs


def test_resync_ends_jobs_of_domains_that_are_gone(state, clock):
    start(state, clock)
    clock.tick()
    records = state.resync({}, {}, clock.mono())
    assert [(r.outcome, r.inferred) for r in records] == [("canceled", True)]
    assert state.snapshot().disks == {}


def test_ready_event_and_mirror_inference(state, clock):
    state.update_domain("dom", [disk(depth=0)])
    state.apply_poll("dom", "vda", pull(cur=10, end=100, job_type="copy"), clock.mono())
    state.apply(event(clock, "ready", job_type="copy"))
    assert state.snapshot().jobs[("dom", "vda")].ready
    # aborted after ready without pivot: the disk is unchanged -> canceled
    clock.tick()
    state.apply_poll("dom", "vda", None, clock.mono())
    clock.tick(5)
    assert [r.outcome for r in state.expire_pending()] == ["canceled"]


def test_copy_that_pivoted_is_inferred_completed(state, clock):
    state.update_domain("dom", [disk(depth=0)])
    state.apply_poll("dom", "vda", pull(cur=100, end=100, job_type="copy"), clock.mono())
    assert state.snapshot().jobs[("dom", "vda")].ready  # cur == end on a mirror
    clock.tick()
    state.apply_poll("dom", "vda", None, clock.mono())
    state.update_domain("dom", [disk(depth=0, source="/img/copy.qcow2")])
    clock.tick(5)
    assert [r.outcome for r in state.expire_pending()] == ["completed"]


def test_pull_at_end_minus_one_is_not_ready(state, clock):
    start(state, clock, pull(cur=99, end=100))
    assert not state.snapshot().jobs[("dom", "vda")].ready


def test_snapshot_is_cached_until_a_change(state, clock):
    start(state, clock)
    first = state.snapshot()
    assert state.snapshot() is first
    state.apply_poll("dom", "vda", pull(), clock.mono())  # same values: no change
    assert state.snapshot() is first
    state.apply_poll("dom", "vda", pull(cur=11), clock.mono())
    second = state.snapshot()
    assert second is not first and second.version > first.version


def test_inventory_refresh_ends_jobs_of_vanished_domains(state, clock):
    start(state, clock)
    state.update_domain("other", [disk(domain="other")])
    records = state.replace_inventory({"other": [disk(domain="other")]})
    assert [(r.domain, r.outcome) for r in records] == [("dom", "canceled")]
    assert set(state.snapshot().disks) == {("other", "vda")}
