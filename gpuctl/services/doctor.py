"""`gpuctl doctor`: check the deployed setup against the invariants that keep it safe and cheap.

Each check reads live state (the stack's outputs, SQS, DynamoDB, EC2, S3, Lambda, CloudWatch, EventBridge) and
gives one finding: ``pass``, ``warn`` or ``fail``, with the fix. A check whose AWS call fails is a ``fail``
naming the failure (an unreadable setup is not a healthy one). The adapter's tunables are not readable from
here: the checks that need them use the adapter's defaults (adapter/settings.py) unless told otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from gpuctl.errors import GpuctlError

if TYPE_CHECKING:
    from gpuctl.aws.cfn import StackInfo
    from gpuctl.aws.ec2 import InstanceInfo
    from gpuctl.aws.scheduler import FunctionInfo
    from gpuctl.services.context import Gateways

__all__ = ["CHECK_NAMES", "AdapterTunables", "Finding", "Level", "run_checks", "select_checks", "worst"]

Level = Literal["pass", "warn", "fail"]
_RANK = {"pass": 0, "warn": 1, "fail": 2}
#: maxReceiveCount above this keeps a poison message (and the GPU) busy for too many attempts.
MAX_RECEIVE_BOUND = 10
#: The adapter writes the activity marker every 15 s while it polls; older than this is a silent adapter.
HEARTBEAT_FRESH_SECONDS = 120.0


@dataclass(frozen=True)
class Finding:
    check: str
    level: Level
    message: str
    fix: str | None = None

    def document(self) -> dict[str, Any]:
        return {"check": self.check, "level": self.level, "message": self.message, "fix": self.fix}


@dataclass(frozen=True)
class AdapterTunables:
    """The adapter's settings the invariants depend on (defaults: adapter/settings.py)."""

    heartbeat_interval: float = 30.0
    visibility_extension: int = 120
    job_timeout: float = 1800.0

    @classmethod
    def defaults(cls) -> AdapterTunables:
        from adapter.settings import AdapterSettings

        fields = AdapterSettings.model_fields
        return cls(float(fields["heartbeat_interval"].default), int(fields["visibility_extension"].default),
                   float(fields["job_timeout"].default))


def worst(findings: list[Finding]) -> Level:
    return max((f.level for f in findings), key=_RANK.__getitem__, default="pass")


class _Context:
    """What several checks share, read once."""

    def __init__(self, gw: Gateways, stack: StackInfo) -> None:
        self.gw = gw
        self.stack = stack
        self.outputs = stack.outputs
        self._function: FunctionInfo | None = None
        self._members: list[InstanceInfo] | None = None
        #: Fleet mode (the stack's FleetGroupName output): the group instead of one instance.
        self.fleet_group = stack.outputs.get("FleetGroupName") or None

    def function(self) -> FunctionInfo:
        if self._function is None:
            from gpuctl.aws.scheduler import SchedulerFunction

            self._function = SchedulerFunction(self.gw.clients.client("lambda"),
                                               self.outputs["LambdaFunctionName"]).configuration()
        return self._function

    def members(self) -> list[InstanceInfo]:
        """Fleet mode: the group's instances as EC2 describes them (warm pool included), read once."""
        if self._members is None:
            from gpuctl.aws.autoscaling import FleetGroup

            assert self.fleet_group is not None
            group = FleetGroup(self.gw.clients.client("autoscaling"), self.fleet_group).describe()
            self._members = self.gw.instances.describe([m.instance_id for m in group.members])
        return self._members


