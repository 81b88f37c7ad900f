"""The one time convention of gpuctl's output.

* JSON carries every time twice: ``<name>`` as epoch seconds (a number, never a string) and ``<name>_iso`` as
  ISO 8601 in UTC with a ``Z`` (``2026-12-01T07:40:41Z``). :func:`stamp` builds the pair.
* Text shows the ISO 8601 UTC time with a relative age: ``2026-12-01T07:40:41Z (3 min ago)`` (:func:`human`).

Nothing here reads the clock unless asked to (``now`` defaults to ``time.time()``), so it is tested on its own.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from typing import Any

__all__ = ["ago", "human", "iso", "parse_time", "stamp"]


def iso(epoch: float | None) -> str | None:
    """``epoch`` seconds as ISO 8601 UTC (second precision, ``Z``); None stays None."""
    if epoch is None or not math.isfinite(epoch):
        return None
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def stamp(name: str, epoch: float | None) -> dict[str, Any]:
    """``{name: epoch, name_iso: "…Z"}`` for a JSON document (both None when unknown)."""
    value: float | int | None = epoch
    if isinstance(epoch, float) and epoch.is_integer():
        value = int(epoch)
    return {name: value, f"{name}_iso": iso(epoch)}


def ago(epoch: float, now: float | None = None) -> str:
    """A relative age for people: ``just now``, ``42 s ago``, ``3 min ago``, ``5 h ago``, ``2 d ago``, ``in 4 min``."""
    delta = (time.time() if now is None else now) - epoch
    future = delta < 0
    seconds = abs(delta)
    if seconds < 5:
        return "just now"
    if seconds < 90:
        text = f"{seconds:.0f} s"
    elif seconds < 90 * 60:
        text = f"{seconds / 60:.0f} min"
    elif seconds < 36 * 3600:
        text = f"{seconds / 3600:.0f} h"
    else:
        text = f"{seconds / 86400:.0f} d"
    return f"in {text}" if future else f"{text} ago"


def human(epoch: float | None, now: float | None = None) -> str | None:
    """``2026-12-01T07:40:41Z (3 min ago)`` for text output; None stays None."""
    text = iso(epoch)
    if text is None or epoch is None:
        return None
    return f"{text} ({ago(epoch, now)})"


def parse_time(raw: Any) -> float | None:
    """Epoch seconds from a number, a numeric string or ISO 8601 (``Z`` allowed; naive means UTC); else None."""
    if raw is None:
        return None
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int | float):
        return float(raw) if math.isfinite(raw) else None
    text = str(raw).strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        try:
            parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=dt.UTC)
        return parsed.timestamp()
    return value if math.isfinite(value) else None
