"""Generated world states through the real handler against moto, with a fault injected on every kind of fact
it reads and every write it makes (tests/scheduler_world.py has the generator and the invariants).

CI runs GPUCTL_GENERATED_STATES states (default 120, about 15 s on a quiet machine); the full 20,000-state run is
``python bench/bench_scheduler_states.py`` (results in BENCHMARKS.md).
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests import scheduler_world

STATES = int(os.environ.get("GPUCTL_GENERATED_STATES", "120"))
SEED = int(os.environ.get("GPUCTL_GENERATED_SEED", "20260"))


def test_generated_states_keep_every_invariant(clean_env: Any) -> None:
    """No stop with work present, inside the idle window, during a hold or a malformed hold, or with a fact
    hidden by a fault; every waiting message starts a stopped instance; lost jobs, and only they, are failed;
    other services' tasks are never touched; outcomes are recorded as they happened."""
    failures: list[str] = []

    def collect(index: int, world: scheduler_world.World, problems: list[str], record: dict[str, Any]) -> None:
        failures.append(f"state {index} ({world.state}, fault {world.fault}): {problems}; decided "
                        f"{record['code']} ({record['reason']}), outcome {record['outcome']}")

    tally = scheduler_world.run_states(STATES, SEED, on_problem=collect)
    assert failures == []
    assert tally["states"] == STATES
    # The sample is not vacuous: it stopped, started, reaped and met faults.
    assert tally["stops"] > 0 and tally["starts"] > 0 and tally["reaped"] > 0 and tally["faults"] > 0


@pytest.mark.parametrize(("override", "expected"), [
    ({"IDLE_MINUTES": "0", "CLOCK_SKEW_SECONDS": "0"}, "stop inside the idle window"),
    ({"MAX_HOLD_HOURS": "0"}, "stop during a hold"),
    ({"LOST_AFTER_MINUTES": "1", "CLOCK_SKEW_SECONDS": "0"}, "that was not lost"),
])
def test_the_invariants_catch_a_broken_scheduler(clean_env: Any, override: dict[str, str], expected: str) -> None:
    """The same check flags a scheduler configured to break a rule (the test can fail)."""
    problems: list[str] = []

    def stop_at_the_expected_one(_i: int, _w: Any, found: list[str], _r: Any) -> bool:
        problems.extend(found)
        return any(expected in p for p in found)

    scheduler_world.run_states(300, SEED, env_override=override, on_problem=stop_at_the_expected_one)
    assert any(expected in p for p in problems), problems[:5]
