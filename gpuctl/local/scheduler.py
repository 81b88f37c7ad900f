"""Local stand-in for the scheduler Lambda's triggers: run the real handler every few seconds.

The emulator stores the Lambda function but never runs its code, and never fires the alarm or the
EventBridge schedule (see reference/moto-capabilities.md §7-8). Local mode therefore runs this loop as a
background process: it loads ``lambda/handler.py`` the way the Lambda runtime does (the folder on
``sys.path``, the module by file), takes the function's environment from the deployed function's
configuration (what CloudFormation set: queue, table, instance, idle minutes), and calls the handler's
``run_once`` on every tick, as the schedule would.

``--idle-minutes`` replaces the function's ``IDLE_MINUTES``: local mode rehearses the idle stop in minutes,
while the stack keeps the template's bounds (IdleMinutes is at least 5 there). ``CLOCK_SKEW_SECONDS`` is 0:
everything here reads one clock.

    python -m gpuctl.local.scheduler --endpoint-url http://127.0.0.1:PORT --function-name gpuctl-gpu-scheduler

Logs one JSON object per line on stderr; ``local_scheduler.ready`` after the first successful tick. Each decision
that acts or differs from the previous one is also written, as the Lambda's own record, to the function's log
group in the emulator (``/aws/lambda/<function>``), where ``gpuctl instance decisions`` reads it as on AWS.

The emulator emits no EC2 state-change events either: each tick compares the instance's state with the one it
saw last and hands every change to the Lambda's own history recorder (``history.py``) as the event EventBridge
would deliver, so ``gpuctl cost report`` works locally too (times are then exact to one tick).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

__all__ = ["READY_EVENT", "load_handler", "main"]

log = logging.getLogger("gpuctl.local.scheduler")

READY_EVENT = "local_scheduler.ready"


def load_handler(lambda_dir: Path | None = None) -> ModuleType:
    """Import ``handler.py`` from the Lambda folder (the checkout's ``lambda/`` or the wheel's bundled copy).

    Raises:
        ConfigError: the folder cannot be found.
    """
    if lambda_dir is None:
        from gpuctl.services.deploy import find_sources

        lambda_dir = find_sources().lambda_dir
    # The runtime puts the task root on sys.path: handler.py imports its sibling modules (decide.py).
    sys.path.insert(0, str(lambda_dir))
    spec = importlib.util.spec_from_file_location("handler", lambda_dir / "handler.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["handler"] = module
    spec.loader.exec_module(module)
    return module


def _function_env(endpoint_url: str, region: str, function_name: str) -> dict[str, str]:
    """The deployed function's environment variables, as strings (the Lambda runtime passes strings)."""
    import boto3

    client = boto3.session.Session(region_name=region).client("lambda", endpoint_url=endpoint_url)
    config = client.get_function_configuration(FunctionName=function_name)
    variables = config.get("Environment", {}).get("Variables", {})
    return {str(k): str(v) for k, v in variables.items()}


class _DecisionShipper:
    """Writes decision records to the function's log group, as the Lambda runtime does on AWS."""

    def __init__(self, endpoint_url: str, region: str, function_name: str) -> None:
        import os
        import time

        import boto3

        self._client = boto3.session.Session(region_name=region).client("logs", endpoint_url=endpoint_url)
        self.group = f"/aws/lambda/{function_name}"
        self.stream = f"local/{time.strftime('%Y/%m/%d', time.gmtime())}/{os.getpid()}"
        self._ready = False

    def ship(self, record: dict[str, Any]) -> None:
        import json
        import time

        import botocore.exceptions

        try:
            if not self._ready:
                with contextlib.suppress(self._client.exceptions.ResourceAlreadyExistsException):
                    self._client.create_log_group(logGroupName=self.group)  # the stack made it; else make it
                self._client.create_log_stream(logGroupName=self.group, logStreamName=self.stream)
                self._ready = True
            self._client.put_log_events(logGroupName=self.group, logStreamName=self.stream, logEvents=[
                {"timestamp": int(time.time() * 1000), "message": json.dumps(record, sort_keys=True, default=str)}])
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            log.warning("local_scheduler.log_failed", extra={"group": self.group, "error": str(exc)})


