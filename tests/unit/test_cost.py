"""gpuctl cost report's arithmetic: billed stretches, the one-minute minimum, busy/boot/idle and per-job shares."""

from __future__ import annotations

from typing import Any

import pytest

from gpuctl.aws.history import Transition
from gpuctl.models import JobRecord
from gpuctl.services.cost import MIN_BILLED_SECONDS, build_report, hourly_price, merge, stretches

IID = "i-0123456789abcdef0"
DAY = 1796083200.0  # 2026-12-01T00:00:00Z
CAMERA = "/api/v1/camera-angle/jobs"
EDIT = "/api/v1/qwen-image-edit/jobs"


def t(at: float, state: str, cause: str = "other") -> Transition:
    return Transition(IID, at, state, cause)


def job(task_id: str, created: float, started: float | None, finished: float | None,
        job_type: str = CAMERA, status: str = "completed") -> JobRecord:
    return JobRecord(task_id=task_id, status=status, job_type=job_type, created_at=created, updated_at=created,
                     started_at=started, finished_at=finished)


def report(transitions: list[Transition], jobs: list[JobRecord], *, since: float = DAY, until: float = DAY + 86400,
           by: str | None = None, price: float | None = 3.6) -> Any:
    return build_report(transitions, jobs, instance_id=IID, instance_type="g5.xlarge", since=since, until=until,
                        price=price, price_source="test", ebs_gb={"gp3": 100}, by=by)


def test_a_short_start_is_billed_one_minute() -> None:
    """A start that ran 20 s is billed 60 s (EC2's minimum per start)."""
    # GIVEN / WHEN
    found = report([t(DAY + 100, "pending"), t(DAY + 110, "running"), t(DAY + 130, "stopping")], [])
    # THEN
    assert found.totals()["billed_seconds"] == MIN_BILLED_SECONDS
    assert found.totals()["starts"] == 1
    assert found.totals()["idle_seconds"] == MIN_BILLED_SECONDS


def test_billing_counts_from_running_not_pending() -> None:
    """Billed time runs from running to the first stop-type state; pending is not billed."""
    # GIVEN / WHEN
    found = stretches([t(DAY, "pending"), t(DAY + 30, "running"), t(DAY + 630, "stopping"),
                       t(DAY + 660, "stopped")], since=DAY, until=DAY + 3600)
    # THEN
    assert [(s.start, s.end) for s in found] == [(DAY + 30, DAY + 630)]


def test_a_stretch_from_before_the_window_is_cut_without_minimum() -> None:
    """Running when the window opened: counted from the window's start, and no second minimum."""
    # GIVEN the last change before the window: running since 10 min before it
    found = report([t(DAY - 600, "running"), t(DAY + 30, "stopping")], [])
    # THEN
    assert found.totals()["billed_seconds"] == 30
    assert found.totals()["starts"] == 0


def test_still_running_counts_to_now() -> None:
    """An instance running now is billed up to the report's end."""
    # GIVEN / WHEN
    found = report([t(DAY + 600, "running")], [], until=DAY + 4200)
    # THEN
    assert found.totals()["billed_seconds"] == 3600
    assert found.stretches[0].running_now is True
    assert found.totals()["cost"] == pytest.approx(3.6)


def test_busy_boot_idle_and_tail() -> None:
    """A cold start for a waiting job: boot until its claim, busy while it runs, then the idle tail."""
    # GIVEN a job submitted at 0 that started the instance (running at 20), claimed at 80, done at 380,
    # and the instance stopped at 2180 (30 min later)
    transitions = [t(DAY + 5, "pending", "submit"), t(DAY + 20, "running", "submit"),
                   t(DAY + 2180, "stopping", "scheduler")]
    found = report(transitions, [job("a", DAY, DAY + 80, DAY + 380)])
    # WHEN
    totals = found.totals()
    # THEN
    assert (totals["billed_seconds"], totals["boot_seconds"], totals["busy_seconds"]) == (2160, 60, 300)
    assert totals["idle_seconds"] == totals["idle_tail_seconds"] == 1800
    [row] = found.jobs
    assert row["gpu_seconds"] == 300 and row["boot_share_seconds"] == 60 and row["idle_share_seconds"] == 1800
    assert row["charged_seconds"] == 2160
    stretch = found.document()["stretches"][0]
    assert (stretch["started_by"], stretch["stopped_by"]) == ("submit", "scheduler")


