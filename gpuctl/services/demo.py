"""`gpuctl demo`: local mode from nothing, a cold start of the GPU box, a job of each type, the results.

Local mode comes up with the GPU box off (its instance record stopped). The two jobs are submitted as a user
would; the first submit starts the instance, the box boots, the adapter runs both jobs on ComfyUI and
publishes them; the results are downloaded. Each job's time from submit to completed is split into stages
that add up:

* **queue wait**: waiting in the queue while no box was booting (the adapter's next poll, staging the inputs
  on ComfyUI, ComfyUI's own queue behind the other job);
* **boot**: the part of its wait while the box was booting (instance start → the adapter polls);
* **execution**: ComfyUI running the prompt (seen from ComfyUI's queue, :mod:`gpuctl.local.comfyui_watch`);
* **publish**: the output fetched, uploaded to S3 and the job marked completed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from gpuctl.errors import JobFailed, WaitTimeout
from gpuctl.local import supervisor as sv
from gpuctl.services.local import BoxView, DownResult, LocalOptions, UpResult, box_view, local_down, local_up

if TYPE_CHECKING:
    from gpuctl.local.comfyui_watch import QueueObserver
    from gpuctl.models import JobRecord
    from gpuctl.services.context import Gateways

__all__ = ["DEMO_JOBS", "DemoEvents", "DemoJob", "DemoResult", "run_demo", "stage_seconds"]

#: The two demo jobs: the job type and the options a user would pass to `gpuctl submit`.
DEMO_JOBS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("camera-angle", {"vertical": 1, "horizontal": 1, "zoom": 0}),
    ("qwen-image-edit", {"prompt": "Turn the photo into a pencil sketch"}),
)
_BOX_WATCH_INTERVAL = 0.1  # box.json is a local file the box rewrites on each change; reading it is cheap


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


@dataclass
class DemoJob:
    """One demo job and how long each of its stages took (None: not observed)."""

    kind: str
    job_id: str
    submit_s: float
    queue_wait_s: float | None = None
    boot_s: float | None = None
    execution_s: float | None = None
    publish_s: float | None = None
    download_s: float | None = None
    status: str = "pending"
    result_url: str | None = None
    path: Path | None = None
    error: str | None = None

    def document(self) -> dict[str, Any]:
        return {"job_type": self.kind, "job_id": self.job_id, "status": self.status,
                "result_s3_uri": self.result_url, "file": str(self.path) if self.path else None,
                "error": self.error,
                "seconds": {"submit": _r(self.submit_s), "queue_wait": _r(self.queue_wait_s),
                            "boot": _r(self.boot_s), "execution": _r(self.execution_s),
                            "publish": _r(self.publish_s), "download": _r(self.download_s)}}


@dataclass
class DemoResult:
    output_dir: Path
    up: UpResult | None = None
    jobs: list[DemoJob] = field(default_factory=list)
    sample: Path | None = None
    up_s: float = 0.0
    down_s: float | None = None
    total_s: float = 0.0
    box_before: str | None = None  # the GPU box's state when the jobs were submitted
    box: BoxView | None = None  # … and after they finished
    down: DownResult | None = None

    def document(self) -> dict[str, Any]:
        boot = self.box.boot_seconds if self.box and self.box_before == "off" else None
        return {"output_dir": str(self.output_dir), "sample": str(self.sample) if self.sample else None,
                "local_mode": self.up.action if self.up else None, "taken_down": self.down is not None,
                "gpu_box": {"before": self.box_before, "boot_seconds": _r(boot),
                            "boot_delay_seconds": self.box.boot_delay if self.box else None},
                "seconds": {"up": _r(self.up_s), "down": _r(self.down_s), "total": _r(self.total_s)},
                "jobs": [j.document() for j in self.jobs]}


class DemoEvents(Protocol):
    """What the demo reports while it runs (the CLI shows it)."""

    def step(self, message: str) -> None:
        """A step begins."""

    def job_changed(self, job: DemoJob, record: JobRecord) -> None:
        """A job's status or progress changed."""

    def box_changed(self, box: BoxView) -> None:
        """The GPU box changed state (off, booting, up, stopping)."""

    def jobs_finished(self) -> None:
        """The jobs are done (or given up); what follows is local mode going down."""


