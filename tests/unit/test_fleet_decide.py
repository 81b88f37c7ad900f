"""Fleet mode's pure capacity decision (lambda/fleet.py): cases and properties over generated states."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decide import Facts, Policy, decide
from fleet import FleetPolicy, GroupView, Member, decide_capacity, floor_of

NOW = 1_750_000_000.0
POLICY = Policy(idle_seconds=30 * 60.0, start_after_seconds=60.0)
LONG_AGO = NOW - 2 * 3600
RECENT = NOW - 5 * 60
FLEET = FleetPolicy(jobs_per_instance=4)


def facts(**changes: object) -> Facts:
    base = Facts(instance_state="running", last_finished_at=LONG_AGO, last_submit_at=LONG_AGO,
                 last_started_at=LONG_AGO)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def group(desired: int, *, lo: int = 0, hi: int = 8, protected: int = 0, floor: int = 0) -> GroupView:
    members = tuple(Member(f"i-{n:017x}", "InService", n < protected) for n in range(desired))
    return GroupView("gpuctl-fleet", desired, lo, hi, members, floor=floor)


@pytest.mark.parametrize(
    ("desired", "visible", "in_flight", "expected"),
    [
        (0, 1, 0, 1),  # one waiting job wakes the fleet
        (0, 9, 0, 3),  # 9 jobs / 4 per instance
        (1, 0, 8, 2),  # in flight counts as work
        (2, 20, 4, 6),
        (4, 100, 0, 8),  # capped at the group's maximum
        (6, 4, 0, 1),  # scale in to what the backlog needs
    ],
)
def test_desired_capacity_follows_the_backlog(desired: int, visible: int, in_flight: int, expected: int) -> None:
    """GIVEN a backlog WHEN the capacity is decided THEN it is ceil(backlog / jobs per instance) within [min, max]."""
    decision = decide_capacity(facts(queue_visible=visible, queue_in_flight=in_flight), group(desired), NOW,
                               POLICY, FLEET)
    assert (decision.action, decision.desired) == ("set", expected)


def test_at_target_nothing_changes() -> None:
    """GIVEN a fleet already sized for the backlog WHEN decided THEN nothing is set."""
    decision = decide_capacity(facts(queue_visible=8), group(2), NOW, POLICY, FLEET)
    assert (decision.action, decision.code) == ("none", "at_target")


def test_idle_fleet_scales_to_zero_only_after_the_idle_window() -> None:
    """GIVEN an idle fleet WHEN decided THEN it goes to 0 after the idle window, to 1 (never 0) inside it."""
    idle = decide_capacity(facts(), group(3), NOW, POLICY, FLEET)
    assert (idle.action, idle.desired, idle.code) == ("set", 0, "idle")
    recent = decide_capacity(facts(last_finished_at=RECENT), group(3), NOW, POLICY, FLEET)
    assert (recent.action, recent.desired, recent.code) == ("set", 1, "recent_activity")
    one = decide_capacity(facts(last_submit_at=RECENT), group(1), NOW, POLICY, FLEET)
    assert (one.action, one.code) == ("none", "recent_activity")


@pytest.mark.parametrize("change", [
    {"jobs_pending": 1}, {"jobs_processing": 1}, {"queue_delayed": 1}, {"adapter_jobs_in_hand": 1},
])
def test_work_of_any_kind_keeps_one_instance(change: dict[str, int]) -> None:
    """GIVEN pending/processing/delayed/in-hand work and no queue backlog WHEN decided THEN it never goes to 0."""
    decision = decide_capacity(facts(**change), group(2), NOW, POLICY, FLEET)
    assert decision.desired != 0 and (decision.action == "none" or decision.desired == 1)


@pytest.mark.parametrize("unknown", ["queue_visible", "queue_in_flight", "jobs_pending", "jobs_processing"])
def test_unknown_counts_never_lower_the_capacity(unknown: str) -> None:
    """GIVEN a count that could not be read WHEN decided THEN the desired capacity is not lowered."""
    decision = decide_capacity(facts(**{unknown: None}), group(3), NOW, POLICY, FLEET)
    assert (decision.action, decision.code) == ("none", "facts_unknown")


def test_unreadable_group_does_nothing() -> None:
    """GIVEN the group could not be read WHEN decided THEN nothing is set."""
    decision = decide_capacity(facts(queue_visible=50), None, NOW, POLICY, FLEET)
    assert (decision.action, decision.code) == ("none", "facts_unknown")


def test_protected_instances_are_never_scaled_in() -> None:
    """GIVEN 3 instances whose adapters hold work (protected) WHEN the backlog asks for 1 THEN desired stays 3."""
    decision = decide_capacity(facts(queue_in_flight=3), group(5, protected=3), NOW, POLICY, FLEET)
    assert (decision.action, decision.desired) == ("set", 3)


def test_an_active_floor_holds_capacity_and_blocks_zero() -> None:
    """GIVEN an active floor of 2 WHEN the fleet is idle THEN it stays at 2; from 0 it goes to 2."""
    held = facts(hold_until=NOW + 3600)
    assert decide_capacity(held, group(2, floor=2), NOW, POLICY, FLEET).action == "none"
    assert decide_capacity(held, group(0, floor=2), NOW, POLICY, FLEET).desired == 2
    expired = facts(hold_until=NOW - 3600)
    assert decide_capacity(expired, group(2, floor=2), NOW, POLICY, FLEET).desired == 0


def test_from_zero_in_flight_messages_alone_do_not_scale_out() -> None:
    """GIVEN a fleet at 0 and only in-flight messages WHEN decided THEN it stays at 0 (as a stopped instance would)."""
    decision = decide_capacity(facts(queue_in_flight=3), group(0), NOW, POLICY, FLEET)
    assert decision.action == "none"


def test_from_zero_pending_job_without_a_message_does_not_scale_out() -> None:
    """GIVEN a pending job whose message is gone and an empty queue WHEN decided THEN the fleet stays at 0."""
    decision = decide_capacity(facts(jobs_pending=1), group(0), NOW, POLICY, FLEET)
    assert (decision.action, decision.code) == ("none", "pending_without_message")


def test_from_zero_unreadable_queue_with_an_old_pending_job_scales_out() -> None:
    """GIVEN the queue unreadable and a GPU job pending for 2 minutes WHEN decided THEN one instance is asked for."""
    decision = decide_capacity(facts(queue_visible=None, jobs_pending=1, oldest_pending_created_at=NOW - 120),
                               group(0), NOW, POLICY, FLEET)
    assert (decision.action, decision.desired) == ("set", 1)


def test_floor_tag_parsing() -> None:
    """GIVEN floor tag values WHEN parsed THEN junk is 0."""
    assert [floor_of(v) for v in ("3", " 2 ", "-1", "x", None, "")] == [3, 2, 0, 0, 0, 0]


def test_jobs_per_instance_must_be_positive() -> None:
    """GIVEN jobs_per_instance 0 WHEN the policy is built THEN it is refused."""
    with pytest.raises(ValueError, match="at least 1"):
        FleetPolicy(jobs_per_instance=0)


# ---------------------------------------------------------------------------------------------- properties

counts = st.one_of(st.none(), st.integers(0, 60))
times = st.one_of(st.none(), st.floats(NOW - 86400, NOW + 120, allow_nan=False))


@st.composite
def worlds(draw: st.DrawFn) -> tuple[Facts, GroupView, FleetPolicy]:
    f = Facts(
        instance_state="running",
        queue_visible=draw(counts), queue_in_flight=draw(counts), queue_delayed=draw(counts),
        jobs_pending=draw(counts), jobs_processing=draw(counts),
        oldest_pending_created_at=draw(times), last_finished_at=draw(times), last_submit_at=draw(times),
        last_started_at=draw(times), activity_known=draw(st.booleans()),
        adapter_jobs_in_hand=draw(st.one_of(st.none(), st.integers(0, 4))),
        hold_until=draw(st.one_of(st.none(), st.floats(NOW - 7200, NOW + 7200, allow_nan=False))),
    )
    hi = draw(st.integers(1, 8))
    lo = draw(st.integers(0, hi))
    desired = draw(st.integers(lo, hi))
    protected = draw(st.integers(0, desired))
    g = dataclasses.replace(group(desired, lo=lo, hi=hi, protected=protected), floor=draw(st.integers(0, 10)))
    return f, g, FleetPolicy(draw(st.integers(1, 10)))


@settings(max_examples=600, deadline=None)
@given(world=worlds())
def test_zero_only_when_the_single_instance_rules_would_stop(world: tuple[Facts, GroupView, FleetPolicy]) -> None:
    """Scaling to 0 happens only where decide() would stop a running instance (work, unknowns, holds, idle window)."""
    f, g, fleet = world
    decision = decide_capacity(f, g, NOW, POLICY, fleet)
    if decision.action == "set" and decision.desired == 0:
        assert decide(f, NOW, POLICY).action == "stop"
        assert g.protected == 0


@settings(max_examples=600, deadline=None)
@given(world=worlds())
def test_bounds_protection_and_unknowns(world: tuple[Facts, GroupView, FleetPolicy]) -> None:
    """The desired capacity stays within [min, max], never below the protected instances, never lowered on unknowns."""
    f, g, fleet = world
    decision = decide_capacity(f, g, NOW, POLICY, fleet)
    if decision.action == "none":
        return
    assert decision.desired is not None
    assert g.min_size <= decision.desired <= g.max_size
    assert decision.desired >= min(g.protected, g.max_size)
    if f.work_unknown and g.desired > 0:
        assert decision.desired >= g.desired
    backlog = [f.queue_visible, f.queue_in_flight, f.queue_delayed]
    if all(n is not None for n in backlog) and any(backlog):
        assert decision.desired >= 1


def test_the_lambda_and_the_cli_use_the_same_tag_names() -> None:
    """GIVEN the Lambda's fleet module (it cannot import gpuctl) THEN its floor and scale-out tags are gpuctl's."""
    import fleet
    from gpuctl.aws import autoscaling
    from gpuctl.services import fleet as fleet_service

    assert (fleet.FLOOR_TAG, fleet.FLOOR_UNTIL_TAG, fleet.FLOOR_REASON_TAG) == (
        autoscaling.FLOOR_TAG, autoscaling.FLOOR_UNTIL_TAG, autoscaling.FLOOR_REASON_TAG)
    assert fleet.SCALED_OUT_AT_TAG == fleet_service.SCALED_OUT_AT_TAG
    assert fleet.capacity_tags("2026-12-01T00:00:00Z", "gpuctl-cli", "why", 1, 2) == fleet_service.capacity_tags(
        "2026-12-01T00:00:00Z", "gpuctl-cli", "why", 1, 2)