def _queue(ctx: _Context, tun: AdapterTunables) -> list[Finding]:
    from gpuctl.aws.sqs import JobQueue

    queue = JobQueue(ctx.gw.clients.sqs, ctx.outputs["QueueUrl"], ctx.outputs.get("DeadLetterQueueUrl") or None)
    stats = queue.stats()
    found: list[Finding] = []
    visibility = stats.visibility_timeout
    if visibility is None or visibility <= tun.heartbeat_interval:
        found.append(Finding("queue.visibility", "fail",
                             f"the queue's visibility timeout ({visibility} s) is not longer than the adapter's "
                             f"heartbeat interval ({tun.heartbeat_interval:g} s): a job's message reappears "
                             "before the first extension and runs twice",
                             f"set the queue's VisibilityTimeout to at least {int(tun.visibility_extension)} s"))
    elif visibility < tun.visibility_extension:
        found.append(Finding("queue.visibility", "warn",
                             f"the queue's visibility timeout ({visibility} s) is shorter than the adapter's "
                             f"extension ({tun.visibility_extension} s): one late heartbeat makes a running job's "
                             "message visible again",
                             f"set VisibilityTimeout to at least {tun.visibility_extension} s (the template uses 300)"))
    else:
        found.append(Finding("queue.visibility", "pass",
                             f"visibility timeout {visibility} s > heartbeat every {tun.heartbeat_interval:g} s, "
                             f"extended to {tun.visibility_extension} s"))
    limit = stats.max_receive_count
    if limit is None:
        found.append(Finding("queue.dlq", "fail", "the queue has no redrive policy: a job that fails every time "
                             "keeps the GPU up until its message expires (14 days)",
                             "deploy the stack's queue, or give the queue a dead-letter queue (maxReceiveCount 5)"))
    elif limit > MAX_RECEIVE_BOUND:
        found.append(Finding("queue.dlq", "warn", f"maxReceiveCount is {limit}: a poison message runs up to {limit} "
                             "times on the GPU before it is dead-lettered",
                             f"lower MaxReceiveCount to {MAX_RECEIVE_BOUND} or less (default 5)"))
    else:
        found.append(Finding("queue.dlq", "pass", f"dead-letter queue after {limit} receives"))
    return found


def _idle_window(ctx: _Context, tun: AdapterTunables) -> list[Finding]:
    env = ctx.function().environment
    try:
        idle = float(env.get("IDLE_MINUTES", "30")) * 60
    except ValueError:
        return [Finding("idle_window", "fail", f"the scheduler's IDLE_MINUTES {env.get('IDLE_MINUTES')!r} is not "
                        "a number (every run fails)", "redeploy: gpuctl deploy --idle-minutes 30")]
    if idle < tun.job_timeout:
        return [Finding("idle_window", "warn",
                        f"the idle window ({idle / 60:g} min) is shorter than the job timeout "
                        f"({tun.job_timeout / 60:g} min): a job that runs longer than the window is covered "
                        "only by the live queue and job counts, not by the last-activity time",
                        f"redeploy with --idle-minutes {int(tun.job_timeout / 60) + 5} or more")]
    return [Finding("idle_window", "pass",
                    f"idle window {idle / 60:g} min >= job timeout {tun.job_timeout / 60:g} min")]


def _alarm(ctx: _Context, tun: AdapterTunables) -> list[Finding]:
    from gpuctl.aws.scheduler import Alarms

    name = ctx.outputs.get("AlarmName", "")
    arn = ctx.function().arn
    alarm = Alarms(ctx.gw.clients.client("cloudwatch")).describe(name) if name else None
    fix = "redeploy the stack (gpuctl deploy) to recreate it"
    if alarm is None:
        return [Finding("alarm", "fail", f"the queue-idle alarm {name or '(no AlarmName output)'} does not exist: "
                        "an idle GPU is only stopped by the 5-minute schedule", fix)]
    if not alarm.actions_enabled:
        return [Finding("alarm", "fail", f"the alarm {name} has its actions disabled",
                        f"aws cloudwatch enable-alarm-actions --alarm-names {name}")]
    if arn not in alarm.actions:
        return [Finding("alarm", "fail", f"the alarm {name} does not invoke the scheduler {arn}", fix)]
    return [Finding("alarm", "pass", f"{name} invokes the scheduler")]