def test_overlapping_jobs_are_merged_and_every_second_is_charged_once() -> None:
    """Two jobs running together count their overlap once; the charged seconds add up to the billed time."""
    # GIVEN jobs at [100, 400] and [300, 500] in a stretch [0, 1000] started by hand (no boot)
    found = report([t(DAY, "running", "cli"), t(DAY + 1000, "stopped", "cli")],
                   [job("a", DAY + 90, DAY + 100, DAY + 400), job("b", DAY + 290, DAY + 300, DAY + 500, EDIT)],
                   by="job-type")
    # WHEN
    totals = found.totals()
    # THEN
    assert totals["busy_seconds"] == 400 and totals["boot_seconds"] == 0
    assert sum(j["charged_seconds"] for j in found.jobs) == pytest.approx(1000)
    assert totals["unattributed_seconds"] == 0
    groups = {g["job_type"]: g for g in found.document()["groups"]}
    assert set(groups) == {"camera-angle", "qwen-image-edit"}
    assert groups["camera-angle"]["gpu_seconds"] == 300


def test_a_job_long_after_a_manual_start_pays_no_boot() -> None:
    """The gap between a manual start and a job submitted later is idle, not boot."""
    # GIVEN / WHEN
    found = report([t(DAY, "running", "cli"), t(DAY + 3600, "stopped")], [job("a", DAY + 1200, DAY + 1200, DAY + 1300)])
    # THEN
    assert found.totals()["boot_seconds"] == 0
    assert found.totals()["idle_seconds"] == 3500


def test_stretch_without_jobs_is_unattributed_and_untimed_jobs_are_counted() -> None:
    """Running time with no job is charged to no job; a job without started_at is counted, with a warning."""
    # GIVEN / WHEN
    found = report([t(DAY, "running"), t(DAY + 600, "stopped")], [job("old", DAY, None, DAY + 50)])
    # THEN
    assert found.totals()["unattributed_seconds"] == 600
    assert found.totals()["jobs_untimed"] == 1
    assert any("started_at" in w for w in found.warnings)


def test_by_day_splits_at_midnight_and_charges_the_minimum_on_the_start_day() -> None:
    """A stretch over midnight is split between the two days."""
    # GIVEN running from 23:00 to 01:00
    found = report([t(DAY + 82800, "running"), t(DAY + 90000, "stopped")], [], until=DAY + 2 * 86400, by="day")
    # WHEN
    days = {d["day"]: d for d in found.document()["groups"]}
    # THEN
    assert days["2026-12-01"]["billed_seconds"] == 3600 and days["2026-12-02"]["billed_seconds"] == 3600


def test_ebs_while_stopped_and_price_table() -> None:
    """EBS is priced per GB-month for the stopped time; the shipped table knows g5.xlarge; unknown types warn."""
    # GIVEN / WHEN
    found = report([t(DAY, "stopped")], [], until=DAY + 730 * 3600)
    # THEN 100 GB gp3 stopped a whole (730 h) month
    assert found.ebs_stopped()["cost"] == pytest.approx(8.0)
    assert hourly_price("g5.xlarge", None)[0] == pytest.approx(1.006)
    assert hourly_price("x9.huge", None)[0] is None
    assert hourly_price("x9.huge", 2.5) == (2.5, "--hourly-price")
    assert any("--hourly-price" in w for w in report([], [], price=None).warnings)


