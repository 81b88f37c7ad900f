"""`gpuctl doctor --canary`: one tiny real job through the normal submit path, followed to its end and timed.

The canary is a camera-angle job on a small generated picture (256 x 256, 4 steps), submitted with
:func:`gpuctl.services.submit.submit_draft` exactly as `gpuctl submit` does (so it starts the instance when it
is stopped) and marked ``canary`` in its record, so `gpuctl jobs list` and `gpuctl cost report` tell it apart
from the team's work. Its time from submit to completed is split into the stages of
:func:`gpuctl.services.demo.stage_seconds`, from what the record and the activity marker say:

* **boot**: when no adapter was polling at submit, the wait until the first adapter report after it (the
  instance starting, its adapter coming up);
* **queue wait**: the rest of the wait until the adapter claimed the job (``started_at``);
* **execution**: claimed → the backend returned (``executed_at``: staging the input on ComfyUI and running
  the prompt);
* **publish**: the backend returned → completed (``finished_at``: the result uploaded, the job marked).

Afterwards it deletes its uploaded input and its result object. A canary that does not finish in time is
cancelled (a pending one ends ``failed``, so it can never start the GPU later); its input is deleted too.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpuctl.errors import ConfigError, GpuctlError, Interrupted, UsageError
from gpuctl.services.demo import stage_seconds
from gpuctl.services.doctor import Finding
from gpuctl.services.submit import NO_GUARD, WriteGuard

if TYPE_CHECKING:
    from gpuctl.models import JobRecord
    from gpuctl.services.context import Gateways

__all__ = ["CANARY_FIELDS", "CANARY_SIZE", "DEFAULT_CANARY_TIMEOUT", "STAGES", "CanaryResult", "run_canary"]

#: The picture's size: small, so the upload and the GPU's work are cheap.
CANARY_SIZE = (256, 256)
#: The camera-angle request: a small turn with few steps and a fixed seed.
CANARY_FIELDS: dict[str, Any] = {"horizontal": 1, "vertical": 0, "zoom": 0, "steps": 4, "seed": 1}
#: A cold start (instance boot, ComfyUI loading its models) plus one small job.
DEFAULT_CANARY_TIMEOUT = 900.0
#: The stages in order, with what each one covers (the findings say it).
STAGES: tuple[tuple[str, str], ...] = (
    ("queue_wait", "queued until the adapter claimed it"),
    ("boot", "the instance and its adapter coming up"),
    ("execution", "claimed until the backend returned its result"),
    ("publish", "the result uploaded and the job marked completed"),
)


@dataclass
class CanaryResult:
    """How the canary went: its job, its end (``completed``, ``failed``, ``timed-out``, ``not-submitted``) and its
    stages."""

    job_id: str | None  # None: it could not be submitted
    status: str
    seconds: dict[str, float | None]
    total_s: float
    error: str | None = None
    instance: str | None = None  # what the submit did to the instance (started, already-running, …)
    cleaned_up: list[str] = field(default_factory=list)
    cleanup_errors: list[str] = field(default_factory=list)

    def findings(self) -> list[Finding]:
        """``canary`` (pass / fail with the reason) and, when it completed, one finding per stage."""
        if self.status != "completed":
            reached = ", ".join(f"{name.replace('_', ' ')} {value:.1f} s" for name, value in self.seconds.items()
                                if value is not None)
            subject = "the canary" if self.job_id is None else f"the canary job {self.job_id}"
            return [Finding("canary", "fail", f"{subject} {self.error}" + (f" (after {reached})" if reached else ""),
                            _fix(self))]
        found = [Finding("canary", "pass", f"the canary job {self.job_id} completed in {self.total_s:.1f} s")]
        for name, what in STAGES:
            value = self.seconds.get(name)
            shown = "not recorded (an adapter older than this gpuctl)" if value is None else f"{value:.1f} s"
            found.append(Finding(f"canary.{name}", "pass", f"{shown} ({what})"))
        return found

    def document(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "status": self.status, "error": self.error, "instance": self.instance,
                "seconds": {**{k: None if v is None else round(v, 2) for k, v in self.seconds.items()},
                            "total": round(self.total_s, 2)},
                "cleaned_up": self.cleaned_up, "cleanup_errors": self.cleanup_errors}


def _fix(result: CanaryResult) -> str:
    if result.job_id is None:
        return "the checks above (gpuctl doctor) and gpuctl queue stats show what the submit could not reach"
    if result.status == "timed-out":
        return (f"gpuctl status {result.job_id} says why a job waits; gpuctl instance status and gpuctl doctor "
                "show whether the instance and its adapter run")
    return f"gpuctl status {result.job_id}; the adapter's log on the instance (journalctl -u gpuctl-adapter)"


def canary_png() -> bytes:
    """The canary's picture: a colour gradient with a square, drawn on the fly."""
    from PIL import Image, ImageDraw

    width, height = CANARY_SIZE
    img = Image.merge("RGB", (Image.linear_gradient("L").resize(CANARY_SIZE),
                              Image.linear_gradient("L").rotate(90).resize(CANARY_SIZE),
                              Image.new("L", CANARY_SIZE, 128)))
    ImageDraw.Draw(img).rectangle([width // 3, height // 3, 2 * width // 3, 2 * height // 3], fill=(240, 200, 40))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


class _BootWatch:
    """While the canary waits and no adapter was polling at submit: the first adapter report after the submit."""

    def __init__(self, gw: Gateways, since: float, open_: bool) -> None:
        self._gw, self._since = gw, since
        self.start: float | None = since if open_ else None
        self.end: float | None = None

    def poll(self) -> None:
        if self.start is None or self.end is not None:
            return
        with contextlib.suppress(GpuctlError):  # a missed read only makes the boot end at the claim
            activity = self._gw.table.read_activity()
            seen = activity.adapter_seen_at
            if seen is not None and seen > self._since and activity.adapter_state == "running":
                self.end = seen


def run_canary(gw: Gateways, *, timeout: float = DEFAULT_CANARY_TIMEOUT, guard: WriteGuard = NO_GUARD,
               on_submitted: Callable[[JobRecord], None] | None = None) -> CanaryResult:
    """Submit the canary, follow it to its end (at most ``timeout`` seconds), time its stages, clean up.

    ``on_submitted`` is told the canary's record once it is queued. A submit that fails on AWS is a result
    (``not-submitted``, with the error), not an exception: it is what the canary found.

    Raises:
        ConfigError / UsageError: a setting the submit needs is missing (nothing was written).
        Interrupted: Ctrl-C; the message names the canary job when it was already queued.
        GpuctlError: the job's record could not be read while following it.
    """
    from gpuctl.inputs import ImageLimits
    from gpuctl.models import JobType
    from gpuctl.services.submit import draft_job, submit_draft
    from gpuctl.services.watch import check_wait_options

    check_wait_options(timeout)
    with tempfile.TemporaryDirectory(prefix="gpuctl-canary-") as folder:
        picture = Path(folder) / "canary.png"
        picture.write_bytes(canary_png())
        draft = draft_job(JobType.CAMERA_ANGLE, str(picture), CANARY_FIELDS,
                          limits=ImageLimits.from_settings(gw.settings))
        try:
            submitted = submit_draft(gw, draft, guard=guard, canary=True)
        except (ConfigError, UsageError, Interrupted):
            raise
        except GpuctlError as exc:
            return CanaryResult(None, "not-submitted", dict.fromkeys(name for name, _what in STAGES), 0.0,
                                f"could not be submitted: {exc}")
    record = submitted.record
    if submitted.interrupted or guard.pending:
        raise Interrupted(f"Interrupted: the canary job {record.task_id} is queued and left as it is "
                          f"(gpuctl jobs cancel {record.task_id} ends it).")
    boot = _BootWatch(gw, record.created_at, open_=not submitted.adapter_polling)
    try:
        if on_submitted is not None:
            on_submitted(record)
        return _follow(gw, record, boot, timeout, submitted.instance.action if submitted.instance else None)
    except KeyboardInterrupt:
        raise Interrupted(f"Interrupted: the canary job {record.task_id} is left as it is "
                          f"(gpuctl jobs cancel {record.task_id} ends it).") from None


#: How often the canary's record is read: a few GetItems a second at most, so its end is seen within 2 s.
_POLL = (0.5, 2.0)


def _follow(gw: Gateways, record: JobRecord, boot: _BootWatch, timeout: float, instance: str | None) -> CanaryResult:
    from gpuctl.services.watch import watch_jobs

    outcome = watch_jobs(gw.table, [record.task_id], on_change=lambda _r: None, on_poll=boot.poll,
                         timeout=timeout, interval=_POLL[0], max_interval=_POLL[1])
    last = outcome.records[0]
    if outcome.timed_out:
        waiting = _waiting(last)
        last = _cancel(gw, last)
        status, error = "timed-out", f"did not finish within {timeout:g} s ({waiting}); it was cancelled"
    elif last.status.value == "completed":
        status, error = "completed", None
    else:
        status, error = "failed", f"failed: {last.error_message or 'no reason recorded'}"
    seconds = stage_seconds(created=last.created_at, claimed=last.started_at,
                            ran=(last.started_at, last.executed_at),
                            finished=last.finished_at if status == "completed" else None,
                            boot=(boot.start, boot.end))
    if last.started_at is None:  # never claimed: no stage ended
        seconds = dict.fromkeys(seconds)
    end = last.finished_at if last.status.is_finished and last.finished_at else time.time()
    result = CanaryResult(last.task_id, status, seconds, max(0.0, end - last.created_at), error, instance)
    _clean_up(gw, last, result)
    return result


def _waiting(record: JobRecord) -> str:
    if record.status.value == "pending":
        return "still pending: no adapter claimed it"
    return f"still {record.status.value} on {record.worker or 'an adapter'}"


def _cancel(gw: Gateways, record: JobRecord) -> JobRecord:
    """End a canary that ran out of time (best effort: it is reported either way)."""
    from gpuctl.services.jobs import cancel_job

    try:
        return cancel_job(gw, record.task_id).record
    except GpuctlError:
        return record


def _clean_up(gw: Gateways, record: JobRecord, result: CanaryResult) -> None:
    """Delete the canary's input upload and its result object (both its own: nothing else refers to them)."""
    from gpuctl.aws.s3 import parse_s3_uri

    uris = [str((record.request or {}).get("image_url") or "")]
    if record.status.value == "completed":
        uris.append(record.result_s3_uri or "")
    for uri in uris:
        if not uri.startswith("s3://"):
            continue
        try:
            gw.store.delete(*parse_s3_uri(uri))
            result.cleaned_up.append(uri)
        except GpuctlError as exc:
            result.cleanup_errors.append(f"{uri}: {exc}")
