"""Console output: data on stdout (JSON never through Rich), everything else on stderr."""

from __future__ import annotations

import functools
import json
import sys
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from rich.console import Console

__all__ = [
    "OutputFormat",
    "OutputOpt",
    "QuietOpt",
    "Renderer",
    "err_console",
    "out_console",
]


class OutputFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


OutputOpt = Annotated[
    OutputFormat | None,
    typer.Option("--output", "-o", help="Output format: text (tables) or json (stable keys, for scripts).",
                 case_sensitive=False, show_default=False),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print only the essential value (job ids).")]


@functools.cache
def err_console() -> Console:
    from rich.console import Console

    return Console(stderr=True)


@functools.cache
def out_console() -> Console:
    from rich.console import Console

    return Console()


class Renderer:
    """How one command invocation prints: resolved from the global and the command's own options."""

    def __init__(self, output: OutputFormat, quiet: bool, verbose: int = 0) -> None:
        self.output = output
        self.quiet = quiet
        self.verbose = verbose

    @property
    def json(self) -> bool:
        return self.output is OutputFormat.JSON

    @property
    def interactive(self) -> bool:
        return sys.stderr.isatty() and not self.json and not self.quiet

    def data(self, value: Any) -> None:
        """Print a JSON document on stdout."""
        typer.echo(json.dumps(value, indent=2, ensure_ascii=False, default=str))

    def ids(self, ids: Iterable[str]) -> None:
        for value in ids:
            typer.echo(value)

    def note(self, message: str) -> None:
        """Chatter for people, on stderr; silent with -q or --output json."""
        if not self.quiet and not self.json:
            err_console().print(message, highlight=False, soft_wrap=True)

    def warn(self, message: str) -> None:
        """A warning on stderr, always (it is never data)."""
        err_console().print(f"[bold yellow]Warning:[/] {message}", highlight=False, soft_wrap=True)

    def table(self, columns: Sequence[str], rows: Iterable[Sequence[Any]], *, title: str | None = None) -> None:
        from rich.table import Table

        table = Table(*columns, title=title, title_justify="left", header_style="bold")
        for row in rows:
            table.add_row(*("" if v is None else str(v) for v in row))
        out_console().print(table)

    def pairs(self, items: Iterable[tuple[str, Any]]) -> None:
        """Key/value lines for a single object in text mode."""
        from rich.table import Table

        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        for key, value in items:
            table.add_row(key, "" if value is None else str(value))
        out_console().print(table)
