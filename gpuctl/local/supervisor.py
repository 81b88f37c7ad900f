"""Background processes of local mode: start them detached, record them, check them, stop exactly them.

Every component (the AWS emulator, the ComfyUI stand-in, the adapter, the scheduler loop) runs in its own
session with its output appended to a log file. ``state.json`` in the state folder records, per component,
the pid together with the command line and the kernel's start time of that process, so that a later
``gpuctl local down`` signals a pid only while it still belongs to the process ``up`` started: a pid that
the system has since given to an unrelated process is left alone.

State folder (``$GPUCTL_LOCAL_DIR``, else ``$XDG_STATE_HOME/gpuctl/local``, else
``~/.local/state/gpuctl/local``)::

    state.json          what is running: endpoint, profile, and one record per component
    <name>.pid          the component's pid, for shell users (state.json is the record gpuctl reads)
    logs/<name>.log     the component's stdout and stderr (kept after `down`, appended to on restart)
    comfyui/            the stand-in's input, output and temp folders
    up.lock             held while `up` or `down` runs, so two of them never interleave
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "STATE_VERSION",
    "ComponentRecord",
    "LocalState",
    "ProcessIdentity",
    "StateDir",
    "StopOutcome",
    "free_port",
    "http_ok",
    "identity",
    "is_alive",
    "owns",
    "send_signal",
    "spawn",
    "state_dir",
    "stop",
    "wait_until",
]

log = logging.getLogger(__name__)

STATE_VERSION = 1
_POLL = 0.1  # seconds between readiness probes: local processes answer within milliseconds once up


def state_dir(explicit: Path | None = None) -> Path:
    """The local-mode state folder (see the module docstring for the lookup order)."""
    if explicit is not None:
        return explicit
    if env := os.environ.get("GPUCTL_LOCAL_DIR"):
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "gpuctl" / "local"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- process identity ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ProcessIdentity:
    """What tells one process from a later one that got the same pid: its argv and when it started."""

    cmdline: tuple[str, ...]
    start_ticks: int | None  # /proc/<pid>/stat field 22 (clock ticks after boot); None off Linux
    zombie: bool = False


def _proc_identity(pid: int) -> ProcessIdentity | None:
    proc = Path(f"/proc/{pid}")
    try:
        raw_cmdline = (proc / "cmdline").read_bytes()
        stat = (proc / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name in field 2 may contain spaces and parentheses: split after its closing ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    state, start = fields[0], int(fields[19])
    cmdline = tuple(part.decode(errors="replace") for part in raw_cmdline.split(b"\0")[:-1])
    return ProcessIdentity(cmdline, start, zombie=state in ("Z", "X"))


def _ps_identity(pid: int) -> ProcessIdentity | None:
    # No /proc (macOS): `ps` gives the command line as one string and the start time to the second.
    result = subprocess.run(["ps", "-o", "stat=,lstart=,command=", "-p", str(pid)],
                            capture_output=True, text=True, check=False)
    line = result.stdout.strip()
    if result.returncode != 0 or not line:
        return None
    parts = line.split(None, 6)  # STAT, then lstart is five words, then the command
    if len(parts) < 7:
        return None
    return ProcessIdentity(tuple(parts[6].split(" ")), None, zombie=parts[0].startswith("Z"))


def identity(pid: int) -> ProcessIdentity | None:
    """The identity of the process that has ``pid`` now, or None when there is none."""
    if Path("/proc/self/stat").exists():
        return _proc_identity(pid)
    return _ps_identity(pid)


def _reap(pid: int) -> None:
    """Collect the exit status if ``pid`` is our own child (when `up` ran in this process), so it is gone
    rather than a zombie; for any other process this does nothing."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def is_alive(pid: int) -> bool:
    _reap(pid)
    found = identity(pid)
    return found is not None and not found.zombie


# --- records ---------------------------------------------------------------------------------------

