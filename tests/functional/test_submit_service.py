"""The submit use case against moto in-process: ordering, nothing half-written, idempotency, batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from botocore.stub import Stubber

from gpuctl.errors import InstanceNotStarted, NotFound, UsageError
from gpuctl.inputs import ImageLimits
from gpuctl.models import JobMessage, JobStatus, JobType
from gpuctl.services.submit import draft_job, submit_batch, submit_draft
from tests.helpers import make_image, png_bytes

MB = 1024 * 1024
LIMITS = ImageLimits(MB, 40_000_000, 12000)
LIMITS20 = ImageLimits(20 * MB, 40_000_000, 12000)
S3_IN = "s3://gpuctl-test-bucket/in.jpg"


@pytest.fixture(autouse=True)
def _input_object(request: pytest.FixtureRequest) -> None:
    """The s3:// input the tests submit exists (submit checks it with a HeadObject)."""
    if "gateways" in request.fixturenames:
        gw = request.getfixturevalue("gateways")
        gw.store.put_bytes(png_bytes(), gw.settings.bucket, "in.jpg", content_type="image/png")


def _messages(gateways) -> list[dict]:
    got = gateways.clients.sqs.receive_message(QueueUrl=gateways.settings.queue_url, MaxNumberOfMessages=10,
                                               WaitTimeSeconds=0)
    return [json.loads(m["Body"]) for m in got.get("Messages", [])]


def test_submit_local_image_uploads_records_queues_and_starts(gateways, tmp_path: Path) -> None:
    """A local image is uploaded under inputs/, recorded pending, queued, and the instance started."""
    # GIVEN a real image on disk and a stopped instance
    image = make_image(tmp_path / "photo.png")
    draft = draft_job(JobType.CAMERA_ANGLE, str(image), {"vertical": 2}, limits=LIMITS20)
    # WHEN it is submitted
    result = submit_draft(gateways, draft)
    # THEN the record, the message and the upload agree
    record = gateways.table.get(result.record.task_id)
    assert record.status is JobStatus.PENDING
    assert record.job_type == "/api/v1/camera-angle/jobs"
    assert record.request["image_url"].startswith(f"s3://{gateways.settings.bucket}/inputs/{record.task_id}/")
    (message,) = _messages(gateways)
    assert message["task_id"] == record.task_id
    assert message["api_path"] == "/api/v1/camera-angle/jobs"
    assert message["request_body"] == record.request
    assert message["request_body"]["vertical"] == 2 and message["request_body"]["steps"] == 8
    key = record.request["image_url"].split("/", 3)[3]
    assert gateways.store.size(gateways.settings.bucket, key) == image.stat().st_size
    assert result.instance is not None and result.instance.action == "started"
    assert gateways.instance.describe().state == "running"


def test_seed_adapter_reads_only_the_three_contract_fields(gateways) -> None:
    """A message gpuctl writes is processable by a reader that knows only task_id/api_path/request_body."""
    draft = draft_job(JobType.QWEN_IMAGE_EDIT, S3_IN, {"prompt": "sketch"}, limits=LIMITS)
    result = submit_draft(gateways, draft, start_instance=False)
    (message,) = _messages(gateways)
    seed_view = {k: message[k] for k in ("task_id", "api_path", "request_body")}
    assert seed_view["task_id"] == result.record.task_id
    decoded = JobMessage.from_json(json.dumps(seed_view)).request()
    assert decoded.to_body() == message["request_body"]
    assert message["request_body"]["sampler_name"] == "sa_solver"


def test_idempotency_key_returns_the_same_job_and_queues_nothing_new(gateways) -> None:
    """Submitting twice with one key gives one job and one message."""
    draft = draft_job(JobType.QWEN_IMAGE_EDIT, S3_IN, {"prompt": "sketch"}, limits=LIMITS)
    first = submit_draft(gateways, draft, idempotency_key="ci-run-42", start_instance=False)
    second = submit_draft(gateways, draft, idempotency_key="ci-run-42", start_instance=False)
    assert second.reused and not first.reused
    assert second.record.task_id == first.record.task_id
    assert len(_messages(gateways)) == 1


