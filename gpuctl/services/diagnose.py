"""Why a job waits, where gpuctl can tell: the instance's state, the queue and the activity marker.

`gpuctl status` asks :func:`diagnose_job` for every job it shows; only a ``pending`` GPU job is looked into, so
the status of anything else costs nothing extra, and a pending one while an adapter polls costs one read of the
activity marker (no EC2 call). The causes it knows:

* ``instance-stopped``: the GPU instance is stopped or stopping, so nothing can take the job (however young);
* ``instance-terminated`` / ``instance-missing``: the configured instance will never run anything;
* ``nothing-polling``: the job has waited ``stuck_after`` seconds (default 2 min) on an instance that has run at
  least as long, and no adapter polls the queue: the activity marker's ``adapter_seen_at`` is older than a
  minute or says the adapter stopped. An adapter that does not write the marker (an older one) leaves only
  the queue as evidence: messages visible while none is in flight mean that nothing takes them.

A job that waits behind others on a working adapter, or on an instance still booting, gets no diagnosis.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpuctl.errors import GpuctlError, NotFound
from gpuctl.models import JobStatus
from gpuctl.times import ago, parse_time

if TYPE_CHECKING:
    from gpuctl.aws.dynamo import Activity
    from gpuctl.aws.ec2 import InstanceInfo
    from gpuctl.models import JobRecord
    from gpuctl.services.context import Gateways

__all__ = ["Diagnosis", "diagnose_job"]

log = logging.getLogger(__name__)

_STARTED_AT_TAG = "gpuctl:started-at"  # written by every start gpuctl makes (the CLI, submit, the scheduler)


@dataclass(frozen=True)
class Diagnosis:
    """A known cause, as one sentence that ends with what to run."""

    code: str
    message: str

    def document(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


def diagnose_job(gw: Gateways, record: JobRecord, *, now: float | None = None) -> Diagnosis | None:
    """Why ``record`` is still pending, when gpuctl can tell; None otherwise (or for any other status).

    AWS errors while looking are logged and give no diagnosis: the status itself was read, and a hint must
    never turn it into a failure.
    """
    if record.status is not JobStatus.PENDING or not record.is_gpu_job:
        return None
    at = time.time() if now is None else now
    try:
        return _diagnose(gw, record, at)
    except GpuctlError as exc:
        log.info("diagnose.unavailable", extra={"task_id": record.task_id, "error": str(exc)})
        return None


def _diagnose(gw: Gateways, record: JobRecord, now: float) -> Diagnosis | None:
    # The marker first (the table's own client): an adapter that reported polling within a minute, with no stop
    # fenced since, means the instance runs and takes work: no cause to tell, and no EC2 client to build (the
    # one check submit also trusts to skip EC2). A hard stop in that last minute is told once the report ages.
    activity = gw.table.read_activity()
    if activity.adapter_fresh(now):
        return None
    try:
        info = gw.instance.describe()
    except NotFound:
        return Diagnosis("instance-missing", f"The GPU instance {gw.settings.instance_id} does not exist, so nothing "
                                             "will run this job: point instance_id at your GPU instance "
                                             "(`gpuctl config show`, `gpuctl deploy --instance-id …`).")
    state = info.state
    if state in ("stopped", "stopping"):
        return Diagnosis("instance-stopped",
                         f"The GPU instance {info.instance_id} is {state}, so nothing runs this job until it starts: "
                         "`gpuctl instance start --wait` (the scheduler also starts it on its next run; "
                         "`gpuctl instance why-stopped` says who stopped it).")
    if state in ("terminated", "shutting-down"):
        return Diagnosis("instance-terminated",
                         f"The GPU instance {info.instance_id} is {state}: it will never run this job. Point "
                         "instance_id at a live instance (`gpuctl config set instance_id …`).")
    if state not in ("running", "pending"):
        return None
    stuck_after = gw.settings.stuck_after
    started = _last_start(info)
    if now - record.created_at < stuck_after or (started is not None and now - started < stuck_after):
        return None  # not waiting long, or the instance is still booting
    return _nothing_polling(gw, record, info, started, now, activity)


def _nothing_polling(gw: Gateways, record: JobRecord, info: InstanceInfo, started: float | None,
                     now: float, activity: Activity) -> Diagnosis | None:
    stats = gw.queue.stats()
    seen_at = activity.adapter_seen_at
    if seen_at is None:
        # No adapter has written the marker: only the queue can tell. A message waiting while none is in
        # flight means that nothing takes them; with messages in flight an adapter may just be busy.
        if stats.visible == 0 or stats.in_flight > 0:
            return None
        adapter = "no adapter has reported polling"
    else:
        who = f"the adapter {activity.adapter_worker}" if activity.adapter_worker else "the adapter"
        did = "reported that it stopped" if activity.adapter_state == "stopped" else "last reported"
        adapter = f"{who} {did} {ago(seen_at, now)}"
    running = f" for {_duration(now - started)}" if started is not None else ""
    waiting = f"{stats.visible} message{'s' if stats.visible != 1 else ''} waiting"
    return Diagnosis("nothing-polling",
                     f"Nothing is polling the queue: the job has waited {_duration(now - record.created_at)}, "
                     f"the GPU instance {info.instance_id} has been running{running} with {waiting} in the queue, "
                     f"and {adapter}. Look at the adapter on the instance (`sudo journalctl -u gpuctl-adapter -n 50`"
                     "; restart it with `sudo systemctl restart gpuctl-adapter`; in local mode `gpuctl local status`"
                     " and `gpuctl local up`).")


def _last_start(info: InstanceInfo) -> float | None:
    """When the instance last started: its LaunchTime (the last start on AWS), or gpuctl's tag if later
    (emulators keep the first launch time)."""
    times = [t for t in (info.launch_time.timestamp() if info.launch_time else None,
                         parse_time(info.tags.get(_STARTED_AT_TAG))) if t is not None]
    return max(times) if times else None


def _duration(seconds: float) -> str:
    return "a few seconds" if seconds < 5 else ago(0.0, max(0.0, seconds)).removesuffix(" ago")
