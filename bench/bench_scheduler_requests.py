"""What one scheduler run costs (issue 10): AWS requests and index items read, against the number of jobs.

Run:  .venv/bin/python bench/bench_scheduler_requests.py

In-process moto. For tables holding 0, 1,000 and 10,000 finished GPU jobs (plus 2,000 tasks of another
service), the first run of the real handler on the idle running instance is counted with a botocore hook:
requests by operation, and the items the status-index queries evaluated (ScannedCount).

"marker": a gpuctl adapter keeps the activity marker (that run stops the instance: fence, StopInstances,
tags). "fallback": no marker (the running system's adapter: the run starts watching and keeps the instance).
Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "lambda"))
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"


def main() -> int:
    import boto3
    from moto import mock_aws

    import handler
    from tests.helpers import REGION, create_resources

    rows = []
    for finished in (0, 1000, 10000):
        for mode in ("marker", "fallback"):
            with mock_aws():
                res = create_resources(boto3.session.Session(), instance_state="running")
                ddb = boto3.client("dynamodb", region_name=REGION)
                now = time.time() + 86400
                items = [{"task_id": {"S": f"gpu-{i}"}, "status": {"S": "completed"},
                          "job_type": {"S": "/api/v1/camera-angle/jobs"}, "created_at": {"N": str(now - 90000 + i)},
                          "updated_at": {"N": str(now - 80000)}, "finished_at": {"N": str(now - 80000)}}
                         for i in range(finished)]
                items += [{"task_id": {"S": f"cpu-{i}"}, "status": {"S": "pending" if i % 2 else "processing"},
                           "job_type": {"S": "/api/v1/face-mask/tasks"}, "created_at": {"N": str(now - 5000 + i)},
                           "updated_at": {"N": str(now - 5000)}} for i in range(2000)]
                if mode == "marker":
                    items.append({"task_id": {"S": "gpuctl#activity"}, "adapter_seen_at": {"N": str(now - 70000)},
                                  "adapter_state": {"S": "running"}, "last_finished_at": {"N": str(now - 80000)},
                                  "scheduler_watch_since": {"N": str(now - 90000)}})
                for i in range(0, len(items), 25):
                    ddb.batch_write_item(RequestItems={res.table_name: [{"PutRequest": {"Item": it}}
                                                                        for it in items[i:i + 25]]})
                config = handler.SchedulerConfig.from_env({"QUEUE_URL": res.queue_url, "DLQ_URL": res.dlq_url,
                                                           "TABLE_NAME": res.table_name,
                                                           "INSTANCE_ID": res.instance_id})
                clients = handler.make_clients(REGION)
                calls: Counter[str] = Counter()
                scanned = [0]

                def count(model: Any, calls: Counter[str] = calls, **_: Any) -> None:
                    calls[model.name] += 1

                def after(model: Any, parsed: Any, scanned: list[int] = scanned, **_: Any) -> None:
                    if model.name == "Query":
                        scanned[0] += int(parsed.get("ScannedCount", 0))

                for client in (clients.ec2, clients.sqs, clients.dynamodb):
                    client.meta.events.register("before-call", count)
                    client.meta.events.register("after-call", after)
                started = time.perf_counter()
                record = handler.run_once(config, clients, now=now)
                elapsed = time.perf_counter() - started
                rows.append((finished, mode, sum(calls.values()), dict(sorted(calls.items())), scanned[0],
                             record["code"], elapsed))
    print("| finished GPU jobs (+2,000 CPU tasks) | activity from | requests per run | by operation "
          "| index items read | decision |")
    print("|---|---|---|---|---|---|")
    for finished, mode, total, by_op, scanned, code, _elapsed in rows:
        ops = ", ".join(f"{k} {v}" for k, v in by_op.items())
        print(f"| {finished:,} | {mode} | {total} | {ops} | {scanned:,} | {code} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