class _StateWatcher:
    """Turns the instance state changes this loop observes into EC2 state-change events for history.py."""

    def __init__(self, handler: ModuleType, env: dict[str, str], clients: Any, instance_id: str,
                 region: str) -> None:
        import importlib

        self._history = importlib.import_module("history")  # beside handler.py, on sys.path since load_handler
        self._config = self._history.HistoryConfig.from_env(env)
        self._clients = clients
        self._instance_id = instance_id
        self._region = region
        self._last: str | None = None

    def tick(self) -> None:
        import time

        import botocore.exceptions

        try:
            answer = self._clients.ec2.describe_instances(InstanceIds=[self._instance_id])
            state = answer["Reservations"][0]["Instances"][0]["State"]["Name"]
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, LookupError) as exc:
            log.warning("local_scheduler.state_unread", extra={"error": str(exc)})
            return
        if state == self._last:
            return
        event = self._history.state_change_event(self._instance_id, state, at=time.time(), region=self._region)
        record = self._history.record_event(event, self._config, self._clients.ec2, self._clients.dynamodb)
        if record.get("stored") or self._config.table_name is None:
            self._last = state  # a failed write is retried on the next tick


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gpuctl.local.scheduler",
                                description="Call the scheduler Lambda's handler every few seconds (local mode).")
    p.add_argument("--endpoint-url", required=True, help="the AWS endpoint (the local emulator)")
    p.add_argument("--region", default="us-east-1")
    p.add_argument("--function-name", required=True, help="the deployed scheduler function (for its environment)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between runs (default 5)")
    p.add_argument("--lambda-dir", type=Path, default=None, help="folder holding handler.py (default: gpuctl's)")
    p.add_argument("--idle-minutes", type=float, default=None,
                   help="idle window instead of the function's IDLE_MINUTES (may be fractional)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run until SIGTERM/SIGINT; exit 2 when the function's configuration cannot be read."""
    import botocore.exceptions

    args = _parser().parse_args(argv)
    from gpuctl.logs import configure

    configure("INFO")
    for noisy in ("botocore", "boto3", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # The handler logs its full decision record on every run (one per invocation on AWS); every few
    # seconds here that is megabytes a day, so this loop logs a compact line when the decision changes.
    logging.getLogger("gpuctl.scheduler").setLevel(logging.WARNING)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    handler = load_handler(args.lambda_dir)
    try:
        env = _function_env(args.endpoint_url, args.region, args.function_name)
        if args.idle_minutes is not None:
            env["IDLE_MINUTES"] = f"{args.idle_minutes:g}"
        # Every component of local mode reads this machine's clock: there is no skew to allow for (on AWS the
        # handler allows for the adapter's, the CLI's and EC2's clocks being off; a handler without the
        # setting ignores it).
        env["CLOCK_SKEW_SECONDS"] = "0"
        config = handler.SchedulerConfig.from_env(
            {**env, "AWS_ENDPOINT_URL": args.endpoint_url, "AWS_DEFAULT_REGION": args.region})
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, ValueError) as exc:
        log.error("local_scheduler.config_error", extra={"function": args.function_name, "error": str(exc)})
        return 2
    clients = handler.make_clients(config.region, config.endpoint_url)
    shipper = _DecisionShipper(args.endpoint_url, args.region, args.function_name)
    log.info("local_scheduler.started", extra={"function": args.function_name, "interval_s": args.interval,
                                               "instance_id": config.instance_id,
                                               "idle_minutes": env.get("IDLE_MINUTES")})
    history = _StateWatcher(handler, env, clients, config.instance_id, args.region)
    ready = False
    last: tuple[Any, ...] | None = None
    # Like the EventBridge schedule: one run per tick; a failed run is logged and the next tick tries again.
    while not stop.is_set():
        history.tick()
        try:
            record = handler.run_once(config, clients, trigger="schedule")
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            log.warning("local_scheduler.run_failed", extra={"error": str(exc)})
        else:
            decision = (record.get("action"), record.get("code"), record.get("outcome"))
            if decision != last or record.get("action") != "none":
                last = decision
                log.info("local_scheduler.decision", extra={k: record.get(k) for k in
                                                            ("action", "code", "reason", "outcome")})
                shipper.ship(record)
            history.tick()
            if not ready:
                ready = True
                log.info(READY_EVENT)
        stop.wait(args.interval)
    log.info("local_scheduler.stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