def _rules(ctx: _Context, tun: AdapterTunables) -> list[Finding]:
    from gpuctl.aws.scheduler import Rules

    rules = Rules(ctx.gw.clients.client("events"))
    arn = ctx.function().arn
    found: list[Finding] = []
    for check, output, what in (("schedule", "ScheduleRuleName", "the 5-minute schedule"),
                                ("history_rule", "StateChangeRuleName", "the state-change rule (gpuctl cost)")):
        name = ctx.outputs.get(output)
        rule = rules.describe(name) if name else None
        if rule is None:
            found.append(Finding(check, "fail", f"{what} {name or f'(no {output} output)'} does not exist",
                                 "redeploy the stack (gpuctl deploy)"))
        elif rule.state != "ENABLED":
            found.append(Finding(check, "fail", f"{what} {name} is {rule.state}",
                                 f"aws events enable-rule --name {name}"))
        elif arn not in rule.targets:
            found.append(Finding(check, "fail", f"{what} {name} does not target the scheduler {arn}",
                                 "redeploy the stack (gpuctl deploy)"))
        else:
            found.append(Finding(check, "pass", f"{what} {name} is enabled and targets the scheduler"))
    return found


def _environment(ctx: _Context, tun: AdapterTunables) -> list[Finding]:
    env = ctx.function().environment
    expected = {"QUEUE_URL": "QueueUrl", "TABLE_NAME": "TableName", "INSTANCE_ID": "InstanceId",
                "DLQ_URL": "DeadLetterQueueUrl", "HISTORY_TABLE": "HistoryTableName", "FLEET_GROUP": "FleetGroupName"}
    wrong = [f"{var}={env.get(var)!r} (the stack's {output} is {ctx.outputs[output]!r})"
             for var, output in expected.items()
             if ctx.outputs.get(output) and env.get(var) != ctx.outputs[output]]
    if wrong:
        return [Finding("scheduler.environment", "fail", "the scheduler watches something else than the stack: "
                        + "; ".join(wrong), "redeploy the stack (gpuctl deploy) instead of editing the function")]
    what = "fleet group" if ctx.fleet_group else "instance"
    return [Finding("scheduler.environment", "pass", f"the scheduler's queue, table, {what} and history table "
                    "are the stack's")]


def _fleet_profile(ctx: _Context) -> list[Finding]:
    wanted = ctx.outputs.get("InstanceProfileArn")
    members = [i for i in ctx.members() if i.state not in ("shutting-down", "terminated")]
    if not members:
        return [Finding("instance.profile", "pass", f"the fleet {ctx.fleet_group} has no instance now "
                        "(its launch template decides the next one's profile)")]
    wrong = [i for i in members if i.profile_arn != wanted]
    if wrong:
        listed = ", ".join(f"{i.instance_id} ({i.profile_arn or 'none'})" for i in wrong)
        return [Finding("instance.profile", "fail",
                        f"{len(wrong)} of the fleet's {len(members)} instance(s) lack the stack's instance profile "
                        f"{wanted}: {listed}; their adapters cannot read the queue or write results",
                        "give the fleet's launch template the stack's instance profile (gpuctl deploy --fleet "
                        "builds one with it), then replace the instances (aws autoscaling "
                        "start-instance-refresh)")]
    return [Finding("instance.profile", "pass",
                    f"the fleet's {len(members)} instance(s) have the stack's instance profile")]


def _instance_profile(ctx: _Context, tun: AdapterTunables) -> list[Finding]:
    from gpuctl.aws.ec2 import GpuInstance

    if ctx.fleet_group:
        return _fleet_profile(ctx)
    info = GpuInstance(ctx.gw.clients.ec2, ctx.outputs["InstanceId"]).describe()
    wanted = ctx.outputs.get("InstanceProfileArn")
    if info.profile_arn != wanted:
        return [Finding("instance.profile", "fail",
                        f"the instance {info.instance_id} has the instance profile {info.profile_arn or '(none)'}, "
                        f"not the stack's {wanted}: the adapter cannot read the queue or write results",
                        f"aws ec2 associate-iam-instance-profile --instance-id {info.instance_id} "
                        f"--iam-instance-profile Name={ctx.outputs.get('InstanceProfileName', '<profile>')}")]
    return [Finding("instance.profile", "pass", f"{info.instance_id} has the stack's instance profile")]


