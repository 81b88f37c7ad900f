"""`gpuctl local up|down|status|comfyui` and `gpuctl demo`: the whole pipeline on this machine."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gpuctl.cli import state
from gpuctl.cli._output import OutputOpt, Renderer, err_console, quiet_opt

if TYPE_CHECKING:
    from rich.status import Status

    from gpuctl.models import JobRecord
    from gpuctl.services.demo import DemoJob, DemoResult
    from gpuctl.services.local import BoxView, StatusResult, UpResult

__all__ = ["app", "register_demo"]

app = typer.Typer(
    help="Run the whole pipeline on this machine: AWS emulator, stack, a GPU box (ComfyUI stand-in and adapter) "
         "that is off until work arrives, and the scheduler.",
    no_args_is_help=True,
)

SecondsOpt = Annotated[float, typer.Option("--seconds-per-job", min=0.1, max=600.0,
                                           help="How long the ComfyUI stand-in takes per job.")]
IdleOpt = Annotated[str, typer.Option("--idle", help="The scheduler stops the idle GPU box after this long "
                                                     "(10s … 24h, e.g. 2m).")]


def _target(ctx: typer.Context) -> dict[str, Any]:
    """Only the flags count: an endpoint or region from the environment or a profile is for real AWS."""
    overrides = state(ctx).overrides
    return {"endpoint_url": overrides.get("endpoint_url"), "region": overrides.get("region")}


# --- gpuctl local up -------------------------------------------------------------------------------

@app.command("up")
def up(
    ctx: typer.Context,
    seconds_per_job: SecondsOpt = 2.0,
    idle: IdleOpt = "5m",
    boot_delay: Annotated[float, typer.Option("--boot-delay", min=0.0, max=600.0,
                                              help="Seconds the GPU box takes to boot after its instance "
                                                   "starts.")] = 2.0,
    comfyui_url: Annotated[str | None, typer.Option(
        "--comfyui-url", help="Use your ComfyUI instead of the stand-in (the GPU box then switches only the "
                              "adapter).", show_default=False)] = None,
    workflows: Annotated[Path | None, typer.Option(
        "--workflows", exists=True, file_okay=False, help="A workflow override folder for the adapter "
                                                          "(see the README).", show_default=False)] = None,
    output: OutputOpt = None,
    quiet: Annotated[bool, quiet_opt("the AWS endpoint URL of local mode")] = False,
) -> None:
    """Start local mode (or say it is up, or restart what died) and write the `local` profile.

    Starts moto's server on 127.0.0.1, deploys infra/cloudformation.yaml into it the way `gpuctl deploy`
    does, and starts the GPU box and the scheduler loop in the background. The GPU box follows the
    emulator's instance record: while the instance is stopped, ComfyUI and the adapter are not running;
    `instance start` (or a submit, or the scheduler) boots them; `instance stop` (or the scheduler's
    idle stop) shuts them down, the adapter draining first. Any command works with --profile local.
    With --endpoint-url (LocalStack …), that endpoint is used instead of starting the emulator.

    Examples:

        gpuctl local up --idle 2m

        gpuctl --profile local submit camera-angle photo.jpg --wait

        gpuctl local up --comfyui-url http://127.0.0.1:8188 --workflows ./my-workflows
    """
    from gpuctl.services.local import local_options, local_up

    out = state(ctx).renderer(output, quiet)
    options = local_options(seconds_per_job=seconds_per_job, idle=idle, boot_delay=boot_delay,
                            comfyui_url=comfyui_url, workflows=workflows)
    with _Steps(out, "Starting local mode…") as steps:
        result = local_up(**_target(ctx), options=options, on_step=steps.step)
    _render_up(out, result)
    if result.readiness is not None and not result.readiness.ready:
        raise typer.Exit(1)


def _render_up(out: Renderer, result: UpResult) -> None:
    if out.json:
        out.data(result.document())
        return
    if out.quiet:
        out.ids([result.status.endpoint_url or ""])
        return
    _components_table(out, result.status)
    for warning in result.warnings:
        out.warn(warning)
    if result.readiness is not None:
        verdict = "ready" if result.readiness.ready else "NOT ready"
        out.note(f"The adapter's readiness check on your ComfyUI: {verdict}.\n{result.readiness.report}")
    if result.action == "already-up":
        out.note("Local mode is already up.")
    elif result.action == "restarted":
        out.note(f"Restarted {', '.join(result.restarted)}.")
    else:
        out.note(f"Local mode is up ({result.seconds:.1f} s). Profile: {result.config_path}")
    out.note("Try: gpuctl --profile local submit camera-angle IMAGE --wait   (it boots the GPU box; "
             "stop everything: gpuctl local down)")


def _span(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


def _box_health(box: BoxView | None) -> str:
    if box is None:
        return ""
    if box.state == "booting" and box.since is not None:
        return f"booting ({time.time() - box.since:.1f} s)"
    return box.state


def _components_table(out: Renderer, status: StatusResult) -> None:
    def health(name: str, healthy: bool, detail: str) -> str:
        return _box_health(status.box) if name == "box" and healthy else detail

    rows = [(f"  {c.name}" if c.on_box else c.name, c.pid, health(c.name, c.healthy, c.detail), c.url or "")
            for c in status.components]
    out.table(["Component", "PID", "Health", "URL"], rows,
              title=f"Local mode — AWS endpoint {status.endpoint_url}"
                    + (" (external)" if status.external_endpoint else ""))
    box = status.box
    if box is not None:
        out.note(f"GPU box: {box.state} — {box.detail} (instance {box.instance_id}: {box.instance_state}; "
                 f"boot delay {box.boot_delay:g} s; the scheduler stops it after {_span(box.idle_seconds)} idle)")
    # Paths on their own lines: a table column would cut them on a narrow terminal.
    out.pairs([(f"{c.name} log", c.log) for c in status.components if c.log])


# --- gpuctl local down -----------------------------------------------------------------------------

@app.command("down")
def down(ctx: typer.Context, output: OutputOpt = None,
         quiet: Annotated[bool, quiet_opt("nothing (it only stops local mode)")] = False) -> None:
    """Stop the processes `gpuctl local up` started and remove local mode's state and profile values.

    Only processes whose pid still belongs to what `up` started are signalled (SIGTERM, then SIGKILL
    after 10 s). Logs stay in the state folder. The working folders that killed `gpuctl local comfyui`
    stand-ins left in the temp directory are removed too.

    Examples:

        gpuctl local down
    """
    from gpuctl.services.local import local_down

    out = state(ctx).renderer(output, quiet)
    result = local_down()
    if out.json:
        out.data(result.document())
        return
    if not result.was_up:
        out.note("Local mode is not running.")
    elif not out.quiet:
        out.table(["Component", "PID", "Result"], [(o.name, o.pid, o.result) for o in result.stopped])
        out.note("Local mode is down.")
    if result.leftovers_removed:
        count = len(result.leftovers_removed)
        out.note(f"Removed {count} working folder{'s' if count != 1 else ''} that killed ComfyUI stand-ins "
                 f"left behind ({Path(result.leftovers_removed[0]).parent}).")


# --- gpuctl local status ---------------------------------------------------------------------------

@app.command("status")
def status(ctx: typer.Context, output: OutputOpt = None,
           quiet: Annotated[bool, quiet_opt("healthy, unhealthy or down")] = False) -> None:
    """Show the GPU box (off, booting, up, stopping), each component's health and where its log is.

    ComfyUI and the adapter run on the GPU box: while it is off they are not running, and that is healthy.
    Exit 0 when all are healthy, 1 when local mode is down or a component is not.

    Examples:

        gpuctl local status

        gpuctl local status --output json | jq -r .box.state
    """
    from gpuctl.services.local import local_status

    out = state(ctx).renderer(output, quiet)
    result = local_status()
    if out.json:
        out.data(result.document())
    elif out.quiet:
        out.ids(["healthy" if result.healthy else "unhealthy" if result.up else "down"])
    elif not result.up:
        out.note(f"Local mode is not running (state folder {result.state_dir}); start it with `gpuctl local up`.")
    else:
        _components_table(out, result)
    if not result.healthy:
        from gpuctl.errors import EXIT_FAILED

        raise typer.Exit(EXIT_FAILED)


# --- gpuctl local comfyui --------------------------------------------------------------------------

@app.command("comfyui")
def comfyui(
    ctx: typer.Context,
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port on 127.0.0.1 (0: a free one).")]
    = 8188,
    seconds_per_job: SecondsOpt = 2.0,
    output_bucket: Annotated[str | None, typer.Option(
        "--output-bucket", help="Unified API (/api/v1/...): upload results to this S3 bucket, at the "
        "results_prefix, through the configured endpoint (--endpoint-url, AWS_ENDPOINT_URL).",
        show_default=False)] = None,
    cdn_domain: Annotated[str | None, typer.Option(
        "--cdn-domain", help="With --output-bucket: report results as https://DOMAIN/KEY, as the running "
        "unified API does behind its CDN.", show_default=False)] = None,
) -> None:
    """Run the ComfyUI stand-in in the foreground (a CPU stand-in speaking ComfyUI's protocol, not the model).

    It transforms the input picture for real (a perspective warp, a sketch) and labels it as a stand-in.
    It also serves the running system's unified API (/api/v1/<job>/jobs); without --output-bucket that API
    reports file:// result URLs. Stop it with Ctrl-C (or SIGTERM); its working folder goes with it.

    Examples:

        gpuctl local comfyui --port 8188 --seconds-per-job 5

        gpuctl --profile local local comfyui --port 8000 --output-bucket BUCKET
    """
    from gpuctl.errors import UsageError
    from gpuctl.local.comfyui_standin import main

    argv = ["--port", str(port), "--seconds-per-job", str(seconds_per_job)]
    if cdn_domain is not None and output_bucket is None:
        raise UsageError("--cdn-domain needs --output-bucket (the CDN serves the bucket the results go to).")
    if output_bucket is not None:
        settings = state(ctx).settings
        argv += ["--output-bucket", output_bucket, "--output-prefix", settings.results_prefix]
        if settings.endpoint_url:
            argv += ["--s3-endpoint-url", settings.endpoint_url]
        if cdn_domain is not None:
            argv += ["--cdn-domain", cdn_domain]
    raise typer.Exit(main(argv))


# --- gpuctl demo -----------------------------------------------------------------------------------

def register_demo(root: typer.Typer) -> None:
    """Add the top-level `gpuctl demo` command."""
    root.command("demo")(demo)


def demo(
    ctx: typer.Context,
    output_dir: Annotated[Path, typer.Option("--output-dir", file_okay=False,
                                             help="Where the sample and the results are written.")]
    = Path("gpuctl-demo"),
    keep: Annotated[bool, typer.Option("--keep", help="Leave local mode running afterwards (watch the idle "
                                                      "stop with `gpuctl local status`).")] = False,
    idle: IdleOpt = "5m",
    timeout: Annotated[float, typer.Option("--timeout", min=1.0, help="Give up on the jobs after S seconds "
                                                                      "(exit 3).")] = 180.0,
    output: OutputOpt = None,
) -> None:
    """Run the whole pipeline on this machine: a cold start of the GPU box, one job of each type, results saved.

    Brings local mode up with the GPU box off (unless local mode is up), submits the sample picture as a
    camera-angle job and a qwen-image-edit job (the submit starts the instance, the box boots), follows
    them live, downloads the results to --output-dir and shows how long each stage took: queue wait,
    boot, execution, publish. Then it takes local mode down again (unless --keep, or it was already up).
    Needs no AWS account, credentials or network. The images come from a CPU stand-in, not the model.

    Examples:

        gpuctl demo

        gpuctl demo --keep --idle 2m --output-dir /tmp/demo
    """
    from gpuctl.services.demo import run_demo
    from gpuctl.services.local import local_options

    out = state(ctx).renderer(output)
    options = local_options(idle=idle)
    with _Steps(out, "Starting local mode…") as steps, _DemoView(out, steps) as view:
        result = run_demo(output_dir, keep=keep, timeout=timeout, options=options, events=view, **_target(ctx))
    _render_demo(out, result)


def _secs(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f} s" if value < 1 else f"{value:.1f} s"


def _render_demo(out: Renderer, result: DemoResult) -> None:
    if out.json:
        out.data(result.document())
        return
    up_note = "already up" if result.up and result.up.action == "already-up" else _secs(result.up_s)
    # One column per job, one row per step: the steps read top to bottom, and it fits 80 columns.
    steps = [("Submit", "submit_s"), ("Queue wait", "queue_wait_s"), ("Boot", "boot_s"),
             ("Execution", "execution_s"), ("Publish", "publish_s"), ("Download", "download_s")]
    rows = [(label, *(_secs(getattr(j, name)) for j in result.jobs)) for label, name in steps]
    rows.append(("Status", *(j.status for j in result.jobs)))
    out.table(["Step", *(j.kind for j in result.jobs)], rows, title=f"gpuctl demo — {result.total_s:.1f} s in all")
    out.pairs([("sample", result.sample), *((j.kind, j.path) for j in result.jobs)])
    box = result.box
    out.note(f"Local mode: up in {up_note}.")
    if result.box_before == "off" and box is not None and box.boot_seconds is not None:
        out.note(f"The GPU box was off: the first submit started its instance and it booted in "
                 f"{box.boot_seconds:.1f} s ({box.boot_delay:g} s boot delay, then ComfyUI and the adapter).")
    out.note("Queue wait: in the queue while no box was booting (the adapter's poll, staging the input, "
             "ComfyUI's queue). Boot: waiting for the GPU box to boot. Execution: ComfyUI running the "
             "workflow. Publish: the result uploaded to S3 and the job marked completed.")
    out.note(f"Results are in {result.output_dir}/ — made by the CPU stand-in for ComfyUI, not by the model.")
    if result.down is None:
        idle = _span(box.idle_seconds) if box else "the idle window"
        out.note(f"Local mode is still running: the scheduler stops the idle GPU box after {idle} "
                 "(watch it: `gpuctl local status`, `gpuctl --profile local instance why-stopped`); "
                 "stop everything with `gpuctl local down`.")


# --- progress on stderr ----------------------------------------------------------------------------

class _Steps(AbstractContextManager["_Steps"]):
    """Step messages on stderr: a spinner and one line per step on a terminal, plain lines otherwise,
    nothing with --output json or -q. Each line carries the seconds since the start."""

    def __init__(self, out: Renderer, title: str) -> None:
        self._out = out
        self._title = title
        self._status: Status | None = None
        self._t0 = time.monotonic()
        self.closed = False

    def __enter__(self) -> _Steps:
        if self._out.interactive:
            self._status = err_console().status(self._title)
            self._status.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None
        self.closed = True

    def step(self, message: str) -> None:
        if self._status is not None:
            self._status.update(message)
        if not self._out.json and not self._out.quiet:
            elapsed = time.monotonic() - self._t0
            err_console().print(f"[dim]{elapsed:6.1f}s[/] {message}", highlight=False, soft_wrap=True)


class _DemoView(AbstractContextManager["_DemoView"]):
    """The demo while it runs: step lines (with the GPU box's changes) and the jobs, as a Rich live table on a
    terminal or one stderr line per change otherwise. The live table is finished before local mode goes down."""

    def __init__(self, out: Renderer, steps: _Steps) -> None:
        self._out = out
        self._steps = steps
        self._jobs: dict[str, tuple[DemoJob, JobRecord]] = {}
        self._live: Any = None
        self._box: BoxView | None = None
        self._t0 = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        self.jobs_finished()

    def _line(self, message: str) -> None:
        if not self._out.json:
            elapsed = time.monotonic() - self._t0
            err_console().print(f"[dim]{elapsed:6.1f}s[/] {message}", highlight=False, soft_wrap=True)

    def step(self, message: str) -> None:
        if message.startswith("Submitting"):
            self._steps.close()  # the jobs' view takes over the terminal
        if self._steps.closed:
            self._line(message)
        else:
            self._steps.step(message)

    def box_changed(self, box: BoxView) -> None:
        self._box = box
        if box.state == "booting":
            self._line(f"The GPU box is booting (instance {box.instance_id} started; boot delay {box.boot_delay:g} s,"
                       " then ComfyUI and the adapter) …")
        elif box.state == "up":
            boot = f" after {box.boot_seconds:.1f} s" if box.boot_seconds is not None else ""
            self._line(f"The GPU box is up{boot}: the adapter polls the queue.")
        elif box.state == "off":
            self._line(f"The GPU box is off (instance {box.instance_id} {box.instance_state}).")
        else:
            self._line(f"The GPU box is {box.state}.")
        if self._live is not None:
            self._live.refresh()

    def job_changed(self, job: DemoJob, record: JobRecord) -> None:
        self._jobs[job.job_id] = (job, record)
        if self._out.json:
            return
        if not self._out.interactive:
            progress = f" {record.progress * 100:.0f}%" if record.progress is not None else ""
            err_console().print(f"{job.kind:<16} {job.job_id} {record.status.value}{progress}", highlight=False)
            return
        if self._live is None:
            from rich.live import Live

            self._live = Live(self, console=err_console(), refresh_per_second=8, transient=False)
            self._live.start()
        self._live.refresh()

    def jobs_finished(self) -> None:
        if self._live is not None:
            self._live.refresh()
            self._live.stop()
            self._live = None

    def __rich__(self) -> Any:
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        table = Table("Job", "ID", "Status", "Progress", header_style="bold",
                      caption=f"GPU box: {_box_health(self._box)}" if self._box else None, caption_justify="left")
        for job, record in self._jobs.values():
            done = 1.0 if record.status.value == "completed" else (record.progress or 0.0)
            table.add_row(job.kind, job.job_id, record.status.value, ProgressBar(total=1.0, completed=done, width=24))
        return table
