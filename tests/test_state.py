"""State and event logic without a VM: every way an outcome can be seen is counted exactly once."""

from __future__ import annotations

import pytest

from exporter.model import (
    ActiveJob,
    BackingImage,
    BlockJobEvent,
    ConnectionEvent,
    DiskInfo,
    DomainInstance,
    JobInfo,
    LifecycleEvent,
)
from exporter.state import State, TrackedJob


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
    s = State(clock=clock.wall, monotonic=clock.mono, pending_grace=3.0, settle=0.25, retention=600.0)
    s.apply(ConnectionEvent(True, clock.mono(), clock.wall()))
    return s


def disk(domain="dom", target="vda", depth=2, source="/img/top.qcow2") -> DiskInfo:
    chain = tuple(BackingImage(f"/img/b{i}.qcow2", "qcow2") for i in range(depth))
    return DiskInfo(domain, target, source, "qcow2", chain)


def pull(cur=10, end=100, bandwidth=0, job_type="pull") -> JobInfo:
    return JobInfo(job_type=job_type, cur=cur, end=end, bandwidth=bandwidth)


def event(clock: Clock, status: str, domain="dom", target="vda", job_type="pull", event_id="block_job_2",
          run=None):
    return BlockJobEvent(domain, target, job_type, status, event_id, clock.mono(), clock.wall(), run)


def lifecycle(clock: Clock, kind: str, run=None, domain="dom"):
    return LifecycleEvent(domain, kind, clock.mono(), clock.wall(), run)


RUN1 = DomainInstance("uuid-1", 7)
RUN2 = DomainInstance("uuid-1", 8)  # the same domain started again
RUN3 = DomainInstance("uuid-2", 9)  # recreated from XML under the same name


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
    assert state.expire() == ()
    assert total_outcomes(state) == 1


def test_poll_loses_job_then_event_names_the_outcome(state, clock):
    start(state, clock)
    clock.tick()
    state.apply_poll("dom", "vda", None, clock.mono())
    assert ("dom", "vda") in state.snapshot().jobs  # parked, waiting for the event
    clock.tick(1)
    state.apply(event(clock, "failed"))
    clock.tick(10)
    assert state.expire() == ()
    assert count(state, "failed") == 1
    assert total_outcomes(state) == 1


def test_lost_job_without_event_is_inferred_completed_from_the_flattened_chain(state, clock):
    start(state, clock)
    clock.tick()
    state.apply_poll("dom", "vda", None, clock.mono())
    state.update_domain("dom", [disk(depth=0)])
    clock.tick(2)
    assert state.expire() == ()  # still inside the grace
    clock.tick(2)
    records = state.expire()
    assert [(r.outcome, r.inferred) for r in records] == [("completed", True)]
    assert state.snapshot().inferred_outcomes[("dom", "vda", "pull", "completed")] == 1
    # An event now is another job's: libvirt reports an end before the poll that no longer finds
    # the job, and the host applies both in that order.
    state.apply(event(clock, "completed"))
    assert count(state, "completed") == 2


def test_lost_job_with_unchanged_chain_is_counted_failed(state, clock):
    start(state, clock)
    clock.tick()
    state.apply_poll("dom", "vda", None, clock.mono())
    clock.tick(5)
    assert [r.outcome for r in state.expire()] == ["failed"]


def test_job_reappearing_within_grace_is_the_same_job(state, clock):
    start(state, clock)
    started = state.snapshot().jobs[("dom", "vda")].start_time
    clock.tick()
    state.apply_poll("dom", "vda", None, clock.mono())
    clock.tick()
    state.apply_poll("dom", "vda", pull(cur=20), clock.mono())
    clock.tick(10)
    assert state.expire() == ()
    assert state.snapshot().jobs[("dom", "vda")].start_time == started
    assert total_outcomes(state) == 0


