"""Run the API with uvicorn: JSON logs on stderr, graceful shutdown on SIGTERM/SIGINT (in-flight requests finish,
so a submit never stops between its record and its message)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpuctl.serve.app import ServeConfig
    from gpuctl.services.context import Gateways

__all__ = ["AWS_CONNECTIONS", "GRACEFUL_SHUTDOWN_SECONDS", "WORKER_THREADS", "implementations", "serve"]

#: How long a SIGTERM waits for requests in flight before closing them (ECS waits 30 s before SIGKILL).
GRACEFUL_SHUTDOWN_SECONDS = 25
#: Threads that run the routes' AWS calls: anyio's default limiter, shared by FastAPI's sync routes and the submit
#: route's ``run_in_threadpool`` (tests/functional/test_serve_guard.py checks the number).
WORKER_THREADS = 40
#: Connections each AWS client keeps: one per worker thread and one for the coalesced activity notes, so a burst of
#: concurrent requests reuses its connections instead of opening (and dropping) new ones past botocore's 10.
AWS_CONNECTIONS = WORKER_THREADS + 1

log = logging.getLogger("gpuctl.serve")


def _server_class() -> type[Any]:
    import contextlib
    import signal
    from collections.abc import Iterator

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but a SIGTERM ends it with exit 0 once in-flight requests are done (uvicorn re-raises the
        signal after its graceful shutdown, which reports the orderly stop as a death by signal)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


def implementations() -> tuple[str, str]:
    """uvicorn's HTTP parser and event loop: httptools and uvloop (C; the ``serve`` extra installs them where they
    build, and they halve the server's own CPU per request), else the pure-Python h11 and asyncio."""
    from importlib.util import find_spec

    return ("httptools" if find_spec("httptools") else "h11"), ("uvloop" if find_spec("uvloop") else "asyncio")


def serve(gw: Gateways, config: ServeConfig, *, host: str, port: int, log_level: str = "INFO") -> None:
    """Serve until SIGTERM or SIGINT.

    Raises:
        ConfigError: a setting every route needs is missing (the table, the queue).
        UsageError: the address is taken or cannot be bound.
    """
    import uvicorn

    from gpuctl.errors import UsageError
    from gpuctl.logs import configure
    from gpuctl.serve.app import create_app, require_settings

    require_settings(gw)
    configure(log_level)
    app = create_app(gw, config)
    http, loop = implementations()
    server = _server_class()(uvicorn.Config(
        app, host=host, port=port, http=http, loop=loop, log_config=None, access_log=False, server_header=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS, lifespan="off", proxy_headers=False,
    ))
    log.info("serve.starting", extra={"host": host, "port": port, "api_keys": len(config.api_keys),
                                      "cors_origins": list(config.cors_origins),
                                      "max_body_bytes": config.max_body_bytes, "http": http, "loop": loop})
    try:
        server.run()
    except SystemExit:  # uvicorn exits (3) when it cannot bind; the error boundary gives the sentence and exit 2
        server.started = False
    finally:
        app.state.submit_notes.close()  # the activity-marker note due for the last submits
    if not server.started:
        raise UsageError(f"Could not listen on {host}:{port} (is the port taken?).")
    log.info("serve.stopped")