def test_no_history_warns() -> None:
    """An empty history says so instead of reporting zero as if it were known."""
    # GIVEN / WHEN / THEN
    assert any("No state change" in w for w in report([], []).warnings)


def test_merge() -> None:
    """Overlapping and touching intervals merge; empty ones vanish."""
    # GIVEN / WHEN / THEN
    assert merge([(5, 7), (0, 2), (1, 3), (3, 4), (9, 9)]) == [(0, 4), (5, 7)]


def test_canary_jobs_are_marked_and_grouped_apart() -> None:
    """doctor's canary is charged as any job, marked canary, and `--by job-type` groups it as "canary"."""
    # GIVEN a team job and a canary in one stretch
    canary = job("c", DAY + 10, DAY + 400, DAY + 410).model_copy(update={"canary": True})
    found = report([t(DAY, "running"), t(DAY + 1000, "stopping")], [job("a", DAY + 5, DAY + 100, DAY + 200), canary],
                   by="job-type")
    # WHEN / THEN
    assert [(j["job_id"], j["canary"]) for j in found.jobs] == [("a", False), ("c", True)]
    assert [(g["job_type"], g["jobs"], g["gpu_seconds"]) for g in found.job_types()] == [
        ("camera-angle", 1, 100), ("canary", 1, 10)]


def test_a_retaken_job_counts_its_last_attempt_and_is_warned_about() -> None:
    """A job claimed twice: busy is its last attempt (started_at on), and the report says the rest is idle."""
    # GIVEN a job whose first attempt ran from DAY+100 and whose second (the one recorded) from DAY+300
    retaken = job("r", DAY + 5, DAY + 300, DAY + 400).model_copy(update={"attempts": 2})
    # WHEN
    found = report([t(DAY, "running"), t(DAY + 1000, "stopping")], [retaken, job("b", DAY + 5, DAY + 500, DAY + 550)])
    # THEN
    assert found.totals()["busy_seconds"] == 150
    assert [w for w in found.warnings if "ran more than once" in w] == [
        "1 GPU job(s) ran more than once (retried or taken over): only their last attempt's time is counted as "
        "busy, earlier attempts count as idle (the record keeps only the last attempt's started_at)."]


# ------------------------------------------------------------------ fleet mode: several instances, their own prices

A, B = "i-0aaaaaaaaaaaaaaa1", "i-0bbbbbbbbbbbbbbb2"


def ft(instance_id: str, at: float, state: str) -> Transition:
    return Transition(instance_id, at, state, "autoscaling")


def placed(task_id: str, instance_id: str | None, started: float, finished: float) -> JobRecord:
    return JobRecord(task_id=task_id, status="completed", job_type=CAMERA, created_at=started - 5,
                     updated_at=finished, started_at=started, finished_at=finished, instance_id=instance_id)


def fleet_report(jobs: list[JobRecord], *, hourly: float | None = None, b_type: str = "g6.xlarge") -> Any:
    from gpuctl.services.cost import Member, build_fleet_report

    a = [ft(A, DAY + 100, "pending"), ft(A, DAY + 160, "running"), ft(A, DAY + 3760, "stopping"),
         ft(A, DAY + 3790, "stopped")]  # one hour running, then back to the warm pool
    b = [ft(B, DAY + 1000, "pending"), ft(B, DAY + 1060, "running"), ft(B, DAY + 2860, "shutting-down"),
         ft(B, DAY + 2900, "terminated")]  # half an hour, then scaled in and terminated
    members = [Member(A, "g5.xlarge", a, hourly_price("g5.xlarge", hourly)[0], {"gp3": 100}),
               Member(B, b_type, b, hourly_price(b_type, hourly)[0], {})]
    return build_fleet_report(members, jobs, group="gpuctl-gpu-fleet", since=DAY, until=DAY + 86400, hourly=hourly)


