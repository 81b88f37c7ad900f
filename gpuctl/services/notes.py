"""The activity-marker note of a long-lived submitter (``gpuctl serve``), coalesced.

A one-shot submit (the CLI) notes every job on the activity marker after queuing its message: one UpdateItem
that moves ``last_submit_at`` (so a stop the scheduler decided meanwhile is refused: its fence is conditional on
that value) and returns the marker (so the submit knows whether an adapter polls, or a stop was fenced and the
instance must be started). That is the third AWS request of every job.

A process that submits job after job keeps the rule and drops the cost: while its last look at the marker said an
adapter polls, a submit writes the record and the message only, and :class:`SubmitNotes` makes one marker write
for every message queued since its previous write began, at most every ``interval`` seconds, from a thread of its
own. Each queued message is still followed by a marker write that starts after the message was queued, so the
scheduler's fenced stop stays safe exactly as before: a stop decided before that write is refused or seen by it.
What a write sees acts as the one-shot submit would: an adapter no longer polling, or a stop fenced since it last
reported, clears the hint (the next submits go the full way again) and makes sure the instance runs. The one
difference is when: up to ``interval`` seconds after the job was accepted, not before the answer.

:meth:`SubmitNotes.close` writes what is due before the process exits (``gpuctl serve`` calls it after its
graceful shutdown). A process killed with messages queued since its last write leaves those unnoted: they are in
the queue, where the scheduler sees them (a stopped instance is started for a waiting message).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import TYPE_CHECKING

from gpuctl.errors import GpuctlError

if TYPE_CHECKING:
    from gpuctl.aws.dynamo import Activity
    from gpuctl.services.context import Gateways

__all__ = ["NOTE_INTERVAL_SECONDS", "SubmitNotes"]

#: At most one marker write this often for a stream of submits.
NOTE_INTERVAL_SECONDS = 2.0

log = logging.getLogger(__name__)


class SubmitNotes:
    """Coalesced activity-marker notes for the submits of one long-lived process (thread-safe)."""

    def __init__(self, gw: Gateways, *, interval: float = NOTE_INTERVAL_SECONDS) -> None:
        self._gw = gw
        self._interval = interval
        self._cond = threading.Condition()
        self._due = False  # a message was queued since the last write began
        self._closed = False
        self._thread: threading.Thread | None = None
        self._hint: Activity | None = None

    def polling(self, now: float) -> Activity | None:
        """The marker as last seen, if it said an adapter polls (and no stop was fenced since), else None."""
        hint = self._hint
        return hint if hint is not None and hint.adapter_fresh(now) else None

    def observe(self, activity: Activity | None) -> None:
        """Take what a submit's own marker write returned as the latest look at the marker."""
        self._hint = activity

    def queued(self) -> None:
        """A message was queued on the strength of :meth:`polling`: a marker write is now due."""
        with self._cond:
            if self._closed:
                raise RuntimeError("SubmitNotes is closed")
            self._due = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="gpuctl-submit-notes", daemon=True)
                self._thread.start()
            self._cond.notify()

    def close(self, timeout: float = 30.0) -> None:
        """Make the write that is due, if any, and stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        last = -math.inf
        while True:
            with self._cond:
                while not self._due and not self._closed:
                    self._cond.wait()
                if not self._due:
                    return
                wait = last + self._interval - time.monotonic()
                if wait > 0 and not self._closed:
                    self._cond.wait(wait)  # messages queued meanwhile are covered by the same write
                    continue
                self._due = False
            last = time.monotonic()
            self._write()

    def _write(self) -> None:
        from gpuctl.services.submit import start_for_work

        try:
            activity = self._gw.table.note_submit()
        except GpuctlError as exc:
            log.warning("submit.activity_not_noted", extra={"error": str(exc)})
            self._hint = None  # unknown: the next submits note for themselves again
            return
        if activity.adapter_fresh(time.time()):
            self._hint = activity
            return
        self._hint = None
        log.warning("submit.adapter_not_polling", extra={"worker": activity.adapter_worker,
                                                         "adapter_state": activity.adapter_state})
        try:
            outcome = start_for_work(self._gw, stopping_wait=0)
        except GpuctlError as exc:  # this thread must outlive it: later submits rely on its writes
            log.warning("submit.instance_not_started", extra={"error": str(exc)})
            return
        log.info("submit.instance", extra={"action": outcome.action, "state": outcome.state,
                                           "warning": outcome.warning})
