"""`gpuctl doctor`: is the deployed setup safe and cheap? Each check passes, warns or fails, with the fix."""

from __future__ import annotations

from typing import Annotated

import typer

from gpuctl.cli import state
from gpuctl.cli._output import OutputOpt, quiet_opt

__all__ = ["register"]

_MARK = {"pass": "ok  ", "warn": "WARN", "fail": "FAIL"}


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)


def doctor(
    ctx: typer.Context,
    job_timeout: Annotated[float | None, typer.Option(
        "--job-timeout", help="The adapter's job timeout in seconds, when not its default (1800).")] = None,
    output: OutputOpt = None,
    quiet: Annotated[bool, quiet_opt("the findings that are not a pass")] = False,
) -> None:
    """Check the deployed stack against the invariants that keep it safe and cheap: queue visibility vs the
    adapter's heartbeat, the dead-letter queue, idle window vs job timeout, the alarm and the rules, the
    scheduler's environment, the instance profile, the table's index and TTL, the bucket's lifecycle, the CLI
    profile, and the adapter's heartbeat while the instance runs.

    Exit code 1 when a check fails (warnings exit 0). -q prints only the findings that are not a pass.

    Examples:

        gpuctl doctor

        gpuctl doctor --output json | jq '.findings[] | select(.level != "pass")'
    """
    import dataclasses

    from gpuctl.services.doctor import AdapterTunables, run_checks, worst

    out = state(ctx).renderer(output, quiet)
    tunables = AdapterTunables.defaults()
    if job_timeout is not None:
        if job_timeout <= 0:
            from gpuctl.errors import UsageError

            raise UsageError(f"--job-timeout must be a positive number of seconds, got {job_timeout:g}.")
        tunables = dataclasses.replace(tunables, job_timeout=job_timeout)
    findings = run_checks(state(ctx).gateways, tunables)
    level = worst(findings)
    if out.json:
        out.data({"worst": level, "findings": [f.document() for f in findings]})
    else:
        shown = [f for f in findings if f.level != "pass"] if out.quiet else findings
        for f in shown:
            typer.echo(f"{_MARK[f.level]}  {f.check}: {f.message}")
            if f.fix and f.level != "pass":
                typer.echo(f"      fix: {f.fix}")
        counts = {name: sum(1 for f in findings if f.level == name) for name in ("pass", "warn", "fail")}
        out.note(f"{counts['pass']} passed, {counts['warn']} warnings, {counts['fail']} failed.")
    if level == "fail":
        raise typer.Exit(1)