def test_a_refresh_that_finds_the_domain_inactive_holds_its_jobs_for_libvirts_event(state, clock):
    start(state, clock)
    clock.tick()
    assert state.apply(LifecycleEvent("dom", "stopped", clock.mono(), clock.wall())) == ()  # no run: a read
    snap = state.snapshot()
    assert snap.jobs == {} and "dom" not in snap.running_domains
    records = state.apply(LifecycleEvent("dom", "crashed", clock.mono(), clock.wall(), DomainInstance("uuid-d", 4)))
    assert [(r.outcome, r.inferred) for r in records] == [("failed", True)]


@pytest.mark.parametrize("kind, outcome", [("stopped", "canceled"), ("crashed", "failed")])
def test_domain_destroyed_mid_job_leaves_no_job_and_counts_once(state, clock, kind, outcome):
    start(state, clock)
    start(state, clock, target="vdb")
    clock.tick()
    records = state.apply(LifecycleEvent("dom", kind, clock.mono(), clock.wall(), DomainInstance("uuid-d", 4)))
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
    clock.tick(0.1)
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
    assert state.resync({}, {}, clock.mono()) == ()  # held for a stop event that may still come
    snap = state.snapshot()
    assert (snap.disks, snap.jobs) == ({}, {})
    clock.tick(2.9)
    assert state.expire() == ()
    clock.tick(0.2)
    assert [(r.outcome, r.inferred) for r in state.expire()] == [("canceled", True)]


def test_ready_event_and_mirror_inference(state, clock):
    state.update_domain("dom", [disk(depth=0)])
    state.apply_poll("dom", "vda", pull(cur=10, end=100, job_type="copy"), clock.mono())
    state.apply(event(clock, "ready", job_type="copy"))
    assert state.snapshot().jobs[("dom", "vda")].ready
    # aborted after ready without pivot: the disk is unchanged -> canceled
    clock.tick()
    state.apply_poll("dom", "vda", None, clock.mono())
    clock.tick(5)
    assert [r.outcome for r in state.expire()] == ["canceled"]


def test_copy_that_pivoted_is_inferred_completed(state, clock):
    state.update_domain("dom", [disk(depth=0)])
    state.apply_poll("dom", "vda", pull(cur=100, end=100, job_type="copy"), clock.mono())
    assert state.snapshot().jobs[("dom", "vda")].ready  # cur == end on a mirror
    clock.tick()
    state.apply_poll("dom", "vda", None, clock.mono())
    state.update_domain("dom", [disk(depth=0, source="/img/copy.qcow2")])
    clock.tick(5)
    assert [r.outcome for r in state.expire()] == ["completed"]


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
    assert state.replace_inventory({"other": [disk(domain="other")]}) == ()
    assert set(state.snapshot().disks) == {("other", "vda")}
    clock.tick(3)
    assert [(r.domain, r.outcome) for r in state.expire()] == [("dom", "canceled")]


def test_a_crash_reported_after_a_listing_missed_the_domain_counts_a_failure(state, clock):
    # The soak's QEMU kills: libvirtd drops the domain from its lists before its "crashed" event
    # reaches us, so a listing can find the domain gone first.
    start_run(state, clock, RUN1)
    clock.tick(0.5)
    assert state.replace_inventory({}) == ()
    assert state.snapshot().jobs == {}
    clock.tick(0.5)
    records = state.apply(lifecycle(clock, "crashed", RUN1))
    assert [(r.outcome, r.inferred) for r in records] == [("failed", True)]
    clock.tick(5)
    assert state.expire() == ()
    assert (count(state, "failed"), count(state, "canceled")) == (1, 0)


def test_a_block_job_event_of_a_run_a_listing_missed_counts_its_outcome(state, clock):
    start_run(state, clock, RUN1)
    clock.tick(0.5)
    state.replace_inventory({})
    clock.tick(0.5)
    assert [(r.outcome, r.inferred) for r in state.apply(event(clock, "completed", run=RUN1))] == [
        ("completed", False)]
    assert state.apply(lifecycle(clock, "stopped", RUN1)) == ()
    clock.tick(5)
    assert state.expire() == ()
    assert (count(state, "completed"), count(state, "canceled")) == (1, 0)


