"""The scheduler's pure decision (lambda/decide.py): cases and properties over generated states."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decide import (
    MAX_FUTURE_SECONDS,
    Decision,
    Facts,
    OpenJob,
    Policy,
    decide,
    gpu_job_types,
    lost_jobs,
    resolve_hold,
)

NOW = 1_750_000_000.0
POLICY = Policy(idle_seconds=30 * 60.0, start_after_seconds=60.0)
SKEW = POLICY.clock_skew_seconds
LONG_AGO = NOW - 2 * 3600  # older than the idle window
RECENT = NOW - 5 * 60  # inside the idle window

ALL_STATES = [
    "pending",
    "running",
    "stopping",
    "stopped",
    "shutting-down",
    "terminated",
    "missing",
    "rebooting",
]
HANDS_OFF_STATES = ["pending", "stopping", "shutting-down", "terminated", "missing", "rebooting"]


def idle_running(**changes: object) -> Facts:
    """A running instance with nothing to do since long ago; override fields to add work, holds, activity."""
    base: dict[str, object] = {
        "instance_state": "running",
        "last_finished_at": LONG_AGO,
        "last_started_at": LONG_AGO,
    }
    base.update(changes)
    return Facts(**base)  # type: ignore[arg-type]


def stopped(**changes: object) -> Facts:
    base: dict[str, object] = {"instance_state": "stopped", "last_started_at": LONG_AGO}
    base.update(changes)
    return Facts(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("facts", "action", "code"),
    [
        pytest.param(idle_running(), "stop", "idle", id="idle-running-stops"),
        pytest.param(idle_running(last_finished_at=None, last_started_at=None), "stop", "idle", id="no-activity"),
        pytest.param(idle_running(queue_visible=1), "none", "work_present", id="visible-message"),
        pytest.param(idle_running(queue_in_flight=1), "none", "work_present", id="in-flight-message"),
        pytest.param(idle_running(queue_delayed=1), "none", "work_present", id="delayed-message"),
        pytest.param(
            idle_running(jobs_pending=1, oldest_pending_created_at=NOW),
            "none",
            "work_present",
            id="pending-job",
        ),
        pytest.param(idle_running(jobs_processing=1), "none", "work_present", id="processing-job"),
        pytest.param(idle_running(dlq_visible=7), "stop", "idle", id="dead-letters-are-not-work"),
        pytest.param(
            idle_running(hold_until=NOW + 60, hold_reason="debugging"),
            "none",
            "hold_active",
            id="hold-active",
        ),
        pytest.param(idle_running(hold_until=NOW - SKEW - 1), "stop", "idle", id="hold-expired"),
        pytest.param(idle_running(hold_until=NOW - SKEW + 1), "none", "hold_active", id="hold-within-skew"),
        pytest.param(idle_running(last_finished_at=RECENT), "none", "recent_activity", id="job-finished-recently"),
        pytest.param(idle_running(last_started_at=RECENT), "none", "recent_activity", id="started-recently"),
        pytest.param(idle_running(last_finished_at=NOW + 600), "none", "recent_activity", id="clock-skew-future"),
        pytest.param(idle_running(last_finished_at=NOW + MAX_FUTURE_SECONDS + 1), "stop", "idle",
                     id="absurd-future-time-ignored"),
        pytest.param(idle_running(last_finished_at=NOW - 30 * 60), "none", "recent_activity",
                     id="idle-window-plus-skew-not-yet"),
        pytest.param(idle_running(last_finished_at=NOW - 30 * 60 - SKEW), "stop", "idle",
                     id="exactly-window-plus-skew"),
        pytest.param(idle_running(last_submit_at=RECENT), "none", "recent_activity", id="submitted-recently"),
        pytest.param(idle_running(observed_activity_at=RECENT), "none", "recent_activity", id="observed-recently"),
        pytest.param(idle_running(adapter_jobs_in_hand=1), "none", "work_present", id="adapter-holds-a-job"),
        pytest.param(idle_running(queue_visible=None), "none", "facts_unknown", id="queue-unknown"),
        pytest.param(idle_running(jobs_pending=None), "none", "facts_unknown", id="pending-unknown"),
        pytest.param(idle_running(jobs_processing=None), "none", "facts_unknown", id="processing-unknown"),
        pytest.param(idle_running(activity_known=False), "none", "facts_unknown", id="activity-unknown"),
        pytest.param(idle_running(queue_visible=None, jobs_processing=1), "none", "work_present",
                     id="known-work-beats-unknown"),
        pytest.param(stopped(queue_visible=1), "start", "work_waiting", id="stopped-visible-message"),
        pytest.param(stopped(queue_delayed=2), "start", "work_waiting", id="stopped-delayed-message"),
        pytest.param(stopped(jobs_pending=1, oldest_pending_created_at=NOW - 600), "none", "pending_without_message",
                     id="stopped-pending-without-message"),
        pytest.param(stopped(queue_visible=None, jobs_pending=1, oldest_pending_created_at=NOW - 61), "start",
                     "work_waiting", id="stopped-queue-unknown-pending-waited"),
        pytest.param(stopped(queue_visible=None, jobs_pending=1, oldest_pending_created_at=None), "start",
                     "work_waiting", id="stopped-queue-unknown-pending-age-unknown"),
        pytest.param(stopped(queue_visible=None, jobs_pending=1, oldest_pending_created_at=NOW - 10), "none",
                     "facts_unknown", id="stopped-queue-unknown-pending-just-submitted"),
        pytest.param(stopped(queue_delayed=None), "none", "facts_unknown", id="stopped-queue-unknown-no-pending"),
        pytest.param(
            stopped(queue_visible=1, hold_until=NOW + 3600),
            "start",
            "work_waiting",
            id="hold-does-not-block-start",
        ),
        pytest.param(stopped(queue_in_flight=1), "none", "nothing_to_do", id="stopped-in-flight-waits-for-timeout"),
        pytest.param(stopped(jobs_processing=1), "none", "nothing_to_do", id="stopped-processing-only"),
        pytest.param(stopped(dlq_visible=3), "none", "nothing_to_do", id="stopped-dead-letters-only"),
        pytest.param(stopped(), "none", "nothing_to_do", id="stopped-idle"),
        pytest.param(Facts("pending", queue_visible=5), "none", "instance_transitioning", id="pending-instance"),
        pytest.param(Facts("stopping", queue_visible=5), "none", "instance_transitioning", id="stopping-instance"),
        pytest.param(Facts("shutting-down"), "none", "instance_transitioning", id="shutting-down-instance"),
        pytest.param(Facts("terminated", queue_visible=5), "none", "instance_terminated", id="terminated"),
        pytest.param(Facts("missing", queue_visible=5), "none", "instance_missing", id="missing-instance"),
        pytest.param(Facts("rebooting"), "none", "unknown_state", id="unknown-state"),
        pytest.param(Facts("unknown", queue_visible=5), "none", "facts_unknown", id="state-unreadable"),
    ],
)
def test_decide_cases(facts: Facts, action: str, code: str) -> None:
    """Each documented rule gives the expected action and reason code."""
    # WHEN
    decision = decide(facts, NOW, POLICY)
    # THEN
    assert (decision.action, decision.code) == (action, code)
    assert decision.reason


def test_reason_names_the_hold_reason() -> None:
    """A hold's reason text is carried into the decision's reason."""
    decision = decide(idle_running(hold_until=NOW + 60, hold_reason="benchmark run"), NOW, POLICY)
    assert "benchmark run" in decision.reason


def test_policy_idle_window_is_respected() -> None:
    """A shorter idle window stops sooner; a longer one keeps the instance up."""
    facts = idle_running(last_finished_at=NOW - 10 * 60, last_started_at=NOW - 10 * 60)
    assert decide(facts, NOW, Policy(idle_seconds=5 * 60)).action == "stop"
    assert decide(facts, NOW, Policy(idle_seconds=15 * 60)).action == "none"


# ------------------------------------------------------------------------------------------- properties

# Times around NOW: never, on the scale of the start threshold, of the default idle window, of days, or
# (clock skew) slightly in the future.
_times = st.one_of(
    st.none(),
    st.floats(min_value=0, max_value=120, allow_nan=False).map(lambda age: NOW - age),
    st.floats(min_value=0, max_value=3600, allow_nan=False).map(lambda age: NOW - age),
    st.floats(min_value=0, max_value=7 * 86400, allow_nan=False).map(lambda age: NOW - age),
    st.floats(min_value=0, max_value=600, allow_nan=False).map(lambda skew: NOW + skew),
)
_future = st.floats(min_value=NOW + 0.001, max_value=NOW + 30 * 86400, allow_nan=False)
_count = st.one_of(st.just(0), st.integers(min_value=1, max_value=3))
_maybe_count = st.one_of(_count, st.none())


@st.composite
def facts_strategy(
    draw: st.DrawFn,
    states: list[str] = ALL_STATES,
    *,
    work: bool | None = None,
    hold_until: st.SearchStrategy[float | None] | None = None,
) -> Facts:
    """Generated facts. ``work=False`` gives an empty queue and no jobs (half of the time when unset);
    ``work=True`` guarantees at least one queued/in-flight/delayed message or pending/processing job."""
    busy = draw(st.booleans()) if work is None else work
    counts: list[int | None] = [draw(_maybe_count) for _ in range(5)] if busy else [0] * 5
    if busy and not any(counts):
        counts[draw(st.integers(min_value=0, max_value=4))] = draw(st.integers(min_value=1, max_value=3))
    elif not busy and draw(st.integers(min_value=0, max_value=4)) == 0:
        counts[draw(st.integers(min_value=0, max_value=4))] = None  # a fact that could not be read
    return Facts(
        instance_state=draw(st.sampled_from(states)),
        queue_visible=counts[0],
        queue_in_flight=counts[1],
        queue_delayed=counts[2],
        jobs_pending=counts[3],
        jobs_processing=counts[4],
        oldest_pending_created_at=draw(_times),
        last_finished_at=draw(_times),
        last_submit_at=draw(_times),
        last_started_at=draw(_times),
        observed_activity_at=draw(_times),
        activity_known=draw(st.sampled_from([True, True, True, False])),
        hold_until=draw(hold_until if hold_until is not None else st.one_of(_times, _future)),
        hold_reason=draw(st.one_of(st.none(), st.text(max_size=20))),
        dlq_visible=draw(st.one_of(st.none(), _count)),
    )


policy_strategy = st.builds(
    Policy,
    idle_seconds=st.one_of(st.just(30 * 60.0), st.floats(min_value=0, max_value=86400, allow_nan=False)),
    start_after_seconds=st.one_of(st.just(60.0), st.floats(min_value=0, max_value=600, allow_nan=False)),
)


def _waiting_on_stopped(facts: Facts, now: float, policy: Policy) -> bool:
    if facts.queue_visible or facts.queue_delayed:
        return True
    queue_unknown = facts.queue_visible is None or facts.queue_delayed is None
    pending_waited = bool(facts.jobs_pending) and (
        facts.oldest_pending_created_at is None or now - facts.oldest_pending_created_at >= policy.start_after_seconds
    )
    return queue_unknown and pending_waited


@settings(max_examples=400, deadline=None)
@given(facts=facts_strategy(work=True), policy=policy_strategy)
def test_never_stops_with_work_present(facts: Facts, policy: Policy) -> None:
    """No queued, in-flight, delayed, pending or processing work is ever stopped."""
    assert facts.work_present
    assert decide(facts, NOW, policy).action != "stop"


@settings(max_examples=400, deadline=None)
@given(facts=facts_strategy(hold_until=_future), policy=policy_strategy)
def test_never_stops_during_a_hold(facts: Facts, policy: Policy) -> None:
    """An instance with an active hold is never stopped."""
    assert facts.hold_until is not None and facts.hold_until > NOW
    assert decide(facts, NOW, policy).action != "stop"


@settings(max_examples=400, deadline=None)
@given(facts=facts_strategy(["running"]), policy=policy_strategy)
def test_never_stops_on_an_unknown_fact(facts: Facts, policy: Policy) -> None:
    """A count that could not be read, or an unknown last activity, never leads to a stop."""
    if facts.work_unknown or not facts.activity_known:
        assert decide(facts, NOW, policy).action != "stop"


@settings(max_examples=400, deadline=None)
@given(facts=facts_strategy(["running"]), policy=policy_strategy)
def test_never_stops_inside_the_idle_window(facts: Facts, policy: Policy) -> None:
    """A stop only happens when the last activity is at least the idle window old."""
    decision = decide(facts, NOW, policy)
    if decision.action == "stop":
        last = facts.last_activity_at(NOW)
        assert last is None or NOW - last >= policy.idle_seconds + policy.clock_skew_seconds


@settings(max_examples=400, deadline=None)
@given(facts=facts_strategy(["stopped"]), policy=policy_strategy)
def test_always_starts_when_work_waits_on_a_stopped_instance(facts: Facts, policy: Policy) -> None:
    """A stopped instance is started exactly when work has waited past the threshold."""
    decision = decide(facts, NOW, policy)
    assert (decision.action == "start") == _waiting_on_stopped(facts, NOW, policy)


@settings(max_examples=300, deadline=None)
@given(facts=facts_strategy(HANDS_OFF_STATES), policy=policy_strategy)
def test_never_acts_on_transitioning_or_gone_instances(facts: Facts, policy: Policy) -> None:
    """pending, stopping, shutting-down, terminated, missing and unknown instances are left alone."""
    assert decide(facts, NOW, policy).action == "none"


@settings(max_examples=400, deadline=None)
@given(facts=facts_strategy(), policy=policy_strategy)
def test_stop_only_running_start_only_stopped(facts: Facts, policy: Policy) -> None:
    """Only a running instance is stopped, only a stopped one started; every decision has a reason."""
    decision = decide(facts, NOW, policy)
    assert isinstance(decision, Decision)
    assert decision.reason
    if decision.action == "stop":
        assert facts.instance_state == "running"
    if decision.action == "start":
        assert facts.instance_state == "stopped"


@settings(max_examples=300, deadline=None)
@given(facts=facts_strategy(["running"]), policy=policy_strategy)
def test_idle_running_instance_is_stopped(facts: Facts, policy: Policy) -> None:
    """A running instance with no work, no hold and no recent activity is stopped (no false keep-alive)."""
    last = facts.last_activity_at(NOW)
    idle = last is None or NOW - last >= policy.idle_seconds + policy.clock_skew_seconds
    hold = facts.hold_until is not None and facts.hold_until + policy.clock_skew_seconds > NOW
    known = not facts.work_unknown and facts.activity_known
    expected_stop = not facts.work_present and known and not hold and idle
    assert (decide(facts, NOW, policy).action == "stop") == expected_stop


# ------------------------------------------------------------------------------------------- holds


@pytest.mark.parametrize("raw", ["inf", "-inf", "nan", "2h", "tomorrow", "", "   ", "soon-ish"])
def test_unreadable_hold_is_a_capped_hold(raw: str) -> None:
    """A hold value that is not a time is doubt: held for the maximum, from when it was first seen."""
    view = resolve_hold(raw, NOW, POLICY, first_seen_at=NOW - 3600)
    assert view.until == NOW - 3600 + POLICY.max_hold_seconds
    assert view.warning and repr(raw) in view.warning


@pytest.mark.parametrize("raw", [str(int(NOW * 1000)), str(int(NOW + 30 * 86400)), "2999-01-01T00:00:00Z"])
def test_absurd_or_over_long_hold_is_capped(raw: str) -> None:
    """A millisecond epoch or a hold beyond seven days counts only up to the cap."""
    view = resolve_hold(raw, NOW, POLICY, first_seen_at=NOW)
    assert view.until == NOW + POLICY.max_hold_seconds
    assert view.warning and "longer than the maximum" in view.warning


def test_capped_hold_expires() -> None:
    """Seven days after the scheduler first saw a malformed hold, it no longer holds."""
    view = resolve_hold("tomorrow", NOW, POLICY, first_seen_at=NOW - POLICY.max_hold_seconds - SKEW - 1)
    assert decide(idle_running(hold_until=view.until), NOW, POLICY).action == "stop"


@pytest.mark.parametrize(("raw", "until"), [(str(int(NOW + 60)), NOW + 60), ("1970-01-01T00:00:00Z", None),
                                            (str(int(NOW - 1)), None), (None, None)])
def test_valid_holds_are_taken_as_written(raw: str | None, until: float | None) -> None:
    """A readable time inside the cap is the hold; a past one is none."""
    view = resolve_hold(raw, NOW, POLICY)
    assert (view.until, view.warning) == (until, None)


# ------------------------------------------------------------------------------------------- lost jobs

LOST = POLICY.lost_after_seconds + SKEW


@pytest.mark.parametrize(("job", "empty_since", "lost"), [
    (OpenJob("a", "processing", NOW - 9000, updated_at=NOW - LOST, heartbeat_at=0.0), NOW - 120, True),
    (OpenJob("b", "processing", NOW - 9000, updated_at=NOW - LOST + 1, heartbeat_at=0.0), NOW - 120, False),
    (OpenJob("c", "processing", NOW - 9000, updated_at=None, heartbeat_at=None), NOW - 120, False),
    (OpenJob("d", "processing", NOW - 9000, updated_at=NOW - 9000), NOW - 30, False),  # empty not confirmed
    (OpenJob("e", "pending", NOW - LOST), NOW - POLICY.lost_after_seconds, True),
    (OpenJob("f", "pending", NOW - LOST), NOW - POLICY.lost_after_seconds + 1, False),  # not empty long enough
    (OpenJob("g", "pending", NOW - LOST + 1), NOW - 86400, False),
    (OpenJob("h", "pending", None), NOW - 86400, False),
])
def test_lost_jobs(job: OpenJob, empty_since: float, lost: bool) -> None:
    """Only jobs certainly lost, with the queue confirmed empty, are failed; unknown times never are."""
    found = lost_jobs([job], queue_empty=True, queue_empty_since=empty_since, now=NOW, policy=POLICY)
    assert bool(found) == lost
    if found:
        assert ("worker running it was lost" if job.status == "processing" else "lost before it was queued") \
            in found[0].reason


@pytest.mark.parametrize("queue_empty", [False, None])
def test_nothing_is_lost_while_the_queue_may_hold_its_message(queue_empty: bool | None) -> None:
    """With a message in the queue, or counts unknown, no job is lost."""
    job = OpenJob("a", "processing", NOW - 9000, updated_at=NOW - 9000)
    assert lost_jobs([job], queue_empty=queue_empty, queue_empty_since=NOW - 9000, now=NOW, policy=POLICY) == []


def test_job_types_are_configurable() -> None:
    """GPU_JOB_TYPES replaces the default list; trailing slashes are ignored."""
    assert gpu_job_types(None, ["/a/", "/b"]) == {"/a", "/b"}
    assert gpu_job_types(" /x/jobs/ , /y ", ["/a"]) == {"/x/jobs", "/y"}


def test_the_lambdas_job_types_are_gpuctls() -> None:
    """The Lambda's own copy of the GPU job types and the 7-day hold cap equal gpuctl's."""
    import handler
    from gpuctl.models import ACTIVITY_TASK_ID, GPU_API_PATHS
    from gpuctl.services.hold import MAX_HOLD_SECONDS

    assert frozenset(handler.DEFAULT_GPU_JOB_TYPES) == GPU_API_PATHS
    assert handler.ACTIVITY_TASK_ID == ACTIVITY_TASK_ID
    assert Policy().max_hold_seconds == MAX_HOLD_SECONDS
