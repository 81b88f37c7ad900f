"""`gpuctl cost simulate`: replay the recorded submissions under other idle windows, through the scheduler's
own decision code (lambda/decide.py), and say what each window would have cost and made people wait.

The replay, per idle window:

* the jobs arrive at their recorded ``created_at`` and each runs for its measured ``finished_at - started_at``,
  first come first served on ``inflight`` slots (the adapter's default, 2);
* a job arriving while the instance is stopped starts it at once (submit does) and waits the boot time: the
  median of the boots measured in the history (see gpuctl.services.cost), else :data:`DEFAULT_BOOT_SECONDS`;
* ``decide()`` is asked, with the facts the scheduler would have seen, at every 5-minute schedule tick and
  when the queue-idle alarm would fire (the window after the queue emptied), and its stop is carried out;
* billed time is per second with a one-minute minimum per start.

Fleet mode (:func:`replay_fleet`): the group's own ``decide_capacity`` (lambda/fleet.py) every minute, submit raising
it from 0 to 1, each launch a boot, scale-in of idle instances only, up to the group's maximum; the idle window is
the one that lets the last instance go. Its extra wait is against the whole fleet never scaling in.

Left out: the jobs of ``gpuctl doctor --canary`` (test traffic; the report counts them).

The extra wait of a job is how much later it starts than it would on an instance that never stops (the same
queueing, no boot). Recommendation: the cheapest window whose p95 extra wait is at most ``max_p95_wait``;
if none is, the window with the smallest p95.
"""

from __future__ import annotations

import bisect
import heapq
import importlib
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from gpuctl.errors import UsageError
from gpuctl.services.cost import MIN_BILLED_SECONDS

if TYPE_CHECKING:
    from gpuctl.services.context import Gateways
    from gpuctl.services.cost import JobTime

__all__ = ["DEFAULT_BOOT_SECONDS", "Outcome", "SimJob", "Simulation", "parse_windows", "replay", "replay_fleet",
           "simulate"]

DEFAULT_BOOT_SECONDS = 120.0
SCHEDULE_SECONDS = 300.0
CLOCK_SKEW_SECONDS = 60.0


@dataclass(frozen=True)
class SimJob:
    arrival: float
    seconds: float


@dataclass(frozen=True)
class Outcome:
    idle_seconds: float
    billed_seconds: float
    cold_starts: int
    waits: tuple[float, ...]

    def document(self, price: float | None) -> dict[str, Any]:
        return {"idle_window_seconds": self.idle_seconds, "gpu_hours": round(self.billed_seconds / 3600, 3),
                "cost": None if price is None else round(self.billed_seconds / 3600 * price, 4),
                "cold_starts": self.cold_starts, "extra_wait_p50_seconds": round(_pct(self.waits, 50), 1),
                "extra_wait_p95_seconds": round(_pct(self.waits, 95), 1)}


def _pct(values: Sequence[float], pct: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, math.ceil(pct / 100 * len(ordered)) - 1)
    return ordered[rank]


def load_decide() -> ModuleType:
    """The scheduler's decision module, imported from the Lambda folder as the Lambda runtime does."""
    from gpuctl.services.deploy import find_sources

    folder = str(find_sources().lambda_dir)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module("decide")


def _schedule(jobs: Sequence[SimJob], slots: int, ready: dict[int, float]) -> list[float]:
    """Start times FIFO on ``slots`` given, for each job index, the earliest time it may start."""
    free = [0.0] * slots
    heapq.heapify(free)
    starts = []
    for i, job in enumerate(jobs):
        slot = heapq.heappop(free)
        start = max(slot, job.arrival, ready.get(i, job.arrival))
        starts.append(start)
        heapq.heappush(free, start + job.seconds)
    return starts


