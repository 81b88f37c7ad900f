"""`gpuctl deploy`, `gpuctl destroy` and `gpuctl stack status|outputs`: the CloudFormation stack."""

from __future__ import annotations

import datetime as dt
import sys
from types import TracebackType
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gpuctl.cli import state
from gpuctl.cli._output import OutputOpt, Renderer, ask, err_console, quiet_opt, when
from gpuctl.errors import UsageError

if TYPE_CHECKING:
    from rich.status import Status

    from gpuctl.aws.cfn import StackEvent, StackInfo
    from gpuctl.services.deploy import DeployPlan, DeployResult, DestroyPlan, DestroyResult

__all__ = ["register", "stack_app"]

stack_app = typer.Typer(help="Show the CloudFormation stack's status and outputs.", no_args_is_help=True)

StackOpt = Annotated[str | None, typer.Option("--stack", help="Stack name (default: the stack_name setting, "
                                                               "gpuctl).", show_default=False)]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


def register(app: typer.Typer) -> None:
    """Add `deploy`, `destroy` and the `stack` group to the root app."""
    app.command("deploy")(deploy)
    app.command("destroy")(destroy)
    app.add_typer(stack_app, name="stack")


# --- gpuctl deploy ---------------------------------------------------------------------------------

def deploy(
    ctx: typer.Context,
    stack: StackOpt = None,
    instance_id: Annotated[str | None, typer.Option(
        "--instance-id", help="The existing GPU instance (default: the stack's current one; for a new stack "
                              "the instance_id setting).", show_default=False)] = None,
    idle_minutes: Annotated[int | None, typer.Option(
        "--idle-minutes", min=5, max=1440, help="Stop the instance after this many idle minutes "
                                                "(new stack: 30).", show_default=False)] = None,
    enable_cdn: Annotated[bool | None, typer.Option(
        "--enable-cdn/--disable-cdn", help="Serve results through CloudFront (new stack: off).",
        show_default=False)] = None,
    max_receive_count: Annotated[int | None, typer.Option(
        "--max-receive-count", min=1, max=1000, help="Deliveries before a message goes to the dead-letter "
                                                     "queue (new stack: 5).", show_default=False)] = None,
    existing_queue_url: Annotated[str | None, typer.Option(
        "--existing-queue-url", help="Use this existing job queue (the running system's gpu_tasks_queue) instead "
                                     "of creating one; it needs a redrive policy.", show_default=False)] = None,
    existing_dlq_url: Annotated[str | None, typer.Option(
        "--existing-dlq-url", help="Its dead-letter queue (default: the one its redrive policy names).",
        show_default=False)] = None,
    existing_table: Annotated[str | None, typer.Option(
        "--existing-table", help="Use this existing task table (e.g. task_store); it needs the "
                                 "status-created_at-index.", show_default=False)] = None,
    existing_bucket: Annotated[str | None, typer.Option(
        "--existing-bucket", help="Use this existing bucket for inputs/ and results/.", show_default=False)] = None,
    cdn_certificate_arn: Annotated[str | None, typer.Option(
        "--cdn-certificate-arn", help="With --enable-cdn: the ACM certificate (us-east-1) for --cdn-domain.",
        show_default=False)] = None,
    cdn_domain: Annotated[str | None, typer.Option(
        "--cdn-domain", help="With --enable-cdn: the domain the CDN serves results on.", show_default=False)] = None,
    results_expire_days: Annotated[int | None, typer.Option(
        "--results-expire-days", min=0, max=3650, help="Delete results after this many days (new stack: 0, keep).",
        show_default=False)] = None,
    fleet: Annotated[bool, typer.Option(
        "--fleet", help="Fleet mode: an EC2 Auto Scaling group (min 0, a warm pool of stopped instances) sized "
                        "from the backlog, instead of one instance. Needs --max-instances and --subnets.")] = False,
    max_instances: Annotated[int | None, typer.Option(
        "--max-instances", min=0, max=100, help="Fleet mode: the group's maximum size (0: back to "
                                                "single-instance mode, with --instance-id).",
        show_default=False)] = None,
    launch_template: Annotated[str | None, typer.Option(
        "--launch-template", help="Fleet mode: the launch template (lt-...) of the GPU instances.",
        show_default=False)] = None,
    ami: Annotated[str | None, typer.Option(
        "--ami", help="Fleet mode without --launch-template: the GPU instances' AMI.", show_default=False)] = None,
    instance_type: Annotated[str | None, typer.Option(
        "--instance-type", help="Fleet mode: instance type(s), comma-separated, at most 3, in order of preference "
                                "(e.g. g5.xlarge,g6.xlarge).", show_default=False)] = None,
    subnets: Annotated[str | None, typer.Option(
        "--subnets", help="Fleet mode: comma-separated subnet ids (several Availability Zones).",
        show_default=False)] = None,
    jobs_per_instance: Annotated[int | None, typer.Option(
        "--jobs-per-instance", min=1, max=1000, help="Fleet mode: queued or running jobs per instance "
                                                     "(new stack: 4).", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the change set, change nothing.")] = False,
    yes: YesOpt = False,
    output: OutputOpt = None,
    quiet: Annotated[bool, quiet_opt("the stack's status when done (dry run: dry-run)")] = False,
) -> None:
    """Create or update the stack through a change set, then record its outputs in the profile.

    Zips lambda/ (its content hash names the upload), shows the change set and asks before executing it.

    Follows the stack events, then writes queue_url, table_name, bucket, instance_id, … to the profile.

    Options left out keep the stack's current values. Exit 1 when the stack fails or rolls back; exit 2 when the
    change set is declined (nothing is changed), or when an existing queue has no redrive policy or an existing
    table has no status index (it says how to add them).

    Examples:

        gpuctl deploy --instance-id i-0123456789abcdef0

        gpuctl deploy --idle-minutes 45 --dry-run

        gpuctl deploy --instance-id i-0123456789abcdef0 --existing-queue-url
        https://sqs.us-east-1.amazonaws.com/123456789012/gpu_tasks_queue --existing-table task_store
        --existing-bucket short-drama-assets

        gpuctl --endpoint-url http://127.0.0.1:5000 deploy --instance-id i-0123456789abcdef0 --yes

        gpuctl deploy --fleet --max-instances 4 --ami ami-0123456789abcdef0 --instance-type g5.xlarge,g6.xlarge
        --subnets subnet-0a1b2c3d,subnet-4e5f6a7b
    """
    from gpuctl.services.deploy import Existing
    from gpuctl.services.deploy import deploy as run_deploy

    app_state, out = state(ctx), state(ctx).renderer(output, quiet)
    app_state.allow_new_profile()  # deploy is how a new profile gets its settings
    _need_confirmation_channel(yes or dry_run, "deploy")
    existing = Existing(existing_queue_url, existing_dlq_url, existing_table, existing_bucket)
    fleet_spec = _fleet_spec(fleet, max_instances, launch_template, ami, instance_type, subnets, jobs_per_instance)
    with _Progress(out, "Deploying…", yes=yes) as progress:
        result = run_deploy(
            app_state.gateways.clients, app_state.settings, stack_name=stack, instance_id=instance_id,
            idle_minutes=idle_minutes, enable_cdn=enable_cdn, max_receive_count=max_receive_count,
            existing_resources=existing, cdn_certificate_arn=cdn_certificate_arn, cdn_domain=cdn_domain,
            results_expire_days=results_expire_days, fleet=fleet_spec,
            dry_run=dry_run, review=progress.review, on_event=progress.event, on_step=progress.step,
        )
    _render_deploy(out, result)


def _split(raw: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in (raw or "").split(",") if p.strip())


def _fleet_spec(fleet: bool, max_instances: int | None, launch_template: str | None, ami: str | None,
                instance_type: str | None, subnets: str | None, jobs_per_instance: int | None) -> Any:
    """The FleetSpec of the fleet flags (None: none given, the stack keeps its mode)."""
    from gpuctl.services.deploy import FleetSpec

    fleet_only = {"--launch-template": launch_template, "--ami": ami, "--instance-type": instance_type,
                  "--subnets": subnets, "--jobs-per-instance": jobs_per_instance}
    if not fleet:
        given = [flag for flag, value in fleet_only.items() if value is not None]
        if given:
            raise UsageError(f"{given[0]} is a fleet-mode option: add --fleet.")
        if max_instances is None:
            return None
        if max_instances != 0:
            raise UsageError("--max-instances needs --fleet (or is 0, to go back to single-instance mode).")
        return FleetSpec(0)
    if not max_instances:
        raise UsageError("--fleet needs --max-instances N (at least 1): the group's largest size.")
    return FleetSpec(max_instances, launch_template, ami, _split(instance_type), _split(subnets), jobs_per_instance)


def _render_deploy(out: Renderer, result: DeployResult) -> None:
    if result.action == "cancelled":
        from gpuctl.errors import Cancelled

        raise Cancelled("Cancelled: the change set was not executed, and nothing was changed.")
    if out.json:
        out.data(result.document())
    elif out.quiet:
        out.ids(["dry-run" if result.action == "dry-run" else result.status or result.action])
    elif result.action == "dry-run" and result.plan is not None:
        _plan_table(result.plan, stderr=False)
        out.note("Dry run: nothing was changed, and the change set was deleted.")
    elif result.action in ("created", "updated", "no-changes"):
        out.pairs(sorted(result.outputs.items()))
        if result.action == "no-changes":
            out.note(f"No changes: the stack {result.stack_name} is up to date ({result.status}).")
        else:
            out.note(f"The stack {result.stack_name} is {result.status}.")
        written = ", ".join(k for k, v in sorted(result.settings_written.items()) if v is not None)
        if written:
            out.note(f"Wrote {written} to {result.config_path}.")


# --- gpuctl destroy --------------------------------------------------------------------------------

def destroy(
    ctx: typer.Context,
    stack: StackOpt = None,
    delete_data: Annotated[bool, typer.Option(
        "--delete-data", help="Also delete the table and the bucket the stack created (kept by default), after "
                              "a confirmation that names them and counts their items.")] = False,
    yes: YesOpt = False,
    output: OutputOpt = None,
    quiet: Annotated[bool, quiet_opt("the name of the deleted stack")] = False,
) -> None:
    """Delete the stack (queues, Lambda, alarms, roles) and wait until it is gone; keep the team's data.

    The table and the bucket the stack created are kept (the table stays protected against deletion): destroy
    says what it kept and how to remove it. --delete-data removes them too, after its own confirmation (--yes
    answers both questions). Resources of the running system given to deploy with --existing-... are never
    touched. Asks first unless --yes (answering no exits 2). The settings deploy recorded from the stack are
    removed from the profile.

    Examples:

        gpuctl destroy

        gpuctl destroy --stack gpuctl-staging --yes

        gpuctl destroy --stack gpuctl-scratch --delete-data
    """
    from gpuctl.services.deploy import destroy as run_destroy

    app_state, out = state(ctx), state(ctx).renderer(output, quiet)
    _need_confirmation_channel(yes, "destroy")
    with _Progress(out, "Deleting the stack…", yes=yes) as progress:
        result = run_destroy(app_state.gateways.clients, app_state.settings, stack_name=stack,
                             confirm=progress.confirm_destroy, delete_data=delete_data,
                             confirm_data=progress.confirm_delete_data)
    _render_destroy(out, result)


def _render_destroy(out: Renderer, result: DestroyResult) -> None:
    if not result.deleted:
        from gpuctl.errors import Cancelled

        raise Cancelled("Cancelled: nothing was deleted.")
    if out.json:
        out.data(result.document())
    elif out.quiet:
        out.ids([result.stack_name])
    else:
        out.note(f"Deleted the stack {result.stack_name}.")
        for data in result.data_deleted:
            out.note(f"Deleted the {data.kind} {data.name} ({data.counted}).")
        for data in result.kept:
            out.note(f"Kept the {data.kind} {data.name} ({data.counted}). To remove it: {data.how_to_remove()}.")
        if result.kept:
            flags = " ".join(f"--existing-{k.kind} {k.name}" for k in result.kept)
            out.note(f"To use the kept data with a new stack: gpuctl deploy {flags} (and --existing-queue-url for "
                     "a queue that still exists).")
        for kind, name in sorted(result.untouched.items()):
            out.note(f"Left the {kind} {name} alone: it was not part of the stack.")
        if result.forgotten:
            out.note(f"Removed {', '.join(result.forgotten)} from {result.config_path}.")


# --- gpuctl stack status|outputs -------------------------------------------------------------------

@stack_app.command("status")
def status(ctx: typer.Context, stack: StackOpt = None, output: OutputOpt = None,
           quiet: Annotated[bool, quiet_opt("the stack status (CREATE_COMPLETE, …)")] = False) -> None:
    """Show the stack's status, when it changed, and its parameters.

    Exit 1 when there is no such stack.

    Examples:

        gpuctl stack status

        gpuctl stack status --output json | jq -r .status
    """
    from gpuctl.services.deploy import stack_status

    app_state, out = state(ctx), state(ctx).renderer(output, quiet)
    info = stack_status(app_state.gateways.clients, app_state.settings, stack_name=stack)
    if out.json:
        out.data(info.document())
    elif out.quiet:
        out.ids([info.status])
    else:
        out.pairs(_status_pairs(info))


@stack_app.command("outputs")
def outputs(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="Only this output (e.g. OperatorPolicyArn).",
                                               show_default=False)] = None,
    stack: StackOpt = None,
    output: OutputOpt = None,
    quiet: Annotated[bool, quiet_opt("the value of NAME (without NAME: NAME=VALUE lines)")] = False,
) -> None:
    """Show the stack's outputs (what deploy writes into the profile, and more), every value whole.

    Exit 1 when there is no such stack or no such output.

    Examples:

        gpuctl stack outputs

        gpuctl stack outputs OperatorPolicyArn -q

        gpuctl stack outputs --output json | jq -r .OperatorPolicyArn
    """
    from gpuctl.errors import NotFound
    from gpuctl.services.deploy import stack_outputs

    app_state, out = state(ctx), state(ctx).renderer(output, quiet)
    values = stack_outputs(app_state.gateways.clients, app_state.settings, stack_name=stack)
    if name is not None:
        if name not in values:
            known = ", ".join(values) or "none"
            raise NotFound(f"The stack has no output {name!r}; its outputs are: {known}.")
        values = {name: values[name]}
    if out.json:
        out.data(values)
    elif out.quiet:
        out.ids(values.values() if name is not None else (f"{k}={v}" for k, v in values.items()))
    else:
        out.table(["Output", "Value"], sorted(values.items()))


