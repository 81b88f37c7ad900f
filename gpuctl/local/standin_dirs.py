"""The ComfyUI stand-in's working folders: made when it starts, removed when it stops, swept when it was killed.

A stand-in started without ``--input-dir``/``--output-dir``/``--temp-dir`` works in a fresh
``<temp dir>/gpuctl-standin-XXXX/{input,output,temp}`` (the temp dir is ``TMPDIR``'s or the system's). The
folder holds an owner file with the stand-in's pid; :func:`working_dirs` removes the folder however the
stand-in ends short of SIGKILL, and :func:`sweep_leftovers` (``gpuctl local down``) removes the folders of
stand-ins that are no longer running. No heavy imports: ``local down`` uses this without the server stack.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["OWNER_FILE", "PREFIX", "leftover_folders", "sweep_leftovers", "working_dirs"]

PREFIX = "gpuctl-standin-"
#: In each folder the stand-in creates: the pid of the process that owns it.
OWNER_FILE = ".gpuctl-standin-pid"


@contextlib.contextmanager
def working_dirs(input_dir: Path | None, output_dir: Path | None, temp_dir: Path | None,
                 ) -> Iterator[tuple[Path, Path, Path]]:
    """The three folders, the missing ones in a fresh ``gpuctl-standin-*`` folder removed on exit.

    Folders given are used as they are and never removed.
    """
    if input_dir is not None and output_dir is not None and temp_dir is not None:
        yield input_dir, output_dir, temp_dir
        return
    root = Path(tempfile.mkdtemp(prefix=PREFIX))
    try:
        (root / OWNER_FILE).write_text(f"{os.getpid()}\n")
        yield input_dir or root / "input", output_dir or root / "output", temp_dir or root / "temp"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _owner_alive(folder: Path) -> bool | None:
    """Whether the stand-in that made ``folder`` still runs (None: the folder names no owner)."""
    try:
        pid = int((folder / OWNER_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process holds that pid now: leave the folder
    return True


def leftover_folders(directory: Path | None = None) -> list[Path]:
    """This user's ``gpuctl-standin-*`` folders in ``directory`` (default: the temp dir) whose stand-in is gone.

    A folder without an owner file (made by a gpuctl before this one, or by hand) is not counted: nothing
    tells whether its stand-in still runs.
    """
    base = directory or Path(tempfile.gettempdir())
    found = []
    uid = os.getuid()
    with contextlib.suppress(OSError):
        for folder in sorted(base.glob(PREFIX + "*")):
            try:
                if folder.is_symlink() or not folder.is_dir() or folder.stat().st_uid != uid:
                    continue
            except OSError:
                continue
            if _owner_alive(folder) is False:
                found.append(folder)
    return found


def sweep_leftovers(directory: Path | None = None) -> list[Path]:
    """Remove what killed stand-ins left (see :func:`leftover_folders`); return the folders removed."""
    removed = []
    for folder in leftover_folders(directory):
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            removed.append(folder)
    return removed