@dataclass
class ComponentRecord:
    """One background process as state.json records it."""

    name: str
    pid: int
    argv: list[str]
    start_ticks: int | None
    log: str
    started_at: float
    url: str | None = None  # what answers HTTP when it is healthy (None: judged by its process and log)
    health_path: str | None = None
    ready_marker: str | None = None  # a log line fragment that says it is ready
    log_offset: int = 0  # where this run's output starts in the (appended) log

    @property
    def health_url(self) -> str | None:
        return None if self.url is None else self.url.rstrip("/") + (self.health_path or "/")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ComponentRecord:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class LocalState:
    """Everything `gpuctl local up` started and wrote, as state.json holds it."""

    endpoint_url: str
    profile: str
    config_dir: str
    region: str
    started_at: float
    external_endpoint: bool = False  # the endpoint was given (LocalStack …): not ours to start or stop
    stack_name: str | None = None
    instance_id: str | None = None
    settings_written: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)  # how `up` was asked to run (reused on restarts)
    components: dict[str, ComponentRecord] = field(default_factory=dict)
    version: int = STATE_VERSION

    def document(self) -> dict[str, Any]:
        data = asdict(self)
        data["components"] = {k: asdict(v) for k, v in self.components.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LocalState:
        components = {k: ComponentRecord.from_dict(v) for k, v in dict(data.get("components", {})).items()}
        known = {f for f in cls.__dataclass_fields__} - {"components"}
        return cls(**{k: v for k, v in data.items() if k in known}, components=components)


class StateDir:
    """The state folder: state.json, pid files, logs and the lock."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def log_path(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def pid_path(self, name: str) -> Path:
        return self.root / f"{name}.pid"

    def load(self) -> LocalState | None:
        """The recorded state, or None when nothing is recorded (or the file is unreadable: logged)."""
        try:
            data = json.loads(self.state_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("local.state_unreadable", extra={"path": str(self.state_file), "error": str(exc)})
            return None
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            log.warning("local.state_unknown_version", extra={"path": str(self.state_file)})
            return None
        return LocalState.from_dict(data)

    def save(self, state: LocalState) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(state.document(), indent=2, sort_keys=True), encoding="utf-8")
        tmp.replace(self.state_file)
        for record in state.components.values():
            self.pid_path(record.name).write_text(f"{record.pid}\n", encoding="utf-8")

    def forget(self, name: str) -> None:
        self.pid_path(name).unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove state.json and the pid files (logs stay, for the post-mortem)."""
        for pid_file in self.root.glob("*.pid"):
            pid_file.unlink(missing_ok=True)
        self.state_file.unlink(missing_ok=True)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold ``up.lock`` (an advisory flock, released by the kernel if we die)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / "up.lock").open("a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# --- start -----------------------------------------------------------------------------------------

def spawn(name: str, argv: Sequence[str], *, env: Mapping[str, str], log_path: Path,
          url: str | None = None, health_path: str | None = None,
          ready_marker: str | None = None) -> ComponentRecord:
    """Start ``argv`` detached (its own session, stdin from /dev/null, output appended to ``log_path``).

    posix_spawn rather than Popen: the process outlives this one, and no Popen object is left behind to
    warn that its child is still running. It returns once the program has been executed, so the identity
    read right after is the new program's.

    Raises:
        OSError: the program could not be started.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    offset = log_path.stat().st_size if log_path.exists() else 0
    with log_path.open("a", encoding="utf-8") as handle:
        handle.write(f"--- gpuctl local: starting {name}: {' '.join(argv)}\n")
    offset_after_banner = log_path.stat().st_size
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(log_path), flags, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    pid = os.posix_spawn(argv[0], list(argv), dict(env), file_actions=actions, setsid=True)
    found = identity(pid)
    record = ComponentRecord(
        name=name, pid=pid, argv=list(argv), start_ticks=found.start_ticks if found else None,
        log=str(log_path), started_at=time.time(), url=url, health_path=health_path,
        ready_marker=ready_marker, log_offset=max(offset, offset_after_banner),
    )
    log.info("local.spawned", extra={"component": name, "pid": pid, "log": str(log_path)})
    return record


# --- check -----------------------------------------------------------------------------------------

def owns(record: ComponentRecord) -> bool:
    """True while ``record.pid`` is still the process that was started (same argv, same start time)."""
    _reap(record.pid)
    found = identity(record.pid)
    if found is None or found.zombie:
        return False
    if found.start_ticks is not None and record.start_ticks is not None:
        if found.start_ticks != record.start_ticks:
            return False
        return list(found.cmdline) == record.argv
    # Without a start time (ps): compare the command line as one string (ps joins argv with spaces).
    return " ".join(found.cmdline) == " ".join(record.argv)


def http_ok(url: str, *, timeout: float = 2.0) -> bool:
    """True when ``url`` answers with a 2xx status (no proxy: the components are on loopback)."""
    import httpx

    try:
        response = httpx.get(url, timeout=timeout, trust_env=False)
    except httpx.HTTPError:
        return False
    return 200 <= response.status_code < 300


def log_has(record: ComponentRecord, marker: str) -> bool:
    """True when this run's part of the component's log contains ``marker``."""
    try:
        with Path(record.log).open("rb") as handle:
            handle.seek(record.log_offset)
            return marker.encode() in handle.read()
    except FileNotFoundError:
        return False


def log_tail(path: str | Path, lines: int = 15) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def wait_until(check: Callable[[], bool], *, timeout: float, alive: Callable[[], bool] | None = None,
               sleep: Callable[[float], None] = time.sleep) -> bool:
    """Probe ``check`` until it is true (True), ``timeout`` seconds pass or ``alive`` turns false (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if alive is not None and not alive():
            return False
        if time.monotonic() >= deadline:
            return False
        sleep(_POLL)


# --- stop ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StopOutcome:
    """``stopped`` (SIGTERM sufficed), ``killed`` (SIGKILL after the timeout), ``not-running``, or
    ``not-ours`` (the pid now belongs to another process, which was left alone)."""

    name: str
    pid: int
    result: str


def _signal(pid: int, pidfd: int | None, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, sig)
        else:
            os.kill(pid, sig)


def _open_pidfd(pid: int) -> int | None:
    # A pidfd pins the process: signals sent through it can never reach a later process with the same pid.
    if not hasattr(os, "pidfd_open") or not sys.platform.startswith("linux"):
        return None
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def send_signal(record: ComponentRecord, sig: signal.Signals) -> bool:
    """Send ``sig`` to the component while its pid is still the process started; False when it is not."""
    pidfd = _open_pidfd(record.pid)
    try:
        if not owns(record):
            return False
        _signal(record.pid, pidfd, sig)
        return True
    finally:
        if pidfd is not None:
            os.close(pidfd)


def stop(record: ComponentRecord, *, timeout: float = 10.0) -> StopOutcome:
    """SIGTERM the component, SIGKILL it after ``timeout`` s; only while the pid is still the one started."""
    if not is_alive(record.pid):
        return StopOutcome(record.name, record.pid, "not-running")
    pidfd = _open_pidfd(record.pid)
    try:
        if not owns(record):  # checked after the pidfd is open, so what we checked is what we signal
            log.warning("local.pid_reused", extra={"component": record.name, "pid": record.pid})
            return StopOutcome(record.name, record.pid, "not-ours")
        _signal(record.pid, pidfd, signal.SIGTERM)
        if wait_until(lambda: not is_alive(record.pid), timeout=timeout):
            return StopOutcome(record.name, record.pid, "stopped")
        log.warning("local.kill", extra={"component": record.name, "pid": record.pid, "after_s": timeout})
        _signal(record.pid, pidfd, signal.SIGKILL)
        wait_until(lambda: not is_alive(record.pid), timeout=5.0)
        return StopOutcome(record.name, record.pid, "killed")
    finally:
        if pidfd is not None:
            os.close(pidfd)
