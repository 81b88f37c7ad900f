"""Entry point and the one error boundary: every exit code of every command is decided here.

* ``GpuctlError`` → ``Error: <sentence>`` on stderr and its ``exit_code`` (gpuctl/errors.py lists them).
* Click/Typer usage errors (an unknown option, a missing argument, no arguments at all) → their text, exit 2.
* Ctrl-C anywhere (``KeyboardInterrupt``, Typer's returned 130, ``typer.Abort``) → ``Error: Interrupted.``, 130.
* A reader that went away (``gpuctl jobs list | head``) → 0, nothing more printed.

Nothing below this prints an error or picks an exit code; commands raise, this module reports.
"""

from __future__ import annotations

import os
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the process exit code."""
    from gpuctl.errors import EXIT_INTERRUPTED

    args = sys.argv[1:] if argv is None else list(argv)
    debug = os.environ.get("GPUCTL_DEBUG", "") not in ("", "0") or "--debug" in args
    if argv is None:
        # The real process. pydantic would scan every installed distribution's entry points for plugins at the first
        # model (tens of ms); gpuctl uses none.
        os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
        if not debug and not sys.warnoptions:
            # A library's warning (with its site-packages path) is never for the user. In-process callers (the
            # tests) keep their own warning filters.
            import warnings

            warnings.simplefilter("ignore")
    try:
        _check_arguments(args)
        return _run(args, debug)
    except _BadArgument as exc:
        _error(str(exc))
        return 2
    except KeyboardInterrupt:
        # Ctrl-C while the CLI was still importing, or while an error was being reported.
        _error("Interrupted.")
        return EXIT_INTERRUPTED


def _run(args: list[str], debug: bool) -> int:
    import typer

    from gpuctl.cli import COMPLETE_VAR, app_for
    from gpuctl.errors import EXIT_INTERRUPTED, EXIT_USAGE, GpuctlError

    if os.environ.get(COMPLETE_VAR):
        # A completion script is asking (`gpuctl completion bash`): Typer's completion classes answer it.
        from typer._completion_classes import completion_init

        completion_init()

    try:
        # Without standalone mode Typer *returns* the code of a typer.Exit, and turns Ctrl-C into a returned
        # 130, instead of raising: the return value is the exit code.
        returned = app_for(args)(args=args, prog_name="gpuctl", standalone_mode=False)
    except GpuctlError as exc:
        if debug:
            raise
        _error(str(exc))
        return exc.exit_code
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.TyperException as exc:
        # Usage errors (Typer ships its own click): "Usage: …" and "Error: …" on stderr, exit 2. Typer checks
        # values with pydantic, whose messages start with its error kind; the user needs only the sentence.
        message = getattr(exc, "message", None)
        if isinstance(message, str):
            exc.message = message.replace("Value error, ", "")
        exc.show()  # type: ignore[attr-defined]
        return int(getattr(exc, "exit_code", EXIT_USAGE) or EXIT_USAGE)
    except (typer.Abort, KeyboardInterrupt):
        _error("Interrupted.")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `gpuctl jobs list | head`: the reader went away; that is not an error.
        _silence_stdout()
        return 0
    code = returned if isinstance(returned, int) and not isinstance(returned, bool) else 0
    if code == EXIT_INTERRUPTED:
        _error("Interrupted.")
    return code


class _BadArgument(Exception):
    pass


def _check_arguments(args: list[str]) -> None:
    """Refuse an argument that is not UTF-8 text (Python hands such bytes over as lone surrogates, which would fail
    far later, in the middle of an AWS request)."""
    for position, arg in enumerate(args, start=1):
        for char in arg:
            if "\udc80" <= char <= "\udcff":
                raise _BadArgument(f"Argument {position} is not valid UTF-8 text (byte 0x{ord(char) - 0xDC00:02x}); "
                                   "gpuctl takes UTF-8 arguments.")
            if "\ud800" <= char <= "\udfff":
                raise _BadArgument(f"Argument {position} is not valid UTF-8 text; gpuctl takes UTF-8 arguments.")


def _silence_stdout() -> None:
    # Python flushes stdout again at exit and would report the broken pipe; point it at /dev/null instead.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _sentence(message: str) -> str:
    """The message as one clean sentence: invisible and control characters escaped, one final full stop."""
    from gpuctl.inputs import display

    text = " ".join(display(line, limit=100_000) for line in message.strip().splitlines())
    while text.endswith(".."):
        text = text[:-1]
    return text


def _error(message: str) -> None:
    from rich.text import Text

    from gpuctl.cli._output import err_console

    # A Text, not markup: a file name such as "[red]x.png" is printed as it is.
    err_console().print(Text.assemble(("Error:", "bold red"), " ", _sentence(message)), highlight=False,
                        soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
