"""`gpuctl instance status|start|stop`: the one GPU instance."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gpuctl.cli import state
from gpuctl.cli._output import OutputOpt, Renderer, err_console, quiet_opt, when

if TYPE_CHECKING:
    from gpuctl.services.instance import InstanceStatus, StateChange

__all__ = ["app"]

app = typer.Typer(help="Show, start and stop the GPU instance.", no_args_is_help=True)

WaitOpt = Annotated[bool, typer.Option("--wait", help="Wait until EC2 reports the new state.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="With --wait: give up after S seconds (exit 3).")]


@app.command("status")
def status(ctx: typer.Context, output: OutputOpt = None,
           quiet: Annotated[bool, quiet_opt("the state (running, stopped, …)")] = False) -> None:
    """Show the instance's state, type and uptime, and whether it is busy (queue and job counts).

    Examples:

        gpuctl instance status

        gpuctl instance status --output json | jq .busy
    """
    from gpuctl.services.fleet import not_in_fleet_mode

    not_in_fleet_mode(state(ctx).gateways, "status")
    from gpuctl.services.instance import instance_status

    out = state(ctx).renderer(output, quiet)
    info = instance_status(state(ctx).gateways)
    if info.hold_warning and not out.json:
        out.warn(info.hold_warning)
    if out.json:
        out.data(info.document())
    elif out.quiet:
        out.ids([info.state])
    else:
        out.pairs(_status_pairs(info))


@app.command("start")
def start(ctx: typer.Context, wait: WaitOpt = False, timeout: TimeoutOpt = 600.0, output: OutputOpt = None,
          quiet: Annotated[bool, quiet_opt("the state after the start")] = False) -> None:
    """Start the GPU instance (nothing happens if it is already running).

    Examples:

        gpuctl instance start --wait
    """
    from gpuctl.services.fleet import not_in_fleet_mode

    not_in_fleet_mode(state(ctx).gateways, "start")
    from gpuctl.services.instance import start_instance
    from gpuctl.services.watch import check_wait_options

    if wait:
        check_wait_options(timeout)
    out = state(ctx).renderer(output, quiet)
    with _waiting(out, "Waiting for the instance to be running…" if wait else None):
        change = start_instance(state(ctx).gateways, wait=wait, timeout=timeout)
    _render_change(out, change, "started")


@app.command("stop")
def stop(
    ctx: typer.Context,
    force: Annotated[bool, typer.Option("--force", help="Stop even while jobs run or messages wait.")] = False,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = 600.0,
    output: OutputOpt = None,
    quiet: Annotated[bool, quiet_opt("the state after the stop")] = False,
) -> None:
    """Stop the GPU instance; refuses (exit 1) while jobs are processing or messages wait, unless --force.

    Examples:

        gpuctl instance stop

        gpuctl instance stop --force --wait
    """
    from gpuctl.services.fleet import not_in_fleet_mode

    not_in_fleet_mode(state(ctx).gateways, "stop")
    from gpuctl.services.instance import stop_instance
    from gpuctl.services.watch import check_wait_options

    if wait:
        check_wait_options(timeout)
    out = state(ctx).renderer(output, quiet)
    with _waiting(out, "Waiting for the instance to stop…" if wait else None):
        change = stop_instance(state(ctx).gateways, force=force, wait=wait, timeout=timeout)
    _render_change(out, change, "stopped")


def _waiting(out: Renderer, message: str | None) -> AbstractContextManager[Any]:
    if message is None or not out.interactive:
        return nullcontext()
    return err_console().status(message)


def _render_change(out: Renderer, change: StateChange, verb: str) -> None:
    if change.warning:
        out.warn(change.warning)
    if out.json:
        out.data({"instance_id": change.instance_id, "previous_state": change.previous, "state": change.state})
        return
    out.ids([change.state])
    if change.previous == change.state or (verb == "started" and change.previous in ("running", "pending")) \
            or (verb == "stopped" and change.previous in ("stopped", "stopping")):
        out.note(f"The instance {change.instance_id} was already {change.previous}.")
    else:
        out.note(f"The instance {change.instance_id} is {change.state} (was {change.previous}).")


def _duration(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    minutes = int(seconds) // 60
    days, rest = divmod(minutes, 1440)
    hours, mins = divmod(rest, 60)
    return f"{days}d {hours}h {mins}m" if days else f"{hours}h {mins}m" if hours else f"{mins}m"


def _status_pairs(info: InstanceStatus) -> list[tuple[str, Any]]:
    doc, work = info.document(), info.workload
    cap = doc["jobs"]["count_cap"]

    def count(n: int) -> str:
        return f"{n}+" if n >= cap else str(n)

    pairs: list[tuple[str, Any]] = [
        ("instance", info.instance_id),
        ("state", info.state),
        ("type", info.instance_type),
        ("uptime", _duration(info.uptime_seconds)),
        ("busy", f"yes — {work.describe()}" if info.busy else "no"),
        ("queue", f"{work.visible} visible, {work.in_flight} in flight, {work.delayed} delayed"),
        ("dead letters", work.dlq),
        ("jobs", f"{count(work.pending)} pending, {count(work.processing)} processing"),
    ]
    optional = [("hold until", when(doc["hold_until"])), ("hold reason", doc["hold_reason"]),
                ("started at", when(doc["started_at"])),
                ("stopped at", when(doc["stopped_at"])), ("stopped because", doc["stopped_reason"]),
                ("stopped by", doc["stopped_by"])]
    return [(k, v) for k, v in pairs if v is not None] + [(k, v) for k, v in optional if v]


def _register_subcommands() -> None:
    from gpuctl.cli import decisions, hold

    hold.register(app)
    decisions.register(app)


_register_subcommands()
