"""`gpuctl status`, `watch`, `result` and the `gpuctl jobs` group (list, cancel, retry)."""

from __future__ import annotations

import json
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gpuctl.cli import state
from gpuctl.cli._output import OutputFormat, OutputOpt, Renderer, clean, err_console, job_state, quiet_opt, when

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from gpuctl.models import JobRecord
    from gpuctl.services.jobs import DownloadTarget, ResultFile
    from gpuctl.services.watch import WatchResult

__all__ = ["follow", "jobs_app", "register"]

jobs_app = typer.Typer(help="List, cancel and retry jobs.", no_args_is_help=True)

JobIdArg = Annotated[str, typer.Argument(help="The job id (a UUID) that submit printed.", show_default=False)]
# `result` uses -o for the file to write, as `curl -o` does; its format option is --output only.
FormatOpt = Annotated[
    OutputFormat | None,
    typer.Option("--output", help="Output format: text or json.", case_sensitive=False, show_default=False),
]


def register(app: typer.Typer) -> None:
    """Add the top-level job commands and the `jobs` group to the root app."""
    app.command("status")(status)
    app.command("watch")(watch)
    app.command("result")(result)
    app.add_typer(jobs_app, name="jobs")


# --- gpuctl status ---------------------------------------------------------------------------------

def status(
    ctx: typer.Context,
    job_id: JobIdArg,
    output: OutputOpt = None,
    quiet: Annotated[bool, quiet_opt("the status: pending, processing, completed or failed")] = False,
) -> None:
    """Show a job's status: pending, processing, completed (with the result URL) or failed (with why).

    A cancelled job reads "cancelled" (its status stays failed; JSON: "cancelled": true). For a pending job
    whose cause gpuctl can tell (the instance is stopped, nothing polls the queue) it also says why it waits
    (stderr; `diagnosis` in JSON).

    Exit 1 if there is no such job, 2 if JOB_ID is not a job id.

    Examples:

        gpuctl status 3f2b8c1e-4d5a-4b6c-8d7e-9f0a1b2c3d4e

        gpuctl status $JOB --output json | jq -r .result_s3_uri
    """
    from gpuctl.services.diagnose import diagnose_job
    from gpuctl.services.jobs import get_job

    out = state(ctx).renderer(output, quiet)
    record = get_job(state(ctx).gateways, job_id)
    why = diagnose_job(state(ctx).gateways, record)
    if out.json:
        out.data({**record.status_document(), "diagnosis": why.document() if why else None})
    elif out.quiet:
        out.ids([record.status.value])
    else:
        out.pairs(_record_pairs(record))
    if why is not None:
        out.note(f"Why it waits: {why.message}")


# --- gpuctl watch ----------------------------------------------------------------------------------

def watch(
    ctx: typer.Context,
    job_ids: Annotated[list[str], typer.Argument(help="One or more job ids.", show_default=False)],
    timeout: Annotated[float | None, typer.Option("--timeout", help="Give up after S seconds (exit 3).",
                                                  show_default=False)] = None,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between polls at first; it grows "
                                            "gently while nothing changes.")] = 1.0,
    output: OutputOpt = None,
    quiet: Annotated[bool, quiet_opt("the result URLs, one per job, once all have completed")] = False,
) -> None:
    """Follow jobs until they finish: a live view on a terminal, one line per change when piped.

    Piped, each change prints `TIME JOB_ID STATUS [PROGRESS%] [RESULT|ERROR]`; --output json: one JSON
    object per line (the status document plus "time").

    Exit 0 when all completed, 1 when any failed or was cancelled, 3 on timeout, 130 on Ctrl-C.

    Examples:

        gpuctl watch $JOB

        gpuctl watch $JOB1 $JOB2 --timeout 600 | tee watch.log
    """
    out = state(ctx).renderer(output, quiet)
    follow(ctx, job_ids, timeout=timeout, interval=interval, out=out)


