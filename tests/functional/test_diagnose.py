"""Why a pending job waits: the diagnosis `gpuctl status` adds, from the instance, the queue and the marker."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import boto3
import pytest

from gpuctl.models import JobRecord, JobStatus, JobType
from gpuctl.services.diagnose import diagnose_job
from tests.helpers import REGION, Resources, run_cli

MINUTE = 60.0
#: The diagnoses are made "a while later", so that the instance record moto created now is old by then (moto
#: keeps an instance's first LaunchTime; gpuctl's started-at tag says when it last started).
LATER = time.time() + 30 * MINUTE


@pytest.fixture(autouse=True)
def _no_default_amis(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto accepts any AMI id; loading its ~1,300 default AMIs takes a second per fresh backend."""
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")


def _job(gateways: Any, *, age: float, status: JobStatus = JobStatus.PENDING,
         api_path: str = JobType.CAMERA_ANGLE.api_path) -> JobRecord:
    created = LATER - age
    record = JobRecord(task_id=str(uuid.uuid4()), status=status, job_type=api_path, created_at=created,
                       updated_at=created, request={"image_url": "s3://b/in.png"})
    gateways.table.create(record)
    return record


def _queue_one(gateways: Any) -> None:
    gateways.queue.send(json.dumps({"task_id": "x", "api_path": JobType.CAMERA_ANGLE.api_path,
                                    "request_body": {"image_url": "s3://b/in.png"}}))


def _run_instance(gateways: Any, started_ago: float) -> None:
    """Start the instance and tag when it started, as every gpuctl start does."""
    from gpuctl.times import iso

    gateways.instance.start()
    gateways.instance.set_tags({"gpuctl:started-at": iso(LATER - started_ago) or ""})


def test_a_job_on_a_stopped_instance_is_diagnosed_at_once(gateways: Any) -> None:
    """However young the job, a stopped instance is the cause, and the message says how to start it."""
    # GIVEN a job just queued while the instance is stopped (submit --no-start)
    record = _job(gateways, age=1)
    # WHEN it is diagnosed
    why = diagnose_job(gateways, record, now=LATER)
    # THEN the cause is the stopped instance
    assert why is not None and why.code == "instance-stopped"
    assert "is stopped" in why.message and "gpuctl instance start" in why.message


def test_a_terminated_instance_will_never_run_the_job(gateways: Any) -> None:
    """A terminated instance is named as such."""
    record = _job(gateways, age=1)
    gateways.clients.ec2.terminate_instances(InstanceIds=[gateways.settings.instance_id])
    why = diagnose_job(gateways, record, now=LATER)
    assert why is not None and why.code == "instance-terminated"


@pytest.mark.parametrize(("marker", "expected"), [
    pytest.param(None, "no adapter has reported polling", id="no-marker"),
    pytest.param(("stopped", 5 * MINUTE), "reported that it stopped 5 min ago", id="adapter-stopped"),
    pytest.param(("running", 3 * MINUTE), "last reported 3 min ago", id="adapter-silent"),
])
def test_nothing_polling_a_running_instance_is_said(gateways: Any, aws: Resources,
                                                    marker: tuple[str, float] | None, expected: str) -> None:
    """Pending for minutes, instance running for minutes, a message waiting and no adapter polling."""
    # GIVEN an instance running for 10 minutes, a job waiting 4 minutes with its message in the queue
    _run_instance(gateways, started_ago=10 * MINUTE)
    record = _job(gateways, age=4 * MINUTE)
    _queue_one(gateways)
    if marker is not None:
        gateways.table.note_adapter("gpu-box:1", state=marker[0], jobs_in_hand=0, now=LATER - marker[1])
    # WHEN it is diagnosed
    why = diagnose_job(gateways, record, now=LATER)
    # THEN it says that nothing polls the queue, and why it thinks so
    assert why is not None and why.code == "nothing-polling", why
    assert why.message.startswith("Nothing is polling the queue: the job has waited 4 min")
    assert "1 message waiting" in why.message and expected in why.message
    assert "journalctl -u gpuctl-adapter" in why.message


