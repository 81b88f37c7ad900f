"""`gpuctl instance decisions`: the scheduler's decision records read back from its log group (moto's server).

The Lambda runtime writes what the handler logs inside its own line format; local mode's scheduler loop writes
the bare record to the same log group in the emulator. Both are read here as a user runs the CLI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import pytest

import handler
from tests.helpers import REGION, Resources, deploy_fresh_stack, run_cli

pytestmark = [pytest.mark.server, pytest.mark.filterwarnings("ignore:Tried to parse AWS:UserWarning")]

GROUP = "/aws/lambda/gpuctl-gpu-scheduler"


def _logs(res: Resources) -> Any:
    return boto3.client("logs", region_name=REGION, endpoint_url=res.endpoint_url,
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def _record(res: Resources, now: float) -> dict[str, Any]:
    """A real decision record: the handler run once against the emulator."""
    config = handler.SchedulerConfig.from_env({"QUEUE_URL": res.queue_url, "TABLE_NAME": res.table_name,
                                               "INSTANCE_ID": res.instance_id, "AWS_DEFAULT_REGION": REGION})
    return handler.run_once(config, handler.make_clients(REGION, res.endpoint_url), now=now, trigger="schedule")


def test_decisions_are_read_from_the_lambdas_log_lines(server_aws: Resources) -> None:
    """Records inside the runtime's Text and JSON line formats are found; other lines and old ones are not."""
    # GIVEN the log group as the Lambda runtime fills it
    logs = _logs(server_aws)
    logs.create_log_group(logGroupName=GROUP)
    logs.create_log_stream(logGroupName=GROUP, logStreamName="2026/12/01/[$LATEST]abc")
    now = time.time()
    first, second = _record(server_aws, now - 600), _record(server_aws, now - 300)
    old = _record(server_aws, now - 3 * 3600)
    ms = int(now * 1000)
    events = [
        (ms - 3 * 3600_000, f"[INFO]\t2026-12-01T06:00:00.000Z\treq-0\t{json.dumps(old)}\n"),
        (ms - 600_000, "START RequestId: req-1 Version: $LATEST\n"),
        (ms - 600_000 + 1, f"[INFO]\t2026-12-01T08:50:00.000Z\treq-1\t{json.dumps(first)}\n"),
        (ms - 600_000 + 2, "END RequestId: req-1\n"),
        (ms - 300_000, json.dumps({"timestamp": "x", "level": "ERROR", "message": json.dumps(second)})),
        (ms - 300_000 + 1, "REPORT RequestId: req-2 Duration: 812.03 ms scheduler.decision mentioned in passing\n"),
    ]
    logs.put_log_events(logGroupName=GROUP, logStreamName="2026/12/01/[$LATEST]abc",
                        logEvents=[{"timestamp": t, "message": m} for t, m in events])
    env = {**server_aws.env(), "GPUCTL_SCHEDULER_LOG_GROUP": GROUP}
    # WHEN the last hour's decisions are asked for
    doc = json.loads(run_cli(["instance", "decisions", "--since", "1h", "--output", "json"], env).stdout)
    text = run_cli(["instance", "decisions"], env)
    # THEN exactly the two recent records come back, oldest first, with their facts
    assert [d["decided_at"] for d in doc] == [pytest.approx(now - 600), pytest.approx(now - 300)]
    assert doc[0]["facts"] == first["facts"] and doc[0]["decided_at_iso"].endswith("Z")
    assert {d["code"] for d in doc} == {first["code"]}
    assert text.returncode == 0, text.stderr
    assert first["outcome"] in text.stdout and "schedule" in text.stdout
    wider = json.loads(run_cli(["instance", "decisions", "--since", "4h", "--output", "json"], env).stdout)
    assert len(wider) == 3


def test_no_log_group_says_how_to_set_one(server_aws: Resources) -> None:
    """Without a configured log group or a stack that names one: one sentence, exit 2."""
    proc = run_cli(["instance", "decisions"], server_aws.env())
    assert proc.returncode == 2
    assert "No scheduler log group is configured" in proc.stderr and "Traceback" not in proc.stderr
    bad = run_cli(["instance", "decisions", "--since", "soon"],
                  {**server_aws.env(), "GPUCTL_SCHEDULER_LOG_GROUP": GROUP})
    assert bad.returncode == 2 and "--since 'soon' is not a duration" in bad.stderr


def test_local_scheduler_writes_decisions_where_the_cli_reads_them(moto_server: str, tmp_path: Path,
                                                                   clean_env: Path) -> None:
    """Local mode: the scheduler loop (a real process) logs its records to the emulator's log group."""
    # GIVEN the stack deployed into the emulator (gpuctl deploy's own service), its profile recorded
    _settings, _clients, result = deploy_fresh_stack(moto_server)
    instance_id = result.outputs["InstanceId"]
    assert result.settings_written["scheduler_log_group"] == GROUP
    # WHEN the local scheduler loop runs a few ticks
    proc = subprocess.Popen([sys.executable, "-m", "gpuctl.local.scheduler", "--endpoint-url", moto_server,
                             "--function-name", "gpuctl-gpu-scheduler", "--interval", "0.5"],
                            env={**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        found: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not found:
            time.sleep(1)
            shown = run_cli(["instance", "decisions", "--output", "json"], {})
            assert shown.returncode == 0, shown.stderr
            found = json.loads(shown.stdout)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    # THEN the CLI reads the loop's records: the handler's own, for the deployed instance
    assert found, stderr[-2000:]
    assert found[0]["event"] == "scheduler.decision"
    assert found[0]["instance_id"] == instance_id
    assert found[0]["log_stream"].startswith("local/")
