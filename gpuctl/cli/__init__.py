"""The root Typer app: global options and the command groups (each in its own module)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gpuctl.cli._output import OutputFormat, Renderer

if TYPE_CHECKING:
    from gpuctl.services.context import Gateways
    from gpuctl.settings import Settings

__all__ = ["COMPLETE_VAR", "AppState", "app", "app_for", "state"]

_SETTINGS: dict[str, Any] = dict(
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
        self.new_profile_ok = False

    def allow_new_profile(self) -> None:
        """For commands that create the profile they are given (deploy): it need not exist yet."""
        self.new_profile_ok = True

    @functools.cached_property
    def settings(self) -> Settings:
        from gpuctl.settings import load_settings

        return load_settings(**self.overrides, require_profile=not self.new_profile_ok)

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


def root(
    ctx: typer.Context,
    profile: Annotated[str | None, typer.Option("--profile", envvar="GPUCTL_PROFILE",
                                                help="Config profile to use (default: default).")] = None,
    region: Annotated[str | None, typer.Option("--region", help="AWS region.")] = None,
    endpoint_url: Annotated[str | None, typer.Option(
        "--endpoint-url", help="Send AWS calls to this endpoint (local emulator, LocalStack).")] = None,
    output: Annotated[OutputFormat, typer.Option("--output", "-o", case_sensitive=False,
                                                 help="Output format for data.")] = OutputFormat.TEXT,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only each command's essential value "
                                        "(its own -q help says which).")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More detail on stderr.")] = 0,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """gpuctl — submit image jobs to the GPU instance and operate it.

    Settings come from flags, then the environment (GPUCTL_*, SQS_QUEUE_URL, DYNAMODB_TABLE,
    GPU_INSTANCE_ID, AWS_DEFAULT_REGION), then the profile's config file (`gpuctl config path`).
    """
    from gpuctl.cli._logging import configure

    configure(verbose)
    ctx.obj = AppState(
        {"profile": profile, "region": region, "endpoint_url": endpoint_url}, output, quiet, verbose
    )


def completion(
    shell: Annotated[str, typer.Argument(help="bash, zsh or fish.", show_default=False)],
) -> None:
    """Print the shell completion script for SHELL; load it from your shell's startup file.

    Examples:

        eval "$(gpuctl completion bash)"          # in ~/.bashrc

        gpuctl completion zsh > ~/.zfunc/_gpuctl  # with fpath+=~/.zfunc in ~/.zshrc

        gpuctl completion fish > ~/.config/fish/completions/gpuctl.fish
    """
    from typer._completion_shared import get_completion_script

    from gpuctl.errors import UsageError

    name = shell.strip().lower()
    if name not in ("bash", "zsh", "fish"):
        raise UsageError(f"No completion for the shell {shell!r}; choose bash, zsh or fish.")
    typer.echo(get_completion_script(prog_name="gpuctl", complete_var=COMPLETE_VAR, shell=name))


#: The environment variable the completion scripts set when they ask gpuctl for completions.
COMPLETE_VAR = "_GPUCTL_COMPLETE"


def _add(root_app: typer.Typer, group: str) -> None:
    """Register one top-level command (or group of commands) on ``root_app``, importing only its module."""
    import importlib

    if group == "completion":
        root_app.command("completion")(completion)
        return
    module = importlib.import_module(f"gpuctl.cli.{group}")
    if group in ("jobs", "deploy", "doctor", "serve"):
        module.register(root_app)
    else:
        root_app.add_typer(module.app, name=group)
        if group == "local":
            module.register_demo(root_app)


#: Top-level command → the group `_add` registers it with.
_GROUP_OF = {"submit": "submit", "status": "jobs", "watch": "jobs", "result": "jobs", "jobs": "jobs",
             "instance": "instance", "queue": "queue", "deploy": "deploy", "destroy": "deploy", "stack": "deploy",
             "config": "config", "local": "local", "demo": "local", "adapter": "adapter", "completion": "completion",
             "serve": "serve", "cost": "cost", "doctor": "doctor", "fleet": "fleet"}
_GROUPS = ("submit", "jobs", "instance", "fleet", "queue", "cost", "doctor", "deploy", "config", "local", "adapter",
           "serve", "completion")
#: Root options that take a value (the command name is the first argument that is neither these nor a flag).
_VALUE_OPTIONS = frozenset({"--profile", "--region", "--endpoint-url", "--output", "-o"})


def _command_name(args: list[str]) -> str | None:
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in _VALUE_OPTIONS:
            skip = True
        elif arg == "--":
            return None
        elif not arg.startswith("-"):
            return arg
    return None


def app_for(args: list[str]) -> typer.Typer:
    """The root app with only the command ``args`` invoke (the whole app for help, completion or a typo).

    Typer builds the click command of every registered command on each run, reading every signature; building
    only the one invoked keeps start-up short (the whole tree is about 60 ms of `gpuctl submit`)."""
    import os

    name = _command_name(args)
    group = _GROUP_OF.get(name or "")
    if group is None or os.environ.get(COMPLETE_VAR):
        return _whole_app()
    narrow = typer.Typer(**_SETTINGS)
    narrow.callback()(root)
    _add(narrow, group)
    return narrow


@functools.cache
def _whole_app() -> typer.Typer:
    whole = typer.Typer(**_SETTINGS)
    whole.callback()(root)
    for group in _GROUPS:
        _add(whole, group)
    return whole


def __getattr__(name: str) -> Any:
    # `gpuctl.cli.app`, the whole CLI with every command registered, is built (and every command module imported)
    # only when someone asks for it; the entry point imports just the command it runs (`app_for`).
    if name == "app":
        return _whole_app()
    raise AttributeError(name)