def test_enqueue_failure_marks_the_record_failed(gateways) -> None:
    """When the message cannot be queued the record ends failed with the reason (no orphan pending)."""
    # GIVEN a queue URL that does not exist
    gateways.queue.queue_url = gateways.settings.queue_url.replace("gpu_tasks_queue", "missing")
    draft = draft_job(JobType.QWEN_IMAGE_EDIT, S3_IN, {"prompt": "sketch"}, limits=LIMITS)
    # WHEN it is submitted THEN the error surfaces
    with pytest.raises(NotFound, match="does not exist"):
        submit_draft(gateways, draft, start_instance=False)
    # AND the only record is failed with the reason
    (failed,) = list(gateways.table.query_status(JobStatus.FAILED))
    assert "Failed to queue the job" in (failed.error_message or "")
    assert list(gateways.table.query_status(JobStatus.PENDING)) == []


def test_capacity_error_keeps_the_job_queued_with_a_warning(gateways) -> None:
    """InsufficientInstanceCapacity (which moto cannot produce) is a warning, not a failure."""
    ec2 = gateways.clients.ec2
    with Stubber(ec2) as stub:
        stub.add_client_error("start_instances", service_error_code="InsufficientInstanceCapacity",
                              service_message="We currently do not have sufficient g5.xlarge capacity.")
        draft = draft_job(JobType.QWEN_IMAGE_EDIT, S3_IN, {"prompt": "x"}, limits=LIMITS)
        result = submit_draft(gateways, draft)
    assert result.instance is not None and result.instance.action == "failed"
    assert "InsufficientInstanceCapacity" in (result.instance.warning or "")
    assert len(_messages(gateways)) == 1


def test_capacity_error_with_require_instance_is_an_error_but_job_stays_queued(gateways) -> None:
    """--require-instance turns the start failure into an exit-4 error that names the queued job; the job itself
    is not lost."""
    with Stubber(gateways.clients.ec2) as stub:
        stub.add_client_error("start_instances", service_error_code="InsufficientInstanceCapacity")
        draft = draft_job(JobType.QWEN_IMAGE_EDIT, S3_IN, {"prompt": "x"}, limits=LIMITS)
        result = submit_draft(gateways, draft, require_instance=True)
    assert isinstance(result.instance_error, InstanceNotStarted) and result.instance_error.exit_code == 4
    assert f"Job {result.record.task_id} is queued" in str(result.instance_error)
    assert "InsufficientInstanceCapacity" in str(result.instance_error)
    assert len(_messages(gateways)) == 1


def test_a_polling_adapter_means_no_ec2_call_at_all(gateways) -> None:
    """When the activity marker says an adapter polled within a minute, submit builds no EC2 client."""
    import time

    # GIVEN an adapter that reported itself running a second ago
    gateways.table.note_adapter("gpu-1:42", state="running", jobs_in_hand=0, now=time.time() - 1)
    draft = draft_job(JobType.QWEN_IMAGE_EDIT, S3_IN, {"prompt": "x"}, limits=LIMITS)
    # WHEN a job is submitted
    result = submit_draft(gateways, draft, require_instance=True)
    # THEN it is queued, the instance counts as running, and EC2 was never touched
    assert result.adapter_polling and result.instance is not None and result.instance.action == "already-running"
    assert result.instance_error is None
    assert "ec2" not in vars(gateways.clients) and "instance" not in vars(gateways)
    assert len(_messages(gateways)) == 1
    assert gateways.table.read_activity().last_submit_at is not None


def test_a_stale_or_fenced_adapter_falls_back_to_ec2(gateways) -> None:
    """An adapter seen 2 minutes ago, or one a stop was fenced after, does not count: the instance is started."""
    import time

    draft = draft_job(JobType.QWEN_IMAGE_EDIT, S3_IN, {"prompt": "x"}, limits=LIMITS)
    gateways.table.note_adapter("gpu-1:42", state="running", jobs_in_hand=0, now=time.time() - 120)
    stale = submit_draft(gateways, draft)
    assert not stale.adapter_polling and stale.instance is not None and stale.instance.action == "started"
    gateways.table.note_adapter("gpu-1:42", state="running", jobs_in_hand=0, now=time.time() - 2)
    gateways.table.note_stop(now=time.time() - 1)
    fenced = submit_draft(gateways, draft)
    assert not fenced.adapter_polling and fenced.instance is not None


def _count_calls(gateways) -> dict[str, int]:
    """Count every AWS operation the gateways' clients make from now on (observed, not replaced)."""
    calls: dict[str, int] = {}

    def count(model, **_):
        calls[model.name] = calls.get(model.name, 0) + 1

    for name in ("dynamodb", "sqs", "s3", "ec2"):
        getattr(gateways.clients, name).meta.events.register("before-call.*.*", count)
    return calls


