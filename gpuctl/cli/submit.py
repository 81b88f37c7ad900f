"""`gpuctl submit`: one job per command, or a whole file of them with --from."""

from __future__ import annotations

import json
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gpuctl.cli import state
from gpuctl.cli._output import OutputOpt, QuietOpt, Renderer, err_console

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
DownloadOpt = Annotated[Path | None, typer.Option("--download", help="With --wait: save the result here.",
                                                  dir_okay=True, writable=True)]
KeyOpt = Annotated[str | None, typer.Option("--idempotency-key",
                                            help="Submitting again with the same key returns the same job.")]
NoStartOpt = Annotated[bool, typer.Option("--no-start", help="Queue only; do not start the GPU instance.")]
RequireOpt = Annotated[bool, typer.Option("--require-instance",
                                          help="Fail (exit 4) if the GPU instance cannot be started.")]


@app.callback()
def submit(
    ctx: typer.Context,
    from_file: Annotated[Path | None, typer.Option("--from", help="Submit every row of a JSONL or CSV file.")]
    = None,
    no_start: NoStartOpt = False,
    require_instance: RequireOpt = False,
    output: OutputOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Submit a job: `gpuctl submit camera-angle IMG` or `gpuctl submit qwen-image-edit IMG --prompt P`.

    With --from FILE, every row of a JSONL or CSV file is one job (columns: job_type, image, and the
    job type's options). All rows are checked first; if any is bad, nothing is submitted.

    Examples:

        gpuctl submit camera-angle photo.jpg --vertical 2

        gpuctl submit --from jobs.jsonl -q > job-ids.txt
    """
    if ctx.invoked_subcommand is not None:
        return
    if from_file is None:
        typer.echo(ctx.get_help(), err=True)
        raise typer.Exit(2)
    from gpuctl.services.submit import submit_batch

    out = state(ctx).renderer(output, quiet)
    with _upload_progress(out) as progress:
        result = submit_batch(state(ctx).gateways, from_file, start_instance=not no_start,
                              require_instance=require_instance, on_progress=progress)
    _render_batch(out, result)


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
    idempotency_key: KeyOpt = None,
    no_start: NoStartOpt = False,
    require_instance: RequireOpt = False,
    output: OutputOpt = None,
    quiet: QuietOpt = False,
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
                key=idempotency_key, no_start=no_start, require=require_instance, output=output, quiet=quiet)


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
    idempotency_key: KeyOpt = None,
    no_start: NoStartOpt = False,
    require_instance: RequireOpt = False,
    output: OutputOpt = None,
    quiet: QuietOpt = False,
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
                key=idempotency_key, no_start=no_start, require=require_instance, output=output, quiet=quiet)


def _submit_one(ctx: typer.Context, kind: str, image: str, fields: dict[str, Any], extra: dict[str, str], *,
                wait: bool, timeout: float, download: Path | None, key: str | None, no_start: bool,
                require: bool, output: Any, quiet: bool) -> None:
    """The shared body of both job-type commands: draft, submit, render, and optionally follow."""
    from gpuctl.errors import UsageError
    from gpuctl.inputs import ImageLimits
    from gpuctl.models import JobType
    from gpuctl.services.submit import draft_job, submit_draft

    if download is not None and not wait:
        raise UsageError("--download needs --wait (the result exists only once the job completes).")
    app_state = state(ctx)
    out = app_state.renderer(output, quiet)
    limits = ImageLimits.from_settings(app_state.settings)
    draft = draft_job(JobType(kind), image, fields, limits=limits, extra_images=extra)
    with _upload_progress(out) as progress:
        result = submit_draft(app_state.gateways, draft, idempotency_key=key, start_instance=not no_start,
                              require_instance=require, on_progress=progress)
    _render_submitted(out, result, lines=wait)
    if wait:
        from gpuctl.cli.jobs import follow

        follow(ctx, [result.record.task_id], timeout=timeout, download=download, out=out)


def _instance_doc(outcome: StartOutcome | None) -> dict[str, Any] | None:
    if outcome is None:
        return None
    return {"action": outcome.action, "state": outcome.state, "warning": outcome.warning}


def _render_submitted(out: Renderer, result: SubmitResult, *, lines: bool = False) -> None:
    """The submitted job; with ``lines`` (--wait) JSON goes out as one line, as the watch lines that follow."""
    if result.instance is not None and result.instance.warning:
        out.warn(result.instance.warning)
    if out.json:
        doc = {**result.record.status_document(), "reused": result.reused,
               "instance": _instance_doc(result.instance)}
        if lines:
            typer.echo(json.dumps(doc, ensure_ascii=False))
        else:
            out.data(doc)
        return
    out.ids([result.record.task_id])
    if result.reused:
        out.note(f"Job {result.record.task_id} already exists for this idempotency key "
                 f"({result.record.status.value}); nothing new was queued.")
        return
    started = {"started": "starting the GPU instance", "already-running": "the GPU instance is running"}
    tail = started.get(result.instance.action, "") if result.instance else "instance not started (--no-start)"
    out.note(f"Queued {result.record.kind} job {result.record.task_id}" + (f"; {tail}." if tail else "."))


def _render_batch(out: Renderer, result: BatchResult) -> None:
    if result.instance is not None and result.instance.warning:
        out.warn(result.instance.warning)
    for failure in result.failures:
        err_console().print(f"[bold red]Row {failure.row}:[/] {failure.message}", highlight=False, soft_wrap=True)
    if out.json:
        out.data({"job_ids": result.job_ids,
                  "failures": [{"row": f.row, "error": f.message} for f in result.failures],
                  "instance": _instance_doc(result.instance)})
    else:
        out.ids(job_id or "-" for job_id in result.job_ids)
        out.note(f"Queued {sum(1 for j in result.job_ids if j)} of {len(result.job_ids)} jobs.")
    if result.failures:
        raise typer.Exit(1)


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
