"""`gpuctl serve`: the running orchestrator's REST API on gpuctl's services (needs the `serve` extra)."""

from __future__ import annotations

from typing import Annotated

import typer

from gpuctl.cli import state

__all__ = ["register"]


def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option("--host", envvar="GPUCTL_SERVE_HOST",
                                      help="Address to listen on (0.0.0.0 in a container).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", envvar="GPUCTL_SERVE_PORT", min=1, max=65535,
                                      help="Port to listen on.")] = 8080,
    api_keys_file: Annotated[str | None, typer.Option(
        "--api-keys-file", envvar="GPUCTL_API_KEYS_FILE", show_default=False,
        help="File of API keys, one a line; with keys (or GPUCTL_API_KEYS) set, callers need one.")] = None,
    cors_origins: Annotated[str | None, typer.Option(
        "--cors-origins", envvar=["GPUCTL_CORS_ORIGINS", "CORS_ORIGINS"], show_default=False,
        help="Comma-separated browser origins allowed to call the API (credentials allowed).")] = None,
    max_body_bytes: Annotated[int, typer.Option("--max-body-bytes", envvar="GPUCTL_MAX_BODY_BYTES", min=1024,
                                                help="Largest request body accepted (413 above).")] = 64 * 1024,
) -> None:
    """Serve the job system's REST API (the old orchestrator's routes and more) until SIGTERM or Ctrl-C.

    API keys come from GPUCTL_API_KEYS (comma-separated, never a flag, so they stay out of `ps`) and/or
    --api-keys-file; without any, the API is open, as the old service was. Needs `pip install 'gpuctl[serve]'`.

    Examples:

        gpuctl serve

        gpuctl serve --host 0.0.0.0 --port 8080

        curl -s http://127.0.0.1:8080/health | jq .status
    """
    import os

    from gpuctl.errors import ConfigError

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ConfigError("gpuctl serve needs the serve extra: pip install 'gpuctl[serve]'.") from None
    from gpuctl.aws._session import make_clients
    from gpuctl.serve.app import ServeConfig, parse_origins
    from gpuctl.serve.guard import load_api_keys
    from gpuctl.serve.server import AWS_CONNECTIONS
    from gpuctl.serve.server import serve as run
    from gpuctl.services.context import Gateways

    config = ServeConfig(api_keys=load_api_keys(os.environ.get("GPUCTL_API_KEYS"), api_keys_file),
                         cors_origins=parse_origins(cors_origins), max_body_bytes=max_body_bytes)
    app_state = state(ctx)
    gw = Gateways(app_state.settings, make_clients(app_state.settings, max_pool_connections=AWS_CONNECTIONS))
    run(gw, config, host=host, port=port,
        log_level="DEBUG" if app_state.verbose > 1 else "INFO")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