def replay(jobs: Sequence[SimJob], idle_seconds: float, *, boot: float, slots: int = 2,
           decide_module: ModuleType | None = None) -> Outcome:
    """One idle window's replay (module docstring)."""
    dm = decide_module or load_decide()
    policy = dm.Policy(idle_seconds=idle_seconds, clock_skew_seconds=CLOCK_SKEW_SECONDS)
    ordered = sorted(jobs, key=lambda j: j.arrival)
    baseline = _schedule(ordered, slots, {})
    free = [0.0] * slots  # when each slot is free (a heap)
    finishes: list[float] = []
    starts: list[float] = []
    up_since: float | None = None
    ready_at = 0.0
    last_submit: float | None = None
    billed, cold = 0.0, 0

    def says_stop(now: float) -> bool:
        done = bisect.bisect_right(finishes, now)  # finishes is kept sorted
        in_hand = len(finishes) - done
        facts = dm.Facts(instance_state="running", queue_visible=0, queue_in_flight=in_hand, queue_delayed=0,
                         jobs_pending=0, jobs_processing=in_hand,
                         last_finished_at=finishes[done - 1] if done else None,
                         last_submit_at=last_submit, last_started_at=up_since)
        return bool(dm.decide(facts, now, policy).action == "stop")

    def first_stop(before: float) -> float | None:
        """The first decision time before ``before`` at which the scheduler stops the instance."""
        assert up_since is not None
        quiet = max([up_since, *(t for t in (last_submit,) if t is not None), *finishes[-1:]])
        # The alarm fires once the queue was empty for the window (whole minutes); the schedule every 5 min.
        alarm = math.ceil((quiet + idle_seconds) / 60) * 60
        horizon = quiet + idle_seconds + CLOCK_SKEW_SECONDS + 2 * SCHEDULE_SECONDS
        tick = (math.floor(quiet / SCHEDULE_SECONDS) + 1) * SCHEDULE_SECONDS
        for now in sorted({alarm, *_ticks(tick, horizon)}):
            if now >= before:
                return None
            if says_stop(now):
                return now
        return None

    for job in ordered:
        if up_since is not None:
            stop = first_stop(job.arrival)
            if stop is not None:
                billed += max(MIN_BILLED_SECONDS, stop - up_since)
                up_since = None
        last_submit = job.arrival
        if up_since is None:  # submit starts a stopped instance; the job waits for the boot
            up_since, ready_at = job.arrival, job.arrival + boot
            cold += 1
        start = max(heapq.heappop(free), job.arrival, ready_at)
        heapq.heappush(free, start + job.seconds)
        bisect.insort(finishes, start + job.seconds)
        starts.append(start)
    if up_since is not None:
        stop = first_stop(math.inf)
        assert stop is not None  # decide always stops an idle instance within the window + skew + a tick
        billed += max(MIN_BILLED_SECONDS, stop - up_since)
    waits = tuple(max(0.0, s - b) for s, b in zip(starts, baseline, strict=True))
    return Outcome(idle_seconds, billed, cold, waits)


FLEET_SCHEDULE_SECONDS = 60.0


def load_fleet() -> ModuleType:
    """The fleet's capacity module (lambda/fleet.py), imported as :func:`load_decide` imports decide."""
    load_decide()
    return importlib.import_module("fleet")