def test_fleet_bills_each_instance_at_its_own_type_s_price() -> None:
    """Two members of different types: the total is the sum of each one's hours at its own price."""
    # GIVEN / WHEN
    found = fleet_report([])
    # THEN
    rows = {i["instance_id"]: i for i in found.instances()}
    assert (rows[A]["billed_seconds"], rows[B]["billed_seconds"]) == (3600, 1800)
    assert rows[A]["cost"] == pytest.approx(1.006) and rows[B]["cost"] == pytest.approx(0.8048 / 2)
    assert found.totals()["cost"] == pytest.approx(1.006 + 0.4024)
    assert found.totals()["starts"] == 2
    doc = found.document()
    assert doc["fleet_group"] == "gpuctl-gpu-fleet" and doc["instance_id"] is None
    assert doc["hourly_price"] is None and doc["instance_type"] is None
    assert {s["instance_id"] for s in doc["stretches"]} == {A, B}


def test_fleet_jobs_are_charged_on_the_instance_that_ran_them() -> None:
    """A job on B while A also ran is B's busy time only; its idle share is B's idle, at B's price."""
    # GIVEN one job on each instance, overlapping in time
    jobs = [placed("on-a", A, DAY + 1500, DAY + 1800), placed("on-b", B, DAY + 1500, DAY + 2100)]
    # WHEN
    found = fleet_report(jobs)
    # THEN
    rows = {i["instance_id"]: i for i in found.instances()}
    assert (rows[A]["busy_seconds"], rows[B]["busy_seconds"]) == (300, 600)
    charged = {j["job_id"]: j for j in found.jobs}
    assert charged["on-a"]["charged_seconds"] == pytest.approx(3600)  # A's whole hour: its only job
    assert charged["on-b"]["charged_seconds"] == pytest.approx(1800)
    assert charged["on-b"]["cost"] == pytest.approx(0.4024, abs=1e-4)
    assert found.totals()["unattributed_seconds"] == 0


def test_fleet_job_without_an_instance_is_not_guessed() -> None:
    """A job whose record names no instance (an older adapter) is left out with a warning, not put anywhere."""
    # GIVEN / WHEN
    found = fleet_report([placed("nowhere", None, DAY + 1500, DAY + 1800),
                          placed("unrecorded", "i-0ccccccccccccccc3", DAY + 1500, DAY + 1800)])
    # THEN
    assert found.jobs == [] and found.totals()["busy_seconds"] == 0
    assert any("1 GPU job(s) have no instance_id" in w for w in found.warnings)
    assert any("1 GPU job(s) ran on instances with no recorded state change" in w for w in found.warnings)


def test_fleet_ebs_counts_the_stopped_time_of_instances_that_still_exist() -> None:
    """A (back in the warm pool) pays EBS for its stopped time since its launch; B (terminated) is warned about."""
    # GIVEN / WHEN
    found = fleet_report([])
    # THEN A existed from DAY+100 to the window's end and ran an hour of it
    ebs = found.ebs_stopped()
    assert ebs["volumes_gb"] == {"gp3": 100}
    assert ebs["stopped_seconds"] == pytest.approx(86400 - 100 - 3600 + (2900 - 1000 - 1800), abs=1)
    assert ebs["cost"] == pytest.approx(100 * 0.08 * (86400 - 3700) / (730 * 3600), abs=1e-3)
    assert any("1 of the fleet's 2 instance(s) no longer exist" in w for w in found.warnings)


def test_fleet_with_an_unknown_type_shows_no_money_unless_priced() -> None:
    """One member of a type outside the table: no money at all (a partial sum would mislead), until --hourly-price."""
    # GIVEN / WHEN
    unknown = fleet_report([], b_type="x9.gpu")
    priced = fleet_report([], b_type="x9.gpu", hourly=2.0)
    # THEN
    assert unknown.totals()["cost"] is None and unknown.instances()[0]["cost"] is None
    assert any("x9.gpu" in w and "--hourly-price" in w for w in unknown.warnings)
    assert priced.totals()["cost"] == pytest.approx(2.0 * 1.5) and priced.price == 2.0