def _status_pairs(info: StackInfo) -> list[tuple[str, Any]]:
    doc = info.document()
    pairs: list[tuple[str, Any]] = [("stack", info.name), ("status", info.status), ("reason", info.status_reason),
                                    ("created", when(doc["created_at"])), ("updated", when(doc["updated_at"]))]
    pairs += [(f"  {k}", v) for k, v in sorted(info.parameters.items())]
    return [(k, v) for k, v in pairs if v is not None]


# --- progress and confirmation ---------------------------------------------------------------------

def _need_confirmation_channel(confirmed: bool, command: str) -> None:
    if not confirmed and not sys.stdin.isatty():
        raise UsageError(f"`gpuctl {command}` asks for confirmation, but there is no terminal to ask on: "
                         "pass --yes" + (" (or --dry-run to only look)." if command == "deploy" else "."))


class _Progress:
    """Deploy progress on stderr: a spinner with one line per step and stack event on a terminal, plain
    lines otherwise; silent with --output json or -q. It also asks the confirmation questions."""

    def __init__(self, out: Renderer, title: str, *, yes: bool) -> None:
        self._out = out
        self._title = title
        self._yes = yes
        self._status: Status | None = None

    def __enter__(self) -> _Progress:
        if self._out.interactive:
            self._status = err_console().status(self._title)
            self._status.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._status is not None:
            self._status.stop()

    def _line(self, text: str, style: str | None = None) -> None:
        if not self._out.json and not self._out.quiet:
            err_console().print(text, style=style, markup=False, highlight=False, soft_wrap=True)

    def step(self, message: str) -> None:
        if self._status is not None:
            self._status.update(message)
        self._line(message)

    def event(self, event: StackEvent) -> None:
        style = "red" if event.failed else "green" if event.status.endswith("_COMPLETE") else None
        reason = f" — {event.reason}" if event.reason else ""
        self._line(f"{event.timestamp.astimezone(dt.UTC):%H:%M:%SZ}  {event.status:<30} {event.logical_id} "
                   f"({event.resource_type}){reason}", style=style)

    def _ask(self, question: str) -> bool:
        if self._yes:
            return True
        if self._status is not None:
            self._status.stop()
        answer = ask(question)
        if self._status is not None:
            self._status.start()
        return answer

    def review(self, plan: DeployPlan) -> bool:
        if not (self._yes and (self._out.json or self._out.quiet)):
            if self._status is not None:
                self._status.stop()
            _plan_table(plan, stderr=True)
            if self._status is not None:
                self._status.start()
        return self._ask(f"Execute this change set on {plan.stack_name}?")

    def confirm_destroy(self, plan: DestroyPlan) -> bool:
        info = plan.info
        lost = ""
        if plan.queued_messages:
            lost = f" {plan.queued_messages} messages still in its queue are lost (their jobs then end as lost)."
        kept = " and ".join(f"the {k.kind} {k.name} ({k.counted})" for k in plan.kept)
        keeps = f" It keeps {kept}." if kept else ""
        return self._ask(f"Delete the stack {info.name} ({info.status}) with its queues, Lambda, alarms and "
                         f"roles?{lost}{keeps}")

    def confirm_delete_data(self, plan: DestroyPlan) -> bool:
        stores = " and ".join(f"the {k.kind} {k.name} with {k.counted}" for k in plan.kept)
        return self._ask(f"Also DELETE {stores}, for good? Jobs, their history and every result are lost.")


