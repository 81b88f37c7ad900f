"""The scheduler's generated-state run in full (issue 10): 20,000 worlds through the real handler in moto.

Run:  .venv/bin/python bench/bench_scheduler_states.py [--states 20000] [--seed 20260] [--workers 2]

Each world is built in in-process moto (tests/scheduler_world.py), about half of them with one injected fault
on a fact the handler reads or a write it makes, and checked against the invariants (no stop with work
present, inside the idle window, during a hold or a malformed hold, or with a fact hidden by a fault; every
waiting message starts a stopped instance; only lost GPU jobs are failed; outcomes as they happened). CI runs
the same check on 120 states (tests/functional/test_lambda_generated.py). Prints a Markdown table for
BENCHMARKS.md and exits 1 if any state broke an invariant.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "lambda"))


def _part(args: tuple[int, int]) -> tuple[dict[str, Any], list[str]]:
    count, seed = args
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    from tests import scheduler_world

    failures: list[str] = []

    def collect(index: int, world: Any, problems: list[str], record: dict[str, Any]) -> None:
        failures.append(f"seed {seed} state {index} ({world.state}, fault {world.fault}): {problems}; "
                        f"{record['code']}: {record['reason']} -> {record['outcome']}")

    return scheduler_world.run_states(count, seed, on_problem=collect), failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--states", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=20260)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    per = [args.states // args.workers + (1 if i < args.states % args.workers else 0) for i in range(args.workers)]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        results = list(pool.map(_part, [(n, args.seed + i) for i, n in enumerate(per)]))
    elapsed = time.perf_counter() - started
    total: dict[str, Any] = {"by_code": {}}
    failures: list[str] = []
    for tally, found in results:
        failures += found
        for key, value in tally.items():
            if key == "by_code":
                for code, n in value.items():
                    total["by_code"][code] = total["by_code"].get(code, 0) + n
            else:
                total[key] = total.get(key, 0) + value
    print("| states | violations | stops | starts | lost jobs failed | faults injected (fired) | wall time |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {total['states']} | {total['violations']} | {total['stops']} | {total['starts']} | {total['reaped']} "
          f"| {total['faults']} | {elapsed:.0f} s ({args.workers} processes) |")
    print()
    print("decisions: " + ", ".join(f"{code} {n}" for code, n in sorted(total["by_code"].items())))
    for line in failures[:20]:
        print("VIOLATION", line)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
