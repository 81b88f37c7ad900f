"""How every command prints: the rendering conventions of gpuctl's output.

* **stdout carries data only**: ``--output json`` (one document, never through Rich), ``-q`` (the one essential
  value of the command, which its help names), or text.
* **Text never cuts a value.** On a terminal, tables and key/value blocks are Rich renderables whose cells fold
  (a long id or URL continues on the next line); piped or redirected, they are plain lines with columns padded
  by spaces, one row per line, every value whole (``-`` for an empty cell), so ``grep``/``awk``/``cut`` work.
* **Times** in text are ISO 8601 UTC with a relative age (``2026-12-01T07:40:41Z (3 min ago)``, gpuctl.times);
  JSON carries ``<name>`` (epoch seconds) and ``<name>_iso``.
* **No escape codes** unless stdout/stderr is a terminal, and never a colour or style with ``NO_COLOR`` set.
  Values from outside (file names, error texts) have control characters escaped, so they cannot move a
  terminal's cursor.
* Everything else — progress, notes, warnings, errors — goes to stderr.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from rich.console import Console

    from gpuctl.models import JobRecord

__all__ = [
    "OutputFormat",
    "OutputOpt",
    "Renderer",
    "ask",
    "err_console",
    "job_state",
    "out_console",
    "quiet_opt",
    "when",
]


class OutputFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


OutputOpt = Annotated[
    OutputFormat | None,
    typer.Option("--output", "-o", help="Output format: text (tables) or json (stable keys, for scripts).",
                 case_sensitive=False, show_default=False),
]


def quiet_opt(what: str) -> Any:
    """The ``-q/--quiet`` option of a command, whose help says which value it prints (``what``).

    Used as ``quiet: Annotated[bool, quiet_opt("the job id")] = False``.
    """
    return typer.Option("--quiet", "-q", help=f"Print only {what}.")


def _no_color() -> bool:
    # https://no-color.org: present and not empty.
    return bool(os.environ.get("NO_COLOR"))


@functools.cache
def err_console() -> Console:
    from rich.console import Console

    return Console(stderr=True, color_system=None if _no_color() else "auto", highlight=False)


@functools.cache
def out_console() -> Console:
    from rich.console import Console

    return Console(color_system=None if _no_color() else "auto", highlight=False)


def _stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def clean(value: Any) -> str:
    """A value as one line of text, whole: control and invisible characters escaped, nothing cut."""
    from gpuctl.inputs import display

    if value is None:
        return ""
    return display(str(value), limit=1_000_000)


def when(epoch: float | None) -> str | None:
    """The text form of a time: ``2026-12-01T07:40:41Z (3 min ago)``."""
    from gpuctl.times import human

    return human(epoch)


def job_state(record: JobRecord) -> str:
    """A job's status in text: ``cancelled`` for a job someone cancelled (its status stays ``failed``)."""
    return "cancelled" if record.cancelled else record.status.value


def ask(question: str) -> bool:
    """Ask a yes/no question on stderr and read the answer from stdin; no answer (end of input) is "no".

    Ctrl-C while asking raises KeyboardInterrupt (exit 130), which is not the same as answering "no" (exit 2).
    """
    err_console().print(f"{question} [y/N]: ", end="", markup=False, highlight=False, soft_wrap=True)
    line = sys.stdin.readline()
    if not line:
        err_console().print()
    return line.strip().lower() in ("y", "yes")


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
        """A person is watching stderr: live views and progress bars are worth drawing."""
        return sys.stderr.isatty() and not self.json and not self.quiet

    def data(self, value: Any) -> None:
        """Print a JSON document on stdout."""
        typer.echo(json.dumps(value, indent=2, ensure_ascii=False, default=str))

    def line(self, value: Any) -> None:
        """One JSON document on one line (a stream of documents, as `watch` prints them)."""
        typer.echo(json.dumps(value, ensure_ascii=False, default=str))

    def ids(self, values: Iterable[Any]) -> None:
        """Bare values, one per line (what -q prints)."""
        for value in values:
            typer.echo(clean(value))

    def note(self, message: str) -> None:
        """Chatter for people, on stderr; silent with -q or --output json."""
        if not self.quiet and not self.json:
            err_console().print(message, markup=False, highlight=False, soft_wrap=True)

    def warn(self, message: str) -> None:
        """A warning on stderr, always (it is never data)."""
        from rich.text import Text

        err_console().print(Text.assemble(("Warning:", "bold yellow"), " ", clean(message)), soft_wrap=True)

    def table(self, columns: Sequence[str], rows: Iterable[Sequence[Any]], *, title: str | None = None) -> None:
        """Rows of values: a folding Rich table on a terminal, plain padded columns otherwise."""
        cells = [[clean(v) for v in row] for row in rows]
        if not _stdout_is_terminal():
            if title:
                self.note(title)
            _plain_columns([list(columns), *([c or "-" for c in row] for row in cells)])
            return
        from rich.table import Table

        table = Table(title=title, title_justify="left", header_style="bold")
        for name in columns:
            table.add_column(name, overflow="fold")
        for row in cells:
            table.add_row(*row)
        out_console().print(table)

    def pairs(self, items: Iterable[tuple[str, Any]]) -> None:
        """Key/value lines for a single object in text mode (empty values left out)."""
        shown = [(key, clean(value)) for key, value in items if value is not None and value != ""]
        if not _stdout_is_terminal():
            _plain_columns([[k, v] for k, v in shown])
            return
        from rich.table import Table

        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold", no_wrap=True)
        table.add_column(overflow="fold")
        for key, value in shown:
            table.add_row(key, value)
        out_console().print(table)


def _plain_columns(rows: list[list[str]]) -> None:
    """Rows padded into columns with two spaces between them; the last column is never padded."""
    if not rows:
        return
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(max(len(r) for r in rows))]
    for row in rows:
        padded = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + row[-1:]
        typer.echo("  ".join(padded).rstrip())