@pytest.mark.parametrize("case", ["adapter-fresh", "busy-without-marker", "job-young", "instance-just-started"])
def test_no_diagnosis_while_the_job_waits_for_a_good_reason(gateways: Any, aws: Resources, case: str) -> None:
    """A polling adapter, one busy with other messages, a young job, or a booting instance: nothing to say."""
    # GIVEN a running instance and a waiting job, in the situation of `case`
    _run_instance(gateways, started_ago=30 if case == "instance-just-started" else 10 * MINUTE)
    record = _job(gateways, age=30 if case == "job-young" else 4 * MINUTE)
    _queue_one(gateways)
    if case == "adapter-fresh":
        gateways.table.note_adapter("gpu-box:1", state="running", jobs_in_hand=2, now=LATER - 10)
    if case == "busy-without-marker":
        _queue_one(gateways)
        assert gateways.queue.receive(max_messages=1, wait_seconds=0)  # an adapter holds one
    # WHEN it is diagnosed
    # THEN there is no diagnosis
    assert diagnose_job(gateways, record, now=LATER) is None


@pytest.mark.parametrize("status", [JobStatus.PROCESSING, JobStatus.COMPLETED])
def test_only_pending_gpu_jobs_are_looked_into(gateways: Any, status: JobStatus) -> None:
    """Other statuses, and other services' tasks sharing the table, get no diagnosis (and no extra reads)."""
    assert diagnose_job(gateways, _job(gateways, age=600, status=status), now=LATER) is None
    assert diagnose_job(gateways, _job(gateways, age=600, api_path="/api/v1/face-mask/tasks"), now=LATER) is None


def test_a_diagnosis_that_cannot_be_made_is_no_diagnosis(aws: Resources) -> None:
    """Without an instance id configured the status still works; it just cannot say why."""
    from gpuctl.services.context import Gateways
    from gpuctl.settings import Settings

    gateways = Gateways(Settings(**{**aws.settings_kwargs(), "instance_id": None}))
    assert diagnose_job(gateways, _job(gateways, age=600), now=LATER) is None


@pytest.mark.server
def test_status_says_why_on_stderr_and_in_json(server_aws: Resources) -> None:
    """`gpuctl status` of a job waiting on a stopped instance: a note on stderr, `diagnosis` in JSON."""
    # GIVEN a pending job on the stopped instance
    from gpuctl.aws.dynamo import JobTable

    ddb = boto3.client("dynamodb", region_name=REGION, endpoint_url=server_aws.endpoint_url)
    now = time.time()
    record = JobRecord(task_id=str(uuid.uuid4()), status=JobStatus.PENDING, job_type=JobType.CAMERA_ANGLE.api_path,
                       created_at=now, updated_at=now, request={"image_url": "s3://b/in.png"})
    JobTable(ddb, server_aws.table_name).create(record)

    # WHEN its status is shown as text and as JSON
    text = run_cli(["status", record.task_id], server_aws.env())
    doc = run_cli(["status", record.task_id, "--output", "json"], server_aws.env())

    # THEN both say why it waits; stdout stays data, the document as its schema says
    import jsonschema

    from gpuctl import schemas

    assert text.returncode == 0 and "pending" in text.stdout
    assert "Why it waits: The GPU instance" in text.stderr and "is stopped" in text.stderr
    assert doc.returncode == 0
    assert json.loads(doc.stdout)["diagnosis"]["code"] == "instance-stopped"
    jsonschema.validate(json.loads(doc.stdout), schemas.definition("status"))


def test_a_polling_adapter_answers_without_asking_ec2(aws: Resources) -> None:
    """An adapter reported polling a moment ago: no cause, and EC2 is not asked (an instance id that does not
    exist would otherwise be diagnosed as missing)."""
    from gpuctl.services.context import Gateways
    from gpuctl.settings import Settings

    # GIVEN gateways pointed at an instance that does not exist, and a fresh adapter report
    gateways = Gateways(Settings(**{**aws.settings_kwargs(), "instance_id": "i-0000000000000dead"}))
    record = _job(gateways, age=10 * MINUTE)
    gateways.table.note_adapter("w-1", state="running", jobs_in_hand=1, now=LATER - 5)
    # WHEN / THEN
    assert diagnose_job(gateways, record, now=LATER) is None
    # AND once the report is old, EC2 is asked again and the missing instance is the cause
    assert (why := diagnose_job(gateways, record, now=LATER + 5 * MINUTE)) is not None
    assert why.code == "instance-missing"