def _polling_adapter(gateways, notes) -> None:
    """An adapter that reported itself polling a second ago, and a first submit that saw it (its own note)."""
    import time

    gateways.table.note_adapter("gpu-1:42", state="running", jobs_in_hand=0, now=time.time() - 1)
    draft = draft_job(JobType.QWEN_IMAGE_EDIT, S3_IN, {"prompt": "x"}, limits=LIMITS)
    first = submit_draft(gateways, draft, notes=notes)
    assert first.adapter_polling and notes.polling(time.time()) is not None


def test_a_long_lived_submitter_makes_two_requests_a_job_while_an_adapter_polls(gateways) -> None:
    """With coalesced notes, a submit while an adapter polls writes its record and its message only; one marker
    write goes out at once and then at most one an interval (60 s here), covering the jobs queued since the one
    before; closing the notes makes the write still due."""
    from gpuctl.services.notes import SubmitNotes

    notes = SubmitNotes(gateways, interval=60.0)
    _polling_adapter(gateways, notes)
    before = gateways.table.read_activity().last_submit_at
    # WHEN ten more jobs are submitted
    calls = _count_calls(gateways)
    draft = draft_job(JobType.QWEN_IMAGE_EDIT, S3_IN, {"prompt": "x"}, limits=LIMITS)
    results = [submit_draft(gateways, draft, require_instance=True, notes=notes) for _ in range(10)]
    notes.close()
    # THEN each is recorded pending and queued with two requests (plus the s3:// input's HeadObject, which an
    # https:// input does not make), two marker writes cover them all (the first at once, the second at close),
    # and EC2 is never asked
    assert calls == {"HeadObject": 10, "PutItem": 10, "SendMessage": 10, "UpdateItem": 2}, calls
    assert all(r.adapter_polling and r.instance is not None and r.instance.action == "already-running"
               and r.instance_error is None for r in results)
    assert all(gateways.table.get(r.record.task_id).status == JobStatus.PENDING for r in results)
    assert len(_messages(gateways)) == 10  # (at most ten a receive: the eleventh, the first job's, is there too)
    # … and the marker's last_submit_at moved (the scheduler's stop fence depends on it)
    after = gateways.table.read_activity().last_submit_at
    assert before is not None and after is not None and after > before


