"""Ctrl-C and SIGTERM while a command writes: the :class:`~gpuctl.services.submit.WriteGuard` of the CLI.

While installed, SIGINT and SIGTERM are handled here. Outside a deferred section they raise KeyboardInterrupt
at once, as Ctrl-C always does (an upload stops, its object is deleted). Inside one (a record and its message,
a chunk of a batch) the first signal only sets :attr:`SignalGuard.pending`; the service finishes the section and
stops. A second signal raises KeyboardInterrupt even there, so a hung request can still be abandoned (the
service then marks what it may have written ``failed``). Either way the command exits 130.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from types import FrameType, TracebackType
from typing import Any

__all__ = ["SignalGuard"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SignalGuard(AbstractContextManager["SignalGuard"]):
    def __init__(self) -> None:
        self.signals = 0
        self._depth = 0
        self._previous: dict[int, Any] = {}

    @property
    def pending(self) -> bool:
        return self.signals > 0

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for signum in _SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1
        if self._depth == 0 or self.signals > 1:
            raise KeyboardInterrupt

    @contextmanager
    def _deferred(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    def deferred(self) -> AbstractContextManager[None]:
        """A section in which the first interrupt only sets :attr:`pending`."""
        return self._deferred()