def test_a_job_held_for_its_stop_event_stays_in_the_state_file(state, clock):
    start_run(state, clock, RUN1)
    state.replace_inventory({})
    _, tracked = state.tracked_jobs()
    assert [(t.job.domain, t.job.disk, t.job.instance) for t in tracked] == [("dom", "vda", RUN1)]
    clock.tick(3)
    state.expire()
    assert state.tracked_jobs()[1] == ()


# ------------------------------------------------------------------ runs of a domain (issue 9)


def start_run(state: State, clock: Clock, run: DomainInstance, depth=1, source="/img/top.qcow2") -> None:
    state.update_domain("dom", [disk(depth=depth, source=source)], run)
    state.apply_poll("dom", "vda", pull(), clock.mono(), run)


def test_recreated_domain_counts_its_own_outcomes_right_after_an_inferred_one(state, clock):
    start_run(state, clock, RUN1)
    clock.tick()
    records = state.apply(lifecycle(clock, "stopped", RUN1))  # destroyed mid-pull
    assert [(r.outcome, r.inferred) for r in records] == [("canceled", True)]
    clock.tick(2)
    state.apply(lifecycle(clock, "started", RUN3))
    state.update_domain("dom", [disk(depth=1)], RUN3)
    state.apply(event(clock, "completed", run=RUN3))  # a short pull, never seen by a poll
    clock.tick(5)
    state.apply(event(clock, "failed", run=RUN3))  # and a failed one (ENOSPC)
    assert (count(state, "completed"), count(state, "failed"), count(state, "canceled")) == (1, 1, 1)


def test_late_event_of_a_run_that_ended_is_not_counted_again(state, clock, caplog):
    start_run(state, clock, RUN1)
    state.apply(lifecycle(clock, "crashed", RUN1))  # kill -9
    assert count(state, "failed") == 1
    caplog.set_level("INFO", logger="exporter.state")
    assert state.apply(event(clock, "failed", run=RUN1)) == ()
    assert count(state, "failed") == 1
    assert "not counted, it reports the job of run 7 of the domain on this disk" in caplog.text


def test_a_late_event_of_a_run_that_ended_counts_a_job_never_seen(state, clock, caplog):
    # Found by the property test: a pull started just before a destroy, never polled, whose end
    # libvirt reports after the lifecycle event was lost.
    state.update_domain("dom", [disk(), disk(target="vdb")], RUN1)
    state.apply_poll("dom", "vda", pull(), clock.mono(), RUN1)
    records = state.apply(lifecycle(clock, "stopped", RUN1))
    assert [(r.disk, r.outcome, r.inferred) for r in records] == [("vda", "canceled", True)]
    caplog.set_level("INFO", logger="exporter.state")
    assert state.apply(event(clock, "canceled", run=RUN1)) == ()  # vda's end: counted with the run
    assert "not counted, it reports the job of run 7 of the domain on this disk" in caplog.text
    records = state.apply(event(clock, "failed", target="vdb", run=RUN1))
    assert [(r.disk, r.outcome, r.inferred) for r in records] == [("vdb", "failed", False)]
    assert (count(state, "canceled"), count(state, "failed", target="vdb"), total_outcomes(state)) == (1, 1, 2)