class _Silent:
    def step(self, message: str) -> None:
        pass

    def job_changed(self, job: DemoJob, record: JobRecord) -> None:
        pass

    def box_changed(self, box: BoxView) -> None:
        pass

    def jobs_finished(self) -> None:
        pass


def stage_seconds(*, created: float, claimed: float | None, ran: tuple[float | None, float | None],
                  finished: float | None, boot: tuple[float | None, float | None]) -> dict[str, float | None]:
    """Split submit → completed into queue wait, boot, execution and publish (see the module docstring).

    ``ran`` is when ComfyUI ran the prompt, ``boot`` when the box booted (either may be unknown).
    """
    start, end = ran
    waited_until = start if start is not None else claimed
    boot_s: float | None = 0.0
    if boot[0] is not None and waited_until is not None:
        boot_end = boot[1] if boot[1] is not None else waited_until
        boot_s = max(0.0, min(waited_until, boot_end) - max(created, boot[0]))
    queue_wait = None if waited_until is None or boot_s is None else max(0.0, waited_until - created - boot_s)
    return {"queue_wait": queue_wait, "boot": boot_s,
            "execution": None if start is None or end is None else max(0.0, end - start),
            "publish": None if end is None or finished is None else max(0.0, finished - end)}


def run_demo(
    output_dir: Path,
    *,
    keep: bool = False,
    endpoint_url: str | None = None,
    region: str | None = None,
    config_dir: Path | None = None,
    directory: Path | None = None,
    options: LocalOptions | None = None,
    events: DemoEvents | None = None,
    timeout: float = 180.0,
) -> DemoResult:
    """Bring local mode up (unless it is), run one job of each type on the sample picture, download the
    results to ``output_dir``; take local mode down again unless ``keep`` or it was already up.

    Raises:
        JobFailed: a demo job failed (local mode is still taken down).
        WaitTimeout: the jobs did not finish within ``timeout`` seconds.
        GpuctlError: local mode did not come up.
    """
    from gpuctl.local.sample import write_sample

    events = events or _Silent()
    began = time.monotonic()
    result = DemoResult(output_dir.resolve())
    result.up = local_up(endpoint_url=endpoint_url, region=region, config_dir=config_dir, directory=directory,
                         options=options, on_step=events.step)
    result.up_s = time.monotonic() - began
    try:
        result.sample = write_sample(result.output_dir / "sample-input.png")
        _demo_jobs(sv.StateDir(sv.state_dir(directory)), result, events, timeout)
    finally:
        events.jobs_finished()
        if result.up.action != "already-up" and not keep:
            events.step("Taking local mode down …")
            t0 = time.monotonic()
            result.down = local_down(directory)
            result.down_s = time.monotonic() - t0
        result.total_s = time.monotonic() - began
    return result


class _BoxWatch(threading.Thread):
    """Reports each change of the GPU box's state while the demo's jobs run."""

    def __init__(self, root: sv.StateDir, state: sv.LocalState, events: DemoEvents) -> None:
        super().__init__(name="demo-box-watch", daemon=True)
        self._root, self._state, self._events = root, state, events
        self._halt = threading.Event()
        self.last = box_view(root, state)

    def run(self) -> None:
        while not self._halt.wait(_BOX_WATCH_INTERVAL):
            now = box_view(self._root, self._state)
            if now.state != self.last.state:
                self._events.box_changed(now)
            self.last = now

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=2.0)