def _tables(ctx: _Context, tun: AdapterTunables) -> list[Finding]:
    from gpuctl.aws.dynamo import JobTable

    found: list[Finding] = []
    table = JobTable(ctx.gw.clients.dynamodb, ctx.outputs["TableName"])
    if table.describe().has_status_index():
        found.append(Finding("table.index", "pass", f"{table.table_name} has status-created_at-index"))
    else:
        found.append(Finding("table.index", "fail", f"{table.table_name} has no status-created_at-index "
                             "(status, created_at): the scheduler cannot count open jobs and never stops the GPU",
                             "add the index (see infra/cloudformation.yaml TaskTable)"))
    names = [("table.ttl", table)]
    if ctx.outputs.get("HistoryTableName"):
        names.append(("history.ttl", JobTable(ctx.gw.clients.dynamodb, ctx.outputs["HistoryTableName"])))
    for check, each in names:
        attribute, status = each.ttl()
        if attribute == "expires_at" and status in ("ENABLED", "ENABLING"):
            found.append(Finding(check, "pass", f"{each.table_name} expires items by expires_at"))
        else:
            found.append(Finding(check, "warn", f"{each.table_name} has no TTL on expires_at ({status}): "
                                 "its items are kept for ever",
                                 f"aws dynamodb update-time-to-live --table-name {each.table_name} "
                                 "--time-to-live-specification Enabled=true,AttributeName=expires_at"))
    return found


def _lifecycle(ctx: _Context, tun: AdapterTunables) -> list[Finding]:
    bucket = ctx.outputs.get("BucketName")
    if not bucket:
        return [Finding("bucket.lifecycle", "fail", "the stack has no BucketName output", "redeploy the stack")]
    rules = ctx.gw.store.lifecycle_rules(bucket)

    def prefix(rule: dict[str, Any]) -> str:
        return str(rule.get("Prefix") or rule.get("Filter", {}).get("Prefix") or "")

    inputs = any(prefix(r).startswith("inputs/") and "Expiration" in r for r in rules)
    uploads = any("AbortIncompleteMultipartUpload" in r for r in rules)
    missing = [what for what, ok in (("inputs/ expiry", inputs), ("aborting incomplete uploads", uploads)) if not ok]
    if missing:
        return [Finding("bucket.lifecycle", "warn", f"the bucket {bucket} has no lifecycle rule for "
                        + " or ".join(missing) + ": uploaded inputs are paid for ever",
                        "deploy the stack's bucket, or add the rules of infra/cloudformation.yaml DataBucket")]
    return [Finding("bucket.lifecycle", "pass", f"{bucket} expires inputs/ and aborts incomplete uploads")]


def _profile(ctx: _Context, tun: AdapterTunables) -> list[Finding]:
    from gpuctl.services.deploy import OUTPUT_SETTINGS

    settings = ctx.gw.settings
    wrong, unset = [], []
    for output, name in OUTPUT_SETTINGS.items():
        if not ctx.outputs.get(output) or name == "region":  # "": not used (InstanceId in fleet mode)
            continue
        value = getattr(settings, name)
        if value in (None, ""):
            unset.append(name)
        elif str(value) != ctx.outputs[output]:
            wrong.append(f"{name}={value!r} (the stack's {output} is {ctx.outputs[output]!r})")
    fix = f"gpuctl --profile {settings.profile} deploy records the stack's outputs (or gpuctl config set NAME VALUE)"
    if wrong:
        return [Finding("cli.profile", "fail", "the CLI points elsewhere than the stack: " + "; ".join(wrong), fix)]
    if unset:
        return [Finding("cli.profile", "warn", "not configured in the CLI profile: " + ", ".join(unset), fix)]
    return [Finding("cli.profile", "pass", f"the profile {settings.profile} agrees with the stack's outputs")]


