"""The scheduler's pure decision (lambda/decide.py): cases and properties over generated states."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decide import Decision, Facts, Policy, decide

NOW = 1_750_000_000.0
POLICY = Policy(idle_seconds=30 * 60.0, start_after_seconds=60.0)
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
        pytest.param(idle_running(hold_until=NOW - 1), "stop", "idle", id="hold-expired"),
        pytest.param(idle_running(last_finished_at=RECENT), "none", "recent_activity", id="job-finished-recently"),
        pytest.param(idle_running(last_started_at=RECENT), "none", "recent_activity", id="started-recently"),
        pytest.param(idle_running(last_finished_at=NOW + 600), "none", "recent_activity", id="clock-skew-future"),
        pytest.param(idle_running(last_finished_at=NOW - 30 * 60), "stop", "idle", id="exactly-idle-window"),
        pytest.param(stopped(queue_visible=1), "start", "work_waiting", id="stopped-visible-message"),
        pytest.param(stopped(queue_delayed=2), "start", "work_waiting", id="stopped-delayed-message"),
        pytest.param(
            stopped(jobs_pending=1, oldest_pending_created_at=NOW - 61),
            "start",
            "work_waiting",
            id="stopped-pending-over-a-minute",
        ),
        pytest.param(
            stopped(jobs_pending=1, oldest_pending_created_at=NOW - 60),
            "start",
            "work_waiting",
            id="stopped-pending-exactly-a-minute",
        ),
        pytest.param(
            stopped(jobs_pending=1, oldest_pending_created_at=None),
            "start",
            "work_waiting",
            id="stopped-pending-age-unknown",
        ),
        pytest.param(
            stopped(jobs_pending=1, oldest_pending_created_at=NOW - 10),
            "none",
            "work_not_yet_waiting",
            id="stopped-pending-just-submitted",
        ),
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
    counts = [draw(_count) for _ in range(5)] if busy else [0] * 5
    if busy and not any(counts):
        counts[draw(st.integers(min_value=0, max_value=4))] = draw(st.integers(min_value=1, max_value=3))
    return Facts(
        instance_state=draw(st.sampled_from(states)),
        queue_visible=counts[0],
        queue_in_flight=counts[1],
        queue_delayed=counts[2],
        jobs_pending=counts[3],
        jobs_processing=counts[4],
        oldest_pending_created_at=draw(_times),
        last_finished_at=draw(_times),
        last_started_at=draw(_times),
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
    pending_waited = facts.jobs_pending > 0 and (
        facts.oldest_pending_created_at is None or now - facts.oldest_pending_created_at >= policy.start_after_seconds
    )
    return facts.queue_visible > 0 or facts.queue_delayed > 0 or pending_waited


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
def test_never_stops_inside_the_idle_window(facts: Facts, policy: Policy) -> None:
    """A stop only happens when the last activity is at least the idle window old."""
    decision = decide(facts, NOW, policy)
    if decision.action == "stop":
        last = facts.last_activity_at
        assert last is None or NOW - last >= policy.idle_seconds


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
    last = facts.last_activity_at
    idle = last is None or NOW - last >= policy.idle_seconds
    hold = facts.hold_until is not None and facts.hold_until > NOW
    expected_stop = not facts.work_present and not hold and idle
    assert (decide(facts, NOW, policy).action == "stop") == expected_stop