def test_a_refresh_read_before_a_stop_and_applied_after_it_does_not_bring_the_run_back(state, clock):
    # Found by the property test: the stop event overtakes what the poller read just before it.
    start_run(state, clock, RUN1)
    read_at = clock.mono()
    clock.tick(0.01)
    assert [r.outcome for r in state.apply(lifecycle(clock, "stopped", RUN1))] == ["canceled"]
    assert state.update_domain("dom", [disk()], RUN1) == ()
    state.apply_poll("dom", "vda", pull(cur=50), read_at, RUN1)
    assert state.replace_inventory({"dom": [disk()]}, {"dom": RUN1}) == ()
    assert state.resync({"dom": [disk()]}, {("dom", "vda"): pull(cur=50)}, read_at, instances={"dom": RUN1}) == ()
    snap = state.snapshot()
    assert (snap.jobs, snap.disks, snap.running_domains) == ({}, {}, frozenset())
    state.update_domain("dom", [disk()], RUN2)  # the next run is welcome
    state.apply_poll("dom", "vda", pull(cur=1), clock.mono(), RUN2)
    assert state.snapshot().jobs[("dom", "vda")].instance == RUN2
    assert total_outcomes(state) == 1


def test_a_listing_read_before_a_start_and_applied_after_it_does_not_keep_the_new_run_out(state, clock):
    state.update_domain("dom", [disk()], RUN1)  # RUN1's stop event was lost (disconnected)
    state.apply(lifecycle(clock, "started", RUN2))
    state.replace_inventory({}, {})  # read while "dom" was down, applied after its start event
    state.update_domain("dom", [disk()], RUN2)  # the refresh the start triggers
    state.apply_poll("dom", "vda", pull(), clock.mono(), RUN2)
    assert "dom" in state.snapshot().running_domains
    assert state.snapshot().jobs[("dom", "vda")].instance == RUN2


def test_a_resync_does_not_bring_back_a_job_whose_end_was_counted_after_its_read(state, clock):
    # Found by the property test: the domain restarted while disconnected; the new run's job ended
    # between the resync's read and its application. Inferring the old run's job's end in the
    # same resync used to hide that end from the resync's own staleness check.
    state.update_domain("dom", [disk(target="vdb")], RUN1)
    state.apply_poll("dom", "vdb", pull(), clock.mono(), RUN1)
    state.apply(ConnectionEvent(False, clock.mono(), clock.wall()))
    clock.tick(5)
    call_started = clock.mono()
    clock.tick(0.01)
    assert [r.outcome for r in state.apply(event(clock, "completed", target="vdb", run=RUN2))] == ["completed"]
    records = state.resync({"dom": [disk(target="vdb")]}, {("dom", "vdb"): pull(cur=99)}, call_started,
                           instances={"dom": RUN2})
    assert records == ()  # RUN1's job is held for its stop event
    assert state.snapshot().jobs == {}
    clock.tick(1)
    state.apply_poll("dom", "vdb", None, clock.mono(), RUN2)
    clock.tick(5)
    assert [(r.outcome, r.inferred) for r in state.expire()] == [("canceled", True)]  # RUN1's job
    assert (count(state, "completed", target="vdb"), count(state, "canceled", target="vdb")) == (1, 1)


def test_quick_pulls_on_a_restarted_domain_are_all_counted(state, clock):
    start_run(state, clock, RUN1)
    state.apply(lifecycle(clock, "crashed", RUN1))
    state.apply(lifecycle(clock, "started", RUN2))
    state.update_domain("dom", [disk(depth=1)], RUN2)
    for _ in range(3):
        clock.tick(5)
        state.apply(event(clock, "completed", run=RUN2))
    assert (count(state, "completed"), count(state, "failed")) == (3, 1)


def test_a_poll_through_the_handle_of_an_earlier_run_is_ignored(state, clock):
    start_run(state, clock, RUN1)
    state.apply(lifecycle(clock, "stopped", RUN1))
    state.apply(lifecycle(clock, "started", RUN2))
    state.update_domain("dom", [disk()], RUN2)
    state.apply_poll("dom", "vda", pull(cur=50), clock.mono(), RUN1)  # stale handle
    assert state.snapshot().jobs == {}
    clock.tick()
    state.apply_poll("dom", "vda", pull(cur=50), clock.mono(), RUN2)
    assert state.snapshot().jobs[("dom", "vda")].instance == RUN2


