"""`gpuctl queue stats|redrive|purge`: the job queue and its dead-letter queue."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from gpuctl.cli import state
from gpuctl.cli._output import OutputOpt, ask, quiet_opt

__all__ = ["app"]

app = typer.Typer(help="Inspect the job queue, redrive its dead letters, purge it.", no_args_is_help=True)


@app.command("stats")
def stats(ctx: typer.Context, output: OutputOpt = None,
          quiet: Annotated[bool, quiet_opt("the number of visible messages")] = False) -> None:
    """Show the queue's counts: visible, in flight, delayed, and the dead-letter queue's depth.

    SQS counts are approximate and lag by a few seconds.

    With -q, prints the visible count.

    Examples:

        gpuctl queue stats

        gpuctl queue stats --output json | jq .dlq
    """
    from gpuctl.services.queue import queue_stats

    out = state(ctx).renderer(output, quiet)
    s = queue_stats(state(ctx).gateways)
    doc = {"visible": s.visible, "in_flight": s.in_flight, "delayed": s.delayed, "dlq": s.dlq_visible,
           "max_receive_count": s.max_receive_count, "visibility_timeout": s.visibility_timeout}
    if out.json:
        out.data(doc)
    elif out.quiet:
        out.ids([str(s.visible)])
    else:
        out.pairs((k.replace("_", " "), "n/a" if v is None else v) for k, v in doc.items())


@app.command("redrive")
def redrive(ctx: typer.Context, output: OutputOpt = None,
            quiet: Annotated[bool, quiet_opt("the number of messages moved")] = False) -> None:
    """Move the dead-letter queue's messages back to the job queue.

    Uses SQS's StartMessageMoveTask where available, else receives, re-sends and deletes them.

    A message is deleted only after its copy is queued. With -q, prints how many were moved.

    Examples:

        gpuctl queue redrive
    """
    from gpuctl.services.queue import redrive_dlq

    out = state(ctx).renderer(output, quiet)
    moved = redrive_dlq(state(ctx).gateways)
    if out.json:
        out.data({"moved": moved.moved, "method": moved.method, "task_handle": moved.task_handle})
        return
    out.ids([str(moved.moved)])
    how = ("an SQS message move task (it runs in the background)" if moved.method == "message-move-task"
           else "receive, send and delete")
    out.note(f"Moved {moved.moved} message{'s' if moved.moved != 1 else ''} from the dead-letter queue "
             f"back to the job queue using {how}.")


@app.command("purge")
def purge(
    ctx: typer.Context,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    output: OutputOpt = None,
    quiet: Annotated[bool, quiet_opt("the URL of the queue purged")] = False,
) -> None:
    """Delete every message in the job queue; the jobs they carried end failed. Asks first unless --yes.

    Without a terminal to ask on, --yes is required (exit 2 otherwise); answering no exits 2 too.

    Examples:

        gpuctl queue purge

        gpuctl queue purge --yes
    """
    from gpuctl.errors import Cancelled, UsageError
    from gpuctl.services.queue import purge_queue

    out, gw = state(ctx).renderer(output, quiet), state(ctx).gateways
    queue_url = gw.queue.queue_url
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError("Refusing to purge the queue without confirmation: pass --yes.")
        if not ask(f"Delete every message in {queue_url}?"):
            raise Cancelled("Not purged: nothing was deleted.")
    failed = purge_queue(gw)
    if out.json:
        out.data({"queue_url": queue_url, "purged": True, "jobs_failed": failed})
        return
    out.ids([queue_url])
    out.note(f"Purged {queue_url}; {failed} pending job{'s' if failed != 1 else ''} marked failed.")
