"""Keeping the ComfyUI box from filling up: the files of each job are deleted when the job ends.

ComfyUI has no HTTP route that deletes an uploaded input or a written output, so the adapter, which runs on the
same machine, deletes them from ComfyUI's folders itself (``GPUCTL_COMFYUI_DIR``, or the input and output
folders given one by one). It only ever touches files in the ``gpuctl/`` subfolder that it uploads into and that
its workflows save into, and only names it made: ``<task id>-<attempt token>_…``. Each attempt deletes only its
own files, so a paused attempt that wakes up cannot delete the files of the attempt that took over.

Files left behind by an adapter that died (or by a prompt that did not stop when asked) are swept once they are
older than ``comfyui_file_ttl``: at start-up and then at most every ten minutes, after a job ends.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from pathlib import Path

__all__ = ["SUBFOLDER", "JobFiles"]

log = logging.getLogger(__name__)

#: The subfolder of ComfyUI's input and output folders that holds the adapter's files (and nothing else).
SUBFOLDER = "gpuctl"
_SWEEP_EVERY = 600.0
# <uuid>-<token>_<anything>: the only names the adapter writes (inputs ``_1.png``, outputs ``_00001_.png``).
_OURS = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}-[0-9a-z]+_")


class JobFiles:
    """Deletes a job attempt's files from ComfyUI's folders; a no-op when the folders are not configured."""

    def __init__(self, input_dir: Path | None, output_dir: Path | None, ttl: float) -> None:
        self.input_dir = input_dir
        self.output_dir = output_dir
        self.ttl = ttl
        self._next_sweep = 0.0

    @property
    def enabled(self) -> bool:
        return self.input_dir is not None or self.output_dir is not None

    def problems(self) -> list[str]:
        """Why the configured folders cannot be used (for the readiness report)."""
        out = []
        for what, folder in (("input", self.input_dir), ("output", self.output_dir)):
            if folder is not None and not folder.is_dir():
                out.append(f"ComfyUI's {what} folder {folder} does not exist (GPUCTL_COMFYUI_DIR)")
        return out

    def remove(self, stem: str, uploaded: Iterable[str]) -> int:
        """Delete the inputs uploaded as ``uploaded`` (names as LoadImage takes them) and every output saved
        under the prefix ``gpuctl/<stem>``; return how many files went."""
        removed = 0
        if self.input_dir is not None:
            for name in set(uploaded):
                removed += _unlink(self.input_dir, name)
        if self.output_dir is not None:
            folder = self.output_dir / SUBFOLDER
            if folder.is_dir():
                for path in folder.glob(f"{glob_escape(stem)}_*"):
                    removed += _unlink(self.output_dir, f"{SUBFOLDER}/{path.name}")
        self.sweep_if_due()
        return removed

    def sweep_if_due(self) -> None:
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + _SWEEP_EVERY
            self.sweep()

    def sweep(self) -> int:
        """Delete the adapter's files older than the TTL (left by a crash); return how many went."""
        cutoff = time.time() - self.ttl
        removed = 0
        for base in (self.input_dir, self.output_dir):
            folder = base / SUBFOLDER if base is not None else None
            if folder is None or not folder.is_dir():
                continue
            for path in folder.iterdir():
                try:
                    if path.is_file() and _OURS.match(path.name) and path.stat().st_mtime < cutoff:
                        path.unlink()
                        removed += 1
                except OSError as exc:
                    log.warning("adapter.sweep_failed", extra={"path": str(path), "error": str(exc)})
        if removed:
            log.info("adapter.swept", extra={"files": removed})
        return removed


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _unlink(base: Path, name: str) -> int:
    path = (base / name).resolve()
    if not path.is_relative_to((base / SUBFOLDER).resolve()):
        return 0  # never outside our subfolder, whatever a name says
    try:
        path.unlink()
    except FileNotFoundError:
        return 0
    except OSError as exc:
        log.warning("adapter.file_delete_failed", extra={"path": str(path), "error": str(exc)})
        return 0
    return 1