def _demo_jobs(root: sv.StateDir, result: DemoResult, events: DemoEvents, timeout: float) -> None:
    from gpuctl.inputs import ImageLimits
    from gpuctl.local.comfyui_watch import QueueObserver
    from gpuctl.local.components import LocalClients, comfyui_url, local_settings
    from gpuctl.models import JobType
    from gpuctl.services.context import Gateways
    from gpuctl.services.submit import draft_job, submit_draft
    from gpuctl.services.watch import watch_jobs

    state = root.load()
    assert state is not None and result.sample is not None and result.up is not None
    settings = local_settings(state)
    gw = Gateways(settings, result.up.clients or LocalClients(settings))
    observer = QueueObserver(comfyui_url(state))
    box_watch = _BoxWatch(root, state, events)
    result.box_before = box_watch.last.state
    events.box_changed(box_watch.last)
    observer.start()
    box_watch.start()
    claimed: dict[str, float] = {}
    try:
        events.step("Submitting the sample picture as both job types …")
        for kind, fields in DEMO_JOBS:
            t0 = time.monotonic()
            draft = draft_job(JobType(kind), str(result.sample), fields, limits=ImageLimits.from_settings(settings))
            submitted = submit_draft(gw, draft)
            result.jobs.append(DemoJob(kind, submitted.record.task_id, time.monotonic() - t0))
        by_id = {job.job_id: job for job in result.jobs}

        def changed(record: JobRecord) -> None:
            job = by_id[record.task_id]
            job.status = record.status.value
            if record.status.value == "processing":
                # The claim writes updated_at; the first processing record seen carries that time.
                claimed.setdefault(record.task_id, record.updated_at)
            if record.status.is_finished:
                job.result_url, job.error = record.result_s3_uri, record.error_message
            events.job_changed(job, record)

        # Two GetItems per poll against the loopback emulator: cheap, and the end shows within 0.3 s.
        outcome = watch_jobs(gw.table, list(by_id), on_change=changed, timeout=timeout, interval=0.2,
                             max_interval=0.3)
    finally:
        box_watch.stop()
        observer.stop()
    result.box = box_view(root, state)
    _stages(result, outcome.records, claimed, observer)
    _finished_or_raise(outcome.failed, outcome.timed_out, outcome.unfinished, outcome.elapsed)
    _download(gw, result)


def _stages(result: DemoResult, records: list[JobRecord], claimed: dict[str, float],
            observer: QueueObserver) -> None:
    box = result.box
    boot = (box.boot_started_at, box.up_at) if box is not None else (None, None)
    for job, record in zip(result.jobs, records, strict=True):
        stages = stage_seconds(created=record.created_at, claimed=claimed.get(record.task_id),
                               ran=observer.window(record.comfy_job_id),
                               finished=record.finished_at or record.updated_at if record.status.is_finished
                               else None, boot=boot)
        job.queue_wait_s, job.boot_s = stages["queue_wait"], stages["boot"]
        job.execution_s, job.publish_s = stages["execution"], stages["publish"]


def _finished_or_raise(failed: list[JobRecord], timed_out: bool, unfinished: list[JobRecord],
                       elapsed: float) -> None:
    if failed:
        reasons = "; ".join(f"{r.kind} {r.task_id}: {r.error_message or 'no reason recorded'}" for r in failed)
        raise JobFailed(f"A demo job failed — {reasons}. The adapter's log (`gpuctl local status`) says why.")
    if timed_out:
        waiting = ", ".join(f"{r.kind} ({r.status.value})" for r in unfinished)
        raise WaitTimeout(f"The demo jobs did not finish within {elapsed:.0f} s (still {waiting}); "
                          "see `gpuctl local status` and the logs it lists.")


def _download(gw: Gateways, result: DemoResult) -> None:
    from gpuctl.services.jobs import download_result

    for job in result.jobs:
        t0 = time.monotonic()
        saved = download_result(gw, job.job_id, result.output_dir / f"{job.kind}.png")
        job.download_s = time.monotonic() - t0
        job.path = saved.path
