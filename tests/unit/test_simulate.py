"""gpuctl cost simulate's replay: the scheduler's own decide() under each idle window."""

from __future__ import annotations

import pytest

import decide
from gpuctl.errors import UsageError
from gpuctl.services.simulate import Outcome, SimJob, Simulation, load_decide, parse_windows, replay

T = 3_000_000_000.0  # a multiple of the 5-minute schedule


def test_replay_stops_when_decide_does_not_at_the_alarm() -> None:
    """One job: the alarm fires at the window, decide() still waits for the clock skew, the next tick stops it."""
    # GIVEN a job arriving at T, booting 60 s, running 100 s, a 5-minute window
    # WHEN
    outcome = replay([SimJob(T, 100)], 300, boot=60, decide_module=decide)
    # THEN quiet from T+160; the alarm at T+480 is 20 s short of window + skew; the tick at T+600 stops it
    assert outcome.billed_seconds == 600
    assert outcome.cold_starts == 1
    assert outcome.waits == (60.0,)


def test_a_longer_window_trades_gpu_time_for_cold_starts() -> None:
    """Jobs 20 minutes apart: a 5-minute window starts the GPU for each, a 30-minute one keeps it up."""
    # GIVEN
    jobs = [SimJob(T + k * 1200, 60) for k in range(4)]
    # WHEN
    short = replay(jobs, 300, boot=90, decide_module=decide)
    long = replay(jobs, 1800, boot=90, decide_module=decide)
    # THEN
    assert (short.cold_starts, long.cold_starts) == (4, 1)
    assert short.waits == (90.0,) * 4 and long.waits == (90.0, 0.0, 0.0, 0.0)
    assert short.billed_seconds < long.billed_seconds


def test_jobs_queue_on_the_slots_and_the_wait_is_only_the_boot() -> None:
    """Three jobs at once on two slots: the third queues behind them, which is not extra wait."""
    # GIVEN / WHEN
    outcome = replay([SimJob(T, 100), SimJob(T, 100), SimJob(T, 100)], 600, boot=30, slots=2, decide_module=decide)
    # THEN
    assert outcome.waits == (30.0, 30.0, 30.0)


def test_recommendation_is_the_cheapest_within_the_wait_bound() -> None:
    """The cheapest window whose p95 extra wait is within the bound; else the one with the smallest p95."""
    # GIVEN
    cheap_slow, dear_fast = Outcome(300, 1000, 9, (0, 200)), Outcome(1800, 5000, 1, (0, 0))
    sim = Simulation(0, 1, 2, 90, 1, 1.0, "t", [cheap_slow, dear_fast], 120, [])
    # WHEN / THEN
    assert sim.recommended() is dear_fast
    sim.max_p95_wait = 300
    assert sim.recommended() is cheap_slow
    assert sim.document()["windows"][0]["cost"] == pytest.approx(1000 / 3600, abs=1e-3)


def test_the_replay_uses_the_lambdas_decide_module() -> None:
    """The CLI imports decide.py from the Lambda folder: the same module the scheduler runs."""
    # GIVEN / WHEN / THEN
    assert load_decide().decide is decide.decide


@pytest.mark.parametrize("raw", ["", "30s", "soon", "5m,,x"])
def test_bad_windows_are_usage_errors(raw: str) -> None:
    """--idle takes durations of at least a minute."""
    # GIVEN / WHEN / THEN
    with pytest.raises(UsageError):
        parse_windows(raw)


def test_windows_parse_sorted_and_unique() -> None:
    """5m,15m,30m,60m in any order, repeated or not."""
    # GIVEN / WHEN / THEN
    assert parse_windows("60m,5m,15m,30m,5m") == [300, 900, 1800, 3600]


# ------------------------------------------------------------------ fleet mode: the group's own decide_capacity


def fleet_replay(jobs: list[SimJob], window: float, *, boot: float = 60, max_instances: int = 4) -> Outcome:
    import fleet
    from gpuctl.services.simulate import replay_fleet

    return replay_fleet(jobs, window, boot=boot, max_instances=max_instances, jobs_per_instance=4,
                        decide_module=decide, fleet_module=fleet)


def test_fleet_replay_of_one_job_scales_to_one_and_back_to_zero() -> None:
    """One job: submit raises the group to 1, it boots 60 s, runs 100 s; the minute schedule lets it go at the first
    run past the idle window and the clock skew after the finish."""
    # GIVEN a job at T (a whole minute), 5-minute window
    # WHEN
    outcome = fleet_replay([SimJob(T, 100)], 300)
    # THEN finished at T+160; window + skew end at T+520; the run at T+540 scales in to 0
    assert (outcome.billed_seconds, outcome.cold_starts, outcome.waits) == (540, 1, (60.0,))


def test_fleet_replay_scales_out_for_a_burst() -> None:
    """16 jobs at once, 4 per instance: the scheduler's run raises the group to 4 at once; every job waits only
    the boot against a fleet that never scales in."""
    # GIVEN / WHEN
    outcome = fleet_replay([SimJob(T, 100) for _ in range(16)], 300)
    # THEN
    assert outcome.cold_starts == 4
    assert outcome.waits == (60.0,) * 16
    assert outcome.billed_seconds >= 4 * 160  # each ran from its launch past its last job


def test_fleet_replay_window_trades_gpu_time_for_cold_starts() -> None:
    """Jobs 20 minutes apart: with a 5-minute window the group goes to 0 between them, with 30 minutes it stays."""
    # GIVEN
    jobs = [SimJob(T + k * 1200, 60) for k in range(4)]
    # WHEN
    short, long = fleet_replay(jobs, 300), fleet_replay(jobs, 1800)
    # THEN
    assert (short.cold_starts, long.cold_starts) == (4, 1)
    assert short.waits == (60.0,) * 4 and long.waits == (60.0, 0.0, 0.0, 0.0)
    assert short.billed_seconds < long.billed_seconds