def test_every_message_is_followed_by_a_marker_write_that_began_after_it(gateways) -> None:
    """Submits from eight threads at once: every SendMessage that returned is followed by a marker UpdateItem
    that began after it (the rule the scheduler's fenced stop relies on), with far fewer writes than jobs."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from gpuctl.services.notes import SubmitNotes

    notes = SubmitNotes(gateways, interval=0.05)
    _polling_adapter(gateways, notes)
    sent: list[float] = []
    marker_writes: list[float] = []
    lock = threading.Lock()

    def after_send(**_):
        with lock:
            sent.append(time.monotonic())

    def before_update(params, **_):
        if params["Key"]["task_id"]["S"] == "gpuctl#activity":
            with lock:
                marker_writes.append(time.monotonic())

    gateways.clients.sqs.meta.events.register("after-call.sqs.SendMessage", after_send)
    gateways.clients.dynamodb.meta.events.register("before-parameter-build.dynamodb.UpdateItem", before_update)
    draft = draft_job(JobType.QWEN_IMAGE_EDIT, S3_IN, {"prompt": "x"}, limits=LIMITS)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: submit_draft(gateways, draft, notes=notes), range(80)))
    notes.close()
    assert all(r.adapter_polling for r in results) and len(sent) == 80
    uncovered = [t for t in sent if not any(w > t for w in marker_writes)]
    assert uncovered == []
    assert 1 <= len(marker_writes) < 80


def test_a_coalesced_note_that_sees_a_stop_fenced_starts_the_instance(gateways) -> None:
    """A stop fenced behind the server's back: the job is accepted on the old hint, the marker write that covers
    it sees the fence and starts the instance (as a one-shot submit would), and the next submit goes the full
    way again."""
    import time

    from gpuctl.services.notes import SubmitNotes

    notes = SubmitNotes(gateways, interval=0.05)
    _polling_adapter(gateways, notes)
    gateways.clients.ec2.stop_instances(InstanceIds=[gateways.settings.instance_id])
    gateways.table.note_stop(now=time.time())
    calls = _count_calls(gateways)
    draft = draft_job(JobType.QWEN_IMAGE_EDIT, S3_IN, {"prompt": "x"}, limits=LIMITS)
    accepted = submit_draft(gateways, draft, notes=notes)
    notes.close()
    assert accepted.adapter_polling  # (on the hint: the fence was not seen yet)
    assert calls.get("StartInstances") == 1 and notes.polling(time.time()) is None
    state = gateways.clients.ec2.describe_instances(InstanceIds=[gateways.settings.instance_id])
    assert state["Reservations"][0]["Instances"][0]["State"]["Name"] in ("pending", "running")
    calls.clear()
    nxt = submit_draft(gateways, draft, notes=SubmitNotes(gateways))
    assert not nxt.adapter_polling and calls.get("UpdateItem") == 1


def test_a_failing_activity_marker_never_fails_the_submit(gateways) -> None:
    """If the marker UpdateItem is throttled (moto cannot throttle; Stubber can), the job stays queued and the
    instance is started through EC2 as before."""
    draft = draft_job(JobType.QWEN_IMAGE_EDIT, S3_IN, {"prompt": "x"}, limits=LIMITS)
    with Stubber(gateways.clients.dynamodb) as stub:
        stub.add_response("put_item", {})
        stub.add_client_error("update_item", service_error_code="ProvisionedThroughputExceededException",
                              http_status_code=400)
        result = submit_draft(gateways, draft)
    assert result.instance is not None and result.instance.action == "started"
    assert len(_messages(gateways)) == 1


class _CountingGuard:
    """A WriteGuard that reports an interrupt once ``after`` critical sections have been written."""

    def __init__(self, after: int) -> None:
        self.after, self.sections = after, 0

    @property
    def pending(self) -> bool:
        return self.sections >= self.after

    def deferred(self):
        import contextlib

        @contextlib.contextmanager
        def section():
            yield
            self.sections += 1

        return section()


def test_batch_stops_between_chunks_when_interrupted(gateways, tmp_path: Path) -> None:
    """An interrupt during the second chunk: two chunks are queued in full, the rest of the file never written."""
    rows = [{"job_type": "qwen-image-edit", "image": S3_IN, "prompt": f"edit {i}"} for i in range(130)]
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    result = submit_batch(gateways, path, start_instance=False, guard=_CountingGuard(after=2))
    assert result.interrupted and result.queued == 100 and result.unsubmitted == 30
    assert result.job_ids[:100] == [j for j in result.job_ids if j] and result.job_ids[100:] == [None] * 30
    assert len(list(gateways.table.query_status(JobStatus.PENDING))) == 100
    assert gateways.queue.stats(include_dlq=False).visible == 100


def test_batch_requests_per_job(gateways, tmp_path: Path) -> None:
    """Chunks of 50: two BatchWriteItem and five SendMessageBatch each; the s3:// input is checked once; one
    activity-marker write for the file."""
    rows = [{"job_type": "qwen-image-edit", "image": S3_IN, "prompt": f"edit {i}"} for i in range(120)]
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    calls: dict[str, int] = {}

    def count(model, **_):
        calls[model.name] = calls.get(model.name, 0) + 1

    for client in (gateways.clients.dynamodb, gateways.clients.sqs, gateways.clients.s3):
        client.meta.events.register("before-call.*.*", count)
    result = submit_batch(gateways, path, start_instance=False)
    assert result.queued == 120
    assert calls == {"HeadObject": 1, "BatchWriteItem": 5, "SendMessageBatch": 12, "UpdateItem": 1}


@pytest.mark.parametrize(
    ("kind", "image", "fields", "message"),
    [
        pytest.param("camera-angle", "missing.png", {}, "does not exist", id="missing-file"),
        pytest.param("camera-angle", "notes.txt", {}, "not an image", id="text-file"),
        pytest.param("camera-angle", "ok.png", {"vertical": 3}, "vertical should be less than or equal to 2",
                     id="vertical-3"),
        pytest.param("camera-angle", "ok.png", {"zoom": -2}, "zoom should be greater than or equal to -1",
                     id="zoom-2"),
        pytest.param("qwen-image-edit", "ok.png", {"prompt": "  "}, "prompt must not be empty", id="empty-prompt"),
        pytest.param("qwen-image-edit", "ok.png", {}, "prompt is required", id="no-prompt"),
        pytest.param("qwen-image-edit", "http://x/y.png", {"prompt": "p"}, "http:// image URLs are not accepted",
                     id="http-url"),
        pytest.param("qwen-image-edit", "s3://bucket-only", {"prompt": "p"}, "needs both a bucket and a key",
                     id="s3-no-key"),
        pytest.param("qwen-image-edit", "s3://gpuctl-test-bucket/missing.png", {"prompt": "p"}, "does not exist",
                     id="s3-missing"),
        pytest.param("qwen-image-edit", "ok.png", {"prompt": "p", "denoise": 1.5}, "denoise should be",
                     id="denoise"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(gateways, tmp_path: Path, monkeypatch, kind, image,
                                                         fields, message) -> None:
    """Every bad input is one UsageError sentence and leaves no record, message or upload behind."""
    monkeypatch.chdir(tmp_path)
    make_image(tmp_path / "ok.png")
    (tmp_path / "notes.txt").write_text("not an image\n")
    with pytest.raises(UsageError, match=message):
        draft = draft_job(JobType(kind), image, fields, limits=LIMITS)
        submit_draft(gateways, draft)
    assert _messages(gateways) == []
    for status in JobStatus:
        assert list(gateways.table.query_status(status)) == []
    assert gateways.clients.s3.list_objects_v2(Bucket=gateways.settings.bucket).get("KeyCount", 0) == 1


def test_oversized_image_is_refused(tmp_path: Path) -> None:
    """A file over the size limit is refused with the limit named."""
    image = make_image(tmp_path / "big.png", size=(256, 256))
    with pytest.raises(UsageError, match="larger than the"):
        draft_job(JobType.CAMERA_ANGLE, str(image), {}, limits=ImageLimits(100, 40_000_000, 12000))


def test_batch_submit_writes_in_batches(gateways, tmp_path: Path) -> None:
    """Thirty rows become thirty records and thirty messages with batch APIs; ids come back in order."""
    make_image(tmp_path / "a.png")
    rows = [{"job_type": "qwen-image-edit", "image": "a.png", "prompt": f"edit {i}"} for i in range(15)]
    rows += [{"job_type": "camera-angle", "image": S3_IN, "horizontal": -1} for _ in range(15)]
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = submit_batch(gateways, path, start_instance=False)
    assert len(result.job_ids) == 30 and all(result.job_ids) and not result.failures
    assert len(list(gateways.table.query_status(JobStatus.PENDING))) == 30
    first = gateways.table.get(result.job_ids[0])
    assert first.request["prompt"] == "edit 0"
    attrs = gateways.queue.stats(include_dlq=False)
    assert attrs.visible == 30


def test_batch_reports_every_bad_row_and_writes_nothing(gateways, tmp_path: Path) -> None:
    """All bad rows are listed with their row numbers; not one job is written."""
    path = tmp_path / "jobs.csv"
    path.write_text(
        "job_type,image,prompt,vertical\n"
        "qwen-image-edit,s3://b/k.png,ok,\n"
        "camera-angle,s3://b/k.png,,5\n"
        "paint,s3://b/k.png,x,\n"
        "qwen-image-edit,s3://b/k.png,,\n"
    )
    with pytest.raises(UsageError) as info:
        submit_batch(gateways, path, start_instance=False)
    text = str(info.value)
    assert "3 of 4 rows" in text
    assert "row 3: Invalid camera-angle request: vertical" in text
    assert "row 4: Unknown job type 'paint'" in text
    assert "row 5: Invalid qwen-image-edit request: prompt is required" in text
    assert _messages(gateways) == []
    assert list(gateways.table.query_status(JobStatus.PENDING)) == []


def test_batch_send_failure_marks_those_rows_failed(gateways, tmp_path: Path) -> None:
    """Rows whose messages SQS rejects are reported and their records marked failed; others stay queued."""
    # GIVEN three valid rows, and SQS refusing the second entry of the batch (moto never does; Stubber can)
    path = tmp_path / "jobs.jsonl"
    rows = [{"job_type": "qwen-image-edit", "image": S3_IN, "prompt": f"edit {i}"} for i in range(3)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with Stubber(gateways.clients.sqs) as stub:
        stub.add_response("send_message_batch", {
            "Successful": [{"Id": "0", "MessageId": "m0", "MD5OfMessageBody": "x"},
                           {"Id": "2", "MessageId": "m2", "MD5OfMessageBody": "x"}],
            "Failed": [{"Id": "1", "SenderFault": False, "Code": "InternalError", "Message": "try again"}],
        })
        # WHEN the file is submitted
        result = submit_batch(gateways, path, start_instance=False)
    # THEN row 2 is reported and its record failed; rows 1 and 3 stay pending
    assert result.job_ids[0] and result.job_ids[2] and result.job_ids[1] is None
    assert [(f.row, "InternalError" in f.message) for f in result.failures] == [(2, True)]
    (failed,) = list(gateways.table.query_status(JobStatus.FAILED))
    assert "Failed to queue" in (failed.error_message or "")
    assert len(list(gateways.table.query_status(JobStatus.PENDING))) == 2
