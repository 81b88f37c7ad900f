"""Benchmarks for the CLI (issue 2): start-up, submit latency, AWS requests per job, items read by a listing.

Run:  .venv/bin/pip install -e '.[bench]' && .venv/bin/python bench/bench_cli.py [--quick]

Everything runs against moto on 127.0.0.1 (no AWS account). Results are printed as a Markdown table to paste
into BENCHMARKS.md; nothing is timed inside the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import REGION, Resources, create_resources  # noqa: E402


def _timeit(cmd: list[str], env: dict[str, str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[:500]}")
    return times


def _fmt(times: list[float]) -> str:
    return f"{statistics.median(times) * 1000:.0f} ms (min {min(times) * 1000:.0f}, n={len(times)})"


@contextmanager
def moto_server() -> Iterator[str]:
    import logging
    import socket

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    import httpx

    # Backends are process-global in moto: a second server in this process would see the first one's state.
    httpx.post(f"http://127.0.0.1:{port}/moto-api/reset", timeout=10).raise_for_status()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "GPUCTL_"))}
    env.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION=REGION,
               GPUCTL_CONFIG_DIR=tempfile.mkdtemp(prefix="gpuctl-bench-"), NO_COLOR="1")
    return env


def bench_help(runs: int) -> list[tuple[str, str]]:
    env = _base_env()
    py = sys.executable
    rows = [("`python -c pass`", _fmt(_timeit([py, "-c", "pass"], env, runs)))]
    gpuctl = str(Path(py).with_name("gpuctl"))
    rows.append(("`gpuctl --help`", _fmt(_timeit([gpuctl, "--help"], env, runs))))
    probe = subprocess.run([py, "-c", "import sys, runpy; sys.argv=['gpuctl','--help'];\n"
                            "try:\n runpy.run_module('gpuctl', run_name='__main__')\n"
                            "except SystemExit: pass\n"
                            "print('boto3' in sys.modules, file=sys.stderr)"],
                           env=env, capture_output=True, text=True, check=False)
    rows.append(("boto3 imported by `gpuctl --help`", probe.stderr.strip().splitlines()[-1]))
    aws = shutil.which("aws", path=str(Path(py).parent)) or shutil.which("aws")
    if aws:
        rows.append(("`aws --version`", _fmt(_timeit([aws, "--version"], env, runs))))
    else:
        rows.append(("`aws --version`", "awscli not installed (pip install -e '.[bench]')"))
    return rows


def bench_submit(endpoint: str, res: Resources, runs: int) -> list[tuple[str, str]]:
    env = _base_env()
    env.update(res.env())
    gpuctl = str(Path(sys.executable).with_name("gpuctl"))
    cmd = [gpuctl, "submit", "qwen-image-edit", "s3://bench/in.png", "--prompt", "sketch", "-q"]
    rows = [("`gpuctl submit … s3://` (record + queue + start)", _fmt(_timeit(cmd, env, runs)))]
    aws = shutil.which("aws", path=str(Path(sys.executable).parent)) or shutil.which("aws")
    if not aws:
        rows.append(("aws CLI equivalent", "awscli not installed"))
        return rows
    item = json.dumps({"task_id": {"S": "x"}, "status": {"S": "pending"}, "job_type": {"S": "/api/v1/x/jobs"},
                       "created_at": {"N": "1"}, "updated_at": {"N": "1"}})
    calls = [
        [aws, "--endpoint-url", endpoint, "dynamodb", "put-item", "--table-name", res.table_name, "--item", item],
        [aws, "--endpoint-url", endpoint, "sqs", "send-message", "--queue-url", res.queue_url,
         "--message-body", "{}"],
        [aws, "--endpoint-url", endpoint, "ec2", "describe-instances", "--instance-ids", res.instance_id],
    ]
    totals = []
    for _ in range(runs):
        totals.append(sum(_timeit(c, env, 1)[0] for c in calls))
    rows.append(("aws CLI: put-item + send-message + describe-instances", _fmt(totals)))
    return rows


class RequestCounter:
    """Counts the HTTP requests botocore sends, by operation, with its event hooks."""

    def __init__(self) -> None:
        self.by_operation: dict[str, int] = {}
        self.items_read = 0

    def attach(self, client: Any) -> None:
        client.meta.events.register("before-call.*.*", self._before)
        client.meta.events.register("after-call.dynamodb.Query", self._query)

    def _before(self, model: Any, **_: Any) -> None:
        self.by_operation[model.name] = self.by_operation.get(model.name, 0) + 1

    def _query(self, parsed: dict[str, Any], **_: Any) -> None:
        self.items_read += int(parsed.get("ScannedCount", parsed.get("Count", 0)))

    @property
    def total(self) -> int:
        return sum(self.by_operation.values())


def _counted_gateways(res: Resources) -> tuple[Any, RequestCounter]:
    from gpuctl.services.context import Gateways
    from gpuctl.settings import Settings

    gw = Gateways(Settings(**res.settings_kwargs()))
    counter = RequestCounter()
    for name in ("sqs", "dynamodb", "ec2", "s3"):
        counter.attach(getattr(gw.clients, name))
    return gw, counter


def bench_requests(res: Resources, rows: int) -> list[tuple[str, str]]:
    from gpuctl.inputs import ImageLimits
    from gpuctl.models import JobType
    from gpuctl.services.submit import draft_job, submit_batch, submit_draft

    out = []
    gw, counter = _counted_gateways(res)
    limits = ImageLimits(1 << 20, 40_000_000, 12000)
    draft = draft_job(JobType.QWEN_IMAGE_EDIT, "s3://bench/in.png", {"prompt": "sketch"}, limits=limits)
    submit_draft(gw, draft)
    out.append(("AWS requests, single submit (s3:// input)",
                f"{counter.total} ({', '.join(f'{k} {v}' for k, v in sorted(counter.by_operation.items()))})"))
    path = Path(tempfile.mkdtemp()) / "jobs.jsonl"
    path.write_text("\n".join(json.dumps({"job_type": "qwen-image-edit", "image": "s3://bench/in.png",
                                          "prompt": f"edit {i}"}) for i in range(rows)))
    gw, counter = _counted_gateways(res)
    start = time.perf_counter()
    result = submit_batch(gw, path)
    elapsed = time.perf_counter() - start
    assert len([j for j in result.job_ids if j]) == rows, result.failures[:3]
    ops = ", ".join(f"{k} {v}" for k, v in sorted(counter.by_operation.items()))
    out.append((f"AWS requests, `submit --from` {rows} rows",
                f"{counter.total} = {counter.total / rows:.3f} per job ({ops}); {elapsed:.1f} s"))
    return out


def bench_listing(sizes: list[int]) -> list[tuple[str, str]]:
    """Items read by `jobs list --status pending --limit 50` as the table grows (moto in-process)."""
    import boto3
    from moto import mock_aws

    from gpuctl.services.jobs import list_jobs  # written for issue 2's `jobs list`

    out = []
    for size in sizes:
        with mock_aws():
            res = create_resources(boto3.session.Session(region_name=REGION))
            gw, counter = _counted_gateways(res)
            _fill_table(gw, size)
            counter.by_operation.clear()
            counter.items_read = 0
            start = time.perf_counter()
            jobs = _call_list(list_jobs, gw)
            elapsed = time.perf_counter() - start
            out.append((f"`jobs list --status pending --limit 50`, {size:,} jobs in the table",
                        f"{len(jobs)} returned, {counter.items_read} items read, "
                        f"{counter.by_operation.get('Query', 0)} Query request(s), {elapsed * 1000:.0f} ms (moto)"))
    return out


def _call_list(list_jobs: Callable[..., Any], gw: Any) -> list[Any]:
    return list(list_jobs(gw, status="pending", limit=50))


def _fill_table(gw: Any, size: int) -> None:
    """Half pending, the rest spread over the other statuses, with BatchWriteItem."""
    from gpuctl.models import JobRecord, JobStatus, new_task_id

    statuses = [JobStatus.PENDING, JobStatus.COMPLETED, JobStatus.PENDING, JobStatus.FAILED]
    now = time.time()
    records = [JobRecord(task_id=new_task_id(), status=statuses[i % 4], job_type="/api/v1/camera-angle/jobs",
                         created_at=now - i, updated_at=now - i) for i in range(size)]
    unwritten = gw.table.batch_create(records)
    assert not unwritten


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer runs, 10,000 instead of 50,000 jobs")
    parser.add_argument("--runs", type=int, default=None)
    args = parser.parse_args()
    runs = args.runs or (5 if args.quick else 15)
    import boto3

    rows: list[tuple[str, str]] = []
    rows += bench_help(runs)
    with moto_server() as endpoint:
        session = boto3.session.Session(aws_access_key_id="bench", aws_secret_access_key="bench")
        res = create_resources(session, endpoint)
        rows += bench_submit(endpoint, res, runs)
    with moto_server() as endpoint:
        session = boto3.session.Session(aws_access_key_id="bench", aws_secret_access_key="bench")
        res = create_resources(session, endpoint)
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION=REGION)
        rows += bench_requests(res, 1000)
    rows += bench_listing([1000, 10_000 if args.quick else 50_000])
    print("| measurement | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
