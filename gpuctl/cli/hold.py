"""`gpuctl instance hold|release|why-stopped`: keep the GPU instance up on purpose; why it last stopped."""

from __future__ import annotations

from typing import Annotated

import typer

from gpuctl.cli import state
from gpuctl.cli._output import OutputOpt, quiet_opt, when

__all__ = ["register"]


def register(instance_app: typer.Typer) -> None:
    """Add `hold`, `release` and `why-stopped` to the `instance` group."""
    instance_app.command("hold")(hold)
    instance_app.command("release")(release)
    instance_app.command("why-stopped")(why_stopped)


def hold(
    ctx: typer.Context,
    for_: Annotated[str, typer.Option("--for", help="How long: 30m, 2h, 1d (at most 7d).", show_default=False)],
    reason: Annotated[str | None, typer.Option("--reason", help="Why, shown by `instance status`.")] = None,
    output: OutputOpt = None,
    quiet: Annotated[bool, quiet_opt("the end of the hold (ISO 8601 UTC)")] = False,
) -> None:
    """Keep the idle scheduler from stopping the instance for a while (it does not start it).

    Holding again replaces the hold; `gpuctl instance release` ends it early.

    Examples:

        gpuctl instance hold --for 2h --reason "debugging the adapter"

        gpuctl instance hold --for 30m --output json
    """
    from gpuctl.services.fleet import not_in_fleet_mode

    not_in_fleet_mode(state(ctx).gateways, "hold")
    from gpuctl.services.hold import hold as set_hold

    out = state(ctx).renderer(output, quiet)
    result = set_hold(state(ctx).gateways, for_, reason)
    doc = result.document()
    if out.json:
        out.data(doc)
    elif out.quiet:
        out.ids([doc["hold_until_iso"]])
    else:
        out.note(f"The instance {result.instance_id} is held until {when(result.until)}"
                 + (f" ({result.reason})." if result.reason else "."))
        if result.state not in ("running", "pending"):
            out.warn(f"it is {result.state}: a hold only prevents idle stops; `gpuctl instance start` starts it.")


def release(ctx: typer.Context, output: OutputOpt = None,
            quiet: Annotated[bool, quiet_opt("the end of the hold that was released (empty: there was none)")]
            = False) -> None:
    """End the hold: the scheduler may stop the instance again once it is idle.

    Examples:

        gpuctl instance release
    """
    from gpuctl.services.fleet import not_in_fleet_mode

    not_in_fleet_mode(state(ctx).gateways, "release")
    from gpuctl.services.hold import release as end_hold

    out = state(ctx).renderer(output, quiet)
    previous = end_hold(state(ctx).gateways)
    if out.json:
        out.data({**previous.document(), "released": previous.until is not None})
    elif out.quiet:
        out.ids([previous.document()["hold_until_iso"] or ""])
    elif previous.until is None:
        out.note(f"The instance {previous.instance_id} had no hold.")
    else:
        out.note(f"Released the hold on {previous.instance_id} (it was until {when(previous.until)}).")


def why_stopped(ctx: typer.Context, output: OutputOpt = None,
                quiet: Annotated[bool, quiet_opt("the reason of the last stop")] = False) -> None:
    """Show why and when the instance was last stopped (by the idle scheduler or `gpuctl instance stop`).

    Examples:

        gpuctl instance why-stopped

        gpuctl instance why-stopped --output json | jq -r .stopped_reason
    """
    from gpuctl.services.fleet import not_in_fleet_mode

    not_in_fleet_mode(state(ctx).gateways, "why-stopped")
    from gpuctl.services.hold import why_stopped as last_stop

    out = state(ctx).renderer(output, quiet)
    record = last_stop(state(ctx).gateways)
    if out.json:
        out.data(record.document())
    elif out.quiet:
        out.ids([record.reason or "no recorded stop"])
    elif not record.recorded:
        out.pairs([("instance", record.instance_id), ("state", record.state), ("last stop", "no recorded stop")])
    else:
        out.pairs([("instance", record.instance_id), ("state", record.state),
                   ("stopped at", when(record.document()["stopped_at"]) or record.stopped_at),
                   ("reason", record.reason), ("stopped by", record.stopped_by)])