def test_a_new_run_seen_before_the_old_runs_stop_ends_the_old_job_not_the_new_one(state, clock):
    start_run(state, clock, RUN1)
    clock.tick()
    assert state.update_domain("dom", [disk()], RUN2) == ()  # restarted; its stop event still on the way
    state.apply_poll("dom", "vda", pull(cur=3), clock.mono(), RUN2)
    assert [(r.outcome, r.inferred) for r in state.apply(lifecycle(clock, "stopped", RUN1))] == [
        ("canceled", True)]
    assert state.snapshot().jobs[("dom", "vda")].cur == 3  # the new run's job lives on
    state.apply(event(clock, "completed", run=RUN2))
    assert (count(state, "completed"), count(state, "canceled")) == (1, 1)


def test_reemitted_event_within_the_settle_time_of_a_resync_is_ignored_and_a_later_one_counts(state, clock,
                                                                                               caplog):
    start_run(state, clock, RUN1)
    state.apply(ConnectionEvent(False, clock.mono(), clock.wall()))
    clock.tick(10)
    records = state.resync({"dom": [disk(depth=0)]}, {}, clock.mono(), instances={"dom": RUN1})
    assert [(r.outcome, r.inferred) for r in records] == [("completed", True)]
    caplog.set_level("INFO", logger="exporter.state")
    clock.tick(0.2)
    assert state.apply(event(clock, "completed", run=RUN1)) == ()  # libvirt re-reports that end
    assert "not counted, libvirt re-reported the end of the pull job that the resync" in caplog.text
    clock.tick(3)  # a new layer is added and pulled within seconds
    state.update_domain("dom", [disk(depth=0, source="/img/new.qcow2")], RUN1)
    state.apply(event(clock, "completed", run=RUN1))
    assert count(state, "completed") == 2


def test_only_one_reemitted_event_is_taken_for_one_inferred_end(state, clock):
    start_run(state, clock, RUN1)
    clock.tick(10)
    state.resync({"dom": [disk(depth=0)]}, {}, clock.mono(), instances={"dom": RUN1})
    clock.tick(0.1)
    state.apply(event(clock, "completed", run=RUN1))
    clock.tick(0.1)
    state.apply(event(clock, "completed", run=RUN1))  # a second, quick job
    assert count(state, "completed") == 2


def test_resync_finding_a_new_run_ends_the_old_runs_job_as_canceled(state, clock):
    start_run(state, clock, RUN1)
    clock.tick(10)
    records = state.resync({"dom": [disk()]}, {("dom", "vda"): pull(cur=1)}, clock.mono(), instances={"dom": RUN2})
    assert records == ()
    job = state.snapshot().jobs[("dom", "vda")]
    assert (job.instance, job.cur, job.start_time) == (RUN2, 1, clock.wall())
    clock.tick(3)
    assert [(r.outcome, r.inferred) for r in state.expire()] == [("canceled", True)]


def test_series_of_a_gone_domain_are_dropped_after_the_retention(state, clock):
    start_run(state, clock, RUN1)
    state.update_domain("other", [disk(domain="other")], DomainInstance("uuid-o", 3))
    state.apply(lifecycle(clock, "stopped", RUN1))
    snap = state.snapshot()
    assert (snap.tracked_domains, snap.tracked_disks, len(snap.jobs)) == (2, 2, 0)
    clock.tick(599)
    state.expire()
    assert count(state, "canceled") == 1
    clock.tick(6)  # the retention is checked every few seconds
    state.expire()
    snap = state.snapshot()
    assert [k for k in snap.outcomes if k[0] == "dom"] == [] and snap.inferred_outcomes == {}
    assert (snap.tracked_domains, snap.tracked_disks) == (1, 1)


def test_a_domain_back_within_the_retention_keeps_its_counters(state, clock):
    start_run(state, clock, RUN1)
    state.apply(lifecycle(clock, "stopped", RUN1))
    clock.tick(300)
    state.expire()
    state.update_domain("dom", [disk()], RUN2)
    clock.tick(400)
    state.expire()
    assert count(state, "canceled") == 1


