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
    from gpuctl.services.local import DemoJob, DemoResult, StatusResult, UpResult

__all__ = ["app", "register_demo"]

app = typer.Typer(
    help="Run the whole pipeline on this machine: AWS emulator, stack, ComfyUI stand-in, adapter, scheduler.",
    no_args_is_help=True,
)

SecondsOpt = Annotated[float, typer.Option("--seconds-per-job", min=0.1, max=600.0,
                                           help="How long the ComfyUI stand-in takes per job.")]


def _target(ctx: typer.Context) -> dict[str, Any]:
    """Only the flags count: an endpoint or region from the environment or a profile is for real AWS."""
    overrides = state(ctx).overrides
    return {"endpoint_url": overrides.get("endpoint_url"), "region": overrides.get("region")}


# --- gpuctl local up -------------------------------------------------------------------------------

@app.command("up")
def up(
    ctx: typer.Context,
    seconds_per_job: SecondsOpt = 2.0,
    idle_minutes: Annotated[int, typer.Option("--idle-minutes", min=5, max=1440,
                                              help="The scheduler stops the idle GPU instance after this.")] = 5,
    output: OutputOpt = None,
    quiet: Annotated[bool, quiet_opt("the AWS endpoint URL of local mode")] = False,
) -> None:
    """Start local mode (or say it is up, or restart what died) and write the `local` profile.

    Starts moto's server on 127.0.0.1, deploys infra/cloudformation.yaml into it the way `gpuctl deploy`
    does, and starts the ComfyUI stand-in, the adapter and the scheduler loop in the background. Then any
    command works against it with --profile local. With --endpoint-url (LocalStack …), that endpoint is
    used instead of starting the emulator.

    Examples:

        gpuctl local up

        gpuctl --profile local submit camera-angle photo.jpg --wait

        gpuctl --endpoint-url http://127.0.0.1:4566 local up
    """
    from gpuctl.services.local import LocalOptions, local_up

    out = state(ctx).renderer(output, quiet)
    with _Steps(out, "Starting local mode…") as steps:
        result = local_up(**_target(ctx),
                          options=LocalOptions(seconds_per_job=seconds_per_job, idle_minutes=idle_minutes),
                          on_step=steps.step)
    _render_up(out, result)


def _render_up(out: Renderer, result: UpResult) -> None:
    if out.json:
        out.data(result.document())
        return
    if out.quiet:
        out.ids([result.status.endpoint_url or ""])
        return
    _components_table(out, result.status)
    if result.action == "already-up":
        out.note("Local mode is already up.")
    elif result.action == "restarted":
        out.note(f"Restarted {', '.join(result.restarted)}.")
    else:
        out.note(f"Local mode is up ({result.seconds:.1f} s). Profile: {result.config_path}")
    out.note("Try: gpuctl --profile local submit camera-angle IMAGE --wait   (stop it: gpuctl local down)")


def _components_table(out: Renderer, status: StatusResult) -> None:
    rows = [(c.name, c.pid, "ok" if c.healthy else c.detail, c.url or "") for c in status.components]
    out.table(["Component", "PID", "Health", "URL"], rows,
              title=f"Local mode — AWS endpoint {status.endpoint_url}"
                    + (" (external)" if status.external_endpoint else ""))
    # Paths on their own lines: a table column would cut them on a narrow terminal.
    out.pairs([(f"{c.name} log", c.log) for c in status.components])


# --- gpuctl local down -----------------------------------------------------------------------------

@app.command("down")
def down(ctx: typer.Context, output: OutputOpt = None,
         quiet: Annotated[bool, quiet_opt("nothing (it only stops local mode)")] = False) -> None:
    """Stop the processes `gpuctl local up` started and remove local mode's state and profile values.

    Only processes whose pid still belongs to what `up` started are signalled (SIGTERM, then SIGKILL
    after 10 s). Logs stay in the state folder.

    Examples:

        gpuctl local down
    """
    from gpuctl.services.local import local_down

    out = state(ctx).renderer(output, quiet)
    result = local_down()
    if out.json:
        out.data(result.document())
    elif not result.was_up:
        out.note("Local mode is not running.")
    elif not out.quiet:
        out.table(["Component", "PID", "Result"], [(o.name, o.pid, o.result) for o in result.stopped])
        out.note("Local mode is down.")


# --- gpuctl local status ---------------------------------------------------------------------------

