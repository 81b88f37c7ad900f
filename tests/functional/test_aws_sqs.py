"""JobQueue: counts, dead-lettering and redrive (moto in-process and, for StartMessageMoveTask, its server)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gpuctl.errors import NotFound
from tests.helpers import MAX_RECEIVE, Resources


def test_stats_count_visible_in_flight_and_delayed(gateways: Any) -> None:
    """stats reports visible, in-flight (received) and delayed messages and the redrive policy."""
    queue = gateways.queue
    for body in ("a", "b", "c"):
        queue.send(body)
    queue.send("later", delay_seconds=60)
    received = queue.receive(max_messages=1, wait_seconds=0)
    stats = queue.stats()
    assert len(received) == 1 and received[0].receive_count == 1
    assert (stats.visible, stats.in_flight, stats.delayed) == (2, 1, 1)
    assert (stats.dlq_visible, stats.max_receive_count, stats.visibility_timeout) == (0, MAX_RECEIVE, 300)
    assert stats.busy


def test_message_dead_letters_after_max_receives_and_redrive_by_copy_returns_it(gateways: Any) -> None:
    """After maxReceiveCount receives the message is in the DLQ; the copy redrive brings it back intact."""
    # GIVEN a message received MAX_RECEIVE times and never deleted
    queue = gateways.queue
    body = json.dumps({"task_id": "t1", "api_path": "/api/v1/camera-angle/jobs", "request_body": {}})
    queue.send(body)
    for _ in range(MAX_RECEIVE):
        (message,) = queue.receive(wait_seconds=0)
        queue.change_visibility(message.receipt_handle, 0)
    assert queue.receive(wait_seconds=0) == []
    assert queue.stats().dlq_visible == 1
    # WHEN it is redriven by receive/send/delete
    result = queue.redrive(max_messages=10)
    # THEN it is back in the queue, byte for byte, and the DLQ is empty
    assert (result.moved, result.method) == (1, "receive-send-delete")
    (back,) = queue.receive(wait_seconds=0)
    assert back.body == body
    assert queue.stats().dlq_visible == 0


@pytest.mark.server
def test_redrive_falls_back_when_message_move_task_is_missing(server_aws: Resources) -> None:
    """moto's server answers StartMessageMoveTask with HTTP 500: redrive falls back to copying."""
    from gpuctl.services.context import Gateways
    from gpuctl.settings import Settings

    gw = Gateways(Settings(**server_aws.settings_kwargs(), max_attempts=1))
    dlq = gw.clients.sqs
    for i in range(12):
        dlq.send_message(QueueUrl=server_aws.dlq_url, MessageBody=f"m{i}")
    result = gw.queue.redrive()
    assert (result.moved, result.method) == (12, "receive-send-delete")
    stats = gw.queue.stats()
    assert (stats.visible, stats.dlq_visible) == (12, 0)


def test_send_batch_and_purge(gateways: Any) -> None:
    """send_batch queues every entry (10 a request) and purge empties the queue."""
    queue = gateways.queue
    assert queue.send_batch([(f"k{i}", f"body {i}") for i in range(23)]) == {}
    assert queue.stats().visible == 23
    queue.purge()
    assert queue.stats().visible == 0


def test_missing_queue_is_not_found(gateways: Any, aws: Resources) -> None:
    """A queue URL that does not exist gives NotFound naming it."""
    from gpuctl.aws.sqs import JobQueue

    url = aws.queue_url.rsplit("/", 1)[0] + "/nope"
    with pytest.raises(NotFound, match="nope does not exist"):
        JobQueue(gateways.clients.sqs, url).stats()


def test_redrive_without_a_dlq_is_a_config_error(gateways: Any) -> None:
    """A queue with no redrive policy and no DLQ setting: redrive says how to configure one."""
    from gpuctl.aws.sqs import JobQueue
    from gpuctl.errors import ConfigError

    url = gateways.clients.sqs.create_queue(QueueName="plain")["QueueUrl"]
    with pytest.raises(ConfigError, match="GPUCTL_DLQ_URL"):
        JobQueue(gateways.clients.sqs, url).redrive()
