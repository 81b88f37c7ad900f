"""`gpuctl doctor`: is the deployed setup safe and cheap? Each check passes, warns or fails, with the fix."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from gpuctl.cli import state
from gpuctl.cli._output import OutputOpt, quiet_opt

if TYPE_CHECKING:
    from gpuctl.cli._output import Renderer
    from gpuctl.models import JobRecord
    from gpuctl.services.canary import CanaryResult
    from gpuctl.services.doctor import Finding

__all__ = ["register"]

_MARK = {"pass": "ok  ", "warn": "WARN", "fail": "FAIL"}


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)


def doctor(
    ctx: typer.Context,
    job_timeout: Annotated[float | None, typer.Option(
        "--job-timeout", help="The adapter's job timeout in seconds, when not its default (1800).")] = None,
    check: Annotated[list[str] | None, typer.Option(
        "--check", metavar="NAME", help="Run only this check (a finding's name such as queue.dlq, or a prefix such "
        "as queue); repeatable. --check canary runs the canary alone.")] = None,
    canary: Annotated[bool, typer.Option(
        "--canary", help="Also submit a tiny real job (a 256x256 camera-angle, 4 steps; marked canary) and time each "
        "stage: queue wait, boot, execution, publish. It starts the GPU instance when it is stopped, which costs "
        "at least a minute of GPU time.")] = False,
    canary_timeout: Annotated[float, typer.Option(
        "--canary-timeout", help="Give the canary up (and cancel it) after this many seconds.")] = 900.0,  # =
    # gpuctl.services.canary.DEFAULT_CANARY_TIMEOUT (not imported here: --help stays light)
    output: OutputOpt = None,
    quiet: Annotated[bool, quiet_opt("the findings that are not a pass")] = False,
) -> None:
    """Check the deployed stack against the invariants that keep it safe and cheap: queue visibility vs the
    adapter's heartbeat, the dead-letter queue, idle window vs job timeout, the alarm and the rules, the
    scheduler's environment, the instance profile, the table's index and TTL, the bucket's lifecycle, the CLI
    profile, and the adapter's heartbeat while the instance runs. --canary then runs one tiny job end to end.

    Exit code 1 when a check fails or the canary fails or times out (warnings exit 0); 130 when interrupted (the
    canary job it leaves is named). -q prints only the findings that are not a pass.

    Examples:

        gpuctl doctor

        gpuctl doctor --check queue --check adapter.heartbeat

        gpuctl doctor --canary --canary-timeout 600

        gpuctl doctor --output json | jq '.findings[] | select(.level != "pass")'
    """
    import dataclasses

    from gpuctl.errors import UsageError
    from gpuctl.services.doctor import AdapterTunables, run_checks, select_checks, worst
    from gpuctl.services.watch import check_wait_options

    out = state(ctx).renderer(output, quiet)
    tunables = AdapterTunables.defaults()
    if job_timeout is not None:
        if job_timeout <= 0:
            raise UsageError(f"--job-timeout must be a positive number of seconds, got {job_timeout:g}.")
        tunables = dataclasses.replace(tunables, job_timeout=job_timeout)
    names = list(check or [])
    if "canary" in names:
        canary = True
        names = [n for n in names if n != "canary"]
    if canary:
        try:
            check_wait_options(canary_timeout)
        except UsageError:
            raise UsageError("--canary-timeout must be a positive number of seconds.") from None
    only = select_checks(names) if check else None
    findings = run_checks(state(ctx).gateways, tunables, only)
    if not out.json:
        _show(out, findings)
    canary_doc = None
    if canary:
        result = _run_canary(ctx, out, canary_timeout)
        canary_doc = result.document()
        if not out.json:
            _show(out, result.findings())
        findings += result.findings()
    level = worst(findings)
    if out.json:
        out.data({"worst": level, "findings": [f.document() for f in findings], "canary": canary_doc})
    else:
        counts = {name: sum(1 for f in findings if f.level == name) for name in ("pass", "warn", "fail")}
        out.note(f"{counts['pass']} passed, {counts['warn']} warnings, {counts['fail']} failed.")
    if level == "fail":
        raise typer.Exit(1)


def _show(out: Renderer, findings: list[Finding]) -> None:
    for f in findings:
        if out.quiet and f.level == "pass":
            continue
        typer.echo(f"{_MARK[f.level]}  {f.check}: {f.message}")
        if f.fix and f.level != "pass":
            typer.echo(f"      fix: {f.fix}")


def _run_canary(ctx: typer.Context, out: Renderer, timeout: float) -> CanaryResult:
    from gpuctl.cli._signals import SignalGuard
    from gpuctl.services.canary import run_canary

    def submitted(record: JobRecord) -> None:
        out.note(f"Canary job {record.task_id} is queued; following it (at most {timeout:g} s) …")

    with SignalGuard() as guard:
        return run_canary(state(ctx).gateways, timeout=timeout, guard=guard, on_submitted=submitted)
