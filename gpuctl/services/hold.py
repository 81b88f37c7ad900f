"""Keep the GPU instance up on purpose (a hold the scheduler Lambda honours), and say why it last stopped.

The hold is two tags on the instance: ``gpuctl:hold-until`` (epoch seconds) and ``gpuctl:hold-reason``.
The Lambda never stops the instance before ``hold-until``; it records each stop in ``gpuctl:stopped-reason``
and ``gpuctl:stopped-at`` (ISO time), which ``why_stopped`` reads back.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpuctl.errors import UsageError
from gpuctl.services.instance import (
    HOLD_REASON_TAG,
    HOLD_UNTIL_TAG,
    STOPPED_AT_TAG,
    STOPPED_BY_TAG,
    STOPPED_REASON_TAG,
)
from gpuctl.times import parse_time, stamp

if TYPE_CHECKING:
    from gpuctl.services.context import Gateways

__all__ = ["MAX_HOLD_SECONDS", "Hold", "HoldJudgement", "StopRecord", "hold", "judge_hold", "parse_hold_duration",
           "release", "why_stopped"]

log = logging.getLogger(__name__)

#: A forgotten hold keeps a GPU running; a longer one has to be renewed on purpose.
MAX_HOLD_SECONDS = 7 * 86400


@dataclass(frozen=True)
class HoldJudgement:
    """How the scheduler treats a ``gpuctl:hold-until`` value: until when it holds (None: no hold), and a
    warning when it is not taken as written."""

    until: float | None
    warning: str | None = None


def judge_hold(raw: str | None, now: float, *, first_seen_at: float | None = None) -> HoldJudgement:
    """The hold as the scheduler honours it (the same rule as lambda/decide.py ``resolve_hold``).

    A readable time in the past: no hold. A readable time up to :data:`MAX_HOLD_SECONDS` after the scheduler
    first saw the value: that time. Anything else (blank, ``inf``, ``2h``, ``tomorrow``, a millisecond epoch,
    beyond the cap) keeps the GPU up, but only until the cap.
    """
    from gpuctl.times import iso, parse_time

    if raw is None:
        return HoldJudgement(None)
    anchor = now if first_seen_at is None else min(first_seen_at, now)
    cap = anchor + MAX_HOLD_SECONDS
    days = MAX_HOLD_SECONDS // 86400
    value = parse_time(raw)
    if value is None:
        return HoldJudgement(cap, f"the hold value {raw!r} is not a time; the scheduler treats it as a hold of "
                                  f"at most {days} days, until {iso(cap)}; `gpuctl instance hold` or `release` "
                                  "replaces it")
    if value <= now:
        return HoldJudgement(None)
    if value > cap:
        return HoldJudgement(cap, f"the hold value {raw!r} is longer than the maximum of {days} days; the "
                                  f"scheduler treats it as a hold until {iso(cap)}")
    return HoldJudgement(value)


@dataclass(frozen=True)
class Hold:
    instance_id: str
    until: float | None  # epoch seconds; None: no hold
    reason: str | None
    state: str | None = None  # the instance's state when the hold was set or released
    warning: str | None = None  # the tag value was not a usable time (see judge_hold)

    def document(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "state": self.state,
            **stamp("hold_until", None if self.until is None else int(self.until)),
            "hold_reason": self.reason,
            "hold_warning": self.warning,
        }


@dataclass(frozen=True)
class StopRecord:
    """The last stop recorded on the instance (all None when none is recorded)."""

    instance_id: str
    state: str
    stopped_at: str | None
    reason: str | None
    stopped_by: str | None

    @property
    def recorded(self) -> bool:
        return self.reason is not None or self.stopped_at is not None

    def document(self) -> dict[str, Any]:
        return {"instance_id": self.instance_id, "state": self.state, "recorded": self.recorded,
                **stamp("stopped_at", parse_time(self.stopped_at)), "stopped_reason": self.reason,
                "stopped_by": self.stopped_by}


def parse_hold_duration(value: str) -> float:
    """``2h``, ``30m``, ``1d`` (s, m, h, d or w) as seconds, up to :data:`MAX_HOLD_SECONDS`.

    Raises:
        UsageError: not a positive duration, or longer than the maximum.
    """
    from gpuctl.services.jobs import parse_duration

    seconds = parse_duration(value, option="--for")
    if seconds <= 0:
        raise UsageError(f"--for {value!r} must be longer than zero.")
    if seconds > MAX_HOLD_SECONDS:
        raise UsageError(f"--for {value!r} is longer than the maximum hold of {MAX_HOLD_SECONDS // 86400} days; "
                         "hold again later to extend it.")
    return seconds


def hold(gw: Gateways, duration: str, reason: str | None = None, *, now: float | None = None) -> Hold:
    """Keep the instance from being stopped as idle for ``duration`` (this does not start a stopped one).

    Holding again replaces the previous hold; without ``reason`` an old reason is removed.

    Raises:
        UsageError: ``duration`` is not a valid duration.
        NotFound: the instance does not exist.
    """
    seconds = parse_hold_duration(duration)
    until = int((time.time() if now is None else now) + seconds)
    instance = gw.instance
    # Describe first: it fails clearly for an unknown instance (the emulator tags anything), and the
    # state tells the user whether the held instance is actually up.
    state = instance.describe().state
    tags = {HOLD_UNTIL_TAG: str(until)}
    if reason:
        tags[HOLD_REASON_TAG] = reason[:256]  # the EC2 limit for a tag value
    instance.set_tags(tags)
    if not reason:
        instance.delete_tags([HOLD_REASON_TAG])
    log.info("instance.hold", extra={"instance_id": instance.instance_id, "until": until})
    return Hold(instance.instance_id, float(until), reason[:256] if reason else None, state)


def release(gw: Gateways) -> Hold:
    """Remove the hold; return the one that was there (``until`` None when there was none).

    Raises:
        NotFound: the instance does not exist.
    """
    instance = gw.instance
    info = instance.describe()
    previous = _hold_from(instance.instance_id, info.tags, info.state)
    instance.delete_tags([HOLD_UNTIL_TAG, HOLD_REASON_TAG])
    log.info("instance.release", extra={"instance_id": instance.instance_id, "had_hold": previous.until is not None})
    return previous


def _hold_from(instance_id: str, tags: dict[str, str], state: str) -> Hold:
    """The hold the tags describe; a value that is not a time is reported as the tag says, with a warning."""
    from gpuctl.times import parse_time

    raw = tags.get(HOLD_UNTIL_TAG)
    judged = judge_hold(raw, time.time())
    until = parse_time(raw) if judged.warning is None or raw is None else judged.until
    return Hold(instance_id, until, tags.get(HOLD_REASON_TAG) or None, state, judged.warning)


def why_stopped(gw: Gateways) -> StopRecord:
    """The reason and time of the instance's last recorded stop (by the scheduler Lambda or gpuctl).

    Raises:
        NotFound: the instance does not exist.
    """
    info = gw.instance.describe()
    tags = info.tags
    return StopRecord(info.instance_id, info.state, tags.get(STOPPED_AT_TAG) or None,
                      tags.get(STOPPED_REASON_TAG) or None, tags.get(STOPPED_BY_TAG) or None)
