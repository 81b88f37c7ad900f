"""``gpuctl-adapter`` / ``python -m adapter``: the daemon's entry point.

Builds the settings, the AWS gateways and the backend once, installs the SIGTERM/SIGINT handlers and runs
the loop. Exit codes: 0 stopped cleanly, 1 the backend never became ready, 2 a configuration error.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from adapter.backends import Readiness

__all__ = ["check_backend", "main", "run_daemon"]

log = logging.getLogger("adapter")


def run_daemon(settings: object, stop: threading.Event | None = None) -> int:
    """Run the adapter with ``settings`` (AdapterSettings) until SIGTERM/SIGINT or ``stop``."""
    from adapter.backends import make_backend
    from adapter.handlers import Deps
    from adapter.loop import run
    from adapter.settings import AdapterSettings
    from adapter.workflow import WorkflowError
    from gpuctl.services.context import Gateways

    assert isinstance(settings, AdapterSettings)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum: int, frame: FrameType | None) -> None:
            if not stop.is_set():
                log.info("adapter.signal", extra={"signal": signal.Signals(signum).name})
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    gateways = Gateways(settings)
    try:
        backend = make_backend(settings, gateways.store)
    except WorkflowError as exc:
        log.error("adapter.config_error", extra={"error": str(exc)})
        return 2
    deps = Deps(settings=settings, table=gateways.table, queue=gateways.queue, store=gateways.store,
                backend=backend)
    try:
        code = run(deps, stop)
    finally:
        backend.close()
    deadline = time.monotonic() + 3.0  # idle pool threads exit at once; a stuck job thread does not
    for thread in threading.enumerate():
        if not thread.daemon and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threading.enumerate()
             if t.is_alive() and not t.daemon and t is not threading.current_thread()]
    if stuck:
        # A job thread that never returned would keep the interpreter alive past systemd's stop timeout;
        # its message is released by SQS once the (no longer extended) visibility timeout runs out.
        log.error("adapter.forced_exit", extra={"threads": stuck})
        logging.shutdown()
        os._exit(code)
    return code


def check_backend(settings: object) -> Readiness:
    """One readiness check of the backend the settings name (``gpuctl adapter check``).

    Raises:
        ConfigError: the workflow templates are unusable.
    """
    from adapter.backends import make_backend
    from adapter.settings import AdapterSettings
    from adapter.workflow import WorkflowError
    from gpuctl.errors import ConfigError

    assert isinstance(settings, AdapterSettings)
    try:
        backend = make_backend(settings, None)
    except WorkflowError as exc:
        raise ConfigError(f"The workflow templates are unusable: {exc}.") from None
    try:
        return backend.check()
    finally:
        backend.close()


def main() -> int:
    """Console script ``gpuctl-adapter``: settings from the environment (GPUCTL_*) and the profile file."""
    from adapter.settings import load_adapter_settings
    from gpuctl.errors import GpuctlError
    from gpuctl.logs import configure

    configure()
    try:
        settings = load_adapter_settings()
    except GpuctlError as exc:
        log.error("adapter.config_error", extra={"error": str(exc)})
        return 2
    configure(settings.log_level)
    return run_daemon(settings)


if __name__ == "__main__":
    raise SystemExit(main())
