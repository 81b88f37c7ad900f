"""``gpuctl adapter run``: the adapter daemon in the foreground (systemd runs ``gpuctl-adapter`` itself);
``gpuctl adapter check``: the backend's readiness report, once."""

from __future__ import annotations

from typing import Annotated

import typer

from gpuctl.cli import state
from gpuctl.cli._output import OutputOpt

__all__ = ["app"]

app = typer.Typer(help="Run the GPU-side adapter daemon (SQS → ComfyUI → S3).", no_args_is_help=True)

BackendOpt = Annotated[str | None, typer.Option(
    "--backend", help="comfyui (native API, default) or unified (the seed's API service).")]
BackendUrlOpt = Annotated[str | None, typer.Option(
    "--backend-url", help="Backend base URL (default http://127.0.0.1:8188, unified :8000).")]


@app.command("check")
def check(ctx: typer.Context, backend: BackendOpt = None, backend_url: BackendUrlOpt = None,
          output: OutputOpt = None) -> None:
    """Check once whether the backend can take jobs: reachable, node classes, model files, folders.

    Exit 0 ready, 1 not ready (each problem on its own line), 2 a configuration error. Run it after
    installing ComfyUI, its models and the adapter; no AWS setting is needed.

    Examples:

        gpuctl adapter check

        gpuctl adapter check --backend-url http://127.0.0.1:8188 -o json
    """
    from adapter.__main__ import check_backend
    from adapter.settings import load_backend_settings

    settings = load_backend_settings(**state(ctx).overrides, backend=backend, backend_url=backend_url)
    report = check_backend(settings)
    out = state(ctx).renderer(output)
    if out.json:
        out.data(report.to_dict())
    else:
        out.pairs([("backend", f"{report.backend} at {report.url}"), ("version", report.version or "unknown"),
                   ("checked", ", ".join(report.checked) or "-"), ("ready", "yes" if report.ready else "NO")])
        for problem in report.problems:
            typer.echo(f"problem: {problem}")
        for warning in report.warnings:
            out.warn(warning)
    raise typer.Exit(0 if report.ready else 1)


@app.command("run")
def run(
    ctx: typer.Context,
    backend: BackendOpt = None,
    backend_url: BackendUrlOpt = None,
    inflight: Annotated[int | None, typer.Option(
        "--inflight", min=1, max=10, help="Jobs in hand at once (default 2).")] = None,
) -> None:
    """Serve the job queue until SIGTERM/SIGINT; logs are JSON lines on stderr.

    Every other setting comes from the environment (GPUCTL_*), as in the systemd unit.

    Examples:

        gpuctl adapter run

        gpuctl --endpoint-url http://127.0.0.1:5000 adapter run --backend-url http://127.0.0.1:8188
    """
    from adapter.__main__ import run_daemon
    from adapter.settings import load_adapter_settings
    from gpuctl.logs import configure

    settings = load_adapter_settings(**state(ctx).overrides, backend=backend, backend_url=backend_url,
                                     inflight=inflight)
    configure(settings.log_level)
    raise typer.Exit(run_daemon(settings))