def test_restored_jobs_are_reconciled_by_the_first_resync(clock):
    state = State(clock=clock.wall, monotonic=clock.mono)
    chain = ("/img/b0.qcow2",)
    running = ActiveJob("dom", "vda", "pull", 5, 100, 0, False, 123.0, 124.0, RUN1)
    ended = ActiveJob("dom", "vdb", "pull", 5, 100, 0, False, 125.0, 125.0, RUN1)
    gone = ActiveJob("gone", "vda", "pull", 5, 100, 0, False, 126.0, 126.0, RUN3)
    state.restore([TrackedJob(running, chain, "/img/top.qcow2"), TrackedJob(ended, chain, "/img/top.qcow2"),
                   TrackedJob(gone, chain, "/img/top.qcow2")])
    records = state.resync({"dom": [disk(depth=1), disk(target="vdb", depth=0)]}, {("dom", "vda"): pull(cur=9)},
                           clock.mono(), instances={"dom": RUN1})
    assert [(r.domain, r.disk, r.outcome, r.inferred) for r in records] == [("dom", "vdb", "completed", True)]
    assert state.snapshot().jobs[("dom", "vda")].start_time == 123.0  # the same job
    clock.tick(3)
    assert [(r.domain, r.disk, r.outcome, r.inferred) for r in state.expire()] == [("gone", "vda", "canceled", True)]


def test_a_stop_reported_with_id_minus_one_ends_the_current_run_of_that_uuid(state, clock):
    start_run(state, clock, RUN1)
    records = state.apply(lifecycle(clock, "stopped", DomainInstance("uuid-1", -1)))  # virsh destroy
    assert [(r.outcome, r.inferred) for r in records] == [("canceled", True)]
    assert "dom" not in state.snapshot().running_domains
    assert state.apply(event(clock, "canceled", run=RUN1)) == ()  # late: that run's jobs were counted


def test_a_late_stop_with_id_minus_one_of_an_earlier_uuid_leaves_the_recreated_domain_alone(state, clock):
    start_run(state, clock, RUN1)
    start_run(state, clock, RUN3)  # recreated from XML: another UUID
    state.apply_poll("dom", "vda", pull(cur=1), clock.mono(), RUN3)
    records = state.apply(lifecycle(clock, "stopped", DomainInstance("uuid-1", -1)))
    assert [(r.outcome, r.inferred) for r in records] == [("canceled", True)]  # RUN1's job, held till now
    assert state.snapshot().jobs[("dom", "vda")].instance == RUN3


def test_a_job_seen_before_its_new_layer_is_judged_against_the_longer_chain(state, clock):
    state.update_domain("dom", [disk(depth=0)], RUN1)  # read before a snapshot added a layer
    state.apply_poll("dom", "vda", pull(), clock.mono(), RUN1)
    state.update_domain("dom", [disk(depth=1, source="/img/snap.qcow2")], RUN1)  # the refresh after it
    clock.tick()
    state.apply_poll("dom", "vda", None, clock.mono(), RUN1)  # the pull ended; its event was lost
    state.update_domain("dom", [disk(depth=0, source="/img/snap.qcow2")], RUN1)
    clock.tick(5)
    assert [(r.outcome, r.inferred) for r in state.expire()] == [("completed", True)]


def test_a_pull_first_seen_on_a_stale_flat_disk_that_is_flat_at_its_end_completed(state, clock):
    state.update_domain("dom", [disk(depth=0)], RUN1)  # read before a snapshot added a layer
    state.apply_poll("dom", "vda", pull(), clock.mono(), RUN1)
    clock.tick()
    state.apply_poll("dom", "vda", None, clock.mono(), RUN1)  # ended before any refresh
    clock.tick(5)
    assert [(r.outcome, r.inferred) for r in state.expire()] == [("completed", True)]
