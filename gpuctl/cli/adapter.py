"""``gpuctl adapter run``: the adapter daemon in the foreground (systemd runs ``gpuctl-adapter`` itself)."""

from __future__ import annotations

from typing import Annotated

import typer

from gpuctl.cli import state

__all__ = ["app"]

app = typer.Typer(help="Run the GPU-side adapter daemon (SQS → ComfyUI → S3).", no_args_is_help=True)


@app.command("run")
def run(
    ctx: typer.Context,
    backend: Annotated[str | None, typer.Option(
        "--backend", help="comfyui (native API, default) or unified (the seed's API service).")] = None,
    backend_url: Annotated[str | None, typer.Option(
        "--backend-url", help="Backend base URL (default http://127.0.0.1:8188, unified :8000).")] = None,
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
