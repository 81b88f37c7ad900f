"""`gpuctl cost simulate`'s replays (issue 14): how long each takes on a month of jobs, and a cross-check of the
fleet replay against bench_fleet.py's independent second-by-second world.

Run:  .venv/bin/python bench/bench_cost.py

* **timing**: a seeded 30-day trace (Poisson arrivals, one job every 260 s on average, 10-120 s each: about 10,000
  jobs), replayed by ``replay`` (one instance) and ``replay_fleet`` (up to 8 instances, 4 jobs each) under 5, 15, 30
  and 60-minute idle windows; wall time of each replay, GPU-hours and cold starts.
* **cross-check**: bench_fleet.py's day trace (1,224 jobs with two bursts) through ``replay_fleet`` with one job
  per instance at a time (slots=1, as bench_fleet's instances run) and bench_fleet's ``World``, both with a 90 s
  boot, a 30-minute window, up to 8 instances and 4 jobs per instance. The two share only the decision code
  (lambda/fleet.py); GPU-hours and instance starts should agree closely (the world steps whole seconds and
  dispatches once per second; the replay is event-driven).

Prints Markdown tables for BENCHMARKS.md. Nothing here runs in the test suite.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "lambda"))

from bench.bench_fleet import BOOT_SECONDS, World, trace  # noqa: E402
from gpuctl.services.simulate import SimJob, replay, replay_fleet  # noqa: E402

WINDOWS = (300.0, 900.0, 1800.0, 3600.0)


def month(seed: int = 3) -> list[SimJob]:
    rng = random.Random(seed)
    jobs, t = [], 0.0
    while t < 30 * 86400:
        t += rng.expovariate(1 / 260)
        jobs.append(SimJob(t, rng.uniform(10, 120)))
    return jobs


def timing() -> None:
    jobs = month()
    print(f"30-day trace: {len(jobs)} jobs, {sum(j.seconds for j in jobs) / 3600:.1f} GPU-hours of work\n")
    print("| idle window | one instance: replay time | GPU-hours | cold starts | fleet of 8: replay time | GPU-hours "
          "| cold starts |")
    print("|---|---|---|---|---|---|---|")
    for window in WINDOWS:
        t0 = time.perf_counter()
        one = replay(jobs, window, boot=BOOT_SECONDS)
        t1 = time.perf_counter()
        fleet = replay_fleet(jobs, window, boot=BOOT_SECONDS, max_instances=8, jobs_per_instance=4)
        t2 = time.perf_counter()
        print(f"| {window / 60:.0f} min | {t1 - t0:.2f} s | {one.billed_seconds / 3600:.1f} | {one.cold_starts} | "
              f"{t2 - t1:.2f} s | {fleet.billed_seconds / 3600:.1f} | {fleet.cold_starts} |")


def cross_check() -> None:
    day = trace()
    jobs = [SimJob(a, d) for a, d in day]
    t0 = time.perf_counter()
    fleet = replay_fleet(jobs, 1800, boot=BOOT_SECONDS, max_instances=8, jobs_per_instance=4, slots=1)
    t1 = time.perf_counter()
    world = World(day, 8).run()
    t2 = time.perf_counter()
    print(f"\nbench_fleet.py's day trace: {len(day)} jobs; 30-min window, up to 8 instances, 4 jobs each, one job "
          "per instance at a time\n")
    print("| model | GPU-hours | instance starts | time to run |")
    print("|---|---|---|---|")
    print(f"| replay_fleet (gpuctl cost simulate) | {fleet.billed_seconds / 3600:.2f} | {fleet.cold_starts} | "
          f"{t1 - t0:.2f} s |")
    print(f"| bench_fleet.py World (second by second) | {world['gpu_hours']:.2f} | {world['starts']:.0f} | "
          f"{t2 - t1:.2f} s |")


if __name__ == "__main__":
    timing()
    cross_check()
