"""`gpuctl config show|set|unset|path`: the per-profile config file."""

from __future__ import annotations

from typing import Annotated

import typer

from gpuctl.cli import state
from gpuctl.cli._output import OutputOpt, quiet_opt

__all__ = ["app"]

app = typer.Typer(help="Show and edit the profile's settings (a TOML file per profile).", no_args_is_help=True)

KeyArg = Annotated[str, typer.Argument(help="Setting name, e.g. queue_url or table_name.", show_default=False)]


@app.command("show")
def show(ctx: typer.Context, output: OutputOpt = None,
         quiet: Annotated[bool, quiet_opt("name=value lines of the settings that have a value")] = False) -> None:
    """Show the effective settings and where each comes from (flag, env, file or default).

    Examples:

        gpuctl config show

        gpuctl --profile prod config show --output json
    """
    from gpuctl.services.config import show_config

    out = state(ctx).renderer(output, quiet)
    view = show_config(state(ctx).overrides)
    if out.json:
        out.data(view.document())
        return
    if out.quiet:
        out.ids(f"{e.name}={e.value}" for e in view.entries if e.value is not None)
        return
    out.table(["Setting", "Value", "Source"], ([e.name, e.value, e.source] for e in view.entries),
              title=f"Profile {view.profile} ({view.path})")


@app.command("set")
def set_(
    ctx: typer.Context,
    key: KeyArg,
    value: Annotated[str, typer.Argument(help="The value to store.", show_default=False)],
    quiet: Annotated[bool, quiet_opt("the path of the file written")] = False,
) -> None:
    """Store a setting in the profile's config file (checked before it is written).

    Examples:

        gpuctl config set queue_url https://sqs.eu-west-1.amazonaws.com/123456789012/gpu_tasks_queue

        gpuctl --profile prod config set region eu-west-1
    """
    from gpuctl.services.config import set_setting

    out = state(ctx).renderer(None, quiet)
    name, typed, path = set_setting(state(ctx).overrides, key, value)
    if out.quiet:
        out.ids([path])
    out.note(f"Set {name} = {typed!r} in {path}.")


@app.command("unset")
def unset(ctx: typer.Context, key: KeyArg,
          quiet: Annotated[bool, quiet_opt("the path of the file")] = False) -> None:
    """Remove a setting from the profile's config file.

    Examples:

        gpuctl config unset endpoint_url
    """
    from gpuctl.services.config import unset_setting

    out = state(ctx).renderer(None, quiet)
    name, present, path = unset_setting(state(ctx).overrides, key)
    if out.quiet:
        out.ids([path])
    out.note(f"Removed {name} from {path}." if present else f"{name} was not set in {path}.")


@app.command("path")
def path(ctx: typer.Context) -> None:
    """Print the path of the profile's config file (it may not exist yet).

    Examples:

        $EDITOR "$(gpuctl config path)"
    """
    from gpuctl.services.config import config_path

    typer.echo(str(config_path(state(ctx).overrides)))
