"""`gpuctl instance decisions`: what the idle scheduler decided recently, why, and the facts it saw."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from gpuctl.cli import state
from gpuctl.cli._output import OutputOpt, quiet_opt

if TYPE_CHECKING:
    from gpuctl.services.decisions import Decision

__all__ = ["register"]


def register(instance_app: typer.Typer) -> None:
    """Add `decisions` to the `instance` group."""
    instance_app.command("decisions")(decisions)


def decisions(
    ctx: typer.Context,
    since: Annotated[str, typer.Option("--since", help="How far back: 30m, 1h, 2d.")] = "1h",
    limit: Annotated[int, typer.Option("--limit", min=1, max=10000, help="At most this many (the newest).")] = 50,
    output: OutputOpt = None,
    quiet: Annotated[bool, quiet_opt("the decision of each record (stop, start, nothing)")] = False,
) -> None:
    """Show the scheduler's recent decisions (stop, start or nothing), why, and the facts it saw.

    Read from the scheduler Lambda's log group (in local mode, the local scheduler loop writes the same records
    there). A run whose AWS calls failed shows the failures; -v adds the facts to the text view.

    Examples:

        gpuctl instance decisions

        gpuctl instance decisions --since 1d --output json | jq '.[] | select(.action == "stop")'
    """
    from gpuctl.services.decisions import recent_decisions
    from gpuctl.services.jobs import parse_duration

    out = state(ctx).renderer(output, quiet)
    seconds = parse_duration(since, option="--since")
    found = recent_decisions(state(ctx).gateways, since_seconds=seconds, limit=limit)
    if out.json:
        out.data([d.document() for d in found])
    elif out.quiet:
        out.ids(f"{d.record.get('action')} {d.record.get('code')}" for d in found)
    else:
        out.table(["decided", "trigger", "action", "outcome", "why"], [_row(d, out.verbose) for d in found])
        if not found:
            out.note(f"No scheduler decision in the last {since}.")


def _row(decision: Decision, verbose: int) -> list[Any]:
    from gpuctl.times import human

    record = decision.record
    why = str(record.get("reason", ""))
    for problem in record.get("errors") or []:
        why += f"; {problem.get('fact')}: {problem.get('code')}"
    for reaped in record.get("reaped") or []:
        why += f"; job {reaped.get('job_id')}: {reaped.get('reason')} ({reaped.get('outcome')})"
    if verbose:
        facts = record.get("facts") or {}
        why += " | " + ", ".join(f"{k}={v}" for k, v in sorted(facts.items()) if v is not None)
    return [human(decision.decided_at), record.get("trigger"), record.get("action"), record.get("outcome"), why]
