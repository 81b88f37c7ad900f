"""The root Typer app: global options and the command groups (each in its own module)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Annotated

import typer

from gpuctl.cli._output import OutputFormat, Renderer

if TYPE_CHECKING:
    from gpuctl.services.context import Gateways
    from gpuctl.settings import Settings

__all__ = ["AppState", "app", "state"]

app = typer.Typer(
    name="gpuctl",
    help="Operate a scale-to-zero GPU job system on AWS: submit jobs, watch them, manage the instance.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class AppState:
    """Per-invocation state on ``ctx.obj``: the global options, settings and gateways built on demand."""

    def __init__(self, overrides: dict[str, object], output: OutputFormat, quiet: bool, verbose: int) -> None:
        self.overrides = overrides
        self.output = output
        self.quiet = quiet
        self.verbose = verbose

    @functools.cached_property
    def settings(self) -> Settings:
        from gpuctl.settings import load_settings

        return load_settings(**self.overrides)

    @functools.cached_property
    def gateways(self) -> Gateways:
        from gpuctl.services.context import Gateways

        return Gateways(self.settings)

    def renderer(self, output: OutputFormat | None = None, quiet: bool = False) -> Renderer:
        """The renderer for a command, its own --output/-q taking precedence over the global ones."""
        return Renderer(output or self.output, quiet or self.quiet, self.verbose)


def state(ctx: typer.Context) -> AppState:
    obj = ctx.find_root().obj
    assert isinstance(obj, AppState)
    return obj


def _version(value: bool) -> None:
    if value:
        from gpuctl import __version__

        typer.echo(f"gpuctl {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    profile: Annotated[str | None, typer.Option("--profile", envvar="GPUCTL_PROFILE",
                                                help="Config profile to use (default: default).")] = None,
    region: Annotated[str | None, typer.Option("--region", help="AWS region.")] = None,
    endpoint_url: Annotated[str | None, typer.Option(
        "--endpoint-url", help="Send AWS calls to this endpoint (local emulator, LocalStack).")] = None,
    output: Annotated[OutputFormat, typer.Option("--output", "-o", case_sensitive=False,
                                                 help="Output format for data.")] = OutputFormat.TEXT,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the essential value.")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More detail on stderr.")] = 0,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """gpuctl — submit image jobs to the GPU instance and operate it.

    Settings come from flags, then the environment (GPUCTL_*, SQS_QUEUE_URL, DYNAMODB_TABLE,
    GPU_INSTANCE_ID, AWS_DEFAULT_REGION), then the profile's config file (`gpuctl config path`).
    """
    if verbose:
        import logging

        logging.basicConfig(level=logging.DEBUG if verbose > 1 else logging.INFO,
                            format="%(levelname)s %(name)s %(message)s")
    ctx.obj = AppState(
        {"profile": profile, "region": region, "endpoint_url": endpoint_url}, output, quiet, verbose
    )


def _register() -> None:
    from gpuctl.cli import adapter, config, decisions, deploy, hold, instance, jobs, local, queue, submit

    app.add_typer(submit.app, name="submit")
    jobs.register(app)
    hold.register(instance.app)
    decisions.register(instance.app)
    app.add_typer(instance.app, name="instance")
    app.add_typer(queue.app, name="queue")
    deploy.register(app)
    app.add_typer(config.app, name="config")
    app.add_typer(local.app, name="local")
    local.register_demo(app)
    app.add_typer(adapter.app, name="adapter")


_register()
