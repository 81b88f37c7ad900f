"""Fleet mode's capacity benchmark (issue 13): a simulated day through the scheduler's own decision code, and a
real drain of a backlog by several adapter processes.

Run:  .venv/bin/python bench/bench_fleet.py simulate            (the day-shaped trace, 1 instance and fleets of 2/4/8)
      .venv/bin/python bench/bench_fleet.py drain               (200 jobs drained by 1, 2 and 4 adapters; ~7 min)
      .venv/bin/python bench/bench_fleet.py drain --jobs 40 --seconds-per-job 0.5   (a quick look)

**simulate** replays the trace below second by second. Every scheduler run calls the real decision code
(lambda/decide.py for one instance, every 5 minutes as its schedule; lambda/fleet.py for a fleet, every minute)
with the facts the simulated world would show it: queue visible / in flight, pending / processing counts, the
last submit, finish and start, the jobs in the adapters' hands, the protected (busy) instances. Submit starts
the one instance (single mode) or raises the group from 0 to 1 (fleet), as gpuctl's submit does. An instance
takes ``BOOT_SECONDS`` from its start (a stopped instance, or one from the warm pool) until its adapter polls,
runs one job at a time (one GPU), is billed from its start until it stops, and is only scaled in while it holds
no job (scale-in protection); idle ones go first.

The trace (seeded, so every run is the same day): job durations lognormal around 40 s (sigma 0.5, at most 5 min);
Poisson arrivals per hour of the day - 00-07 h: 2/h; 07-09 h: 20/h; 09-12 h: 60/h; 12-13 h: 20/h; 13-18 h: 60/h;
18-22 h: 10/h; 22-24 h: 2/h - plus two bursts: 400 jobs within 5 minutes at 10:30 (a release batch) and 200 within
2 minutes at 15:00.

**drain** runs moto's server in this process, N ComfyUI stand-ins (each in its own process: the GPUs) and N
``python -m adapter`` processes (one per stand-in, each its own worker id), queues the whole backlog first, then
starts the adapters and measures from the first job starting on a stand-in to the last record ``completed``.
Duplicate executions are counted from the stand-ins' own logs (one ``standin.prompt_done`` per execution) and
from the records (``attempts``).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "lambda"))

from decide import Facts, Policy, decide  # noqa: E402
from fleet import FleetPolicy, GroupView, Member, decide_capacity  # noqa: E402

BOOT_SECONDS = 90.0
DAY = 86400
SEED = 13
#: (from hour, to hour, jobs per hour)
RATES = [(0, 7, 2), (7, 9, 20), (9, 12, 60), (12, 13, 20), (13, 18, 60), (18, 22, 10), (22, 24, 2)]
#: (at second of the day, jobs, within seconds)
BURSTS = [(10.5 * 3600, 400, 300), (15 * 3600, 200, 120)]


def trace(seed: int = SEED) -> list[tuple[float, float]]:
    """(arrival second, duration seconds) of every job of the day, in arrival order."""
    rng = random.Random(seed)
    arrivals: list[float] = []
    for start, end, rate in RATES:
        t = start * 3600.0
        while True:
            t += rng.expovariate(rate / 3600.0)
            if t >= end * 3600:
                break
            arrivals.append(t)
    for at, count, within in BURSTS:
        arrivals += [at + rng.uniform(0, within) for _ in range(count)]
    arrivals.sort()
    return [(a, min(300.0, rng.lognormvariate(math.log(40.0), 0.5))) for a in arrivals]


@dataclass
class Instance:
    started: float  # when it was started (billing starts)
    ready: float  # when its adapter polls
    job_end: float | None = None  # the job in hand ends then

    def busy(self, now: float) -> bool:
        return self.job_end is not None and self.job_end > now


@dataclass
class World:
    jobs: list[tuple[float, float]]
    max_instances: int  # 0: single-instance mode
    policy: Policy = field(default_factory=Policy)
    fleet: FleetPolicy = field(default_factory=FleetPolicy)
    instances: list[Instance] = field(default_factory=list)
    desired: int = 0
    billed: float = 0.0
    waits: list[float] = field(default_factory=list)
    last_submit: float | None = None
    last_finish: float | None = None
    last_start: float | None = None
    decisions: int = 0
    starts: int = 0

    @property
    def single(self) -> bool:
        return self.max_instances == 0

    def start_instance(self, now: float) -> None:
        self.instances.append(Instance(now, now + BOOT_SECONDS))
        self.last_start = now
        self.starts += 1

    def stop_instance(self, inst: Instance, now: float) -> None:
        self.billed += now - inst.started
        self.instances.remove(inst)

    def run(self) -> dict[str, float]:
        queue: list[tuple[float, float]] = []  # waiting (arrival, duration)
        pending = list(self.jobs)
        period = 300 if self.single else 60
        for now in range(DAY + 6 * 3600):  # the day, then time for the last jobs and the idle stop
            t = float(now)
            while pending and pending[0][0] <= t:
                queue.append(pending.pop(0))
                self.last_submit = t
                self.on_submit(t)
            for inst in self.instances:
                if inst.job_end is not None and inst.job_end <= t:
                    inst.job_end = None
                    self.last_finish = t
            for inst in self.instances:
                if queue and inst.ready <= t and not inst.busy(t):
                    arrival, duration = queue.pop(0)
                    self.waits.append(t - arrival)
                    inst.job_end = t + duration
            if not self.single:
                self.reconcile(t)
            if now % period == 0:
                self.schedule(t, queue)
            if not pending and not queue and not self.instances and now > DAY:
                break
        for inst in list(self.instances):
            self.stop_instance(inst, float(now))
        hours = self.billed / 3600
        return {"gpu_hours": hours, "p50": statistics.median(self.waits), "p95": _pct(self.waits, 0.95),
                "max": max(self.waits), "jobs_per_gpu_hour": len(self.waits) / hours if hours else 0.0,
                "decisions": self.decisions, "starts": self.starts}

    def on_submit(self, t: float) -> None:
        if self.single:
            if not self.instances:
                self.start_instance(t)  # ensure_running
        elif self.desired == 0:
            self.desired = 1  # ensure_capacity: 0 -> 1
            self.reconcile(t)

    def facts(self, t: float, queue: list[tuple[float, float]]) -> Facts:
        busy = sum(1 for i in self.instances if i.busy(t))
        return Facts(instance_state="running" if self.instances else "stopped", queue_visible=len(queue),
                     queue_in_flight=busy, queue_delayed=0, jobs_pending=len(queue), jobs_processing=busy,
                     oldest_pending_created_at=queue[0][0] if queue else None, last_finished_at=self.last_finish,
                     last_submit_at=self.last_submit, last_started_at=self.last_start, adapter_jobs_in_hand=busy)

    def schedule(self, t: float, queue: list[tuple[float, float]]) -> None:
        self.decisions += 1
        facts = self.facts(t, queue)
        if self.single:
            decision = decide(facts, t, self.policy)
            if decision.action == "stop" and self.instances:
                self.stop_instance(self.instances[0], t)
            elif decision.action == "start" and not self.instances:
                self.start_instance(t)
            return
        members = tuple(Member(str(id(i)), "InService", i.busy(t)) for i in self.instances)
        group = GroupView("sim", self.desired, 0, self.max_instances, members, scaled_out_at=self.last_start)
        capacity = decide_capacity(facts, group, t, self.policy, self.fleet)
        if capacity.action == "set" and capacity.desired is not None:
            self.desired = capacity.desired
            self.reconcile(t)

    def reconcile(self, t: float) -> None:
        """Auto Scaling: launch up to the desired capacity; scale in idle instances only (protection)."""
        while len(self.instances) < self.desired:
            self.start_instance(t)
        excess = len(self.instances) - self.desired
        if excess > 0:
            idle = sorted((i for i in self.instances if not i.busy(t)), key=lambda i: i.ready <= t)
            for inst in idle[:excess]:
                self.stop_instance(inst, t)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def simulate() -> None:
    jobs = trace()
    busy = sum(d for _, d in jobs) / 3600
    print(f"Trace: {len(jobs)} jobs, {busy:.2f} GPU-hours of work; boot {BOOT_SECONDS:.0f} s; idle window "
          f"{Policy().idle_seconds / 60:.0f} min; {FleetPolicy().jobs_per_instance} jobs per instance\n")
    print("| Capacity | GPU-hours billed | submit → start p50 | p95 | max | jobs per GPU-hour | instance starts | "
          "scheduler runs |")
    print("|---|---|---|---|---|---|---|---|")
    for size in (0, 2, 4, 8):
        started = time.perf_counter()
        r = World(jobs, size).run()
        name = "1 instance (single mode, 5-min schedule)" if size == 0 else f"fleet of up to {size} (1-min schedule)"
        print(f"| {name} | {r['gpu_hours']:.2f} | {r['p50']:.0f} s | {r['p95'] / 60:.1f} min | "
              f"{r['max'] / 60:.1f} min | {r['jobs_per_gpu_hour']:.0f} | {r['starts']:.0f} | {r['decisions']:.0f} "
              f"({time.perf_counter() - started:.1f} s to simulate) |")


# --- the real drain ---------------------------------------------------------------------------------------------

def drain(jobs_count: int, seconds_per_job: float, counts: list[int]) -> None:
    from bench.bench_adapter import AdapterProcess, Jobs, StandinProcess, fresh_resources
    from bench.bench_cli import moto_server

    load = os.getloadavg()
    print(f"Machine: {os.cpu_count()} CPUs, load average before {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}\n")
    print("| Adapters (stand-ins) | jobs | wall (first start → last completed) | jobs/s | speed-up | "
          "executions | duplicates | load avg after |")
    print("|---|---|---|---|---|---|---|---|")
    base: float | None = None
    with moto_server() as endpoint:
        for n in counts:
            res = fresh_resources(endpoint)
            jobs = Jobs(res)
            task_ids = jobs.submit(jobs_count)  # the whole backlog first
            with ExitStack() as stack:
                servers = [StandinProcess(seconds_per_job) for _ in range(n)]
                for server in servers:
                    stack.callback(server.stop)
                adapters = [AdapterProcess(res, s.base_url, s.root, GPUCTL_WORKER_ID=f"bench-{k}",
                                           GPUCTL_POLL_WAIT="1") for k, s in enumerate(servers)]
                for proc in adapters:
                    stack.callback(proc.stop)
                for proc in adapters:
                    proc.wait_started()
                done = jobs.wait(task_ids, timeout=jobs_count * seconds_per_job * 4 + 120)
                runs = [r for s in servers for r in s.runs().values()]
            attempts = _attempts(jobs, task_ids)
            first = min(r.start for r in runs)
            wall = max(d.updated_at for d in done) - first
            rate = jobs_count / wall
            base = base or rate
            duplicates = len(runs) - jobs_count + sum(a - 1 for a in attempts)
            after = os.getloadavg()[0]
            print(f"| {n} | {jobs_count} | {wall:.1f} s | {rate:.2f} | **{rate / base:.2f}×** | {len(runs)} | "
                  f"{duplicates} | {after:.2f} |", flush=True)


def _attempts(jobs: Any, task_ids: list[str]) -> list[int]:
    return [jobs.gw.table.get(t).attempts for t in task_ids]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["simulate", "drain"])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--seconds-per-job", type=float, default=1.0)
    parser.add_argument("--adapters", default="1,2,4")
    args = parser.parse_args()
    started = time.monotonic()
    if args.what == "simulate":
        simulate()
    else:
        drain(args.jobs, args.seconds_per_job, [int(n) for n in args.adapters.split(",")])
    print(f"\n(`{' '.join(['.venv/bin/python', 'bench/bench_fleet.py', *sys.argv[1:]])}`, "
          f"{time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