@app.command("status")
def status(ctx: typer.Context, output: OutputOpt = None,
           quiet: Annotated[bool, quiet_opt("healthy, unhealthy or down")] = False) -> None:
    """Show each local component's health (its pid still ours, answering) and where its log is.

    Exit 0 when all are healthy, 1 when local mode is down or a component is not.

    Examples:

        gpuctl local status

        gpuctl local status --output json | jq '.components[] | {name, healthy, log}'
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
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port on 127.0.0.1 (0: a free one).")]
    = 8188,
    seconds_per_job: SecondsOpt = 2.0,
) -> None:
    """Run the ComfyUI stand-in in the foreground (a CPU stand-in speaking ComfyUI's protocol, not the model).

    It transforms the input picture for real (a perspective warp, a sketch) and labels it as a stand-in.
    Stop it with Ctrl-C.

    Examples:

        gpuctl local comfyui --port 8188 --seconds-per-job 5
    """
    from gpuctl.local.comfyui_standin import main

    raise typer.Exit(main(["--port", str(port), "--seconds-per-job", str(seconds_per_job)]))


# --- gpuctl demo -----------------------------------------------------------------------------------

def register_demo(root: typer.Typer) -> None:
    """Add the top-level `gpuctl demo` command."""
    root.command("demo")(demo)


def demo(
    ctx: typer.Context,
    output_dir: Annotated[Path, typer.Option("--output-dir", file_okay=False,
                                             help="Where the sample and the results are written.")]
    = Path("gpuctl-demo"),
    keep: Annotated[bool, typer.Option("--keep", help="Leave local mode running afterwards.")] = False,
    timeout: Annotated[float, typer.Option("--timeout", min=1.0, help="Give up on the jobs after S seconds "
                                                                      "(exit 3).")] = 180.0,
    output: OutputOpt = None,
) -> None:
    """Run the whole pipeline on this machine: one job of each type on a sample picture, results saved.

    Brings local mode up (unless it is up), submits the sample as a camera-angle job and a
    qwen-image-edit job, follows them live, downloads the results to --output-dir and shows how long
    each step took; then takes local mode down again (unless --keep, or it was already up). Needs no
    AWS account, credentials or network. The images come from a CPU stand-in, not the model.

    Examples:

        gpuctl demo

        gpuctl demo --keep --output-dir /tmp/demo
    """
    from gpuctl.services.local import run_demo

    out = state(ctx).renderer(output)
    view = _DemoView(out)
    with _Steps(out, "Starting local mode…") as steps:
        def on_step(message: str) -> None:
            if message.startswith("Submitting"):
                steps.close()  # the jobs' live view takes over the terminal
            if steps.closed:
                view.step(message)
            else:
                steps.step(message)

        with view:
            result = run_demo(output_dir, keep=keep, timeout=timeout, on_step=on_step, on_change=view.update,
                              **_target(ctx))
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
    rows = [(j.kind, j.status, _secs(j.submit_s), _secs(j.queued_s), _secs(j.processing_s), _secs(j.download_s))
            for j in result.jobs]
    out.table(["Job", "Status", "Submit", "Queued", "Processing", "Download"], rows,
              title=f"gpuctl demo — local mode up: {up_note}, total {result.total_s:.1f} s")
    out.pairs([("sample", result.sample), *((j.kind, j.path) for j in result.jobs)])
    out.note("Queued: submitted → picked up by the adapter. Processing: picked up → completed.")
    out.note(f"Results are in {result.output_dir}/ — made by the CPU stand-in for ComfyUI, not by the model.")
    if result.down is None:
        out.note("Local mode is still running: try `gpuctl --profile local jobs list`; stop it with "
                 "`gpuctl local down`.")


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
    """The demo's jobs while they run: a Rich live table on a terminal, one stderr line per change else."""

    def __init__(self, out: Renderer) -> None:
        self._out = out
        self._jobs: dict[str, tuple[DemoJob, JobRecord]] = {}
        self._live: Any = None
        self._t0 = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.refresh()
            self._live.stop()
            self._live = None

    def step(self, message: str) -> None:
        if not self._out.json:
            elapsed = time.monotonic() - self._t0
            err_console().print(f"[dim]{elapsed:6.1f}s[/] {message}", highlight=False, soft_wrap=True)

    def update(self, job: DemoJob, record: JobRecord) -> None:
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

    def __rich__(self) -> Any:
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        table = Table("Job", "ID", "Status", "Progress", header_style="bold")
        for job, record in self._jobs.values():
            done = 1.0 if record.status.value == "completed" else (record.progress or 0.0)
            table.add_row(job.kind, job.job_id, record.status.value, ProgressBar(total=1.0, completed=done, width=24))
        return table