def follow(ctx: typer.Context, job_ids: Sequence[str], *, timeout: float | None, out: Renderer,
           interval: float = 1.0, download: DownloadTarget | None = None) -> None:
    """Watch jobs to the end, render every change, then download results or raise for the exit code.

    Shared by `gpuctl watch` and `gpuctl submit --wait [--download PATH]`.

    Raises:
        JobFailed: a job ended failed (exit 1).
        WaitTimeout: time ran out first (exit 3).
    """
    from gpuctl.services.jobs import parse_job_id
    from gpuctl.services.watch import watch_jobs

    for job_id in job_ids:
        parse_job_id(job_id)  # a bad id is refused before the table's client is built
    gw = state(ctx).gateways
    view = _view(out)
    with view:
        outcome = watch_jobs(gw.table, job_ids, on_change=view.update, timeout=timeout, interval=interval)
    _finish(out, outcome)
    if download is not None:
        from gpuctl.services.jobs import download_result

        for record in outcome.records:
            with _download_progress(out) as progress:
                saved = download_result(gw, record.task_id, download, on_progress=progress)
            _render_saved(out, saved)


class _LineView(AbstractContextManager["_LineView"]):
    """Piped output: one line (or one JSON object) per change on stdout."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, record: JobRecord) -> None:
        import time

        from gpuctl.times import iso, stamp

        now = time.time()
        if self.as_json:
            typer.echo(json.dumps({**stamp("time", round(now, 3)), **record.status_document()},
                                  ensure_ascii=False))
            return
        parts = [iso(now) or "", record.task_id, job_state(record)]
        if record.progress is not None and not record.status.is_finished:
            parts.append(f"{record.progress * 100:.0f}%")
        if record.result_s3_uri or record.error_message:
            parts.append(clean(record.result_s3_uri or record.error_message))
        typer.echo(" ".join(parts))


class _QuietView(_LineView):
    def update(self, record: JobRecord) -> None:
        return None


class _LiveView(AbstractContextManager["_LiveView"]):
    """A Rich live table on stderr, redrawn on every change and ticking the elapsed time."""

    def __init__(self) -> None:
        self.records: dict[str, JobRecord] = {}

    def __enter__(self) -> _LiveView:
        from rich.live import Live

        self._live = Live(self, console=err_console(), refresh_per_second=4, transient=False)
        self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.refresh()
        self._live.stop()

    def update(self, record: JobRecord) -> None:
        self.records[record.task_id] = record
        self._live.refresh()

    def __rich__(self) -> Any:
        from rich.progress_bar import ProgressBar
        from rich.table import Column, Table
        from rich.text import Text

        table = Table(Column("Job", overflow="fold"), "Status", "Elapsed", "Progress",
                      Column("Result / error", overflow="fold"), header_style="bold")
        for r in self.records.values():
            bar = ProgressBar(total=1.0, completed=r.progress, width=20) if r.progress is not None else ""
            if r.status.value == "completed":
                bar = ProgressBar(total=1.0, completed=1.0, width=20)
            detail = r.result_s3_uri or r.error_message or ("cancel requested" if r.cancel_requested else "")
            shown = job_state(r)
            table.add_row(r.task_id, Text(shown, style=_STYLE[shown]), _elapsed(r), bar, clean(detail))
        return table


_STYLE = {"pending": "yellow", "processing": "cyan", "completed": "green", "failed": "bold red",
          "cancelled": "magenta"}


def _view(out: Renderer) -> _LineView | _LiveView:
    if out.json:
        return _LineView(as_json=True)
    if out.quiet:
        return _QuietView(as_json=False)
    return _LiveView() if out.interactive else _LineView(as_json=False)


def _finish(out: Renderer, outcome: WatchResult) -> None:
    from gpuctl.errors import JobFailed, WaitTimeout

    if out.quiet and not out.json:
        out.ids(r.result_s3_uri for r in outcome.records if r.result_s3_uri)
    failed = outcome.failed
    if failed:
        if len(failed) == 1:
            r = failed[0]
            verb = "was cancelled" if r.cancelled else "failed"
            raise JobFailed(f"Job {r.task_id} {verb}: {(r.error_message or 'no reason recorded').rstrip('.')}.")
        reasons = "; ".join(f"{r.task_id} {job_state(r)}: {r.error_message or 'no reason recorded'}"
                            for r in failed)
        raise JobFailed(f"{len(failed)} jobs did not complete — {reasons}.")
    if outcome.timed_out:
        waiting = ", ".join(f"{r.task_id} ({r.status.value})" for r in outcome.unfinished)
        raise WaitTimeout(f"Timed out after {outcome.elapsed:.0f} s; still not finished: {waiting}.")


# --- gpuctl result ---------------------------------------------------------------------------------

def result(
    ctx: typer.Context,
    job_id: JobIdArg,
    output_file: Annotated[str | None, typer.Option("--output-file", "-o", help="Write the result here: a file, "
                                                    "or a folder (an existing one, or a path ending in /) to "
                                                    "save <job id>.png in (default: the current folder).",
                                                    show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite the file if it exists.")] = False,
    url: Annotated[bool, typer.Option("--url", help="Print a URL to fetch the result instead "
                                      "(presigned S3, or the CDN URL).")] = False,
    output: FormatOpt = None,
    quiet: Annotated[bool, quiet_opt("the path written (with --url: the URL)")] = False,
) -> None:
    """Download a completed job's result, or print a URL for it with --url.

    Prints the path written (or the URL). An existing file is not overwritten without --force (exit 2).

    Exit 1 if the job has not completed.

    Examples:

        gpuctl result $JOB -o edited.png

        gpuctl result $JOB -o results/          # saves results/<job id>.png

        curl -o out.png "$(gpuctl result $JOB --url)"
    """
    from gpuctl.errors import UsageError
    from gpuctl.services.jobs import download_result, download_target, parse_job_id, result_url

    if url and output_file is not None:
        raise UsageError("Give either --url or --output-file, not both.")
    parse_job_id(job_id)
    target = None if url else download_target(output_file, overwrite=force)
    out, gw = state(ctx).renderer(output, quiet), state(ctx).gateways
    if url:
        link = result_url(gw, job_id)
        if out.json:
            out.data({"job_id": job_id, "url": link})
        else:
            out.ids([link])
        return
    with _download_progress(out) as progress:
        saved = download_result(gw, job_id, target, on_progress=progress)
    _render_saved(out, saved)


def _render_saved(out: Renderer, saved: ResultFile) -> None:
    if out.json:
        out.data({"job_id": saved.job_id, "path": str(saved.path), "bytes": saved.size,
                  "source": saved.source})
        return
    out.ids([str(saved.path)])
    out.note(f"Saved the result of {saved.job_id} ({saved.size:,} bytes).")


def _download_progress(out: Renderer) -> AbstractContextManager[Callable[[int, int], None] | None]:
    if not out.interactive:
        return nullcontext(None)
    return _RichDownload()


class _RichDownload(AbstractContextManager["Callable[[int, int], None]"]):
    def __enter__(self) -> Callable[[int, int], None]:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        self._progress = Progress(TextColumn("Downloading"), BarColumn(), DownloadColumn(),
                                  TransferSpeedColumn(), console=err_console(), transient=True)
        self._progress.start()
        task = self._progress.add_task("result", total=None)

        def update(done: int, total: int) -> None:
            self._progress.update(task, completed=done, total=total)

        return update

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()


# --- gpuctl jobs list / cancel / retry -------------------------------------------------------------

@jobs_app.command("list")
def list_(
    ctx: typer.Context,
    status_: Annotated[str | None, typer.Option("--status", help="pending, processing, completed or failed "
                                                "(default: all).", show_default=False)] = None,
    since: Annotated[str | None, typer.Option("--since", help="Only jobs created within this age: 30m, 1h, "
                                              "2d.", show_default=False)] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="At most this many jobs (1-1000).")] = 50,
    next_token: Annotated[str | None, typer.Option("--next-token", help="Continue after the page that printed "
                                                   "this token (JSON: next_token).", show_default=False)] = None,
    output: OutputOpt = None,
    quiet: Annotated[bool, quiet_opt("the job ids, one per line")] = False,
) -> None:
    """List jobs newest first, from the status index (never a table scan), a page at a time.

    When more jobs follow, the token for the next page is in the JSON ("next_token") and on stderr.

    Examples:

        gpuctl jobs list --status failed --since 1d

        gpuctl jobs list --status pending -q | xargs -n1 gpuctl jobs cancel

        gpuctl jobs list --output json | jq -r .next_token
    """
    from gpuctl.services.jobs import list_jobs

    out = state(ctx).renderer(output, quiet)
    page = list_jobs(state(ctx).gateways, status=status_, since=since, limit=limit, next_token=next_token)
    records = page.records
    if out.json:
        out.data({"jobs": [r.status_document() for r in records], "next_token": page.next_token})
        return
    if out.quiet:
        out.ids(r.task_id for r in records)
    elif not records:
        out.note("No jobs match.")
    else:
        # Fleet mode: which instance ran each job (a column only when some record names one).
        fleet = any(r.instance_id for r in records)
        out.table(["Job", "Type", "Status", "Created", "Updated", *(["Instance"] if fleet else []), "Result / error"],
                  ([r.task_id, f"{r.kind} (canary)" if r.canary else r.kind, job_state(r), when(r.created_at),
                    when(r.updated_at), *([r.instance_id or ""] if fleet else []),
                    r.result_s3_uri or r.error_message] for r in records))
        out.note(f"{len(records)} job{'s' if len(records) != 1 else ''}.")
    if page.next_token:
        out.note(f"More jobs follow: gpuctl jobs list --next-token {page.next_token}"
                 + (f" --status {status_}" if status_ else ""))


@jobs_app.command("cancel")
def cancel(ctx: typer.Context, job_id: JobIdArg, output: OutputOpt = None,
           quiet: Annotated[bool, quiet_opt("the job id")] = False) -> None:
    """Cancel a job: a pending one ends failed ("cancelled by user"); a processing one is asked to stop.

    Exit 1 if the job has already finished.

    Examples:

        gpuctl jobs cancel $JOB
    """
    from gpuctl.services.jobs import cancel_job

    out = state(ctx).renderer(output, quiet)
    outcome = cancel_job(state(ctx).gateways, job_id)
    if out.json:
        out.data({**outcome.record.status_document(), "action": outcome.action})
        return
    out.ids([outcome.record.task_id])
    if outcome.action == "cancelled":
        out.note(f"Cancelled job {outcome.record.task_id}: it was pending and is now failed.")
    else:
        out.note(f"Asked the worker to cancel job {outcome.record.task_id}; it ends failed once the worker "
                 "stops it (`gpuctl watch` follows it).")


@jobs_app.command("retry")
def retry(
    ctx: typer.Context,
    job_id: JobIdArg,
    no_start: Annotated[bool, typer.Option("--no-start", help="Queue only; do not start the GPU instance.")]
    = False,
    output: OutputOpt = None,
    quiet: Annotated[bool, quiet_opt("the new job id")] = False,
) -> None:
    """Submit a finished job again as a new job with the same request (linked by retry_of).

    Prints the new job id.

    Examples:

        gpuctl jobs retry $JOB

        gpuctl jobs list --status failed -q | xargs -n1 gpuctl jobs retry -q
    """
    from gpuctl.services.jobs import retry_job

    out = state(ctx).renderer(output, quiet)
    submitted = retry_job(state(ctx).gateways, job_id, start_instance=not no_start)
    if submitted.instance is not None and submitted.instance.warning:
        out.warn(submitted.instance.warning)
    if out.json:
        out.data(submitted.record.status_document())
    else:
        out.ids([submitted.record.task_id])
        out.note(f"Queued job {submitted.record.task_id}, a retry of {submitted.record.retry_of}.")
    if submitted.interrupted:
        from gpuctl.errors import Interrupted

        raise Interrupted(f"Interrupted: job {submitted.record.task_id} is queued; the instance was not started "
                          "(the scheduler starts it).")


# --- rendering helpers -----------------------------------------------------------------------------

def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _elapsed(record: JobRecord) -> str:
    import time

    end = (record.finished_at or record.updated_at) if record.status.is_finished else time.time()
    return _duration(end - record.created_at)


def _record_pairs(record: JobRecord) -> list[tuple[str, Any]]:
    pairs: list[tuple[str, Any]] = [
        ("job id", record.task_id),
        ("type", record.kind),
        ("status", job_state(record)),
        ("created", when(record.created_at)),
        ("updated", when(record.updated_at)),
        ("elapsed", _elapsed(record)),
    ]
    optional = [
        ("progress", None if record.progress is None else f"{record.progress * 100:.0f}%"),
        ("result", record.result_s3_uri),
        ("error", record.error_message),
        ("finished", when(record.finished_at)),
        ("cancel requested", "yes" if record.cancel_requested and not record.status.is_finished else None),
        ("attempts", record.attempts or None),
        ("worker", record.worker),
        ("instance", record.instance_id),
        ("retry of", record.retry_of),
        ("canary", "yes (gpuctl doctor --canary)" if record.canary else None),
    ]
    return pairs + [(k, v) for k, v in optional if v is not None]