def replay_fleet(jobs: Sequence[SimJob], idle_seconds: float, *, boot: float, max_instances: int,
                 jobs_per_instance: int, slots: int = 2, decide_module: ModuleType | None = None,
                 fleet_module: ModuleType | None = None) -> Outcome:
    """One idle window's replay of a fleet: the scheduler's own ``decide_capacity`` (lambda/fleet.py) every
    minute while the group has capacity or work, submit raising the group from 0 to 1, Auto Scaling launching up
    to the desired capacity (each launch boots ``boot`` seconds: a cold start) and scaling in idle instances only
    (scale-in protection). Each instance runs ``slots`` jobs at a time, first come first served; billing per
    instance from its launch to its scale-in, with the one-minute minimum. The extra wait of a job is against the
    whole fleet (``max_instances``) never scaling in."""
    dm = decide_module or load_decide()
    fm = fleet_module or load_fleet()
    policy = dm.Policy(idle_seconds=idle_seconds, clock_skew_seconds=CLOCK_SKEW_SECONDS)
    capacity = fm.FleetPolicy(jobs_per_instance)
    ordered = sorted(jobs, key=lambda j: j.arrival)
    baseline = _schedule(ordered, slots * max_instances, {})
    #: Each instance: [launched, ready, slot free times]; the ones launched and not scaled in.
    fleet: list[tuple[float, float, list[float]]] = []
    queue: list[int] = []  # indexes of jobs waiting, FIFO
    starts = [0.0] * len(ordered)
    finishes: list[float] = []  # a heap of the finishes not yet passed
    last_finished: float | None = None
    desired, billed, cold = 0, 0.0, 0
    last_submit: float | None = None
    last_launch: float | None = None
    now, arrived = 0.0, 0

    def in_hand(t: float) -> int:
        return sum(1 for _launched, _ready, free in fleet for f in free if f > t)

    def reconcile(t: float) -> None:
        nonlocal billed, cold, last_launch
        while len(fleet) < desired:
            fleet.append((t, t + boot, [0.0] * slots))
            cold += 1
            last_launch = t
        idle = [m for m in fleet if all(f <= t for f in m[2])]
        for member in idle[:max(0, len(fleet) - desired)]:
            fleet.remove(member)
            billed += max(MIN_BILLED_SECONDS, t - member[0])

    def dispatch(t: float) -> None:
        for _launched, ready, free in fleet:
            if ready > t:
                continue
            for n, f in enumerate(free):
                if not queue:
                    return
                if f <= t:
                    i = queue.pop(0)
                    starts[i], free[n] = t, t + ordered[i].seconds
                    heapq.heappush(finishes, t + ordered[i].seconds)

    def decide_at(t: float) -> None:
        nonlocal desired, last_finished
        while finishes and finishes[0] <= t:
            last_finished = heapq.heappop(finishes)
        busy = in_hand(t)
        facts = dm.Facts(instance_state="running" if desired else "stopped", queue_visible=len(queue),
                         queue_in_flight=busy, queue_delayed=0, jobs_pending=len(queue), jobs_processing=busy,
                         oldest_pending_created_at=ordered[queue[0]].arrival if queue else None,
                         last_finished_at=last_finished, last_submit_at=last_submit, last_started_at=last_launch,
                         adapter_jobs_in_hand=busy)
        members = tuple(fm.Member(str(n), "InService", any(f > t for f in m[2])) for n, m in enumerate(fleet))
        group = fm.GroupView("replay", desired, 0, max_instances, members, scaled_out_at=last_launch)
        decision = fm.decide_capacity(facts, group, t, policy, capacity)
        if decision.action == "set" and decision.desired is not None:
            desired = decision.desired
            reconcile(t)

    while arrived < len(ordered) or queue or fleet:
        # The next moment anything happens (each later than the last): an arrival, a boot ending, a job finishing,
        # a scheduler run on the next whole minute (only while the group has capacity or work: at 0 with nothing
        # queued, the next arrival comes first).
        moments = [ordered[arrived].arrival] if arrived < len(ordered) else []
        moments += [r for _l, r, _f in fleet if r > now] + [f for _l, _r, free in fleet for f in free if f > now]
        if fleet or queue:
            moments.append((math.floor(now / FLEET_SCHEDULE_SECONDS) + 1) * FLEET_SCHEDULE_SECONDS)
        now = min(moments)
        if arrived == len(ordered) and not queue and not finishes and now > (last_finished or 0.0) + idle_seconds \
                + CLOCK_SKEW_SECONDS + 3 * FLEET_SCHEDULE_SECONDS + boot:
            raise RuntimeError("the fleet replay's group never scaled in to 0 after its last job")  # a bug here
        while arrived < len(ordered) and ordered[arrived].arrival <= now:
            queue.append(arrived)
            last_submit = ordered[arrived].arrival
            arrived += 1
            if desired == 0:  # submit raises the group from 0 to 1
                desired = 1
                reconcile(now)
        dispatch(now)
        if now % FLEET_SCHEDULE_SECONDS == 0:  # a scheduler run
            decide_at(now)
            dispatch(now)
    waits = tuple(max(0.0, s - b) for s, b in zip(starts, baseline, strict=True))
    return Outcome(idle_seconds, billed, cold, waits)


def _ticks(first: float, until: float) -> list[float]:
    ticks = []
    t = first
    while t < until:
        ticks.append(t)
        t += SCHEDULE_SECONDS
    return ticks


def parse_windows(raw: str) -> list[float]:
    """``5m,15m,30m,60m`` as seconds.

    Raises:
        UsageError: a window is not a duration of at least one minute.
    """
    from gpuctl.services.jobs import parse_duration

    windows = [parse_duration(part.strip(), option="--idle") for part in raw.split(",") if part.strip()]
    if not windows:
        raise UsageError("--idle needs at least one idle window, e.g. 5m,15m,30m,60m.")
    for w in windows:
        if w < 60:
            raise UsageError(f"--idle windows must be at least 1 minute, got {w:g} s.")
    return sorted(set(windows))


