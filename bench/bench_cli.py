"""Benchmarks for the CLI (issues 2 and 8): start-up, submit and status latency side by side with the aws CLI,
AWS requests per job, items read by a listing.

Run:  .venv/bin/pip install -e '.[dev,bench]' && .venv/bin/python bench/bench_cli.py [--quick]

Everything runs against moto on 127.0.0.1 (no AWS account). The latency comparisons are paired: each round runs
the gpuctl command and its aws CLI counterpart back to back (in alternating order), and the ratio is taken per
round, so a load spike on the shared machine hits both sides. Results are printed as a Markdown table to paste into
BENCHMARKS.md; nothing is timed inside the test suite.
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

from tests.helpers import REGION, Resources, create_resources, png_bytes  # noqa: E402

Row = tuple[str, str, str]  # measurement, result, goal


def _run(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[:500]}")
    return elapsed


def _paired(ours: Callable[[], float], theirs: Callable[[], float], rounds: int) -> tuple[list[float], list[float]]:
    """Both sides once per round, the order alternating; returns the two lists of times."""
    a, b = [], []
    for i in range(rounds):
        if i % 2:
            b.append(theirs())
            a.append(ours())
        else:
            a.append(ours())
            b.append(theirs())
    return a, b


def _ms(times: list[float]) -> str:
    return f"{statistics.median(times) * 1000:.0f} ms (min {min(times) * 1000:.0f}, n={len(times)})"


def _ratio(a: list[float], b: list[float], goal: float) -> tuple[str, str]:
    ratios = sorted(x / y for x, y in zip(a, b, strict=True))
    median = statistics.median(ratios)
    mark = "✅" if median <= goal else "❌"
    return (f"**{median:.2f}** (per-round ratios {ratios[0]:.2f}–{ratios[-1]:.2f})", f"≤ {goal} {mark}")


@contextmanager
def moto_server() -> Iterator[str]:
    import logging
    import socket

    import httpx
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # Backends are process-global in moto: a second server in this process would see the first one's state.
    httpx.post(f"http://127.0.0.1:{port}/moto-api/reset", timeout=10).raise_for_status()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def _base_env() -> dict[str, str]:
    # PYTHONDONTWRITEBYTECODE (set in some sandboxes) would make every gpuctl run compile its own modules from
    # source, while the aws CLI's come precompiled from site-packages; an installed gpuctl has its bytecode cached
    # too, so the comparison runs without it (the first, unmeasured run writes gpuctl's __pycache__).
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "GPUCTL_")) and k != "PYTHONDONTWRITEBYTECODE"}
    env.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION=REGION,
               GPUCTL_CONFIG_DIR=tempfile.mkdtemp(prefix="gpuctl-bench-"), NO_COLOR="1")
    return env


def _aws() -> str | None:
    return shutil.which("aws", path=str(Path(sys.executable).parent)) or shutil.which("aws")


def _gpuctl() -> str:
    return str(Path(sys.executable).with_name("gpuctl"))


def bench_help(rounds: int) -> list[Row]:
    env = _base_env()
    rows: list[Row] = [("`python -c pass`", _ms([_run([sys.executable, "-c", "pass"], env) for _ in range(rounds)]),
                        "")]
    probe = subprocess.run([sys.executable, "-c", "import sys, runpy; sys.argv=['gpuctl','--help'];\n"
                            "try:\n runpy.run_module('gpuctl', run_name='__main__')\n"
                            "except SystemExit: pass\n"
                            "print('boto3' in sys.modules, file=sys.stderr)"],
                           env=env, capture_output=True, text=True, check=False)
    aws = _aws()
    if not aws:
        return [*rows, ("`aws --version`", "awscli not installed (pip install -e '.[bench]')", "")]
    _run([_gpuctl(), "--help"], env)  # writes gpuctl's bytecode cache; not measured
    ours, theirs = _paired(lambda: _run([_gpuctl(), "--help"], env), lambda: _run([aws, "--version"], env), rounds)
    ratio, goal = _ratio(ours, theirs, 0.5)
    return [*rows, ("`gpuctl --help`", _ms(ours), ""), ("`aws --version`", _ms(theirs), ""),
            ("boto3 imported by `gpuctl --help`", probe.stderr.strip().splitlines()[-1], "False"),
            ("**`gpuctl --help` ÷ `aws --version`**", ratio, goal)]


def _adapter_polling(res: Resources) -> None:
    """Write the activity marker as a polling adapter does (so submit knows the instance runs)."""
    gw = _gateways(res)
    gw.table.note_adapter("bench-gpu:1", state="running", jobs_in_hand=0)


def _gateways(res: Resources) -> Any:
    from gpuctl.services.context import Gateways
    from gpuctl.settings import Settings

    return Gateways(Settings(**res.settings_kwargs()))


def bench_submit_and_status(endpoint: str, res: Resources, rounds: int) -> list[Row]:
    env = _base_env()
    env.update(res.env())
    gw = _gateways(res)
    gw.store.put_bytes(png_bytes(), res.bucket, "bench/in.png", content_type="image/png")
    aws = _aws()
    if not aws:
        return [("aws CLI comparisons", "awscli not installed", "")]
    gpuctl = _gpuctl()
    submit = [gpuctl, "submit", "qwen-image-edit", f"s3://{res.bucket}/bench/in.png", "--prompt", "sketch", "-q"]
    item = json.dumps({"task_id": {"S": "x"}, "status": {"S": "pending"}, "job_type": {"S": "/api/v1/x/jobs"},
                       "created_at": {"N": "1"}, "updated_at": {"N": "1"}})
    seed_calls = [
        [aws, "--endpoint-url", endpoint, "dynamodb", "put-item", "--table-name", res.table_name, "--item", item],
        [aws, "--endpoint-url", endpoint, "sqs", "send-message", "--queue-url", res.queue_url, "--message-body", "{}"],
        [aws, "--endpoint-url", endpoint, "ec2", "describe-instances", "--instance-ids", res.instance_id],
    ]

    def ours_submit() -> float:
        # An adapter polled within the 60 s freshness window: submit skips EC2, as it does with a working GPU.
        gw.table.note_adapter("bench-gpu:1", state="running", jobs_in_hand=0)
        return _run(submit, env)

    def theirs_submit() -> float:
        return sum(_run(c, env) for c in seed_calls)

    _run(submit, env)  # warm the emulator's backends once (moto loads each service on first use)
    theirs_submit()
    s_ours, s_theirs = _paired(ours_submit, theirs_submit, rounds)
    s_ratio, s_goal = _ratio(s_ours, s_theirs, 0.33)
    job = subprocess.run(submit, env=env, capture_output=True, text=True, check=True).stdout.strip()
    status = [gpuctl, "status", job, "--output", "json"]
    get_item = [aws, "--endpoint-url", endpoint, "dynamodb", "get-item", "--table-name", res.table_name, "--key",
                json.dumps({"task_id": {"S": job}})]
    t_ours, t_theirs = _paired(lambda: _run(status, env), lambda: _run(get_item, env), rounds)
    t_ratio, t_goal = _ratio(t_ours, t_theirs, 0.6)
    return [
        ("`gpuctl submit qwen-image-edit s3://… --prompt … -q` (adapter polling)", _ms(s_ours), ""),
        ("aws CLI: `dynamodb put-item` + `sqs send-message` + `ec2 describe-instances`", _ms(s_theirs), ""),
        ("**submit ÷ the three aws CLI calls**", s_ratio, s_goal),
        ("`gpuctl status JOB --output json`", _ms(t_ours), ""),
        ("`aws dynamodb get-item`", _ms(t_theirs), ""),
        ("**status ÷ get-item**", t_ratio, t_goal),
    ]


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

    def describe(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(self.by_operation.items()))


def _counted_gateways(res: Resources) -> tuple[Any, RequestCounter]:
    gw = _gateways(res)
    counter = RequestCounter()
    for name in ("sqs", "dynamodb", "ec2", "s3"):
        counter.attach(getattr(gw.clients, name))
    return gw, counter


def _marked_and_counted(res: Resources, *, polling: bool) -> tuple[Any, RequestCounter]:
    """Gateways whose requests are counted, after the activity marker was set to say an adapter is polling (or, with
    ``polling`` false, that a stop was fenced since, so submit asks EC2)."""
    if polling:
        _adapter_polling(res)
    else:
        _gateways(res).table.note_stop()
    return _counted_gateways(res)


def bench_requests(res: Resources, rows: int) -> list[Row]:
    from gpuctl.inputs import ImageLimits
    from gpuctl.models import JobType
    from gpuctl.services.submit import draft_job, submit_batch, submit_draft

    out: list[Row] = []
    limits = ImageLimits(1 << 20, 40_000_000, 12000)
    uri = f"s3://{res.bucket}/bench/in.png"
    _gateways(res).store.put_bytes(png_bytes(), res.bucket, "bench/in.png", content_type="image/png")
    draft = draft_job(JobType.QWEN_IMAGE_EDIT, uri, {"prompt": "sketch"}, limits=limits)
    for label, polling in (("adapter polling", True), ("no adapter seen", False)):
        gw, counter = _marked_and_counted(res, polling=polling)
        submit_draft(gw, draft)
        out.append((f"AWS requests, single submit (s3:// input, {label})", f"{counter.total}: {counter.describe()}",
                    ""))
    path = Path(tempfile.mkdtemp()) / "jobs.jsonl"
    path.write_text("\n".join(json.dumps({"job_type": "qwen-image-edit", "image": uri, "prompt": f"edit {i}"})
                              for i in range(rows)))
    for label, polling in (("adapter polling", True), ("instance running, no adapter seen", False)):
        gw, counter = _marked_and_counted(res, polling=polling)
        start = time.perf_counter()
        result = submit_batch(gw, path)
        elapsed = time.perf_counter() - start
        assert result.queued == rows, result.failures[:3]
        out.append((f"AWS requests, `submit --from` {rows:,} rows ({label})",
                    f"{counter.total} = **{counter.total / rows:.3f} per job** ({counter.describe()}); "
                    f"{elapsed:.1f} s", "≤ 0.141"))
    return out


def bench_listing(sizes: list[int]) -> list[Row]:
    """Items read by `jobs list --limit 50`, with and without --status, as the table grows (moto in-process)."""
    import boto3
    from moto import mock_aws

    from gpuctl.services.jobs import list_jobs

    out: list[Row] = []
    for size in sizes:
        with mock_aws():
            res = create_resources(boto3.session.Session(region_name=REGION))
            gw, counter = _counted_gateways(res)
            _fill_table(gw, size)
            for status in ("pending", None):
                counter.by_operation.clear()
                counter.items_read = 0
                start = time.perf_counter()
                page = list_jobs(gw, status=status, limit=50)
                elapsed = time.perf_counter() - start
                flag = f"--status {status}" if status else "(all statuses)"
                out.append((f"`jobs list {flag} --limit 50`, {size:,} jobs in the table",
                            f"{len(page.records)} returned, **{counter.items_read} items read**, "
                            f"{counter.by_operation.get('Query', 0)} Query requests, {elapsed * 1000:.0f} ms (moto); "
                            f"next token: {'yes' if page.next_token else 'no'}",
                            "≤ 50" if status else "≤ 50 + one page (≤ 103)"))
    return out


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
    parser.add_argument("--quick", action="store_true", help="fewer rounds, 10,000 instead of 50,000 jobs")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (5 if args.quick else 15)
    import boto3

    rows: list[Row] = []
    rows += bench_help(rounds)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION=REGION)
    with moto_server() as endpoint:
        session = boto3.session.Session(aws_access_key_id="bench", aws_secret_access_key="bench")
        res = create_resources(session, endpoint, instance_state="running")
        rows += bench_submit_and_status(endpoint, res, rounds)
    with moto_server() as endpoint:
        session = boto3.session.Session(aws_access_key_id="bench", aws_secret_access_key="bench")
        res = create_resources(session, endpoint, instance_state="running")
        rows += bench_requests(res, 1000)
    rows += bench_listing([1000, 10_000 if args.quick else 50_000])
    print(f"Load average when done: {os.getloadavg()[0]:.1f} (2 cores)\n")
    print("| measurement | result | goal |\n|---|---|---|")
    for name, value, goal in rows:
        print(f"| {name} | {value} | {goal} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
