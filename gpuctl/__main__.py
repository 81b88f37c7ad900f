"""Entry point and the one error boundary: GpuctlError → ``Error: <sentence>`` on stderr + its exit code."""

from __future__ import annotations

import os
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the process exit code."""
    import typer

    from gpuctl.cli import app
    from gpuctl.errors import EXIT_INTERRUPTED, EXIT_USAGE, GpuctlError

    args = sys.argv[1:] if argv is None else argv
    debug = os.environ.get("GPUCTL_DEBUG", "") not in ("", "0") or "--debug" in args
    try:
        # Without standalone mode Typer *returns* the code of a typer.Exit, and turns Ctrl-C into a returned
        # 130, instead of raising: the return value is the exit code.
        returned = app(args=args, prog_name="gpuctl", standalone_mode=False)
    except GpuctlError as exc:
        if debug:
            raise
        _error(str(exc))
        return exc.exit_code
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.TyperException as exc:
        # Usage errors (Typer ships its own click): "Usage: …" and "Error: …" on stderr, exit 2.
        exc.show()  # type: ignore[attr-defined]
        return int(getattr(exc, "exit_code", EXIT_USAGE) or EXIT_USAGE)
    except (typer.Abort, KeyboardInterrupt):
        _error("Interrupted.")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `gpuctl jobs list | head`: the reader went away; that is not an error.
        sys.stderr.close()
        return 0
    code = returned if isinstance(returned, int) and not isinstance(returned, bool) else 0
    if code == EXIT_INTERRUPTED:
        _error("Interrupted.")
    return code


def _error(message: str) -> None:
    from gpuctl.cli._output import err_console

    err_console().print(f"[bold red]Error:[/] {message}", highlight=False, markup=True, soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
