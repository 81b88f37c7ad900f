"""`gpuctl submit`: one job per command, or a whole file of them with --from."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gpuctl.cli import state
from gpuctl.cli._output import OutputOpt, Renderer, clean, err_console, quiet_opt

if TYPE_CHECKING:
    from gpuctl.services.instance import StartOutcome
    from gpuctl.services.submit import BatchResult, Progress, SubmitResult

app = typer.Typer(
    help="Submit jobs to the GPU instance (uploads local images, queues, starts the instance).",
    no_args_is_help=False,
    invoke_without_command=True,
)

# Options shared by both job types.
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed (default: the model's).")]
WaitOpt = Annotated[bool, typer.Option("--wait", help="Follow the job until it completes or fails.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="With --wait: give up after S seconds (exit 3).")]
DownloadOpt = Annotated[str | None, typer.Option("--download", help="With --wait: save the result here (a file, "
                                                 "or a folder ending in / for <job id>.png).", show_default=False)]
ForceOpt = Annotated[bool, typer.Option("--force", help="With --download: overwrite an existing file.")]
KeyOpt = Annotated[str | None, typer.Option("--idempotency-key",
                                            help="Submitting again with the same key returns the same job.")]
NoStartOpt = Annotated[bool, typer.Option("--no-start", help="Queue only; do not start the GPU instance.")]
RequireOpt = Annotated[bool, typer.Option("--require-instance",
                                          help="Exit 4 (the job id still printed) if the GPU instance cannot be "
                                               "started.")]
QuietJob = Annotated[bool, quiet_opt("the job id")]


@app.callback()
def submit(
    ctx: typer.Context,
    from_file: Annotated[Path | None, typer.Option("--from", help="Submit every row of a JSONL or CSV file.",
                                                   show_default=False)] = None,
    no_start: NoStartOpt = False,
    require_instance: RequireOpt = False,
    output: OutputOpt = None,
    quiet: Annotated[bool, quiet_opt("the job ids, one line per row in row order ('-' for a row not queued)")]
    = False,
) -> None:
    """Submit a job: `gpuctl submit camera-angle IMG` or `gpuctl submit qwen-image-edit IMG --prompt P`.

    With --from FILE, every row of a JSONL or CSV file is one job (columns: job_type, image, and the
    job type's options). All rows, and every s3:// or https:// input, are checked first; if any is bad,
    nothing is submitted (exit 2). Exit 1 when some rows could not be queued; Ctrl-C stops after the
    rows being written (their ids are printed, the rest is not submitted; exit 130).

    Examples:

        gpuctl submit camera-angle photo.jpg --vertical 2

        gpuctl submit --from jobs.jsonl -q > job-ids.txt
    """
    from gpuctl.errors import UsageError

    if ctx.invoked_subcommand is not None:
        if from_file is not None:
            raise UsageError("--from submits the jobs of a file; give either --from FILE or a job type.")
        return
    if from_file is None:
        raise UsageError("Give a job type and an image (gpuctl submit camera-angle IMAGE), or --from FILE; "
                         "`gpuctl submit --help` lists the options.")
    from gpuctl.cli._signals import SignalGuard
    from gpuctl.services.submit import submit_batch

    out = state(ctx).renderer(output, quiet)
    with SignalGuard() as guard:
        with _upload_progress(out) as progress:
            result = submit_batch(state(ctx).gateways, from_file, start_instance=not no_start,
                                  require_instance=require_instance, on_progress=progress, guard=guard)
        with guard.deferred():  # an interrupt now must not cut the list of queued ids short
            _print_batch(out, result)
    result.interrupted = result.interrupted or guard.pending
    _raise_for_batch(result)


@app.command("camera-angle")
def camera_angle(
    ctx: typer.Context,
    image: Annotated[str, typer.Argument(help="Local image file, s3://bucket/key or https:// URL.")],
    prompt: Annotated[str | None, typer.Option("--prompt", help="Camera instruction (instead of the knobs).")]
    = None,
    vertical: Annotated[int | None, typer.Option("--vertical", help="-2 (low angle) … 2 (top-down).")] = None,
    horizontal: Annotated[int | None, typer.Option("--horizontal", help="-2 (left 90°) … 2 (right 90°).")]
    = None,
    zoom: Annotated[int | None, typer.Option("--zoom", help="-1 (wide), 0, 1 (close-up).")] = None,
    seed: SeedOpt = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Sampler steps (default 8).")] = None,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = 900.0,
    download: DownloadOpt = None,
    force: ForceOpt = False,
    idempotency_key: KeyOpt = None,
    no_start: NoStartOpt = False,
    require_instance: RequireOpt = False,
    output: OutputOpt = None,
    quiet: QuietJob = False,
) -> None:
    """Re-shoot IMAGE from another camera angle.

    Examples:

        gpuctl submit camera-angle photo.jpg --vertical 2 --zoom 1

        gpuctl submit camera-angle s3://bucket/in.jpg --prompt "将镜头转为俯视" --wait
    """
    from gpuctl.errors import UsageError

    if prompt is not None and any(k is not None for k in (vertical, horizontal, zoom)):
        raise UsageError("Give either --prompt or the --vertical/--horizontal/--zoom knobs, not both.")
    fields = {"prompt": prompt, "vertical": vertical, "horizontal": horizontal, "zoom": zoom,
              "seed": seed, "steps": steps}
    _submit_one(ctx, "camera-angle", image, fields, {}, wait=wait, timeout=timeout, download=download,
                force=force, key=idempotency_key, no_start=no_start, require=require_instance, output=output,
                quiet=quiet)


@app.command("qwen-image-edit")
def qwen_image_edit(
    ctx: typer.Context,
    image: Annotated[str, typer.Argument(help="Local image file, s3://bucket/key or https:// URL.")],
    prompt: Annotated[str, typer.Option("--prompt", help="What to change, in words.")],
    image2: Annotated[str | None, typer.Option("--image2", help="A second reference image.")] = None,
    image3: Annotated[str | None, typer.Option("--image3", help="A third reference image.")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Sampler steps (default 4).")] = None,
    cfg: Annotated[float | None, typer.Option("--cfg", help="Classifier-free guidance (default 1.0).")] = None,
    sampler: Annotated[str | None, typer.Option("--sampler", help="Sampler (default sa_solver).")] = None,
    scheduler: Annotated[str | None, typer.Option("--scheduler", help="Scheduler (default beta).")] = None,
    denoise: Annotated[float | None, typer.Option("--denoise", help="0 … 1 (default 1.0).")] = None,
    seed: SeedOpt = None,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = 900.0,
    download: DownloadOpt = None,
    force: ForceOpt = False,
    idempotency_key: KeyOpt = None,
    no_start: NoStartOpt = False,
    require_instance: RequireOpt = False,
    output: OutputOpt = None,
    quiet: QuietJob = False,
) -> None:
    """Edit IMAGE as the prompt says (Qwen-Image-Edit), with up to two reference images.

    Examples:

        gpuctl submit qwen-image-edit photo.jpg --prompt "black and white sketch"

        gpuctl submit qwen-image-edit a.png --image2 b.png --prompt "put the hat from picture 2 on picture 1"
    """
    fields = {"prompt": prompt, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
              "denoise": denoise, "seed": seed}
    extra = {k: v for k, v in (("image2_url", image2), ("image3_url", image3)) if v is not None}
    _submit_one(ctx, "qwen-image-edit", image, fields, extra, wait=wait, timeout=timeout, download=download,
                force=force, key=idempotency_key, no_start=no_start, require=require_instance, output=output,
                quiet=quiet)


def _submit_one(ctx: typer.Context, kind: str, image: str, fields: dict[str, Any], extra: dict[str, str], *,
                wait: bool, timeout: float, download: str | None, force: bool, key: str | None, no_start: bool,
                require: bool, output: Any, quiet: bool) -> None:
    """The shared body of both job-type commands: check every option, draft, submit, render, optionally follow."""
    from gpuctl.cli._signals import SignalGuard
    from gpuctl.errors import Interrupted, UsageError
    from gpuctl.inputs import ImageLimits
    from gpuctl.models import JobType
    from gpuctl.services.jobs import download_target
    from gpuctl.services.submit import draft_job, submit_draft
    from gpuctl.services.watch import check_wait_options

    # Every option is checked before anything is written: a bad --timeout must not leave a queued job behind.
    if download is not None and not wait:
        raise UsageError("--download needs --wait (the result exists only once the job completes).")
    if wait:
        check_wait_options(timeout)
    target = download_target(download, overwrite=force) if download is not None else None
    app_state = state(ctx)
    out = app_state.renderer(output, quiet)
    limits = ImageLimits.from_settings(app_state.settings)
    draft = draft_job(JobType(kind), image, fields, limits=limits, extra_images=extra)
    with SignalGuard() as guard:
        with _upload_progress(out) as progress:
            result = submit_draft(app_state.gateways, draft, idempotency_key=key, start_instance=not no_start,
                                  require_instance=require, on_progress=progress, guard=guard)
        with guard.deferred():  # an interrupt now must not keep the job id from being printed
            _render_submitted(out, result, lines=wait)
        interrupted = result.interrupted or guard.pending
    if result.interrupted:
        raise Interrupted(f"Interrupted: job {result.record.task_id} is queued, but the instance was not started "
                          "(the scheduler starts it).")
    if interrupted:
        raise Interrupted(f"Interrupted: job {result.record.task_id} is queued.")
    if result.instance_error is not None:
        raise result.instance_error
    if wait:
        from gpuctl.cli.jobs import follow

        follow(ctx, [result.record.task_id], timeout=timeout, download=target, out=out)


def _render_submitted(out: Renderer, result: SubmitResult, *, lines: bool = False) -> None:
    """The submitted job; with ``lines`` (--wait) JSON goes out as one line, as the watch lines that follow."""
    if result.instance is not None and result.instance.warning and result.instance_error is None:
        out.warn(result.instance.warning)
    if out.json:
        doc = result.document()
        if lines:
            out.line(doc)
        else:
            out.data(doc)
        return
    out.ids([result.record.task_id])
    if result.reused:
        out.note(f"Job {result.record.task_id} already exists for this idempotency key "
                 f"({result.record.status.value}); nothing new was queued.")
        return
    tail = _instance_note(result.instance, result.adapter_polling)
    out.note(f"Queued {result.record.kind} job {result.record.task_id}{tail}.")


def _instance_note(outcome: StartOutcome | None, polling: bool) -> str:
    if polling:
        return "; an adapter is polling the queue (the GPU instance is running)"
    if outcome is None:
        return "; the GPU instance was not started (--no-start)"
    notes = {"started": "; starting the GPU instance", "already-running": "; the GPU instance is running"}
    return notes.get(outcome.action, "")


def _print_batch(out: Renderer, result: BatchResult) -> None:
    from gpuctl.services.submit import instance_document

    if result.instance is not None and result.instance.warning and result.instance_error is None:
        out.warn(result.instance.warning)
    for failure in result.failures:
        err_console().print(f"Row {failure.row}: {clean(failure.message)}", markup=False, highlight=False,
                            soft_wrap=True)
    total, queued = len(result.job_ids), result.queued
    if out.json:
        out.data({"job_ids": result.job_ids,
                  "failures": [{"row": f.row, "error": f.message} for f in result.failures],
                  "interrupted": result.interrupted, "unsubmitted": result.unsubmitted,
                  "instance": instance_document(result.instance, result.adapter_polling)})
    else:
        out.ids(job_id or "-" for job_id in result.job_ids)
        out.note(f"Queued {queued} of {total} jobs{_instance_note(result.instance, result.adapter_polling)}."
                 if queued else f"Queued none of the {total} jobs.")


def _raise_for_batch(result: BatchResult) -> None:
    """The exit code of a batch: 130 interrupted, 1 when rows were not queued, 4 when --require-instance failed."""
    from gpuctl.errors import Interrupted, PartialFailure

    total, queued = len(result.job_ids), result.queued
    if result.interrupted:
        raise Interrupted(f"Interrupted: {queued} of {total} jobs were queued (their ids are on stdout); "
                          f"{result.unsubmitted} rows were not submitted.")
    if result.failures:
        raise PartialFailure(f"{len(result.failures)} of {total} rows were not queued (each is listed above); "
                             f"the other {queued} jobs are queued.")
    if result.instance_error is not None:
        raise result.instance_error


def _upload_progress(out: Renderer) -> AbstractContextManager[Progress | None]:
    """A Rich progress bar on stderr for uploads, only when a person is watching."""
    if not out.interactive:
        return nullcontext(None)
    return _RichUpload()


class _RichUpload(AbstractContextManager["Progress | None"]):
    def __enter__(self) -> Progress:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        self._progress = Progress(TextColumn("Uploading {task.description}"), BarColumn(), DownloadColumn(),
                                  TransferSpeedColumn(), console=err_console(), transient=True)
        self._progress.start()
        self._tasks: dict[str, Any] = {}

        def update(name: str, done: int, total: int) -> None:
            if name not in self._tasks:
                self._tasks[name] = self._progress.add_task(name, total=total)
            self._progress.update(self._tasks[name], completed=done)

        return update

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()