def _plan_table(plan: DeployPlan, *, stderr: bool) -> None:
    """The change set: on stdout (a dry run's data) through the renderer's rules; on stderr (the review before
    the question) as a Rich table whose cells fold rather than being cut."""
    verb = "create" if plan.change_type == "CREATE" else "update"
    title = f"Change set: {verb} {plan.stack_name}"
    rows = [(c.action, c.logical_id, c.resource_type, c.replacement or "") for c in plan.changes]
    empty = None if plan.changes else "CloudFormation listed no resource changes."
    lines = [f"  parameter {key}: {old if old is not None else '(new)'} → {new}"
             for key, (old, new) in sorted(plan.parameter_changes.items())]
    if not stderr:
        from gpuctl.cli._output import OutputFormat

        out = Renderer(OutputFormat.TEXT, quiet=False)
        out.table(["Action", "Resource", "Type", "Replacement"], rows, title=title)
        if empty:
            out.note(empty)
        out.ids(lines)
        return
    lines = [empty, *lines] if empty else lines
    from rich.table import Column, Table

    table = Table(*(Column(name, overflow="fold") for name in ("Action", "Resource", "Type", "Replacement")),
                  title=title, title_justify="left", header_style="bold")
    for row in rows:
        table.add_row(*row)
    err_console().print(table)
    for line in lines:
        err_console().print(line, markup=False, highlight=False, soft_wrap=True)