def _heartbeat(ctx: _Context, tun: AdapterTunables) -> list[Finding]:
    from gpuctl.aws.dynamo import JobTable
    from gpuctl.aws.ec2 import GpuInstance

    if ctx.fleet_group:
        running = [i for i in ctx.members() if i.state == "running"]
        if not running:
            return [Finding("adapter.heartbeat", "pass", f"no instance of the fleet {ctx.fleet_group} runs: no "
                            "adapter is expected")]
        # One marker for the whole fleet: it shows the latest report of any of its adapters.
        subject, whose = f"{len(running)} instance(s) of the fleet run", "the latest of their adapters"
    else:
        info = GpuInstance(ctx.gw.clients.ec2, ctx.outputs["InstanceId"]).describe()
        if info.state != "running":
            return [Finding("adapter.heartbeat", "pass", f"the instance is {info.state}: no adapter is expected")]
        subject, whose = "the instance runs", "its adapter"
    activity = JobTable(ctx.gw.clients.dynamodb, ctx.outputs["TableName"]).read_activity()
    seen = activity.adapter_seen_at
    age = None if seen is None else time.time() - seen
    if age is None or age > HEARTBEAT_FRESH_SECONDS or activity.adapter_state not in ("running", "draining"):
        when = "never" if age is None else f"{age:.0f} s ago ({activity.adapter_state})"
        return [Finding("adapter.heartbeat", "fail",
                        f"{subject} but {whose} last reported {when}: queued jobs are not processed "
                        "and the GPU is paid for",
                        "on the instance: systemctl status gpuctl-adapter; journalctl -u gpuctl-adapter")]
    return [Finding("adapter.heartbeat", "pass", f"the adapter reported {age:.0f} s ago ({activity.adapter_state})")]


#: Each check: the findings it gives (their ``check`` names) and the function that gives them.
CHECKS: tuple[tuple[tuple[str, ...], Callable[[_Context, AdapterTunables], list[Finding]]], ...] = (
    (("queue.visibility", "queue.dlq"), _queue), (("idle_window",), _idle_window), (("alarm",), _alarm),
    (("schedule", "history_rule"), _rules), (("scheduler.environment",), _environment),
    (("instance.profile",), _instance_profile), (("table.index", "table.ttl", "history.ttl"), _tables),
    (("bucket.lifecycle",), _lifecycle), (("cli.profile",), _profile), (("adapter.heartbeat",), _heartbeat),
)
#: Every finding name a check can give, in order (``stack`` first: it is read before any other).
CHECK_NAMES: tuple[str, ...] = ("stack", *(name for names, _run in CHECKS for name in names))


def select_checks(wanted: Collection[str]) -> set[str]:
    """The finding names ``wanted`` selects: a name itself, or a dotted prefix (``queue`` → ``queue.*``).

    Raises:
        UsageError: a name that selects nothing, with the names there are.
    """
    from gpuctl.errors import UsageError

    chosen: set[str] = set()
    for want in wanted:
        matches = {n for n in CHECK_NAMES if n == want or n.startswith(want + ".")}
        if not matches:
            raise UsageError(f"--check {want!r} is not a check; the checks are: {', '.join(CHECK_NAMES)}.")
        chosen |= matches
    return chosen


def run_checks(gw: Gateways, tunables: AdapterTunables | None = None,
               only: Collection[str] | None = None) -> list[Finding]:
    """The findings of every check (``only``: of those finding names, see :func:`select_checks`), in order.

    A stack that is not there is one ``fail`` (nothing else can be checked); it is reported whatever ``only``
    says. An empty ``only`` runs nothing (not even the stack's read).

    Raises:
        ConfigError: no credentials / region (nothing can be read at all).
    """
    from gpuctl.aws.cfn import Stacks
    from gpuctl.errors import ConfigError

    if only is not None:
        only = set(only)
        if not only:
            return []
    tun = tunables or AdapterTunables.defaults()
    name = gw.settings.stack_name
    stack = Stacks(gw.clients.cloudformation).describe(name)
    if stack is None:
        return [Finding("stack", "fail", f"the stack {name} does not exist", "gpuctl deploy --instance-id i-...")]
    found = [Finding("stack", "pass" if stack.status.endswith("_COMPLETE") and "ROLLBACK" not in stack.status
                     else "fail", f"the stack {name} is {stack.status}",
                     None if stack.status.endswith("_COMPLETE") else "gpuctl deploy status; then gpuctl deploy")]
    ctx = _Context(gw, stack)
    for names, run in CHECKS:
        if only is not None and not set(only) & set(names):
            continue
        try:
            found.extend(run(ctx, tun))
        except ConfigError:
            raise
        except (GpuctlError, KeyError) as exc:
            what = f"the stack has no {exc} output" if isinstance(exc, KeyError) else str(exc)
            check = next(n for n in names if only is None or n in only)
            found.append(Finding(check, "fail", f"could not check: {what}", "see the message; then run doctor again"))
    return [f for f in found if only is None or f.check in only or (f.check == "stack" and f.level == "fail")]
