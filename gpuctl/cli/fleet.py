"""`gpuctl fleet status|scale`: fleet mode's Auto Scaling group (setting ``fleet_group``)."""

from __future__ import annotations

from typing import Annotated

import typer

from gpuctl.cli import state
from gpuctl.cli._output import OutputOpt, quiet_opt, when

__all__ = ["app"]

app = typer.Typer(help="Fleet mode: show the GPU instances' Auto Scaling group, and keep a floor of instances.",
                  no_args_is_help=True)


@app.command("status")
def status(ctx: typer.Context, output: OutputOpt = None,
           quiet: Annotated[bool, quiet_opt("the desired capacity")] = False) -> None:
    """Show the group's desired/min/max size, its floor, and each instance: lifecycle state, scale-in protection,
    jobs in hand and their last heartbeat.

    Examples:

        gpuctl fleet status

        gpuctl fleet status --output json | jq '.instances[] | select(.protected)'
    """
    from gpuctl.services.fleet import fleet_status

    out = state(ctx).renderer(output, quiet)
    info = fleet_status(state(ctx).gateways)
    if info.floor_warning and not out.json:
        out.warn(info.floor_warning)
    if out.json:
        out.data(info.document())
        return
    if out.quiet:
        out.ids([str(info.desired)])
        return
    floor = f"{info.floor} until {when(info.floor_until)}" if info.floor else "none"
    if info.floor and info.floor_reason:
        floor += f" ({info.floor_reason})"
    out.pairs([("group", info.group), ("desired", info.desired), ("min", info.min_size), ("max", info.max_size),
               ("floor", floor)])
    if info.members:
        out.table(["Instance", "State", "Protected", "Jobs", "Last heartbeat", "Type", "Zone"],
                  ([m.instance_id, m.lifecycle_state, "yes" if m.protected else "no", m.jobs_in_hand,
                    when(m.last_heartbeat_at) or "", m.instance_type or "", m.zone or ""] for m in info.members))
    else:
        out.note("No instances: the fleet is scaled in to 0 (a submit or the scheduler scales it out).")
    if info.unassigned_jobs:
        out.note(f"{info.unassigned_jobs} processing job(s) name no instance of the group (an adapter outside "
                 "the fleet, or an instance that has left it).")


@app.command("scale")
def scale(
    ctx: typer.Context,
    count: Annotated[int, typer.Argument(help="Keep at least this many instances (0 removes the floor).",
                                         show_default=False)],
    for_: Annotated[str | None, typer.Option("--for", help="How long: 30m, 2h, 1d (at most 7d; default 1h).",
                                             show_default=False)] = None,
    reason: Annotated[str | None, typer.Option("--reason", help="Why, shown by `fleet status`.")] = None,
    output: OutputOpt = None,
    quiet: Annotated[bool, quiet_opt("the desired capacity after the change")] = False,
) -> None:
    """Keep a floor of COUNT instances for a while (like `instance hold`), scaling out to it now.

    The scheduler never goes below the floor until it expires, and sizes the group from the backlog above it.
    `gpuctl fleet scale 0` removes the floor (an idle fleet then scales in to 0 after the idle window).

    Examples:

        gpuctl fleet scale 4 --for 2h --reason "release batch"

        gpuctl fleet scale 0
    """
    from gpuctl.services.fleet import scale as set_floor

    out = state(ctx).renderer(output, quiet)
    result = set_floor(state(ctx).gateways, count, for_, reason)
    if out.json:
        out.data(result.document())
    elif out.quiet:
        out.ids([str(result.desired)])
    elif result.floor == 0:
        out.note(f"Removed the floor of {result.group}; the scheduler sizes it from the work "
                 f"(desired {result.desired}).")
    else:
        moved = result.desired != result.desired_before
        change = (f"scaled out from {result.desired_before} to {result.desired}" if moved
                  else f"desired capacity stays {result.desired}")
        out.note(f"{result.group} keeps at least {result.floor} instance(s) until {when(result.floor_until)}"
                 + (f" ({result.reason})" if result.reason else "") + f"; {change}.")