@dataclass
class Simulation:
    since: float
    until: float
    jobs: int
    boot_seconds: float
    boot_measured: int
    price: float | None
    price_source: str
    outcomes: list[Outcome]
    max_p95_wait: float
    warnings: list[str]
    fleet_group: str | None = None
    #: Fleet mode: (max instances, jobs per instance) the replay used.
    fleet: tuple[int, int] | None = None

    def recommended(self) -> Outcome | None:
        if not self.outcomes:
            return None
        within = [o for o in self.outcomes if _pct(o.waits, 95) <= self.max_p95_wait]
        if within:
            return min(within, key=lambda o: (o.billed_seconds, o.idle_seconds))
        return min(self.outcomes, key=lambda o: (_pct(o.waits, 95), o.billed_seconds))

    def document(self) -> dict[str, Any]:
        from gpuctl.times import stamp

        best = self.recommended()
        return {**stamp("since", self.since), **stamp("until", self.until), "jobs": self.jobs,
                "boot_seconds": round(self.boot_seconds, 1), "boots_measured": self.boot_measured,
                "hourly_price": self.price, "price_source": self.price_source,
                "max_p95_wait_seconds": self.max_p95_wait, "fleet_group": self.fleet_group,
                "max_instances": self.fleet[0] if self.fleet else None,
                "jobs_per_instance": self.fleet[1] if self.fleet else None,
                "windows": [o.document(self.price) for o in self.outcomes],
                "recommended_idle_window_seconds": best.idle_seconds if best else None,
                "warnings": self.warnings}


def simulate(gw: Gateways, *, windows: Sequence[float], since_seconds: float, hourly: float | None = None,
             max_p95_wait: float = 120.0, slots: int = 2, jobs_per_instance: int = 4,
             now: float | None = None) -> Simulation:
    """Replay the window's recorded GPU jobs under each idle window (fleet mode: the group's, through
    :func:`replay_fleet`, up to its maximum size at ``jobs_per_instance``)."""
    if jobs_per_instance < 1:
        raise UsageError(f"--jobs-per-instance must be at least 1, got {jobs_per_instance}.")
    import time

    from gpuctl.services.cost import cost_report

    report = cost_report(gw, since_seconds=since_seconds, hourly=hourly, now=now)
    until = time.time() if now is None else now
    timed: list[JobTime] = []
    canaries = 0
    for record in _jobs(gw, report.since):
        if record.started_at is not None and record.finished_at is not None and record.created_at >= report.since:
            if record.canary:  # doctor's test traffic, not the team's: it would not come under another window
                canaries += 1
                continue
            from gpuctl.services.cost import JobTime

            timed.append(JobTime(record.task_id, record.kind, record.created_at, record.started_at,
                                 record.finished_at))
    boots = [s.boot for s in report.stretches if s.boot > 0]
    boot = statistics.median(boots) if boots else DEFAULT_BOOT_SECONDS
    warnings = [w for w in report.warnings if "price" in w]
    if canaries:
        warnings.append(f"{canaries} job(s) of gpuctl doctor --canary are left out of the replay (test traffic).")
    if not boots:
        warnings.append(f"No boot was measured in the history: the replay assumes {DEFAULT_BOOT_SECONDS:.0f} s.")
    if not timed:
        warnings.append("No finished GPU job with started_at in this window: nothing to replay.")
    decide_module = load_decide()
    jobs = [SimJob(j.created_at, max(0.0, j.finished_at - j.started_at)) for j in timed]
    fleet: tuple[int, int] | None = None
    if report.fleet_group:
        max_instances = gw.fleet.describe().max_size
        fleet = (max_instances, jobs_per_instance)
        fleet_module = load_fleet()
        outcomes = [replay_fleet(jobs, w, boot=boot, max_instances=max_instances, jobs_per_instance=jobs_per_instance,
                                 slots=slots, decide_module=decide_module, fleet_module=fleet_module)
                    for w in windows] if jobs and max_instances > 0 else []
        if report.price is None and report.priced:
            warnings.append("The fleet mixes instance types: which type each launch gets is not replayed, so no "
                            "money is shown (pass --hourly-price for one price).")
    else:
        outcomes = [replay(jobs, w, boot=boot, slots=slots, decide_module=decide_module)
                    for w in windows] if jobs else []
    return Simulation(report.since, until, len(jobs), boot, len(boots), report.price, report.price_source, outcomes,
                      max_p95_wait, warnings, report.fleet_group, fleet)


def _jobs(gw: Gateways, since: float) -> list[Any]:
    from gpuctl.services.cost import finished_jobs

    return finished_jobs(gw, since)
